"""Switchable Normalization in MMDetection, MMSegmentation, MMAction2 and MMPretrain.

Importing this package (every SN config does, through
``custom_imports = dict(imports=['sn_plugin.integrations.openmmlab'], allow_failed_imports=False)``)
makes SN behave in OpenMMLab configs the way BatchNorm does:

* norm types ``SN`` (= ``SN2d``), ``SN1d``, ``SN2d``, ``SN3d`` and ``SyncSN``: the
  core classes themselves, registered in mmengine's root ``MODELS`` registry,
  which every toolkit's registry falls back to, so ``norm_cfg=dict(type='SN')``
  works in all of them. mmcv's ``build_norm_layer`` names the layers ``sn1``,
  ``sn2``... (the classes' ``_abbr_``; see docs/architecture.md for why ``sn``);
* ``norm_eval=True`` puts SN layers in eval mode, as the toolkits' backbones do
  for BatchNorm, and ``mmaction.models`` imports with the broken mmaction2 1.2.0
  PyPI package: the two patches of toolkit internals, both installed by
  :func:`install_patches` and undone by :func:`uninstall_patches`
  (:mod:`.registration`);
* ``SNOptimWrapperConstructor``: ``paramwise_cfg=dict(norm_decay_mult=...)``
  covers SN's gamma, beta and importance logits (:mod:`.optim`);
* hooks ``SNBatchStatsHook`` (the paper's batch-average statistics whenever the
  model is evaluated or saved) and ``SNWeightLoggerHook`` (importance weights
  per stage as scalars for the visualizer, e.g. TensorBoard) (:mod:`.hooks`).
* the normalization family (:mod:`.family`): norm types ``CN``, ``CN1d``,
  ``CN2d``, ``CN3d`` (Consistent Normalization), ``ConsistentNormModel`` (CN's
  training, Algorithm 1 or a branch per dataset) with the transform
  ``CNBranchTag``, backbones ``XBNResNet`` / ``XBNResNeXt`` (XBNBlock) for mmdet,
  mmseg and mmpretrain, and ``EstimationShiftHook`` (estimation shift per epoch).

What needs no code here, and is tested: ``frozen_stages`` (the backbones put
frozen stages in eval mode and stop their gradients, SN included), default
init (gamma 1, beta 0, logits 1; the toolkits' ``Constant`` init of
``_BatchNorm`` layers leaves SN alone) and ``zero_init_residual`` (a
``Constant`` init of ``norm3``/``norm2`` by name), and the Runner's ``sync_bn``
and ``revert_sync_batchnorm``, which only touch BatchNorm classes and so leave
SN as it is. To synchronise SN across GPUs, use ``type='SyncSN'`` or
:func:`sn_plugin.convert_sync_sn`.
"""
from .family import (
    CN_NORM_TYPES, CNBranchTag, ConsistentNormModel, EstimationShiftHook, XBN_BACKBONES, register_family_types,
)
from .hooks import SNBatchStatsHook, SNWeightLoggerHook, training_forward
from .optim import SNOptimWrapperConstructor
from .registration import NORM_TYPES, install_patches, installed_patches, register_norm_types, uninstall_patches
from .train import prepare_cpu_distributed

__all__ = [
    "CN_NORM_TYPES", "CNBranchTag", "ConsistentNormModel", "EstimationShiftHook", "XBN_BACKBONES",
    "register_family_types",
    "NORM_TYPES", "SNBatchStatsHook", "SNOptimWrapperConstructor", "SNWeightLoggerHook", "install_patches",
    "installed_patches", "prepare_cpu_distributed", "register_norm_types", "training_forward", "uninstall_patches",
]

register_norm_types()
register_family_types()
install_patches()
