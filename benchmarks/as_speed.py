"""Active sampling's method time before and after 150900a, in one process, interleaved.

"Before" is the pre-150900a arithmetic written out here (scores divided by sqrt(d) T after the
product, Eq. 16 through log_softmax, the student's keys through a parameter-detached copy of the
whole ASM, a head mean that copies); "after" is ``detrkd.distill.active_sampling`` as it is now.
Fake teacher / student prediction vectors, B = 8, Qt = Qs = 900, C = 10, default ASM (256 / 256);
one forward and backward of the three terms. Prints both values and gradients (they agree) and
the median seconds of 10 interleaved calls each (after 2 untimed). "bf16" is "after" with
``precision="bfloat16"`` (the ASM's MLP and q.k products in bfloat16), the same weights; its
values and gradients are printed against "after"'s as relative differences.

    OMP_NUM_THREADS=1 python benchmarks/as_speed.py [THREADS]
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch
from torch import Tensor
from torch.func import functional_call

import detrkd.distill.active_sampling as A

B, Q, C = 8, 900, 10


def old_logits(queries: Tensor, keys: Tensor, heads: int = 1, temperature: float = 1.0) -> Tensor:
    """``sampling_logits`` before 150900a: the scale divides the [B, h, M, N] scores."""
    b, m, d = queries.shape
    q = queries.view(b, m, heads, d // heads).transpose(1, 2)
    k = keys.view(b, keys.shape[1], heads, d // heads).transpose(1, 2)
    return q @ k.transpose(-1, -2) / (math.sqrt(d // heads) * temperature)


def old(m: A.ActiveSampling, yt: Tensor, ys0: Tensor) -> tuple[list[float], Tensor]:
    """The three terms' forward and backward as computed before 150900a: (values, grad of y_s)."""
    ys = ys0.clone().requires_grad_()
    q_t, k_t = m.asm(yt)
    sc = old_logits(q_t, k_t)
    samp = -sc.log_softmax(-1).diagonal(dim1=-2, dim2=-1).mean()
    s_t = (sc.detach() / m.temperature).softmax(-1).mean(1) @ yt
    params = {n: p.detach() for n, p in m.asm.named_parameters()}
    k_s = functional_call(m.asm, params, (ys,))[1]
    s_s = old_logits(q_t.detach(), k_s, 1, m.temperature).softmax(-1).mean(1) @ ys
    l1, cls = m.point_losses(s_s, s_t, "bernoulli")
    (samp + 5 * l1.mean() + cls.mean()).backward()
    return [samp.item(), l1.mean().item(), cls.mean().item()], ys.grad


def new(m: A.ActiveSampling, yt: Tensor, ys0: Tensor) -> tuple[list[float], Tensor]:
    """The same through the library's functions as they are now (at ``m.precision``)."""
    ys = ys0.clone().requires_grad_()
    with m.products(yt):
        q_t, k_t = m.asm(yt)
        sc = A.sampling_logits(q_t, k_t)
    samp = A.diagonal_nll(sc)
    l1, cls = m.distill((yt, q_t, k_t, sc), ys, "bernoulli")
    (samp + 5 * l1 + cls).backward()
    return [samp.item(), l1.item(), cls.item()], ys.grad


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    torch.manual_seed(0)
    yt = torch.cat([torch.rand(B, Q, 4), torch.rand(B, Q, C)], -1)
    ys0 = torch.cat([torch.rand(B, Q, 4), torch.rand(B, Q, C)], -1)
    m = A.ActiveSampling(num_classes=C)
    a, ga = old(m, yt, ys0)
    pa = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    b, gb = new(m, yt, ys0)
    pb = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    print("values", a, b, "max |grad diff| ys", (ga - gb).abs().max().item(),
          "asm", max((x - y).abs().max().item() for x, y in zip(pa, pb)))
    m16 = A.ActiveSampling(num_classes=C, precision="bfloat16")
    compare_bf16(m, m16, yt, ys0, "fresh ASM")
    t: dict[str, list[float]] = {"old": [], "new": [], "bf16": []}
    for _ in range(12):
        for k, f, mod in (("old", old, m), ("new", new, m), ("bf16", new, m16)):
            s = time.perf_counter()
            f(mod, yt, ys0)
            t[k].append(time.perf_counter() - s)
        m.zero_grad()
        m16.zero_grad()
    med = {k: statistics.median(v[2:]) for k, v in t.items()}
    print({k: round(v, 3) for k, v in med.items()}, "ratio", round(med["new"] / med["old"], 3),
          "bf16 / new", round(med["bf16"] / med["new"], 3))
    sharpen(m, yt)  # a fresh ASM samples almost uniformly; a trained one has larger, sharper scores
    compare_bf16(m, m16, yt, ys0, "ASM after 60 Eq. 16 steps")


def compare_bf16(m: A.ActiveSampling, m16: A.ActiveSampling, yt: Tensor, ys0: Tensor, label: str) -> None:
    """Print the bf16 terms and the relative gradient differences to float32, the same weights."""
    m16.load_state_dict(m.state_dict())
    grads = []
    for mod in (m, m16):
        mod.zero_grad()
        values, g = new(mod, yt, ys0)
        grads.append((values, g, torch.cat([p.grad.flatten() for p in mod.parameters()])))
        mod.zero_grad()
    (_, g32, a32), (v16, g16, a16) = grads
    print(label, "float32 terms", [round(v, 6) for v in grads[0][0]], "bf16 terms", [round(v, 6) for v in v16],
          f"relative grad diff: ys {((g16 - g32).norm() / g32.norm()).item():.2e}, "
          f"asm {((a16 - a32).norm() / a32.norm()).item():.2e}")


def sharpen(m: A.ActiveSampling, yt: Tensor, steps: int = 60) -> None:
    """Train the ASM on Eq. 16 alone (AdamW, lr 1e-3) on the first two images."""
    opt = torch.optim.AdamW(m.asm.parameters(), lr=1e-3)
    for _ in range(steps):
        q, k = m.asm(yt[:2])
        loss = A.diagonal_nll(A.sampling_logits(q, k))
        opt.zero_grad()
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
