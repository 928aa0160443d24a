import sys, time, torch
sys.path.insert(0, "/tmp/tvnotes")
from common import *
from functools import partial
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import RetinaNet, FCOS
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.fcos import FCOSHead, FCOSClassificationHead, FCOSRegressionHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

C = 5  # sigmoid heads: num_classes = C, labels 0..C-1 used as-is (no background column)

def p3p7(body, in_list, ch):  # C3..C5 -> P3..P5 + P6, P7 (strides 8..128), like retinanet_resnet50_fpn
    return BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, in_list, ch,
                           extra_blocks=LastLevelP6P7(ch, ch))

def retina(body, in_list, ch):
    bb = p3p7(body, in_list, ch)
    ag = AnchorGenerator(tuple((s, int(s * 2 ** 0.5)) for s in (16, 32, 64, 128, 256)), ((0.5, 1.0, 2.0),) * 5)
    head = RetinaNetHead(ch, ag.num_anchors_per_location()[0], C, norm_layer=partial(nn.GroupNorm, 8))
    return RetinaNet(bb, num_classes=C, min_size=128, max_size=128, anchor_generator=ag, head=head,
                     topk_candidates=300, detections_per_img=50)

def fcos(body, in_list, ch, convs=2):
    bb = p3p7(body, in_list, ch)
    ag = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)  # sizes == strides, 1 anchor
    head = FCOSHead(ch, 1, C, num_convs=convs)  # GroupNorm(32, ch): ch must be a multiple of 32
    return FCOS(bb, num_classes=C, min_size=128, max_size=128, anchor_generator=ag, head=head,
                score_thresh=0.05, topk_candidates=300, detections_per_img=50)

