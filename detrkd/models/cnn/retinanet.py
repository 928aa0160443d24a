"""RetinaNet (FPN, P3..P7) from torchvision as a detrkd student.

Sigmoid focal classification over the C classes (no background column: labels as they are) and
torchvision's anchor box coder. Distillation points are anchors; the student's prediction at an
anchor is its own head output there: the class logits [C] and the regression decoded from the
anchor (``box_coder.decode_single``), as ``postprocess_detections`` decodes it.
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .backbone import fpn_backbone
from .base import CnnConfig, CnnDetector, CnnOutput, Points

OCTAVES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))  # torchvision's three anchor scales per level


class RetinaNetStudent(CnnDetector):
    """torchvision ``RetinaNet`` on a ResNet-style FPN (C3..C5 -> P3..P5, P6 / P7 from P5)."""

    family: ClassVar[str] = "retinanet"
    class_head = "sigmoid"
    label_offset = 0

    @classmethod
    def build(cls, config: CnnConfig) -> nn.Module:
        o = config.options
        ch = o.fpn_channels
        backbone = fpn_backbone(o.widths, o.depths, ch, (2, 3, 4), LastLevelP6P7(ch, ch))
        sizes = tuple(tuple(int(s * octave) for octave in OCTAVES) for s in o.anchor_sizes)
        anchors = AnchorGenerator(sizes, (tuple(o.aspect_ratios),) * len(sizes))
        norm = partial(nn.GroupNorm, o.head_group_norm) if o.head_group_norm else None
        head = RetinaNetHead(ch, anchors.num_anchors_per_location()[0], config.num_classes, norm_layer=norm)
        for tower in (head.classification_head, head.regression_head):  # torchvision builds 4 convs
            tower.conv = tower.conv[:o.head_convs]
        return RetinaNet(backbone, config.num_classes, anchor_generator=anchors, head=head,
                         topk_candidates=o.topk_candidates, detections_per_img=o.detections)

    def _anchor_generator(self) -> nn.Module:
        return self.model.anchor_generator

    def _extra_hooks(self, rec: dict[str, Any]) -> list[tuple[nn.Module, str, Any]]:
        def head(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            rec["head_outputs"] = output

        return [(self.model.head, "post", head)]

    def predict_points(self, out: CnnOutput, points: Points) -> tuple[Tensor, Tensor]:
        """Head outputs at the points' anchors: logits [P, C], boxes [P, 4] absolute xyxy."""
        heads = out.head_outputs
        logits = heads["cls_logits"][points.image, points.index]
        deltas = heads["bbox_regression"][points.image, points.index]
        anchors = torch.stack(out.anchors)[points.image, points.index]
        return logits, self.model.box_coder.decode_single(deltas, anchors)
