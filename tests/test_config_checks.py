"""Every config value is checked before a run starts: one line, exit 2, no traceback, nothing
written (model overrides, query counts, devices)."""

from __future__ import annotations

import pytest

from detrkd.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from detrkd.data.digits import make_digits_dataset

    root = tmp_path_factory.mktemp("digits")
    make_digits_dataset(root, train_images=4, val_images=2, image_size=64)
    return root


@pytest.mark.parametrize("setting,message", [
    ("model.overrides={not_a_key: 1}", "'not_a_key' is not a RTDetrConfig key"),
    ("model.overrides={d_modell: 12}", "did you mean 'd_model'?"),
    ("model.overrides={d_model: abc}", "expected int, got str"),
    ("model.overrides={num_queries: 0}", "num_queries must be >= 1"),
    ("model.num_queries=0", "model.num_queries must be >= 1"),
    ("model.num_queries=-3", "model.num_queries must be >= 1"),
    ("model.backbone=huge", "unknown preset 'huge'"),
    ("device=foo", "'foo' is not a device name"),
    ("device=cuda", "no usable CUDA device"),
    ("device=cuda:7", "cuda"),
])
def test_bad_values_are_refused_before_anything_runs(tmp_path, data, capsys, setting, message):
    import torch

    if setting.startswith("device=cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = tmp_path / "run"
    code = main(["train", "--family", "rt_detr", "--preset", "tiny", "--data", str(data), "--output-dir", str(run),
                 "--no-progress", "--set", "data.image_size=64", "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not run.exists()


def test_num_queries_given_twice_is_refused(tmp_path, data, capsys):
    code = main(["train", "--family", "rt_detr", "--preset", "tiny", "--data", str(data), "--no-progress",
                 "--output-dir", str(tmp_path / "run"), "--set", "model.num_queries=10",
                 "--set", "model.overrides={num_queries: 12}"])
    assert code == 2 and "num_queries is given twice" in capsys.readouterr().err


def test_overrides_with_a_pretrained_model_are_refused(tmp_path, data, capsys):
    from detrkd.models import build_detector, save_detector

    save_detector(build_detector("rt_detr", "tiny", 10), tmp_path / "pre")
    code = main(["train", "--family", "rt_detr", "--preset", "tiny", "--data", str(data), "--no-progress",
                 "--output-dir", str(tmp_path / "run"), "--set", f"model.pretrained={tmp_path / 'pre'}",
                 "--set", "model.overrides={dropout: 0.1}"])
    assert code == 2 and "would be ignored with model.pretrained" in capsys.readouterr().err
