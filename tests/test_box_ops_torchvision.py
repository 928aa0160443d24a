"""Why ``detrkd.box_ops`` stays as it is beside ``torchvision.ops`` (issue 18, item 5): on valid boxes
the two agree, on degenerate boxes torchvision's IoU / GIoU are NaN and its area of an inverted box
is positive, and it returns float32 for bfloat16 boxes (``benchmarks/results/box_ops_torchvision.txt``
also has it 1.2-2x slower on 900 x 900 IoU / GIoU, and importing torchvision costs every process
seconds). torchvision.ops serves the CNN students (NMS,
RoIAlign, box clipping) instead."""

import torch
from torchvision import ops

from detrkd import box_ops


def _boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n, 2, generator=g), torch.rand(n, 2, generator=g)
    return torch.cat((torch.minimum(a, b), torch.maximum(a, b) + 1e-3), -1)


def test_valid_boxes_agree():
    a, b = _boxes(50, 0), _boxes(50, 1)
    c = box_ops.xyxy_to_cxcywh(a)
    assert torch.equal(box_ops.cxcywh_to_xyxy(c), ops.box_convert(c, "cxcywh", "xyxy"))
    assert torch.equal(box_ops.xyxy_to_cxcywh(a), ops.box_convert(a, "xyxy", "cxcywh"))
    torch.testing.assert_close(box_ops.box_iou(a, b), ops.box_iou(a, b))
    torch.testing.assert_close(box_ops.generalized_box_iou(a, b), ops.generalized_box_iou(a, b))
    torch.testing.assert_close(box_ops.elementwise_generalized_box_iou(a, b),
                               1 - ops.generalized_box_iou_loss(a, b, reduction="none"), atol=1e-5, rtol=0)


def test_degenerate_boxes_and_dtypes_differ():
    zero, inverted = torch.tensor([[0.2, 0.2, 0.2, 0.2]]), torch.tensor([[0.4, 0.4, 0.2, 0.2]])
    assert box_ops.box_iou(zero, zero).item() == 0.0 and ops.box_iou(zero, zero).isnan().all()
    assert box_ops.generalized_box_iou(zero, zero).isfinite().all() and ops.generalized_box_iou(zero, zero).isnan().all()
    assert box_ops.box_area(inverted).item() == 0.0 and ops.box_area(inverted).item() > 0
    half = _boxes(3, 2).bfloat16()
    assert box_ops.box_iou(half, half).dtype == torch.bfloat16 and ops.box_iou(half, half).dtype == torch.float32
