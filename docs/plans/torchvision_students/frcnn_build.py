import sys, time, torch
sys.path.insert(0, "/tmp/tvnotes")
from common import *
from torch import nn
import torchvision
from torchvision.models import resnet18
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.faster_rcnn import TwoMLPHead, FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

C = 5  # real classes; Faster R-CNN num_classes = C + 1 (0 = background)

def small_frcnn(body, in_channels_list, fpn_ch, rep=128, pool=7):
    backbone = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               in_channels_list, fpn_ch, extra_blocks=LastLevelMaxPool())
    anchor_gen = AnchorGenerator(sizes=((16,), (32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    return FasterRCNN(
        backbone, num_classes=None,  # must be None when box_predictor is given (faster_rcnn.py:220-225)
        min_size=128, max_size=128, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        rpn_anchor_generator=anchor_gen,
        rpn_head=RPNHead(fpn_ch, anchor_gen.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=64,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=pool, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_ch * pool * pool, rep),
        box_predictor=FastRCNNPredictor(rep, C + 1),
        box_batch_size_per_image=64, box_detections_per_img=50,
    )

