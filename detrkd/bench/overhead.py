"""``detrkd bench overhead``: what one distillation training step costs, per method and query count.

For each query count q (teacher and student both built with q queries) it times one full training
step (forward, backward, AdamW) of

    student          the student alone (its detection loss)
    teacher_floor    the student plus the teacher's no-grad forward: the floor every method pays
    <method>         the student, the teacher and the method (its paper-default options)

on one fixed batch, in this process: ``warmup`` rounds, then the median of ``steps`` rounds, where a
round is one step of every configuration in turn (interleaved, so drift hits all alike). Overhead is
``sec_per_step / floor - 1``. A breakdown of the slowest methods comes from one extra step under
``torch.profiler``: the ``record_function`` ranges the library sets (``detrkd::teacher``,
``detrkd::student``, ``detrkd::method/<name>``, ``detrkd::decode``, ``detrkd::solve``) plus timed
backward and optimizer phases (profiling adds its own overhead; the shares are what matter).

The methods and their options are those of the accuracy suite's configs (``configs/digits_*.yaml``),
so both benchmarks measure the same thing.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from ..models import DetrAdapter, build_detector

FLOOR, STUDENT = "teacher_floor", "student"
RANGES = ("detrkd::teacher", "detrkd::student", "detrkd::decode", "detrkd::solve")


@dataclass(frozen=True)
class Pair:
    """The teacher / student presets of the benchmark (random weights: timing only)."""

    teacher_family: str = "rt_detr"
    teacher_preset: str = "small"
    student_family: str = "rt_detr"
    student_preset: str = "tiny"
    num_classes: int = 10

    def build(self, queries: int, seed: int = 0) -> tuple[DetrAdapter, DetrAdapter]:
        """(student, teacher) with ``queries`` queries each (the teacher is built first)."""
        torch.manual_seed(seed)
        teacher = build_detector(self.teacher_family, self.teacher_preset, self.num_classes, num_queries=queries)
        student = build_detector(self.student_family, self.student_preset, self.num_classes, num_queries=queries)
        return student, teacher


def method_specs(names: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """name -> the ``methods`` mapping of its accuracy-suite config. Besides the ``all`` suite's rows:
    ``agfd`` / ``lapd`` (that part of ``qskd`` alone), ``global_alignment_reference`` (the same
    matching done the naive way, per decoder layer with scipy, image after image) and
    ``active_sampling_bf16`` (its ASM products in bfloat16: ``precision``)."""
    from ..config import DistillConfig, load_config
    from .accuracy import ROWS, SUITES

    parts = {"agfd": ("qskd", {}), "lapd": ("qskd", {}), "global_alignment_reference":
             ("global_alignment", {"reference": True}),
             "active_sampling_bf16": ("active_sampling", {"precision": "bfloat16"})}
    choices = [*SUITES["all"], *parts]
    unknown = sorted(set(names or ()) - set(choices))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {choices}")
    specs: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names or choices:
        row, extra = parts.get(name, (name, None))
        methods = dict(load_config(ROWS[row].config, schema=DistillConfig).methods)
        if extra is None:
            specs[name] = methods
        else:
            key = name if name in methods else row
            specs[name] = {key: {**methods[key], **extra}}
    return specs


def fixed_batch(batch_size: int, image_size: int, data: Path | None, num_classes: int,
                family: str = "rt_detr") -> dict[str, Any]:
    """The first ``batch_size`` training images of ``data`` under ``family``'s eval transform (square
    inputs for RT-DETR / D-FINE, as they train), or a synthetic batch of random images with 2-8
    random boxes each when ``data`` is None."""
    from ..data.collate import collate

    if data is None:
        gen = torch.Generator().manual_seed(0)
        items = []
        for _ in range(batch_size):
            n = int(torch.randint(2, 9, (1,), generator=gen))
            centres, sizes = torch.rand(n, 2, generator=gen) * 0.6 + 0.2, torch.rand(n, 2, generator=gen) * 0.2 + 0.05
            target = {"class_labels": torch.randint(0, num_classes, (n,), generator=gen),
                      "boxes": torch.cat([centres, sizes], 1)}
            items.append((torch.rand(3, image_size, image_size, generator=gen), target))
        return collate(items)
    from ..config import DataConfig
    from ..data.coco import CocoDetection
    from ..recipe import transforms_for

    config = DataConfig(root=str(data), image_size=image_size)
    from ..models.processors import imagenet_pixels

    # the digits benchmark's pixels (configs/digits_*.yaml: model.pixels imagenet)
    dataset = CocoDetection(*config.split_paths("train"), transforms_for(imagenet_pixels(family, image_size), "val", config))
    return collate([dataset[i] for i in range(batch_size)])


def step_fn(student: DetrAdapter, teacher: DetrAdapter, methods: dict[str, dict[str, Any]] | None,
            batch: dict[str, Any]) -> Callable[[], dict[str, float]]:
    """A closure running one training step (returns its phase times in seconds).
    ``methods=None``: the student alone; ``{}``: student + teacher forward (the floor)."""
    from ..distill.base import Distiller
    from ..distill.methods import build_methods

    teacher.requires_grad_(False).eval()
    if not methods:
        module: nn.Module = student

        def loss() -> Tensor:
            if methods is not None:  # the floor: the teacher's forward, as a distillation step runs it
                with torch.no_grad(), record_function("detrkd::teacher"):
                    teacher(batch["pixel_values"], batch["pixel_mask"])
            return student(batch["pixel_values"], batch["pixel_mask"], labels=batch["labels"]).loss
    else:
        built, weights = build_methods(methods, student, teacher)
        module = Distiller(student, teacher, built, weights)

        def loss() -> Tensor:
            return module(batch)[0]
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)

    def step() -> dict[str, float]:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        value = loss()
        t1 = time.perf_counter()
        value.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "total": t3 - t0}

    return step


def time_round_robin(steps: dict[str, Callable[[], dict[str, float]]], rounds: int,
                     warmup: int) -> dict[str, list[float]]:
    """Wall seconds of ``rounds`` steps of every closure, interleaved (one step of each per round,
    so a slow drift of the machine hits all of them alike), after ``warmup`` untimed rounds."""
    timed: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            seconds = step()["total"]
            if r >= warmup:
                timed[name].append(seconds)
    return timed


def profile_step(step: Callable[[], dict[str, float]], method_names: Sequence[str]) -> dict[str, float]:
    """Milliseconds per phase of one profiled step: the library's ranges, each method's own range,
    backward and optimizer (``other`` = forward time outside the named ranges)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        phases = step()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key in RANGES or event.key.startswith("detrkd::method/"):
            totals[event.key.removeprefix("detrkd::")] = event.cpu_time_total / 1e3
    out = {k: round(v, 1) for k, v in totals.items()}
    top = sum(totals.get(k, 0.0) for k in ("teacher", "student")) + sum(
        totals.get(f"method/{m}", 0.0) for m in method_names)
    out.update(backward=round(phases["backward"] * 1e3, 1), optimizer=round(phases["optimizer"] * 1e3, 1),
               other=round(max(0.0, phases["forward"] * 1e3 - top), 1), total=round(phases["total"] * 1e3, 1))
    return out


def run_overhead(pair: Pair, queries: Sequence[int] = (300, 900), methods: Sequence[str] | None = None,
                 batch_size: int = 8, image_size: int = 256, steps: int = 5, warmup: int = 2,
                 data: Path | None = None, breakdown: int = 3,
                 log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows ``{method, queries, sec_per_step, overhead_vs_floor, min, max}`` for every method and
    query count, and ``{"q=<queries>": {method: breakdown ms}}`` for the ``breakdown`` slowest
    methods at each query count."""
    specs = method_specs(methods)
    batch = fixed_batch(batch_size, image_size, data, pair.num_classes, pair.student_family)
    rows: list[dict[str, Any]] = []
    breakdowns: dict[str, Any] = {}
    for q in queries:
        _, teacher = pair.build(q)
        steps_by_name: dict[str, Callable[[], dict[str, float]]] = {}
        for name, spec in [(STUDENT, None), (FLOOR, {}), *specs.items()]:
            student, _ = pair.build(q, seed=1)
            steps_by_name[name] = step_fn(student, teacher, spec, batch)
        timed = time_round_robin(steps_by_name, steps, warmup)
        for name, times in timed.items():
            log(f"q={q} {name:26s} {statistics.median(times):.3f} s/step")
        floor = statistics.median(timed[FLOOR])
        for name, times in timed.items():
            median = statistics.median(times)
            rows.append({"method": name, "queries": q, "sec_per_step": round(median, 4),
                         "overhead_vs_floor": round(median / floor - 1, 4),
                         "min": round(min(times), 4), "max": round(max(times), 4)})
        slowest = sorted(specs, key=lambda n: -statistics.median(timed[n]))[:breakdown]
        breakdowns[f"q={q}"] = {n: profile_step(steps_by_name[n], list(specs[n])) for n in slowest}
    return rows, breakdowns


def markdown(rows: list[dict[str, Any]]) -> str:
    """Methods down, query counts across: seconds per step and overhead over the floor."""
    queries = sorted({r["queries"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["queries"]): r for r in rows}
    head = "| method | " + " | ".join(f"s/step q={q} | vs floor q={q}" for q in queries) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(queries))]
    for m in methods:
        cells = []
        for q in queries:
            r = cell.get((m, q))
            cells += ["", ""] if r is None else [f"{r['sec_per_step']:.3f}", f"{r['overhead_vs_floor'] * 100:+.0f}%"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Grouped bars: seconds per step per method, one bar per query count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = sorted({r["queries"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["queries"]): r["sec_per_step"] for r in rows}
    width = 0.8 / len(queries)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(methods)), 4.5))
    for i, q in enumerate(queries):
        xs = [j + (i - (len(queries) - 1) / 2) * width for j in range(len(methods))]
        ax.bar(xs, [cell.get((m, q), 0.0) for m in methods], width, label=f"{q} queries")
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_ylabel("seconds per training step")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
