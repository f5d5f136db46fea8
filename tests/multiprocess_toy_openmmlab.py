"""A tiny SyncSN classifier, its two images and the recording hook, in mmengine's root registries.

The configs of tests/test_multiprocess_openmmlab.py import this module (``custom_imports``), so
every training process registers them. The model's norm layers come from mmcv's ConvModule,
i.e. ``norm_cfg=dict(type='SyncSN')`` goes through the toolkits' own ``build_norm_layer``.
"""
import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.dist import get_dist_info
from mmengine.hooks import Hook
from mmengine.model import BaseModel, is_model_wrapper
from mmengine.registry import DATASETS, HOOKS, MODELS
from torch import nn

from multiprocess_utils import Recorder

NUM_CLASSES = 2


@DATASETS.register_module()
class SNToyImages(torch.utils.data.Dataset):
    """Two fixed random 16x16 images, labelled 0 and 1, as ``dict(inputs, data_samples)``."""

    def __init__(self, size: int = 16) -> None:
        self.images = torch.rand(NUM_CLASSES, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return dict(inputs=self.images[index], data_samples=torch.tensor(index))


@MODELS.register_module()
class SNToyClassifier(BaseModel):
    """Two conv + norm + ReLU blocks, global pooling and a linear classifier."""

    def __init__(self, norm_cfg: dict, channels: int = 8, data_preprocessor=None) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        self.convs = nn.Sequential(ConvModule(3, channels, 3, padding=1, norm_cfg=norm_cfg),
                                   ConvModule(channels, channels, 3, stride=2, padding=1, norm_cfg=norm_cfg))
        self.head = nn.Linear(channels, NUM_CLASSES)

    def forward(self, inputs, data_samples=None, mode: str = "tensor"):
        logits = self.head(self.convs(inputs).mean((2, 3)))
        return dict(loss=F.cross_entropy(logits, data_samples)) if mode == "loss" else logits


@HOOKS.register_module()
class SNRecordHook(Hook):
    """Writes this process's record (tests/multiprocess_utils.py) at the end of training."""

    priority = "LOWEST"  # after SNBatchStatsHook and the CheckpointHook

    @staticmethod
    def _model(runner) -> nn.Module:
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def before_train(self, runner) -> None:
        self.recorder = Recorder(*get_dist_info(), runner.iter, self._model(runner), runner.optim_wrapper.state_dict())

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if runner.iter == self.recorder.record["start_iter"]:
            self.recorder.record_gradients(self._model(runner), runner.optim_wrapper)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if runner.iter == self.recorder.record["start_iter"]:
            self.recorder.first_iteration(self._model(runner), float(outputs["loss"].detach()))

    def before_save_checkpoint(self, runner, checkpoint) -> None:  # mmengine calls it on the saving rank only
        self.recorder.checkpoint_written()

    def after_train(self, runner) -> None:
        self.recorder.end(self._model(runner), runner.iter, runner.work_dir)
