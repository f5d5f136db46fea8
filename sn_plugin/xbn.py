"""XBNBlock (Huang et al., CVPR 2022): one BN of each residual block becomes a batch-free normalizer.

A batch-free normalizer (BFN: GroupNorm, InstanceNorm, SN without its BN branch) normalizes
each sample the same way in training and inference, so it blocks the accumulation of BN's
estimation shift through the depth of the network (see :mod:`sn_plugin.estimation_shift`).
:func:`convert_to_xbn` turns a built ResNet / ResNeXt into its XBN version:

* ``position`` P1/P2/P3: which BN of a bottleneck's main path becomes the BFN (default 2,
  after the 3x3 conv); in a BasicBlock P1 and P2 mean its first norm, P3 its second;
* ``every`` D1/D2/D4/D8: only every D-th block, counted across the whole network from 1
  (D2 converts blocks 2, 4, 6, ...);
* ``stem``: the stem's BN(s) too, as the authors' code does;
* shortcut (downsample) BNs stay BN, and the BFN starts at gamma = 1, beta = 0 (no zero-gamma
  initialisation, whatever the block did for its last BN).

It recognises the blocks of torchvision (``bn1``/``bn2``/``bn3``), OpenMMLab (mmdet, mmseg,
mmpretrain: ``norm1_name``... attributes naming the modules) and detectron2
(``conv1.norm``...), and others through :func:`register_xbn_block`. The BFN takes the BN's
place under the BN's name, so the block's forward (and OpenMMLab's ``norm2`` properties) use
it unchanged, and a BN checkpoint's keys line up (see :func:`load_bn_state_dict`).
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .conversion import looks_like_batch_norm, replace_modules
from .state_dicts import inner_state_dict, strip_prefixes
from .switchable_norm import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchNormNd

__all__ = [
    "BN_LOAD_MODES", "DEFAULT_BFN", "ResidualBlock", "XBNLoadReport", "build_bfn", "convert_to_xbn",
    "load_bn_state_dict", "register_xbn_block", "residual_blocks", "xbn_plan",
]

DEFAULT_BFN: Mapping[str, Any] = {"type": "GN", "num_groups": 64}  # the paper's XBNBlockGN
BFNConfig = Union[Mapping[str, Any], Callable[[nn.Module], nn.Module], None]


# ---------------------------------------------------------------------------------------------
# Finding residual blocks and their main-path norms
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResidualBlock:
    """A residual block: its qualified name, the module, and the paths (relative to the block)
    of its main-path norms in forward order (2 for a BasicBlock, 3 for a bottleneck)."""

    name: str
    module: nn.Module = field(repr=False)
    norms: Tuple[str, ...]


NormPaths = Callable[[nn.Module], Optional[Sequence[str]]]
_REGISTERED_BLOCKS: Dict[type, NormPaths] = {}


def register_xbn_block(cls: type, norm_paths: NormPaths) -> None:
    """Teach :func:`residual_blocks` a block class: ``norm_paths(block)`` returns the paths of its
    main-path norms in forward order (e.g. ``lambda b: ("bn1", "bn2", "bn3")``). Subclasses match too."""
    _REGISTERED_BLOCKS[cls] = norm_paths


def _numbered(block: nn.Module, path_of: Callable[[int], Optional[str]]) -> Optional[Tuple[str, ...]]:
    paths = []
    for i in (1, 2, 3):
        path = path_of(i)
        if path is None:
            break
        paths.append(path)
    return tuple(paths) if len(paths) >= 2 else None


def _module_path(block: nn.Module, path: str) -> Optional[str]:
    try:
        return path if isinstance(block.get_submodule(path), nn.Module) else None
    except AttributeError:
        return None


def _builtin_norm_paths(block: nn.Module) -> Optional[Tuple[str, ...]]:
    """OpenMMLab (``norm<i>_name``), torchvision (``bn<i>``), detectron2 (``conv<i>.norm``)."""
    if not all(isinstance(getattr(block, f"conv{i}", None), nn.Module) for i in (1, 2)):
        return None  # a network's stem has conv1 (and bn1 / norm1) but no conv2
    namings = (
        lambda i: _module_path(block, getattr(block, f"norm{i}_name")) if hasattr(block, f"norm{i}_name") else None,
        lambda i: _module_path(block, f"bn{i}"),
        lambda i: _module_path(block, f"conv{i}.norm") if hasattr(block, f"conv{i}") else None,
    )
    for path_of in namings:
        paths = _numbered(block, path_of)
        if paths:
            return paths
    return None


def _norm_paths(block: nn.Module) -> Optional[Tuple[str, ...]]:
    for cls, norm_paths in _REGISTERED_BLOCKS.items():
        if isinstance(block, cls):
            paths = norm_paths(block)
            return tuple(paths) if paths else None
    return _builtin_norm_paths(block)


def residual_blocks(model: nn.Module) -> List[ResidualBlock]:
    """Every residual block of ``model`` in module order (the forward order of ResNets)."""
    blocks = []
    for name, module in model.named_modules():
        paths = _norm_paths(module)
        if paths and not any(name.startswith(b.name + ".") for b in blocks):
            blocks.append(ResidualBlock(name, module, paths))
    return blocks


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) or looks_like_batch_norm(module)


def _stem_norms(model: nn.Module, first_block: str) -> List[str]:
    """The BNs of the network's stem: under the module holding the first stage, before that stage.

    The first block ``<net>.<stage>.<i>`` gives the network ``<net>``; its BNs registered before
    ``<net>.<stage>`` form the stem (torchvision's ``bn1``, mmdet's ``bn1`` or deep stem, detectron2's
    ``stem.conv1.norm``), and a neck's norms (not under ``<net>``) are never counted.
    """
    parts = first_block.split(".")
    network, stage = ".".join(parts[:-2]), ".".join(parts[:-1])
    prefix = network + "." if network else ""
    norms = []
    for name, module in model.named_modules():
        if name == stage:
            break
        if name.startswith(prefix) and _is_batch_norm(module):
            norms.append(name)
    return norms


_POSITIONS = (1, 2, 3)


def xbn_plan(model: nn.Module, position: int = 2, every: int = 1, stem: bool = False) -> List[str]:
    """The qualified names of the norms :func:`convert_to_xbn` replaces, in module order."""
    if position not in _POSITIONS:
        raise ValueError(f"XBN position must be 1, 2 or 3 (P1/P2/P3: the first, second or third norm of a "
                         f"bottleneck), got {position!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"XBN every must be a positive int (1, 2, 4, 8: D1/D2/D4/D8), got {every!r}")
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(
            f"XBN: found no residual blocks in {type(model).__name__}. Known are torchvision's, OpenMMLab's and "
            f"detectron2's BasicBlock/Bottleneck (a conv1, a conv2 and numbered norms); teach it others with "
            f"sn_plugin.register_xbn_block"
        )
    plan = _stem_norms(model, blocks[0].name) if stem else []
    for number, block in enumerate(blocks, start=1):
        if number % every:
            continue
        # BasicBlock: P1 and P2 are its first norm, P3 its second.
        index = position - 1 if len(block.norms) >= 3 else (0 if position < 3 else 1)
        plan.append(f"{block.name}.{block.norms[index]}" if block.name else block.norms[index])
    return plan


# ---------------------------------------------------------------------------------------------
# Building the batch-free normalizer
# ---------------------------------------------------------------------------------------------

def _channels(module: nn.Module) -> int:
    if isinstance(getattr(module, "num_features", None), int):
        return module.num_features
    return module.running_mean.numel()


def _rank(module: nn.Module) -> Optional[int]:
    for rank, classes in ((1, (nn.BatchNorm1d,)), (2, (nn.BatchNorm2d,)), (3, (nn.BatchNorm3d,))):
        if isinstance(module, classes):
            return rank
    return 2 if type(module).__name__.endswith("2d") else None


def _build_gn(channels: int, rank: Optional[int], name: str, num_groups: int = DEFAULT_BFN["num_groups"],
              **options) -> nn.Module:
    if channels % num_groups:
        raise ValueError(
            f"XBN: {name} has {channels} channels, which GroupNorm cannot split into num_groups={num_groups} "
            f"groups. Give a num_groups that divides the channels of every converted layer (e.g. "
            f"dict(type='GN', num_groups=32)), or leave this layer as BN (e.g. stem=False for a stem's norm)"
        )
    return nn.GroupNorm(num_groups, channels, **options)


def _build_in(channels: int, rank: Optional[int], name: str, **options) -> nn.Module:
    cls = {1: nn.InstanceNorm1d, 3: nn.InstanceNorm3d}.get(rank, nn.InstanceNorm2d)
    return cls(channels, **{"affine": False, **options})  # the authors' IN has no affine


def _build_sn(channels: int, rank: Optional[int], name: str, **options) -> nn.Module:
    cls = {1: SwitchNorm1d, 2: SwitchNorm2d, 3: SwitchNorm3d}.get(rank, SwitchNormNd)
    return cls(channels, **{"using_bn": False, **options})  # batch-free: IN and LN only


BFN_BUILDERS: Dict[str, Callable[..., nn.Module]] = {"GN": _build_gn, "IN": _build_in, "SN": _build_sn}


def build_bfn(bfn_cfg: BFNConfig, replaced: nn.Module, name: str = "the layer") -> nn.Module:
    """The batch-free normalizer that takes the place of BN ``replaced``.

    ``bfn_cfg`` is a dict in the toolkits' norm_cfg style: ``type`` 'GN' (``num_groups``, default
    64, ``eps``, ``affine``), 'IN' (``affine`` default False, as the authors) or 'SN' (SN options;
    ``using_bn`` default False, so it is batch-free), and ``requires_grad`` (default True); or a
    callable ``replaced -> module``; None is :data:`DEFAULT_BFN`. The new layer is fresh
    (gamma = 1, beta = 0), on the BN's device and dtype and in its training mode.
    """
    if callable(bfn_cfg):
        bfn = bfn_cfg(replaced)
    else:
        options = dict(DEFAULT_BFN if bfn_cfg is None else bfn_cfg)
        kind = options.pop("type", None)
        requires_grad = options.pop("requires_grad", True)
        if kind not in BFN_BUILDERS:
            raise ValueError(f"XBN: unknown BFN type {kind!r}; choose one of {sorted(BFN_BUILDERS)} "
                             f"(e.g. dict(type='GN', num_groups=64)) or pass a callable")
        bfn = BFN_BUILDERS[kind](_channels(replaced), _rank(replaced), name, **options)
        bfn.requires_grad_(requires_grad)
    reference = next(iter([*replaced.parameters(), *replaced.buffers()]), None)
    if reference is not None:
        bfn.to(device=reference.device, dtype=reference.dtype if reference.is_floating_point() else None)
    return bfn.train(replaced.training)


def convert_to_xbn(
    model: nn.Module,
    bfn_cfg: BFNConfig = None,
    position: int = 2,
    every: int = 1,
    stem: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """The XBN version of a ResNet / ResNeXt (or of a model holding one, e.g. a detector).

    Args:
        model: a built model with recognised residual blocks (see :func:`residual_blocks`).
        bfn_cfg: the batch-free normalizer (see :func:`build_bfn`); default GN with 64 groups.
        position: 1, 2 or 3 (P1/P2/P3), the main-path norm of each block to replace.
        every: convert every ``every``-th block (D1/D2/D4/D8), counted over the whole network.
        stem: also replace the stem's BN(s).
        inplace: modify ``model`` (for a toolkit's ResNet subclass converting itself in
            ``__init__``); by default a converted copy is returned and ``model`` is unchanged.

    Raises:
        ValueError: a bad option, no residual blocks, a GN group count that does not divide a
            layer's channels, or a norm to replace that is not a BatchNorm.
    """
    plan = xbn_plan(model, position, every, stem)
    for name in plan:
        module = model.get_submodule(name)
        if not _is_batch_norm(module):
            raise ValueError(f"XBN: {name} is a {type(module).__name__}, not a BatchNorm; XBNBlock replaces a "
                             f"BN by a batch-free normalizer (was the model converted already?)")
    replacements = {name: build_bfn(bfn_cfg, model.get_submodule(name), name) for name in plan}
    if not inplace:
        return replace_modules(model, lambda name, module: replacements.get(name))
    for name, bfn in replacements.items():
        model.set_submodule(name, bfn)
    return model


# ---------------------------------------------------------------------------------------------
# Loading a BN checkpoint
# ---------------------------------------------------------------------------------------------

BN_LOAD_MODES = ("bn", "init")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class XBNLoadReport:
    """What :func:`load_bn_state_dict` did.

    Attributes:
        loaded: model keys filled from the checkpoint.
        bfn_layers: the layers that are BN in the checkpoint and batch-free in the model.
        dropped: checkpoint keys not used: the BN statistics of ``bfn_layers`` (a BFN has none),
            their affine with ``bfn_affine='init'`` (or when the BFN has no affine), and keys the
            model does not have.
        missing: model keys the checkpoint does not fill.
    """

    loaded: List[str]
    bfn_layers: List[str]
    dropped: List[str]
    missing: List[str]


def load_bn_state_dict(model: nn.Module, checkpoint: Mapping, bfn_affine: str = "bn") -> XBNLoadReport:
    """Fill an XBN model from the checkpoint of its BN version: every parameter and buffer that
    exists in both (convolutions, the remaining BNs, the classifier) is copied.

    At a BFN position the checkpoint holds a BN. Its running statistics are dropped (the BFN has
    none). Its gamma/beta have the BFN's shapes; with ``bfn_affine='bn'`` (default) they are loaded
    into the BFN, as every ordinary loader does (the BFN has the BN's name, so
    ``model.load_state_dict(checkpoint, strict=False)`` loads them too), keeping the per-channel
    scale and shift the following layers were trained with; ``'init'`` leaves the BFN at
    gamma = 1, beta = 0.

    ``checkpoint`` may be a state dict or hold one under ``state_dict``/``model``; DataParallel's
    ``module.`` prefixes are ignored. Raises ValueError for keys present in both with different
    shapes (a checkpoint of another architecture).
    """
    if bfn_affine not in BN_LOAD_MODES:
        raise ValueError(f"load_bn_state_dict: bfn_affine must be one of {BN_LOAD_MODES}, got {bfn_affine!r}")
    state = {strip_prefixes(k, _WRAPPER_PREFIXES): v for k, v in inner_state_dict(checkpoint).items()}
    own = model.state_dict()
    modules = dict(model.named_modules())
    bfn_layers = [name for name, m in modules.items()
                  if f"{name}.running_mean" in state and name and not _is_batch_norm(m)
                  and not isinstance(getattr(m, "running_mean", None), Tensor)]
    skip = set()
    if bfn_affine == "init":
        skip = {f"{name}.{p}" for name in bfn_layers for p in ("weight", "bias")}
    mismatched = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and k not in skip and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise ValueError("load_bn_state_dict: the checkpoint does not fit the model (different shapes):\n  "
                         + "\n  ".join(mismatched))
    loaded = [k for k in state if k in own and k not in skip]
    with torch.no_grad():
        for key in loaded:
            own[key].copy_(state[key])
    return XBNLoadReport(
        loaded=loaded, bfn_layers=bfn_layers,
        dropped=[k for k in state if k not in own or k in skip],
        missing=[k for k in own if k not in state],
    )
