#!/usr/bin/env python
"""Smoke-check the environment made by scripts/setup_env.sh (make check-env).

1. imports of the whole stack and mmcv's compiled ops (nms, RoIAlign);
2. detectron2: builds Mask R-CNN R50-FPN from the packaged model-zoo config
   and runs one training step on CPU on two random images (EventStorage);
   reports whether detectron2._C is the real extension or sn_plugin's placeholder.

Needs no data or weights.  Takes ~20 s on 2 cores.
"""
import time

import torch


def check_imports():
    import mmcv
    import mmdet
    import mmengine
    import mmpretrain
    import mmseg
    import pycocotools  # noqa: F401
    import torchvision
    from mmcv.ops import RoIAlign, nms

    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    _, keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == [0, 2], keep
    feats = torch.rand(1, 4, 16, 16)
    rois = torch.tensor([[0., 1., 1., 8., 8.]])
    assert RoIAlign((2, 2), 1.0, 0)(feats, rois).shape == (1, 4, 2, 2)
    assert torchvision.ops.nms(boxes, scores, 0.5).tolist() == [0, 2]
    import mmaction  # noqa: F401  (mmaction.models needs the package's drn workaround)
    print("imports ok: torch %s, torchvision %s, mmengine %s, mmcv %s, mmdet %s, mmseg %s, "
          "mmpretrain %s" % (torch.__version__, torchvision.__version__, mmengine.__version__,
                             mmcv.__version__, mmdet.__version__, mmseg.__version__,
                             mmpretrain.__version__))


def check_detectron2():
    import detectron2
    import detectron2._C as C
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    placeholder = getattr(C, "__sn_plugin_placeholder__", False)
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()

    def sample(h, w):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[10., 20., 100., 120.], [50., 40., 200., 180.]]))
        inst.gt_classes = torch.tensor([0, 2])
        masks = torch.zeros(2, h, w, dtype=torch.bool)
        masks[0, 20:120, 10:100] = True
        masks[1, 40:180, 50:200] = True
        inst.gt_masks = BitMasks(masks)
        return {"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8).float(),
                "height": h, "width": w, "instances": inst}

    batch = [sample(224, 256), sample(240, 224)]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    t = time.time()
    with EventStorage(0):
        losses = model(batch)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss), losses
    print("detectron2 %s Mask R-CNN R50-FPN train step ok in %.1fs, loss %.3f (%s); _C: %s" % (
        detectron2.__version__, time.time() - t, loss.item(),
        ", ".join(sorted(losses)), "placeholder (no compiled ops)" if placeholder else C.__file__))


if __name__ == "__main__":
    check_imports()
    check_detectron2()
