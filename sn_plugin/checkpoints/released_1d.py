"""The authors' ``SwitchNorm1d`` layers (e.g. in the heads of their classifiers) as our SN layers.

Their 1d layer normalizes (N, C) inputs with two logits [LN, BN]; its state has
``weight``/``bias``/``running_mean``/``running_var`` of shape (1, C) and no
``num_batches_tracked``. Ours keeps three logits [IN, LN, BN] and ignores the IN
one for (N, C) inputs (see :class:`sn_plugin.SwitchNorm1d`). The conversion sets
the IN logit to a margin so large that its softmax weight is exactly 0, so
``importance_weights()`` reports their [LN, BN] mix, and an (N, C, L) input
would not use IN either. Build the layers with ``unbiased_instance_var=True``
(their unbiased variances) and ``momentum=1 - their_momentum`` (their 0.997 is
our 0.003: they weigh the running value, PyTorch weighs the batch).
"""
from collections import OrderedDict
from typing import Dict, Mapping

import torch

from .errors import CheckpointError

__all__ = ["convert_released_1d_state"]

# exp(-1e4) is 0 in every floating dtype: the IN branch gets weight exactly 0.
_ABSENT_BRANCH_LOGIT = -1e4


def _is_released_1d_layer(state: Mapping[str, torch.Tensor], prefix: str) -> bool:
    weight = state.get(prefix + "weight")
    logits = state.get(prefix + "mean_weight")
    return (weight is not None and logits is not None and weight.dim() == 2 and weight.shape[0] == 1
            and logits.numel() == 2)


def convert_released_1d_state(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A copy of ``state`` in which every layer of the authors' ``SwitchNorm1d`` has our layout.

    A layer is recognised by its ``mean_weight`` of 2 entries beside a ``weight``
    of shape (1, C). Its (1, C) tensors become (C,), each logit vector [LN, BN]
    becomes [absent, LN, BN], and ``num_batches_tracked`` is added as 1 (their
    running statistics count as estimated). Every other key is copied as it is;
    ``state`` is not modified.

    Raises:
        CheckpointError: a recognised layer lacks one of its entries or has
            inconsistent shapes.
    """
    prefixes = [key[: -len("mean_weight")] for key in state if key.endswith("mean_weight")]
    layers = [p for p in prefixes if _is_released_1d_layer(state, p)]
    converted: Dict[str, torch.Tensor] = OrderedDict(state)
    for prefix in layers:
        channels = state[prefix + "weight"].shape[1]
        for name in ("weight", "bias", "running_mean", "running_var"):
            key = prefix + name
            if key not in state:
                raise CheckpointError(f"released SwitchNorm1d '{prefix[:-1]}' has no '{key}'")
            if tuple(state[key].shape) != (1, channels):
                raise CheckpointError(
                    f"released SwitchNorm1d '{prefix[:-1]}': '{key}' has shape {tuple(state[key].shape)}, "
                    f"expected (1, {channels}) like its weight")
            converted[key] = state[key].reshape(channels)
        for name in ("mean_weight", "var_weight"):
            key = prefix + name
            if key not in state or state[key].numel() != 2:
                raise CheckpointError(f"released SwitchNorm1d '{prefix[:-1]}': '{key}' must have 2 logits [LN, BN]")
            logits = state[key]
            converted[key] = torch.cat([logits.new_full((1,), _ABSENT_BRANCH_LOGIT), logits.reshape(2)])
        converted[prefix + "num_batches_tracked"] = torch.tensor(1, dtype=torch.long)
    return converted
