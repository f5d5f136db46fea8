"""The fused SN kernels (issue 10): C++ CPU ops against the naive semantics and the reference path.

The whole core suite (test_switchable_norm.py, test_sync_switch_norm.py) also runs on both
paths; this file adds what only the fused path has: the ops themselves (gradcheck,
saved memory, no host reads), torch.compile/export, and the backend choice.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import sn_plugin
from sn_plugin import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchNormNd, kernels
from sn_plugin.kernels import ops

from kernel_helpers import naive_switch_norm, no_host_sync

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
built = pytest.mark.skipif(kernels.CPU_KERNELS_MISSING is not None, reason="C++ kernels not built")


@pytest.fixture
def fused():
    previous = kernels.set_backend("cpp")
    yield
    kernels.set_backend(previous)


def randomised(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(layer.num_features, generator=g))
            layer.running_var.copy_(torch.rand(layer.num_features, generator=g) + 0.5)
    return layer


def test_cpp_kernels_are_built():
    """The project's set-up builds the extension (pip install -e . --no-build-isolation)."""
    assert kernels.CPU_KERNELS_MISSING is None, (
        f"the C++ kernels are not built ({kernels.CPU_KERNELS_MISSING}): {kernels.HOW_TO_BUILD}")
    from sn_plugin.kernels import _C

    assert _C.cpu_capability() in ("AVX512", "AVX2", "DEFAULT")


# ----------------------------------------------------------------- the semantics

SHAPES = [(4, 6, 7), (4, 6, 5, 3), (3, 4, 2, 3, 4), (8, 5), (1, 6, 5, 5), (4, 6, 1, 1), (5, 3, 1)]


@built
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("using_bn, with_running", [(True, True), (True, False), (False, False)])
def test_fused_op_matches_the_naive_semantics(fused, shape, training, unbiased, using_bn, with_running):
    torch.manual_seed(hash((shape, training, unbiased, using_bn)) % 1000)
    c = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    k = 3 if using_bn else 2
    params = [torch.randn(k, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    params += [torch.randn(c, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    running = [torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5]
    if not with_running:
        running = [None, None]
    expected_running = [None if r is None else r.clone() for r in running]
    dy = torch.randn(shape, dtype=torch.float64)

    y = kernels.switch_norm(x, *running, *params, training, 0.3, 1e-5, None, unbiased)
    grads = torch.autograd.grad(y, [x] + params, dy)
    expected = naive_switch_norm(x, *params, *expected_running, training, 0.3, 1e-5, unbiased)
    expected_grads = torch.autograd.grad(expected, [x] + params, dy, allow_unused=True)

    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-9, atol=1e-9)
    for r, e in zip(running, expected_running):
        if r is not None:
            torch.testing.assert_close(r, e, rtol=1e-12, atol=1e-12)


@built
@pytest.mark.parametrize("training", [True, False])
def test_passes_split_over_threads_give_the_same_result(fused, training):
    """Large enough that the passes run in parallel tasks (and the backward sums per thread)."""
    torch.manual_seed(8)
    x = torch.randn(6, 40, 30, 30, dtype=torch.float64) * 2 + 1
    dy = torch.randn(x.shape, dtype=torch.float64)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            layer = randomised(SwitchNorm2d(40).double(), seed=9).train(training)
            xg = x.clone().requires_grad_()
            (layer(xg) * dy).sum().backward()
            results.append([layer(x).detach(), xg.grad] + [p.grad for p in layer.parameters()])
    finally:
        torch.set_num_threads(previous)
    layer = randomised(SwitchNorm2d(40).double(), seed=9)
    inputs = [x.clone().requires_grad_()] + [p.detach().clone().requires_grad_() for p in layer.parameters()]
    running = (None, None) if training else (layer.running_mean, layer.running_var)
    expected = naive_switch_norm(inputs[0], inputs[3], inputs[4], inputs[1], inputs[2], *running, training, 0.1,
                                 1e-5, False)
    expected_grads = torch.autograd.grad(expected, inputs, dy)
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[1][0], expected.detach(), rtol=1e-10, atol=1e-10)
    for got, want in zip(results[1][1:], expected_grads):  # x, weight, bias, logits
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@built
@pytest.mark.parametrize("shape, training, unbiased", [
    ((3, 4, 5), True, False), ((3, 4, 2, 3), False, True), ((4, 3), True, True), ((2, 3, 1, 1), True, False),
])
def test_gradcheck_of_the_custom_op(shape, training, unbiased):
    torch.manual_seed(1)
    n, c = shape[:2]
    s = 1
    for size in shape[2:]:
        s *= size
    has_in = len(shape) > 2
    x = torch.randn(n, c, s, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    params += [torch.randn(c, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    running = (None, None)
    if not training:
        running = (torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 1)

    def fn(x, mean_logits, var_logits, weight, bias):
        return ops.forward(x, mean_logits, var_logits, weight, bias, *running, training, 1e-5, unbiased, has_in)[0]

    assert torch.autograd.gradcheck(fn, (x, *params))


@built
@pytest.mark.parametrize("cls, shape", [(SwitchNorm2d, (4, 6, 5, 5)), (SwitchNorm3d, (2, 4, 3, 4, 5)),
                                        (SwitchNorm1d, (6, 5)), (SwitchNorm1d, (3, 4, 9))])
@pytest.mark.parametrize("training", [True, False])
def test_fused_and_reference_paths_agree_in_float32(cls, shape, training):
    torch.manual_seed(2)
    x = torch.randn(shape) * 2 + 3
    dy = torch.randn(shape)
    results = {}
    for backend in ("cpp", "reference"):
        previous = kernels.set_backend(backend)
        try:
            layer = randomised(cls(shape[1], momentum=0.2), seed=5).train(training)
            xg = x.clone().requires_grad_()
            (layer(xg) * dy).sum().backward()
            results[backend] = [layer(x.clone()).detach(), xg.grad] + [p.grad for p in layer.parameters()] + [
                layer.running_mean, layer.running_var]
        finally:
            kernels.set_backend(previous)
    for got, expected in zip(results["cpp"], results["reference"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# Row lengths S on both sides of every boundary the CPU passes have: a vector step (16 or 32
# values for float, 8 or 16 for double), a block of float accumulation (2048 values), a page of
# short rows summed together; 21 rows, not a multiple of the rows summed at once (4 to 16).
ROW_LENGTHS = [2, 7, 15, 16, 17, 31, 32, 33, 49, 63, 64, 65, 196, 2047, 2048, 2049, 4099]


@built
@pytest.mark.parametrize("s", ROW_LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_row_length_matches_the_naive_semantics(fused, s, dtype):
    torch.manual_seed(s)
    x = (torch.randn(3, 7, s, dtype=torch.float64) * 2 + 5).to(dtype).requires_grad_()
    params = [torch.randn(3, dtype=dtype, requires_grad=True) for _ in range(2)]
    params += [torch.randn(7, dtype=dtype, requires_grad=True) for _ in range(2)]
    dy = torch.randn(x.shape, dtype=dtype)
    y = kernels.switch_norm(x, None, None, *params, True, 0.1, 1e-5, None, False)
    grads = torch.autograd.grad(y, [x] + params, dy)
    x64 = x.detach().double().requires_grad_()
    params64 = [p.detach().double().requires_grad_() for p in params]
    expected = naive_switch_norm(x64, *params64, None, None, True, 0.1, 1e-5, False)
    expected_grads = torch.autograd.grad(expected, [x64] + params64, dy.double())
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol * max(1.0, e.abs().max().item()))


@built
@pytest.mark.parametrize("s", [1, 7, 49, 4099])
def test_low_precision_row_lengths_match_float32(fused, s):
    """bfloat16 and float16 load and store two float vectors a step: their tails differ from float's."""
    torch.manual_seed(s)
    x = torch.randn(3, 7, s) * 2 + 5
    layer = randomised(SwitchNormNd(7) if s > 1 else SwitchNorm1d(7))
    shape = (3, 7, s) if s > 1 else (3, 7)
    expected = layer(x.view(shape))
    for dtype, tol in ((torch.bfloat16, 6e-2), (torch.float16, 1e-2)):
        y = layer(x.view(shape).to(dtype))
        torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol)


# ----------------------------------------------------------------- awkward inputs


@built
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, 6, 7, 7), (0, 6)])
def test_empty_batch_gives_empty_output_zero_gradients_and_untouched_statistics(fused, training, shape):
    layer = randomised(SwitchNormNd(6)).train(training)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in layer.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


@built
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_normalised_in_float32(fused, dtype):
    torch.manual_seed(3)
    layer = randomised(SwitchNorm2d(6))
    x = (torch.randn(4, 6, 8, 8) * 1e3).to(dtype)  # x^2 overflows float16
    dy = torch.randn(x.shape).to(dtype)
    xg, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    y = layer(xg)
    (y * dy).sum().backward()
    y32 = layer(x32)
    (y32 * dy.float()).sum().backward()
    assert y.dtype == dtype and xg.grad.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(y.float(), y32, rtol=tol, atol=tol)
    torch.testing.assert_close(xg.grad.float(), x32.grad, rtol=tol, atol=tol * x32.grad.abs().max().item())


@built
def test_autocast_keeps_float32_statistics(fused):
    layer = randomised(SwitchNorm2d(6))
    conv = nn.Conv2d(3, 6, 3)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(conv(x))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(conv(x)), rtol=5e-2, atol=5e-2)


@built
def test_channels_last_and_non_contiguous_inputs(fused):
    torch.manual_seed(4)
    layer = randomised(SwitchNorm2d(6))
    x = torch.randn(4, 6, 8, 9)
    expected = layer(x)
    y = layer(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(layer(x.transpose(2, 3).contiguous().transpose(2, 3)), expected)
    x5 = torch.randn(2, 6, 3, 4, 5)
    layer3 = randomised(SwitchNorm3d(6))
    y5 = layer3(x5.contiguous(memory_format=torch.channels_last_3d))
    assert y5.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y5, layer3(x5))


@built
def test_large_offset_moments_and_gradients_stay_accurate(fused):
    """Mean 1e4, std 1: float32 holds the values to ~1e-3; the IN variances, outputs and
    gradients must lose nothing more to the offset."""
    torch.manual_seed(5)
    x = torch.randn(4, 6, 16, 16) + 1e4
    _, var_in = ops.moments(x.view(4, 6, 256), False)
    exact = x.double().view(4, 6, 256).var(-1, unbiased=False)
    torch.testing.assert_close(var_in, exact, rtol=1e-6, atol=0)
    layer = randomised(SwitchNorm2d(6))
    dy = torch.randn(x.shape)
    xg = x.clone().requires_grad_()
    (layer(xg) * dy).sum().backward()
    grads = [xg.grad] + [p.grad.clone() for p in layer.parameters()]
    layer64 = randomised(SwitchNorm2d(6).double())
    x64 = x.double().requires_grad_()
    (layer64(x64) * dy.double()).sum().backward()
    for g, e in zip(grads, [x64.grad] + [p.grad for p in layer64.parameters()]):
        assert (g.double() - e).abs().max() <= 1e-4 * e.abs().max()


@built
@pytest.mark.parametrize("sn, bn, shape", [(SwitchNorm2d, nn.BatchNorm2d, (8, 16, 7, 7)),
                                           (SwitchNorm1d, nn.BatchNorm1d, (512, 128))])
def test_saved_for_backward_is_within_five_percent_of_batch_norm(sn, bn, shape):
    """Small maps are where per-(n, c) statistics weigh most: 7x7, as in detector heads; an (N, C)
    input has one value per (n, c), which must not be saved again as its IN mean."""
    x = torch.randn(shape, requires_grad=True)

    def saved(layer):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        return sum(storages.values())

    previous = kernels.set_backend("cpp")
    try:
        assert saved(sn(shape[1])) <= 1.05 * saved(bn(shape[1]))
    finally:
        kernels.set_backend(previous)


@built
@pytest.mark.parametrize("training", [True, False])
def test_no_host_synchronisation_in_forward_or_backward(fused, training):
    layer = randomised(SwitchNorm2d(6)).train(training)
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    with no_host_sync():
        layer(x).square().sum().backward()
    assert x.grad is not None


@built
def test_the_layer_adds_no_view_nodes_to_the_autograd_graph(fused):
    """The ops take (N, C, *) inputs as they are: a view node around the op would cost a
    fixed time in forward and backward on every call, which small layers notice."""
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = SwitchNorm2d(3)(x)
    inputs = [fn.variable for fn, _ in y.grad_fn.next_functions if hasattr(fn, "variable")]
    assert any(v is x for v in inputs), type(y.grad_fn).__name__


def test_host_sync_guard_catches_reads():
    with no_host_sync(), pytest.raises(AssertionError, match="item"):
        torch.ones(1).item()


# ----------------------------------------------------------------- torch.compile and export


@built
def test_torch_compile_captures_the_layer_in_one_graph_with_the_custom_ops(fused):
    torch.manual_seed(6)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomised(SwitchNorm2d(4)), nn.ReLU())
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), randomised(SwitchNorm2d(4)), nn.ReLU())
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 10, 10)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(xc).square().sum().backward()
    reference(xe).square().sum().backward()
    assert len(graphs) == 1
    assert "sn_plugin.forward" in graphs[0].code and "sn_plugin.update_running_stats" in graphs[0].code
    torch.testing.assert_close(xc.grad, xe.grad)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    torch._dynamo.reset()


@built
def test_torch_compile_with_aot_autograd_matches_eager(fused):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomised(SwitchNorm2d(4)), nn.ReLU())
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), randomised(SwitchNorm2d(4)), nn.ReLU())
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 10, 10)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(xc).square().sum().backward()
    reference(xe).square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch._dynamo.reset()


@built
def test_torch_compile_of_an_n_c_input_matches_eager(fused):
    """(N, C) inputs keep no IN means: the fake implementation must give the same (N, 0) shape."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 5), randomised(SwitchNorm1d(5)))
    reference = nn.Sequential(nn.Linear(6, 5), randomised(SwitchNorm1d(5)))
    reference.load_state_dict(model.state_dict())
    x = torch.randn(16, 6)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc = compiled(xc)
    ye = reference(xe)
    torch.testing.assert_close(yc, ye)
    yc.square().sum().backward()
    ye.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    torch._dynamo.reset()


@built
def test_torch_export_sees_the_custom_op(fused):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomised(SwitchNorm2d(4))).eval()
    x = torch.randn(2, 3, 10, 10)
    exported = torch.export.export(model, (x,))
    assert "sn_plugin.forward" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), model(x))


# ----------------------------------------------------------------- the backend choice


@built
def test_switch_norm_dispatches_by_backend(monkeypatch):
    calls = []
    real = kernels.switch_norm
    monkeypatch.setattr(kernels, "switch_norm", lambda *args: calls.append(1) or real(*args))
    layer = SwitchNorm2d(3)
    x = torch.randn(2, 3, 4, 4)
    previous = kernels.set_backend("reference")
    try:
        layer(x)
        assert not calls and kernels.backend_for(x) == "reference"
        kernels.set_backend("auto")
        layer(x)
        assert calls and kernels.backend_for(x) == "cpp"
    finally:
        kernels.set_backend(previous)


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernels, "CPU_KERNELS_MISSING", "No module named 'sn_plugin.kernels._C'")
    monkeypatch.setattr(kernels, "_warned", set())
    previous = kernels.set_backend("auto")
    try:
        x = torch.randn(2, 3, 4, 4)
        with pytest.warns(RuntimeWarning, match=r"not built .*pip install -e \. --no-build-isolation"):
            assert kernels.backend_for(x) == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.backend_for(x) == "reference"  # once per reason
            assert torch.isfinite(SwitchNorm2d(3)(x)).all()
    finally:
        kernels.set_backend(previous)


def test_unsupported_dtype_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(kernels, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no fused SN kernel for torch.int64"):
        assert kernels.backend_for(torch.zeros(2, 3, dtype=torch.int64)) == "reference"


def test_bad_backend_name_is_refused():
    with pytest.raises(ValueError, match="must be one of auto, reference, cpp, triton"):
        kernels.set_backend("cuda")


def test_environment_variable_forces_the_backend():
    code = "import sn_plugin.kernels as k; print(k.requested_backend())"
    env = dict(os.environ, SN_PLUGIN_BACKEND="reference", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["SN_PLUGIN_BACKEND"] = "fast"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "SN_PLUGIN_BACKEND='fast'" in bad.stderr


def test_import_needs_no_triton():
    code = ("import sys, sn_plugin, torch; sn_plugin.SwitchNorm2d(3)(torch.randn(2, 3, 4, 4)); "
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert sn_plugin.kernels.backend_for(torch.empty(0, device="meta")) == "reference"


def test_layer_benchmark_quick_run_writes_its_tables(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_layer", os.path.join(REPO, "benchmarks", "bench_layer.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "layer.md"
    runs = bench.main(["--quick", "--threads", "1", "--repeats", "1", "--out", str(out)])
    assert set(runs) == {1} and set(runs[1]) == set(bench.QUICK_SHAPES)
    assert all(set(rows) == {bench.FUSED, bench.REFERENCE, bench.BATCH_NORM, bench.GROUP_NORM, bench.PLAIN}
               for rows in runs[1].values())
    table = out.read_text()
    assert "## 1 CPU thread" in table and "| (4, 8, 2, 5, 5) | SN (fused) |" in table and "saved MiB" in table
