"""Faster R-CNN (FPN) from torchvision as a detrkd student.

Classes: torchvision's ``FastRCNNPredictor`` scores C + 1 classes with column 0 = background, so
targets are detrkd labels + 1 and detections - 1. ``predict_points`` returns the RoI head's logits
in detrkd's softmax order instead: the C real classes first, background LAST (the "no-object"
column of ``distill.losses``), i.e. torchvision's columns [1, ..., C, 0].

Distillation points (``predict_points``): the RoI head (``box_roi_pool`` -> ``box_head`` ->
``box_predictor``) run on the given boxes over the same FPN features the detection loss used; the
box of a point is its class-specific regression at the point's GT class (what ``fastrcnn_loss``
trains for a RoI of that GT), decoded by the RoI head's own ``box_coder`` from the point's box.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .backbone import fpn_backbone
from .base import CnnConfig, CnnDetector, CnnOutput, Points

POOL = 7  # RoIAlign output side (torchvision's)


class FasterRCNNStudent(CnnDetector):
    """torchvision ``FasterRCNN`` on a ResNet-style FPN: P2..P5 + a max-pooled P6 ("pool")."""

    family: ClassVar[str] = "faster_rcnn"
    class_head = "softmax"
    label_offset = 1

    @classmethod
    def build(cls, config: CnnConfig) -> nn.Module:
        o = config.options
        backbone = fpn_backbone(o.widths, o.depths, o.fpn_channels, (1, 2, 3, 4), LastLevelMaxPool())
        anchors = AnchorGenerator(tuple((s,) for s in o.anchor_sizes), (tuple(o.aspect_ratios),) * len(o.anchor_sizes))
        ch = backbone.out_channels
        return FasterRCNN(
            backbone, num_classes=None, rpn_anchor_generator=anchors,
            rpn_head=RPNHead(ch, anchors.num_anchors_per_location()[0]),
            rpn_pre_nms_top_n_train=o.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=o.rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=o.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=o.rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=o.rpn_batch_size_per_image,
            box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], POOL, 2, canonical_scale=o.canonical_scale),
            box_head=TwoMLPHead(ch * POOL * POOL, o.representation),
            box_predictor=FastRCNNPredictor(o.representation, config.num_classes + 1),
            box_batch_size_per_image=o.box_batch_size_per_image, box_detections_per_img=o.detections)

    def _anchor_generator(self) -> nn.Module:
        return self.model.rpn.anchor_generator

    def _extra_hooks(self, rec: dict[str, Any]) -> list[tuple[nn.Module, str, Any]]:
        def proposals(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            rec["proposals"] = output[0]

        return [(self.model.rpn, "post", proposals)]

    def candidates(self, out: CnnOutput, kind: str) -> list[Tensor]:
        """"anchors" (the RPN's) or "proposals" (the RPN's output this step, detached)."""
        if kind == "proposals":
            return [p.detach() for p in out.proposals or []]
        return super().candidates(out, kind)

    def predict_points(self, out: CnnOutput, points: Points) -> tuple[Tensor, Tensor]:
        """RoI head at ``points`` (ordered by image): logits [P, C + 1] (background last),
        boxes [P, 4] absolute xyxy at each point's GT class."""
        heads = self.model.roi_heads
        counts = torch.bincount(points.image, minlength=len(out.image_sizes)).tolist()
        boxes = list(points.boxes.split(counts))
        pooled = heads.box_roi_pool(out.features, boxes, out.image_sizes)  # [P, D, 7, 7]
        logits, deltas = heads.box_predictor(heads.box_head(pooled))  # [P, C + 1], [P, 4 (C + 1)]
        decoded = heads.box_coder.decode(deltas, boxes)  # [P, C + 1, 4]
        rows = torch.arange(decoded.shape[0], device=decoded.device)
        picked = decoded[rows, points.label + self.label_offset]
        return torch.cat((logits[:, 1:], logits[:, :1]), dim=1), picked
