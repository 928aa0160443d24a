"""A torchvision CNN detector (Faster R-CNN, RetinaNet) as a detrkd student.

``CnnDetector`` wraps one torchvision ``GeneralizedRCNN`` / ``RetinaNet`` and gives it the call detrkd
makes of every detector: ``forward(pixel_values, pixel_mask, labels) -> CnnOutput`` with the
model's own torchvision losses, and ``detect`` for evaluation and drawing.

Geometry: detrkd's batch is already resized (``data.transforms``), normalised and zero-padded
bottom / right to a multiple of 32 (``collate``), with labels as normalised cxcywh of each un-padded
image. torchvision's ``GeneralizedRCNNTransform`` would normalise and resize again (no antialias,
to ``min_size`` / ``max_size``), so inside detrkd the model's transform is replaced by
``PrebatchedTransform``, a subclass whose ``normalize`` and ``resize`` are the identity: the model
sees exactly detrkd's pixels, its ``image_sizes`` are the un-padded (h, w) of each image (read
from ``pixel_mask``) and its own padding (zeros, bottom / right, multiple of 32) reproduces detrkd's
batch bit for bit. Everything after the transform (backbone, RPN, RoI heads, dense heads, losses,
NMS, postprocessing) is torchvision's own forward. An exported model (``torchvision_model(...,
standalone=True)``) gets the standard transform instead, set to detrkd's preprocessing (ImageNet
mean / std, shorter side ``pixels.size``, longer at most ``pixels.max_size``).

Targets: boxes normalised cxcywh -> absolute xyxy pixels of the un-padded image; boxes without
area there are dropped (torchvision asserts positive width and height). Class labels: Faster
R-CNN classifies C + 1 classes with 0 = background (labels + 1, and its detections - 1);
RetinaNet is sigmoid over the C classes (labels as they are).

Internals for distillation (``CnnOutput``) are read with forward hooks that are removed when the
call returns (``models.base.forward_hooks``): the FPN features (with gradients), the ``ImageList``
and anchors of the anchor generator, the RPN's proposals, the dense head's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ...box_ops import cxcywh_to_xyxy
from ..base import ClassHead, NonFinitePredictions, forward_hooks
from .options import CnnConfig


# ---- the transform -------------------------------------------------------------------------------
class PrebatchedTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` for images detrkd already resized and normalised: ``normalize``
    and ``resize`` are the identity, batching (zero padding to a multiple of 32) is torchvision's."""

    def __init__(self, size_divisible: int = 32):
        super().__init__(min_size=1, max_size=1, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                         size_divisible=size_divisible)

    def normalize(self, image: Tensor) -> Tensor:
        return image

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, Any]:
        return image, target


# ---- outputs -------------------------------------------------------------------------------------
@dataclass
class CnnOutput:
    """One forward pass of a CNN student.

    class_head:   "softmax" (Faster R-CNN: C + 1, background first in torchvision's order) | "sigmoid"
    image_sizes:  B (h, w) un-padded sizes; padded_size: (H, W) of the batch the backbone saw
    features:     FPN maps {name: [B, D, H_l, W_l]} (with gradients), highest resolution first
    anchors:      B tensors [A, 4] absolute xyxy (the anchor generator's, in its order)
    proposals:    Faster R-CNN: B tensors [n_i, 4] of the RPN (before the RoI sampler); else None
    head_outputs: RetinaNet: {"cls_logits": [B, A, C], "bbox_regression": [B, A, 4]}; else None
    targets:      the torchvision targets the losses used (absolute xyxy boxes, model labels)
    loss, loss_dict: torchvision's losses (training mode with labels), their sum
    detections:   evaluation mode: torchvision's per-image {"boxes" xyxy px, "scores", "labels"}
    """

    class_head: ClassHead
    image_sizes: list[tuple[int, int]]
    padded_size: tuple[int, int]
    features: dict[str, Tensor]
    anchors: list[Tensor]
    proposals: list[Tensor] | None = None
    head_outputs: dict[str, Tensor] | None = None
    targets: list[dict[str, Tensor]] | None = None
    loss: Tensor | None = None
    loss_dict: dict[str, Tensor] | None = None
    detections: list[dict[str, Tensor]] | None = None


class Points(NamedTuple):
    """Distillation points of a batch, flat over images: P points.

    image [P] long: the image of each point; index [P] long: the candidate (anchor / proposal) it is;
    boxes [P, 4]: its box, absolute xyxy clipped to its image; label [P] long: its GT's class (0..C-1).
    """

    image: Tensor
    index: Tensor
    boxes: Tensor
    label: Tensor


def image_sizes(pixel_values: Tensor, pixel_mask: Tensor | None) -> list[tuple[int, int]]:
    """The un-padded (h, w) of each image: [B, H, W] mask -> B pairs (the full size without a mask)."""
    b, _, h, w = pixel_values.shape
    if pixel_mask is None:
        return [(h, w)] * b
    mask = pixel_mask.bool()
    heights, widths = mask.any(2).sum(1).tolist(), mask.any(1).sum(1).tolist()
    return [(int(hh), int(ww)) for hh, ww in zip(heights, widths)]


def pixel_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """[n, 4] normalised cxcywh -> [n, 4] absolute xyxy pixels of an image of ``size`` (h, w)."""
    h, w = size
    return cxcywh_to_xyxy(boxes.float()) * boxes.new_tensor([w, h, w, h], dtype=torch.float32)


def torchvision_target(label: dict[str, Tensor], size: tuple[int, int], offset: int) -> dict[str, Tensor]:
    """A detrkd label (``class_labels``, normalised cxcywh ``boxes``) -> torchvision's target
    (absolute xyxy ``boxes`` of positive area, int64 ``labels`` + ``offset``)."""
    boxes = pixel_boxes(label["boxes"].reshape(-1, 4), size)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[keep], "labels": label["class_labels"].reshape(-1)[keep].long() + offset}


# ---- the detector --------------------------------------------------------------------------------
class CnnDetector(nn.Module):
    """Base class: a torchvision detector behind detrkd's detector call (module docstring).

    Subclasses (``faster_rcnn``, ``retinanet``) set ``family``, ``class_head``, ``label_offset`` and
    implement ``build`` (the torchvision model), ``_anchor_generator``, ``_extra_hooks`` and the
    distillation pieces ``candidates`` and ``predict_points``.
    """

    family: ClassVar[str]
    class_head: ClassVar[ClassHead]
    label_offset: ClassVar[int] = 0  # torchvision label = detrkd label + offset

    def __init__(self, config: CnnConfig):
        super().__init__()
        self.config = config
        self.model = self.torchvision_model(config)
        # how its inputs are made (``data.transforms.Pixels``); set by ``engine.make_detector`` / loading
        self.pixels: Any = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, config: CnnConfig) -> nn.Module:
        """The torchvision model of ``config`` with its standard transform (not yet replaced)."""
        raise NotImplementedError

    @classmethod
    def torchvision_model(cls, config: CnnConfig, pixels: Any = None, standalone: bool = False) -> nn.Module:
        """The torchvision model; ``standalone``: with a standard ``GeneralizedRCNNTransform`` set to
        ``pixels`` (what ``detrkd export`` writes), else with ``PrebatchedTransform`` (detrkd feeds it)."""
        model = cls.build(config)
        if not standalone:
            model.transform = PrebatchedTransform()
        elif pixels is not None:
            model.transform = GeneralizedRCNNTransform(pixels.size, pixels.max_size or pixels.size,
                                                       list(pixels.mean or (0.0, 0.0, 0.0)),
                                                       list(pixels.std or (1.0, 1.0, 1.0)))
        return model

    # ---- facts -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def hidden_size(self) -> int:
        """The FPN width (every level)."""
        return int(self.model.backbone.out_channels)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the CNN body (the FPN belongs to the rest, for a separate learning rate)."""
        return self.model.backbone.body.parameters()

    def box_normalised_loss(self, out: CnnOutput) -> Tensor:
        """Zero: torchvision's losses are normalised by this process's own sampled anchors / RoIs
        (as its reference data-parallel training does), so nothing is rescaled across processes."""
        if out.loss is None:
            raise ValueError("box_normalised_loss needs a forward with labels (out.loss is None)")
        return out.loss * 0.0

    # ---- the call ----------------------------------------------------------------------------
    def forward(self, pixel_values: Tensor, pixel_mask: Tensor | None = None,
                labels: list[dict[str, Tensor]] | None = None, with_attention: bool = False) -> CnnOutput:
        """Run the torchvision model on a detrkd batch.

        pixel_values [B, 3, H, W] (normalised, zero-padded), pixel_mask [B, H, W] (1 = real pixel),
        labels: per image dict(class_labels [n], boxes [n, 4] normalised cxcywh). Training mode needs
        labels (torchvision's losses); evaluation mode returns ``detections`` (labels ignored).
        """
        if with_attention:
            raise ValueError(f"a {self.family} student has no decoder cross-attention: methods that read the "
                             f"student's attention need a DETR student")
        if self.training and labels is None:
            raise ValueError(f"a {self.family} student in training mode needs labels (torchvision's losses)")
        sizes = image_sizes(pixel_values, pixel_mask)
        images = [pixel_values[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]
        targets = None
        if labels is not None and self.training:
            targets = [torchvision_target(t, s, self.label_offset) for t, s in zip(labels, sizes)]
        rec: dict[str, Any] = {}
        with forward_hooks(self._hooks(rec)):
            result = self.model(images, targets)
        return self._output(rec, result, targets)

    def _hooks(self, rec: dict[str, Any]) -> list[tuple[nn.Module, str, Any]]:
        def features(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.training and not all(bool(torch.isfinite(f).all()) for f in output.values()):
                raise NonFinitePredictions("the FPN features are not finite (NaN / inf): the model has diverged")
            rec["features"] = output

        def anchors(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            rec["image_list"], rec["anchors"] = args[0], output

        return [(self.model.backbone, "post", features), (self._anchor_generator(), "post", anchors),
                *self._extra_hooks(rec)]

    def _output(self, rec: dict[str, Any], result: Any, targets: list[dict[str, Tensor]] | None) -> CnnOutput:
        image_list = rec["image_list"]
        out = CnnOutput(self.class_head, list(image_list.image_sizes), tuple(image_list.tensors.shape[-2:]),
                        rec["features"], rec["anchors"], proposals=rec.get("proposals"),
                        head_outputs=rec.get("head_outputs"), targets=targets)
        if isinstance(result, dict):  # training mode: torchvision's loss dict
            out.loss_dict = result
            out.loss = torch.stack(list(result.values())).sum()
        else:
            out.detections = result
        return out

    def _anchor_generator(self) -> nn.Module:
        raise NotImplementedError

    def _extra_hooks(self, rec: dict[str, Any]) -> list[tuple[nn.Module, str, Any]]:
        return []

    # ---- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, pixel_values: Tensor, pixel_mask: Tensor | None,
               sizes: Tensor | Sequence[Sequence[int]]) -> list[dict[str, Tensor]]:
        """Per-image detections as ``evaluation.postprocess`` returns them: ``scores`` [k], ``labels``
        [k] (0..C-1), ``boxes`` [k, 4] absolute xyxy scaled to ``sizes`` [B, 2] (h, w) (e.g. the
        original image sizes); torchvision's score threshold, NMS and detections per image."""
        was_training = self.training
        self.eval()
        try:
            out = self(pixel_values, pixel_mask)
        finally:
            self.train(was_training)
        sizes = torch.as_tensor(sizes, dtype=torch.float32, device=pixel_values.device)
        results = []
        for det, (h, w), target in zip(out.detections or [], out.image_sizes, sizes):
            scale = torch.stack((target[1] / w, target[0] / h)).repeat(2)
            results.append({"scores": det["scores"], "labels": det["labels"] - self.label_offset,
                            "boxes": det["boxes"] * scale})
        return results

    # ---- distillation ------------------------------------------------------------------------
    def candidates(self, out: CnnOutput, kind: str) -> list[Tensor]:
        """The boxes distillation points are chosen from: B tensors [A_i, 4] absolute xyxy."""
        if kind == "anchors":
            return out.anchors
        raise ValueError(f"a {self.family} student has no {kind!r} to distil at (use points: anchors)")

    def predict_points(self, out: CnnOutput, points: Points) -> tuple[Tensor, Tensor]:
        """The student's predictions at ``points``: (logits [P, K] in detrkd's order: softmax heads
        put no-object LAST, boxes [P, 4] absolute xyxy pixels), with gradients."""
        raise NotImplementedError
