"""The transformers image processor that reproduces detrkd's own evaluation preprocessing
(``detrkd.data.transforms.make_transforms("val", size)``): the processor ``detrkd export`` writes,
so that ``pipeline("object-detection", model=exported_dir)`` feeds the model what detrkd fed it.

detrkd resizes (antialiased bilinear) and normalises with ImageNet's mean / std for every family:
families that ignore the pixel mask (RT-DETR v1 / v2, D-FINE) to a square ``size`` x ``size``,
the others to a shorter side of ``size`` (longer side at most ``size * 1333 / 800``), padded.
(transformers' own RT-DETR / D-FINE processors do not normalise: a checkpoint trained elsewhere
expects that, one trained by detrkd expects this.)
"""

from __future__ import annotations

import math
from typing import Any

from detrkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# the processor class of each family's DETR-style (padded) preprocessing; the square families use RT-DETR's
PADDED_PROCESSORS = {"detr": "DetrImageProcessor", "conditional_detr": "ConditionalDetrImageProcessor",
                     "dab_detr": "ConditionalDetrImageProcessor", "deformable_detr": "DeformableDetrImageProcessor"}
MAX_SIZE_RATIO = 1333 / 800


def image_processor(family: str, image_size: int) -> Any:
    """The image processor of detrkd's val preprocessing for ``family`` at ``image_size``."""
    import transformers

    from detrkd.models import adapter_class

    common = dict(do_resize=True, do_rescale=True, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                  image_std=list(IMAGENET_STD))
    if not adapter_class(family).uses_pixel_mask:
        return transformers.RTDetrImageProcessor(size={"height": image_size, "width": image_size}, do_pad=False,
                                                 **common)
    cls = getattr(transformers, PADDED_PROCESSORS[family])
    longest = int(math.ceil(image_size * MAX_SIZE_RATIO))
    return cls(size={"shortest_edge": image_size, "longest_edge": longest}, do_pad=True, **common)
