"""What the SN layers of a model have learned: their importance weights."""
from collections import OrderedDict
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from .functional import BRANCH_NAMES
from .switchable_norm import SwitchNormBase


def switch_norm_layers(model: nn.Module) -> "OrderedDict[str, SwitchNormBase]":
    """Every SN layer of ``model`` by qualified name, in module order."""
    return OrderedDict((name, m) for name, m in model.named_modules() if isinstance(m, SwitchNormBase))


@torch.no_grad()
def importance_weights(model: nn.Module) -> "OrderedDict[str, Tuple[Tensor, Tensor]]":
    """Per SN layer name, the softmaxed (mean, variance) importance weights, on CPU.

    Each tensor is ordered [IN, LN, BN] (or [IN, LN] for SN without BN).
    """
    return OrderedDict(
        (name, tuple(w.detach().float().cpu() for w in m.importance_weights()))
        for name, m in switch_norm_layers(model).items()
    )


def stage_of(layer_name: str) -> str:
    """The stage a layer belongs to: its name up to the first repeated-block index.

    ``backbone.layer1.0.sn1`` -> ``backbone.layer1``;
    ``backbone.bottom_up.res2.0.conv1.norm`` -> ``backbone.bottom_up.res2``;
    ``neck.lateral_convs.0.sn`` -> ``neck.lateral_convs``; a name without an
    index (a stem's norm, ``backbone.sn1``) belongs to its parent (``backbone``).
    """
    parts = layer_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return ".".join(parts[:i])
    return ".".join(parts[:-1]) or layer_name


def importance_summary(model: nn.Module, prefix: str = "sn_weights") -> Dict[str, float]:
    """Mean importance weight per stage, as flat scalars for a logger.

    Keys are ``{prefix}/{stage}/{mean|var}_{IN|LN|BN}``; a stage averages the
    weights of its SN layers (layers without a BN branch count 0 for BN).
    """
    per_stage: Dict[str, list] = OrderedDict()
    for name, (mean_w, var_w) in importance_weights(model).items():
        per_stage.setdefault(stage_of(name), []).append((_pad(mean_w), _pad(var_w)))
    scalars: Dict[str, float] = OrderedDict()
    for stage, weights in per_stage.items():
        for kind, column in (("mean", 0), ("var", 1)):
            average = torch.stack([w[column] for w in weights]).mean(0)
            for branch, value in zip(BRANCH_NAMES, average.tolist()):
                scalars[f"{prefix}/{stage}/{kind}_{branch}"] = value
    return scalars


def _pad(weights: Tensor) -> Tensor:
    return torch.cat([weights, weights.new_zeros(3 - weights.numel())])
