"""The benchmark commands: every suite row is a valid run, the overhead timer and the accuracy suite
write their files with the promised fields (on tiny models and data)."""

import json
from pathlib import Path

import pytest
import torch

from detrkd.bench.accuracy import ROWS, SUITES, Preset, markdown, run_suite
from detrkd.bench.overhead import FLOOR, STUDENT, Pair, method_specs, run_overhead
from detrkd.cli import main
from detrkd.config import DistillConfig, load_config
from detrkd.distill.methods import build_methods
from detrkd.models import build_detector
from detrkd.models.cnn import CNN_FAMILIES, build_cnn_detector
from detrkd.provenance import git_sha

REPO = Path(__file__).resolve().parents[1]
TINY = ("model.preset=tiny", "data.image_size=64", "data.batch_size=4", "optim.epochs=1",
        "optim.warmup_steps=1", "eval_max_images=4", "threads=1", "log_every_steps=1")


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_row_is_a_valid_run(name, monkeypatch):
    """Each row's config plus its overrides loads, and its methods build on a teacher / student."""
    monkeypatch.chdir(REPO)
    row = ROWS[name]
    if row.command == "train":
        load_config(row.config, row.sets)
        return
    config = load_config(row.config, row.sets, schema=DistillConfig)
    assert config.methods, name
    teacher, student = (build_detector("rt_detr", p, 10) for p in ("small", "tiny"))
    if config.model.family in CNN_FAMILIES:  # the heterogeneous rows: a torchvision CNN student
        student = build_cnn_detector(config.model.family, config.model.preset, 10)
    methods, _ = build_methods(config.methods, student, teacher)
    assert set(methods) == set(config.methods)


def test_suites_name_known_rows_and_ablations_change_one_thing(monkeypatch):
    monkeypatch.chdir(REPO)
    assert all(r in ROWS for rows in SUITES.values() for r in rows)
    base = load_config(ROWS["active_sampling"].config, schema=DistillConfig).methods["active_sampling"]
    swept = load_config(ROWS["active_sampling_t8"].config, ROWS["active_sampling_t8"].sets,
                        schema=DistillConfig).methods["active_sampling"]
    assert {k for k in base if base[k] != swept[k]} == {"temperature"}
    assert base["temperature"] == 4.0 and swept["temperature"] == 8.0


def test_run_suite_rejects_rows_outside_the_suite(tmp_path):
    with pytest.raises(ValueError, match="not rows of suite 'qskd'"):
        run_suite("qskd", only=["kd_detr"], out=tmp_path / "x.json")


def test_method_specs_are_the_suite_configs(monkeypatch):
    monkeypatch.chdir(REPO)
    specs = method_specs()
    assert set(specs["qskd"]) == {"agfd", "lapd"} and set(specs["agfd"]) == {"agfd"}
    assert specs["kd_detr"]["kd_detr"]["points"] == "both"
    bf16 = specs["active_sampling_bf16"]["active_sampling"]
    assert bf16 == {**specs["active_sampling"]["active_sampling"], "precision": "bfloat16"}
    with pytest.raises(ValueError, match="unknown methods"):
        method_specs(["nope"])


def test_overhead_rows_and_breakdown(tmp_path, monkeypatch):
    """The CLI times student, floor and methods per query count and writes json / md / png."""
    monkeypatch.chdir(REPO)
    torch.set_num_threads(1)
    out = tmp_path / "overhead.json"
    code = main(["bench", "overhead", "--queries", "6", "12", "--methods", "lapd", "global_alignment",
                 "--teacher", "rt_detr:tiny", "--student", "rt_detr:tiny", "--batch-size", "1",
                 "--image-size", "64", "--steps", "1", "--warmup", "0", "--breakdown", "1",
                 "--data", str(tmp_path / "none"), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    rows = {(r["method"], r["queries"]): r for r in result["rows"]}
    assert set(rows) == {(m, q) for m in (STUDENT, FLOOR, "lapd", "global_alignment") for q in (6, 12)}
    for q in (6, 12):
        assert rows[(FLOOR, q)]["overhead_vs_floor"] == 0.0
        assert rows[("lapd", q)]["sec_per_step"] > 0
    for key in ("hardware", "threads", "torch", "git_sha", "command"):
        assert result[key] not in (None, "")
    assert "--queries 6 12" in result["command"] and result["data"] == "synthetic"
    (slowest,) = result["breakdown_ms"]["q=12"].values()
    assert {"teacher", "student", "backward", "optimizer", "total"} <= set(slowest)
    assert out.with_suffix(".md").read_text().startswith("| method |")
    assert out.with_suffix(".png").stat().st_size > 1000


def test_overhead_floor_runs_the_teacher_and_methods_train_their_parts():
    pair = Pair("rt_detr", "tiny", "rt_detr", "tiny")
    rows, breakdown = run_overhead(pair, queries=[6], methods=["active_sampling"], batch_size=1,
                                   image_size=64, steps=1, warmup=0, breakdown=1, log=lambda _: None)
    parts = breakdown["q=6"]["active_sampling"]
    assert parts["teacher"] > 0 and parts["method/active_sampling"] > 0
    assert [r["method"] for r in rows] == [STUDENT, FLOOR, "active_sampling"]


def test_accuracy_suite_end_to_end(tmp_path, monkeypatch):
    """A tiny preset: data made, teacher / no-KD / one distilled row trained by real subprocesses,
    evaluated, rows with gap_closed and commands, markdown and plot written; a rerun reuses runs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    preset = Preset("tiny", "t", Path("data/t"), ("--train-images", "8", "--val-images", "4", "--image-size", "64"),
                    sets=TINY)
    out = tmp_path / "results" / "qskd.json"
    rows = run_suite("qskd", preset, only=["lapd_only"], out=out)
    assert [r["method"] for r in rows] == ["teacher", "no_kd", "lapd_only"]
    teacher, student, lapd = rows
    assert teacher["gap_closed"] in (1.0, None) and lapd["teacher_ap"] == teacher["ap"]
    assert lapd["student_ap"] == student["ap"] and lapd["methods"] == {"lapd": {"weight": 1.0}}
    assert lapd["command"][0].startswith("detrkd distill --config configs/digits_qskd.yaml")
    assert lapd["command"][0].endswith("--no-progress")  # the command that ran, from provenance.jsonl
    assert teacher["command"][0].startswith("detrkd data digits")
    assert Path(lapd["run_dir"]) == Path("runs/t_lapd_only") and lapd["eval_curve"]
    assert json.loads(out.read_text()) == rows
    assert json.loads(out.with_name("qskd_meta.json").read_text())["preset"] == "tiny"
    assert "| lapd_only |" in markdown(rows) and out.with_suffix(".png").exists()
    raw = tmp_path / "results" / "qskd"
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{r}_{f}" for r in ("teacher", "no_kd", "lapd_only")
                                                       for f in ("config.yaml", "eval_val.json", "metrics.jsonl",
                                                                 "provenance.jsonl"))
    assert lapd["trained_at_git"] == [git_sha()] and git_sha() in markdown(rows)
    mtime = (tmp_path / "runs/t_lapd_only/last.pt").stat().st_mtime
    assert run_suite("qskd", preset, only=[], out=out) == rows  # finished runs are reused
    assert (tmp_path / "runs/t_lapd_only/last.pt").stat().st_mtime == mtime
    import shutil

    shutil.rmtree(tmp_path / "runs")  # a fresh machine: only the committed results are left
    assert run_suite("qskd", preset, only=[], out=out) == rows  # rebuilt from the raw outputs, nothing trained
    assert not list((tmp_path / "runs").rglob("*.pt"))
    assert json.loads((tmp_path / "runs/t_lapd_only/restored.json").read_text())["from"] == str(raw)
    with pytest.raises(ValueError, match="needs the teacher runs/t_teacher/last.pt, which is not here"):
        run_suite("qskd", preset, only=["agfd_only"], out=out)
    assert not (tmp_path / "runs/t_agfd_only").exists()


def exported_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """In ``tmp_path`` (the working directory from now on): tiny digits data in ``data/t``, a
    2-step teacher run ``made`` and its ``detrkd export --with-run-files`` in ``name``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    assert main(["data", "digits", "--out", "data/t", "--train-images", "8", "--val-images", "4",
                 "--image-size", "64"]) == 0
    sets = [x for kv in TINY for x in ("--set", kv)]
    assert main(["train", "--config", "configs/digits_teacher.yaml", *sets, "--set", "data.root=data/t",
                 "--set", "optim.max_steps=2", "--output-dir", "made", "--no-progress"]) == 0
    assert main(["export", "--checkpoint", "made", "--out", name, "--with-run-files"]) == 0


def test_a_preset_with_a_shipped_teacher_evaluates_it_and_distils_from_it(tmp_path, monkeypatch):
    """Preset.teacher: no teacher is trained; the shipped directory (a detrkd export plus the run
    files it was trained with) is evaluated and is the distilled rows' teacher."""
    exported_teacher(tmp_path, monkeypatch, "shipped")
    preset = Preset("tiny", "t", Path("data/t"), sets=TINY, teacher=tmp_path / "shipped", results="tiny")
    rows = run_suite("qskd", preset, only=["lapd_only"], results_dir=tmp_path / "results")
    teacher, _, lapd = rows
    assert not (tmp_path / "runs" / "t_teacher" / "last.pt").exists()  # evaluated, not trained
    assert any(c.startswith("detrkd export --checkpoint made") for c in teacher["command"])
    from detrkd.provenance import read_commands

    made = read_commands(tmp_path / "made")  # (in-process here, so they show pytest's argv)
    assert made and all(c in teacher["command"] for c in made)
    assert "teacher=shipped" in lapd["command"][0]
    assert (tmp_path / "results" / "tiny" / "qskd.json").exists()  # the preset's own result directory
    meta = json.loads((tmp_path / "results" / "tiny" / "qskd_meta.json").read_text())
    assert meta["command"].endswith("--seeds 0 --only lapd_only")  # the command that made the table


def test_a_given_teacher_replaces_the_teacher_row_and_rows_never_mix_teachers(tmp_path, monkeypatch):
    """--teacher DIR: an exported teacher is evaluated in a directory of its own (never the trained
    teacher row's) and distilled from; a row distilled from one teacher is refused under another."""
    import shutil

    exported_teacher(tmp_path, monkeypatch, "given")
    preset = Preset("tiny", "t", Path("data/t"), sets=TINY, results="tiny")
    rows = run_suite("qskd", preset, only=["lapd_only"], results_dir=tmp_path / "results", teacher=Path("given"))
    teacher, _, lapd = rows
    assert teacher["run_dir"] == str(Path("runs/t_teacher_given")) and not Path("runs/t_teacher").exists()
    assert "teacher=given" in lapd["command"][0]
    meta = json.loads((tmp_path / "results" / "tiny" / "qskd_meta.json").read_text())
    assert "--teacher given" in meta["command"]
    shutil.copytree("given", "other")
    again = run_suite("qskd", preset, only=[], results_dir=tmp_path / "results", teacher=Path("other"))
    assert again[2]["teacher"] == "given" and again[0]["run_dir"] == str(Path("runs/t_teacher_other"))
    from detrkd.bench.accuracy import teachers_note

    assert teachers_note(again) == ""  # one distilled row, one teacher
    two = teachers_note([*again, {**again[2], "method": "agfd_only", "teacher": "other"}])
    assert two == " Distilled from two or more teachers: `given` (lapd_only); `other` (agfd_only)."
    Path("runs/t_lapd_only/eval_val.json").unlink()  # as if interrupted: resuming would mix teachers
    mtime = Path("runs/t_lapd_only/last.pt").stat().st_mtime
    with pytest.raises(ValueError, match="runs/t_lapd_only was distilled from teacher given, this suite's is other"):
        run_suite("qskd", preset, only=["lapd_only"], results_dir=tmp_path / "results", teacher=Path("other"))
    assert Path("runs/t_lapd_only/last.pt").stat().st_mtime == mtime
    Path("other/detrkd_export.json").unlink()
    shutil.rmtree("data")
    with pytest.raises(ValueError, match="teacher other: no detrkd_export.json"):
        run_suite("qskd", preset, only=[], results_dir=tmp_path / "results", teacher=Path("other"))
    assert not Path("data").exists()  # refused before anything is made


def test_restore_run_takes_only_a_finished_run_of_this_directory_and_torch(tmp_path, monkeypatch):
    """runs.restore_run: a run directory is rebuilt from raw outputs only when their provenance
    says they were trained in that directory on this torch and their metrics reach the last epoch;
    a directory that holds anything is never touched."""
    from detrkd.bench.runs import ensure_trained, restore_run

    def raw(name: str, out_dir: str, torch_version: str = "2.14.1", epochs_done: int = 2) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "r_config.yaml").write_text("optim: {epochs: 2}\n")
        (d / "r_metrics.jsonl").write_text("".join(json.dumps({"type": "eval", "epoch": e, "ap": 0.1}) + "\n"
                                                   for e in range(1, epochs_done + 1)))
        (d / "r_eval_val.json").write_text('{"ap": 0.1}')
        (d / "r_provenance.jsonl").write_text(json.dumps(
            {"torch": torch_version, "argv": ["detrkd", "train", "--set", f"output_dir={out_dir}"]}) + "\n")
        return d

    run_dir = Path("runs") / "r"
    monkeypatch.chdir(tmp_path)
    candidates = [raw("other_dir", "runs/q"), raw("old_torch", "runs/r", "2.13.0"),
                  raw("unfinished", "runs/r", epochs_done=1)]
    assert restore_run(run_dir, candidates, "r", "2.14.1") is None and not run_dir.exists()
    good = raw("good", "runs/r")
    assert restore_run(run_dir, [*candidates, good], "r", "2.14.1") == good
    assert (run_dir / "eval_val.json").read_text() == '{"ap": 0.1}' and (run_dir / "restored.json").exists()
    assert ensure_trained("train", REPO / "configs" / "digits_student.yaml", run_dir, []).startswith("detrkd train")
    assert not (run_dir / "last.pt").exists()  # finished: reported, not trained again
    assert restore_run(run_dir, [good], "r", "2.14.1") is None  # it holds a run now


def test_a_row_another_process_trains_is_busy_and_waited_for(tmp_path):
    """Two bench commands may share rows: a row whose directory another live process holds is
    RowBusy (nothing started, nothing written), and wait_until_free returns once that process ends."""
    import threading

    from detrkd.bench.runs import RowBusy, ensure_trained, is_busy, wait_until_free
    from test_run_state import holder

    run_dir = tmp_path / "row"
    assert not is_busy(run_dir) and not run_dir.exists()
    proc = holder(run_dir)
    try:
        assert is_busy(run_dir)
        with pytest.raises(RowBusy):
            ensure_trained("train", REPO / "configs" / "digits_student.yaml", run_dir, [])
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
        threading.Timer(0.5, proc.kill).start()
        wait_until_free(run_dir, poll_seconds=0.1)
        assert not is_busy(run_dir)
    finally:
        proc.kill()
        proc.wait()


def test_only_with_no_rows_trains_none_of_the_suites_rows():
    from detrkd.cli import build_parser

    args = build_parser().parse_args(["bench", "accuracy", "--suite", "all", "--setting", "paper", "--only"])
    assert args.only == [] and args.setting == "paper"


def test_the_shipped_teacher_detects_digits_and_says_how_it_was_made(tmp_path, capsys):
    """The quick preset's teacher (make distill): a detrkd export (fp16) of a run trained by a
    committed config, with that run's files; on digits it has never seen (another seed) it is a
    real detector (0.695 AP on the val split)."""
    import yaml
    from safetensors import safe_open

    from detrkd.bench.accuracy import PRESETS, SHIPPED_TEACHER
    from detrkd.engine import with_predated
    from detrkd.provenance import RUN_FILES

    assert PRESETS["quick"].teacher == SHIPPED_TEACHER
    assert all((SHIPPED_TEACHER / name).is_file() for name in RUN_FILES)
    info = json.loads((SHIPPED_TEACHER / "detrkd_export.json").read_text())
    assert info["command"].startswith("detrkd export --checkpoint runs/digits_teacher/last.pt")
    trained = [r["argv"] for r in info["provenance"]]
    assert trained and all("configs/digits_teacher.yaml" in argv for argv in trained)
    config = with_predated(yaml.safe_load((SHIPPED_TEACHER / "config.yaml").read_text()))  # (model.pixels)
    assert config["model"] == {**load_config(REPO / "configs/digits_teacher.yaml").model.__dict__, **config["model"]}
    with safe_open(SHIPPED_TEACHER / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16", "I64"}  # I64: BN counters
    data, out = tmp_path / "unseen", tmp_path / "eval.json"
    assert main(["data", "digits", "--out", str(data), "--train-images", "1", "--val-images", "24", "--seed", "7"]) == 0
    assert main(["eval", "--checkpoint", str(SHIPPED_TEACHER), "--data", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads(out.read_text())["ap"] > 0.5
