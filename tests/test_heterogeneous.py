"""KD-DETR heterogeneous distillation (a DETR teacher into a torchvision CNN student): top-k anchors per
GT as points, the same boxes decoded by the teacher (normalised, one query alone each), the student's
predictions there (Faster R-CNN: its RoI head; RetinaNet: its head at the anchor) with classes in
detrkd's order, zero loss for a teacher that agrees exactly, gradients into the student's backbone
and none into the teacher, weights, the methods a CNN student refuses; and FitNet on the FPN
(``fpn_fitnet``) reading the same image places whatever the two input grids."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from detrkd.box_ops import box_iou
from detrkd.cli import main
from detrkd.config import ConfigError, DistillConfig
from detrkd.distill.base import DistillContext, Distiller
from detrkd.distill.fpn_fitnet import FPNFitNet
from detrkd.distill.heterogeneous import HeterogeneousKDDETR, normalised_cxcywh, teacher_at_points, topk_points
from detrkd.distill.base import scaled_terms
from detrkd.distill.methods import build_methods, method_options
from detrkd.models import build_detector
from detrkd.models.base import Predictions
from detrkd.models.cnn import build_cnn_detector

C = 5
FAMILIES = ("faster_rcnn", "retinanet")


def _batch() -> dict:
    torch.manual_seed(3)
    labels = [{"class_labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.6, 0.2, 0.3]])},
              {"class_labels": torch.tensor([2]), "boxes": torch.tensor([[0.45, 0.5, 0.25, 0.35]])}]
    return {"pixel_values": torch.randn(2, 3, 64, 64), "pixel_mask": torch.ones(2, 64, 64, dtype=torch.long),
            "labels": labels}


def _student(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_cnn_detector(family, "tiny", C).train()


def _forward(student, batch):
    return student(batch["pixel_values"], batch["pixel_mask"], labels=batch["labels"])


# ---- points ----------------------------------------------------------------------------------------
def test_topk_points_are_the_highest_iou_candidates_of_each_gt_clipped_and_labelled():
    anchors = torch.tensor([[0., 0., 10., 10.], [5., 5., 25., 25.], [20., 20., 40., 40.], [-5., -5., 12., 12.]])
    targets = [{"boxes": torch.tensor([[0., 0., 10., 10.], [22., 22., 40., 40.]]), "labels": torch.tensor([3, 1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
               {"boxes": torch.tensor([[4., 4., 16., 16.]]), "labels": torch.tensor([2])}]
    points = topk_points([anchors] * 3, targets, [(32, 32), (32, 32), (32, 32)], k=2, label_offset=1)
    iou = box_iou(targets[0]["boxes"], anchors)
    assert points.image.tolist() == [0, 0, 0, 0, 2, 2]
    assert points.index[:4].tolist() == iou.topk(2, dim=1).indices.flatten().tolist() == [0, 3, 2, 1]
    assert points.label.tolist() == [2, 2, 0, 0, 1, 1]
    assert points.boxes[1].tolist() == [0., 0., 12., 12.] and points.boxes[2].tolist() == [20., 20., 32., 32.]
    empty = topk_points([anchors], [targets[1]], [(32, 32)], k=2)
    assert empty.image.numel() == 0 and empty.boxes.shape == (0, 4)


def test_the_teacher_decodes_the_normalised_points_alone_each():
    calls = {}

    class Recorder:
        def decode(self, out, boxes, self_attn_mask=None):
            calls.update(boxes=boxes, mask=self_attn_mask)
            b, m, _ = boxes.shape
            return Predictions(torch.arange(b * m * 2.0).view(1, b, m, 2), boxes[None])

    points_xyxy = torch.tensor([[0., 0., 32., 16.], [8., 8., 16., 16.], [0., 0., 64., 32.]])
    image = torch.tensor([0, 0, 1])
    queries = normalised_cxcywh(points_xyxy, image, [(32, 32), (32, 64)])
    torch.testing.assert_close(queries, torch.tensor([[0.5, .25, 1., .5], [.375, .375, .25, .25], [.5, .5, 1., 1.]]))
    ctx = SimpleNamespace(teacher=Recorder(), teacher_out=SimpleNamespace(memory=SimpleNamespace(tokens=torch.zeros(2, 1, 1))))
    logits, boxes = teacher_at_points(ctx, queries, image)
    assert calls["boxes"].shape == (2, 2, 4) and calls["boxes"][1, 1].tolist() == [0.5] * 4  # a padding slot
    assert calls["mask"].tolist() == [[False, True], [True, False]]
    assert logits.tolist() == [[0., 1.], [2., 3.], [4., 5.]]
    torch.testing.assert_close(boxes, queries)


# ---- student predictions ---------------------------------------------------------------------------
def test_faster_rcnn_points_read_the_roi_head_with_the_background_last():
    student, batch = _student("faster_rcnn"), _batch()
    out = _forward(student, batch)
    points = topk_points(out.anchors, out.targets, out.image_sizes, 3, student.label_offset)
    logits, boxes = student.predict_points(out, points)
    heads = student.model.roi_heads
    per_image = list(points.boxes.split(torch.bincount(points.image).tolist()))
    raw, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(out.features, per_image, out.image_sizes)))
    torch.testing.assert_close(logits, torch.cat((raw[:, 1:], raw[:, :1]), 1))  # [real classes..., background]
    at_class = heads.box_coder.decode(deltas, per_image)[torch.arange(len(points.label)), points.label + 1]
    torch.testing.assert_close(boxes, at_class)
    assert points.label.tolist()[:3] == [1, 1, 1]  # detrkd labels (torchvision's minus 1)


def test_retinanet_points_read_the_head_at_their_anchor():
    student, batch = _student("retinanet"), _batch()
    out = _forward(student, batch)
    points = topk_points(out.anchors, out.targets, out.image_sizes, 3)
    logits, boxes = student.predict_points(out, points)
    p = 4  # one point, checked by hand
    b, a = int(points.image[p]), int(points.index[p])
    torch.testing.assert_close(logits[p], out.head_outputs["cls_logits"][b, a])
    want = student.model.box_coder.decode_single(out.head_outputs["bbox_regression"][b, a][None], out.anchors[b][a][None])
    torch.testing.assert_close(boxes[p], want[0])


# ---- the loss --------------------------------------------------------------------------------------
class Mirror:
    """A sigmoid "teacher" whose prediction at a query box is the student's own prediction there."""

    class_head = "sigmoid"

    def __init__(self, student, out):
        self.student, self.out = student, out

    def decode(self, _, boxes, self_attn_mask=None):
        b, m, _ = boxes.shape
        sizes = torch.tensor(self.out.image_sizes, dtype=torch.float32)  # (h, w)
        scale = sizes.flip(-1).repeat(1, 2)[:, None]  # [B, 1, 4]
        cx, cy, w, h = (boxes * scale).unbind(-1)
        xyxy = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1).flatten(0, 1)  # [B * M, 4]
        image = torch.arange(b).repeat_interleave(m)
        index = self._anchor(xyxy, image) if self.student.family == "retinanet" else image
        points = SimpleNamespace(image=image, index=index, boxes=xyxy, label=torch.zeros_like(image))
        logits, pred = self.student.predict_points(self.out, points)
        real = logits[:, :-1] if self.student.class_head == "softmax" else logits
        return Predictions(real.view(1, b, m, -1), normalised_cxcywh(pred, image, self.out.image_sizes).view(1, b, m, 4))

    def _anchor(self, xyxy, image):
        anchors = torch.stack(self.out.anchors)[image]  # [B * M, A, 4]
        return (anchors - xyxy[:, None]).abs().sum(-1).argmin(-1)


def _class_agnostic(student):
    """Every class regresses the same box (so the mirror's class choice does not matter)."""
    bbox = student.model.roi_heads.box_predictor.bbox_pred
    with torch.no_grad():
        bbox.weight.copy_(bbox.weight[:4].repeat(C + 1, 1))
        bbox.bias.copy_(bbox.bias[:4].repeat(C + 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_teacher_that_agrees_exactly_gives_zero_loss(family):
    student, batch = _student(family), _batch()
    if family == "faster_rcnn":
        _class_agnostic(student)
    out = _forward(student, batch)
    ctx = DistillContext(student, Mirror(student, out), out,
                         SimpleNamespace(memory=SimpleNamespace(tokens=torch.zeros(2, 1, 1)), class_head="sigmoid"),
                         batch["labels"])
    method = HeterogeneousKDDETR(student=student)
    terms = method(ctx)
    assert set(terms) == {"cls", "l1", "giou"}
    for name, value in terms.items():
        assert abs(value.item()) < 1e-5, (name, value.item())
    pairs = method.aligned(ctx)
    assert pairs.student_logits.shape[0] == 30  # 3 GT x k = 10
    other = _student(family, seed=1)  # a teacher that disagrees: every term positive
    disagree = method(DistillContext(student, Mirror(other, _forward(other, batch)), out, ctx.teacher_out, ctx.targets))
    assert all(v.item() > 1e-4 for v in disagree.values()), disagree


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(7)
    return build_detector("rt_detr", "tiny", C)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_the_student_backbone_and_not_the_teacher(family, teacher):
    student, batch = _student(family), _batch()
    methods, weights = build_methods({"kd_detr_hetero": {"weight": 1.0}}, student, teacher)
    distiller = Distiller(student, teacher, methods, weights).train()
    loss, terms = distiller(batch)
    scaled = {"kd_detr_hetero/cls", "kd_detr_hetero/l1", "kd_detr_hetero/giou"}
    assert {"det/loss", *scaled, *(f"{k}:unscaled" for k in scaled)} == set(terms)
    assert all(torch.isfinite(v) and v.item() > 0 for v in terms.values())
    kd = sum(terms[k] for k in scaled)
    kd.backward()  # the distillation terms alone
    assert student.model.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


def test_the_distiller_weighs_the_unweighted_terms(teacher):
    student, batch = _student("retinanet"), _batch()
    out = _forward(student, batch)
    with torch.no_grad():
        t_out = teacher(batch["pixel_values"], batch["pixel_mask"])
    ctx = DistillContext(student, teacher, out, t_out, batch["labels"])
    method = HeterogeneousKDDETR(student=student)
    _, weights = method_options("kd_detr_hetero", {"terms": {"l1": 2.0}})
    assert weights.terms == {"cls": 1.0, "l1": 2.0, "giou": 2.0} and HeterogeneousKDDETR.terms["l1"] == 5.0
    torch.manual_seed(0)
    raw = method(ctx)
    weighted = scaled_terms("kd_detr_hetero", raw, weights)
    for name in raw:
        torch.testing.assert_close(weighted[f"kd_detr_hetero/{name}"], weights.terms[name] * raw[name])
    empty = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    none = _forward(student, {**batch, "labels": empty})
    zero = method(DistillContext(student, teacher, none, t_out, empty))
    assert all(v.item() == 0.0 and v.requires_grad for v in zero.values())


@pytest.mark.parametrize("options, message", [
    ({"k": 0}, "k must be >= 1"),
    ({"points": "proposals"}, "proposals needs a faster_rcnn student"),
])
def test_bad_options_name_what_is_wrong(options, message):
    with pytest.raises(ValueError, match=None) as info:
        HeterogeneousKDDETR(student=build_cnn_detector("retinanet", "tiny", C), **options)
    assert message in str(info.value)


@pytest.mark.parametrize("options, message", [
    ({"terms": {"box": 1.0}}, "methods.kd_detr_hetero.terms: unknown term(s) ['box']"),
    ({"points": "queries"}, "methods.kd_detr_hetero.points: expected one of 'anchors', 'proposals'"),
    ({"weights": {"l1": 2.0}}, "methods.kd_detr_hetero.weights: per-term weights are methods.kd_detr_hetero.terms"),
])
def test_bad_config_options_are_config_errors(options, message):
    with pytest.raises(ConfigError) as info:
        method_options("kd_detr_hetero", options)
    assert message in str(info.value)


def test_faster_rcnn_proposals_are_points_too(teacher):
    student, batch = _student("faster_rcnn"), _batch()
    out = _forward(student, batch)
    method = HeterogeneousKDDETR(student=student, points="proposals")
    with torch.no_grad():
        ctx = DistillContext(student, teacher, out, teacher(batch["pixel_values"]), batch["labels"])
    points = method.distillation_points(ctx)
    assert len(points.image) == 30 and all(torch.isfinite(v) for v in method(ctx).values())
    chosen = torch.stack([out.proposals[b][a] for b, a in zip(points.image.tolist(), points.index.tolist())])
    assert torch.equal(chosen, points.boxes)  # the RPN's own (already clipped) boxes


# ---- which methods fit a CNN student ------------------------------------------------------------
def test_methods_that_need_a_detr_student_are_refused_in_one_line(teacher):
    cnn = build_cnn_detector("faster_rcnn", "tiny", C)
    with pytest.raises(ConfigError) as info:
        build_methods({"agfd": {}, "kd_detr": {}, "kd_detr_hetero": {}}, cnn, teacher)
    text = str(info.value)
    assert "methods ['agfd', 'kd_detr'] need a DETR student" in text and "distils with ['fpn_fitnet', 'kd_detr_hetero']" in text
    assert "\n" not in text
    with pytest.raises(ConfigError, match=r"methods \['kd_detr_hetero'\] need a torchvision CNN student"):
        build_methods({"kd_detr_hetero": {}}, build_detector("rt_detr", "tiny", C), teacher)


def test_distill_cli_with_a_cnn_student(tmp_path, capsys):
    from detrkd.data.digits import make_digits_dataset
    from detrkd.models import save_detector

    make_digits_dataset(tmp_path / "data", train_images=4, val_images=2, image_size=64)
    save_detector(build_detector("rt_detr", "tiny", 10), tmp_path / "teacher")
    common = ["distill", "--teacher", str(tmp_path / "teacher"), "--student", "retinanet:tiny", "--data",
              str(tmp_path / "data"), "--no-progress", "--set", "data.image_size=64", "--set", "optim.max_steps=1",
              "--set", "log_every_steps=1"]
    assert main([*common, "--method", "qskd", "--output-dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("detrkd: error: methods ['agfd', 'lapd'] need a DETR student")
    assert main([*common, "--method", "kd_detr_hetero", "--output-dir", str(tmp_path / "run")]) == 0
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"kd_detr_hetero/giou"' in log and '"det/loss"' in log


# ---- FitNet on the FPN ---------------------------------------------------------------------------
def _memory(levels: list[torch.Tensor], padding: list[torch.Tensor] | None = None):
    """An EncoderMemory of per-level maps [B, D, H, W] (and [B, H, W] padding masks)."""
    from detrkd.models.base import EncoderMemory

    shapes = torch.tensor([list(f.shape[-2:]) for f in levels])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in levels], 1)
    pad = (torch.cat([p.flatten(1) for p in padding], 1) if padding is not None
           else torch.zeros(tokens.shape[:2], dtype=torch.bool))
    return SimpleNamespace(memory=EncoderMemory(tokens, shapes, starts, pad))


def test_fpn_fitnet_reads_the_student_exactly_on_a_shared_grid():
    student, batch = _student("faster_rcnn"), _batch()
    out = _forward(student, batch)
    teacher_out = _memory([out.features["1"].detach(), out.features["2"].detach()])  # strides 8, 16
    method = FPNFitNet(student, student.hidden_size)
    assert method.connector is None
    ctx = DistillContext(student, None, out, teacher_out, batch["labels"])
    assert method(ctx)["feature"].item() < 1e-10
    moved = _memory([out.features["1"].detach().roll(1, -1), out.features["2"].detach()])
    loss = method(DistillContext(student, None, out, moved, batch["labels"]))["feature"]
    assert loss.item() > 1e-3
    loss.backward()
    assert student.model.backbone.body.conv1.weight.grad.abs().sum() > 0


def test_fpn_fitnet_compares_the_same_image_places_across_input_sizes():
    """A student map linear in the image position, sampled for a teacher grid of another size (6 x 6
    tokens over the image vs the student's 8 x 8 at stride 8) reads the same position's value; the
    teacher's padding tokens are left out."""
    def position_map(rows: int, cols: int, h_valid: int, w_valid: int) -> torch.Tensor:
        v = (torch.arange(rows) + 0.5) / h_valid
        u = (torch.arange(cols) + 0.5) / w_valid
        return torch.stack((u[None].expand(rows, -1), v[:, None].expand(-1, cols)))[None]  # [1, 2, rows, cols]

    student_map = position_map(8, 8, 8, 8)  # a 64 px student image at stride 8 (no padding)
    out = SimpleNamespace(features={"0": torch.zeros(1, 2, 16, 16), "1": student_map.requires_grad_(),
                                    "2": torch.zeros(1, 2, 4, 4)}, padded_size=(64, 64), image_sizes=[(64, 64)])
    teacher_map = position_map(7, 7, 6, 6)  # 6 x 6 real tokens, one padded row / column
    padding = torch.zeros(1, 7, 7, dtype=torch.bool)
    padding[:, 6], padding[:, :, 6] = True, True
    teacher_map[..., 6, :], teacher_map[..., :, 6] = 9.0, 9.0  # garbage in the padding
    method = FPNFitNet(2, 2)
    ctx = DistillContext(None, None, out, _memory([teacher_map], [padding]), [])
    assert method(ctx)["feature"].item() < 1e-10


def test_fpn_fitnet_builds_from_the_config_with_a_connector(teacher):
    student = build_cnn_detector("retinanet", "tiny", C)
    methods, _ = build_methods({"fpn_fitnet": {"weight": 50.0, "levels": [0, -1]}}, student, teacher)
    method = methods["fpn_fitnet"]
    assert (method.connector.in_features, method.connector.out_features) == (32, teacher.hidden_size)
    batch = _batch()
    with torch.no_grad():
        t_out = teacher(batch["pixel_values"])
    loss = method(DistillContext(student, teacher, _forward(student, batch), t_out, batch["labels"]))["feature"]
    assert torch.isfinite(loss) and loss.item() > 0
    with pytest.raises(ValueError, match=r"levels \[5\] out of range: the teacher memory has 3 level"):
        FPNFitNet(student, teacher, levels=[5]).chosen(3)


def test_init_from_teacher_with_a_cnn_student_is_refused_up_front():
    """A DETR teacher's tensors have no counterpart in a torchvision CNN: asking to copy them is a
    one-line ConfigError before anything is loaded, not a run that silently copied nothing."""
    from detrkd.config import load_config as load
    from detrkd.recipe import check_distill_config

    raw = {"model": {"family": "faster_rcnn", "preset": "tiny"}, "data": {"root": "nowhere"},
           "teacher": "t.pt", "methods": {"kd_detr_hetero": {}}, "init_from_teacher": True}
    with pytest.raises(ConfigError, match="init_from_teacher copies a DETR teacher's tensors"):
        check_distill_config(load(raw, schema=DistillConfig))
    check_distill_config(load({**raw, "init_from_teacher": False}, schema=DistillConfig))
