"""FitNet baseline: plain / BN feature MSE over valid tokens of chosen levels, the connector,
grid and width errors, gradients, and a Distiller step combined with another method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detrkd.config import ConfigError
from detrkd.distill.features import token_batch_norm
from detrkd.distill.base import DistillContext, Distiller
from detrkd.distill.fitnet import FitNet, level_token_mask
from detrkd.distill.methods import METHODS, build_methods, method_options
from detrkd.models import build_detector
from detrkd.models.base import DetectorOutput, EncoderMemory, Predictions, Queries

SHAPES = [[2, 2], [1, 2]]  # two levels: tokens 0-3 and 4-5


def _output(tokens: torch.Tensor, padding: torch.Tensor | None = None, shapes=SHAPES) -> DetectorOutput:
    b, n, _ = tokens.shape
    shapes_t = torch.tensor(shapes)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (shapes_t[:, 0] * shapes_t[:, 1]).cumsum(0)[:-1]])
    pad = torch.zeros(b, n, dtype=torch.bool) if padding is None else padding
    return DetectorOutput(Predictions(torch.zeros(1, b, 3, 2), torch.full((1, b, 3, 4), 0.5)), "sigmoid",
                          EncoderMemory(tokens, shapes_t, starts, pad), Queries())


def _ctx(teacher: DetectorOutput, student: DetectorOutput) -> DistillContext:
    return DistillContext(None, None, student, teacher, [])


def test_plain_mse_over_valid_tokens():
    torch.manual_seed(0)
    t, s = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 5] = True  # padding in the student only: excluded as well
    loss = FitNet(4, 4)(_ctx(_output(t), _output(s, pad)))["feature"]
    valid = ~pad
    torch.testing.assert_close(loss, F.mse_loss(s[valid], t[valid]))


def test_levels_choose_tokens_and_are_checked():
    torch.manual_seed(1)
    t, s = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    mem = _output(t).memory
    assert level_token_mask(mem, [1]).tolist() == [False] * 4 + [True] * 2
    assert level_token_mask(mem, [-2]).tolist() == [True] * 4 + [False] * 2
    loss = FitNet(4, 4, levels=[1])(_ctx(_output(t), _output(s)))["feature"]
    torch.testing.assert_close(loss, F.mse_loss(s[:, 4:], t[:, 4:]))
    with pytest.raises(ValueError, match=r"FitNet levels \[2\] out of range: the memory has 2 level"):
        FitNet(4, 4, levels=[2])(_ctx(_output(t), _output(s)))
    with pytest.raises(ConfigError, match=r"methods\.fitnet\.levels: expected"):
        method_options("fitnet", {"levels": "last"})


def test_batch_norm_option():
    torch.manual_seed(2)
    t, s = torch.randn(2, 6, 4) * 3 + 1, torch.randn(2, 6, 4)
    loss = FitNet(4, 4, normalise="batch_norm")(_ctx(_output(t), _output(s)))["feature"]
    torch.testing.assert_close(loss, F.mse_loss(token_batch_norm(s.flatten(0, 1)), token_batch_norm(t.flatten(0, 1))))


def test_zero_loss_for_identical_features():
    t = torch.randn(2, 6, 8)
    for normalise in ("none", "batch_norm"):
        assert FitNet(8, 8, normalise=normalise)(_ctx(_output(t), _output(t.clone())))["feature"].item() == 0.0


def test_connector_shapes_and_width_errors():
    assert FitNet(8, 8).connector is None
    assert isinstance(FitNet(8, 8, connector="always").connector, torch.nn.Linear)
    method = FitNet(4, 8)
    assert method.connector.in_features == 4 and method.connector.out_features == 8
    with pytest.raises(ValueError, match="student memory width 4 differs from the teacher's 8 and connector is 'none'"):
        FitNet(4, 8, connector="none")
    with pytest.raises(ConfigError, match=r"methods\.fitnet\.connector: expected one of 'auto', 'always', 'none'"):
        method_options("fitnet", {"connector": "yes"})
    with pytest.raises(ValueError, match="built for a student width 4, but the student memory has width 6"):
        method(_ctx(_output(torch.randn(1, 6, 8)), _output(torch.randn(1, 6, 6))))


def test_grid_mismatch_names_both_grids():
    with pytest.raises(ValueError, match=r"FitNet needs .* same token grid.*\[\[2, 2\], \[1, 2\]\].*\[\[1, 6\]\]"):
        FitNet(4, 4)(_ctx(_output(torch.randn(1, 6, 4)), _output(torch.randn(1, 6, 4), shapes=[[1, 6]])))


def test_gradients_reach_student_and_connector_only():
    t = torch.randn(2, 6, 8, requires_grad=True)
    s = torch.randn(2, 6, 4, requires_grad=True)
    method = FitNet(4, 8)
    method(_ctx(_output(t), _output(s)))["feature"].backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert method.connector.weight.grad.abs().sum() > 0


def test_distiller_step_with_connector_combined_with_global_alignment(two_image_batch):
    assert METHODS["fitnet"] is FitNet
    torch.manual_seed(0)
    teacher = build_detector("rt_detr", "tiny", 4)
    student = build_detector("rt_detr", "tiny", 4, num_queries=20, d_model=32)
    with pytest.raises(ConfigError, match=r"methods\.fitnet: .*valid options: weight, terms, levels, connector"):
        build_methods({"fitnet": {"level": [0]}}, student, teacher)
    methods, weights = build_methods({"fitnet": {"weight": 3.0}, "global_alignment": {"layers": "last"}},
                                     student, teacher)
    distiller = Distiller(student, teacher, methods, weights).train()
    assert set(distiller.trainable_modules()) == {"fitnet"}  # the connector is trained with the student
    loss, terms = distiller(two_image_batch)
    assert {"fitnet/feature", "global_alignment/l1"} <= set(terms) and terms["fitnet/feature"] > 0
    loss.backward()
    assert methods["fitnet"].connector.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
