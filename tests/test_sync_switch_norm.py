"""SyncSwitchNorm over 2 gloo processes equals SN on the concatenated batch (issue 4).

One spawn of 2 processes runs every distributed case (starting processes is the
slow part); each rank saves what it computed, and the tests below compare it
with a single process working on the concatenated batch. The same spawn checks
recompute_batch_stats under torch.distributed and the conversions with a real
process group.
"""
import contextlib
import copy
import os
import socket
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sn_plugin import (
    SwitchNorm2d, SwitchNorm3d, SyncSwitchNorm, convert_sync_sn, convert_to_sn, kernels, recompute_batch_stats,
    sparsify,
)

from kernel_helpers import no_host_sync, sn_backend  # noqa: F401

pytestmark = pytest.mark.usefixtures("sn_backend")  # every test on the fused and the reference path

WORLD = 2
C = 4
SHAPES = {"1d": (C, 7), "2d": (C, 5, 3), "3d": (C, 2, 3, 4), "nc": (C,)}
SPLITS = {"equal": (3, 3), "unequal": (4, 1), "empty_rank": (5, 0)}
SN_CASES = [(dim, split, True) for dim in SHAPES for split in SPLITS] + [("2d", "unequal", False)]
RECOMPUTE_BATCHES = {0: [(3, 6), (2, 6)], 1: [(4, 8)]}  # per rank: (samples, size); uneven batch counts
RECOMPUTE_SYNC_BATCHES = {0: [(3, 6), (2, 6)], 1: [(1, 6), (4, 6)]}  # same count, uneven sizes


def make_case(dim, split, using_bn):
    """A randomised layer, the full batch, and the weights of the loss sum(out * w)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((dim, split, using_bn)).encode()))
    layer = SyncSwitchNorm(C, using_bn=using_bn, momentum=0.3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(C, generator=g))
            layer.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    n = sum(SPLITS[split])
    x = torch.randn((n,) + SHAPES[dim], generator=g, dtype=torch.float64).float() * 2 + 1
    w = torch.randn(x.shape, generator=g)
    return layer, x, w


def run_case(layer, x, w):
    """One training step's forward/backward, then an eval forward: what is compared."""
    x = x.clone().requires_grad_(True)
    out = layer.train()(x)
    (out * w).sum().backward()
    with torch.no_grad():
        evaluated = layer.eval()(x)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    buffers = {name: b.clone() for name, b in layer.named_buffers()}
    return {"out": out.detach(), "grad_input": x.grad, "grads": grads, "buffers": buffers, "eval": evaluated}


def recompute_net(sync):
    torch.manual_seed(3)
    norm = SyncSwitchNorm if sync else SwitchNorm2d
    return nn.Sequential(nn.Conv2d(3, C, 3, padding=1), norm(C), nn.ReLU(), nn.Conv2d(C, C, 1),
                         nn.BatchNorm2d(C), SwitchNorm2d(C, using_moving_average=False))


def recompute_batches(rank, table):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(n, 3, size, size, generator=g) * 2 + 1 for n, size in table[rank]]


def layer_statistics(model):
    return {name: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
            for name, m in model.named_modules() if getattr(m, "running_mean", None) is not None}


def worker(rank, port, out_dir, backend):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    kernels.set_backend(backend)
    results = {}
    for dim, split, using_bn in SN_CASES:
        layer, x, w = make_case(dim, split, using_bn)
        start = sum(SPLITS[split][:rank])
        local = slice(start, start + SPLITS[split][rank])
        # the fused path gathers the statistics and reduces the gradients on the device
        with no_host_sync() if backend == "cpp" else contextlib.nullcontext():
            results[(dim, split, using_bn)] = run_case(layer, x[local], w[local])

    # convert_sync_sn makes a local SN layer synchronized.
    layer, x, w = make_case("2d", "unequal", True)
    local_sn = SwitchNorm2d(C, momentum=0.3)
    local_sn.load_state_dict(layer.state_dict())
    synced = convert_sync_sn(nn.Sequential(local_sn))[0]
    start = sum(SPLITS["unequal"][:rank])
    local = slice(start, start + SPLITS["unequal"][rank])
    results["converted"] = run_case(synced, x[local], w[local])

    # A group of one process is plain SN on the local batch.
    groups = [dist.new_group([r]) for r in range(WORLD)]
    layer, x, w = make_case("2d", "equal", True)
    layer.process_group = groups[rank]
    results["group_of_one"] = run_case(layer, x[3 * rank:3 * rank + 3], w[3 * rank:3 * rank + 3])

    for sync, table in ((False, RECOMPUTE_BATCHES), (True, RECOMPUTE_SYNC_BATCHES)):
        model = recompute_net(sync)
        reports = recompute_batch_stats(model, recompute_batches(rank, table), progress=False)
        results[("recompute", sync)] = {"stats": layer_statistics(model), "reports": reports}

    # Conversions copy models holding a real process group without copying the group.
    pair = dist.new_group([0, 1])
    synced = convert_sync_sn(nn.Sequential(SwitchNorm2d(C)), process_group=pair)
    from_bn = convert_to_sn(nn.Sequential(nn.SyncBatchNorm(C, process_group=pair)))
    sparse = sparsify(synced)
    results["groups_kept"] = [synced[0].process_group is pair, from_bn[0].process_group is pair,
                              sparse[0].process_group is pair]
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, sn_backend):
    out_dir = str(tmp_path_factory.mktemp("sync_sn"))
    mp.spawn(worker, args=(free_port(), out_dir, sn_backend), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim, split, using_bn", SN_CASES)
def test_two_processes_equal_one_on_the_concatenated_batch(ranks, dim, split, using_bn):
    layer, x, w = make_case(dim, split, using_bn)
    expected = run_case(layer, x, w)  # in this process there is no process group: plain SN
    got = [r[(dim, split, using_bn)] for r in ranks]
    for key in ("out", "grad_input", "eval"):
        close(torch.cat([g[key] for g in got]), expected[key])
    for name, grad in expected["grads"].items():
        close(sum(g["grads"][name] for g in got), grad)
    for name, buffer in expected["buffers"].items():
        for g in got:
            close(g["buffers"][name], buffer)


def test_convert_sync_sn_synchronizes_a_local_layer(ranks):
    layer, x, w = make_case("2d", "unequal", True)
    expected = run_case(layer, x, w)
    got = [r["converted"] for r in ranks]
    close(torch.cat([g["out"] for g in got]), expected["out"])
    close(torch.cat([g["grad_input"] for g in got]), expected["grad_input"])
    close(sum(g["grads"]["mean_weight"] for g in got), expected["grads"]["mean_weight"])
    close(got[1]["buffers"]["running_var"], expected["buffers"]["running_var"])


def test_group_of_one_process_is_plain_switch_norm(ranks):
    layer, x, w = make_case("2d", "equal", True)
    for rank, r in enumerate(ranks):
        local = slice(3 * rank, 3 * rank + 3)
        expected = run_case(copy.deepcopy(layer), x[local], w[local])
        close(r["group_of_one"]["out"], expected["out"])
        close(r["group_of_one"]["buffers"]["running_var"], expected["buffers"]["running_var"])


def test_without_process_group_it_is_plain_switch_norm():
    layer, x, w = make_case("3d", "equal", True)
    local = SwitchNorm3d(C, momentum=0.3)
    local.load_state_dict(layer.state_dict())
    got, expected = run_case(layer, x, w), run_case(local, x, w)
    for key in ("out", "grad_input", "eval"):
        close(got[key], expected[key])


@pytest.mark.parametrize("sync, table", [(False, RECOMPUTE_BATCHES), (True, RECOMPUTE_SYNC_BATCHES)])
def test_recompute_batch_stats_is_all_reduced_to_the_statistics_of_all_batches(ranks, sync, table):
    model = recompute_net(False)  # one process: SN on each step's concatenated batch
    if sync:
        steps = zip(*(recompute_batches(r, table) for r in range(WORLD)))
        batches = [torch.cat(step) for step in steps]
    else:
        batches = [b for r in range(WORLD) for b in recompute_batches(r, table)]
    reports = recompute_batch_stats(model, batches, progress=False)
    expected = layer_statistics(model)
    got = [r[("recompute", sync)] for r in ranks]
    for name, (mean, var, count) in expected.items():
        for g in got:
            g_mean, g_var, g_count = g["stats"][name]
            close(g_mean, mean)
            close(g_var, var)
    for name, report in reports.items():
        total = sum(len(table[r]) for r in range(WORLD))
        assert all(g["reports"][name].batches == total and g["reports"][name].updated for g in got)
        assert all(g["reports"][name].samples == report.samples for g in got)
        assert all(g["stats"][name][2] == total for g in got)


def test_conversions_keep_the_real_process_group(ranks):
    assert all(r["groups_kept"] == [True, True, True] for r in ranks)
