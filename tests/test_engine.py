"""Training engine: schedule, parameter groups, non-finite handling, logging, exact resume."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from detrkd.checkpoint import load_checkpoint
from detrkd.config import load_config
from detrkd.engine import (NonFiniteLossError, Trainer, TrainingError, build_optimizer,
                           detector_param_groups, epoch_batches, lr_factor, named_param_groups)


class ToyData(Dataset):
    """Random regression data with a random "augmentation" (uses torch's global RNG)."""

    def __init__(self, n: int = 10):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


def collate(items):
    return {"x": torch.stack([a for a, _ in items]), "y": torch.stack([b for _, b in items])}


class ToyModel(nn.Module):
    """A tiny 'detector': a backbone, a head with a norm and dropout (uses the RNG)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(8, 2))
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)

    def backbone_parameters(self):
        return self.backbone.parameters()

    def forward(self, x):
        return self.head(self.norm(self.backbone(x).relu()))


def toy_loss(model, poison=()):
    calls = {"n": 0}

    def compute_loss(batch):
        calls["n"] += 1
        err = (model(batch["x"]) - batch["y"]) ** 2
        mse, l1 = err.mean(), err.sqrt().mean()
        if calls["n"] in poison:
            mse = mse * float("nan")
        return mse + 0.1 * l1, {"mse": mse, "l1": l1}

    return compute_loss


def make_config(tmp_path, name="run", **optim):
    return load_config({
        "model": {"family": "toy", "preset": "tiny"},
        "data": {"root": str(tmp_path), "batch_size": 3},
        "optim": {"epochs": 3, "warmup_steps": 2, "lr": 1e-2, "backbone_lr": 1e-3, **optim},
        "output_dir": str(tmp_path / name),
        "log_every_steps": 2,
        "checkpoint_every_steps": 5,
    })


def make_trainer(cfg, poison=(), evaluate_fn=None):
    torch.manual_seed(cfg.seed)
    model = ToyModel()
    return Trainer(model, toy_loss(model, poison), detector_param_groups(model, cfg.optim), ToyData(),
                   collate, cfg, evaluate_fn=evaluate_fn, progress=False)


def toy_eval(model):
    torch.rand(5)  # evaluation must not perturb the training RNG
    return {"ap": float(model.head[1].bias.abs().sum()), "ap50": 0.5}


# ---- schedule ---------------------------------------------------------------------------
def test_cosine_schedule_warms_up_then_decays(tmp_path):
    optim = make_config(tmp_path, warmup_steps=10, epochs=5, min_lr_ratio=0.01).optim
    f = [lr_factor(s, optim, steps_per_epoch=20) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))  # linear warm-up
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # monotone decay
    assert f[55] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert f[99] == pytest.approx(0.01, abs=1e-3)


def test_step_schedule_drops_at_step_epochs(tmp_path):
    optim = make_config(tmp_path, schedule="step", warmup_steps=5, step_epochs=[2, 4], gamma=0.1).optim
    f = [lr_factor(s, optim, steps_per_epoch=10) for s in range(50)]
    assert f[2] == pytest.approx(0.6)
    assert f[5:20] == pytest.approx([1.0] * 15)
    assert f[20:40] == pytest.approx([0.1] * 20)
    assert f[40:] == pytest.approx([0.01] * 10)


def test_scheduler_drives_optimizer_lr_per_group(tmp_path):
    cfg = make_config(tmp_path, warmup_steps=4, epochs=1)
    trainer = make_trainer(cfg)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["main"] == pytest.approx(1e-2 / 4) and lrs["backbone"] == pytest.approx(1e-3 / 4)


# ---- parameter groups --------------------------------------------------------------------
def test_param_groups_split_backbone_and_no_decay(tmp_path):
    cfg = make_config(tmp_path, weight_decay=0.05)
    model = ToyModel()
    groups = {g["name"]: g for g in detector_param_groups(model, cfg.optim)}
    assert set(groups) == {"main", "main/no_decay", "backbone", "backbone/no_decay"}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["backbone"]["params"]) == {id(model.backbone.weight)}
    assert ids(groups["backbone/no_decay"]["params"]) == {id(model.backbone.bias)}
    assert ids(groups["main/no_decay"]["params"]) == ids([model.norm.weight, model.norm.bias, model.head[1].bias])
    assert groups["main"]["weight_decay"] == 0.05 and groups["main/no_decay"]["weight_decay"] == 0.0
    assert groups["backbone"]["lr"] == cfg.optim.backbone_lr and groups["main"]["lr"] == cfg.optim.lr
    everything = set().union(*(ids(g["params"]) for g in groups.values()))
    assert id(model.frozen) not in everything  # no grad -> excluded


def test_optimizer_rejects_duplicate_and_empty(tmp_path):
    optim = make_config(tmp_path).optim
    lin = nn.Linear(2, 2)
    groups = named_param_groups("a", lin.named_parameters(), 1e-3, 0.0)
    with pytest.raises(TrainingError, match="more than one group"):
        build_optimizer(groups + named_param_groups("b", lin.named_parameters(), 1e-3, 0.0), optim)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        build_optimizer([], optim)


# ---- data order --------------------------------------------------------------------------
def test_epoch_batches_are_a_function_of_seed_and_epoch():
    a = epoch_batches(10, 3, seed=0, epoch=1)
    assert a == epoch_batches(10, 3, seed=0, epoch=1)
    assert a != epoch_batches(10, 3, seed=0, epoch=2)
    assert [len(b) for b in a] == [3, 3, 3, 1]
    assert sorted(i for b in a for i in b) == list(range(10))


# ---- non-finite losses -------------------------------------------------------------------
def test_nonfinite_loss_is_skipped_and_counted(tmp_path, caplog):
    cfg = make_config(tmp_path, epochs=1)
    trainer = make_trainer(cfg, poison={2})
    with caplog.at_level(logging.WARNING, logger="detrkd"):
        summary = trainer.fit()
    assert summary["nonfinite_total"] == 1 and summary["global_step"] == 4
    assert any("non-finite loss" in r.message and "mse" in r.message for r in caplog.records)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["skipped_steps"] == 1


def test_skipped_step_leaves_weights_unchanged(tmp_path):
    cfg = make_config(tmp_path, epochs=1, max_steps=1)
    trainer = make_trainer(cfg, poison={1})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_abort_after_max_nonfinite_in_row(tmp_path):
    cfg = make_config(tmp_path, epochs=3, max_nonfinite_in_row=3)
    trainer = make_trainer(cfg, poison={2, 3, 4})
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        trainer.fit()


def test_nonfinite_counter_resets_after_a_good_step(tmp_path):
    cfg = make_config(tmp_path, epochs=2, max_nonfinite_in_row=2)
    summary = make_trainer(cfg, poison={1, 3, 5}).fit()
    assert summary["nonfinite_total"] == 3 and summary["nonfinite_in_row"] == 0


# ---- logging, evaluation, checkpoints -------------------------------------------------------
def test_metrics_log_eval_and_best_checkpoint(tmp_path):
    cfg = make_config(tmp_path, epochs=2)
    summary = make_trainer(cfg, evaluate_fn=toy_eval).fit()
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["type"] == "train"]
    evals = [r for r in lines if r["type"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert {"lr", "loss", "mse", "l1", "sec_per_step", "data_sec_per_step", "epoch"} <= set(train[0])
    assert train[0]["sec_per_step"] > train[0]["data_sec_per_step"] > 0
    assert [(r["epoch"], r["step"]) for r in evals] == [(1, 4), (2, 8)]
    assert summary["best_metric"] == max(r["ap"] for r in evals)
    assert (run / "config.yaml").is_file()
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert (last["epoch"], last["batch_in_epoch"], last["global_step"]) == (2, 0, 8)
    assert best["best_metric"] == summary["best_metric"]


def test_refuses_to_overwrite_a_run_or_resume_nothing(tmp_path):
    cfg = make_config(tmp_path, epochs=1)
    with pytest.raises(TrainingError, match="cannot resume"):
        make_trainer(cfg).fit(resume=True)
    make_trainer(cfg).fit()
    with pytest.raises(TrainingError, match="already holds a run"):
        make_trainer(cfg).fit()


def test_resume_rejects_a_different_batch_size(tmp_path):
    cfg = make_config(tmp_path, max_steps=2)
    make_trainer(cfg).fit()
    cfg.data.batch_size = 2
    with pytest.raises(TrainingError, match="batches of 3"):
        make_trainer(cfg).fit(resume=True)


def test_resume_rejects_a_different_model(tmp_path):
    cfg = make_config(tmp_path, max_steps=2)
    make_trainer(cfg).fit()
    model = nn.Linear(4, 2)
    trainer = Trainer(model, lambda b: (model(b["x"]).sum(), {}), detector_param_groups(model, cfg.optim),
                      ToyData(), collate, cfg, progress=False)
    with pytest.raises(TrainingError, match="does not fit the configured model"):
        trainer.fit(resume=True)


# ---- exact resume ---------------------------------------------------------------------------
@pytest.mark.parametrize("stop_at", [3, 4, 6])  # mid-epoch, exactly at an epoch end, after a periodic ckpt
def test_resumed_run_equals_uninterrupted_run(tmp_path, stop_at):
    full = make_trainer(make_config(tmp_path, "full"), evaluate_fn=toy_eval)
    full_summary = full.fit()

    cfg = make_config(tmp_path, "split", max_steps=stop_at)
    first = make_trainer(cfg, evaluate_fn=toy_eval).fit()
    assert first["stopped_early"] and first["global_step"] == stop_at
    state = load_checkpoint(tmp_path / "split" / "last.pt")
    assert state["global_step"] == stop_at

    cfg.optim.max_steps = None
    resumed = make_trainer(cfg, evaluate_fn=toy_eval)
    summary = resumed.fit(resume=True)

    assert summary["global_step"] == full_summary["global_step"] == 12
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    opt_a, opt_b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]) for k in opt_a)
    log_full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    log_split = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    strip = lambda ls: [{k: v for k, v in json.loads(x).items() if "sec_per_step" not in k} for x in ls]  # noqa: E731
    assert strip(log_full) == strip(log_split)
    starts = [json.loads(x) for x in (tmp_path / "split" / "provenance.jsonl").read_text().splitlines()]
    assert [r["resume"] for r in starts] == [False, True]  # one record per start, the resume says so
    assert all(r["git_sha"] and r["torch"] == torch.__version__ and r["argv"] for r in starts)


# ---- detector wiring ------------------------------------------------------------------------
def test_make_detector_random_and_from_a_pretrained_checkpoint(tmp_path):
    from detrkd.checkpoint import model_entries, save_checkpoint
    from detrkd.recipe import make_detector

    cfg = load_config({"model": {"family": "deformable_detr", "preset": "tiny", "num_queries": 7},
                       "data": {"root": str(tmp_path)}})
    torch.manual_seed(0)
    model = make_detector(cfg, num_classes=3, class_names=["a", "b", "c"])
    assert model.num_queries == 7 and model.num_classes == 3 and model.config.id2label[2] == "c"
    groups = {g["name"] for g in detector_param_groups(model, cfg.optim)}
    assert {"main", "main/no_decay", "backbone"} <= groups  # HF backbones use frozen batch norm

    path = save_checkpoint(tmp_path / "m.pt", model_entries(model))
    cfg.model.pretrained = str(path)
    loaded = make_detector(cfg, num_classes=3)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(TrainingError, match="has 3 classes, the data has 4"):
        make_detector(cfg, num_classes=4)
