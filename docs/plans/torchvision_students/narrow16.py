import sys, torch
sys.path.insert(0, "/tmp/tvnotes")
from common import *
from functools import partial
from torch import nn
from torchvision.models.detection import RetinaNet, FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.fcos import FCOSHead, FCOSClassificationHead, FCOSRegressionHead
from onestage_build import p3p7, C
images, targets = batch(num_classes=C)
ch = 16
bb = p3p7(TinyBackbone((8, 16, 32, 64)), [16, 32, 64], ch)
head = FCOSHead(32, 1, C)  # placeholder; replace both sub-heads (FCOSHead has no norm_layer kwarg)
head.classification_head = FCOSClassificationHead(ch, 1, C, num_convs=2, norm_layer=partial(nn.GroupNorm, 8))
head.regression_head = FCOSRegressionHead(ch, 1, num_convs=2, norm_layer=partial(nn.GroupNorm, 8))
m = FCOS(bb, C, min_size=128, max_size=128, head=head)
print("fcos16", nparams(m), train_step(m, images, targets))
bb = p3p7(TinyBackbone((8, 16, 32, 64)), [16, 32, 64], ch)
ag = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
head = RetinaNetHead(ch, 3, C, norm_layer=partial(nn.GroupNorm, 8))
head.classification_head.conv = head.classification_head.conv[:2]   # 4 -> 2 convs (hard-coded 4 in retinanet.py:111)
head.regression_head.conv = head.regression_head.conv[:2]
m = RetinaNet(bb, C, min_size=128, max_size=128, anchor_generator=ag, head=head)
print("retina16", nparams(m), train_step(m, images, targets))
