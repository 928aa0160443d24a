"""Post-processing, COCO box evaluation (faster-coco-eval, pycocotools fallback), images/second.

Conventions: ``postprocess`` turns raw predictions into per-image detections in absolute xyxy
pixels of the sizes it is given. ``CocoEvaluator`` collects detections in the *original* image
coordinates as plain COCO result dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``)
so that they can be gathered across processes, and computes the 12 COCO stats.

COCO reports -1 for a metric that has no ground truth (e.g. ``aps`` when there are no small
objects); we keep that value as **-1.0** so that every returned value is a float.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import Tensor

from detrkd.box_ops import cxcywh_to_xyxy, xyxy_to_xywh

__all__ = ["STAT_NAMES", "CocoEvaluator", "detections", "evaluate", "postprocess"]

STAT_NAMES: tuple[str, ...] = ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar1", "ar10", "ar100", "ars", "arm", "arl")

Backend = Literal["auto", "faster_coco_eval", "pycocotools"]


# ---- post-processing ----------------------------------------------------------------------------



class NonFiniteDetections(ValueError):
    """A model produced NaN / inf detections (a diverged model), named instead of COCO's error."""

def _sizes_tensor(sizes: Tensor | Sequence[Sequence[int]], batch: int, device: torch.device) -> Tensor:
    sizes = torch.as_tensor(sizes, dtype=torch.float32, device=device)
    if sizes.shape != (batch, 2):
        raise ValueError(f"sizes must be [B, 2] (h, w) with B = {batch}, got shape {tuple(sizes.shape)}")
    return sizes


@torch.no_grad()
def postprocess(
    logits: Tensor,
    boxes: Tensor,
    sizes: Tensor | Sequence[Sequence[int]],
    class_head: Literal["softmax", "sigmoid"],
    top_k: int = 100,
) -> list[dict[str, Tensor]]:
    """Raw predictions -> per-image detections, sorted by decreasing score.

    logits: [B, Q, K] (softmax head: K = C + 1, last = no-object; sigmoid head: K = C)
    boxes:  [B, Q, 4] normalised cxcywh
    sizes:  [B, 2] (h, w) the boxes are scaled to (the original size for COCO evaluation)
    softmax: p = softmax over K without the last column; each query keeps its best class; the
             top_k queries by score are kept.
    sigmoid: p = sigmoid; the top_k (query, class) pairs over all Q * C are kept (Deformable
             DETR), so a query can appear with several classes.
    returns  B dicts: ``scores`` [k], ``labels`` [k] long (0..C-1), ``boxes`` [k, 4] absolute xyxy.
    """
    if logits.ndim != 3 or boxes.ndim != 3 or boxes.shape[-1] != 4 or logits.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"expected logits [B, Q, K] and boxes [B, Q, 4], got {tuple(logits.shape)} and {tuple(boxes.shape)}")
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    b, q, k = logits.shape
    scale = _sizes_tensor(sizes, b, logits.device).flip(-1).repeat(1, 2)  # (w, h, w, h)
    xyxy = cxcywh_to_xyxy(boxes.float()) * scale[:, None, :]
    logits = logits.float()
    if class_head == "softmax":
        if k < 2:
            raise ValueError(f"a softmax head needs K = C + 1 >= 2 logits, got K = {k}")
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # [B, Q]
        scores, query = scores.topk(min(top_k, q), dim=-1)
        labels = labels.gather(1, query)
    elif class_head == "sigmoid":
        scores, flat = logits.sigmoid().flatten(1).topk(min(top_k, q * k), dim=-1)  # [B, k]
        query, labels = flat // k, flat % k
    else:
        raise ValueError(f"class_head must be 'softmax' or 'sigmoid', got {class_head!r}")
    picked = xyxy.gather(1, query[..., None].expand(-1, -1, 4))
    return [{"scores": scores[i], "labels": labels[i], "boxes": picked[i]} for i in range(b)]


@torch.no_grad()
def detections(model: torch.nn.Module, pixel_values: Tensor, pixel_mask: Tensor,
               sizes: Tensor | Sequence[Sequence[int]], top_k: int = 100) -> list[dict[str, Tensor]]:
    """A detector's per-image detections on a ``collate`` batch, as ``postprocess`` returns them
    (boxes scaled to ``sizes`` [B, 2] (h, w)): a DETR adapter's final layer through ``postprocess``;
    a model with its own ``detect`` (the torchvision CNN students: their score threshold and NMS)
    through that."""
    detect = getattr(model, "detect", None)
    if callable(detect):
        return detect(pixel_values, pixel_mask, sizes)
    out = model(pixel_values, pixel_mask)
    return postprocess(out.predictions.logits[-1], out.predictions.boxes[-1], sizes, out.class_head, top_k)


# ---- COCO evaluation ------------------------------------------------------------------------------


def _backend_classes(backend: Backend) -> tuple[str, Any, Any]:
    if backend in ("auto", "faster_coco_eval"):
        try:
            from faster_coco_eval import COCO, COCOeval_faster

            return "faster_coco_eval", COCO, COCOeval_faster
        except ImportError:
            if backend == "faster_coco_eval":
                raise
    if backend in ("auto", "pycocotools"):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return "pycocotools", COCO, COCOeval
    raise ValueError(f"backend must be 'auto', 'faster_coco_eval' or 'pycocotools', got {backend!r}")


def _load_gt(coco_cls: Any, coco_gt: dict[str, Any]) -> Any:
    """A backend COCO object over a private copy of the GT (the backends add keys to it)."""
    gt = coco_cls()
    gt.dataset = copy.deepcopy(coco_gt)
    gt.createIndex()
    return gt


class CocoEvaluator:
    """Collects detections and computes COCO bbox stats.

    coco_gt: a COCO dict (``CocoDetection.coco_gt``) with ``area`` and ``iscrowd`` on annotations.
    cat_ids: category id of each contiguous label; default: the GT category ids, sorted (the
             ``CocoDetection`` remap).
    backend: "auto" = faster-coco-eval if importable, else pycocotools.

    State is two plain lists (``detections``: COCO result dicts; ``image_ids``: images evaluated,
    with or without detections) so that processes can gather and ``merge`` them. An image seen
    twice (e.g. padding of a distributed sampler) only counts once.
    """

    def __init__(self, coco_gt: dict[str, Any], cat_ids: Sequence[int] | None = None, backend: Backend = "auto"):
        self.coco_gt = coco_gt
        self.cat_ids = list(cat_ids) if cat_ids is not None else sorted(c["id"] for c in coco_gt["categories"])
        self.backend, self._coco_cls, self._eval_cls = _backend_classes(backend)
        self._gt_image_ids = {img["id"] for img in coco_gt["images"]}
        self._gt: Any = None
        self.reset()

    @classmethod
    def from_dataset(cls, dataset: Any, backend: Backend = "auto") -> "CocoEvaluator":
        """From anything with ``coco_gt`` and ``cat_ids`` (a ``CocoDetection``)."""
        return cls(dataset.coco_gt, dataset.cat_ids, backend)

    def reset(self) -> None:
        self.detections: list[dict[str, Any]] = []
        self.image_ids: list[int] = []
        self._seen: set[int] = set()

    def update(self, image_ids: Sequence[int], results: Sequence[dict[str, Tensor]]) -> None:
        """Add one batch. results[i] (from ``postprocess`` with the *original* sizes) holds
        ``scores`` [k], ``labels`` [k] contiguous, ``boxes`` [k, 4] absolute xyxy of the original image."""
        if len(image_ids) != len(results):
            raise ValueError(f"got {len(image_ids)} image ids but {len(results)} results")
        detections = []
        for image_id, res in zip(image_ids, results):
            image_id = int(image_id)
            if image_id not in self._gt_image_ids:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            if image_id in self._seen:
                continue
            self._seen.add(image_id)
            self.image_ids.append(image_id)
            detections.extend(self._to_coco(image_id, res))
        self.detections.extend(detections)

    def _to_coco(self, image_id: int, res: dict[str, Tensor]) -> list[dict[str, Any]]:
        labels = res["labels"].detach().cpu().long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.cat_ids)):
            raise ValueError(f"labels must be in [0, {len(self.cat_ids)}), got {labels.min()}..{labels.max()}")
        if not (torch.isfinite(res["scores"]).all() and torch.isfinite(res["boxes"]).all()):
            raise NonFiniteDetections(f"the model's detections on image {image_id} are NaN / inf: its weights or "
                                      f"BatchNorm statistics have diverged (lower the learning rate)")
        boxes = xyxy_to_xywh(res["boxes"].detach().cpu().double()).tolist()
        scores = res["scores"].detach().cpu().double().tolist()
        return [
            {"image_id": image_id, "category_id": self.cat_ids[label], "bbox": box, "score": score}
            for label, box, score in zip(labels.tolist(), boxes, scores)
        ]

    def state(self) -> dict[str, list]:
        """Plain, picklable state for gathering across processes."""
        return {"detections": list(self.detections), "image_ids": list(self.image_ids)}

    def merge(self, state: dict[str, list]) -> None:
        """Add another evaluator's ``state()``; images already seen here are skipped."""
        new = [i for i in dict.fromkeys(int(i) for i in state["image_ids"]) if i not in self._seen]
        keep = set(new)
        self._seen.update(new)
        self.image_ids.extend(new)
        self.detections.extend(d for d in state["detections"] if d["image_id"] in keep)

    def compute(self) -> dict[str, float]:
        """The 12 COCO stats over the images seen so far (-1.0 where COCO has no GT to score)."""
        if not self.image_ids:
            return {name: -1.0 for name in STAT_NAMES}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            if self._gt is None:
                self._gt = _load_gt(self._coco_cls, self.coco_gt)
            dt = self._load_results()
            coco_eval = self._eval_cls(self._gt, dt, "bbox")
            coco_eval.params.imgIds = sorted(self.image_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}

    def _load_results(self) -> Any:
        if self.detections:
            return self._gt.loadRes([dict(d) for d in self.detections])  # loadRes adds keys
        empty = {k: self._gt.dataset[k] for k in ("images", "categories")}
        return _load_gt(self._coco_cls, dict(empty, annotations=[]))


# ---- the evaluation loop ----------------------------------------------------------------------------


def _take(batch: dict[str, Any], n: int) -> dict[str, Any]:
    return {"pixel_values": batch["pixel_values"][:n], "pixel_mask": batch["pixel_mask"][:n], "labels": batch["labels"][:n]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    dataset: Any,
    device: str | torch.device = "cpu",
    max_images: int | None = None,
    progress: bool = False,
    top_k: int = 100,
    backend: Backend = "auto",
    gather: bool = False,
) -> dict[str, float]:
    """COCO-evaluate a detector on a loader of ``collate`` batches.

    model:   a ``DetrAdapter`` (already on ``device``): ``model(pixel_values, pixel_mask)`` ->
             ``DetectorOutput``; run in eval mode under ``torch.no_grad`` (its mode is restored).
    dataset: gives the GT (``coco_gt``, ``cat_ids``), e.g. the ``CocoDetection`` behind the loader.
    max_images: stop after this many images (the last batch is cut).
    gather:  data-parallel evaluation: every process passes a loader over its own shard; the
             detections are gathered on rank 0 once (``CocoEvaluator.merge``), the stats computed
             there and broadcast, so every process returns the same stats.
    returns  the COCO stats (``STAT_NAMES``) + ``images_per_sec`` (model forward + postprocess
             time only, not data loading; with ``gather``: all images / the slowest process's
             time) + ``num_images``.
    """
    evaluator = CocoEvaluator.from_dataset(dataset, backend)
    count, seconds = _detect(model, loader, evaluator, torch.device(device), max_images, progress, top_k)
    if not gather:
        return _stats(evaluator, count, seconds)
    from detrkd.distributed import broadcast_from_main, gather_to_main

    parts = gather_to_main((evaluator.state(), count, seconds))
    stats = None
    if parts is not None:
        for state, _, _ in parts[1:]:
            evaluator.merge(state)
        stats = _stats(evaluator, sum(p[1] for p in parts), max(p[2] for p in parts))
    return broadcast_from_main(stats)


def _stats(evaluator: CocoEvaluator, count: int, seconds: float) -> dict[str, float]:
    stats: dict[str, float] = evaluator.compute()
    stats["images_per_sec"] = count / seconds if seconds > 0 else 0.0
    stats["num_images"] = count
    return stats


def _detect(model: torch.nn.Module, loader: Iterable[dict[str, Any]], evaluator: CocoEvaluator,
            device: torch.device, max_images: int | None, progress: bool, top_k: int) -> tuple[int, float]:
    """Run the model over the loader into ``evaluator``; returns (images, model seconds)."""
    total = _progress_total(loader, max_images)
    bar = _progress_bar(progress, total)
    was_training = model.training
    model.eval()
    seconds, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in loader:
                if max_images is not None:
                    if count >= max_images:
                        break
                    batch = _take(batch, max_images - count)
                labels = batch["labels"]
                pixel_values = batch["pixel_values"].to(device, non_blocking=True)
                pixel_mask = batch["pixel_mask"].to(device, non_blocking=True)
                orig_sizes = torch.stack([t["orig_size"] for t in labels]).to(device)
                _sync(device)
                start = time.perf_counter()
                results = detections(model, pixel_values, pixel_mask, orig_sizes, top_k)
                _sync(device)
                seconds += time.perf_counter() - start
                evaluator.update([int(t["image_id"]) for t in labels], results)
                count += len(labels)
                if bar is not None:
                    bar.update(len(labels))
                if max_images is not None and count >= max_images:
                    break
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return count, seconds


def _progress_total(loader: Any, max_images: int | None) -> int | None:
    try:
        total = len(loader.dataset)
    except (AttributeError, TypeError):
        total = None
    if max_images is not None:
        total = max_images if total is None else min(total, max_images)
    return total


def _progress_bar(progress: bool, total: int | None) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="img")
