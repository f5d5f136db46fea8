"""The normalization family next to SN in the OpenMMLab toolkits: CN, XBNResNet and the ESM hook.

Registered by :func:`register_family_types` (importing the adapter calls it), all
in mmengine's root registries, which every toolkit's registry falls back to:

* norm types ``CN`` (= ``CN2d``), ``CN1d``, ``CN2d``, ``CN3d``: the core
  :class:`~sn_plugin.ConsistentNorm2d` classes themselves, so
  ``norm_cfg=dict(type='CN', num_branches=3)`` builds a CN layer with three BN
  branches (``norm='GN', num_groups=32`` and the other base normalizers of
  :class:`~sn_plugin.ConsistentNorm` work the same way). mmcv names the layers
  ``cn1``, ``cn2``... ``norm_eval`` puts every BN branch in eval mode (the
  branches are ``_BatchNorm`` modules; SN branches through the adapter's
  ``norm_eval`` patch), ``frozen_stages`` freezes every branch.
* model ``ConsistentNormModel``: trains the model it holds by the paper's
  Algorithm 1 (one view per branch) or with a branch per data-sample tag
  (a dataset per branch), and evaluates it with one branch;
  transform ``CNBranchTag`` writes a sample's tag, batch sampler
  ``SourceBatchSampler`` draws each batch from one dataset.
* backbones ``XBNResNet`` and ``XBNResNeXt``: the toolkit's own ResNet / ResNeXt
  with XBNBlocks (:func:`sn_plugin.convert_to_xbn`).
* hook ``EstimationShiftHook``: the estimation shift magnitude of every BN-like
  layer on the validation (or test) data after every N epochs or iterations,
  logged, sent to the visualizer and written as CSV and figure.

Why XBNResNet is one builder in the root registry rather than a class per
toolkit: mmdet, mmseg and mmpretrain each have their own ResNet class in their
own registry, and a user may have only one of them installed; defining
subclasses would mean importing all three (or generating classes on the fly).
``type='XBNResNet'`` is looked up in the config's default scope first, and
falls back to the root, where :func:`build_xbn_resnet` builds the ResNet of
the current default scope (``mmdet``, ``mmseg``, ``mmpretrain``; whichever
toolkit is building) and converts it in place. The object built is that
toolkit's ``ResNet``, so everything that toolkit does with its ResNet
(``frozen_stages``, ``norm_eval``, ``init_cfg``, checkpoints) applies unchanged.
"""
import bisect
import copy
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch.nn.functional as F
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import BaseModel, is_model_wrapper
from mmengine.registry import DATA_SAMPLERS, HOOKS, MODELS, TRANSFORMS
from torch import Tensor, nn
from torch.utils.data import BatchSampler, Sampler

from ...consistent import branch_assignment, consistent_branch, consistent_norm_layers
from ...consistent_norm import ConsistentNorm1d, ConsistentNorm2d, ConsistentNorm3d
from ...estimation_shift import estimation_shift
from ...xbn import BFNConfig, convert_to_xbn
from ..common import EstimationShiftLog, is_due, unwrap_model
from .registration import register_once

__all__ = [
    "CN_NORM_TYPES", "CN_TAG_KEY", "CNBranchTag", "ConsistentNormModel", "EstimationShiftHook", "ResizeView",
    "SourceBatchSampler", "VIEW_TYPES", "XBN_BACKBONES", "build_xbn_resnet", "build_xbn_resnext", "register_family_types",
]

CN_NORM_TYPES: Dict[str, type] = {
    "CN": ConsistentNorm2d,
    "CN1d": ConsistentNorm1d,
    "CN2d": ConsistentNorm2d,
    "CN3d": ConsistentNorm3d,
}

# The data-sample metainfo key holding a sample's branch tag (written by CNBranchTag).
CN_TAG_KEY = "cn_tag"


# ---------------------------------------------------------------------------------------------
# XBNResNet / XBNResNeXt
# ---------------------------------------------------------------------------------------------

def _toolkit_class(name: str, builder: str) -> type:
    """The class ``name`` (e.g. 'ResNet') of the toolkit whose default scope is current."""
    with MODELS.switch_scope_and_registry(None) as registry:
        found = None if registry is MODELS else registry.get(name)
    if found is None:
        where = ("no toolkit's default scope is set" if registry is MODELS
                 else f"the current default scope '{registry.scope}' has no '{name}'")
        raise KeyError(
            f"{builder} builds the ResNet of the toolkit that builds the model (mmdet, mmseg or mmpretrain), "
            f"but {where}. Set default_scope in the config (the Runner does, e.g. default_scope='mmdet'), call "
            f"mmengine.registry.init_default_scope('mmdet'), or give resnet_type the name of a ResNet-like "
            f"backbone registered in that toolkit.")
    return found


def _build_xbn(builder: str, resnet_type: str, bfn_cfg: BFNConfig, bfn_position: int, xbn_every: int,
               stem_bfn: bool, zero_init_residual: bool, resnet_args: Dict[str, Any]) -> nn.Module:
    resnet = _toolkit_class(resnet_type, builder)(zero_init_residual=zero_init_residual, **resnet_args)
    convert_to_xbn(resnet, bfn_cfg, bfn_position, xbn_every, stem_bfn, inplace=True)
    # A BFN replaces a BN after the ResNet froze its stages in __init__: freeze them again.
    resnet._freeze_stages()
    return resnet


def build_xbn_resnet(bfn_cfg: BFNConfig = None, bfn_position: int = 2, xbn_every: int = 1, stem_bfn: bool = False,
                     zero_init_residual: bool = False, resnet_type: str = "ResNet", **resnet_args) -> nn.Module:
    """``type='XBNResNet'``: the current toolkit's ResNet with XBNBlocks (Huang et al., CVPR 2022).

    Args:
        bfn_cfg: the batch-free normalizer, in norm_cfg style: ``dict(type='GN', num_groups=64)``
            (None: this, the paper's XBNBlockGN), ``dict(type='IN')`` (no affine, as the
            authors) or ``dict(type='SN')`` (SN without its BN branch); ``requires_grad``
            (default True) is the BFN's own, so ``norm_cfg=dict(type='BN', requires_grad=False)``
            gives frozen BNs and trainable BFNs, the paper's COCO fine-tuning.
        bfn_position: 1, 2 or 3 (P1/P2/P3): which norm of each block's main path becomes the
            BFN (in a BasicBlock 1 and 2 are its first norm, 3 its second).
        xbn_every: 1, 2, 4 or 8 (D1/D2/D4/D8): only every that-many-th block, counted across
            the network.
        stem_bfn: also the stem's BN(s), as the authors' code does.
        zero_init_residual: False by default, unlike the toolkits' ResNets: the paper uses no
            zero-gamma initialisation (True zero-initialises each block's last norm, the BFN at P3).
        resnet_type: the toolkit's backbone to convert: 'ResNet', or e.g. 'ResNetV1c' (mmseg's
            deep-stem default), 'ResNetV1d', 'ResNeXt'.
        **resnet_args: that backbone's own arguments (``depth``, ``norm_cfg`` for the remaining
            BNs, ``frozen_stages``, ``norm_eval``, ``init_cfg``, ...).

    The BFN takes the BN's place and name (``layer1.0.bn2``), so a BN ResNet checkpoint loads
    into every layer that exists in both (the BN statistics at the BFN positions are reported as
    unexpected keys by mmengine's loader), and shortcut BNs stay BN.
    """
    return _build_xbn("XBNResNet", resnet_type, bfn_cfg, bfn_position, xbn_every, stem_bfn, zero_init_residual,
                      resnet_args)


def build_xbn_resnext(bfn_cfg: BFNConfig = None, bfn_position: int = 2, xbn_every: int = 1, stem_bfn: bool = False,
                      zero_init_residual: bool = False, resnet_type: str = "ResNeXt", **resnet_args) -> nn.Module:
    """``type='XBNResNeXt'``: the current toolkit's ResNeXt with XBNBlocks; see :func:`build_xbn_resnet`."""
    return _build_xbn("XBNResNeXt", resnet_type, bfn_cfg, bfn_position, xbn_every, stem_bfn, zero_init_residual,
                      resnet_args)


XBN_BACKBONES: Dict[str, Callable[..., nn.Module]] = {
    "XBNResNet": build_xbn_resnet,
    "XBNResNeXt": build_xbn_resnext,
}


# ---------------------------------------------------------------------------------------------
# Consistent Normalization: training by Algorithm 1 or by tag, inference with one branch
# ---------------------------------------------------------------------------------------------

class ResizeView:
    """A CN view: the input batch (N, C, H, W) resized to ``size`` (an int for a square, or
    (H, W)) or by ``scale_factor``, as the paper's multi-resolution views (224 -> 192, 128).

    Bilinear with antialiasing by default, so that a smaller view is a smaller image rather than
    an aliased one. Only the images change: use it where the targets do not depend on the image
    size (classification labels).
    """

    def __init__(self, size: Union[int, Sequence[int], None] = None, scale_factor: Optional[float] = None,
                 mode: str = "bilinear", antialias: bool = True) -> None:
        if (size is None) == (scale_factor is None):
            raise ValueError(f"ResizeView: give either size or scale_factor, got size={size!r}, "
                             f"scale_factor={scale_factor!r}")
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
        self.scale_factor = scale_factor
        self.mode = mode
        self.antialias = antialias and mode in ("bilinear", "bicubic")

    def __call__(self, inputs: Tensor) -> Tensor:
        corners = {"align_corners": False} if self.mode in ("linear", "bilinear", "bicubic", "trilinear") else {}
        return F.interpolate(inputs, size=self.size, scale_factor=self.scale_factor, mode=self.mode,
                             antialias=self.antialias, **corners)

    def __repr__(self) -> str:
        what = f"size={self.size}" if self.size is not None else f"scale_factor={self.scale_factor}"
        return f"ResizeView({what}, mode={self.mode!r})"


# View types a config names: dict(type='Resize', size=192).
VIEW_TYPES: Dict[str, Callable[..., Callable[[Tensor], Tensor]]] = {"Resize": ResizeView}

View = Union[None, Mapping[str, Any], Callable[[Tensor], Tensor]]


def _build_view(view: View, index: int) -> Optional[Callable[[Tensor], Tensor]]:
    if view is None or callable(view):
        return view
    if isinstance(view, Mapping):
        options = dict(view)
        kind = options.pop("type", None)
        if kind in VIEW_TYPES:
            return VIEW_TYPES[kind](**options)
    raise ValueError(f"ConsistentNormModel: view {index} is {view!r}; give None (the identity), a dict with type "
                     f"one of {sorted(VIEW_TYPES)} (e.g. dict(type='Resize', size=192)), or a callable on the "
                     f"input batch")


class ConsistentNormModel(BaseModel):
    """A model with CN layers, trained the CN paper's way and evaluated with one branch.

    Training takes one of two forms:

    * ``views`` (the paper's Algorithm 1): for every batch and every view ``k``, the input
      batch made by view ``k`` runs through branch ``k``; the losses of all views are summed
      with weight 1 (keys ``branch<k>.<loss name>``) and one optimizer step follows. View 0
      is the identity (None), the branch inference uses. Each view is its own forward, so
      views may differ in size; the graphs of all views are held until the one backward, as
      for a batch ``len(views)`` times larger.
    * ``branch_of`` (a branch per dataset, the paper's Cityscapes + GTA5 setting): each sample
      goes through the branch of its tag, read from its data sample's metainfo ``tag_key``
      (``CNBranchTag`` in a dataset's pipeline writes it; add ``'cn_tag'`` to the packing
      transform's ``meta_keys``); BN branches take their statistics over their own samples.
      Every CN layer must see the whole batch (a backbone and a segmentation head do; an RoI
      head does not). A batch without a sample of some dataset leaves that branch unused: under
      distributed training set ``find_unused_parameters=True``.

    ``val_step``, ``test_step`` and ``mode='predict'`` / ``'tensor'`` forwards run the whole
    batch through ``test_branch`` (0; another branch evaluates a known test transform, e.g.
    the 128 px branch on 128 px images, the paper's "dynamic inference").

    The model is held as ``self.model``: checkpoint keys start with ``model.``; a plain model
    of one branch is :func:`sn_plugin.export_branch` of ``self.model``.

    Args:
        model: the model (config dict or module), with CN layers of at least as many branches
            as views (``norm_cfg=dict(type='CN', num_branches=3)``).
        views: per branch, None (the identity), a view config (``dict(type='Resize', size=192)``)
            or a callable on the preprocessed input batch.
        branch_of: tag -> branch, e.g. ``dict(cityscapes=0, gta5=1)``.
        tag_key: the metainfo key of the tags.
        test_branch: the branch of inference.
        data_preprocessor: given to ``model`` when its config has none (the Runner passes the
            config's top-level ``data_preprocessor`` here); the model's own preprocessor is this
            model's.
    """

    def __init__(self, model: Union[Mapping, nn.Module], views: Optional[Sequence[View]] = None,
                 branch_of: Optional[Mapping[str, int]] = None, tag_key: str = CN_TAG_KEY, test_branch: int = 0,
                 data_preprocessor: Optional[Union[Mapping, nn.Module]] = None,
                 init_cfg: Optional[Union[Mapping, list]] = None) -> None:
        if (views is None) == (branch_of is None):
            raise ValueError("ConsistentNormModel: give either views (one per branch: the paper's Algorithm 1) or "
                             "branch_of (a branch per data-sample tag, e.g. dict(cityscapes=0, gta5=1)), not "
                             f"{'both' if views is not None else 'neither'}")
        if isinstance(model, Mapping):
            model = copy.deepcopy(dict(model))
            if data_preprocessor is not None:
                model.setdefault("data_preprocessor", data_preprocessor)
            model = MODELS.build(model)
        super().__init__(data_preprocessor=model.data_preprocessor, init_cfg=init_cfg)
        self.model = model
        layers = consistent_norm_layers(model)
        if not layers:
            raise ValueError(f"ConsistentNormModel: {type(model).__name__} has no CN layers; build its norm layers "
                             f"with norm_cfg=dict(type='CN', num_branches=...)")
        branches = min(layer.num_branches for layer in layers.values())
        self.views = self.branch_of = None
        if views is not None:
            self.views = [_build_view(view, k) for k, view in enumerate(views)]
            if not self.views:
                raise ValueError("ConsistentNormModel: views is empty; view 0 is the identity (None)")
            used = len(self.views)
        else:
            self.branch_of = dict(branch_of)
            if not self.branch_of or not all(isinstance(b, int) and b >= 0 for b in self.branch_of.values()):
                raise ValueError(f"ConsistentNormModel: branch_of must map each tag to a branch index >= 0, got "
                                 f"{self.branch_of!r}")
            used = max(self.branch_of.values()) + 1
        if used > branches:
            raise ValueError(f"ConsistentNormModel: {used} branches are used but the model's CN layers have "
                             f"{branches}; build them with num_branches={used}")
        self.tag_key = tag_key
        if not (isinstance(test_branch, int) and 0 <= test_branch < branches):
            raise ValueError(f"ConsistentNormModel: test_branch must be one of the CN layers' branches "
                             f"0..{branches - 1}, got {test_branch!r}")
        self.test_branch = test_branch

    def forward(self, inputs, data_samples=None, mode: str = "tensor"):
        if mode == "loss":
            return self._losses(inputs, data_samples)
        with consistent_branch(self.model, self.test_branch):
            return self.model(inputs, data_samples, mode)

    def _losses(self, inputs, data_samples) -> Dict[str, Any]:
        if self.branch_of is not None:
            tags = [self._tag_of(sample, i) for i, sample in enumerate(data_samples or [])]
            with consistent_branch(self.model, branch_assignment(tags, self.branch_of)):
                return self.model(inputs, data_samples, "loss")
        if not isinstance(inputs, Tensor) and any(view is not None for view in self.views):
            raise TypeError(f"ConsistentNormModel: the views transform the preprocessed input batch, which must be "
                            f"a tensor; this model's data preprocessor gives a {type(inputs).__name__}")
        losses: Dict[str, Any] = {}
        for k, view in enumerate(self.views):
            with consistent_branch(self.model, k):
                branch_losses = self.model(inputs if view is None else view(inputs), data_samples, "loss")
            losses.update((f"branch{k}.{name}", value) for name, value in branch_losses.items())
        return losses

    def _tag_of(self, sample, index: int) -> str:
        tag = sample.metainfo.get(self.tag_key) if hasattr(sample, "metainfo") else None
        if tag is None:
            raise KeyError(f"ConsistentNormModel: data sample {index} has no '{self.tag_key}' in its metainfo; put "
                           f"dict(type='CNBranchTag', tag=...) in each dataset's pipeline and '{self.tag_key}' in "
                           f"the packing transform's meta_keys")
        return tag


class CNBranchTag:
    """A pipeline transform that tags every sample of a dataset (``results['cn_tag'] = tag``), for
    :class:`ConsistentNormModel`'s ``branch_of``; the packing transform must list ``'cn_tag'``
    in its ``meta_keys``."""

    def __init__(self, tag: str) -> None:
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"CNBranchTag: tag must be a non-empty string (e.g. the dataset's name), got {tag!r}")
        self.tag = tag

    def __call__(self, results: dict) -> dict:
        results[CN_TAG_KEY] = self.tag
        return results

    def __repr__(self) -> str:
        return f"CNBranchTag(tag={self.tag!r})"


class SourceBatchSampler(BatchSampler):
    """Batches whose samples all come from one dataset of a ``ConcatDataset``, for a CN branch per dataset.

    With a branch per dataset, a mixed batch splits into one part per branch and a BN branch
    takes its statistics over its part only: at 2 images per GPU that can be a single image,
    whose 1x1 maps (ASPP's image pooling) BN cannot normalize in training. Drawing each batch
    from one dataset keeps the BN batch the whole batch. The indices come from ``sampler`` in
    its order; each dataset fills its own batch, which is yielded when full. Meant for
    iteration-based training over an ``InfiniteSampler`` (the segmentation configs); with a
    finite sampler the partial batches are yielded at the end (unless ``drop_last``) and, as for
    mmdet's aspect-ratio sampler, ``len`` counts ``len(sampler) / batch_size`` batches.
    """

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool = False) -> None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"SourceBatchSampler: batch_size must be a positive int, got {batch_size!r}")
        ends = getattr(getattr(sampler, "dataset", None), "cumulative_sizes", None)
        if ends is None:
            raise TypeError(f"SourceBatchSampler groups the datasets of a ConcatDataset, but the sampler's dataset "
                            f"is a {type(getattr(sampler, 'dataset', None)).__name__}; use "
                            f"dataset=dict(type='ConcatDataset', datasets=[...])")
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self._ends = list(ends)

    def __iter__(self) -> Iterator[List[int]]:
        batches: List[List[int]] = [[] for _ in self._ends]
        for index in self.sampler:
            batch = batches[bisect.bisect_right(self._ends, index)]
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch[:]
                batch.clear()
        if not self.drop_last:
            yield from (batch for batch in batches if batch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size if self.drop_last else -(-len(self.sampler) // self.batch_size)


# ---------------------------------------------------------------------------------------------
# Estimation shift
# ---------------------------------------------------------------------------------------------

class EstimationShiftHook(Hook):
    """The estimation shift magnitude (ESM) of every layer with running statistics, over training.

    After every ``interval``-th training epoch (``by_epoch``, default) or iteration, and after
    the last one, :func:`sn_plugin.estimation_shift` runs the model in eval mode over the
    validation data (the paper's test set S'; ``dataloader='test'`` for the test data) through
    its ``val_step``, i.e. exactly as validation does. The main process:

    * logs one line (the mean and the largest ESM_mu / ESM_sigma and their layers);
    * sends ``esm/mu_mean``, ``esm/mu_max``, ``esm/sigma_mean``, ``esm/sigma_max`` to the
      visualizer (e.g. TensorBoard);
    * rewrites ``estimation_shift.csv`` (every layer at every measurement) and
      ``estimation_shift.png`` (each layer's ESM against the epoch, the paper's Figs. 2-5) in
      the run's log folder.

    The model's train flags and buffers are as before afterwards. Under distributed training
    only the main process measures, on its own part of the data.

    Args:
        interval: measure every that many epochs (or iterations).
        by_epoch: count epochs (True) or iterations.
        dataloader: 'val' or 'test': whose batches to measure on.
        max_batches: at most that many batches per measurement (None: all).
        plot: write the figure too.
    """

    priority = "LOW"  # after the hooks that change statistics (SNBatchStatsHook) and before the loggers'

    def __init__(self, interval: int = 1, by_epoch: bool = True, dataloader: str = "val",
                 max_batches: Optional[int] = None, plot: bool = True) -> None:
        if interval <= 0:
            raise ValueError(f"EstimationShiftHook: interval must be positive, got {interval}")
        if dataloader not in ("val", "test"):
            raise ValueError(f"EstimationShiftHook: dataloader must be 'val' or 'test', got {dataloader!r}")
        if max_batches is not None and max_batches <= 0:
            raise ValueError(f"EstimationShiftHook: max_batches must be positive or None, got {max_batches}")
        self.interval = interval
        self.by_epoch = by_epoch
        self.dataloader = dataloader
        self.max_batches = max_batches
        self.log = EstimationShiftLog("epoch" if by_epoch else "iteration", plot)

    def before_train(self, runner) -> None:
        loop = runner.val_loop if self.dataloader == "val" else runner.test_loop
        if loop is None:
            raise RuntimeError(f"EstimationShiftHook measures on the {self.dataloader} data (the paper's test set), "
                               f"but the runner has no {self.dataloader} loop; configure {self.dataloader}_dataloader, "
                               f"{self.dataloader}_cfg and {self.dataloader}_evaluator, or pass "
                               f"dataloader='{'test' if self.dataloader == 'val' else 'val'}'")

    def after_train_epoch(self, runner) -> None:
        if self.by_epoch and is_due(runner.epoch + 1, self.interval, runner.max_epochs):
            self._measure(runner, runner.epoch + 1)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self.by_epoch and is_due(runner.iter + 1, self.interval, runner.max_iters):
            self._measure(runner, runner.iter + 1)

    def _measure(self, runner, step: int) -> None:
        if not is_main_process():
            return
        model = unwrap_model(runner.model, is_model_wrapper)
        loader = runner.val_dataloader if self.dataloader == "val" else runner.test_dataloader
        report = estimation_shift(model, loader, forward=lambda m, batch: m.val_step(batch),
                                  max_batches=self.max_batches)
        scalars = self.log.record(step, report, runner.log_dir)
        runner.logger.info(self.log.summary(type(self).__name__, step, report))
        runner.visualizer.add_scalars(scalars, step=step)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

def register_family_types() -> None:
    """Register CN's norm types, the XBN backbones, ``ConsistentNormModel``, ``CNBranchTag``,
    ``SourceBatchSampler`` and ``EstimationShiftHook`` in mmengine's root registries (idempotent)."""
    for name, obj in {**CN_NORM_TYPES, **XBN_BACKBONES, "ConsistentNormModel": ConsistentNormModel}.items():
        register_once(MODELS, name, obj)
    register_once(TRANSFORMS, "CNBranchTag", CNBranchTag)
    register_once(DATA_SAMPLERS, "SourceBatchSampler", SourceBatchSampler)
    register_once(HOOKS, "EstimationShiftHook", EstimationShiftHook)
