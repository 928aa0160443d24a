"""``detrkd bench accuracy``: teacher, no-KD student and distilled students on one dataset, one
schedule and one seed, COCO-evaluated on the full val split, in one table.

A *row* is one run: ``teacher`` and ``no_kd`` are ``detrkd train`` runs of the teacher / student
configs, every other row is a ``detrkd distill`` run of the student config with a ``methods``
mapping. A *suite* is a list of rows written to one result file:

    all              every method at its paper defaults          -> accuracy.json
    qskd             QSKD, its AGFD-only / LAPD-only ablation and  -> qskd.json
                     the AGFD mask rows of its Table 5
    kd_detr          KD-DETR points and rebalance ablation, and   -> kd_detr.json
                     mean-normalised terms (normalise: mean)
    active_sampling  active sampling, its temperature sweep and  -> active_sampling.json
                     confidence-weighted points (rebalance)
    heterogeneous    KD-DETR heterogeneous (Sec. 4.2) and FitNet   -> heterogeneous.json
                     on the FPN into a torchvision Faster R-CNN
                     student (``--setting heterogeneous`` only)

Rows are shared between suites (one run directory per row, setting, preset and seed:
``runs/[paper_]<preset prefix>_<row>[_seed<K>]``), finished runs are reused and interrupted ones
resumed, so suites can be run in any order, in pieces (``--only``), and in the background.

A *setting* says which teacher / student pair a suite distils (``SETTINGS``): ``compressed`` is the
configs as committed (RT-DETR small -> tiny: the student has a 64-wide, 2-layer, 30-query decoder),
``paper`` the papers' setting (the student keeps the teacher's transformer exactly and has a smaller
backbone only), ``heterogeneous`` the same teacher into a CNN student (``models.cnn``; only for the
suite of that name, whose methods need a CNN student). Each setting writes its own result files
(``paper``: under ``results/paper/``); a setting that keeps the committed teacher shares its run.
A *preset* sizes the runs for the hardware: ``cpu`` is the configs as committed (the bundled digits
data, 12 epochs), ``gpu`` a larger teacher / student on a larger digits set. *Seeds*: every row but
the teacher (seed 0, shared) is trained once per seed; a result row reports the mean over the seeds
that finished and each seed's stats (``per_seed``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..provenance import PROVENANCE_FILE, RUN_FILES, git_sha, hardware, read_commands, read_git_shas
from .runs import (RAW_OUTPUTS, STATS, RowBusy, detrkd_cmd, ensure_trained, eval_curve, evaluate_run, restore_run,
                   run, run_config, shown, train_minutes, wait_until_free)

TEACHER_CONFIG = Path("configs/digits_teacher.yaml")
STUDENT_CONFIG = Path("configs/digits_student.yaml")


@dataclass(frozen=True)
class Row:
    """One run: a distill config (or a plain training config for ``teacher`` / ``no_kd``) and
    ``--set`` overrides of it (an ablation changes one key, or replaces ``methods``)."""

    config: Path
    sets: tuple[str, ...] = ()
    command: str = "distill"


QSKD, KD_DETR, ACTIVE_SAMPLING, CNN_KD_DETR = (Path(f"configs/digits_{m}.yaml")
                                               for m in ("qskd", "kd_detr", "active_sampling", "cnn_kd_detr"))
ROWS: dict[str, Row] = {
    "teacher": Row(TEACHER_CONFIG, command="train"),
    "no_kd": Row(STUDENT_CONFIG, command="train"),
    "qskd": Row(QSKD),
    "agfd_only": Row(QSKD, ('methods={"agfd": {"weight": 50.0}}',)),
    "lapd_only": Row(QSKD, ('methods={"lapd": {"weight": 1.0}}',)),
    # QSKD Table 5 (AGFD alone): no mask (plain BN feature MSE), positives only, easy negatives only
    **{f"agfd_{mask}": Row(QSKD, (f'methods={{"agfd": {{"weight": 50.0, "mask": "{mask}"}}}}',))
       for mask in ("none", "positives", "easy_negatives")},
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
    # heterogeneous (a CNN student): KD-DETR Sec. 4.2, and FitNet from the memory into the FPN
    "kd_detr_hetero": Row(CNN_KD_DETR),
    "fpn_fitnet": Row(CNN_KD_DETR, ('methods={"fpn_fitnet": {"weight": 50.0}}',)),
}

SUITES: dict[str, tuple[str, ...]] = {
    "all": ("qskd", "kd_detr", "active_sampling", "global_alignment", "fitnet"),
    "qskd": ("qskd", "agfd_only", "lapd_only", "agfd_none", "agfd_positives", "agfd_easy_negatives"),
    "kd_detr": ("kd_detr", "kd_detr_general", "kd_detr_specific", "kd_detr_no_rebalance", "kd_detr_mean"),
    "active_sampling": ("active_sampling", "active_sampling_t1", "active_sampling_t2", "active_sampling_t8",
                        "active_sampling_rebalance"),
    "heterogeneous": ("kd_detr_hetero", "fpn_fitnet"),
    # prediction-level methods only: the feature methods need both memories on one token grid
    "cross_family": ("lapd_only", "kd_detr_mean", "active_sampling"),
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
    results: str = ""  # result sub-directory ("" = benchmarks/results itself)
    teacher: Path | None = None  # a shipped teacher (from_pretrained dir) used instead of training one



# RT-DETR small on data/digits, 12 epochs (0.695 AP): made by the compressed setting's teacher row,
# `detrkd train --config configs/digits_teacher.yaml --set threads=1`, then
# `detrkd export --checkpoint runs/digits_teacher/last.pt --out detrkd/assets/digits_teacher --dtype float16 --with-run-files`
SHIPPED_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "digits_teacher"
QUICK_EPOCHS = 4

PRESETS: dict[str, Preset] = {
    "quick": Preset("quick", "quick", Path("data/digits"),
                    student_sets=(f"optim.epochs={QUICK_EPOCHS}", "optim.warmup_steps=100", "eval_every_epochs=2"),
                    teacher=SHIPPED_TEACHER, results="quick",
                    notes=f"the main job (make distill): the shipped teacher (detrkd/assets/digits_teacher, "
                          f"fp16), students {QUICK_EPOCHS} epochs, warm-up 100 steps, 2 threads"),
    "cpu": Preset("cpu", "digits", Path("data/digits"),
                  notes="configs as committed: 2000 train images, 256 px, 12 epochs, batch 8; threads: the "
                        "table's column (configs: 2, --threads overrides)"),
    "gpu": Preset("gpu", "digits_gpu", Path("data/digits_gpu"), data_args=("--train-images", "20000", "--val-images", "1000"),
                  sets=("device=cuda", "threads=null", "data.num_workers=4", "data.batch_size=16",
                        "optim.epochs=24", "optim.warmup_steps=1000", "eval_max_images=null"),
                  teacher_sets=("model.preset=base",), student_sets=("model.preset=small",),
                  notes="20000 train images, RT-DETR base -> small, 24 epochs, batch 16, one GPU "
                        "(not yet run: no GPU was available while it was written)"),
}


@dataclass(frozen=True)
class Setting:
    """Which teacher / student pair: ``--set`` overrides of the teacher's and of every student's
    config (the configs as committed are the ``compressed`` pair), a run-directory prefix and the
    result sub-directory."""

    name: str
    prefix: str = ""
    results: str = ""
    teacher_sets: tuple[str, ...] = ()
    student_sets: tuple[str, ...] = ()
    notes: str = ""
    suites: tuple[str, ...] | None = None  # the only suites it runs (None: every suite no setting claims)


SETTINGS: dict[str, Setting] = {
    "compressed": Setting("compressed", notes="RT-DETR small (d 128, 1 / 3 layers, 100 queries, 32-256 backbone) "
                                              "-> tiny (d 64, 1 / 2 layers, 30 queries, 16-128 backbone)"),
    "paper": Setting("paper", "paper_", "paper", teacher_sets=("model.backbone=base",),
                     student_sets=("model.preset=small", "model.backbone=tiny"),
                     notes="the papers' setting: teacher and student share the RT-DETR small transformer "
                           "(d 128, 1 encoder / 3 decoder layers, 100 queries); backbones ResNet-18-like "
                           "(64-512, 2-2-2-2) -> tiny (16-128, 1-1-1-1)"),
    "heterogeneous": Setting("heterogeneous", "hetero_", suites=("heterogeneous",),
                             student_sets=("model.family=faster_rcnn", "model.preset=small"),
                             notes="KD-DETR Sec. 4.2 on digits: the RT-DETR small teacher -> a torchvision Faster "
                                   "R-CNN student (ResNet-style 32-256 body, FPN 48, random init; models.cnn small)"),
    "cross_family": Setting("cross_family", "rf_", "cross_family", suites=("cross_family",),
                            student_sets=("model.family=rf_detr",),
                            notes="across families: the compressed setting's RT-DETR small teacher -> an RF-DETR "
                                  "tiny student (windowed DINOv2-style ViT 64 x 4 layers, one projector level, "
                                  "d 64, 2 decoder layers, 30 queries, 13 Group-DETR groups in training)"),
    "cross_family_deimv2": Setting("cross_family_deimv2", "deimv2_", "cross_family_deimv2", suites=("cross_family",),
                                   student_sets=("model.family=deimv2",),
                                   notes="across families: the compressed setting's RT-DETR small teacher -> a "
                                         "DEIMv2 tiny student (D-FINE-style decoder with distribution boxes, "
                                         "the RT-DETR tiny student's 16-128 backbone, d 64, 2 decoder layers, "
                                         "30 queries)"),
}


def check_setting(suite: str, setting: Setting) -> None:
    """``ValueError`` for a suite the setting does not run (a CNN student's suite and the DETR ones)."""
    owners = [s.name for s in SETTINGS.values() if suite in (s.suites or ())]
    if owners and setting.name not in owners:
        raise ValueError(f"suite {suite!r} runs under --setting {' or '.join(owners)} only")
    if setting.suites is not None and suite not in setting.suites:
        raise ValueError(f"--setting {setting.name} runs the suite(s) {list(setting.suites)} only, not {suite!r}")


@dataclass
class Suite:
    """The runs of one suite under one setting, preset and seeds, and where their results go."""

    name: str
    preset: Preset
    rows: Sequence[str]
    out: Path
    setting: Setting = SETTINGS["compressed"]
    seeds: Sequence[int] = (0,)
    threads: int | None = None
    only: Sequence[str] | None = None
    teacher: Path | None = None  # an exported teacher (--teacher) used instead of the teacher row's run
    results: Path | None = None  # the setting's result directory, when ``out`` is elsewhere (--out)
    commands: dict[str, list[str]] = field(default_factory=dict)

    @property
    def shipped(self) -> Path | None:
        """The exported teacher directory the rows distil from, if any: ``--teacher``, else the preset's."""
        return self.teacher or self.preset.teacher

    def command(self) -> str:
        """The ``detrkd bench accuracy`` command line of this suite, as run."""
        parts = [f"detrkd bench accuracy --suite {self.name} --setting {self.setting.name} --preset "
                 f"{self.preset.name} --seeds {' '.join(map(str, self.seeds))}"]
        parts += [f"--threads {self.threads}"] if self.threads else []
        parts += [f"--teacher {self.teacher}"] if self.teacher else []
        parts += [" ".join(["--only", *self.only])] if self.only is not None else []
        return " ".join(parts)

    def run_dir(self, row: str, seed: int = 0) -> Path:
        legacy = {"teacher": "teacher", "no_kd": "student"}  # the baseline's directory names
        suffix = f"_seed{seed}" if seed else ""
        shared = row == "teacher" and not self.setting.teacher_sets  # the committed teacher: one run for all
        prefix = "" if shared else self.setting.prefix
        given = f"_{self.teacher.name}" if row == "teacher" and self.teacher else ""  # never the trained one's
        return Path("runs") / f"{prefix}{self.preset.prefix}_{legacy.get(row, row)}{given}{suffix}"

    def row_seeds(self, row: str) -> Sequence[int]:
        return (0,) if row == "teacher" else self.seeds

    def ensure_data(self) -> str:
        data = self.preset.data
        args = ["data", "digits", "--out", str(data), *self.preset.data_args]
        if not (data / "annotations" / "instances_val.json").exists():
            run(detrkd_cmd(*args))
        return shown(args)

    def sets(self, name: str, seed: int = 0) -> list[str]:
        """Every ``--set`` of one row's run: data, preset, setting, teacher, the row's own, seed."""
        row = ROWS[name]
        teacher = name == "teacher"
        sets = [f"data.root={self.preset.data}", *self.preset.sets]
        sets += self.preset.teacher_sets if teacher else self.preset.student_sets
        sets += self.setting.teacher_sets if teacher else self.setting.student_sets
        if row.command == "distill":
            sets.append(f"teacher={self.teacher_checkpoint()}")
        sets += row.sets
        sets += [f"seed={seed}"] if seed else []
        return sets + ([f"threads={self.threads}"] if self.threads else [])

    def teacher_checkpoint(self) -> Path:
        """The teacher the distilled rows use: the exported one (``--teacher``, or the preset's
        shipped one; relative to the working directory when inside it), or the teacher row's."""
        if self.shipped is None:
            return self.run_dir("teacher") / "last.pt"
        shipped = self.shipped.resolve()
        return shipped.relative_to(Path.cwd()) if shipped.is_relative_to(Path.cwd()) else shipped

    def shipped_teacher(self) -> dict[str, Any]:
        """The teacher row of an exported teacher (``--teacher`` or the preset's): the run files it
        was trained with (exported beside its weights) copied to the row's run directory, and its
        evaluation."""
        run_dir, asset = self.run_dir("teacher"), self.shipped
        check_exported_teacher(asset)
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:  # a shipped teacher: detrkd export --with-run-files
            if not (run_dir / name).exists():
                shutil.copyfile(asset / name, run_dir / name)
        stats, eval_command = evaluate_run(run_dir, self.preset.data, checkpoint=self.teacher_checkpoint())
        info = json.loads((asset / "detrkd_export.json").read_text())
        made = [*(shown(r["argv"][1:]) for r in info.get("provenance", [])), info.get("command", "")]
        self.commands.setdefault("teacher", []).extend([c for c in made if c] + [eval_command])
        return stats

    def train(self, name: str, seed: int = 0) -> dict[str, Any]:
        """Train (or reuse) and evaluate one row for one seed; its stats (the commands that made
        them go to ``self.commands``)."""
        if name == "teacher" and self.shipped is not None:
            return self.shipped_teacher()
        row, run_dir = ROWS[name], self.run_dir(name, seed)
        if row.command == "distill" and not self.finished(name, seed):  # a finished row is reported as it is
            self.check_teacher(run_dir)
            if not self.teacher_checkpoint().exists():
                raise ValueError(f"{run_dir} needs the teacher {self.teacher_checkpoint()}, which is not here "
                                 f"(a teacher row restored from its raw outputs keeps no checkpoint): give an "
                                 f"exported teacher with --teacher DIR, or move {self.run_dir('teacher')} away "
                                 f"to train it again")
        command = ensure_trained(row.command, row.config, run_dir, self.sets(name, seed))
        stats, eval_command = evaluate_run(run_dir, self.preset.data)
        self.commands.setdefault(name, []).extend([*(read_commands(run_dir) or [command]), eval_command])
        return stats

    def check_teacher(self, run_dir: Path) -> None:
        """``ValueError`` if ``run_dir`` holds a run distilled from another teacher than this suite's:
        resuming it would mix two teachers in one row. (A finished row is reported with its own
        teacher, which its result row names; ``teachers_note`` flags a table with two.)"""
        if not (run_dir / "config.yaml").exists():
            return
        had, wanted = run_config(run_dir).get("teacher"), str(self.teacher_checkpoint())
        if had != wanted:
            raise ValueError(f"{run_dir} was distilled from teacher {had}, this suite's is {wanted}: move that "
                             f"run directory away, or run the suite with the teacher it was distilled from")

    def restore(self, name: str, seed: int = 0) -> None:
        """Rebuild a finished row's run directory from the raw outputs committed beside the result
        tables of this setting and preset, and beside ``out`` (``runs.restore_run``), when ``runs/``
        does not have it: a fresh machine reports, and distils next to, the rows an earlier one trained."""
        if name == "teacher" and self.shipped is not None:
            return
        raw_dirs = [self.out.parent / self.out.stem]  # the suite's own raw outputs first, then every table's
        for results in dict.fromkeys([self.out.parent, self.results or self.out.parent]):
            raw_dirs += [results, *sorted(p for p in results.glob("*") if p.is_dir())]
        import torch

        tag = name + (f"_seed{seed}" if seed else "")
        source = restore_run(self.run_dir(name, seed), raw_dirs, tag, torch.__version__)
        if source is not None:
            print(f"+ {self.run_dir(name, seed)}: restored from {source}/{tag}_* (finished; no checkpoint)",
                  flush=True)

    def finished(self, name: str, seed: int = 0) -> bool:
        return (self.run_dir(name, seed) / "eval_val.json").exists()


def check_exported_teacher(path: Path) -> None:
    """``ValueError`` unless ``path`` is a ``detrkd export --with-run-files`` directory: its weights'
    export record and the run files it was trained with (what the teacher row reports)."""
    missing = [name for name in (*RUN_FILES, "detrkd_export.json") if not (path / name).is_file()]
    if missing:
        raise ValueError(f"teacher {path}: no {', '.join(missing)} (export it with `detrkd export "
                         f"--checkpoint RUN --out DIR --with-run-files`)")


def mean_stats(per_seed: dict[int, dict[str, Any]]) -> dict[str, float]:
    """The mean of each COCO stat over the seeds of one row."""
    return {k: sum(s[k] for s in per_seed.values()) / len(per_seed) for k in STATS}


def result_row(name: str, run_dirs: dict[int, Path], per_seed: dict[int, dict[str, Any]], teacher_ap: float,
               student_ap: float, commands: list[str]) -> dict[str, Any]:
    """One row of a result file, with ``gap_closed`` and provenance. Stats are means over the seeds
    (``per_seed``: each seed's AP and run directory); the curve, config and minutes are the
    first seed's."""
    gap = teacher_ap - student_ap
    stats = mean_stats(per_seed)
    first = run_dirs[min(run_dirs)]
    config = run_config(first)
    return {"method": name, **{k: round(stats[k], 4) for k in STATS},
            "teacher_ap": round(teacher_ap, 4), "student_ap": round(student_ap, 4),
            "gap_closed": round((stats["ap"] - student_ap) / gap, 3) if gap > 0 else None,
            "seeds": sorted(per_seed),
            "per_seed": {str(k): {"ap": round(v["ap"], 4), "run_dir": str(run_dirs[k])}
                         for k, v in sorted(per_seed.items())},
            "train_minutes": round(train_minutes(first), 1), "threads": config.get("threads"),
            "methods": config.get("methods"), "teacher": config.get("teacher"), "run_dir": str(first),
            "trained_at_git": sorted({sha for d in run_dirs.values() for sha in read_git_shas(d)}) or None,
            "eval_curve": eval_curve(first), "command": commands}


def run_suite(name: str, preset: str | Preset = "cpu", only: Sequence[str] | None = None,
              out: Path | None = None, results_dir: Path = Path("benchmarks/results"),
              setting: str | Setting = "compressed", seeds: Sequence[int] = (0,),
              threads: int | None = None, teacher: Path | None = None) -> list[dict[str, Any]]:
    """Run (or reuse) the teacher, the no-KD student and the suite's rows under one setting, for
    every seed; write the result file (``<suite>.json``, or ``accuracy.json`` for ``all``, under
    the setting's sub-directory), ``*_meta.json``, a markdown table and a PNG plot next to it;
    returns the rows. ``only``: a subset of the suite's rows to run now (rows and seeds already
    finished are reported too); ``threads``: torch threads of the runs started now (default: the
    configs'; results repeat bit-for-bit for a fixed thread count); ``teacher``: an exported teacher
    (``detrkd export --with-run-files``) every row distils from instead of training the teacher row."""
    rows = list(SUITES[name])
    unknown = sorted(set(only or ()) - set(rows))
    if unknown:
        raise ValueError(f"--only: {unknown} are not rows of suite {name!r}; its rows: {rows}")
    setting = SETTINGS[setting] if isinstance(setting, str) else setting
    check_setting(name, setting)
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    if teacher is not None:
        check_exported_teacher(teacher)
    results = results_dir / setting.results / preset.results
    out = out or results / RESULT_FILES.get(name, f"{name}.json")
    suite = Suite(name, preset, rows, out, setting, tuple(sorted(set(seeds))), threads, only, teacher, results)
    data_command = suite.ensure_data()
    stats: dict[str, dict[int, dict[str, Any]]] = {}
    busy: list[tuple[str, int]] = []  # rows another process is training: done after the others
    for row in ("teacher", "no_kd", *rows):
        wanted = row in ("teacher", "no_kd") or only is None or row in only
        for seed in suite.row_seeds(row):
            suite.restore(row, seed)
            if not (wanted or suite.finished(row, seed)):
                continue
            if row == "teacher":  # every distilled row needs it finished
                wait_until_free(suite.run_dir(row, seed))
            try:
                stats.setdefault(row, {})[seed] = suite.train(row, seed)
            except RowBusy:
                print(f"+ {suite.run_dir(row, seed)} is being trained by another process: later", flush=True)
                busy.append((row, seed))
    for row, seed in busy:
        wait_until_free(suite.run_dir(row, seed))
        stats.setdefault(row, {})[seed] = suite.train(row, seed)
    stats = {row: stats[row] for row in ("teacher", "no_kd", *rows) if stats.get(row)}
    for role in ("teacher", "no_kd"):
        suite.commands[role].insert(0, data_command)
    t_ap, s_ap = (mean_stats(stats[r])["ap"] for r in ("teacher", "no_kd"))
    results = [result_row(r, {k: suite.run_dir(r, k) for k in s}, s, t_ap, s_ap, suite.commands[r])
               for r, s in stats.items()]
    write_results(results, suite)
    return results


def write_results(results: list[dict[str, Any]], suite: Suite) -> None:
    """The result file, its ``_meta.json``, markdown table and PNG plot, and every row's raw
    outputs (``RAW_OUTPUTS``) copied to ``<result dir>/<suite>/<row>_<file>``: the evidence stays
    with the table when ``runs/`` is gone."""
    import torch

    out = suite.out
    code = git_sha()  # before this function modifies tracked result files
    raw = out.parent / out.stem
    raw.mkdir(parents=True, exist_ok=True)
    for row in results:
        for seed, entry in row["per_seed"].items():
            run_dir = Path(entry["run_dir"])
            optional = [PROVENANCE_FILE] if (run_dir / PROVENANCE_FILE).exists() else []  # not in older runs
            tag = row["method"] + (f"_seed{seed}" if seed != "0" else "")
            for name in [*RAW_OUTPUTS, *optional]:
                shutil.copyfile(run_dir / name, raw / f"{tag}_{name}")
    out.write_text(json.dumps(results, indent=2) + "\n")
    preset = suite.preset.name
    setting = suite.setting.name
    meta = {"suite": suite.name, "setting": setting, "setting_notes": suite.setting.notes, "preset": preset,
            "preset_notes": suite.preset.notes, "seeds": list(suite.seeds), "hardware": hardware(),
            "torch": torch.__version__, "git_sha": code, "command": suite.command()}
    out.with_name(out.stem + "_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    footer = (f"\n\n`{meta['command']}` ({suite.setting.notes}; {suite.preset.notes}); {meta['hardware']}, "
              f"torch {meta['torch']}, "
              f"git {meta['git_sha']}. Val split, COCO AP; `gap closed` = (AP - no-KD AP) / (teacher AP - "
              f"no-KD AP). Each row's commands: `{out.name}`; raw outputs: `{raw.name}/`.")
    out.with_suffix(".md").write_text(markdown(results) + footer + teachers_note(results) + "\n")
    plot(results, out.with_suffix(".png"), title=f"{suite.name} ({setting} setting, {preset}, {suite.preset.data})")


def teachers_note(rows: list[dict[str, Any]]) -> str:
    """A line naming the teacher of each distilled row when they are not all the same one ("" if
    they are): a table whose rows were distilled from two teachers says so."""
    by_teacher: dict[str, list[str]] = {}
    for r in rows:
        if r.get("teacher"):
            by_teacher.setdefault(str(r["teacher"]), []).append(r["method"])
    if len(by_teacher) < 2:
        return ""
    return " Distilled from two or more teachers: " + "; ".join(
        f"`{t}` ({', '.join(names)})" for t, names in by_teacher.items()) + "."


def markdown(rows: list[dict[str, Any]]) -> str:
    """The result rows as a markdown table."""
    lines = ["| method | AP | AP50 | AP75 | APs | APm | APl | AP per seed | gap closed | train min (threads) "
             "| trained at git |",
             "|" + "---|" * 11]
    for r in rows:
        gap = "" if r["gap_closed"] is None else f"{r['gap_closed']:.2f}"
        code = ", ".join(r.get("trained_at_git") or ["not recorded"])
        minutes = f"{r['train_minutes']:.0f} ({r.get('threads') or 'default'})"
        per_seed = " / ".join(f"{v['ap']:.3f} (s{k})" for k, v in r.get("per_seed", {}).items())
        cells = [r["method"], *(f"{r[k]:.3f}" for k in STATS), per_seed, gap, minutes, code]
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
