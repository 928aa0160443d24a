"""Analyses of a trained detector's queries (``detrkd analyze``): QSKD's Table 1 and Fig. 1 / 4.

- ``gqs_statistics(model, loader, threshold)``: Group Query Selection (``detrkd.distill.
  query_selection``) of the final-layer predictions against the GT over a whole split, and the mean
  number of queries per GT with GIoU metric G >= 0.75 / 0.5 / 0.3 / 0.1 / 0.0 / -inf (Table 1).
  Counts and GTs are summed over batches (``count_queries_per_gt``) and divided once at the end,
  so the value is a mean over all GTs of the split, not a mean of batch means.
- ``draw_query_selection(...)``: for one image and one GT, panels with the image, the GT box and
  the box of (a) the GT's positive query, (b) its hard negatives with the highest G, (c) its easy
  negatives with the lowest G (as in Fig. 1 / 4), each with that query's first-decoder-layer
  cross-attention as a heatmap, and (d) the image's AGFD foreground mask
  W = 1/|I~| sum_{i in I~} (1 + G_i) A_i over all selected queries (QSKD Eq. 4, computed by
  ``detrkd.distill.agfd.foreground_mask``).

Attention maps over a multi-level memory are drawn as the sum of the levels after resizing each
to the finest level's grid, every level rescaled so it keeps its attention mass (a level token
covers (H_0 W_0) / (H_l W_l) finest cells); the grid covers the padded input, so the un-padded
part is cropped and then resized to the image. Each panel's heatmap is scaled to its own maximum.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from detrkd.distill.query_selection import (TABLE1_THRESHOLDS, QuerySelection, count_queries_per_gt,
                                            group_query_selection)
from detrkd.matching import head_probabilities, matcher_costs

KIND_COLOURS = {"positive": "lime", "hard negative": "yellow", "easy negative": "magenta"}


# ---- Table 1 -----------------------------------------------------------------------------------
def gqs_statistics(
    model: Any,
    loader: Iterable[dict[str, Any]],
    threshold: float = 0.0,
    *,
    thresholds: Sequence[float] = TABLE1_THRESHOLDS,
    max_images: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """QSKD Table 1 for ``model`` (a ``DetrAdapter`` on ``device``) over ``loader``'s batches.

    Runs the model in eval mode under ``no_grad`` (its mode is restored), GQS of the final-layer
    predictions at the hard-negative ``threshold``, and returns
    ``queries_per_gt`` {t: total queries in a GT's group with G >= t / total GTs} (NaN without GT),
    ``counts`` {t: total queries}, ``thresholds``, ``threshold``, ``images``, ``images_with_gt``,
    ``num_gt``, ``num_queries`` (Q), and at ``threshold``: ``positives_per_gt``,
    ``hard_negatives_per_gt`` and ``selected_per_gt`` (positives + hard negatives, G > threshold).
    """
    counts = torch.zeros(len(thresholds), dtype=torch.long)
    totals = {"images": 0, "images_with_gt": 0, "num_gt": 0, "positive": 0, "hard_negative": 0}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _batches(loader, max_images, progress):
                sel = _select(model, batch, threshold, device)
                batch_counts, num_gt = count_queries_per_gt(sel, thresholds)
                counts += batch_counts.cpu()
                _accumulate(totals, sel, num_gt)
    finally:
        model.train(was_training)
    return _summary(counts, totals, thresholds, threshold, model.num_queries)


def _batches(loader: Iterable[dict[str, Any]], max_images: int | None,
             progress: bool) -> Iterable[dict[str, Any]]:
    """``loader``'s batches, the last one cut so that at most ``max_images`` images are seen."""
    seen = 0
    bar = _progress_bar(progress, loader, max_images)
    try:
        for batch in loader:
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None and seen + len(batch["labels"]) > max_images:
                keep = max_images - seen
                batch = {"pixel_values": batch["pixel_values"][:keep],
                         "pixel_mask": batch["pixel_mask"][:keep], "labels": batch["labels"][:keep]}
            seen += len(batch["labels"])
            yield batch
            if bar is not None:
                bar.update(len(batch["labels"]))
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(progress: bool, loader: Any, max_images: int | None) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    total = len(getattr(loader, "dataset", ())) or None
    if max_images is not None:
        total = max_images if total is None else min(total, max_images)
    return tqdm(total=total, desc="gqs", unit="img")


def _select(model: Any, batch: dict[str, Any], threshold: float,
            device: str | torch.device) -> QuerySelection:
    """GQS of the final-layer predictions of one ``collate`` batch."""
    targets = [{"class_labels": t["class_labels"].to(device), "boxes": t["boxes"].to(device)}
               for t in batch["labels"]]
    out = model(batch["pixel_values"].to(device), batch["pixel_mask"].to(device))
    return group_query_selection(out.predictions.logits[-1], out.predictions.boxes[-1], targets,
                                 out.class_head, threshold, costs=matcher_costs(model.config))


def _accumulate(totals: dict[str, int], sel: QuerySelection, num_gt: int) -> None:
    """Add one batch's image, GT, positive and hard-negative counts to ``totals``."""
    totals["images"] += int(sel.num_gt.numel())
    totals["images_with_gt"] += int((sel.num_gt > 0).sum())
    totals["num_gt"] += num_gt
    totals["positive"] += int(sel.positive.sum())
    totals["hard_negative"] += int(sel.hard_negative.sum())


def _summary(counts: Tensor, totals: dict[str, int], thresholds: Sequence[float], threshold: float,
             num_queries: int) -> dict[str, Any]:
    """The statistics dict of ``gqs_statistics`` from the accumulated sums."""
    num_gt = totals["num_gt"]

    def per_gt(total: int) -> float:
        return total / num_gt if num_gt else math.nan

    return {
        "thresholds": tuple(float(t) for t in thresholds),
        "queries_per_gt": {float(t): per_gt(int(c)) for t, c in zip(thresholds, counts.tolist())},
        "counts": {float(t): int(c) for t, c in zip(thresholds, counts.tolist())},
        "threshold": float(threshold),
        "images": totals["images"],
        "images_with_gt": totals["images_with_gt"],
        "num_gt": num_gt,
        "num_queries": int(num_queries),
        "positives_per_gt": per_gt(totals["positive"]),
        "hard_negatives_per_gt": per_gt(totals["hard_negative"]),
        "selected_per_gt": per_gt(totals["positive"] + totals["hard_negative"]),
    }


def threshold_label(t: float) -> str:
    """``0.75`` -> ``"0.75"``, ``-inf`` -> ``"-inf"`` (JSON keys and table headers)."""
    return "-inf" if t == -math.inf else f"{t:g}" if t != 0 else "0.0"


def statistics_to_json(stats: dict[str, Any]) -> dict[str, Any]:
    """``gqs_statistics``'s dict with string threshold keys and NaN as None (valid JSON)."""
    def clean(v: float) -> float | None:
        return None if isinstance(v, float) and math.isnan(v) else v

    out = {k: clean(v) for k, v in stats.items() if k not in ("thresholds", "queries_per_gt", "counts")}
    out["thresholds"] = [threshold_label(t) for t in stats["thresholds"]]
    out["values"] = {threshold_label(t): clean(v) for t, v in stats["queries_per_gt"].items()}
    out["counts"] = {threshold_label(t): c for t, c in stats["counts"].items()}
    return out


def format_statistics(stats: dict[str, Any]) -> str:
    """The Table 1 row (queries per GT by GIoU threshold) and a line of totals."""
    labels = [threshold_label(t) for t in stats["thresholds"]]
    values = ["n/a" if math.isnan(v) else f"{v:.2f}" for v in stats["queries_per_gt"].values()]
    width = max(6, *(len(s) + 1 for s in labels + values))
    head = "GIoU >=      " + "".join(f"{s:>{width}}" for s in labels)
    row = "queries/GT   " + "".join(f"{s:>{width}}" for s in values)
    sel = stats["selected_per_gt"]
    tail = (f"{stats['images']} images ({stats['images_with_gt']} with GT), {stats['num_gt']} GTs, "
            f"{stats['num_queries']} queries per image; GQS at G > {stats['threshold']:g}: "
            + ("n/a" if math.isnan(sel) else
               f"{stats['positives_per_gt']:.2f} positive + {stats['hard_negatives_per_gt']:.2f} "
               f"hard negative = {sel:.2f} selected queries per GT"))
    return "\n".join((head, row, tail))


# ---- attention maps ----------------------------------------------------------------------------
def attention_to_image(attn: Tensor, spatial_shapes: Tensor, level_start: Tensor,
                       input_hw: tuple[int, int], valid_hw: tuple[int, int],
                       out_hw: tuple[int, int]) -> Tensor:
    """One attention row over the memory tokens [N] -> a map [out_h, out_w] over the image.

    Levels are summed on the finest level's grid, each rescaled to keep its mass (module
    docstring); the grid spans the padded input ``input_hw``, of which the top-left ``valid_hw``
    is the image; that part is resized to ``out_hw`` (the displayed image's (h, w)).
    """
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    fine = max(shapes, key=lambda s: s[0] * s[1])
    total = attn.new_zeros(fine, dtype=torch.float32)
    for (h, w), start in zip(shapes, level_start.tolist()):
        level = attn[start:start + h * w].float().reshape(1, 1, h, w)
        level = level * (h * w) / (fine[0] * fine[1])
        total += F.interpolate(level, size=fine, mode="bilinear", align_corners=False)[0, 0]
    crop_h = max(1, math.ceil(fine[0] * valid_hw[0] / input_hw[0]))
    crop_w = max(1, math.ceil(fine[1] * valid_hw[1] / input_hw[1]))
    cropped = total[:crop_h, :crop_w][None, None]
    return F.interpolate(cropped, size=out_hw, mode="bilinear", align_corners=False)[0, 0].clamp(min=0)


# ---- Fig. 1 / 4 --------------------------------------------------------------------------------
def largest_gt(target: dict[str, Any]) -> int:
    """Index of the GT box with the largest area (normalised cxcywh boxes)."""
    boxes = target["boxes"]
    if len(boxes) == 0:
        raise ValueError(f"image {target.get('image_id', '?')} has no ground-truth objects to analyse")
    return int((boxes[:, 2] * boxes[:, 3]).argmax())


def pick_queries(sel: QuerySelection, gt_index: int, num_hard: int, num_easy: int) -> dict[str, list[int]]:
    """Image 0's queries of one GT: its positive, the ``num_hard`` hard negatives with the highest
    G and the ``num_easy`` easy negatives with the lowest G (the paper's Fig. 1 columns)."""
    g = sel.giou[0]
    hard = sel.group_indices("hard_negative")[0][gt_index]
    easy = sel.group_indices("easy_negative")[0][gt_index]
    positive = int(sel.positive_index[0, gt_index])
    return {
        "positive": [positive] if positive >= 0 else [],
        "hard negative": hard[g[hard].argsort(descending=True, stable=True)][:num_hard].tolist(),
        "easy negative": easy[g[easy].argsort(stable=True)][:num_easy].tolist(),
    }


def draw_query_selection(
    model: Any,
    image_tensor_batch: Tensor,
    target: dict[str, Any],
    image_rgb: Any,
    gt_index: int | None,
    out_path: str | Path,
    *,
    pixel_mask: Tensor | None = None,
    threshold: float = 0.0,
    num_hard: int = 3,
    num_easy: int = 2,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Draw QSKD's Fig. 1 / 4 for one image and one GT into ``out_path`` (PNG); returns a summary.

    image_tensor_batch: [1, 3, H, W] model input (``collate`` of the dataset item; [3, H, W] is
    accepted); target: that item's target (normalised cxcywh ``boxes``, ``class_labels``,
    ``size``); image_rgb: the image to draw on (PIL or HxWx3 array, any size: boxes are
    normalised); gt_index: the GT to analyse, None = the largest; pixel_mask: [1, H, W], default
    = ones over ``target["size"]``. Summary: ``gt_index``, ``threshold``, ``queries`` (kind, query,
    G, score per panel) and ``selected`` (|I~| of the image).
    """
    pixel_values = image_tensor_batch if image_tensor_batch.ndim == 4 else image_tensor_batch[None]
    gt_index = _check_gt_index(target, gt_index)
    mask = pixel_mask if pixel_mask is not None else _pixel_mask(pixel_values, target)
    out, sel = _forward_with_attention(model, pixel_values, mask, target, threshold, device)
    scores = head_probabilities(out.predictions.logits[-1][0], out.class_head)
    if out.class_head == "softmax":
        scores = scores[..., :-1]
    picked = pick_queries(sel, gt_index, num_hard, num_easy)
    image = _as_array(image_rgb)
    to_image = _map_maker(out.memory, pixel_values.shape[-2:], target, image.shape[:2])
    panels = [_query_panel(kind, q, out, sel, scores, to_image) if q is not None else _missing_panel(kind, threshold)
              for kind, qs in picked.items() for q in (qs or [None])]
    mask_map = to_image(image_agfd_mask(out, sel)[0])
    panels.append({"kind": "mask", "map": mask_map, "selected": int(sel.selected[0].sum())})
    _render(image, panels, target, gt_index, threshold, out_path)
    queries = [{k: p[k] for k in ("kind", "query", "giou", "score")} for p in panels if "query" in p]
    return {"gt_index": gt_index, "threshold": float(threshold), "queries": queries,
            "selected": int(sel.selected[0].sum())}


def image_agfd_mask(out: Any, sel: QuerySelection) -> Tensor:
    """QSKD Eq. 4, W [B, N] = 1/|I~| sum_{i in I~} (1 + G_i) A_i over the GQS-selected queries,
    with AGFD's own ``foreground_mask`` (``detrkd.distill.agfd``, the mask the distillation uses)."""
    from detrkd.distill.agfd import chosen_queries, foreground_mask

    return foreground_mask(out.cross_attention.float(), chosen_queries(sel, "gqs"), sel.giou,
                           out.memory.padding_mask)


def _check_gt_index(target: dict[str, Any], gt_index: int | None) -> int:
    """``gt_index`` checked against the image's GT count (None -> the largest GT)."""
    if gt_index is None:
        return largest_gt(target)
    n = len(target["boxes"])
    if not 0 <= gt_index < n:
        raise ValueError(f"gt index {gt_index} is out of range: image {target.get('image_id', '?')} "
                         f"has {n} ground-truth object(s) (valid: 0..{n - 1})" if n else
                         f"gt index {gt_index} is out of range: image {target.get('image_id', '?')} "
                         "has no ground-truth objects")
    return gt_index


def _pixel_mask(pixel_values: Tensor, target: dict[str, Any]) -> Tensor:
    """[1, H, W] long: 1 over the un-padded ``target["size"]`` region at the top left."""
    mask = torch.zeros(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.long)
    h, w = (int(v) for v in target.get("size", pixel_values.shape[-2:]))
    mask[:, :h, :w] = 1
    return mask


def _forward_with_attention(model: Any, pixel_values: Tensor, pixel_mask: Tensor,
                            target: dict[str, Any], threshold: float,
                            device: str | torch.device) -> tuple[Any, QuerySelection]:
    """(``DetectorOutput`` with cross-attention, GQS) for one image, eval mode, no grad."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(pixel_values.to(device), pixel_mask.to(device), with_attention=True)
            gt = [{"class_labels": target["class_labels"].to(device), "boxes": target["boxes"].to(device)}]
            sel = group_query_selection(out.predictions.logits[-1], out.predictions.boxes[-1], gt,
                                        out.class_head, threshold, costs=matcher_costs(model.config))
    finally:
        model.train(was_training)
    return out, sel


def _as_array(image_rgb: Any) -> Any:
    """A PIL image or array -> HxWx3 uint8 numpy array."""
    import numpy as np

    array = np.asarray(image_rgb.convert("RGB") if hasattr(image_rgb, "convert") else image_rgb)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image_rgb must be an RGB image (H x W x 3), got shape {array.shape}")
    return array


def _map_maker(memory: Any, input_hw: Sequence[int], target: dict[str, Any], out_hw: Sequence[int]) -> Any:
    """``tokens [N] -> numpy map over the displayed image`` for this image's memory geometry."""
    valid = tuple(int(v) for v in target.get("size", input_hw))
    shapes, starts = memory.spatial_shapes.cpu(), memory.level_start.cpu()

    def to_image(row: Tensor) -> Any:
        return attention_to_image(row.cpu(), shapes, starts, tuple(int(v) for v in input_hw), valid,
                                  (int(out_hw[0]), int(out_hw[1]))).numpy()

    return to_image


def _query_panel(kind: str, query: int, out: Any, sel: QuerySelection, scores: Tensor, to_image: Any) -> dict[str, Any]:
    """One query's panel: its attention map, predicted box, G and score."""
    return {"kind": kind, "query": query, "giou": float(sel.giou[0, query]),
            "score": float(scores[query].max()), "box": out.predictions.boxes[-1][0, query].cpu().tolist(),
            "map": to_image(out.cross_attention[0, query])}


def _missing_panel(kind: str, threshold: float) -> dict[str, Any]:
    """A placeholder panel saying that this GT has no query of ``kind``."""
    rule = {"positive": "no matched query", "hard negative": f"none with G > {threshold:g}",
            "easy negative": "none"}[kind]
    return {"kind": kind, "missing": f"{kind}: {rule}"}


# ---- rendering ---------------------------------------------------------------------------------
def _render(image: Any, panels: list[dict[str, Any]], target: dict[str, Any], gt_index: int,
            threshold: float, out_path: str | Path) -> None:
    """Row 1: the positive and the hard negatives; row 2: the easy negatives and the mask (as in
    Fig. 1's column order); saved as PNG by matplotlib's Agg canvas (no display, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = [p for p in panels if p["kind"] in ("positive", "hard negative")]
    second = [p for p in panels if p not in first]
    cols = max(len(first), len(second))
    fig = Figure(figsize=(3.0 * cols, 6.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, cols, squeeze=False)
    for row, row_panels in zip(axes, (first, second)):
        for ax, panel in zip(row, row_panels):
            _draw_panel(ax, image, panel, target, gt_index)
        for ax in row[len(row_panels):]:
            ax.axis("off")
    fig.suptitle(f"image {target.get('image_id', '?')}, GT {gt_index} "
                 f"(class {int(target['class_labels'][gt_index])}), GQS threshold G > {threshold:g}; "
                 "heatmap: first-layer cross-attention (sqrt, per-panel max)", fontsize=10)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png")


_LETTERS = {"positive": "a", "hard negative": "b", "easy negative": "c"}


def _draw_panel(ax: Any, image: Any, panel: dict[str, Any], target: dict[str, Any], gt_index: int) -> None:
    """Image + heatmap + GT box(es) + the query's box, titled with kind, G and score."""
    ax.set_xticks([])
    ax.set_yticks([])
    if "missing" in panel:  # the image faded: nothing of this kind to show
        ax.imshow(image, alpha=0.3)
        ax.set_title(f"({_LETTERS[panel['kind']]}) {panel['missing']}", fontsize=9)
        return
    ax.imshow(image)
    ax.imshow(_heat_rgba(panel["map"]), extent=(0, image.shape[1], image.shape[0], 0))
    gts = range(len(target["boxes"])) if panel["kind"] == "mask" else [gt_index]
    for g in gts:
        _box(ax, target["boxes"][g].tolist(), image.shape, "white", "--")
    if panel["kind"] == "mask":
        ax.set_title(f"(d) AGFD mask W over |I~| = {panel['selected']}\nselected queries of the image",
                     fontsize=9)
        return
    _box(ax, panel["box"], image.shape, KIND_COLOURS[panel["kind"]], "-")
    ax.set_title(f"({_LETTERS[panel['kind']]}) {panel['kind']} q{panel['query']}\n"
                 f"G = {panel['giou']:.2f}, score = {panel['score']:.2f}", fontsize=9)


def _heat_rgba(heat: Any) -> Any:
    """A map -> RGBA overlay: jet colours of sqrt(map / max), opacity growing with the value (so
    unattended regions leave the image visible)."""
    import numpy as np
    from matplotlib import colormaps

    level = np.sqrt(heat / max(float(heat.max()), 1e-12))
    rgba = colormaps["jet"](level)
    rgba[..., 3] = 0.7 * level
    return rgba


def _box(ax: Any, cxcywh: Sequence[float], shape: Sequence[int], colour: str, style: str) -> None:
    """Draw a normalised cxcywh box on an image of ``shape`` (h, w, ...)."""
    from matplotlib.patches import Rectangle

    cx, cy, w, h = cxcywh
    height, width = shape[0], shape[1]
    ax.add_patch(Rectangle(((cx - w / 2) * width, (cy - h / 2) * height), w * width, h * height,
                           fill=False, edgecolor=colour, linestyle=style, linewidth=1.8))


# ---- choosing an image -------------------------------------------------------------------------
def find_image_index(dataset: Any, image_id: int | None = None, image: str | Path | None = None) -> int:
    """Item index in a ``CocoDetection`` of a COCO image id, or of an image path / ``file_name``."""
    ids = dataset.image_ids
    if image_id is not None:
        if image_id not in ids:
            raise ValueError(f"image id {image_id} is not in {dataset.annotation_file} "
                             f"({len(ids)} images, ids {min(ids, default='-')}..{max(ids, default='-')})")
        return ids.index(image_id)
    if image is None:
        raise ValueError("give an image id or an image path")
    by_file: dict[str, int] = {}
    for entry in dataset.coco_gt["images"]:
        by_file[str(entry["file_name"])] = entry["id"]
        by_file[str((dataset.images_dir / str(entry["file_name"])).resolve())] = entry["id"]
    found = by_file.get(str(image), by_file.get(str(Path(image).resolve())))
    if found is None or found not in ids:
        raise ValueError(f"image {image} is not in {dataset.annotation_file} "
                         f"(give a file under {dataset.images_dir} or its file_name)")
    return ids.index(found)


def draw_dataset_image(model: Any, dataset: Any, index: int, gt_index: int | None, out_path: str | Path,
                       threshold: float = 0.0, device: str | torch.device = "cpu") -> dict[str, Any]:
    """``draw_query_selection`` for item ``index`` of a ``CocoDetection`` (drawn on the file's
    pixels); the summary also holds the ``image_id``."""
    from detrkd.data.collate import collate

    image, target = dataset[index]
    batch = collate([(image, target)])
    summary = draw_query_selection(model, batch["pixel_values"], target, dataset.load_image(index), gt_index,
                                   out_path, pixel_mask=batch["pixel_mask"], threshold=threshold, device=device)
    return {"image_id": int(target["image_id"]), **summary}
