import sys, time, torch
sys.path.insert(0, "/tmp/tvnotes")
from common import *
from frcnn_build import small_frcnn, C
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou

torch.manual_seed(0)
m = small_frcnn(TinyBackbone(), [16, 32, 64, 128], 32, rep=64)
images, targets = batch(num_classes=C, label_offset=1)

# --- transform: is min_size=max_size=128 an exact identity on 128x128? (eval path)
t = GeneralizedRCNNTransform(128, 128, [0., 0., 0.], [1., 1., 1.]).eval()
il, _ = t(images)
print("identity resize+norm 128:", torch.equal(il.tensors[0], images[0]), il.image_sizes, tuple(il.tensors.shape))
img_rect = torch.rand(3, 100, 150)
il, _ = t([img_rect])
print("rect 100x150 with min=max=128 ->", il.image_sizes, tuple(il.tensors.shape))
t2 = GeneralizedRCNNTransform(128, 128, [0., 0., 0.], [1., 1., 1.], _skip_resize=True)
t2.train(); il, _ = t2([img_rect]); print("_skip_resize train ->", il.image_sizes)
t2.eval(); il, _ = t2([img_rect]); print("_skip_resize eval  ->", il.image_sizes)
t3 = GeneralizedRCNNTransform(128, 128, [0., 0., 0.], [1., 1., 1.]); t3.resize = lambda image, target=None: (image, target)
t3.eval(); il, _ = t3([img_rect, torch.rand(3, 90, 60)]); print("resize patched ->", il.image_sizes, tuple(il.tensors.shape),
      "pad zeros:", float(il.tensors[1, :, 90:].abs().sum()))
print("postprocess identity when sizes equal:", t3.postprocess([{"boxes": torch.tensor([[1., 2., 3., 4.]])}], [(100, 150)], [(100, 150)]))

# --- bypass transform: feed an already-normalised padded batch (detrkd collate) as ImageList
m.eval()
pv = torch.zeros(2, 3, 128, 128); sizes = [(128, 128), (96, 112)]
pv[0] = torch.randn(3, 128, 128); pv[1, :, :96, :112] = torch.randn(3, 96, 112)
il = ImageList(pv, sizes)
feats = m.backbone(il.tensors)
print("FPN features:", [(k, tuple(v.shape[1:]), 128 // v.shape[-1]) for k, v in feats.items()])

# --- RPN proposals + objectness without losses (replicates rpn.py:359-372)
rpn = m.rpn
fl = list(feats.values())
obj, deltas = rpn.head(fl)
anchors = rpn.anchor_generator(il, fl)
napl = [o[0].numel() for o in obj]
obj_flat, deltas_flat = concat_box_prediction_layers(obj, deltas)
props = rpn.box_coder.decode(deltas_flat.detach(), anchors).view(len(anchors), -1, 4)
boxes, scores = rpn.filter_proposals(props, obj_flat, il.image_sizes, napl)
print("anchors/img", anchors[0].shape[0], "per level", napl, "proposals", [b.shape[0] for b in boxes],
      "scores in [0,1]", float(scores[0].min()), float(scores[0].max()))
# compare with rpn.forward in eval
with torch.no_grad():
    b2, l2 = rpn(il, feats)
print("rpn.forward eval identical:", all(torch.equal(a, b) for a, b in zip(boxes, b2)), "losses", l2)

# --- RoI head on external boxes (e.g. top-10 anchors per GT)
gt = [targets[0]["boxes"], targets[1]["boxes"] * 0.75]
pts = []
for a, g in zip(anchors, gt):
    iou = box_iou(g, a)                                # [G, A]
    top = iou.topk(10, dim=1).indices                  # [G, 10]
    pts.append(a[top.flatten()])                       # [G*10, 4] xyxy pixels (may cross the border)
pts_c = [torchvision_clip(p, s) if False else p for p, s in zip(pts, il.image_sizes)]
rh = m.roi_heads
x = rh.box_roi_pool(feats, pts, il.image_sizes)        # [sumN, ch, 7, 7]
x = rh.box_head(x)
logits, reg = rh.box_predictor(x)                      # [sumN, C+1], [sumN, 4*(C+1)]
print("roi on external boxes:", tuple(logits.shape), tuple(reg.shape))
dec = rh.box_coder.decode(reg, pts)                    # [sumN, C+1, 4]
print("decoded per-class boxes", tuple(dec.shape), "weights", rh.box_coder.weights)
cls = torch.cat([t_["labels"] for t_ in targets]).repeat_interleave(10)  # GT class (1..C) of each point
box_at_gt_class = dec[torch.arange(dec.shape[0]), cls]                   # [sumN, 4]
probs = F.softmax(logits, -1)                                            # index 0 = background
print("bg prob mean", float(probs[:, 0].mean()), "box", box_at_gt_class[0].tolist())
# zero-area / off-image box: level mapper & roi_align tolerate it?
x0 = rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, [torch.tensor([[10., 10., 10., 10.], [-50., -50., 300., 300.]])], [(128, 128)])))
print("degenerate/off-image boxes finite:", bool(torch.isfinite(x0[0]).all()), "scales cached:", rh.box_roi_pool.scales)
