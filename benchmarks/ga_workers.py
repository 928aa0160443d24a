"""Global alignment's matching alone at 900 queries: solver threads (``workers``) 0 / 1 / 2 against
the naive per-layer scipy reference, on the overhead benchmark's models and batch (RT-DETR small ->
tiny, random weights, 8 digits images, all 2 x 8 layer-pair problems). Run alone on the machine:

    python benchmarks/ga_workers.py --threads 2 --out benchmarks/results/overhead/ga_workers.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from detrkd.bench import Pair, fixed_batch
from detrkd.distill.global_alignment import global_alignment, reference_alignment, stack_layer_pairs
from detrkd.distill.pairing import layer_pairs
from detrkd.provenance import git_sha, hardware


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall milliseconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--queries", type=int, default=900)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    student, teacher = (m.eval() for m in Pair().build(args.queries))
    batch = fixed_batch(8, 256, Path("data/digits"), 10)
    with torch.no_grad():
        t_out = teacher(batch["pixel_values"], batch["pixel_mask"])
        s_out = student(batch["pixel_values"], batch["pixel_mask"])
    pairs = layer_pairs(s_out.predictions.num_layers, t_out.predictions.num_layers, "all")
    s_logits, s_boxes, t_logits, t_boxes = stack_layer_pairs(s_out.predictions, t_out.predictions, pairs)
    inputs = (s_logits, s_boxes, t_logits, t_boxes, (s_out.class_head, t_out.class_head))
    result = {"queries": args.queries, "problems": int(t_logits.shape[0]), "threads": args.threads,
              "reference_ms": median_ms(lambda: reference_alignment(*inputs, batch=8), args.repeats)}
    for workers in (0, 1, 2):
        result[f"workers_{workers}_ms"] = median_ms(lambda: global_alignment(*inputs, workers=workers), args.repeats)
        result[f"workers_{workers}_speedup"] = round(result["reference_ms"] / result[f"workers_{workers}_ms"], 2)
    result.update(hardware=hardware(), torch=torch.__version__, git_sha=git_sha(),
                  command=f"python benchmarks/ga_workers.py --threads {args.threads} --queries {args.queries}")
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
