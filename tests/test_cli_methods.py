"""A CLI that speaks in methods: --student / --method, the methods listed in --help, ``detrkd
methods``, and a --help that starts without importing torch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from detrkd.cli import build_parser, main, train_overrides
from detrkd.config import DistillConfig, load_config
from detrkd.distill.catalog import RECIPES, SUMMARIES

REPO = Path(__file__).resolve().parents[1]


def distill_config(*argv: str) -> DistillConfig:
    args = build_parser().parse_args(["distill", "--teacher", "t.pt", "--data", "d", *argv])
    return load_config(None, train_overrides(args), schema=DistillConfig)


def test_help_starts_fast_without_torch():
    code = "import sys, time; t = time.time(); import detrkd.cli; detrkd.cli.build_parser(); " \
           "print('torch' in sys.modules, time.time() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    imported, seconds = out.split()
    assert imported == "False" and float(seconds) < 1.0
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "detrkd", "--help"], capture_output=True, check=True, cwd=REPO)
    assert time.monotonic() - start < 3.0  # interpreter start included; the parser alone is above


def test_distill_help_lists_every_method_and_recipe(capsys):
    assert main(["distill", "--help"]) == 0
    out = capsys.readouterr().out
    for name in [*SUMMARIES, "qskd", "none"]:
        assert f"\n  {name} " in out, name


def test_student_and_method_shortcuts_build_the_config():
    config = distill_config("--student", "rt_detr:tiny", "--method", "qskd", "--set", "methods.agfd.mask=all")
    assert (config.model.family, config.model.preset) == ("rt_detr", "tiny")
    assert config.methods == {"agfd": {"weight": 50.0, "mask": "all"}, "lapd": {"weight": 1.0}}
    both = distill_config("--student", "d_fine:small", "--method", "kd_detr", "--method", "fitnet")
    assert both.methods == {"kd_detr": {"weight": 1.0}, "fitnet": {"weight": 50.0}}
    assert distill_config("--student", "rt_detr:tiny", "--method", "none").methods == {}


@pytest.mark.parametrize("argv,message", [
    (["--student", "rt_detr", "--method", "qskd"], "FAMILY:PRESET"),
    (["--student", "rt_detr:tiny", "--method", "qsdk"], "not a method or recipe"),
    (["--student", "rt_detr:tiny", "--method", "qskd", "--method", "agfd"], "already named"),
    # method options are checked before the data (here: a directory that does not exist) is read
    (["--student", "rt_detr:tiny", "--method", "kd_detr", "--set", "methods.kd_detr.points=al"],
     "methods.kd_detr.points: expected one of 'general', 'specific', 'both'"),
    (["--student", "rt_detr:tiny", "--method", "lapd", "--set", "methods.lapd.terms.box=5"],
     "methods.lapd.terms: unknown term(s) ['box']; lapd's terms: cls, l1, giou"),
])
def test_bad_shortcuts_are_one_line_errors(argv, message, capsys):
    assert main(["distill", "--teacher", "t.pt", "--data", "d", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_methods_command_prints_every_option_with_its_default(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in SUMMARIES:
        assert f"{name}: " in out
    assert "  temperature: 4.0" in out and "  mask: 'gqs'" in out and "qskd (recipe)" in out
    assert set(RECIPES) - set(SUMMARIES) == {"qskd", "none"}


def test_a_distillation_from_the_shortcuts_runs(tmp_path, capsys):
    from detrkd.data.digits import make_digits_dataset
    from detrkd.models import build_detector, save_detector

    make_digits_dataset(tmp_path / "data", train_images=4, val_images=2, image_size=64)
    save_detector(build_detector("rt_detr", "tiny", 10), tmp_path / "teacher")
    code = main(["distill", "--teacher", str(tmp_path / "teacher"), "--student", "rt_detr:tiny", "--method", "qskd",
                 "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--no-progress",
                 "--set", "data.image_size=64", "--set", "optim.max_steps=1"])
    assert code == 0, capsys.readouterr().err
    saved = load_config(tmp_path / "run" / "config.yaml", schema=DistillConfig)
    assert set(saved.methods) == {"agfd", "lapd"}
