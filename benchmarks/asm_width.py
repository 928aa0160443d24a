"""How wide must the Active Sampling Module be to sample sharply (Eq. 16) at Qt queries?

The active-sampling overhead at 900 queries is dominated by Q x Q x dim products (the teacher's
self-attention for the sampling loss and the student sampling, forward and backward) and by the ASM
MLP, so a narrower ASM (``hidden`` / ``dim``) is the obvious way to make it cheaper. This measures
what that costs: the paper-setting teacher (``runs/paper_digits_teacher``) is run with ``Qt``
queries on 48 training images; a fresh ASM per size is trained for 400 steps (AdamW, lr 1e-3, the
method's ``asm_lr``, batch 8) on 40 of them with the sampling loss alone, then scored on the other 8:
held-out Eq. 16 NLL (ln Qt = uniform) and the share of points whose own output gets the largest
weight. Output: benchmarks/results/overhead/asm_width.txt.

    OMP_NUM_THREADS=1 python benchmarks/asm_width.py QT '[{}, {"dim": 64}]'
"""
import json
import math
import sys

import torch

torch.set_num_threads(1)
from pathlib import Path
from detrkd.models import load_detector
from detrkd.bench.overhead import fixed_batch
from detrkd.distill.active_sampling import ActiveSampling, layer_vectors, sampling_logits, diagonal_nll
Qn = int(sys.argv[1])
t = load_detector("runs/paper_digits_teacher/last.pt", image_size=256).eval()
t.model.config.num_queries = Qn
if hasattr(t.model, "model"): t.model.model.config.num_queries = Qn
batch = fixed_batch(48, 256, Path("data/digits"), 10, "rt_detr")
with torch.no_grad():
    ys = []
    for i in range(0, 48, 8):
        out = t(batch["pixel_values"][i:i+8], batch["pixel_mask"][i:i+8])
        ys.append(layer_vectors(out, out.predictions.num_layers-1))
ys = torch.cat(ys); print("vectors", ys.shape, flush=True)
train, held = ys[:40], ys[40:]
CFGS = json.loads(sys.argv[2]) if len(sys.argv) > 2 else [{}]
for kw in CFGS:
    torch.manual_seed(0)
    m = ActiveSampling(num_classes=10, **kw)
    opt = torch.optim.AdamW(m.asm.parameters(), lr=1e-3)
    log = []
    for step in range(400):
        idx = torch.randint(0, 40, (8,))
        q,k = m.asm(train[idx]); loss = diagonal_nll(sampling_logits(q,k))
        opt.zero_grad(); loss.backward(); opt.step()
        if step in (0, 50, 100, 200, 399): log.append((step, round(loss.item(),3)))
    with torch.no_grad():
        q,k = m.asm(held); sc = sampling_logits(q,k); hl = diagonal_nll(sc).item()
        acc = (sc[:,0].argmax(-1) == torch.arange(sc.shape[-1])).float().mean().item()
    print(kw, "train", log, "held-out NLL", round(hl,3), "diag argmax acc", round(acc,3), "ln Q", round(math.log(Qn),3), flush=True)
