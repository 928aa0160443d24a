"""``detrkd bench accuracy``: teacher, no-KD student and distilled students on one dataset, one
schedule and one seed, COCO-evaluated on the full val split, in one table.

A *row* is one run: ``teacher`` and ``no_kd`` are ``detrkd train`` runs of the teacher / student
configs, every other row is a ``detrkd distill`` run of the student config with a ``methods``
mapping. A *suite* is a list of rows written to one result file:

    all              every method at its paper defaults          -> accuracy.json
    qskd             QSKD and its AGFD-only / LAPD-only ablation  -> qskd.json
    kd_detr          KD-DETR points and rebalance ablation, and   -> kd_detr.json
                     mean-normalised terms (normalise: mean)
    active_sampling  active sampling, its temperature sweep and  -> active_sampling.json
                     confidence-weighted points (rebalance)

Rows are shared between suites (one run directory per row and preset: ``runs/<preset prefix>_<row>``),
finished runs are reused and interrupted ones resumed, so suites can be run in any order, in pieces
(``--only``), and in the background. A *preset* sizes the runs for the hardware: ``cpu`` is the
configs as committed (the bundled digits data, 2 threads, 12 epochs: the whole ``all`` suite is a few
hours on a 2-core CPU), ``gpu`` a larger teacher / student on a larger digits set.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..provenance import PROVENANCE_FILE, git_sha, hardware, read_commands, read_git_shas
from .runs import STATS, detrkd_cmd, ensure_trained, eval_curve, evaluate_run, run, run_config, shown, train_minutes

TEACHER_CONFIG = Path("configs/digits_teacher.yaml")
STUDENT_CONFIG = Path("configs/digits_student.yaml")


@dataclass(frozen=True)
class Row:
    """One run: a distill config (or a plain training config for ``teacher`` / ``no_kd``) and
    ``--set`` overrides of it (an ablation changes one key, or replaces ``methods``)."""

    config: Path
    sets: tuple[str, ...] = ()
    command: str = "distill"


QSKD, KD_DETR, ACTIVE_SAMPLING = (Path(f"configs/digits_{m}.yaml") for m in ("qskd", "kd_detr", "active_sampling"))
ROWS: dict[str, Row] = {
    "teacher": Row(TEACHER_CONFIG, command="train"),
    "no_kd": Row(STUDENT_CONFIG, command="train"),
    "qskd": Row(QSKD),
    "agfd_only": Row(QSKD, ('methods={"agfd": {"weight": 50.0}}',)),
    "lapd_only": Row(QSKD, ('methods={"lapd": {"weight": 1.0}}',)),
    "kd_detr": Row(KD_DETR),
    "kd_detr_general": Row(KD_DETR, ("methods.kd_detr.points=general",)),
    "kd_detr_specific": Row(KD_DETR, ("methods.kd_detr.points=specific",)),
    "kd_detr_no_rebalance": Row(KD_DETR, ("methods.kd_detr.rebalance=false",)),
    "kd_detr_mean": Row(KD_DETR, ("methods.kd_detr.normalise=mean",)),
    "active_sampling": Row(ACTIVE_SAMPLING),
    **{f"active_sampling_t{t}": Row(ACTIVE_SAMPLING, (f"methods.active_sampling.temperature={t}.0",))
       for t in (1, 2, 8)},
    "active_sampling_rebalance": Row(ACTIVE_SAMPLING, ("methods.active_sampling.rebalance=true",)),
    "global_alignment": Row(Path("configs/digits_global_alignment.yaml")),
    "fitnet": Row(Path("configs/digits_fitnet.yaml")),
}

SUITES: dict[str, tuple[str, ...]] = {
    "all": ("qskd", "kd_detr", "active_sampling", "global_alignment", "fitnet"),
    "qskd": ("qskd", "agfd_only", "lapd_only"),
    "kd_detr": ("kd_detr", "kd_detr_general", "kd_detr_specific", "kd_detr_no_rebalance", "kd_detr_mean"),
    "active_sampling": ("active_sampling", "active_sampling_t1", "active_sampling_t2", "active_sampling_t8",
                        "active_sampling_rebalance"),
}
RESULT_FILES = {"all": "accuracy.json"}


@dataclass(frozen=True)
class Preset:
    """Sizing of every run of a suite: ``--set`` overrides for all runs, for the teacher only and
    for the students only; the data to use (made with ``detrkd data digits DATA_ARGS``)."""

    name: str
    prefix: str
    data: Path
    data_args: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    teacher_sets: tuple[str, ...] = ()
    student_sets: tuple[str, ...] = ()
    notes: str = ""


PRESETS: dict[str, Preset] = {
    "cpu": Preset("cpu", "digits", Path("data/digits"),
                  notes="configs as committed: 2000 train images, 256 px, 12 epochs, batch 8, 2 threads"),
    "gpu": Preset("gpu", "digits_gpu", Path("data/digits_gpu"), data_args=("--train-images", "20000", "--val-images", "1000"),
                  sets=("device=cuda", "threads=null", "data.num_workers=4", "data.batch_size=16",
                        "optim.epochs=24", "optim.warmup_steps=1000", "eval_max_images=null"),
                  teacher_sets=("model.preset=base",), student_sets=("model.preset=small",),
                  notes="20000 train images, RT-DETR base -> small, 24 epochs, batch 16, one GPU "
                        "(not yet run: no GPU was available while it was written)"),
}


@dataclass
class Suite:
    """The runs of one suite under one preset, and where their results go."""

    name: str
    preset: Preset
    rows: Sequence[str]
    out: Path
    commands: dict[str, list[str]] = field(default_factory=dict)

    def run_dir(self, row: str) -> Path:
        legacy = {"teacher": "teacher", "no_kd": "student"}  # the baseline's directory names
        return Path("runs") / f"{self.preset.prefix}_{legacy.get(row, row)}"

    def ensure_data(self) -> str:
        data = self.preset.data
        args = ["data", "digits", "--out", str(data), *self.preset.data_args]
        if not (data / "annotations" / "instances_val.json").exists():
            run(detrkd_cmd(*args))
        return shown(args)

    def train(self, name: str) -> dict[str, Any]:
        """Train (or reuse) and evaluate one row; its stats plus the commands that made them."""
        row, run_dir = ROWS[name], self.run_dir(name)
        sets = [f"data.root={self.preset.data}", *self.preset.sets]
        sets += self.preset.teacher_sets if name == "teacher" else self.preset.student_sets
        if row.command == "distill":
            sets.append(f"teacher={self.run_dir('teacher') / 'last.pt'}")
        sets += row.sets
        command = ensure_trained(row.command, row.config, run_dir, sets)
        stats, eval_command = evaluate_run(run_dir, self.preset.data)
        self.commands[name] = [*(read_commands(run_dir) or [command]), eval_command]
        return stats


def result_row(name: str, run_dir: Path, stats: dict[str, Any], teacher_ap: float, student_ap: float,
               commands: list[str]) -> dict[str, Any]:
    """One row of a result file (see the issue's schema), with ``gap_closed`` and provenance."""
    gap = teacher_ap - student_ap
    config = run_config(run_dir)
    return {"method": name, **{k: round(stats[k], 4) for k in STATS},
            "teacher_ap": round(teacher_ap, 4), "student_ap": round(student_ap, 4),
            "gap_closed": round((stats["ap"] - student_ap) / gap, 3) if gap > 0 else None,
            "train_minutes": round(train_minutes(run_dir), 1), "threads": config.get("threads"),
            "methods": config.get("methods"), "run_dir": str(run_dir),
            "trained_at_git": read_git_shas(run_dir) or None,
            "eval_curve": eval_curve(run_dir), "command": commands}


def run_suite(name: str, preset: str | Preset = "cpu", only: Sequence[str] | None = None,
              out: Path | None = None, results_dir: Path = Path("benchmarks/results")) -> list[dict[str, Any]]:
    """Run (or reuse) the teacher, the no-KD student and the suite's rows; write the result file
    (``<suite>.json``, or ``accuracy.json`` for ``all``), ``*_meta.json``, a markdown table and a
    PNG plot next to it; returns the rows. ``only``: a subset of the suite's rows to run now (rows
    already finished are reported too)."""
    rows = list(SUITES[name])
    unknown = sorted(set(only or ()) - set(rows))
    if unknown:
        raise ValueError(f"--only: {unknown} are not rows of suite {name!r}; its rows: {rows}")
    out = out or results_dir / RESULT_FILES.get(name, f"{name}.json")
    suite = Suite(name, PRESETS[preset] if isinstance(preset, str) else preset, rows, out)
    data_command = suite.ensure_data()
    base = {role: suite.train(role) for role in ("teacher", "no_kd")}
    for role in ("teacher", "no_kd"):
        suite.commands[role].insert(0, data_command)
    t_ap, s_ap = base["teacher"]["ap"], base["no_kd"]["ap"]
    stats = dict(base)
    for row in rows:
        if only is None or row in only or (suite.run_dir(row) / "eval_val.json").exists():
            stats[row] = suite.train(row)
    results = [result_row(r, suite.run_dir(r), s, t_ap, s_ap, suite.commands[r]) for r, s in stats.items()]
    write_results(results, suite)
    return results


RAW_FILES = ("config.yaml", "metrics.jsonl", "eval_val.json")


def write_results(results: list[dict[str, Any]], suite: Suite) -> None:
    """The result file, its ``_meta.json``, markdown table and PNG plot, and every row's raw
    outputs (``RAW_FILES``) copied to ``<result dir>/<suite>/<row>_<file>``: the evidence stays
    with the table when ``runs/`` is gone."""
    import torch

    out = suite.out
    code = git_sha()  # before this function modifies tracked result files
    raw = out.parent / out.stem
    raw.mkdir(parents=True, exist_ok=True)
    for row in results:
        run_dir = Path(row["run_dir"])
        optional = [PROVENANCE_FILE] if (run_dir / PROVENANCE_FILE).exists() else []  # not in older runs
        for name in [*RAW_FILES, *optional]:
            shutil.copyfile(run_dir / name, raw / f"{row['method']}_{name}")
    out.write_text(json.dumps(results, indent=2) + "\n")
    preset = suite.preset.name
    meta = {"suite": suite.name, "preset": preset, "preset_notes": suite.preset.notes, "hardware": hardware(),
            "torch": torch.__version__, "git_sha": code,
            "command": f"detrkd bench accuracy --suite {suite.name} --preset {preset}"}
    out.with_name(out.stem + "_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    footer = (f"\n\n`{meta['command']}` ({suite.preset.notes}); {meta['hardware']}, torch {meta['torch']}, "
              f"git {meta['git_sha']}. Val split, COCO AP; `gap closed` = (AP - no-KD AP) / (teacher AP - "
              f"no-KD AP). Each row's commands: `{out.name}`; raw outputs: `{raw.name}/`.")
    out.with_suffix(".md").write_text(markdown(results) + footer + "\n")
    plot(results, out.with_suffix(".png"), title=f"{suite.name} ({preset}, {suite.preset.data})")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The result rows as a markdown table."""
    lines = ["| method | AP | AP50 | AP75 | APs | APm | APl | gap closed | train min (threads) | trained at git |",
             "|" + "---|" * 10]
    for r in rows:
        gap = "" if r["gap_closed"] is None else f"{r['gap_closed']:.2f}"
        code = ", ".join(r.get("trained_at_git") or ["not recorded"])
        minutes = f"{r['train_minutes']:.0f} ({r.get('threads') or 'default'})"
        cells = [r["method"], *(f"{r[k]:.3f}" for k in STATS), gap, minutes, code]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Two panels: final AP per run (teacher and no-KD as lines), AP during training per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = [r for r in rows if r["method"] not in ("teacher", "no_kd")]
    bars.bar([r["method"] for r in methods], [r["ap"] for r in methods], color="tab:blue")
    for r, style in ((rows[0], "tab:green"), (rows[1], "tab:red")):
        bars.axhline(r["ap"], color=style, linestyle="--", label=f"{r['method']} {r['ap']:.3f}")
    bars.set_ylabel("COCO AP (val)")
    bars.tick_params(axis="x", labelrotation=30)
    bars.legend(loc="lower right")
    for r in rows:
        if r["eval_curve"]:
            epochs, aps = zip(*r["eval_curve"])
            curves.plot(epochs, aps, marker="o", label=r["method"])
    curves.set_xlabel("epoch")
    curves.set_ylabel("AP (periodic eval subset)")
    curves.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
