"""Data-parallel training: sharding, the box-count normaliser, and 2-process (gloo) runs under
``torchrun`` that must end where a single-process run with the same global batch ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detrkd.checkpoint import load_checkpoint
from detrkd.config import DistillConfig, load_config
from detrkd.distributed import globally_normalised_loss, shard
from detrkd.engine import epoch_batches, epoch_loader, steps_per_epoch
from detrkd.models import ADAPTERS, build_detector, save_detector

REPO = Path(__file__).resolve().parents[1]


# ---- sharding -------------------------------------------------------------------------------
@pytest.mark.parametrize("n, size", [(8, 2), (7, 3), (3, 3), (5, 4)])
def test_shards_partition_a_global_batch_in_order(n, size):
    items = list(range(100, 100 + n))
    parts = [shard(items, r, size) for r in range(size)]
    assert sum(parts, []) == items  # nothing dropped, nothing twice, rank order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_ranks_see_every_image_of_an_epoch_once():
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 11

        def __getitem__(self, i):
            return i

    seen = {r: [b for b in epoch_loader(Items(), list, 4, 0, seed=3, epoch=1, rank=r, world_size=2)]
            for r in range(2)}
    global_batches = epoch_batches(11, 4, seed=3, epoch=1)  # 4, 4, 3
    assert [a + b for a, b in zip(seen[0], seen[1])] == global_batches
    assert sorted(i for r in seen for b in seen[r] for i in b) == list(range(11))
    assert steps_per_epoch(11, 4, 2) == 3 and steps_per_epoch(9, 4, 2) == 2  # a last batch of 1 < 2 ranks
    skipped = list(epoch_loader(Items(), list, 4, 0, seed=3, epoch=1, skip=1, rank=1, world_size=2))
    assert skipped == seen[1][1:]  # resume skips global batches


# ---- the box normaliser ----------------------------------------------------------------------
def four_images():
    g = torch.Generator().manual_seed(0)
    counts = [1, 3, 2, 2]  # halves with 4 and 4 boxes, but per image 1..3
    labels = [{"class_labels": torch.randint(0, 4, (n,), generator=g),
               "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.full((n, 2), 0.2)], 1)}
              for n in counts]
    labels[2:] = [labels[2], {k: v[:1] for k, v in labels[3].items()}]  # second half: 3 boxes
    return torch.randn(4, 3, 64, 64, generator=g), torch.ones(4, 64, 64, dtype=torch.long), labels


def boxes_in(labels) -> int:
    return sum(len(t["class_labels"]) for t in labels)


@pytest.mark.parametrize("family", sorted(ADAPTERS))
def test_box_normalised_part_is_a_sum_over_images(family):
    """S = box part x box count is additive over a split of the batch: it is the part divided by
    ``num_boxes`` (eval mode: no dropout, no denoising, BatchNorm with running statistics)."""
    torch.manual_seed(0)
    model = build_detector(family, "tiny", 4).eval()
    x, mask, labels = four_images()

    def box_sum(part: slice) -> float:
        out = model(x[part], mask[part], labels=labels[part])
        return float(model.box_normalised_loss(out).detach()) * boxes_in(labels[part])

    whole, first, second = box_sum(slice(0, 4)), box_sum(slice(0, 2)), box_sum(slice(2, 4))
    assert whole == pytest.approx(first + second, rel=1e-5)


def test_rescaled_per_rank_gradients_average_to_the_full_batch_gradient():
    """What DDP computes with ``globally_normalised_loss``: mean over 2 'ranks' of the rescaled
    gradients == the gradient of one process on the whole batch; without the rescaling it is not."""
    torch.manual_seed(0)
    model = build_detector("rt_detr", "tiny", 4).eval()
    x, mask, labels = four_images()

    def grads(part: slice, scale: float | None) -> list[torch.Tensor]:
        model.zero_grad()
        out = model(x[part], mask[part], labels=labels[part])
        loss = out.loss if scale is None else globally_normalised_loss(
            out.loss, model.box_normalised_loss(out), torch.tensor(scale))
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full = grads(slice(0, 4), None)
    mean_boxes = boxes_in(labels) / 2  # 7 / 2
    halves = [grads(s, boxes_in(labels[s]) / mean_boxes) for s in (slice(0, 2), slice(2, 4))]
    averaged = [(a + b) / 2 for a, b in zip(*halves)]
    for a, b in zip(averaged, full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    naive = [(a + b) / 2 for a, b in zip(grads(slice(0, 2), None), grads(slice(2, 4), None))]
    assert max(float((a - b).abs().max()) for a, b in zip(naive, full)) > 1e-3


# ---- two processes under torchrun ----------------------------------------------------------------
def run_config(tmp_path: Path, name: str, **extra) -> dict:
    """rt_detr tiny on 8 digits images, global batch 4, 2 epochs = 4 steps, evaluated each epoch;
    deterministic per image (no denoising, no flips, square inputs, frozen BatchNorm). At larger
    learning rates the top-k query selection and the matching amplify float noise after a few
    steps, so equality would only hold for fewer steps. ImageNet-normalised pixels: on RT-DETR's
    own [0, 1] inputs (mean 0.5) the first conv's float noise, through Adam, reaches 1.6e-6 here."""
    return {"model": {"family": "rt_detr", "preset": "tiny", "num_queries": 10,
                      "overrides": {"num_denoising": 0}, "pixels": "imagenet"},
            "data": {"root": str(tmp_path / "data"), "image_size": 64, "batch_size": 4, "hflip": False},
            "optim": {"epochs": 2, "warmup_steps": 1, "lr": 1e-4, "backbone_lr": 1e-4},
            "output_dir": str(tmp_path / name), "log_every_steps": 1, "checkpoint_every_steps": 3,
            "batch_norm": "frozen", "seed": 5, **extra}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """(tmp dir, {run: [rank 0 result, rank 1 result]}) of one 2-process torchrun job that trains,
    then distils (teacher: a saved rt_detr tiny; method: active sampling, which has learned parts)."""
    from detrkd.data.digits import make_digits_dataset

    tmp = tmp_path_factory.mktemp("ddp")
    make_digits_dataset(tmp / "data", train_images=8, val_images=3, image_size=64)
    torch.manual_seed(1)
    save_detector(build_detector("rt_detr", "tiny", 10, num_queries=10), tmp / "teacher")
    job = {"train": run_config(tmp, "train_ddp"),
           "distill": run_config(tmp, "distill_ddp", teacher=str(tmp / "teacher"),
                                 # the C + 1 KL, not the sigmoid default (bernoulli): with it and the ASM at
                                 # 1e-3 from step 1, AdamW's normalised steps turn float-order differences of
                                 # near-zero gradients into 1.8e-5 weight differences after 4 steps (measured),
                                 # past this test's 1e-6; each alone stays within it
                                 methods={"active_sampling": {"hidden": 16, "weight": 2.0, "class_kd": "kl"}})}
    (tmp / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", str(REPO / "tests" / "ddp_worker.py"),
                             str(tmp / "job.json")], env=env, cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield tmp, proc  # the single-process references run in this process meanwhile
    finally:
        if proc.poll() is None:
            proc.kill()


def ddp_results(tmp: Path, proc: subprocess.Popen) -> dict:
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-4000:]
    return {run: [torch.load(tmp / f"{run}_rank{r}.pt", weights_only=True) for r in range(2)]
            for run in ("train", "distill")}


def single_process(tmp: Path, run: str) -> tuple[dict[str, torch.Tensor], dict]:
    from detrkd.recipe import build_distill_trainer
    from detrkd.recipe import build_trainer

    job = json.loads((tmp / "job.json").read_text())
    raw = {**job[run], "output_dir": str(tmp / f"{run}_single")}
    if run == "train":
        trainer = build_trainer(load_config(raw), progress=False)
    else:
        trainer = build_distill_trainer(load_config(raw, schema=DistillConfig), progress=False)
    trainer.fit()
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    for name, module in trainer.extra_modules.items():
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return state, trainer.last_eval


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_process_with_the_same_global_batch(ddp_runs):
    tmp, proc = ddp_runs
    single = {run: single_process(tmp, run) for run in ("train", "distill")}
    results = ddp_results(tmp, proc)
    for run in ("train", "distill"):
        rank0, rank1 = (r["state"] for r in results[run])
        reference, reference_eval = single[run]
        assert rank0.keys() == rank1.keys() == reference.keys()
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), f"{run}: {name} differs between ranks"
            torch.testing.assert_close(rank0[name], reference[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name: f"{run}: {n}: {m}")
        assert load_checkpoint(tmp / f"{run}_ddp" / "last.pt")["global_step"] == 4
        # the logged loss is averaged over ranks and equals the single-process loss (box normaliser)
        ddp_log, single_log = metrics(tmp / f"{run}_ddp"), metrics(tmp / f"{run}_single")
        assert [r["step"] for r in ddp_log] == [r["step"] for r in single_log] == [1, 2, 2, 3, 4, 4]
        for a, b in zip(ddp_log, single_log):
            if a["type"] == "train":
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        evals = [r for r in ddp_log if r["type"] == "eval"]
        assert [e["num_images"] for e in evals] == [3, 3]  # gathered from both ranks, once
        assert results[run][0]["last_eval"]["num_images"] == results[run][1]["last_eval"]["num_images"] == 3
        assert evals[-1]["ap"] == pytest.approx(reference_eval["ap"], abs=1e-3)
        assert results[run][0]["info"]["ignored_by_ddp"] == (["teacher"] if run == "distill" else [])
    info = results["distill"][0]["info"]
    assert not info["teacher_grads"] and not info["teacher_wrapped"]
    assert any(k.startswith("active_sampling.") for k in results["distill"][0]["state"])
