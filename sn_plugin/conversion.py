"""Turning a network's normalization layers into SN and back.

* :func:`convert_to_sn`: BatchNorm (incl. SyncBatchNorm and frozen BN),
  GroupNorm, InstanceNorm (and, on request, LayerNorm over channels) become SN
  layers that start out computing what the original layer did.
* :func:`convert_sync_sn` / :func:`revert_sync_sn`: SN <-> synchronized SN, as
  ``nn.SyncBatchNorm.convert_sync_batchnorm`` does for BatchNorm.
* :func:`sparsify`: the paper's sparse SN (Sec. 2.1, "Variants of SN"): every
  layer keeps only its strongest normalizer, for deployment or fine-tuning.

None of them modifies the model it is given: each returns a converted copy, so
a model (or the checkpoint it was loaded from) that a user still holds stays as
it was. Build the optimizer for the returned model.
"""
import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .functional import BN, IN, LN
from .switchable_norm import (
    FrozenSwitchNorm, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchNormBase, SwitchNormNd, SyncSwitchNorm,
)

__all__ = [
    "BatchNormXd", "ConversionOptions", "SNSource", "convert_sync_sn", "convert_to_sn", "looks_like_batch_norm",
    "register_sn_converter", "replace_modules", "revert_sync_sn", "sparsify",
]


class BatchNormXd(_BatchNorm):
    """BatchNorm for (N, C, *) inputs of any rank: what :func:`sparsify` makes of a
    :class:`SwitchNormNd` whose choice is BN for both statistics."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNormXd expects an (N, C, *) input, got shape {tuple(input.shape)}")


_SN_BY_RANK_SUFFIX = {"1d": SwitchNorm1d, "2d": SwitchNorm2d, "3d": SwitchNorm3d}
# Searched in order with isinstance, so subclasses (e.g. a user's SwitchNorm2d with extra
# attributes) get their base class's BatchNorm.
_BN_FOR_SN: Tuple[Tuple[type, type], ...] = (
    (SyncSwitchNorm, nn.SyncBatchNorm), (SwitchNorm1d, nn.BatchNorm1d), (SwitchNorm2d, nn.BatchNorm2d),
    (SwitchNorm3d, nn.BatchNorm3d),
)


def _sn_class_for(source: nn.Module) -> Type[SwitchNormBase]:
    """The SN class accepting the inputs ``source`` accepts: by the rank in its class name."""
    name = type(source).__name__
    for suffix, cls in _SN_BY_RANK_SUFFIX.items():
        if name.endswith(suffix) or name.endswith(suffix.upper()):
            return cls
    return SwitchNormNd


# ---------------------------------------------------------------------------------------------
# Synchronized SN
# ---------------------------------------------------------------------------------------------

_PROCESS_GROUP_ATTRIBUTES = ("process_group", "group")


def replace_modules(model: nn.Module, convert: Callable[[str, nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Copy ``model`` and replace, top-down, every module for which ``convert(name, module)``
    returns a replacement; the replacement's children are not visited."""
    # Process groups (torch's ``process_group``, mmcv's ``group``) are handles to shared
    # communicators: the copy uses the same ones.
    shared = {id(g): g for m in model.modules() for attr in _PROCESS_GROUP_ATTRIBUTES
              if (g := getattr(m, attr, None)) is not None}
    model = copy.deepcopy(model, memo=shared)

    def visit(name: str, module: nn.Module) -> nn.Module:
        replacement = convert(name, module)
        if replacement is not None:
            return replacement
        for child_name, child in list(module.named_children()):
            new_child = visit(f"{name}.{child_name}" if name else child_name, child)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    return visit("", model)


def convert_sync_sn(model: nn.Module, process_group=None) -> nn.Module:
    """A copy of ``model`` with every (non-synchronized) SN layer made a :class:`SyncSwitchNorm`.

    The SN counterpart of ``nn.SyncBatchNorm.convert_sync_batchnorm``, but it
    does not modify ``model``: the result is a deep copy (so build the
    optimizer for the returned model). Parameters, buffers, training mode,
    ``requires_grad``, device and dtype carry over. ``process_group`` scopes
    the synchronization (default: the whole world). Returns a new
    SyncSwitchNorm if ``model`` itself is an SN layer.
    """

    def convert(name, module):
        if isinstance(module, SwitchNormBase) and not isinstance(module, SyncSwitchNorm):
            new = module.rebuilt_as(SyncSwitchNorm, process_group=process_group)
            new._sn_unsynced_class = type(module)
            return new
        return None

    return replace_modules(model, convert)


def revert_sync_sn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`SyncSwitchNorm` made a local SN layer again.

    The inverse of :func:`convert_sync_sn` (e.g. to evaluate on one process
    inside a distributed job): a layer made by it gets its original class back;
    any other SyncSwitchNorm becomes a :class:`SwitchNormNd` (any input rank).
    Carries what :func:`convert_sync_sn` carries; ``model`` is not modified.
    """

    def convert(name, module):
        if isinstance(module, SyncSwitchNorm):
            return module.rebuilt_as(getattr(module, "_sn_unsynced_class", SwitchNormNd))
        return None

    return replace_modules(model, convert)


# ---------------------------------------------------------------------------------------------
# Other normalizers -> SN
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConversionOptions:
    """How :func:`convert_to_sn` builds each SN layer; passed to every converter.

    Attributes:
        original_weight: the importance weight the original normalizer starts
            with (the other branches share the rest equally).
        using_moving_average: the new layers' ``using_moving_average``.
    """

    original_weight: float
    using_moving_average: bool


@dataclass
class SNSource:
    """What a converter reads off a normalization layer, in SN's terms (see :func:`register_sn_converter`)."""

    num_features: int
    eps: float
    branch_weights: Tuple[float, float, float]  # target importance weights [IN, LN, BN]
    weight: Optional[Tensor] = None  # gamma (None: not affine)
    bias: Optional[Tensor] = None
    running_mean: Optional[Tensor] = None
    running_var: Optional[Tensor] = None
    num_batches_tracked: Optional[Tensor] = None
    momentum: Optional[float] = 0.1
    track_running_stats: bool = True
    cls: Optional[Type[SwitchNormBase]] = None  # default: by the source's class name
    extra: Optional[dict] = None  # further constructor arguments (process_group)
    inexact: str = ""  # why the converted layer cannot compute exactly what the source did


def _favouring(branch: int, options: ConversionOptions) -> Tuple[float, float, float]:
    weights = [(1.0 - options.original_weight) / 2] * 3
    weights[branch] = options.original_weight
    return tuple(weights)


def _from_batch_norm(m: nn.Module, options: ConversionOptions) -> SNSource:
    """torch's BatchNorms and the duck-typed ones of other libraries (see looks_like_batch_norm)."""
    sync = isinstance(m, nn.SyncBatchNorm) or "sync" in type(m).__name__.lower()
    group = getattr(m, "process_group", getattr(m, "group", None))  # mmcv's SyncBatchNorm: ``group``
    running_mean = getattr(m, "running_mean", None)
    return SNSource(
        m.num_features if hasattr(m, "num_features") else running_mean.numel(), m.eps, _favouring(BN, options),
        weight=getattr(m, "weight", None), bias=getattr(m, "bias", None),
        running_mean=running_mean, running_var=getattr(m, "running_var", None),
        num_batches_tracked=getattr(m, "num_batches_tracked", None), momentum=getattr(m, "momentum", 0.1),
        track_running_stats=running_mean is not None,
        cls=SyncSwitchNorm if sync else None, extra={"process_group": group} if sync else None,
    )


def _from_instance_norm(m: _InstanceNorm, options: ConversionOptions) -> SNSource:
    inexact = ""
    if m.track_running_stats:
        inexact = ("InstanceNorm with track_running_stats=True normalizes with running statistics in eval; "
                   "SN's IN branch always uses the instance's own")
    return SNSource(m.num_features, m.eps, _favouring(IN, options), weight=m.weight, bias=m.bias,
                   momentum=m.momentum, inexact=inexact)


def _from_group_norm(m: nn.GroupNorm, options: ConversionOptions) -> SNSource:
    groups, channels = m.num_groups, m.num_channels
    if groups == channels:
        weights, inexact = _favouring(IN, options), ""
    elif groups == 1:
        weights, inexact = _favouring(LN, options), ""
    else:
        # GroupNorm lies between IN (one channel per group) and LN (all channels in
        # one group); start SN at the same place on a log scale of the group size.
        t = math.log(channels / groups) / math.log(channels)
        w = options.original_weight
        weights = ((1 - t) * w, t * w, 1 - w)
        inexact = (f"GroupNorm({groups}, {channels}) has no SN equivalent (only 1 group = LN or one group "
                   f"per channel = IN have); it starts as {weights[0]:.2f} IN + {weights[1]:.2f} LN")
    return SNSource(channels, m.eps, weights, weight=m.weight, bias=m.bias, cls=SwitchNormNd, inexact=inexact)


def _from_layer_norm(m: nn.LayerNorm, options: ConversionOptions) -> Optional[SNSource]:
    if len(m.normalized_shape) != 1:
        return None  # normalizes over more than the channels: not a per-sample channel statistic SN has
    bias = getattr(m, "bias", None)
    return SNSource(m.normalized_shape[0], m.eps, _favouring(LN, options), weight=m.weight, bias=bias,
                   cls=SwitchNorm1d)


def looks_like_batch_norm(m: nn.Module) -> bool:
    """A BatchNorm of a library that does not subclass torch's: ``running_mean``/``running_var``
    buffers, a float ``eps``, no children, and either BN's affine as buffers and no parameters
    (frozen BN: detectron2's and torchvision's ``FrozenBatchNorm2d`` and their likes) or
    "BatchNorm" in the class name (e.g. mmcv.ops.SyncBatchNorm)."""
    buffers = m._buffers
    if m._modules or not isinstance(getattr(m, "eps", None), float) or not all(
            isinstance(buffers.get(k), Tensor) for k in ("running_mean", "running_var")):
        return False
    frozen = not m._parameters and all(isinstance(buffers.get(k), Tensor) for k in ("weight", "bias"))
    return frozen or "batchnorm" in type(m).__name__.lower()


Converter = Callable[[nn.Module, ConversionOptions], Optional[SNSource]]
# (class, converter, also for subclasses); searched in order after an exact-class match.
_CONVERTERS: List[Tuple[type, Converter, bool]] = [
    (_BatchNorm, _from_batch_norm, True),
    (_InstanceNorm, _from_instance_norm, True),
    (nn.GroupNorm, _from_group_norm, True),
]
_LAYER_NORM = (nn.LayerNorm, _from_layer_norm, False)


def register_sn_converter(cls: type, converter: Converter, subclasses: bool = True) -> None:
    """Teach :func:`convert_to_sn` a normalization class of another library.

    ``converter(module, options)`` returns a description of ``module`` in SN's
    terms (use :func:`sn_source` to make one) or None to leave it alone.
    Registered classes take precedence over the built-in ones; with
    ``subclasses`` it also applies to subclasses of ``cls``.
    """
    _CONVERTERS.insert(0, (cls, converter, subclasses))


def sn_source(num_features: int, eps: float, branch_weights: Sequence[float], **fields) -> SNSource:
    """A layer's description for :func:`register_sn_converter` converters: ``branch_weights``
    are the starting importance weights [IN, LN, BN]; ``fields`` are ``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``, ``momentum``,
    ``track_running_stats``, ``cls`` (the SN class), ``extra`` and ``inexact``."""
    return SNSource(num_features, eps, tuple(branch_weights), **fields)


def _find_converter(m: nn.Module, layer_norm: bool) -> Optional[Converter]:
    table = _CONVERTERS + ([_LAYER_NORM] if layer_norm else [])
    for cls, converter, _ in table:
        if type(m) is cls:
            return converter
    for cls, converter, subclasses in table:
        if subclasses and isinstance(m, cls):
            return converter
    if looks_like_batch_norm(m):
        return _from_batch_norm
    return None


def _build_sn(source: SNSource, original: nn.Module, options: ConversionOptions) -> SwitchNormBase:
    reference = next(iter([*original.parameters(), *original.buffers()]), None)
    factory = {"device": reference.device if reference is not None else None,
               "dtype": reference.dtype if reference is not None and reference.is_floating_point() else None}
    cls = source.cls or _sn_class_for(original)
    affine = source.weight is not None
    sn = cls(source.num_features, source.eps, source.momentum, affine, source.track_running_stats,
             using_moving_average=options.using_moving_average, **(source.extra or {}), **factory)
    with torch.no_grad():
        if affine:
            sn.weight.copy_(source.weight)
            if source.bias is not None:
                sn.bias.copy_(source.bias)
        if sn.running_mean is not None and source.running_mean is not None:
            sn.running_mean.copy_(source.running_mean)
            sn.running_var.copy_(source.running_var)
            if source.num_batches_tracked is not None:
                sn.num_batches_tracked.copy_(source.num_batches_tracked)
            elif not options.using_moving_average:
                sn.num_batches_tracked.fill_(1)  # the frozen statistics count as estimated
        logits = torch.tensor(source.branch_weights, dtype=torch.float64).log()
        sn.mean_weight.copy_(logits)
        sn.var_weight.copy_(logits)
    params = list(original.parameters(recurse=False))
    if params and not any(p.requires_grad for p in params):
        sn.requires_grad_(False)  # a frozen layer (e.g. a frozen stage) stays frozen
    sn.train(original.training)
    return sn


def convert_to_sn(
    model: nn.Module,
    original_weight: float = 0.999,
    using_moving_average: bool = True,
    layer_norm: bool = False,
    strict: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose normalization layers are Switchable Normalization.

    Converted: BatchNorm 1d/2d/3d and every other ``_BatchNorm`` subclass
    (SyncBatchNorm becomes :class:`SyncSwitchNorm` in the same process group),
    other libraries' BatchNorms matched by their shape: frozen BN
    (detectron2's/torchvision's ``FrozenBatchNorm2d`` and anything with
    ``weight``/``bias``/``running_mean``/``running_var`` buffers, an ``eps`` and
    no parameters; they become trainable SN) and classes named "...BatchNorm..."
    with running statistics and an ``eps`` (e.g. ``mmcv.ops.SyncBatchNorm``; a
    name containing "Sync" gives :class:`SyncSwitchNorm` in its ``group``),
    InstanceNorm, GroupNorm, with ``layer_norm=True`` also ``nn.LayerNorm``
    over a single (channel) dimension, and whatever :func:`register_sn_converter`
    added. gamma/beta, running statistics, ``eps``, ``momentum``, device, dtype,
    training mode and a frozen layer's ``requires_grad=False`` carry over.
    ``model`` itself is not modified.

    Starting point: both logit vectors are set so that the original normalizer
    has importance weight ``original_weight`` and the other two share the rest
    (logits = log of the weights). The default 0.999 (a logit margin of
    log(0.999 / 0.0005) = 7.6) moves each layer's statistics by about 0.1%
    towards the other normalizers, so a pretrained network starts from nearly
    the function it computed, while the logits' gradients, which scale with
    w(1 - w) ~ 1e-3, still move them (much faster with Adam-style optimizers,
    which normalize gradient scale, than with SGD). The deviations add up over
    depth, so deep networks move further from their original outputs (the
    README quotes measurements on ResNets). Raise it when the start must be
    closer (e.g. to evaluate before fine-tuning); lower it (1/3 is the paper's
    uniform start) to let training leave the original normalizer sooner.

    Exactness: BN, IN, GroupNorm with 1 group (= LN) or one group per channel
    (= IN) and LayerNorm over the channels of an (N, C) input have an SN
    branch that is exactly them. Other GroupNorms have none: such a layer
    starts as a mix of IN and LN in the proportion ``t = log(C/G) / log(C)``
    of LN (GroupNorm's place between IN, ``G = C``, and LN, ``G = 1``, on a log
    scale of the group size), and a warning names it; ``strict=True`` raises
    instead. InstanceNorm tracking running statistics is inexact in eval and
    handled the same way.

    ``layer_norm`` is off by default because a module cannot tell what it is
    applied to: ``nn.LayerNorm(C)`` on (N, C) inputs is SN's LN, but on
    (N, L, C) token sequences or channels-last maps (transformers, ConvNeXt) it
    normalizes each position separately, which no SN branch does. Subclasses of
    ``nn.LayerNorm`` (e.g. ConvNeXt's ``LayerNorm2d``) are never converted.

    Args:
        model: any module (also a single normalization layer).
        original_weight: the starting importance weight of the original
            normalizer, in (1/3, 1).
        using_moving_average: passed to every new SN layer. With False, layers
            converted from BatchNorm keep its running statistics as their
            batch-average estimate; recompute them with
            :func:`sn_plugin.recompute_batch_stats` after training.
        layer_norm: also convert ``nn.LayerNorm`` over one dimension.
        strict: raise for a layer that cannot start out exactly equal.

    Raises:
        ValueError: a bad ``original_weight``, or (``strict``) an inexact layer.
    """
    if not 1 / 3 < original_weight < 1:
        raise ValueError(
            f"convert_to_sn: original_weight must lie in (1/3, 1) so that the original normalizer is "
            f"favoured and the softmax logits are finite, got {original_weight}"
        )
    options = ConversionOptions(original_weight, using_moving_average)
    inexact = []

    def convert(name, module):
        if isinstance(module, SwitchNormBase):
            return module
        converter = _find_converter(module, layer_norm)
        source = converter(module, options) if converter is not None else None
        if source is None:
            return None
        if source.inexact:
            if strict:
                raise ValueError(f"convert_to_sn: {name or type(module).__name__}: {source.inexact}. "
                                 f"Pass strict=False to convert it anyway.")
            inexact.append(f"{name or type(module).__name__}: {source.inexact}")
        return _build_sn(source, module, options)

    converted = replace_modules(model, convert)
    if inexact:
        warnings.warn("convert_to_sn: these layers cannot start out computing exactly what they did:\n  "
                      + "\n  ".join(inexact), stacklevel=2)
    return converted


# ---------------------------------------------------------------------------------------------
# Sparse SN
# ---------------------------------------------------------------------------------------------

# Logit gap of a hard choice: exp(-1e4) is 0 in every floating dtype, so the choice is
# an exact one-hot; finite, unlike -inf, so weight decay or an optimizer cannot make it NaN.
_HARD_MARGIN = 1e4


def _batch_norm_from(sn: SwitchNormBase) -> _BatchNorm:
    """The BatchNorm that computes what an SN layer choosing BN for mean and variance computes."""
    cls = next((bn for sn_cls, bn in _BN_FOR_SN if isinstance(sn, sn_cls)), BatchNormXd)
    extra = {"process_group": sn.process_group} if cls is nn.SyncBatchNorm else {}
    bn = cls(sn.num_features, sn.eps, sn.momentum, sn.affine, sn.track_running_stats, device="meta", **extra)
    for name in ("weight", "bias"):
        setattr(bn, name, getattr(sn, name))
    for name, buffer in sn._buffers.items():
        setattr(bn, name, buffer)
    bn.train(sn.training)
    return bn


def _group_norm_from(sn: SwitchNormBase, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with one group per channel (= IN) or one group (= LN), with the SN layer's affine."""
    gn = nn.GroupNorm(num_groups, sn.num_features, sn.eps, sn.affine, device="meta")
    for name in ("weight", "bias"):
        setattr(gn, name, getattr(sn, name))
    gn.train(sn.training)
    return gn


def _plain_layer_for(sn: SwitchNormBase, choice: int) -> Optional[nn.Module]:
    """The torch layer that computes exactly what ``sn`` computes when it uses branch ``choice`` for
    both statistics; None where there is none."""
    if isinstance(sn, FrozenSwitchNorm) or sn.unbiased_instance_var:
        return None  # frozen layers stay frozen; torch's layers have no unbiased instance variance
    if choice == BN:
        return _batch_norm_from(sn)
    if choice == LN:
        return _group_norm_from(sn, 1)
    # IN: GroupNorm(C, C), unless the layer may see (N, C) inputs, which have no IN branch
    return _group_norm_from(sn, sn.num_features) if 2 not in sn._expected_dims else None


def _hard_choice(logits: Tensor) -> int:
    """Make ``logits`` a hard one-hot choice of their argmax, for inputs with spatial dimensions and
    for (N, C) inputs alike (those ignore the IN logit and choose the stronger of the others);
    returns the choice. Where the two differ (IN is the argmax) the layer stays SN."""
    choice = int(logits.argmax())
    channels_only_choice = 1 + int(logits[1:].argmax())
    logits.fill_(-2 * _HARD_MARGIN)
    logits[channels_only_choice] = -_HARD_MARGIN
    logits[choice] = 0.0
    return choice


def sparsify(model: nn.Module, freeze: bool = True) -> nn.Module:
    """A copy of ``model`` as sparse SN: each layer keeps only its strongest normalizer.

    The paper's sparse SN (Sec. 2.1, "Variants of SN"): per SN layer, the
    argmax of the importance weights is chosen, separately for the mean and
    for the variance, and the logits become a hard one-hot choice (a logit gap
    so large that the other branches weigh exactly 0; for (N, C) inputs, which
    have no IN branch, the stronger of LN and BN). The layer then computes one
    normalizer's statistics, which is cheaper and deploys like a plain one.

    With ``freeze`` (default) the choice is fixed for fine-tuning and
    deployment: the logits stop requiring gradients, and a layer that chose the
    same normalizer for both statistics becomes the torch layer that computes
    exactly that: BN -> BatchNorm (``SyncBatchNorm`` for a synchronized layer,
    :class:`BatchNormXd` for a rank-free one; in eval a per-channel affine that
    can be fused into the preceding convolution; in training SN's BN branch
    behaviour, batch statistics and running averages with the layer's
    momentum), LN -> ``GroupNorm(1, C)``, IN -> ``GroupNorm(C, C)`` (only for
    layers that cannot receive (N, C) inputs). Such a model exports (ONNX,
    ``torch.export``) as plain normalization operators. Layers that keep SN:
    a mixed choice (e.g. IN means with BN variances), ``FrozenSwitchNorm``, and
    layers in the authors' convention (``unbiased_instance_var=True``), whose
    unbiased instance variance no torch layer computes. Without ``freeze`` every
    layer stays SN with trainable logits (their gradients vanish at a hard
    choice, so the choice stays in practice; use it when a checkpoint or
    optimizer expects the parameters). ``model`` is not modified.
    """

    def convert(name, module):
        if not isinstance(module, SwitchNormBase):
            return None
        with torch.no_grad():
            mean_choice = _hard_choice(module.mean_weight)
            var_choice = _hard_choice(module.var_weight)
        if freeze:
            module.mean_weight.requires_grad_(False)
            module.var_weight.requires_grad_(False)
            plain = _plain_layer_for(module, mean_choice) if mean_choice == var_choice else None
            if plain is not None:
                return plain
        return module

    return replace_modules(model, convert)
