"""``detrkd export``: a run -> a from_pretrained directory transformers loads alone, with provenance."""

from __future__ import annotations

import json

import pytest
import torch

from detrkd.cli import main
from detrkd.models import load_detector
from test_interruptions import digits, write_config  # noqa: F401 (fixture)
from test_run_state import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
    tmp = tmp_path_factory.mktemp("export")
    config = write_config(tmp, digits, "run")
    assert train("--config", str(config), "--set", "optim.max_steps=2") == 0
    return tmp / "run"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_export_writes_a_directory_transformers_and_detrkd_load(run, tmp_path, capsys, dtype):
    from transformers import AutoModelForObjectDetection

    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--dtype", dtype]) == 0
    assert "exported" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "detrkd_export.json"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "detrkd_export.json").read_text())
    assert info["source"].endswith("last.pt") and info["global_step"] == 2 and info["provenance"]
    assert info["config"]["model"]["family"] == "rt_detr"
    hf = AutoModelForObjectDetection.from_pretrained(out).eval()
    ours = load_detector(out).eval()
    reference = load_detector(run / "last.pt").eval()
    assert next(ours.parameters()).dtype == torch.float32  # loaded as float32 whatever was saved
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(x).predictions.logits[-1]
        got = ours(x).predictions.logits[-1]
        alone = hf(pixel_values=x.to(next(hf.parameters()).dtype)).logits.float()
    tol = 1e-5 if dtype == "float32" else 5e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    torch.testing.assert_close(alone, want, atol=tol, rtol=0)


def test_export_refuses_a_non_empty_directory_and_a_missing_run(run, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_export_with_run_files_ships_what_the_run_was_trained_with(run, tmp_path):
    """--with-run-files: the run's config.yaml / metrics.jsonl / provenance.jsonl beside the weights
    (what a shipped teacher carries); the directory is readable by others like any made by hand."""
    import os
    import stat

    out = tmp_path / "shipped"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--with-run-files"]) == 0
    for name in ("config.yaml", "metrics.jsonl", "provenance.jsonl"):
        assert (out / name).read_bytes() == (run / name).read_bytes()
    info = json.loads((out / "detrkd_export.json").read_text())
    assert info["command"].endswith("--with-run-files")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~umask}

@pytest.mark.parametrize("family", ["detr", "conditional_detr", "dab_detr", "deformable_detr", "rt_detr",
                                    "rt_detr_v2", "d_fine", "deimv2", "lw_detr", "rf_detr"])
def test_a_saved_detector_loads_in_transformers_without_missing_or_unexpected_keys(tmp_path, family):
    """DETR-style backbones train a thawed BatchNorm (its num_batches_tracked is not in HF's frozen
    one): save_detector leaves those out, so transformers reports nothing."""
    from transformers import AutoModelForObjectDetection

    from detrkd.models import build_detector, save_detector

    save_detector(build_detector(family, "tiny", 5), tmp_path / family)
    _, info = AutoModelForObjectDetection.from_pretrained(tmp_path / family, output_loading_info=True)
    assert {k: list(v) for k, v in info.items() if v} == {}


@pytest.mark.parametrize("family,preset", [("rt_detr", "tiny"), ("detr", "tiny"), ("deimv2", "tiny"), ("lw_detr", "tiny"),
                                           ("rf_detr", "tiny")])
def test_an_exported_student_works_in_a_transformers_pipeline_as_in_detrkd_predict(tmp_path, digits, capsys,
                                                                                  family, preset):
    """The export's image processor feeds the model what detrkd fed it: the pipeline's top
    detections are detrkd predict's (same labels, boxes within 1.5 px, scores within 0.01)."""
    from PIL import Image
    from transformers import pipeline

    from detrkd.inference import class_names, predict_image

    config = write_config(tmp_path, digits, "run")
    assert train("--config", str(config), "--set", f"model.family={family}", "--set", "optim.max_steps=4",
                 "--set", "data.image_size=96") == 0
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    image = Image.open(sorted((digits / "val").iterdir())[0]).convert("RGB")
    model = load_detector(tmp_path / "run" / "last.pt").eval()
    ours, names = predict_image(model, image, 96, "cpu", 0.0)[:5], class_names(model)
    detector = pipeline("object-detection", model=str(out), device="cpu")
    theirs = detector(image, threshold=0.0)
    assert len(theirs) >= 5
    for a, b in zip(ours, sorted(theirs, key=lambda d: -d["score"])[:5]):
        assert names(a["label"]) == b["label"] and abs(a["score"] - b["score"]) < 0.01
        box = [b["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")]
        assert max(abs(x - y) for x, y in zip(a["box"], box)) < 1.5
