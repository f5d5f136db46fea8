"""Switchable Normalization modules for 1d, 2d and 3d inputs.

One generic base class holds the parameters, buffers and the choice of
statistics; the dimension-specific subclasses only check the input's rank, as
torch's ``BatchNorm1d/2d/3d`` do. The maths live in :mod:`sn_plugin.functional`.
"""
import inspect
from typing import Any, Dict, Optional, Tuple, Type

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from . import functional as F_sn


class SwitchNormBase(_NormBase):
    """Switchable Normalization (Luo et al., ICLR 2019), Eq. 3-5.

    The generic base of every SN module (use it for ``isinstance`` checks); the
    subclasses below fix the input rank.

    Mixes instance (IN), layer (LN) and batch (BN) statistics with two sets of
    learned importance weights, one for the means and one for the variances
    (softmax over the logits ``mean_weight`` / ``var_weight``, order
    [IN, LN, BN]). ``weight``/``bias`` are the per-channel gamma/beta and the
    BN-branch buffers follow BatchNorm's names and semantics, so a BatchNorm
    checkpoint's entries line up with an SN layer's.

    Args:
        num_features: C of an (N, C, ...) input.
        eps: added once to the mixed variance.
        momentum: BatchNorm's convention,
            ``running = (1 - momentum) * running + momentum * batch``;
            ``None`` gives a cumulative average.
        affine: learn ``weight`` and ``bias``.
        track_running_stats: keep running statistics of the BN branch; without
            them the BN branch uses batch statistics in eval too.
        using_bn: include the BN branch. Without it (the paper's setting for one
            sample per GPU) the logits have 2 entries [IN, LN] and no running
            statistics are kept.
        using_moving_average: update the running statistics during training. With
            ``False`` (the paper's "batch average") they are estimated after
            training by :func:`sn_plugin.recompute_batch_stats`; evaluating
            before that raises an error instead of using the initial 0/1 buffers.
        last_gamma: initialise gamma to 0 (zero-init of the last norm layer in a
            residual block).
        unbiased_instance_var: the authors' released-code convention instead of
            the paper's: the IN variance divided by (spatial size - 1) (for
            (N, C) inputs the LN and BN variances divided by C - 1 and N - 1), and
            the running variance updated with the BN variance as used, without
            BatchNorm's extra correction. Set it to reproduce networks converted
            from their checkpoints (see docs/model_zoo.md); it is a construction
            option, not saved in the state dict. Default: Eq. 2 of the paper
            (population variances) with BatchNorm's running-variance rule.

    In training, a batch of one sample makes the BN statistics equal the IN
    ones (so SN effectively mixes IN and LN, as the paper notes); when the
    batch holds a single value per channel (N * spatial size = 1) there is no
    variance to learn from and the running statistics are left unchanged. An
    empty batch gives an empty output and leaves the statistics unchanged.
    """

    _expected_dims: Tuple[int, ...] = ()
    _expected_shape: str = ""
    # mmcv's build_norm_layer names layers by it (sn1, sn2, ...), as the released SN checkpoints do.
    _abbr_ = "sn"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        using_bn: bool = True,
        using_moving_average: bool = True,
        last_gamma: bool = False,
        unbiased_instance_var: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        self.using_bn = using_bn
        self.unbiased_instance_var = unbiased_instance_var
        self.using_moving_average = using_moving_average
        self.last_gamma = last_gamma
        super().__init__(num_features, eps, momentum, affine, track_running_stats and using_bn, device, dtype)
        num_branches = 3 if using_bn else 2
        factory = {"device": device, "dtype": dtype}
        self.mean_weight = nn.Parameter(torch.ones(num_branches, **factory))
        self.var_weight = nn.Parameter(torch.ones(num_branches, **factory))

    @classmethod
    def option_names(cls) -> Tuple[str, ...]:
        """The names of the constructor arguments that :meth:`options` reports (not device/dtype)."""
        params = inspect.signature(cls.__init__).parameters
        return tuple(name for name in params if name not in ("self", "device", "dtype"))

    def options(self) -> Dict[str, Any]:
        """The constructor arguments this layer was built with: ``type(layer)(**layer.options())``
        builds the same layer (with fresh parameters). Every rebuild of an SN layer (sync, revert,
        freeze, sparsify, conversion, the toolkit adapters) goes through this, so none drops an option."""
        return {name: getattr(self, name) for name in self.option_names()}

    def rebuilt_as(self, cls: Type["SwitchNormBase"], **changes) -> "SwitchNormBase":
        """A layer of class ``cls`` with this layer's options (updated by ``changes``) that takes over
        this layer's parameters and buffers (the same tensor objects, nothing is copied) and its
        training mode. Options ``cls`` does not take (e.g. ``process_group`` when going from
        :class:`SyncSwitchNorm` to a local layer) are dropped."""
        wanted = cls.option_names()
        options = {name: value for name, value in {**self.options(), **changes}.items() if name in wanted}
        new = cls(**options, device="meta")
        for name, param in self._parameters.items():
            setattr(new, name, param)
        for name, buffer in self._buffers.items():
            setattr(new, name, buffer)
        new.train(self.training)
        return new

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.constant_(self.weight, 0.0 if self.last_gamma else 1.0)
            nn.init.zeros_(self.bias)
        if hasattr(self, "mean_weight"):
            nn.init.ones_(self.mean_weight)
            nn.init.ones_(self.var_weight)

    def importance_weights(self) -> Tuple[Tensor, Tensor]:
        """The current softmaxed importance weights (mean, variance), [IN, LN(, BN)].

        These are the weights of inputs with spatial dimensions; an (N, C) input
        has no IN branch and mixes LN and BN by the softmax of their two logits.
        """
        return self.mean_weight.softmax(0), self.var_weight.softmax(0)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._expected_dims:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects input of shape "
                f"{self._expected_shape}, got a {input.dim()}-D tensor of shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects {self.num_features} channels in "
                f"dim 1 of an input of shape {self._expected_shape}, got shape {tuple(input.shape)}"
            )

    def _momentum_for_this_batch(self) -> float:
        """BatchNorm's bookkeeping: counts the batch and returns the averaging factor."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def _check_bn_statistics_ready(self) -> None:
        # Reading the counter is a host read: skipped where it would stop a graph capture
        # (torch.compile, torch.export), which run on a model already checked in eager mode.
        if (
            not self.using_moving_average
            and not self._uses_batch_stats()
            and not torch.compiler.is_compiling()
            and int(self.num_batches_tracked) == 0
        ):
            raise RuntimeError(
                f"{self._get_name()}({self.num_features}) has using_moving_average=False, so its BN-branch "
                f"statistics come from the batch average, which has not been estimated yet (num_batches_tracked "
                f"is 0). Run sn_plugin.recompute_batch_stats(model, batches) after training, or load a "
                f"checkpoint that has them, before evaluating."
            )

    def _stats_group(self):
        """The process group whose batch the BN branch spans (None: this process only)."""
        return None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        group = self._stats_group() if self.training else None
        batch_stats = self._uses_batch_stats()
        has_variance = group is not None or input.numel() > self.num_features
        update = (
            self.training and self.running_mean is not None and self.using_moving_average and has_variance
        )
        momentum = self._momentum_for_this_batch() if update else 0.0
        if self.running_mean is not None and not batch_stats:
            self._check_bn_statistics_ready()
        use_running = update or not batch_stats
        return F_sn.switch_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.mean_weight,
            self.var_weight,
            self.weight,
            self.bias,
            batch_stats,
            momentum,
            self.eps,
            group,
            self.unbiased_instance_var,
        )

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{self._get_name()} cannot be compiled by torch.jit.script: its forward and backward are a "
            f"custom autograd Function, which TorchScript does not support (and TorchScript is "
            f"deprecated). Use torch.compile instead."
        )

    def extra_repr(self) -> str:
        mean_w, var_w = (w.detach().cpu().tolist() for w in self.importance_weights())
        names = F_sn.BRANCH_NAMES[: len(mean_w)]

        def fmt(ws):
            return "[" + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, ws)) + "]"

        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, using_bn={self.using_bn}, "
            f"using_moving_average={self.using_moving_average}, last_gamma={self.last_gamma}, "
            + ("unbiased_instance_var=True, " if self.unbiased_instance_var else "") +
            f"mean_weight={fmt(mean_w)}, var_weight={fmt(var_w)}"
        )


class SwitchNorm1d(SwitchNormBase):
    """SN over (N, C, L) or (N, C) inputs. See :class:`SwitchNormBase` for the arguments.

    (N, C, L) inputs mix IN (over L), LN and BN like the 2d layer. An (N, C)
    input has no instance statistics worth the name (one value each), so, as in
    the authors' 1d layer, it mixes only LN (over C) and BN (over N): the IN logit
    is ignored and the softmax runs over [LN, BN]. Their 1d checkpoints, with two
    logits [LN, BN], load after :func:`sn_plugin.checkpoints.convert_released_1d_state`.
    """

    _expected_dims = (2, 3)
    _expected_shape = "(N, C) or (N, C, L)"


class SwitchNorm2d(SwitchNormBase):
    """SN over (N, C, H, W) inputs. See :class:`SwitchNormBase` for the arguments."""

    _expected_dims = (4,)
    _expected_shape = "(N, C, H, W)"


class SwitchNorm3d(SwitchNormBase):
    """SN over (N, C, T, H, W) inputs (e.g. I3D video models): statistics over (T, H, W)."""

    _expected_dims = (5,)
    _expected_shape = "(N, C, T, H, W)"


class SwitchNormNd(SwitchNormBase):
    """SN for (N, C, *) inputs of any rank, without synchronization.

    What conversion produces where the source layer does not fix the input's
    rank (GroupNorm, BatchNorm subclasses without a dimension, a reverted
    SyncSwitchNorm), as mmengine's ``_BatchNormXd`` does for BatchNorm.
    """

    _expected_dims = (2, 3, 4, 5)
    _expected_shape = "(N, C, *)"


class SyncSwitchNorm(SwitchNormBase):
    """SN whose BN branch takes its statistics over every process of a group.

    IN and LN statistics stay per sample; the BN mean and variance (and their
    gradients) are all-reduced over ``process_group`` (default: the whole world)
    in training, so the result equals SN on the concatenated batch, also when
    the processes hold different numbers of samples, or none. Without an
    initialised process group, or with one process, it is plain SN. As with
    ``nn.SyncBatchNorm``, every process must run the layer's forward and
    backward in the same order. Accepts (N, C, *) inputs of any rank.
    """

    _expected_dims = (2, 3, 4, 5)
    _expected_shape = "(N, C, *)"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, using_bn: bool = True,
                 using_moving_average: bool = True, last_gamma: bool = False,
                 unbiased_instance_var: bool = False, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, using_bn,
                         using_moving_average, last_gamma, unbiased_instance_var, device, dtype)
        self.process_group = process_group

    def _stats_group(self):
        if not self.using_bn or not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None


class FrozenSwitchNorm(SwitchNormBase):
    """SN whose parameters and statistics are fixed: what ``FrozenBatchNorm2d`` is to BN.

    Frozen stages of a backbone (detectron2's ``FREEZE_AT``, OpenMMLab's
    ``frozen_stages``) must neither learn nor update statistics. This layer
    stays in eval mode whatever ``train()`` is called with, so its BN branch
    always uses the running statistics (also during
    :func:`sn_plugin.recompute_batch_stats`, which leaves it as it is), and its
    parameters have ``requires_grad=False``. It keeps every option of the layer
    it was made from (:meth:`options`), and its state-dict keys are SN's, so a
    checkpoint loads the same into frozen and trainable stages.

    Like ``FrozenBatchNorm2d`` it uses whatever statistics it holds: the "batch
    average not estimated yet" check of ``using_moving_average=False`` does not
    apply, because frozen statistics are never estimated. Accepts (N, C, *).
    """

    _expected_dims = (2, 3, 4, 5)
    _expected_shape = "(N, C, *)"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, using_bn: bool = True,
                 using_moving_average: bool = True, last_gamma: bool = False,
                 unbiased_instance_var: bool = False, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, using_bn,
                         using_moving_average, last_gamma, unbiased_instance_var, device, dtype)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenSwitchNorm":
        return super().train(False)

    def _check_bn_statistics_ready(self) -> None:
        pass

    @classmethod
    def from_switch_norm(cls, module: SwitchNormBase) -> "FrozenSwitchNorm":
        """A frozen copy of an SN layer, with all its options (``module`` is not modified)."""
        options = {k: v for k, v in module.options().items() if k in cls.option_names()}
        frozen = cls(**options, device=module.mean_weight.device, dtype=module.mean_weight.dtype)
        frozen.load_state_dict(module.state_dict())
        return frozen

    @classmethod
    def convert_frozen_switch_norm(cls, module: nn.Module) -> nn.Module:
        """Replace every SN layer in ``module`` by a frozen copy, as
        ``FrozenBatchNorm2d.convert_frozen_batchnorm`` does for BN: returns a new
        layer if ``module`` itself is SN, otherwise converts its children in place
        and returns ``module``."""
        if isinstance(module, SwitchNormBase) and not isinstance(module, FrozenSwitchNorm):
            return cls.from_switch_norm(module)
        for name, child in module.named_children():
            frozen = cls.convert_frozen_switch_norm(child)
            if frozen is not child:
                module.add_module(name, frozen)
        return module
