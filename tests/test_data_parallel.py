"""nn.DataParallel around a model with SN (users of the authors' sparse SN hit errors there)."""
import torch
from torch import nn

from sn_plugin import SwitchNorm2d, importance_weights, recompute_batch_stats, sparsify


def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SwitchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), SwitchNorm2d(4, using_moving_average=False))


def test_data_parallel_trains_evaluates_and_saves_like_the_bare_model():
    torch.manual_seed(0)
    bare = small_net()
    wrapped = nn.DataParallel(small_net())
    wrapped.module.load_state_dict(bare.state_dict())
    x = torch.randn(4, 3, 8, 8)
    for model in (bare, wrapped):
        model(x).square().mean().backward()
    for (name, p), q in zip(bare.named_parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    torch.testing.assert_close(bare[1].running_var, wrapped.module[1].running_var)

    for model in (bare, wrapped):
        recompute_batch_stats(model, [x, x + 1], progress=False)
    assert set(importance_weights(wrapped)) == {f"module.{k}" for k in importance_weights(bare)}
    torch.testing.assert_close(bare.eval()(x), wrapped.eval()(x))
    assert set(wrapped.state_dict()) == {f"module.{k}" for k in bare.state_dict()}

    sparse = sparsify(wrapped)
    assert isinstance(sparse, nn.DataParallel)
    torch.testing.assert_close(sparse.eval()(x), sparsify(bare).eval()(x))
