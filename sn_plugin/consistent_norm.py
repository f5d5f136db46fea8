"""Consistent Normalization (CN; Zhou, Ma, Li, Zhang and Luo): one normalizer per data transform.

A CN layer holds ``num_branches`` complete normalization layers of one kind
(BatchNorm by default), each with its own affine parameters and, for BN and
SN, its own running statistics. Branch ``k`` normalizes the data made by the
transform ``T_k`` of the training recipe, so that augmented data never blends
into the statistics of clean data; the weights of the rest of the network are
shared. Branch 0 belongs to the identity transform (the paper's ``T_1``) and is
what inference uses unless told otherwise.

The branches are ordinary modules (``nn.BatchNorm2d``, ``nn.GroupNorm``,
:class:`~sn_plugin.SwitchNorm2d`, ...) under ``branches.<k>``, so everything
that recognises a normalization layer by its class keeps working on them:
OpenMMLab's ``norm_eval`` (puts every BN branch in eval mode), parameter-wise
weight decay for norms, ``FrozenBatchNorm2d.convert_frozen_batchnorm``, and
exporting one branch is taking the module out (:func:`sn_plugin.export_branch`).

Which branch runs is set on the layer, usually for a whole model by
:func:`sn_plugin.consistent_branch`:

* ``active_branch`` (an int): the whole batch goes through that branch;
* ``sample_branches`` (one branch index per sample, or None): each sample goes
  through its own branch, e.g. a batch made of several views concatenated, or
  of samples from several datasets (one branch per dataset). BN branches then
  take their statistics over their own samples only, exactly as if each
  branch's samples had been a batch of their own.
"""
import copy
from typing import Any, Callable, Dict, Optional, Sequence, Type, Union

import torch
from torch import Tensor, nn

from .switchable_norm import (
    FrozenSwitchNorm, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchNormBase, SwitchNormNd,
)

__all__ = ["CN_NORMS", "ConsistentNorm", "ConsistentNorm1d", "ConsistentNorm2d", "ConsistentNorm3d"]

_BN_BY_RANK = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_SN_BY_RANK = {None: SwitchNormNd, 1: SwitchNorm1d, 2: SwitchNorm2d, 3: SwitchNorm3d}


def _batch_norm(rank: Optional[int], num_features: int, **options) -> nn.Module:
    if rank is None:
        raise ValueError(
            "ConsistentNorm(norm='BN') needs the input's rank to pick BatchNorm1d/2d/3d: use "
            "ConsistentNorm1d, ConsistentNorm2d or ConsistentNorm3d, or norm='SyncBN' (any rank)"
        )
    return _BN_BY_RANK[rank](num_features, **options)


def _group_norm(rank: Optional[int], num_features: int, num_groups: Optional[int] = None, **options) -> nn.Module:
    if num_groups is None:
        raise ValueError("ConsistentNorm(norm='GN') needs num_groups, e.g. dict(type='CN', norm='GN', num_groups=32)")
    return nn.GroupNorm(num_groups, num_features, **options)


# The base normalizers a CN layer can be made of, by name. "LN" is the layer norm of the
# normalization papers (statistics over (C, *) of each sample, GroupNorm with one group),
# not torch's nn.LayerNorm over the trailing dimensions.
CN_NORMS: Dict[str, Callable[..., nn.Module]] = {
    "BN": _batch_norm,
    "SyncBN": lambda rank, num_features, **options: nn.SyncBatchNorm(num_features, **options),
    "GN": _group_norm,
    "LN": lambda rank, num_features, **options: nn.GroupNorm(1, num_features, **options),
    "SN": lambda rank, num_features, **options: _SN_BY_RANK[rank](num_features, **options),
}


class ConsistentNorm(nn.Module):
    """Consistent Normalization: ``num_branches`` private normalizers, one per data transform.

    Also the base class of the rank-specific layers (use it for ``isinstance``
    checks). This class fixes no input rank, so its base normalizer must not
    need one either ('SyncBN', 'GN', 'LN', 'SN' or a class); BN needs
    :class:`ConsistentNorm1d`/`2d`/`3d`.

    Args:
        num_features: C of an (N, C, ...) input (of an (N, ..., C) one for a
            channels-last normalizer such as ``nn.LayerNorm``).
        num_branches: how many transforms (branches) there are, including the
            identity (branch 0).
        norm: the base normalizer: 'BN' (default), 'SyncBN', 'GN' (give
            ``num_groups``), 'LN' (one group over (C, *)), 'SN'
            (:class:`~sn_plugin.SwitchNorm2d` and friends), or a normalization
            class called as ``norm(num_features, **norm_options)`` (e.g.
            ``nn.LayerNorm`` for a transformer's (N, L, C) tokens, as in the
            paper's translation experiment).
        **norm_options: passed to every branch's constructor (e.g. ``eps``,
            ``momentum``, ``affine``, ``num_groups``, SN's
            ``using_moving_average``).

    Every branch starts identical (freshly initialised). The branches the
    current forward does not use are not called, so their running statistics
    and parameters stay as they are ("spare branches keep their statistics").
    """

    _abbr_ = "cn"  # mmcv's build_norm_layer names layers by it: cn1, cn2, ...
    _rank: Optional[int] = None  # the input rank without N and C that picks BN/SN classes

    def __init__(self, num_features: int, num_branches: int = 2, norm: Union[str, Type[nn.Module]] = "BN",
                 **norm_options: Any) -> None:
        super().__init__()
        if not isinstance(num_branches, int) or num_branches < 1:
            raise ValueError(f"{type(self).__name__}: num_branches must be a positive int, got {num_branches!r}")
        if isinstance(norm, str):
            if norm not in CN_NORMS:
                raise ValueError(f"{type(self).__name__}: unknown norm {norm!r}; choose one of {sorted(CN_NORMS)} "
                                 f"or pass a normalization class")
            build = lambda: CN_NORMS[norm](self._rank, num_features, **norm_options)  # noqa: E731
        elif isinstance(norm, type) and issubclass(norm, nn.Module):
            build = lambda: norm(num_features, **norm_options)  # noqa: E731
        else:
            raise TypeError(f"{type(self).__name__}: norm must be a name ({sorted(CN_NORMS)}) or an nn.Module "
                            f"class, got {norm!r}")
        self.num_features = num_features
        self.num_branches = num_branches
        self.norm = norm
        self.norm_options = dict(norm_options)
        self.branches = nn.ModuleList(build() for _ in range(num_branches))
        self._active_branch = 0
        self._sample_branches: Optional[Tensor] = None
        self._sample_branches_on: Dict[torch.device, Tensor] = {}

    # -- construction helpers -------------------------------------------------------------------

    @classmethod
    def option_names(cls) -> tuple:
        """The fixed constructor arguments; :meth:`options` adds the layer's ``norm_options``."""
        return ("num_features", "num_branches", "norm")

    def options(self) -> Dict[str, Any]:
        """The constructor arguments: ``type(layer)(**layer.options())`` builds the same layer
        (with fresh parameters)."""
        return {"num_features": self.num_features, "num_branches": self.num_branches, "norm": self.norm,
                **self.norm_options}

    @classmethod
    def from_norm(cls, module: nn.Module, num_branches: int) -> "ConsistentNorm":
        """A CN layer whose every branch is a copy of ``module`` (parameters, statistics, training mode,
        ``requires_grad``, device and dtype); ``module`` is not modified.

        Accepts torch's BatchNorms (any ``_BatchNorm`` subclass, SyncBatchNorm included), GroupNorm and
        SN layers (not frozen ones: a frozen layer cannot learn anything per branch).
        """
        norm, options = _describe(module)
        rank = _rank_of(module)
        if norm in ("BN", "SN") and rank is not None:
            layer_cls = {1: ConsistentNorm1d, 2: ConsistentNorm2d, 3: ConsistentNorm3d}[rank]
        else:
            layer_cls = ConsistentNorm
        num_features = module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
        with torch.device("meta"):  # the branches built here are replaced by the copies
            layer = layer_cls(num_features, num_branches, norm, **options)
        layer.branches = nn.ModuleList(_copy_module(module) for _ in range(num_branches))
        layer.train(module.training)
        return layer

    # -- branch selection -----------------------------------------------------------------------

    @property
    def active_branch(self) -> int:
        """The branch the whole batch goes through when :attr:`sample_branches` is None."""
        return self._active_branch

    @active_branch.setter
    def active_branch(self, branch: int) -> None:
        self._active_branch = self._checked_branch(branch)

    @property
    def sample_branches(self) -> Optional[Tensor]:
        """One branch index per sample of the next batches (a 1-D long tensor), or None."""
        return self._sample_branches

    @sample_branches.setter
    def sample_branches(self, branches: Optional[Union[Sequence[int], Tensor]]) -> None:
        self._sample_branches_on = {}
        if branches is None:
            self._sample_branches = None
            return
        branches = torch.as_tensor(branches).detach().cpu()
        if branches.numel() == 0:
            branches = branches.long()  # torch.as_tensor([]) is float
        if branches.dim() != 1 or branches.is_floating_point() or branches.is_complex():
            raise ValueError(f"{type(self).__name__}: sample_branches must be a 1-D sequence of branch indices, "
                             f"got {tuple(branches.shape)} {branches.dtype}")
        if branches.numel() and (int(branches.min()) < 0 or int(branches.max()) >= self.num_branches):
            raise ValueError(f"{type(self).__name__} has {self.num_branches} branches (0..{self.num_branches - 1}), "
                             f"got sample_branches {branches.tolist()}")
        self._sample_branches = branches.long()

    def _checked_branch(self, branch: int) -> int:
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < self.num_branches:
            raise ValueError(f"{type(self).__name__} has {self.num_branches} branches (0..{self.num_branches - 1}), "
                             f"got branch {branch!r}")
        return branch

    # -- forward --------------------------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        # The branches check the input's shape themselves (also a channels-last nn.LayerNorm branch).
        if self._sample_branches is None:
            return self.branches[self._active_branch](input)
        branches = self._sample_branches_for(input)
        if not len(branches):  # an empty batch: whatever the branch does with one
            return self.branches[self._active_branch](input)
        return self._forward_per_sample(input, branches)

    def _sample_branches_for(self, input: Tensor) -> Tensor:
        if self._sample_branches.numel() != input.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: sample_branches assigns {self._sample_branches.numel()} samples but the "
                f"input has {input.shape[0]} (shape {tuple(input.shape)}). Per-sample branches need a layer whose "
                f"batch is the model's batch; select one branch for all samples (active_branch) elsewhere."
            )
        on_device = self._sample_branches_on.get(input.device)
        if on_device is None:
            on_device = self._sample_branches_on[input.device] = self._sample_branches.to(input.device)
        return on_device

    def _forward_per_sample(self, input: Tensor, branches: Tensor) -> Tensor:
        """Each branch normalizes its own samples; the output keeps the input's sample order."""
        counts = torch.bincount(self._sample_branches, minlength=self.num_branches).tolist()
        in_order = bool((self._sample_branches[1:] >= self._sample_branches[:-1]).all())
        order = None if in_order else torch.argsort(branches, stable=True)
        grouped = input if order is None else input.index_select(0, order)
        pieces = [self.branches[k](chunk) for k, chunk in enumerate(grouped.split(counts)) if counts[k]]
        output = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if order is None:
            return output
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return output.index_select(0, inverse)

    # -- loading a plain normalizer's state -----------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """A state dict of the plain normalizer this layer replaced (``<prefix>weight``,
        ``<prefix>running_mean``, ... without ``branches.``) loads into every branch, so a BN
        checkpoint initialises a CN model as :func:`sn_plugin.convert_to_cn` would."""
        plain = [key for key in state_dict if key.startswith(prefix) and "." not in key[len(prefix):]]
        has_branches = any(key.startswith(prefix + "branches.") for key in state_dict)
        if plain and not has_branches:
            for key in plain:
                value = state_dict.pop(key)
                for k in range(self.num_branches):
                    state_dict[f"{prefix}branches.{k}.{key[len(prefix):]}"] = value
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        norm = self.norm if isinstance(self.norm, str) else self.norm.__name__
        if self._sample_branches is None:
            selection = f"active_branch={self._active_branch}"
        else:
            counts = torch.bincount(self._sample_branches, minlength=self.num_branches).tolist()
            selection = f"samples per branch={counts}"
        return f"{self.num_features}, num_branches={self.num_branches}, norm={norm}, {selection}"


class ConsistentNorm1d(ConsistentNorm):
    """CN over (N, C) or (N, C, L) inputs; BN branches are ``nn.BatchNorm1d``. See :class:`ConsistentNorm`."""

    _rank = 1


class ConsistentNorm2d(ConsistentNorm):
    """CN over (N, C, H, W) inputs; BN branches are ``nn.BatchNorm2d``. See :class:`ConsistentNorm`."""

    _rank = 2


class ConsistentNorm3d(ConsistentNorm):
    """CN over (N, C, T, H, W) inputs; BN branches are ``nn.BatchNorm3d``. See :class:`ConsistentNorm`."""

    _rank = 3


def _rank_of(module: nn.Module) -> Optional[int]:
    """1, 2 or 3 for torch's BatchNorm1d/2d/3d and SN's SwitchNorm1d/2d/3d (and subclasses), else None."""
    for rank in (1, 2, 3):
        if isinstance(module, (_BN_BY_RANK[rank], _SN_BY_RANK[rank])):
            return rank
    return None


def _describe(module: nn.Module):
    """``(norm, norm_options)`` of a CN layer whose branches are like ``module``."""
    if isinstance(module, FrozenSwitchNorm) or not isinstance(
            module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, SwitchNormBase)):
        raise TypeError(
            f"ConsistentNorm.from_norm: cannot make CN branches of {type(module).__name__}; it takes BatchNorm "
            f"(incl. SyncBatchNorm), GroupNorm and (trainable) SwitchNorm layers"
        )
    if isinstance(module, SwitchNormBase):
        options = module.options()
        options.pop("num_features")
        named = type(module) is _SN_BY_RANK[_rank_of(module)]
        return ("SN" if named else type(module)), options
    if isinstance(module, nn.GroupNorm):
        if type(module) is not nn.GroupNorm:
            raise TypeError(f"ConsistentNorm.from_norm: {type(module).__name__} is a GroupNorm subclass; "
                            f"only nn.GroupNorm itself is converted")
        return "GN", {"num_groups": module.num_groups, "eps": module.eps, "affine": module.affine}
    options = {"eps": module.eps, "momentum": module.momentum, "affine": module.affine,
               "track_running_stats": module.track_running_stats}
    if type(module) is nn.SyncBatchNorm:
        return "SyncBN", {**options, "process_group": module.process_group}
    if type(module) is _BN_BY_RANK.get(_rank_of(module)):
        return "BN", options
    return type(module), options


def _copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of a normalization layer that shares its process group (a communicator handle)."""
    memo = {}
    group = getattr(module, "process_group", None)
    if group is not None:
        memo[id(group)] = group
    return copy.deepcopy(module, memo)
