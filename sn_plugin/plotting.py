"""The paper's Fig. 7: every SN layer's importance weights, as stacked bars.

Weights come from a model, or straight from a checkpoint's logits
(``*.mean_weight`` / ``*.var_weight``), so a checkpoint can be inspected
without building its model. matplotlib is imported only when a figure is drawn.
:func:`main` is the command ``tools/plot_sn_weights.py``.
"""
import argparse
import csv
import importlib
import os
import sys
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .atomic import atomic_write
from .functional import BRANCH_NAMES
from .introspection import importance_weights, stage_of
from .state_dicts import inner_state_dict, strip_prefixes

__all__ = [
    "importance_weights_from_checkpoint", "importance_weights_from_state_dict", "plot_importance_weights",
    "save_importance_figure", "write_importance_csv",
]

Weights = Dict[str, Tuple[Tensor, Tensor]]  # per SN layer in module order: (mean, variance) weights
# Colour-blind-safe, one per branch, in BRANCH_NAMES order.
BRANCH_COLOURS = ("#4477AA", "#EE7733", "#228833")
_LOGIT_SUFFIXES = (".mean_weight", ".var_weight")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


def importance_weights_from_state_dict(checkpoint: Mapping) -> Weights:
    """Per SN layer, the softmaxed (mean, variance) weights read from a state dict's logits.

    Accepts a plain state dict or a checkpoint holding one under ``state_dict``
    or ``model``; ``module.`` prefixes (DataParallel/DDP) are removed. Layers
    keep the state dict's order (the model's module order).
    """
    state = inner_state_dict(checkpoint)
    logits: Dict[str, Dict[str, Tensor]] = OrderedDict()
    for key, value in state.items():
        for suffix in _LOGIT_SUFFIXES:
            if isinstance(key, str) and key.endswith(suffix):
                name = strip_prefixes(key[: -len(suffix)], _WRAPPER_PREFIXES)
                logits.setdefault(name, {})[suffix] = torch.as_tensor(value).detach().float().cpu()
    weights = OrderedDict()
    for name, pair in logits.items():
        if len(pair) != 2 or pair[".mean_weight"].shape != pair[".var_weight"].shape \
                or pair[".mean_weight"].numel() not in (2, 3):
            raise ValueError(f"checkpoint entry {name!r}: expected {name}.mean_weight and {name}.var_weight "
                             f"with 3 ([IN, LN, BN]) or 2 ([IN, LN]) entries each, got "
                             f"{ {k: tuple(v.shape) for k, v in pair.items()} }")
        weights[name] = (pair[".mean_weight"].softmax(0), pair[".var_weight"].softmax(0))
    if not weights:
        raise ValueError(
            "no SN importance logits found: the state dict has no '<layer>.mean_weight' / '<layer>.var_weight' "
            f"entries (it has {len(state)} entries, e.g. {list(state)[:3]}). Pass a checkpoint of a model "
            "with Switchable Normalization layers."
        )
    return weights


def importance_weights_from_checkpoint(path: str) -> Weights:
    """:func:`importance_weights_from_state_dict` of a checkpoint file (read on the CPU).

    Tries torch's safe ``weights_only`` loading first; checkpoints holding other
    Python objects (e.g. mmengine's ``meta``) are then unpickled in full, which
    runs code from the file: only do this with checkpoints you trust.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickle of non-tensor objects: refused by weights_only
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path!r} holds a {type(checkpoint).__name__}, not a state dict or a checkpoint dict")
    return importance_weights_from_state_dict(checkpoint)


def _as_weights(source: Union[nn.Module, Mapping]) -> Weights:
    if isinstance(source, nn.Module):
        weights = importance_weights(source)
        if not weights:
            raise ValueError(f"{type(source).__name__} has no Switchable Normalization layers to plot")
        return weights
    if all(isinstance(v, (tuple, list)) and len(v) == 2 for v in source.values()) and source:
        return OrderedDict(source)  # already name -> (mean, var) weights
    return importance_weights_from_state_dict(source)


def _padded(weights: Tensor) -> list:
    values = weights.tolist()
    return values + [0.0] * (3 - len(values))


def plot_importance_weights(
    source: Union[nn.Module, Mapping],
    title: Optional[str] = None,
    stage: Callable[[str], str] = stage_of,
):
    """A figure of every SN layer's IN/LN/BN importance weights (paper, Fig. 7).

    Two panels, mean weights above and variance weights below, one stacked bar
    per layer in module order, grouped by stage (``stage(name)``, default
    :func:`sn_plugin.stage_of`; layers alone in an unindexed stage, like FPN or
    head convolutions, are grouped under its parent) with a separator and the
    stage name; layers in residual shortcuts are hatched. The width grows with
    the number of layers so a ResNet-50's 53 labels stay readable.

    Args:
        source: a model, a state dict / checkpoint dict with SN logits, or the
            result of :func:`sn_plugin.importance_weights`.
        title: the figure's title.
    Returns:
        a matplotlib ``Figure`` (not registered with pyplot); save it with
        :func:`save_importance_figure` or ``figure.savefig``.
    """
    # A bare Figure renders with Agg and leaves pyplot's backend and figure list alone.
    from matplotlib.figure import Figure

    weights = _as_weights(source)
    names = list(weights)
    stages = _display_groups(names, stage)
    n = len(names)
    width = min(max(8.0, 0.2 * n + 2.5), 60.0)
    figure = Figure(figsize=(width, 6.2), layout="constrained")
    axes = figure.subplots(2, 1, sharex=True)
    positions = list(range(n))
    # As in the paper's figure, the layers in residual shortcuts are marked (hatched).
    hatches = ["///" if _is_shortcut(name) else "" for name in names]
    for row, (ax, label) in enumerate(zip(axes, ("mean", "variance"))):
        values = [_padded(weights[name][row]) for name in names]
        bottom = [0.0] * n
        for branch, (branch_name, colour) in enumerate(zip(BRANCH_NAMES, BRANCH_COLOURS)):
            heights = [v[branch] for v in values]
            ax.bar(positions, heights, bottom=bottom, width=0.85, color=colour, label=branch_name,
                   edgecolor="white", linewidth=0.3, hatch=hatches)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_ylim(0, 1)
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_ylabel(f"{label} weights")
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.tick_params(axis="y", labelsize=8)
        _mark_stages(ax, stages, label_stages=row == 0, bar_inches=(width - 1.8) / n)
    handles, labels = axes[0].get_legend_handles_labels()
    if any(hatches):
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="lightgray", edgecolor="white", hatch="///"))
        labels.append("shortcut")
    axes[0].legend(handles, labels, loc="lower left", bbox_to_anchor=(1.0, 0.0), frameon=False, fontsize=9)
    axes[1].set_xticks(positions)
    axes[1].set_xticklabels([_short_name(name, s) for name, s in zip(names, stages)], rotation=90,
                            fontsize=7 if n > 30 else 8, family="monospace")
    if title:
        figure.suptitle(title)
    return figure


def _is_shortcut(name: str) -> bool:
    """A norm in a residual shortcut: torchvision/mmcv ResNets' ``downsample``, detectron2's ``shortcut``."""
    return any(part in ("downsample", "shortcut") for part in name.split("."))


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _display_groups(names, stage: Callable[[str], str]):
    """The group each bar is drawn in: its stage, except that a layer alone in a stage
    without a block index (``backbone.fpn_lateral2.norm``, ``roi_heads.box_head.conv1.norm``)
    joins its neighbours under the stage's parent (``backbone``, ``roi_heads.box_head``),
    so that FPN and head layers form one group instead of one group per layer."""
    stages = [stage(n) for n in names]
    groups = []
    for i, (name, s) in enumerate(zip(names, stages)):
        alone = (i == 0 or stages[i - 1] != s) and (i + 1 == len(stages) or stages[i + 1] != s)
        groups.append(_parent(s) or s if alone and s == _parent(name) else s)
    return groups


def _short_name(name: str, stage: str) -> str:
    """A layer's name within its stage (``layer1.0.bn1`` -> ``0.bn1``)."""
    if stage and name.startswith(stage + ".") and len(name) > len(stage) + 1:
        return name[len(stage) + 1:]
    return name


def _stage_runs(stages):
    """(stage, first index, last index) of each run of equal consecutive stages."""
    runs = []
    for i, s in enumerate(stages):
        if runs and runs[-1][0] == s:
            runs[-1][2] = i
        else:
            runs.append([s, i, i])
    return runs


# Width of one character of the 8-point stage labels, in inches (about 0.6 em).
_LABEL_CHAR_INCHES = 0.6 * 8 / 72


def _fitted_label(name: str, chars: int):
    """``name`` as it fits over ``chars`` characters of width: whole, on two lines split at a dot,
    or its last component; returns (text, rotation), rotating when even that does not fit."""
    if len(name) <= chars:
        return name, 0
    parts = name.split(".")
    for cut in sorted(range(1, len(parts)), key=lambda k: abs(len(".".join(parts[:k])) - len(name) / 2)):
        lines = [".".join(parts[:cut]) + ".", ".".join(parts[cut:])]
        if max(map(len, lines)) <= chars:
            return "\n".join(lines), 0
    last = parts[-1]
    return last, 0 if len(last) <= chars else 90


def _mark_stages(ax, stages, label_stages: bool, bar_inches: float) -> None:
    runs = _stage_runs(stages)
    prefix = os.path.commonprefix([r[0] + "." for r in runs]) if len(runs) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]  # whole name components only
    for index, (name, first, last) in enumerate(runs):
        if index:
            ax.axvline(first - 0.5, color="black", linewidth=0.8, linestyle="--")
        if label_stages:
            chars = int((last - first + 1) * bar_inches / _LABEL_CHAR_INCHES)
            text, rotation = _fitted_label(name[len(prefix):] or name, chars)
            ax.text((first + last) / 2, 1.02, text, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=8, rotation=rotation, linespacing=1.0)


def save_importance_figure(figure, path: str, dpi: int = 130) -> None:
    """Save a figure atomically (no half-written file if interrupted); the format follows the extension."""
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    atomic_write(path, lambda f: figure.savefig(f, format=fmt, dpi=dpi))


def write_importance_csv(source: Union[nn.Module, Mapping], path: str,
                         stage: Callable[[str], str] = stage_of) -> None:
    """Write the weights as CSV (atomically): ``layer, stage, mean_IN, mean_LN, mean_BN, var_IN,
    var_LN, var_BN``; the BN columns are empty for layers without a BN branch."""
    weights = _as_weights(source)

    def write(f):
        writer = csv.writer(f)
        writer.writerow(["layer", "stage"] + [f"{kind}_{b}" for kind in ("mean", "var") for b in BRANCH_NAMES])
        for name, (mean_w, var_w) in weights.items():
            cells = []
            for w in (mean_w, var_w):
                values = [repr(float(v)) for v in w.tolist()]
                cells += values + [""] * (3 - len(values))
            writer.writerow([name, stage(name)] + cells)

    atomic_write(path, write, binary=False)


# ---------------------------------------------------------------------------- the command

def _weights_of_builder(source: str) -> Weights:
    """The weights of the model that ``'package.module:callable'`` returns.

    The module is looked up from the current directory too, as ``python -m`` would.
    """
    module_name, _, attr = source.partition(":")
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"error: cannot load {source!r}: {e}")
    finally:
        sys.path.remove(cwd)
    model = builder()
    if not isinstance(model, nn.Module):
        raise SystemExit(f"error: {source} returned a {type(model).__name__}, not a torch.nn.Module")
    weights = importance_weights(model)
    if not weights:
        raise SystemExit(f"error: the model built by {source} has no Switchable Normalization layers")
    return weights


def main(argv: Optional[List[str]] = None) -> None:
    """``tools/plot_sn_weights.py``: the figure and the CSV of a checkpoint's or a model's weights.

    ``CHECKPOINT_OR_MODEL`` is a checkpoint file (read with
    :func:`importance_weights_from_checkpoint`, without building the model) or
    ``'package.module:callable'``, a callable returning a model (e.g. one that
    builds it and loads trained weights). The CSV goes next to the figure (same
    name, .csv) unless ``--csv`` says otherwise. Exits with a message on bad input.
    """
    parser = argparse.ArgumentParser(
        description="Plot every SN layer's importance weights (the paper's Fig. 7) and write them as CSV.")
    parser.add_argument("source", metavar="CHECKPOINT_OR_MODEL",
                        help="checkpoint file, or 'package.module:callable' returning a model")
    parser.add_argument("--out", required=True, help="figure path (.png, .pdf, .svg)")
    parser.add_argument("--csv", help="CSV path (default: the figure's path with .csv)")
    parser.add_argument("--title", help="figure title (default: the source)")
    parser.add_argument("--dpi", type=int, default=130)
    args = parser.parse_args(argv)

    if os.path.isfile(args.source):
        try:
            weights = importance_weights_from_checkpoint(args.source)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    elif ":" in args.source:
        weights = _weights_of_builder(args.source)
    else:
        raise SystemExit(f"error: {args.source!r} is neither an existing checkpoint file nor 'module:callable'")
    csv_path = args.csv or os.path.splitext(args.out)[0] + ".csv"
    figure = plot_importance_weights(weights, title=args.title or os.path.basename(args.source))
    save_importance_figure(figure, args.out, dpi=args.dpi)
    write_importance_csv(weights, csv_path)
    print(f"{len(weights)} SN layers: figure {args.out}, numbers {csv_path}")
