"""Weight decay for SN in mmengine's optimizer wrappers."""
import logging
from typing import List

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

from ...switchable_norm import SwitchNormBase


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class SNOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor, counting SN layers as normalization layers.

    The default constructor applies ``paramwise_cfg``'s ``norm_decay_mult`` (and
    exempts norm biases from ``bias_lr_mult``) only for BatchNorm, InstanceNorm,
    GroupNorm and LayerNorm. Here the same rules also cover every parameter of
    an SN layer: gamma (``weight``), beta (``bias``) and the importance logits
    (``mean_weight``, ``var_weight``). The one config line::

        optim_wrapper = dict(constructor='SNOptimWrapperConstructor', paramwise_cfg=dict(norm_decay_mult=0.))

    gives SN (and every other norm layer) no weight decay, the paper's
    detection setting. ``custom_keys`` still take precedence, e.g.
    ``custom_keys={'.mean_weight': dict(decay_mult=1.), '.var_weight': dict(decay_mult=1.)}``
    keeps decay on the logits only.
    """

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = "",
                   is_dcn_module=None) -> None:
        first = len(params)
        super().add_params(params, module, prefix, is_dcn_module)
        if isinstance(module, SwitchNormBase):
            self._apply_norm_rules(params[first:], module, prefix)

    def _apply_norm_rules(self, groups: List[dict], layer: nn.Module, prefix: str) -> None:
        """Redo what the default constructor does differently for a norm layer's own parameters."""
        names = {id(p): name for name, p in layer.named_parameters(recurse=False)}
        custom_keys = self.paramwise_cfg.get("custom_keys", {})
        norm_decay_mult = self.paramwise_cfg.get("norm_decay_mult", None)
        for group in groups:
            name = names[id(group["params"][0])]
            full_name = f"{prefix}.{name}" if prefix else name
            if any(key in full_name for key in custom_keys):
                continue
            if name == "bias":
                group.pop("lr", None)  # bias_lr_mult does not apply to a norm layer's bias
            if self.base_wd is not None and norm_decay_mult is not None:
                group["weight_decay"] = self.base_wd * norm_decay_mult
            print_log(f"paramwise_options -- {full_name} (SN): "
                      f"lr={group.get('lr', self.base_lr)}, weight_decay={group.get('weight_decay', self.base_wd)}",
                      logger="current", level=logging.DEBUG)
