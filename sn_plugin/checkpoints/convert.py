"""Checkpoint conversion between the released SN-ResNet files, the toolkits' layouts and BN checkpoints.

Every conversion reads its source into the canonical ResNet (:mod:`.resnet`),
checks every shape against the depth it finds, and writes the target layout
(:mod:`.layouts`). Tensors are carried unchanged (same values, same dtype) except
for the reshapes between the released (1, C, 1, 1) / (1, C, 1) shapes and our
(C,), and the 2D -> 3D inflation for mmaction2; that is what makes
released -> ours -> released exact.
"""
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..conversion import convert_to_sn
from .errors import CheckpointError
from .inflation import I3D_R50_CONV1_KERNEL_T, I3D_R50_INFLATE, InflateArg, i3d_temporal_kernels, inflate_conv, \
    temporal_kernels_from_state
from ..state_dicts import strip_prefixes
from .io import atomic_save, load_file, progress, same_file, state_dict_of
from .layouts import LAYOUTS, Layout, get_layout
from .resnet import ResNetSpec, check_shape, expected_shape, format_shape, infer_spec, refuse_v2, split_key

SN_TARGETS = ("mmdet", "mmseg", "mmpretrain", "mmaction2", "detectron2", "released")
BN_SOURCES = ("torchvision", "mmdet", "mmseg", "mmpretrain", "detectron2")
SN_SOURCES = ("released", "mmdet", "mmseg", "mmpretrain", "detectron2")

# Importance weight of BN when an SN layer starts from a BN layer: the default of the
# model-level sn_plugin.convert_to_sn, so that converting a checkpoint and converting
# the model loaded from it give the same SN layers (see docs/model_zoo.md for the
# trade-off between an exact start and logits that training can still move).
DEFAULT_BN_START_WEIGHT = 0.999

Source = Union[str, Mapping[str, Any]]


@dataclass
class ConversionSummary:
    """What a conversion did: every key mapped, dropped (and why) or missing, plus notes."""

    source: str
    target: str
    depth: int = 0
    mapped: List[Tuple[str, str]] = field(default_factory=list)
    dropped: List[Tuple[str, str]] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def report(self, verbose: bool = False) -> str:
        lines = [f"{self.source} -> {self.target} (ResNet-{self.depth}): {len(self.mapped)} tensors mapped, "
                 f"{len(self.dropped)} dropped, {len(self.missing)} missing"]
        if verbose:
            lines += [f"  mapped   {src} -> {dst}" for src, dst in self.mapped]
        lines += [f"  dropped  {key}: {why}" for key, why in self.dropped]
        lines += [f"  missing  {key}" for key in self.missing]
        lines += [f"  note     {note}" for note in self.notes]
        return "\n".join(lines)

    __str__ = report


@dataclass
class _Canonical:
    """A ResNet checkpoint in canonical names and our shapes; ``origin`` maps each key to its source key."""

    spec: ResNetSpec
    norm: str  # "sn" or "bn"
    tensors: "OrderedDict[str, torch.Tensor]"
    origin: Dict[str, str]


# ----------------------------------------------------------------------------------------------- reading

def _read(state: Mapping[str, torch.Tensor], layout: Layout, norm: str, source: str, depth: Optional[int],
          summary: ConversionSummary) -> _Canonical:
    refuse_v2(state, source)
    inverse = layout.inverse_map(norm)
    tensors: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    origin = {}
    for key, value in state.items():
        module, param = split_key(strip_prefixes(key, layout.strip_prefixes))
        if module in inverse:
            canonical = f"{inverse[module]}.{param}"
            tensors[canonical], origin[canonical] = value, key
        else:
            summary.dropped.append((key, "not a module of a ResNet v1 in the " f"{layout.name} layout"))
    spec = infer_spec(tensors, depth, source, list(state))
    has_logits = any(k.endswith(".mean_weight") for k in tensors)
    if has_logits != (norm == "sn"):
        raise CheckpointError(
            f"{source} has SN layers (mean_weight/var_weight logits): convert it without --from-bn"
            if has_logits else
            f"{source} has no SN layers (no mean_weight/var_weight logits): for a BatchNorm checkpoint use --from-bn"
        )
    modules = spec.module_dict()
    for canonical in list(tensors):
        if split_key(canonical)[0] not in modules:
            summary.dropped.append((origin[canonical], f"no such module in a ResNet-{spec.depth}"))
            del tensors[canonical], origin[canonical]
    if not any(modules[split_key(k)[0]].kind == "norm" for k in tensors):
        example = layout.rename(modules["sn1"], norm)
        raise CheckpointError(
            f"{source} has no {norm.upper()} layers where the {layout.name} layout keeps them (e.g. '{example}.weight')"
            + (". For an SN checkpoint use the SN conversions; for a BN one, --from-bn."
               if norm == "bn" else ". Is it a BN checkpoint? Convert it with --from-bn.")
        )
    return _Canonical(spec, norm, tensors, origin)


def _released_to_ours(canon: _Canonical, source: str) -> None:
    """Reshape the released (1, C, 1, 1) affine and (1, C, 1) statistics to our (C,), checking each."""
    modules = canon.spec.module_dict()
    for key, value in canon.tensors.items():
        module, param = split_key(key)
        m = modules[module]
        if m.kind != "norm" or param in ("mean_weight", "var_weight"):
            continue
        released = (1, m.out_channels, 1, 1) if param in ("weight", "bias") else (1, m.out_channels, 1)
        check_shape(canon.origin[key], tuple(value.shape), released, source)
        canon.tensors[key] = value.reshape(m.out_channels)


def _validate(canon: _Canonical, source: str, summary: ConversionSummary) -> None:
    """Check every shape against the ResNet depth found; list what a complete checkpoint would hold more."""
    spec = canon.spec
    fc_classes = canon.tensors["fc.bias"].shape[0] if "fc.bias" in canon.tensors else None
    for key, value in canon.tensors.items():
        module, param = split_key(key)
        expected = expected_shape(spec.module_dict()[module], param, fc_classes)
        if expected is not None:
            check_shape(canon.origin[key], tuple(value.shape), expected, source)
    for m in spec.modules():
        if m.kind == "norm":
            params = _norm_params(canon, m.name, source)
        else:
            params = ("weight",) if m.kind == "conv" else ("weight", "bias")
        summary.missing += [f"{m.name}.{p}" for p in params if f"{m.name}.{p}" not in canon.tensors]


def _norm_params(canon: _Canonical, module: str, source: str) -> Tuple[str, ...]:
    """The entries a norm layer must have; checks SN logits against its statistics."""
    if canon.norm == "bn":
        return ("weight", "bias", "running_mean", "running_var")
    logits = [canon.tensors.get(f"{module}.{p}") for p in ("mean_weight", "var_weight")]
    sizes = {tuple(t.shape) for t in logits if t is not None}
    if len(sizes) > 1 or not sizes <= {(2,), (3,)}:
        found = ", ".join(f"{canon.origin[f'{module}.{p}']} {format_shape(t.shape)}"
                          for p, t in zip(("mean_weight", "var_weight"), logits) if t is not None)
        raise CheckpointError(
            f"{source}: SN layer '{module}' needs mean_weight and var_weight both of shape (3,) [IN, LN, BN] or "
            f"(2,) [IN, LN]; found {found}"
        )
    with_bn = sizes != {(2,)}
    if not with_bn and f"{module}.running_mean" in canon.tensors:
        raise CheckpointError(
            f"{source}: SN layer '{module}' has 2 logits [IN, LN] (no BN branch) but also running statistics "
            f"('{canon.origin[module + '.running_mean']}'); a layer without BN keeps none"
        )
    base = ("weight", "bias", "mean_weight", "var_weight")
    return base + ("running_mean", "running_var") if with_bn else base


def _load_source(source: Source, name: str) -> Tuple[Mapping[str, Any], Dict[str, torch.Tensor], str]:
    if isinstance(source, (str, os.PathLike)):
        obj = load_file(os.fspath(source))
        label = f"'{os.fspath(source)}'"
    else:
        obj, label = source, f"the {name} checkpoint"
    return (obj if isinstance(obj, Mapping) else {}), state_dict_of(obj, label), label


# ----------------------------------------------------------------------------------------------- writing

def _start_as_bn(canon: _Canonical, original_weight: float, summary: ConversionSummary) -> None:
    """Turn every BN layer into the SN layer :func:`sn_plugin.convert_to_sn` makes of it."""
    tensors: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    layers: Dict[str, Dict[str, torch.Tensor]] = OrderedDict()
    for key, value in canon.tensors.items():
        module, param = split_key(key)
        if canon.spec.module_dict()[module].kind == "norm":
            layers.setdefault(module, {})[param] = value
            tensors.setdefault(module, None)  # keeps the layer's place in the order
        else:
            tensors[key] = value
    converted: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in tensors.items():
        if value is not None:
            converted[key] = value
            continue
        bn_state = layers[key]
        dtype = next(iter(bn_state.values())).dtype
        bn = nn.BatchNorm2d(canon.spec.module_dict()[key].out_channels).to(dtype)
        bn.load_state_dict(bn_state, strict=False)
        sn_state = convert_to_sn(bn, original_weight=original_weight).state_dict()
        for param, tensor in sn_state.items():
            if param == "num_batches_tracked" and param not in bn_state:
                continue  # a frozen BN counts no batches; _write marks the statistics as estimated
            converted[f"{key}.{param}"] = tensor
            source_key = canon.origin.get(f"{key}.{param}")
            canon.origin[f"{key}.{param}"] = source_key or f"(new: SN logits for {canon.origin[key + '.weight']})"
    canon.tensors, canon.norm = converted, "sn"
    summary.notes.append(
        f"each SN layer starts as its BN (sn_plugin.convert_to_sn): importance weight {original_weight:g} on BN "
        f"for the means and the variances; weight, bias and running statistics are the BN's"
    )


def _write(canon: _Canonical, layout: Layout, prefix: str, summary: ConversionSummary, show_progress: bool,
           temporal_kernels: Optional[Dict[str, int]] = None) -> "OrderedDict[str, torch.Tensor]":
    modules = canon.spec.module_dict()
    released = layout.name == "released"
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    items = progress(canon.tensors.items(), len(canon.tensors), f"-> {layout.name}", show_progress)
    for key, value in items:
        module, param = split_key(key)
        m = modules[module]
        name = layout.rename(m, canon.norm)
        if name is None:
            summary.dropped.append((canon.origin[key], f"the {layout.name} backbone has no '{module}'"))
            continue
        if m.kind == "norm" and released and param == "num_batches_tracked":
            summary.dropped.append((canon.origin[key], "the released layers count no batches"))
            continue
        if m.kind == "norm" and released and param not in ("mean_weight", "var_weight"):
            shape = (1, m.out_channels, 1, 1) if param in ("weight", "bias") else (1, m.out_channels, 1)
            value = value.reshape(shape)
        elif m.kind == "conv" and layout.video:
            value = inflate_conv(value, temporal_kernels[module])
        target = _target_key(layout, prefix, name, param)
        out[target] = value
        summary.mapped.append((canon.origin[key], target))
        if m.kind == "norm" and not released and param == "running_var" \
                and f"{module}.num_batches_tracked" not in canon.tensors:
            # Marks the statistics as estimated (a layer built with using_moving_average=False
            # refuses to evaluate with num_batches_tracked == 0).
            count = _target_key(layout, prefix, name, "num_batches_tracked")
            out[count] = torch.tensor(1, dtype=torch.long)
            summary.mapped.append(("(new)", count))
    summary.missing[:] = [_target_name(k, canon, layout, prefix) for k in summary.missing]
    summary.missing[:] = [k for k in summary.missing if k is not None]
    return out


def _target_name(canonical_key: str, canon: _Canonical, layout: Layout, prefix: str) -> Optional[str]:
    module, param = split_key(canonical_key)
    name = layout.rename(canon.spec.module_dict()[module], canon.norm)
    return None if name is None else _target_key(layout, prefix, name, param)


def _target_key(layout: Layout, prefix: str, module: str, param: str) -> str:
    """The key of ``module.param`` in ``layout``: the released files keep DataParallel's ``module.``."""
    return ("module." if layout.name == "released" else prefix) + f"{module}.{param}"


def _to_numpy(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _container(target: str, state, meta: Dict[str, Any], extras: Mapping[str, Any], pkl: bool,
               prefix: str) -> Dict[str, Any]:
    if target == "released":
        return {"state_dict": state, **{k: extras[k] for k in ("epoch", "best_prec1") if k in extras}}
    if target == "detectron2":
        return {
            "model": _to_numpy(state) if pkl else state,
            "__author__": "sn_plugin",
            # names without detectron2's 'backbone.bottom_up.' are matched by suffix, as for its own
            # converted ImageNet backbones
            "matching_heuristics": not prefix,
            "meta": meta,
        }
    return {"meta": meta, "state_dict": state}


# ----------------------------------------------------------------------------------------------- public API

def convert_checkpoint(
    source: Source,
    source_format: str,
    target: str,
    out: Optional[str] = None,
    *,
    from_bn: bool = False,
    bn_start_weight: float = DEFAULT_BN_START_WEIGHT,
    depth: Optional[int] = None,
    prefix: str = "",
    conv1_kernel_t: int = I3D_R50_CONV1_KERNEL_T,
    inflate: InflateArg = I3D_R50_INFLATE,
    inflate_style: str = "3x1x1",
    target_state: Optional[Mapping[str, torch.Tensor]] = None,
    show_progress: bool = False,
) -> Tuple[Dict[str, Any], ConversionSummary]:
    """Convert an SN-ResNet (or, with ``from_bn``, a BN-ResNet) checkpoint to ``target``'s layout.

    Args:
        source: a checkpoint path (``.pth``/``.pkl``) or an already loaded checkpoint dict.
        source_format: its layout: ``"released"`` (the authors' files), ``"mmdet"``,
            ``"mmseg"``, ``"mmpretrain"``, ``"detectron2"``, or ``"torchvision"`` (BN only).
        target: ``"mmdet"``, ``"mmseg"``, ``"mmpretrain"``, ``"mmaction2"``, ``"detectron2"``
            or ``"released"``.
        out: where to write the result (atomically); ``.pkl`` writes detectron2's pickle
            format. It must not be the source file. ``None``: only return it.
        from_bn: the source has BatchNorm layers; each becomes the SN layer that
            :func:`sn_plugin.convert_to_sn` makes of it, starting as that BN.
        bn_start_weight: with ``from_bn``, BN's starting importance weight
            (``convert_to_sn``'s ``original_weight``). The default 0.999 keeps the
            logits trainable; 1 - 1e-7 reproduces the BN network's output within 1e-4.
        depth: the ResNet depth expected (checked against the checkpoint); default: found.
        prefix: put before every target key, e.g. ``"backbone."`` to load a whole-detector
            checkpoint with ``load_from`` (mmdet) or ``"backbone.bottom_up."`` (detectron2,
            then loaded without name matching).
        conv1_kernel_t, inflate, inflate_style: the target ``ResNet3d``'s arguments
            (mmaction2 only; default: its I3D ResNet-50 config).
        target_state: the target model's state dict (e.g. ``model.backbone.state_dict()``):
            every converted tensor's shape is checked against it, and for mmaction2 the
            temporal kernel sizes are read from it instead of ``inflate``.
        show_progress: a progress bar on stderr (tqdm's when installed).

    Returns:
        ``(checkpoint, summary)``: the dict written (or that would be), and a
        :class:`ConversionSummary` of the mapped, dropped and missing keys.
    """
    if target not in SN_TARGETS:
        raise CheckpointError(f"unknown target '{target}'; choose one of {', '.join(SN_TARGETS)}")
    allowed = BN_SOURCES if from_bn else SN_SOURCES
    if source_format not in allowed:
        kind = "BN" if from_bn else "SN"
        raise CheckpointError(f"{kind} checkpoints can be read from {', '.join(allowed)}, not '{source_format}'"
                              + ("" if from_bn or source_format != "torchvision" else "; add --from-bn"))
    if from_bn and not 1 / 3 < bn_start_weight < 1:
        raise CheckpointError(f"bn_start_weight must lie in (1/3, 1) so that BN is favoured and the logits are "
                              f"finite, got {bn_start_weight}")
    if from_bn and target == "released":
        raise CheckpointError("a BN checkpoint has no released SN counterpart: convert it to a toolkit layout")
    pkl = out is not None and out.endswith(".pkl")
    if pkl and target != "detectron2":
        raise CheckpointError(f"'{out}': only detectron2 reads .pkl checkpoints; write a .pth for {target}")
    if out is not None and isinstance(source, (str, os.PathLike)) and same_file(os.fspath(source), out):
        raise CheckpointError(f"output '{out}' is the input file: the input is never overwritten; pick another path")

    summary = ConversionSummary(source_format + (" (BN)" if from_bn else ""), target)
    container, state, label = _load_source(source, source_format)
    layout = get_layout(source_format)
    canon = _read(state, layout, "bn" if from_bn else "sn", label, depth, summary)
    summary.depth = canon.spec.depth
    if source_format == "released":
        _released_to_ours(canon, label)
    _validate(canon, label, summary)
    if from_bn:
        _start_as_bn(canon, bn_start_weight, summary)

    target_layout = LAYOUTS[target]
    temporal_kernels = None
    if target_layout.video:
        temporal_kernels = i3d_temporal_kernels(canon.spec, conv1_kernel_t, inflate, inflate_style)
        if target_state is not None:
            names = {m.name: target_layout.rename(m, canon.norm) for m in canon.spec.modules() if m.kind == "conv"}
            temporal_kernels.update(temporal_kernels_from_state(_strip_state(target_state, prefix), names))
    converted = _write(canon, target_layout, prefix, summary, show_progress, temporal_kernels)
    if target_state is not None:
        check_fits(converted, target_state, label)

    source_meta = container.get("meta") if isinstance(container.get("meta"), Mapping) else {}
    extras = dict(source_meta.get("released", {}))
    if source_format == "released":
        extras.update({k: container[k] for k in ("epoch", "best_prec1") if k in container})
        summary.dropped += [(k, "training state, not weights") for k in ("optimizer",) if k in container]
    with_bn = all(t.numel() == 3 for k, t in canon.tensors.items() if k.endswith(".mean_weight"))
    meta = {
        "sn_plugin": {
            "converted_from": summary.source,
            "depth": canon.spec.depth,
            "using_bn": with_bn,
            "unbiased_instance_var": source_format == "released"
            or bool(source_meta.get("sn_plugin", {}).get("unbiased_instance_var", False)),
        },
        "released": extras,
    }
    if not with_bn:
        summary.notes.append("the SN layers have no BN branch: build them with using_bn=False "
                             "(norm_cfg=dict(type='SN', using_bn=False))")
    if meta["sn_plugin"]["unbiased_instance_var"] and target != "released":
        summary.notes.append("the released layers divide the IN variance by H*W-1: build the SN layers with "
                             "unbiased_instance_var=True to reproduce their outputs exactly (without it they differ "
                             "slightly, most on small feature maps; see docs/model_zoo.md)")
    checkpoint = _container(target, converted, meta, extras, pkl, prefix)
    if out is not None:
        atomic_save(checkpoint, out, pickle_format=pkl)
    return checkpoint, summary


def _strip_state(state: Mapping[str, torch.Tensor], prefix: str) -> Mapping[str, torch.Tensor]:
    return state if not prefix else {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def check_fits(converted: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor],
               source: str = "the converted checkpoint") -> None:
    """Raise unless every converted tensor has the shape the model's state dict has under that key."""
    for key, value in converted.items():
        if key in model_state and tuple(model_state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: shape mismatch for '{key}': the model expects {format_shape(model_state[key].shape)}, "
                f"the checkpoint has {format_shape(value.shape)}"
            )


def released_to(source: Source, target: str, out: Optional[str] = None, **kwargs):
    """The authors' released SN-ResNet checkpoint in ``target``'s layout. See :func:`convert_checkpoint`."""
    return convert_checkpoint(source, "released", target, out, **kwargs)


def to_released(source: Source, source_format: str, out: Optional[str] = None, **kwargs):
    """One of our SN-ResNet checkpoints back in the released layout. See :func:`convert_checkpoint`."""
    return convert_checkpoint(source, source_format, "released", out, **kwargs)


def bn_to_sn(source: Source, source_format: str, target: str, out: Optional[str] = None, **kwargs):
    """A BN-ResNet checkpoint as an SN-ResNet one whose layers start as the BN. See :func:`convert_checkpoint`."""
    return convert_checkpoint(source, source_format, target, out, from_bn=True, **kwargs)
