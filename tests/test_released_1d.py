"""The authors' SwitchNorm1d state loads into ours and computes what their layer computes."""
import pytest
import torch

from sn_plugin import SwitchNorm1d
from sn_plugin.checkpoints import CheckpointError, convert_released_1d_state


def released_1d_state(channels=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "head.weight": torch.randn(1, channels, generator=g),
        "head.bias": torch.randn(1, channels, generator=g),
        "head.mean_weight": torch.randn(2, generator=g),
        "head.var_weight": torch.randn(2, generator=g),
        "head.running_mean": torch.randn(1, channels, generator=g),
        "head.running_var": torch.rand(1, channels, generator=g) + 0.5,
        "fc.weight": torch.randn(3, channels, generator=g),
    }


def authors_forward(state, x, training, eps=1e-5):
    """Their layer's forward (unbiased variances), written from their published formulas."""
    mean_ln, var_ln = x.mean(1, keepdim=True), x.var(1, keepdim=True)
    if training:
        mean_bn, var_bn = x.mean(0, keepdim=True), x.var(0, keepdim=True)
    else:
        mean_bn, var_bn = state["head.running_mean"], state["head.running_var"]
    wm, wv = state["head.mean_weight"].softmax(0), state["head.var_weight"].softmax(0)
    mean = wm[0] * mean_ln + wm[1] * mean_bn
    var = wv[0] * var_ln + wv[1] * var_bn
    return (x - mean) / (var + eps).sqrt() * state["head.weight"] + state["head.bias"]


@pytest.mark.parametrize("training", [True, False])
def test_converted_layer_reproduces_the_authors_1d_layer(training):
    state = released_1d_state()
    original = {k: v.clone() for k, v in state.items()}
    converted = convert_released_1d_state(state)
    layer = SwitchNorm1d(5, unbiased_instance_var=True).train(training)
    layer.load_state_dict({k[len("head."):]: v for k, v in converted.items() if k.startswith("head.")})
    x = torch.randn(8, 5) * 2 + 1
    torch.testing.assert_close(layer(x), authors_forward(state, x, training), rtol=1e-5, atol=1e-5)
    mean_w, var_w = layer.importance_weights()
    assert mean_w[0] == 0 and var_w[0] == 0
    torch.testing.assert_close(mean_w[1:], state["head.mean_weight"].softmax(0))
    assert converted["fc.weight"] is state["fc.weight"]
    assert all(torch.equal(state[k], original[k]) for k in state)  # the input is not modified


def test_incomplete_released_layer_is_named():
    state = released_1d_state()
    del state["head.running_var"]
    with pytest.raises(CheckpointError, match="head.*running_var"):
        convert_released_1d_state(state)


def test_our_own_layers_are_left_alone():
    ours = {f"n.{k}": v for k, v in SwitchNorm1d(4, using_bn=False).state_dict().items()}
    assert convert_released_1d_state(ours).keys() == ours.keys()
