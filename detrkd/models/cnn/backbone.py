"""The CNN students' backbones: a ResNet-style body (torchvision's BasicBlock, any widths) or
torchvision's ResNet-50, under torchvision's ``BackboneWithFPN``.

torchvision's ResNet constructors fix the stage widths at 64..512 (BasicBlock) and its detection
builders fix the FPN at 256 channels; a CPU student needs both narrower. ``resnet_body`` is the
same network as ``torchvision.models.ResNet`` (children ``conv1, bn1, relu, maxpool, layer1..4``,
so ``IntermediateLayerGetter`` and the state-dict keys match) with free widths and depths and no
classifier. Normalisation is trainable ``BatchNorm2d`` (random init: torchvision's detection default
``FrozenBatchNorm2d`` would be an identity).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock, conv1x1
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

RESNET50_CHANNELS = (256, 512, 1024, 2048)


def resnet_body(widths: Sequence[int], depths: Sequence[int]) -> nn.Sequential:
    """A ResNet of BasicBlocks: stem (7x7 conv /2, max-pool /2) -> ``layer1..4`` of ``depths[i]``
    blocks of width ``widths[i]`` (strides 4, 8, 16, 32: C2..C5)."""
    stem = widths[0]
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)),
        ("bn1", nn.BatchNorm2d(stem)), ("relu", nn.ReLU(inplace=True)),
        ("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
    inplanes = stem
    for i, (width, depth) in enumerate(zip(widths, depths)):
        blocks = []
        for j in range(depth):
            stride = 2 if i > 0 and j == 0 else 1
            down = None
            if stride != 1 or inplanes != width:
                down = nn.Sequential(conv1x1(inplanes, width, stride), nn.BatchNorm2d(width))
            blocks.append(BasicBlock(inplanes, width, stride, down))
            inplanes = width
        layers.append((f"layer{i + 1}", nn.Sequential(*blocks)))
    return nn.Sequential(OrderedDict(layers))


def fpn_backbone(widths: Sequence[int] | None, depths: Sequence[int], fpn_channels: int,
                 returned: Sequence[int], extra: ExtraFPNBlock) -> BackboneWithFPN:
    """``BackboneWithFPN`` over the body's stages ``returned`` (1..4, named "0", "1", ... in that
    order) plus ``extra`` levels; ``widths=None``: torchvision's ResNet-50 (random init, offline)."""
    if widths is None:
        body, channels = resnet50(weights=None, norm_layer=nn.BatchNorm2d), RESNET50_CHANNELS
    else:
        body, channels = resnet_body(widths, depths), tuple(widths)
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned)}
    return BackboneWithFPN(body, return_layers, [channels[k - 1] for k in returned], fpn_channels,
                           extra_blocks=extra)
