"""Deployment: SN models export with torch.export and to ONNX, and give the eager outputs."""
import pytest
import torch
from torch import nn

from sn_plugin import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SyncSwitchNorm, kernels, sparsify

SHAPES = {SwitchNorm1d: (4, 6), SwitchNorm2d: (2, 6, 8, 8), SwitchNorm3d: (2, 6, 3, 4, 4)}


def model_with(cls, **options):
    torch.manual_seed(0)
    norm = cls(6, **options)
    with torch.no_grad():
        norm.mean_weight.copy_(torch.randn(norm.mean_weight.shape))
        norm.var_weight.copy_(torch.randn(norm.var_weight.shape))
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
        if norm.running_mean is not None:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
            norm.num_batches_tracked.fill_(1)
    return nn.Sequential(norm, nn.ReLU()).eval()


def custom_ops(program):
    return {str(node.target) for node in program.graph.nodes if "sn_plugin" in str(node.target)}


CASES = [(cls, {}) for cls in SHAPES] + [
    (SwitchNorm2d, dict(unbiased_instance_var=True)),
    (SwitchNorm2d, dict(using_bn=False)),
    (SwitchNorm1d, dict(unbiased_instance_var=True)),
    (SwitchNorm2d, dict(using_moving_average=False)),  # batch-average statistics, as the demo trains
]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("cls, options", CASES)
def test_torch_export_gives_the_eager_outputs(cls, options, backend):
    previous = kernels.set_backend(backend)
    try:
        model = model_with(cls, **options)
        x = torch.randn(SHAPES[cls]) * 2 + 1
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
        if kernels.backend_for(x) == "cpp":
            assert custom_ops(program), "the fused operators should appear in the exported graph"
    finally:
        kernels.set_backend(previous)


@pytest.mark.parametrize("cls, options", CASES)
def test_onnx_export_runs_in_onnxruntime_with_the_eager_outputs(cls, options, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = model_with(cls, **options)
    x = torch.randn(SHAPES[cls]) * 2 + 1
    path = tmp_path / "sn.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(output), model(x), rtol=1e-5, atol=1e-5)


def test_sparse_model_exports_as_plain_normalization_operators():
    model = nn.Sequential(SwitchNorm2d(6), nn.Conv2d(6, 6, 1), SwitchNorm2d(6), nn.Conv2d(6, 6, 1), SwitchNorm2d(6))
    with torch.no_grad():
        for layer, branch in zip(model[::2], (0, 1, 2)):  # IN, LN, BN
            for logits in (layer.mean_weight, layer.var_weight):
                logits.zero_()
                logits[branch] = 4.0
    sparse = sparsify(model).eval()
    x = torch.randn(2, 6, 8, 8)
    program = torch.export.export(sparse, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not custom_ops(program)
    assert any("group_norm" in t for t in targets) and any("batch_norm" in t for t in targets)
    torch.testing.assert_close(program.module()(x), sparse(x), rtol=1e-5, atol=1e-5)


def test_exporting_a_training_synchronized_layer_is_refused_with_the_fix():
    class Synced(nn.Module):  # a layer that has a process group while training (as under DDP)
        def __init__(self):
            super().__init__()
            self.norm = SyncSwitchNorm(6)

        def forward(self, x):
            from sn_plugin.functional import switch_norm
            return switch_norm(x, None, None, self.norm.mean_weight, self.norm.var_weight,
                               training=True, process_group=object())

    previous = kernels.set_backend("reference")
    try:
        with pytest.raises(Exception, match="eval mode"):
            torch.export.export(Synced(), (torch.randn(2, 6, 4, 4),))
    finally:
        kernels.set_backend(previous)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_exported_program_takes_other_batch_sizes_and_image_sizes(backend):
    previous = kernels.set_backend(backend)
    try:
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), model_with(SwitchNorm2d)).eval()
        batch, height = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("height", min=2, max=512)
        program = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch, 2: height},))
        other = torch.randn(5, 3, 12, 8)
        torch.testing.assert_close(program.module()(other), model(other), rtol=1e-5, atol=1e-5)
    finally:
        kernels.set_backend(previous)


def test_onnx_model_takes_other_batch_sizes_and_image_sizes(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), model_with(SwitchNorm2d)).eval()
    batch, height = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("height", min=2, max=512)
    path = tmp_path / "sn.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), str(path), dynamo=True, verbose=False,
                      dynamic_shapes=({0: batch, 2: height},))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randn(5, 3, 12, 8)
    (output,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    torch.testing.assert_close(torch.from_numpy(output), model(other), rtol=1e-5, atol=1e-5)
