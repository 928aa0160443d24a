"""DEIMv2: what differs from D-FINE (the shared view, decode and attention are tested with the
RT-DETR family in ``test_adapters_rtdetr.py``): its backbone wrapper, the loss's normalisers, training.
"""

from __future__ import annotations

import pytest
import torch

from detrkd.models import build_detector

NUM_CLASSES = 5


def images(batch: int = 2, h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


def labels() -> list[dict[str, torch.Tensor]]:
    return [dict(class_labels=torch.tensor([1, 2]), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])),
            dict(class_labels=torch.tensor([3]), boxes=torch.tensor([[0.4, 0.6, 0.3, 0.2]]))]


def test_preset_builds_with_a_trainable_resnet_and_no_frozen_batch_norm():
    adapter = build_detector("deimv2", "tiny", NUM_CLASSES)
    cfg = adapter.config
    assert cfg.model_type == "deimv2" and cfg.backbone_config.model_type == "resnet"
    assert not cfg.freeze_backbone_batch_norms and cfg.use_dense_one_to_one
    backbone = {id(p) for p in adapter.model.model.conv_encoder.model.parameters()}
    assert {id(p) for p in adapter.backbone_parameters()} == backbone
    assert all(p.requires_grad for p in adapter.model.parameters() if p.dim() > 0 and p.numel() > 1)
    assert not any("Frozen" in type(m).__name__ for m in adapter.modules())


def test_dinov3_backbone_parameters_are_the_vit():
    from transformers import DINOv3ViTConfig

    vit = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                          patch_size=16, num_register_tokens=0, out_indices=[1, 2, 3], image_size=64)
    adapter = build_detector("deimv2", "tiny", NUM_CLASSES, backbone_config=vit, spatial_tuning_adapter_inplanes=8,
                             encoder_in_channels=[32, 32, 32])
    encoder = adapter.model.model.conv_encoder
    assert {id(p) for p in adapter.backbone_parameters()} == {id(p) for p in encoder.backbone.parameters()}
    adapter.eval()
    with torch.no_grad():
        out = adapter(images(h=64, w=64))
    assert out.predictions.logits.shape == (2, 2, 30, NUM_CLASSES)


def _terms(out) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in out.loss_dict.items()}


def test_box_normalised_loss_is_mal_and_denoising_without_ddf():
    """Dense one-to-one matching divides L1 / GIoU / FGL by the union of matches, not the GT count:
    only MAL and the denoising terms (minus DDF) are per-GT-box normalised."""
    adapter = build_detector("deimv2", "tiny", NUM_CLASSES).train()
    torch.manual_seed(0)
    out = adapter(images(), labels=labels())
    terms = _terms(out)
    assert any("_dn_" in k for k in terms) and "loss_bbox" in terms
    expected = sum(v for k, v in terms.items() if not k.startswith("loss_ddf") and (k.startswith("loss_mal")
                                                                                     or "_dn_" in k))
    assert float(adapter.box_normalised_loss(out).detach()) == pytest.approx(expected, rel=1e-6)
    assert float(out.loss.detach()) == pytest.approx(sum(terms.values()), rel=1e-6)
    plain = build_detector("deimv2", "tiny", NUM_CLASSES, use_dense_one_to_one=False).eval()
    out = plain(images(), labels=labels())
    no_ddf = sum(v for k, v in _terms(out).items() if not k.startswith("loss_ddf"))
    assert float(plain.box_normalised_loss(out).detach()) == pytest.approx(no_ddf, rel=1e-6)


def test_detection_loss_trains():
    torch.manual_seed(0)
    adapter = build_detector("deimv2", "tiny", NUM_CLASSES).train()
    optimiser = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    x = images()
    losses = []
    for _ in range(12):
        loss = adapter(x, labels=labels()).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
