"""Putting a detector's classes in another order, by name: a teacher trained on the dataset's
categories in another order predicts them in the dataset's label order after ``align_classes``.

The class-head tensors are found the way transformers' ``ignore_mismatched_sizes`` finds them: the
tensors whose shape changes with ``num_labels`` (built once more on the meta device with one more
class). Their first ``C`` rows are the classes; rows past them (DETR's no-object logit, RT-DETR's
denoising padding class) stay where they are. Tied tensors (one head shared by several layers) are
reordered once. Two-stage Deformable DETR's encoder head (``class_embed[decoder_layers]``) is left
alone: transformers picks its proposals by that head's class-0 logit (as the reference code does),
an "objectness" score rather than a class.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn


def class_head_tensors(model: nn.Module) -> list[tuple[str, int]]:
    """(state-dict name, class dimension) of every tensor of an HF detector that holds classes."""
    config = copy.deepcopy(model.config)
    count = int(config.num_labels) + 1
    config.id2label = {i: str(i) for i in range(count)}
    config.label2id = {str(i): i for i in range(count)}
    with torch.device("meta"):
        bigger = type(model)(config)
    ours, theirs = model.state_dict(), bigger.state_dict()
    encoder_head = f"class_embed.{config.decoder_layers}." if getattr(config, "two_stage", False) else None
    heads = []
    for name, tensor in ours.items():
        if encoder_head is not None and encoder_head in name:
            continue
        other = theirs.get(name)
        if other is not None and other.shape != tensor.shape:
            dims = [d for d, (a, b) in enumerate(zip(tensor.shape, other.shape)) if a != b]
            heads.append((name, dims[0]))
    return heads


@torch.no_grad()
def reorder_classes(model: nn.Module, order: Sequence[int]) -> int:
    """New class ``i`` = old class ``order[i]`` in every class head (in place); ``id2label`` /
    ``label2id`` follow. Returns the number of tensors changed."""
    count = int(model.config.num_labels)
    if sorted(order) != list(range(count)):
        raise ValueError(f"order must be a permutation of 0..{count - 1}, got {list(order)}")
    state, seen, changed = model.state_dict(keep_vars=True), set(), 0
    for name, dim in class_head_tensors(model):
        tensor = state[name]
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        index = torch.cat([torch.tensor(list(order)), torch.arange(count, tensor.shape[dim])]).to(tensor.device)
        tensor.data.copy_(tensor.data.index_select(dim, index))
        changed += 1
    names = [model.config.id2label[int(o)] for o in order]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    return changed


def align_classes(model: nn.Module, names: Sequence[str]) -> bool:
    """Reorder ``model``'s classes so that its ``id2label`` is ``names`` (matched by name); False
    when already in that order. ``ValueError`` naming the difference when the name sets differ."""
    current = [str(model.config.id2label[i]) for i in range(int(model.config.num_labels))]
    names = [str(n) for n in names]
    if current == names:
        return False
    if sorted(current) != sorted(names) or len(set(names)) != len(names):
        missing, extra = sorted(set(names) - set(current)), sorted(set(current) - set(names))
        raise ValueError(f"its classes are not the data's: missing {missing}, not in the data {extra}")
    where = {n: i for i, n in enumerate(current)}
    reorder_classes(model, [where[n] for n in names])
    return True
