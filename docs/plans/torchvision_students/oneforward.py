import sys, time, torch
sys.path.insert(0, "/tmp/tvnotes")
from common import *
from frcnn_build import small_frcnn, C
from onestage_build import retina, fcos
from torchvision.ops import box_iou

images, targets = batch(num_classes=C, label_offset=1)

# ---------- Faster R-CNN: submodule calls = model.forward (generalized_rcnn.py:96-125), plus points
def frcnn_train_forward(model, images, targets, k=10):
    images_il, targets = model.transform(images, targets)
    feats = model.backbone(images_il.tensors)
    proposals, rpn_losses = model.rpn(images_il, feats, targets)
    _, det_losses = model.roi_heads(feats, proposals, images_il.image_sizes, targets)
    # distillation points: top-k anchors per GT (anchors recomputed; cheap)
    anchors = model.rpn.anchor_generator(images_il, list(feats.values()))
    pts = [a[box_iou(t["boxes"], a).topk(k, dim=1).indices.flatten()] for a, t in zip(anchors, targets)]
    rh = model.roi_heads
    logits, reg = rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, pts, images_il.image_sizes)))
    return {**det_losses, **rpn_losses}, pts, logits, reg, images_il.image_sizes

torch.manual_seed(0); m = small_frcnn(TinyBackbone(), [16, 32, 64, 128], 32, rep=64); m.train()
torch.manual_seed(1); ref = m(images, targets)
torch.manual_seed(1); mine, pts, logits, reg, sizes = frcnn_train_forward(m, images, targets)
print("frcnn losses equal:", all(torch.allclose(ref[k], mine[k]) for k in ref), sorted(ref))
(sum(mine.values()) + logits.logsumexp(-1).mean() + reg.abs().mean()).backward()
print("grad reaches backbone:", m.backbone.body.stem[0][0].weight.grad.abs().sum().item() > 0)

# ---------- Faster R-CNN: hooks variant (one model() call, hooks capture features + ImageList)
rec = {}
h1 = m.backbone.register_forward_hook(lambda mod, args, out: rec.__setitem__("feats", out))
h2 = m.rpn.register_forward_pre_hook(lambda mod, args: rec.__setitem__("images", args[0]))
h3 = m.rpn.register_forward_hook(lambda mod, args, out: rec.__setitem__("proposals", out[0]))
try:
    losses = m(images, targets)
finally:
    for h in (h1, h2, h3): h.remove()
print("hooks:", list(rec), [tuple(p.shape) for p in rec["proposals"]], rec["images"].image_sizes,
      "feats require grad:", rec["feats"]["0"].requires_grad)

# ---------- RetinaNet / FCOS: head outputs + the model's own losses in one pass
images0, targets0 = batch(num_classes=C)
for name, mk in [("retina", lambda: retina(TinyBackbone(), [32, 64, 128], 32)), ("fcos", lambda: fcos(TinyBackbone(), [32, 64, 128], 32))]:
    torch.manual_seed(0); m = mk(); m.train()
    ref = m(images0, targets0)
    il, tg = m.transform(images0, targets0)
    feats = list(m.backbone(il.tensors).values())
    ho = m.head(feats)
    anchors = m.anchor_generator(il, feats)
    napl = [f.shape[2] * f.shape[3] for f in feats]
    losses = m.compute_loss(tg, ho, anchors, napl) if name == "fcos" else m.compute_loss(tg, ho, anchors)
    print(name, "losses equal:", all(torch.allclose(ref[k], losses[k]) for k in ref), sorted(ref),
          {k: tuple(v.shape) for k, v in ho.items()}, "anchors/img", tuple(anchors[0].shape), "levels", napl)
    if name == "fcos":
        boxes = m.box_coder.decode(ho["bbox_regression"], torch.stack(anchors))          # [B, HW, 4]
        scores = torch.sqrt(torch.sigmoid(ho["cls_logits"]) * torch.sigmoid(ho["bbox_ctrness"]))
        ctr = (anchors[0][:, :2] + anchors[0][:, 2:]) / 2
        print("  fcos points (level 0) first:", ctr[:3].tolist(), "anchor", anchors[0][0].tolist())
    else:
        boxes = torch.stack([m.box_coder.decode_single(r, a) for r, a in zip(ho["bbox_regression"], anchors)])
        scores = torch.sigmoid(ho["cls_logits"])
        print("  retina anchors first:", anchors[0][:3].tolist())
    print("  decoded", tuple(boxes.shape), "scores", tuple(scores.shape))
