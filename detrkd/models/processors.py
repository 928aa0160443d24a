"""Each model's own preprocessing (``data.transforms.Pixels``), from where transformers keeps it,
and back: the image processor ``detrkd export`` writes.

Where a model's pixels come from (``engine.config_pixels``, ``load_detector``):
- a ``from_pretrained`` directory: its ``preprocessor_config.json`` (what ``save_pretrained`` of
  an image processor writes): resize rule and size, rescale, normalisation, padding;
- a detrkd checkpoint: the pixels it was trained with (recorded in it; a checkpoint written
  before they were recorded: ImageNet normalisation at its ``data.image_size``, as detrkd did then);
- a preset (random init): ``model.pixels: auto`` is the family's transformers default processor's
  rescale and normalisation (RT-DETR / D-FINE / DEIMv2: [0, 1], not normalised; the DETR family,
  LW-DETR and RF-DETR: ImageNet mean / std) at detrkd's resize of ``data.image_size``; ``imagenet`` is ImageNet normalisation for
  every family (what every detrkd run did before per-model preprocessing, and what the digits
  benchmark configs keep so that their rows stay comparable).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from detrkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Pixels, detr_max_size

log = logging.getLogger(__name__)

PROCESSOR_FILE = "preprocessor_config.json"
# the processor class of each family in transformers (RT-DETR's serves v2, D-FINE and DEIMv2 too;
# LW-DETR's is Deformable DETR's; RF-DETR has its own, DETR-style: shorter side, ImageNet, padding)
PROCESSORS = {"detr": "DetrImageProcessor", "conditional_detr": "ConditionalDetrImageProcessor",
              "dab_detr": "ConditionalDetrImageProcessor", "deformable_detr": "DeformableDetrImageProcessor",
              "rt_detr": "RTDetrImageProcessor", "rt_detr_v2": "RTDetrImageProcessor", "d_fine": "RTDetrImageProcessor",
              "deimv2": "RTDetrImageProcessor", "lw_detr": "DeformableDetrImageProcessor",
              "rf_detr": "RfDetrImageProcessor"}


def _square(family: str) -> bool:
    from detrkd.models import adapter_class
    from detrkd.models.cnn import is_cnn_family

    return not is_cnn_family(family) and not adapter_class(family).uses_pixel_mask


def imagenet_pixels(family: str, image_size: int) -> Pixels:
    """ImageNet mean / std at detrkd's resize of ``image_size`` (square for the families that ignore
    the pixel mask, else shorter side ``image_size``, longer at most ``image_size * 1333 / 800``)."""
    return Pixels(image_size, _square(family), detr_max_size(image_size))


def family_pixels(family: str, image_size: int) -> Pixels:
    """The rescale / normalisation of the family's transformers default image processor at detrkd's
    resize of ``image_size`` (a torchvision CNN family: its detection transform's, ImageNet mean / std)."""
    import transformers

    from detrkd.models.cnn import is_cnn_family

    if is_cnn_family(family):
        return imagenet_pixels(family, image_size)
    default = getattr(transformers, PROCESSORS[family])()
    normalise = bool(default.do_normalize)
    return dataclasses.replace(imagenet_pixels(family, image_size),
                               mean=tuple(default.image_mean) if normalise else None,
                               std=tuple(default.image_std) if normalise else None,
                               rescale=float(default.rescale_factor) if default.do_rescale else 1.0)


def processor_pixels(config: dict[str, Any], where: str | Path) -> Pixels:
    """A ``preprocessor_config.json``'s pixels; ``ValueError`` naming ``where`` for a rule detrkd
    cannot batch (no resize, a non-square fixed size, a size by max height / width)."""
    size = config.get("size") or {}
    if not config.get("do_resize", True):
        raise ValueError(f"{where}: do_resize is false: detrkd needs a resize rule to batch images")
    if "height" in size and "width" in size:
        if size["height"] != size["width"]:
            raise ValueError(f"{where}: a fixed {size['height']}x{size['width']} size is not supported "
                             f"(square sizes or shortest_edge / longest_edge only)")
        square, short, longest = True, int(size["height"]), None
    elif "shortest_edge" in size:
        square, short, longest = False, int(size["shortest_edge"]), size.get("longest_edge")
    else:
        raise ValueError(f"{where}: size {size} is not a rule detrkd knows (height / width or "
                         f"shortest_edge / longest_edge)")
    normalise = config.get("do_normalize", True)
    mean, std = config.get("image_mean", IMAGENET_MEAN), config.get("image_std", IMAGENET_STD)
    rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
    return Pixels(short, square, None if longest is None else int(longest),
                  tuple(float(x) for x in mean) if normalise else None,
                  tuple(float(x) for x in std) if normalise else None, rescale)


def dir_pixels(path: Path, family: str, image_size: int) -> Pixels:
    """A ``from_pretrained`` directory's pixels: its ``preprocessor_config.json``, else (a model
    saved without its processor) the family's default at ``image_size``, with a warning."""
    file = Path(path) / PROCESSOR_FILE
    if file.is_file():
        return processor_pixels(json.loads(file.read_text()), file)
    log.warning("%s has no %s: feeding it the %s default of transformers (%s) at %d px", path, PROCESSOR_FILE,
                family, PROCESSORS[family], image_size)
    return family_pixels(family, image_size)


def checkpoint_pixels(state: dict[str, Any]) -> Pixels:
    """The pixels a detrkd checkpoint's model was trained with (``state["pixels"]``; an older
    checkpoint's: ImageNet at its config's ``data.image_size``)."""
    if state.get("pixels"):
        return Pixels.from_dict(state["pixels"])
    size = int(((state.get("config") or {}).get("data") or {}).get("image_size", 256))
    return imagenet_pixels(state["family"], size)


def inference_pixels(model: Any, image_size: int | None = None) -> Pixels:
    """What ``detrkd eval`` / ``predict`` feed ``model``: its own pixels (ImageNet at 256 px for a
    model that records none), at ``image_size`` where one is asked for (``--image-size``)."""
    pixels = model.pixels or imagenet_pixels(model.family, image_size or 256)
    if image_size is None or image_size == pixels.size:
        return pixels
    return dataclasses.replace(pixels, size=image_size, max_size=detr_max_size(image_size))


def image_processor(pixels: Pixels, family: str) -> Any:
    """The family's transformers image processor that makes ``pixels`` (``detrkd export``), so that
    ``pipeline("object-detection", model=exported_dir)`` feeds the model what detrkd fed it."""
    import transformers

    normalise = dict(do_normalize=pixels.mean is not None)
    if pixels.mean is not None:
        normalise.update(image_mean=list(pixels.mean), image_std=list(pixels.std))
    common = dict(do_resize=True, do_rescale=True, rescale_factor=pixels.rescale, **normalise)
    cls = getattr(transformers, PROCESSORS[family])
    if pixels.square:
        return cls(size={"height": pixels.size, "width": pixels.size}, do_pad=False, **common)
    size = {"shortest_edge": pixels.size, **({"longest_edge": pixels.max_size} if pixels.max_size else {})}
    return cls(size=size, do_pad=True, **common)
