"""Each model is fed its own preprocessing: a from_pretrained directory's image processor, a
checkpoint's recorded pixels, a preset's family default; in distillation the teacher and the
student each get theirs of the same images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detrkd.config import ConfigError, DistillConfig, load_config
from detrkd.data.collate import collate
from detrkd.data.transforms import IMAGENET_STD, make_transforms, pixel_transforms
from detrkd.models import build_detector, load_detector, save_detector
from detrkd.models.processors import PROCESSORS, family_pixels, imagenet_pixels

FAMILIES = sorted(PROCESSORS)
SQUARE = ("rt_detr", "rt_detr_v2", "d_fine", "deimv2")  # transformers: a fixed square size, no padding
RESIZED_WITHOUT_ANTIALIAS = ("rf_detr",)
LEVEL = 1 / 255 / min(IMAGENET_STD) + 1e-6  # one uint8 intensity level, after normalisation


def _target(h: int, w: int) -> dict:
    hw = torch.tensor([h, w])
    return {"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "class_labels": torch.tensor([1]),
            "image_id": 0, "orig_size": hw, "size": hw.clone()}


def _images(sizes: tuple[tuple[int, int], ...] = ((90, 132), (120, 72))) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    smooth = [np.kron(rng.integers(0, 255, (-(-h // 6), -(-w // 6), 3)), np.ones((6, 6, 1)))[:h, :w].astype(np.uint8)
              for h, w in sizes]
    return [Image.fromarray(a) for a in smooth]


def _their_processor(family: str):
    import transformers

    cls = getattr(transformers, PROCESSORS[family])
    if family in SQUARE:
        return cls(size={"height": 64, "width": 64})
    return cls(size={"shortest_edge": 64, "longest_edge": 107})


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_directory_is_fed_what_its_own_image_processor_makes(family, tmp_path):
    """transformers' default processor of each family (RT-DETR / D-FINE: rescale only; the DETR
    family: ImageNet normalisation, shorter side, padding), saved beside a model: detrkd's pixels
    and pixel mask of a two-image batch are the processor's (within one intensity level, the
    resize implementations round differently)."""
    processor = _their_processor(family)
    save_detector(build_detector(family, "tiny", 3), tmp_path)
    processor.save_pretrained(tmp_path)
    model = load_detector(tmp_path)
    assert model.pixels.mean is None if not processor.do_normalize else model.pixels.mean is not None
    transforms = pixel_transforms("val", model.pixels)
    # RF-DETR's processor resizes without antialiasing (its _preprocess passes antialias=False),
    # detrkd with it for every family: compared on images already at the processor's size
    images = _images(((64, 100), (104, 64))) if family in RESIZED_WITHOUT_ANTIALIAS else _images()
    ours = collate([transforms(img, _target(img.height, img.width)) for img in images], pad_to_multiple=None)
    theirs = processor(images=images, return_tensors="pt")
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    diff = (ours["pixel_values"] - theirs["pixel_values"]).abs()
    assert diff.max() <= LEVEL and diff.mean() < LEVEL / 4
    if "pixel_mask" in theirs:
        assert torch.equal(ours["pixel_mask"], theirs["pixel_mask"].long())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_preset_gets_its_familys_transformers_default(family):
    import transformers

    default = getattr(transformers, PROCESSORS[family])()
    pixels = family_pixels(family, 128)
    assert (pixels.mean is not None) == bool(default.do_normalize)
    assert pixels.rescale == pytest.approx(default.rescale_factor)
    assert pixels.size == 128 and pixels.square == (family in SQUARE)


def test_imagenet_pixels_are_detrkds_old_pipeline_bit_for_bit():
    """model.pixels: imagenet (the digits benchmark configs) changes nothing against the old code."""
    image = _images()[0]
    for square in (True, False):
        for split in ("train", "val"):
            old, new = make_transforms(split, 64, hflip=True, square=square), pixel_transforms(
                split, imagenet_pixels("rt_detr" if square else "detr", 64), hflip=True)
            for seed in range(3):
                torch.manual_seed(seed)
                a, ta = old(image, _target(90, 132))
                torch.manual_seed(seed)
                b, tb = new(image, _target(90, 132))
                assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])


def test_a_checkpoint_records_its_pixels_and_an_older_one_gets_imagenet(tmp_path):
    from detrkd.checkpoint import model_entries
    from detrkd.models.processors import checkpoint_pixels

    model = build_detector("rt_detr", "tiny", 3)
    model.pixels = family_pixels("rt_detr", 96)
    state = model_entries(model)
    assert checkpoint_pixels(state) == model.pixels
    older = {**state, "pixels": None, "config": {"data": {"image_size": 80}}}
    assert checkpoint_pixels(older) == imagenet_pixels("rt_detr", 80)


def test_an_unsupported_processor_rule_is_a_clear_error(tmp_path):
    from detrkd.models.processors import processor_pixels

    with pytest.raises(ValueError, match="p.json: a fixed 64x96 size is not supported"):
        processor_pixels({"size": {"height": 64, "width": 96}}, "p.json")
    with pytest.raises(ValueError, match="do_resize is false"):
        processor_pixels({"do_resize": False}, "p.json")


def _distill_setup(tmp_path: Path, teacher_processor, methods: dict, student_pixels: str = "imagenet"):
    from detrkd.data.digits import make_digits_dataset
    from detrkd.recipe import build_distill_trainer

    make_digits_dataset(tmp_path / "data", train_images=4, val_images=2, image_size=64)
    torch.manual_seed(0)
    save_detector(build_detector("rt_detr", "tiny", 10), tmp_path / "teacher")
    teacher_processor.save_pretrained(tmp_path / "teacher")
    raw = {"model": {"family": "rt_detr", "preset": "tiny", "pixels": student_pixels},
           "data": {"root": str(tmp_path / "data"), "image_size": 64, "batch_size": 2, "hflip": False},
           "optim": {"epochs": 1, "warmup_steps": 1}, "teacher": str(tmp_path / "teacher"),
           "methods": methods, "output_dir": str(tmp_path / "run"), "threads": 1}
    return build_distill_trainer(load_config(raw, schema=DistillConfig), progress=False)


def test_in_distillation_the_teacher_and_the_student_each_get_their_own_pixels(tmp_path):
    """A teacher whose processor rescales only (RT-DETR's) and an ImageNet student: the teacher
    sees its own preprocessing of the same images (its pixels = its transform of the file), the
    student its own, and the loss runs."""
    import transformers

    trainer = _distill_setup(tmp_path, transformers.RTDetrImageProcessor(size={"height": 64, "width": 64}),
                             {"lapd": {}})
    dataset = trainer.dataset
    batch = collate([dataset[0], dataset[1]])
    image = dataset.load_image(0)
    mine, _ = pixel_transforms("val", imagenet_pixels("rt_detr", 64))(image, dataset.raw_target(0))
    theirs, _ = pixel_transforms("val", family_pixels("rt_detr", 64))(image, dataset.raw_target(0))
    assert torch.equal(batch["pixel_values"][0], mine)
    assert torch.equal(batch["teacher_pixel_values"][0], theirs)
    assert 0.0 <= float(theirs.min()) and float(theirs.max()) <= 1.0 and float(mine.min()) < 0.0
    assert "views" not in batch["labels"][0]
    loss, terms = trainer.compute_loss(batch)
    assert torch.isfinite(loss) and any(k.startswith("lapd/") for k in terms)


def test_the_same_pixels_give_no_second_view(tmp_path):
    import transformers

    processor = transformers.RTDetrImageProcessor(size={"height": 64, "width": 64})
    trainer = _distill_setup(tmp_path, processor, {"lapd": {}}, student_pixels="auto")
    assert "teacher_pixel_values" not in collate([trainer.dataset[0]])


def test_a_memory_method_with_two_input_grids_is_refused_up_front(tmp_path):
    import transformers

    processor = transformers.RTDetrImageProcessor(size={"height": 96, "width": 96})
    with pytest.raises(ConfigError, match=r"methods \['agfd'\] compare .* fed 96x96 px .* student 64x64 px"):
        _distill_setup(tmp_path, processor, {"agfd": {}, "lapd": {}})


def test_an_older_run_resumes_with_imagenet_and_refuses_another_pixels(tmp_path, capsys):
    """A run whose stored config predates model.pixels ran with ImageNet pixels: resuming it with
    model.pixels imagenet continues, with auto (another input recipe) is refused, nothing written."""
    from detrkd.checkpoint import load_checkpoint, save_checkpoint
    from detrkd.cli import main
    from detrkd.data.digits import make_digits_dataset

    make_digits_dataset(tmp_path / "data", train_images=4, val_images=2, image_size=64)
    config = {"model": {"family": "rt_detr", "preset": "tiny", "num_queries": 10, "pixels": "imagenet"},
              "data": {"root": str(tmp_path / "data"), "image_size": 64, "batch_size": 2},
              "optim": {"epochs": 2, "warmup_steps": 1}, "output_dir": str(tmp_path / "run"), "threads": 1}
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    args = ["train", "--config", str(tmp_path / "c.yaml"), "--no-progress"]
    assert main(args + ["--set", "optim.max_steps=1"]) == 0
    last = tmp_path / "run" / "last.pt"
    state = load_checkpoint(last)
    del state["config"]["model"]["pixels"]  # as written before the key existed
    state["pixels"] = None
    save_checkpoint(last, state)
    before = last.read_bytes()
    assert main(args + ["--resume", "--set", "model.pixels=auto"]) == 2
    assert "model.pixels ('imagenet' -> 'auto')" in capsys.readouterr().err
    assert last.read_bytes() == before
    assert main(args + ["--resume", "--set", "optim.max_steps=2"]) == 0


def test_a_student_from_a_directory_trains_on_its_processors_pixels(tmp_path):
    """model.pretrained = a directory whose processor says 96 x 96, [0, 1]: the training set makes
    exactly that (not data.image_size 64 with ImageNet), and the saved checkpoint records it."""
    import transformers

    from detrkd.data.digits import make_digits_dataset
    from detrkd.recipe import build_trainer
    from detrkd.models.processors import checkpoint_pixels

    make_digits_dataset(tmp_path / "data", train_images=4, val_images=2, image_size=64)
    save_detector(build_detector("rt_detr", "tiny", 10), tmp_path / "start")
    transformers.RTDetrImageProcessor(size={"height": 96, "width": 96}).save_pretrained(tmp_path / "start")
    raw = {"model": {"family": "rt_detr", "pretrained": str(tmp_path / "start")},
           "data": {"root": str(tmp_path / "data"), "image_size": 64, "batch_size": 2, "hflip": False},
           "optim": {"epochs": 1, "warmup_steps": 1, "max_steps": 1}, "output_dir": str(tmp_path / "run"),
           "threads": 1}
    trainer = build_trainer(load_config(raw), progress=False)
    pixels, _ = trainer.dataset[0]
    assert pixels.shape == (3, 96, 96) and 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    trainer.fit()
    from detrkd.checkpoint import load_checkpoint

    assert checkpoint_pixels(load_checkpoint(tmp_path / "run" / "last.pt")) == family_pixels("rt_detr", 96)
