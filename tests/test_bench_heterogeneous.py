"""``detrkd bench accuracy --suite heterogeneous --setting heterogeneous``: the CNN student rows (no-KD
and distilled) share the committed teacher's run, the suite and the setting go together, and a tiny
run of the suite writes benchmarks/results/heterogeneous.json's rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detrkd.bench.accuracy import ROWS, PRESETS, SETTINGS, SUITES, Preset, Setting, Suite, check_setting, run_suite
from detrkd.config import DistillConfig, TrainConfig, load_config
from detrkd.distill.methods import build_methods
from detrkd.models import build_detector

REPO = Path(__file__).resolve().parents[1]


def test_the_heterogeneous_setting_shares_the_teacher_and_switches_the_student():
    suite = Suite("heterogeneous", PRESETS["cpu"], SUITES["heterogeneous"], Path("x.json"), SETTINGS["heterogeneous"])
    assert suite.run_dir("teacher") == Path("runs/digits_teacher")  # the compressed setting's teacher run
    assert suite.run_dir("no_kd") == Path("runs/hetero_digits_student")
    assert suite.run_dir("kd_detr_hetero") == Path("runs/hetero_digits_kd_detr_hetero")
    assert suite.teacher_checkpoint() == Path("runs/digits_teacher/last.pt")
    sets = suite.sets("no_kd")
    assert "model.family=faster_rcnn" in sets and "model.preset=small" in sets
    paper = Suite("all", PRESETS["cpu"], SUITES["all"], Path("y.json"), SETTINGS["paper"])
    assert paper.run_dir("teacher") == Path("runs/paper_digits_teacher")  # a setting with its own teacher


def test_the_rows_distil_into_the_cnn_student_from_the_digits_teacher(monkeypatch):
    from detrkd.bench.accuracy import ROWS

    monkeypatch.chdir(REPO)
    kd = load_config(ROWS["kd_detr_hetero"].config, schema=DistillConfig)
    student = load_config(REPO / "configs" / "digits_cnn_student.yaml")
    assert (kd.model.family, kd.model.preset) == (student.model.family, student.model.preset) == ("faster_rcnn", "small")
    assert kd.optim == student.optim and kd.data == student.data and kd.seed == student.seed
    assert kd.teacher == "runs/digits_teacher/last.pt" and kd.methods["kd_detr_hetero"]["k"] == 10
    assert kd.methods["kd_detr_hetero"]["terms"] == {"cls": 1.0, "l1": 5.0, "giou": 2.0}
    fitnet = load_config(ROWS["fpn_fitnet"].config, ROWS["fpn_fitnet"].sets, schema=DistillConfig)
    assert fitnet.methods == {"fpn_fitnet": {"weight": 50.0}}


@pytest.mark.parametrize("suite, setting, message", [
    ("heterogeneous", "compressed", "suite 'heterogeneous' runs under --setting heterogeneous only"),
    ("all", "heterogeneous", "--setting heterogeneous runs the suite(s) ['heterogeneous'] only, not 'all'"),
])
def test_the_suite_and_the_setting_go_together(suite, setting, message, tmp_path):
    with pytest.raises(ValueError, match=None) as info:
        run_suite(suite, "cpu", setting=setting, out=tmp_path / "r.json")
    assert message in str(info.value)


def test_a_tiny_heterogeneous_suite_end_to_end(tmp_path, monkeypatch):
    """Real subprocess runs: an RT-DETR tiny teacher, the Faster R-CNN tiny no-KD student and the
    kd_detr_hetero row; the rows come out with the CNN student's methods and commands."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    tiny = ("model.preset=tiny", "data.image_size=64", "data.batch_size=4", "optim.epochs=1", "optim.warmup_steps=1",
            "eval_max_images=4", "threads=1", "log_every_steps=1")
    preset = Preset("tiny", "t", Path("data/t"), ("--train-images", "8", "--val-images", "4", "--image-size", "64"),
                    sets=tiny)
    setting = Setting("heterogeneous", "hetero_", student_sets=("model.family=faster_rcnn", "model.preset=tiny"),
                      suites=("heterogeneous",))
    out = tmp_path / "results" / "heterogeneous.json"
    rows = run_suite("heterogeneous", preset, only=["kd_detr_hetero"], out=out, setting=setting)
    assert [r["method"] for r in rows] == ["teacher", "no_kd", "kd_detr_hetero"]
    teacher, no_kd, kd = rows
    assert Path(teacher["run_dir"]) == Path("runs/t_teacher") and Path(no_kd["run_dir"]) == Path("runs/hetero_t_student")
    assert kd["methods"]["kd_detr_hetero"]["k"] == 10 and kd["student_ap"] == no_kd["ap"]
    assert kd["command"][0].startswith("detrkd distill --config configs/digits_cnn_kd_detr.yaml")
    assert any("model.family=faster_rcnn" in command for command in no_kd["command"])
    assert json.loads(out.read_text()) == rows and (tmp_path / "results" / "heterogeneous" / "kd_detr_hetero_config.yaml").exists()


@pytest.mark.parametrize("name, family, prefix", [("cross_family", "rf_detr", "rf_"),
                                                  ("cross_family_deimv2", "deimv2", "deimv2_")])
def test_a_cross_family_setting_shares_the_teacher_and_makes_its_student(monkeypatch, name, family, prefix):
    """``--setting cross_family`` / ``cross_family_deimv2``: the compressed teacher's run, RF-DETR /
    DEIMv2 students of the same configs (no-KD and each row), prediction-level methods only, which
    build on that pair; both settings run the suite, no other setting does."""
    monkeypatch.chdir(REPO)
    setting = SETTINGS[name]
    suite = Suite("cross_family", PRESETS["cpu"], SUITES["cross_family"], Path("x.json"), setting)
    assert suite.run_dir("teacher") == Path("runs/digits_teacher")
    assert suite.run_dir("no_kd") == Path(f"runs/{prefix}digits_student")
    assert suite.run_dir("lapd_only") == Path(f"runs/{prefix}digits_lapd_only")
    teacher = build_detector("rt_detr", "small", 10)
    for row in ("no_kd", *SUITES["cross_family"]):
        schema = DistillConfig if ROWS[row].command == "distill" else TrainConfig
        config = load_config(ROWS[row].config, suite.sets(row), schema=schema)
        assert (config.model.family, config.model.preset) == (family, "tiny"), row
        if ROWS[row].command == "distill":
            build_methods(config.methods, build_detector(family, "tiny", 10), teacher)
    with pytest.raises(ValueError, match="runs the suite"):
        check_setting("qskd", setting)
    check_setting("cross_family", setting)
    with pytest.raises(ValueError, match="runs under --setting cross_family or cross_family_deimv2 only"):
        check_setting("cross_family", SETTINGS["compressed"])
