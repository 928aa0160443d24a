"""detrkd.box_ops against torchvision.ops (issue 18, item 5): do torchvision's box conversions, area,
IoU and GIoU give the same values (valid and degenerate boxes, float32 / bfloat16), and are they as
fast (median of 20 calls, one thread)? Also: what importing torchvision costs a detrkd process.

    OMP_NUM_THREADS=1 python benchmarks/box_ops_torchvision.py > benchmarks/results/box_ops_torchvision.txt
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import torch
from torchvision import ops

from detrkd import box_ops


def median_ms(fn, *args, repeats: int = 20) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """n valid xyxy boxes in [0, 1]."""
    a, b = torch.rand(n, 2, generator=generator), torch.rand(n, 2, generator=generator)
    return torch.cat((torch.minimum(a, b), torch.maximum(a, b) + 1e-3), -1)


def giou_elementwise_tv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - ops.generalized_box_iou_loss(a, b, reduction="none")


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    a, b = boxes(900, g), boxes(900, g)
    cxcywh = box_ops.xyxy_to_cxcywh(a)
    zero = torch.tensor([[0.2, 0.2, 0.2, 0.2]])
    inverted = torch.tensor([[0.4, 0.4, 0.2, 0.2]])
    cases = [
        ("cxcywh -> xyxy [900]", lambda: box_ops.cxcywh_to_xyxy(cxcywh),
         lambda: ops.box_convert(cxcywh, "cxcywh", "xyxy")),
        ("xyxy -> cxcywh [900]", lambda: box_ops.xyxy_to_cxcywh(a), lambda: ops.box_convert(a, "xyxy", "cxcywh")),
        ("area [900]", lambda: box_ops.box_area(a), lambda: ops.box_area(a)),
        ("IoU 900 x 900", lambda: box_ops.box_iou(a, b), lambda: ops.box_iou(a, b)),
        ("GIoU 900 x 900", lambda: box_ops.generalized_box_iou(a, b), lambda: ops.generalized_box_iou(a, b)),
        ("GIoU elementwise [900]", lambda: box_ops.elementwise_generalized_box_iou(a, b),
         lambda: giou_elementwise_tv(a, b)),
    ]
    print(f"# torch {torch.__version__}, torchvision ops, 1 thread; max |detrkd - torchvision| on valid boxes, "
          f"median ms per call")
    for name, ours, theirs in cases:
        diff = (ours() - theirs()).abs().max().item()
        print(f"{name:24s} max diff {diff:.1e}   detrkd {median_ms(ours):7.3f} ms   "
              f"torchvision {median_ms(theirs):7.3f} ms")
    print("# degenerate boxes (detrkd's docstring: IoU 0, finite GIoU, never NaN)")
    print(f"IoU zero-area vs itself:        detrkd {box_ops.box_iou(zero, zero).item():.3f}   "
          f"torchvision {ops.box_iou(zero, zero).item():.3f}")
    print(f"GIoU zero-area vs itself:       detrkd {box_ops.generalized_box_iou(zero, zero).item():.3f}   "
          f"torchvision {ops.generalized_box_iou(zero, zero).item():.3f}")
    print(f"area of an inverted box:        detrkd {box_ops.box_area(inverted).item():.3f}   "
          f"torchvision {ops.box_area(inverted).item():.3f}")
    half = a[:4].bfloat16()
    print(f"IoU dtype of bfloat16 boxes:    detrkd {box_ops.box_iou(half, half).dtype}   "
          f"torchvision {ops.box_iou(half, half).dtype}")
    code = "import time, torch; t = time.perf_counter(); import torchvision.ops; print(time.perf_counter() - t)"
    seconds = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    print(f"# importing torchvision.ops after torch (a process that would use it in box_ops): {seconds:.2f} s")


if __name__ == "__main__":
    main()
