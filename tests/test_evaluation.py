"""Post-processing, COCO evaluator (both backends) and the evaluation loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from detrkd.box_ops import xywh_to_xyxy
from detrkd.data import CocoDetection, collate, make_transforms
from detrkd.evaluation import STAT_NAMES, CocoEvaluator, evaluate, postprocess
from detrkd.models.base import DetectorOutput, Predictions

BACKENDS = ["faster_coco_eval", "pycocotools"]

# ---- postprocess ------------------------------------------------------------------------------------


def test_postprocess_softmax():
    # Q = 3 queries, C = 2 classes + no-object
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 5.0], [0.0, 3.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5], [0.1, 0.2, 0.2, 0.2]]])
    (res,) = postprocess(logits, boxes, torch.tensor([[100, 200]]), "softmax")
    prob = logits[0].softmax(-1)
    # sorted by score: query 2 (class 1), query 0 (class 0), query 1 (class 1, no-object wins but is dropped)
    assert res["labels"].tolist() == [1, 0, 1]
    assert torch.allclose(res["scores"], torch.stack([prob[2, 1], prob[0, 0], prob[1, 1]]))
    expected = torch.tensor([[0.0, 10.0, 40.0, 30.0], [80.0, 30.0, 120.0, 70.0], [0.0, 0.0, 100.0, 50.0]])
    assert torch.allclose(res["boxes"], expected)
    (top1,) = postprocess(logits, boxes, [[100, 200]], "softmax", top_k=1)
    assert top1["labels"].tolist() == [1] and top1["boxes"].shape == (1, 4)


def test_postprocess_sigmoid_top_k_over_pairs():
    # Q = 2 queries, C = 3 classes: the 3 best (query, class) pairs are (1,2), (0,0), (1,0)
    logits = torch.tensor([[[2.0, -1.0, -3.0], [1.0, -2.0, 4.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.75, 0.5, 0.5]]])
    (res,) = postprocess(logits, boxes, torch.tensor([[10, 20]]), "sigmoid", top_k=3)
    assert res["labels"].tolist() == [2, 0, 0]
    assert torch.allclose(res["scores"], torch.sigmoid(torch.tensor([4.0, 2.0, 1.0])))
    q1, q0 = torch.tensor([0.0, 5.0, 10.0, 10.0]), torch.tensor([0.0, 0.0, 20.0, 10.0])
    assert torch.allclose(res["boxes"], torch.stack([q1, q0, q1]))
    (all_pairs,) = postprocess(logits, boxes, [[10, 20]], "sigmoid", top_k=100)
    assert len(all_pairs["scores"]) == 6  # capped at Q * C


def test_postprocess_batch_and_errors():
    logits, boxes = torch.randn(2, 4, 3), torch.rand(2, 4, 4)
    out = postprocess(logits, boxes, torch.tensor([[10, 10], [20, 40]]), "softmax")
    assert len(out) == 2 and all(r["scores"].shape == (4,) for r in out)
    assert (out[1]["scores"][:-1] >= out[1]["scores"][1:]).all()
    with pytest.raises(ValueError, match="sizes"):
        postprocess(logits, boxes, torch.tensor([[10, 10]]), "softmax")
    with pytest.raises(ValueError, match="class_head"):
        postprocess(logits, boxes, torch.tensor([[10, 10], [1, 1]]), "softplus")
    with pytest.raises(ValueError, match="logits"):
        postprocess(logits[0], boxes, torch.tensor([[10, 10], [1, 1]]), "softmax")


# ---- evaluator ----------------------------------------------------------------------------------------


def gt_dict() -> dict[str, Any]:
    """4 images, categories 3/7/42 (non-contiguous), small/medium/large boxes and a crowd region."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 320, "height": 240} for i in (1, 2, 5, 9)]
    boxes = [
        (1, 3, [10, 20, 50, 40]), (1, 7, [100, 100, 120, 100]), (1, 42, [5, 5, 20, 20]),
        (2, 3, [0, 0, 200, 150]), (2, 3, [210, 160, 60, 50]), (5, 42, [30, 30, 25, 25]),
        (5, 7, [150, 40, 100, 120]), (9, 7, [40, 60, 15, 30]),
    ]
    anns = [{"id": i + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, (im, c, b) in enumerate(boxes)]
    anns.append({"id": 100, "image_id": 9, "category_id": 42, "bbox": [200, 100, 100, 100], "area": 10000, "iscrowd": 1})
    cats = [{"id": c, "name": str(c)} for c in (42, 3, 7)]
    return {"images": images, "annotations": anns, "categories": cats}


CAT_IDS = [3, 7, 42]


def perfect_results(gt: dict[str, Any]) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
    ids, results = [], []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        ids.append(img["id"])
        results.append({
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([CAT_IDS.index(a["category_id"]) for a in anns], dtype=torch.long),
            "boxes": xywh_to_xyxy(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)),
        })
    return ids, results


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_detections_give_ap_one(backend):
    gt = gt_dict()
    ev = CocoEvaluator(gt, backend=backend)
    assert ev.cat_ids == CAT_IDS and ev.backend == backend
    ev.update(*perfect_results(gt))
    stats = ev.compute()
    assert list(stats) == list(STAT_NAMES)
    for name in ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar10", "ar100", "ars", "arm", "arl"):
        assert stats[name] == pytest.approx(1.0), name
    assert all(isinstance(v, float) for v in stats.values())
    # the detections are plain dicts in COCO format, with the original category ids
    assert {d["category_id"] for d in ev.detections} == {3, 7, 42}
    assert ev.detections[0]["bbox"] == [10.0, 20.0, 50.0, 40.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_lower_values(backend):
    gt = {"images": [{"id": 1, "width": 400, "height": 400, "file_name": "x"}],
          "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 1e4, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [200, 200, 100, 100], "area": 1e4, "iscrowd": 0}]}
    # one exact hit, one false positive, one object missed: recall 0.5 at precision 1 -> 51 of 101 points
    ev = CocoEvaluator(gt, backend=backend)
    ev.update([1], [{"scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0]),
                     "boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0], [300.0, 0.0, 350.0, 50.0]])}])
    stats = ev.compute()
    assert stats["ap"] == pytest.approx(51 / 101) and stats["ap50"] == pytest.approx(51 / 101)
    assert stats["ar100"] == pytest.approx(0.5)
    # both found, but one box has IoU 0.72: both hit at thresholds 0.50..0.70 (AP 1), only the exact
    # one at 0.75..0.95 (AP 51/101, as above)
    ev = CocoEvaluator(gt, backend=backend)
    ev.update([1], [{"scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0]),
                     "boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0], [200.0, 200.0, 300.0, 272.0]])}])
    stats = ev.compute()
    assert stats["ap50"] == pytest.approx(1.0) and stats["ap75"] == pytest.approx(51 / 101)
    assert stats["ap"] == pytest.approx((5 * 1.0 + 5 * 51 / 101) / 10)
    assert stats["ar100"] == pytest.approx((5 * 1.0 + 5 * 0.5) / 10)
    assert stats["aps"] == -1.0 and stats["apm"] == -1.0  # no small/medium GT: COCO's -1 is kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_detections_and_no_images(backend):
    ev = CocoEvaluator(gt_dict(), backend=backend)
    assert ev.compute() == {name: -1.0 for name in STAT_NAMES}  # nothing evaluated yet
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    ev.update([1, 2], [empty, empty])
    stats = ev.compute()
    assert stats["ap"] == 0.0 and stats["ar100"] == 0.0
    assert ev.detections == []


def test_evaluator_restricts_to_seen_images_and_merges():
    gt = gt_dict()
    ids, results = perfect_results(gt)
    ev = CocoEvaluator(gt)
    ev.update(ids[:1], results[:1])  # images 2, 5, 9 unseen: their GT does not count as missed
    assert ev.compute()["ap"] == pytest.approx(1.0)
    a, b = CocoEvaluator(gt), CocoEvaluator(gt)
    a.update(ids[:2], results[:2])
    b.update(ids[1:], results[1:])  # image 2 on both "processes" (sampler padding)
    b.update(ids[3:], [{k: v[:0] for k, v in results[3].items()}])  # a repeat is ignored
    state = json.loads(json.dumps(b.state()))  # plain, serialisable
    a.merge(state)
    assert sorted(a.image_ids) == [1, 2, 5, 9]
    assert len(a.detections) == sum(len(r["scores"]) for r in results)
    assert a.compute()["ap"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="image id 77"):
        a.update([77], results[:1])
    with pytest.raises(ValueError, match="labels"):
        CocoEvaluator(gt).update([1], [dict(results[0], labels=torch.tensor([0, 1, 3]))])


def test_faster_coco_eval_matches_pycocotools():
    gt = gt_dict()
    gen = torch.Generator().manual_seed(0)
    ids, results = [], []
    for img in gt["images"]:
        n = 30
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([300.0, 220.0])
        wh = torch.rand(n, 2, generator=gen) * 150 + 2
        near = [a["bbox"] for a in gt["annotations"] if a["image_id"] == img["id"]]
        jitter = [torch.tensor(b, dtype=torch.float32) + torch.randn(4, generator=gen) * 4 for b in near]
        xywh = torch.cat([torch.cat([xy, wh], 1), torch.stack(jitter)])
        ids.append(img["id"])
        results.append({"scores": torch.rand(len(xywh), generator=gen),
                        "labels": torch.randint(0, 3, (len(xywh),), generator=gen),
                        "boxes": xywh_to_xyxy(xywh)})
    stats = {}
    for backend in BACKENDS:
        ev = CocoEvaluator(gt, backend=backend)
        ev.update(ids, results)
        stats[backend] = ev.compute()
    assert 0 < stats["pycocotools"]["ap"] < 1
    for name in STAT_NAMES:
        assert stats["faster_coco_eval"][name] == pytest.approx(stats["pycocotools"][name], abs=1e-6), name


# ---- evaluate() ----------------------------------------------------------------------------------------------


class OracleModel(nn.Module):
    """Returns the GT of the next images as predictions (the loader's order is known)."""

    class_head = "softmax"

    def __init__(self, targets: list[dict[str, Any]], num_classes: int, num_queries: int = 4):
        super().__init__()
        self.targets, self.c, self.q = list(targets), num_classes, num_queries
        self.weight = nn.Parameter(torch.zeros(1))
        self.modes: list[bool] = []

    def forward(self, pixel_values, pixel_mask=None, labels=None, with_attention=False):
        self.modes.append(self.training)
        assert not torch.is_grad_enabled()
        b = pixel_values.shape[0]
        logits = torch.full((b, self.q, self.c + 1), -10.0)
        logits[..., -1] = 10.0
        boxes = torch.full((b, self.q, 4), 0.5)
        for i in range(b):
            t = self.targets.pop(0)
            n = len(t["class_labels"])
            logits[i, torch.arange(n), t["class_labels"]] = 20.0
            boxes[i, :n] = t["boxes"]
        preds = Predictions(logits[None], boxes[None])
        return DetectorOutput(predictions=preds, class_head=self.class_head, memory=None, queries=None)


def write_dataset(tmp_path: Path) -> CocoDetection:
    gt = gt_dict()
    root = tmp_path / "images"
    root.mkdir()
    for img in gt["images"]:
        Image.new("RGB", (img["width"], img["height"]), (90, 120, 30)).save(root / img["file_name"])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(gt))
    return CocoDetection(root, ann, transforms=make_transforms("val", 64))  # resized: size != orig_size


@pytest.mark.parametrize("was_training", [True, False])
def test_evaluate_end_to_end(tmp_path, was_training):
    ds = write_dataset(tmp_path)
    targets = [ds[i][1] for i in range(len(ds))]
    assert targets[0]["size"].tolist() == [64, 85]
    model = OracleModel(targets, ds.num_classes)
    model.train(was_training)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    stats = evaluate(model, loader, ds, progress=True)
    assert model.modes == [False, False] and model.training is was_training
    assert stats["num_images"] == 4 and stats["images_per_sec"] > 0
    # boxes went normalised -> original pixels; labels -> category ids (AP limited only by resize rounding)
    assert stats["ap50"] == pytest.approx(1.0) and stats["ap"] > 0.9
    assert set(STAT_NAMES) <= set(stats)


def test_evaluate_max_images(tmp_path):
    ds = write_dataset(tmp_path)
    model = OracleModel([ds[i][1] for i in range(len(ds))], ds.num_classes)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    stats = evaluate(model, loader, ds, max_images=2)
    assert stats["num_images"] == 2 and stats["ap"] == pytest.approx(1.0, abs=0.1)
    assert len(model.modes) == 1  # one batch of 3 cut to 2, the loop stopped there
