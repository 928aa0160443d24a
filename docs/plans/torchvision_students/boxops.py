import sys, time, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(1)
import torchvision.ops as tvo
from torchvision.ops import boxes as tvb
from detrkd import box_ops as dk

g = torch.Generator().manual_seed(0)
def rnd(*s):
    xy = torch.rand(*s, 2, generator=g); wh = torch.rand(*s, 2, generator=g) * 0.5
    return torch.cat([xy, xy + wh], -1)
a, b = rnd(7), rnd(5)
cx = dk.xyxy_to_cxcywh(a)
print("convert equal:", torch.allclose(tvo.box_convert(cx, "cxcywh", "xyxy"), dk.cxcywh_to_xyxy(cx)),
      torch.allclose(tvo.box_convert(a, "xyxy", "cxcywh"), cx),
      torch.allclose(tvo.box_convert(a, "xyxy", "xywh"), dk.xyxy_to_xywh(a)),
      torch.allclose(tvo.box_convert(dk.xyxy_to_xywh(a), "xywh", "xyxy"), a))
print("iou/giou equal:", torch.allclose(tvo.box_iou(a, b), dk.box_iou(a, b), atol=1e-6),
      torch.allclose(tvo.generalized_box_iou(a, b), dk.generalized_box_iou(a, b), atol=1e-6))
A, B = rnd(3, 7), rnd(3, 5)
print("batched dims:", tuple(tvo.box_iou(A, B).shape), tuple(tvo.generalized_box_iou(A, B).shape),
      torch.allclose(tvo.generalized_box_iou(A, B), dk.generalized_box_iou(A, B), atol=1e-6))
print("elementwise: 1-giou_loss == dk elementwise:", torch.allclose(1 - tvo.generalized_box_iou_loss(a[:5], b), dk.elementwise_generalized_box_iou(a[:5], b), atol=1e-6))
# degenerate boxes
z = torch.tensor([[0.2, 0.2, 0.2, 0.2]]); inv = torch.tensor([[0.5, 0.5, 0.3, 0.3]]); n = torch.tensor([[0.1, 0.1, 0.4, 0.4]])
print("zero-area vs itself  tv iou", tvo.box_iou(z, z).item(), "giou", tvo.generalized_box_iou(z, z).item(),
      "| dk iou", dk.box_iou(z, z).item(), "giou", dk.generalized_box_iou(z, z).item())
print("zero-area vs normal  tv", tvo.box_iou(z, n).item(), tvo.generalized_box_iou(z, n).item(), "| dk", dk.box_iou(z, n).item(), dk.generalized_box_iou(z, n).item())
print("inverted box area tv", tvo.box_area(inv).item(), "dk", dk.box_area(inv).item(),
      "| inverted vs normal iou tv", tvo.box_iou(inv, n).item(), "dk", dk.box_iou(inv, n).item(),
      "giou tv", tvo.generalized_box_iou(inv, n).item(), "dk", dk.generalized_box_iou(inv, n).item())
print("giou_loss zero vs zero:", tvo.generalized_box_iou_loss(z, z).item(), "dk elementwise:", dk.elementwise_generalized_box_iou(z, z).item())
# dtypes
h = a.half(); bh = b.half()
print("dtype half: tv iou", tvo.box_iou(h, bh).dtype, "giou", tvo.generalized_box_iou(h, bh).dtype, "area", tvo.box_area(h).dtype,
      "| dk", dk.box_iou(h, bh).dtype, "convert tv", tvo.box_convert(h, "xyxy", "cxcywh").dtype)
bf = a.bfloat16(); print("bf16 tv giou", tvo.generalized_box_iou(bf, b.bfloat16()).dtype)
i = (a * 100).long(); print("int boxes tv iou", tvo.box_iou(i, i).dtype, "area", tvo.box_area(i).dtype)
print("same-format convert returns clone:", tvo.box_convert(a, "xyxy", "xyxy") is not a)
# grads through degenerate boxes
zz = z.clone().requires_grad_(); tvo.generalized_box_iou(zz, n).sum().backward(); print("tv grad zero-area finite:", bool(torch.isfinite(zz.grad).all()))
# nms
sc = torch.rand(7, generator=g); print("nms", tvo.nms(a, sc, 0.5).tolist(), "batched", tvo.batched_nms(a, sc, torch.tensor([0,1,0,1,0,1,0]), 0.5).tolist())
# speed 900 x 900 pairwise giou, one thread
X, Y = rnd(900), rnd(900)
for name, f in [("tv giou", tvo.generalized_box_iou), ("dk giou", dk.generalized_box_iou), ("tv iou", tvo.box_iou), ("dk iou", dk.box_iou)]:
    f(X, Y); t0 = time.perf_counter()
    for _ in range(5): f(X, Y)
    print(name, f"{(time.perf_counter()-t0)/5*1e3:.1f} ms")
