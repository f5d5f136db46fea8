"""A tiny SyncSN classifier on detectron2's ResNet, its dataset, and a trainer that records, for
tests/test_multiprocess_detectron2.py.

Run as a script with the arguments of tools/train_net_d2.py: it trains through
``sn_plugin.integrations.detectron2.train_net.main``. The CPU processes that ``--num-processes``
spawns import this script again, which registers the model and the dataset there too.
The dataset's two 64x64 images (labels 0 and 1) are read from the folder in ``$SN_TOY_IMAGES``.
"""
import os
import sys

import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import BoxMode
from detectron2.utils import comm
from torch import nn

from multiprocess_utils import Recorder
from sn_plugin.integrations.common import unwrap_model
from sn_plugin.integrations.detectron2 import SNTrainer, train_net

DATASET = "sn_multiprocess_toy"
CLASSES = ("first", "second")
IMAGE_SIZE = 64


def toy_dicts():
    folder = os.environ["SN_TOY_IMAGES"]
    return [{"file_name": os.path.join(folder, f"{label}.png"), "image_id": label, "height": IMAGE_SIZE,
             "width": IMAGE_SIZE, "annotations": [{"bbox": [8, 8, 32, 32], "bbox_mode": BoxMode.XYWH_ABS,
                                                   "category_id": label}]}
            for label in range(len(CLASSES))]


DatasetCatalog.register(DATASET, toy_dicts)
MetadataCatalog.get(DATASET).set(thing_classes=list(CLASSES))


@META_ARCH_REGISTRY.register()
class SNToyClassifier(nn.Module):
    """The config's backbone (MODEL.RESNETS.NORM), global pooling and a linear classifier of each
    image's one annotation."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.backbone = build_backbone(cfg)
        self.feature = cfg.MODEL.RESNETS.OUT_FEATURES[-1]
        self.head = nn.Linear(self.backbone.output_shape()[self.feature].channels, len(CLASSES))
        self.last_loss = None

    def forward(self, batched_inputs):
        images = torch.stack([x["image"].float() / 255.0 for x in batched_inputs])
        logits = self.head(self.backbone(images)[self.feature].mean((2, 3)))
        labels = torch.stack([x["instances"].gt_classes[0] for x in batched_inputs])
        loss = F.cross_entropy(logits, labels)
        self.last_loss = float(loss.detach())
        return {"loss_cls": loss}


class RecordHook(HookBase):
    """Writes this process's record (tests/multiprocess_utils.py) at the end of training."""

    def before_train(self) -> None:
        model = unwrap_model(self.trainer.model)
        self.recorder = Recorder(comm.get_rank(), comm.get_world_size(), self.trainer.start_iter, model,
                                 self.trainer.optimizer.state_dict())
        checkpointer = self.trainer.checkpointer
        tag = checkpointer.tag_last_checkpoint  # called once a checkpoint file is written

        def counting_tag(*args, **kwargs):
            self.recorder.checkpoint_written()
            return tag(*args, **kwargs)

        checkpointer.tag_last_checkpoint = counting_tag

    def before_step(self) -> None:
        if self.trainer.iter == self.trainer.start_iter:
            self.recorder.record_gradients(unwrap_model(self.trainer.model), self.trainer.optimizer)

    def after_step(self) -> None:
        if self.trainer.iter == self.trainer.start_iter:
            model = unwrap_model(self.trainer.model)
            self.recorder.first_iteration(model, model.last_loss)

    def after_train(self) -> None:
        self.recorder.end(unwrap_model(self.trainer.model), self.trainer.iter, self.trainer.cfg.OUTPUT_DIR)


class RecordingTrainer(SNTrainer):
    def build_hooks(self):
        return super().build_hooks() + [RecordHook()]


if __name__ == "__main__":
    train_net.main(sys.argv[1:], trainer_class=RecordingTrainer)
