"""Weight decay for SN: detectron2's optimizer parameters with SN's parameters counted as norm parameters.

Detectron2 v0.6's ``get_default_optimizer_params`` lists its norm classes
inline, so ``weight_decay_norm`` misses SN. Nothing of detectron2 is patched
for it: :func:`get_default_optimizer_params` wraps detectron2's function,
:func:`build_optimizer` is detectron2's ``build_optimizer`` built on it, and
``SNTrainer.build_optimizer`` calls that. LazyConfig users name
``sn_plugin.integrations.detectron2.get_default_optimizer_params`` in their
optimizer's ``params``.
"""
import copy
import inspect
from typing import Any, Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.solver import build as d2_solver
from torch import nn

from ...switchable_norm import SwitchNormBase


def get_default_optimizer_params(model: nn.Module, *args, **kwargs) -> List[Dict[str, Any]]:
    """Detectron2's ``get_default_optimizer_params``, counting SN layers as norm layers.

    Takes the same arguments. ``weight_decay_norm`` then also applies to SN's
    ``weight``, ``bias``, ``mean_weight`` and ``var_weight``; as for detectron2's
    norm layers, a per-name override with a weight decay (e.g.
    ``weight_decay_bias`` for ``bias``) takes precedence.
    """
    arguments = inspect.signature(d2_solver.get_default_optimizer_params).bind(model, *args, **kwargs).arguments
    # Detectron2 adds its bias override to the ``overrides`` dict it is given; pass it a copy.
    overrides = copy.deepcopy(arguments.get("overrides")) or {}
    arguments["overrides"] = copy.deepcopy(overrides)
    groups = d2_solver.get_default_optimizer_params(**arguments)
    weight_decay_norm = arguments.get("weight_decay_norm")
    if weight_decay_norm is None:
        return groups
    if arguments.get("weight_decay_bias") is not None:
        overrides.setdefault("bias", {})["weight_decay"] = arguments["weight_decay_bias"]
    norm_params = {
        param
        for layer in model.modules() if isinstance(layer, SwitchNormBase)
        for name, param in layer.named_parameters(recurse=False)
        if "weight_decay" not in overrides.get(name, {})
    }
    per_param = []
    for group in groups:
        for param in group["params"]:
            item = {**group, "params": [param]}
            if param in norm_params:
                item["weight_decay"] = weight_decay_norm
            per_param.append(item)
    return d2_solver.reduce_param_groups(per_param)


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """Detectron2's ``build_optimizer`` (SGD from ``cfg.SOLVER``, with its gradient clipping),
    with SN's parameters under ``SOLVER.WEIGHT_DECAY_NORM``."""
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    return d2_solver.maybe_add_gradient_clipping(cfg, torch.optim.SGD)(
        params,
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
