"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture(scope="module")
def two_image_batch():
    """A ``collate``-style batch of two random 64 x 64 images with 1 and 2 objects."""
    torch.manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, 64, 64), "pixel_mask": torch.ones(2, 64, 64, dtype=torch.long),
            "labels": [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])},
                       {"class_labels": torch.tensor([2, 3]),
                        "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.3]])}]}
