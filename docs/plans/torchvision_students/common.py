import time, torch
from collections import OrderedDict
from torch import nn
from torchvision.ops import Conv2dNormActivation

torch.set_num_threads(1)

def batch(seed=0, n=2, size=128, nbox=3, num_classes=5, label_offset=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(nbox, 2, generator=g) * (size * 0.6)
        wh = 8 + torch.rand(nbox, 2, generator=g) * (size * 0.35)
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        labels = torch.randint(0, num_classes, (nbox,), generator=g) + label_offset
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets

class TinyBackbone(nn.Module):
    """children registered in call order -> usable by IntermediateLayerGetter / BackboneWithFPN."""
    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__()
        c = lambda i, o, s: Conv2dNormActivation(i, o, 3, s, norm_layer=nn.BatchNorm2d)
        self.stem = nn.Sequential(c(3, widths[0], 2), c(widths[0], widths[0], 2))  # stride 4
        self.layer1 = c(widths[0], widths[0], 1)   # C2 stride 4
        self.layer2 = c(widths[0], widths[1], 2)   # C3 stride 8
        self.layer3 = c(widths[1], widths[2], 2)   # C4 stride 16
        self.layer4 = c(widths[2], widths[3], 2)   # C5 stride 32

def nparams(m):
    return sum(p.numel() for p in m.parameters())

def train_step(model, images, targets, steps=1):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    t0 = time.perf_counter()
    for _ in range(steps):
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(); loss.backward(); opt.step()
    dt = time.perf_counter() - t0
    return {k: round(float(v), 4) for k, v in losses.items()}, dt / steps
