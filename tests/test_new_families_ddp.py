"""The detection loss of the new families is normalised once under ``torch.distributed``: two gloo
processes, each on half of a 4-image batch (4 and 3 GT boxes), average their gradients of
``detection_loss`` to the one-process gradient of the whole batch.

LW-DETR / RF-DETR: transformers' loss all-reduces ``num_boxes`` itself, so ``box_normalised_loss``
is 0 (rescaling it as well would divide twice and fail this). DEIMv2 with dense one-to-one
matching off (D-FINE's normalisers; with it on, L1 / GIoU / FGL divide by the local size of a match
union, which no process sees globally: documented in ``families/deimv2.py``)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detrkd.distributed import detection_loss
from detrkd.models import build_detector

CASES = {"lw_detr": dict(group_detr=3, num_queries=10), "rf_detr": dict(group_detr=3, num_queries=10),
         "deimv2": dict(use_dense_one_to_one=False, num_denoising=0, num_queries=10)}


def four_images():
    g = torch.Generator().manual_seed(0)
    labels = [{"class_labels": torch.randint(0, 4, (n,), generator=g),
               "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.full((n, 2), 0.2)], 1)}
              for n in (1, 3, 2, 1)]  # halves with 4 and 3 boxes
    return torch.randn(4, 3, 64, 64, generator=g), torch.ones(4, 64, 64, dtype=torch.long), labels


def model_of(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_detector(family, "tiny", 4, **CASES[family]).train()
    for m in model.modules():  # per-image computation: BatchNorm with running statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def gradient(model: torch.nn.Module, part: slice) -> torch.Tensor:
    x, mask, labels = four_images()
    model.zero_grad()
    detection_loss(model, model(x[part], mask[part], labels=labels[part]), labels[part]).backward()
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])


def rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        grads = {}
        for family in CASES:
            grad = gradient(model_of(family), slice(2 * rank, 2 * rank + 2))
            dist.all_reduce(grad)
            grads[family] = grad / 2  # what DDP's gradient average gives
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_average_to_the_one_process_gradient(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(rank_main, args=(free_port(), str(out)), nprocs=2, join=True)
    averaged = torch.load(out, weights_only=True)
    for family in CASES:
        single = gradient(model_of(family), slice(0, 4))
        assert single.abs().max() > 0
        torch.testing.assert_close(averaged[family], single, rtol=1e-4, atol=1e-6, msg=lambda m, f=family: f"{f}: {m}")
