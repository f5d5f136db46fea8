"""SN behaves in the OpenMMLab toolkits the way BatchNorm does (sn_plugin.integrations.openmmlab)."""
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")
pytest.importorskip("mmpretrain")
pytest.importorskip("mmaction")

import sn_plugin.integrations.openmmlab as mm_sn  # noqa: E402
from mmcv.cnn import build_norm_layer  # noqa: E402
from mmengine.model import convert_sync_batchnorm, revert_sync_batchnorm  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import MODELS  # noqa: E402

import sn_plugin  # noqa: E402
from sn_plugin import SwitchNormBase  # noqa: E402
from sn_plugin.integrations import mmaction_compat  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOOLKIT_REGISTRIES = ("mmdet.registry", "mmseg.registry", "mmpretrain.registry", "mmaction.registry")


def _sn_layers(model):
    return [m for m in model.modules() if isinstance(m, SwitchNormBase)]


# -- registration --------------------------------------------------------------------------------
@pytest.mark.parametrize("registry_module", TOOLKIT_REGISTRIES)
def test_every_toolkit_scope_finds_the_sn_types(registry_module):
    registry = __import__(registry_module, fromlist=["MODELS"]).MODELS
    expected = {"SN": sn_plugin.SwitchNorm2d, "SN1d": sn_plugin.SwitchNorm1d, "SN2d": sn_plugin.SwitchNorm2d,
                "SN3d": sn_plugin.SwitchNorm3d, "SyncSN": sn_plugin.SyncSwitchNorm}
    for name, core_class in expected.items():
        assert registry.get(name) is core_class  # the core classes themselves, none made on the fly
        assert MODELS.get(name) is core_class
    assert mm_sn.NORM_TYPES == expected


def test_build_norm_layer_names_sn_layers_and_passes_arguments():
    name, layer = build_norm_layer(dict(type="SN", requires_grad=False, using_bn=False, momentum=0.2), 16, postfix=2)
    assert name == "sn2"
    assert isinstance(layer, sn_plugin.SwitchNorm2d) and layer.num_features == 16
    assert layer.eps == 1e-5 and layer.momentum == 0.2 and layer.mean_weight.numel() == 2
    # requires_grad=False freezes every parameter, the importance logits included.
    assert {n for n, p in layer.named_parameters()} == {"weight", "bias", "mean_weight", "var_weight"}
    assert not any(p.requires_grad for p in layer.parameters())
    name, layer = build_norm_layer(dict(type="SN3d"), 8)
    assert name == "sn" and isinstance(layer, sn_plugin.SwitchNorm3d)
    assert layer(torch.randn(2, 8, 3, 4, 4)).shape == (2, 8, 3, 4, 4)


def test_a_misspelled_norm_type_gives_the_toolkits_key_error():
    with pytest.raises(KeyError, match="Cannot find"):
        build_norm_layer(dict(type="Sn"), 8)
    from mmdet.registry import MODELS as DET_MODELS
    with pytest.raises(KeyError):
        DET_MODELS.build(dict(type="ResNet", depth=18, norm_cfg=dict(type="SwitchNorm")))


def test_without_the_custom_import_sn_is_unknown_and_the_documented_line_fixes_it():
    """In a fresh interpreter 'SN' is a KeyError until the module the docs name is imported."""
    snippet = ("from mmcv.cnn import build_norm_layer\n"
               "try:\n    build_norm_layer(dict(type='SN'), 4)\nexcept KeyError:\n    print('KeyError')\n"
               "import sn_plugin.integrations.openmmlab\n"
               "print(build_norm_layer(dict(type='SN'), 4)[0])\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["KeyError", "sn"]
    docs = (REPO / "docs" / "openmmlab.md").read_text()
    assert "custom_imports = dict(imports=['sn_plugin.integrations.openmmlab'], allow_failed_imports=False)" in docs


# -- norm_eval, frozen_stages, init ---------------------------------------------------------------
def _build_in_scope(registry, cfg):
    """Build with ``registry``'s own scope: an earlier test's ``init_default_scope`` would
    otherwise redirect mmengine's build to another toolkit's registry."""
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope(registry.scope):
        return registry.build(cfg)


def _backbone(registry_module, **kwargs):
    return _build_in_scope(__import__(registry_module, fromlist=["MODELS"]).MODELS, kwargs)


BACKBONES = [
    ("mmdet.registry", dict(type="ResNet", depth=18, norm_cfg=dict(type="SN"))),
    ("mmseg.registry", dict(type="ResNetV1c", depth=18, norm_cfg=dict(type="SN"))),
    ("mmpretrain.registry", dict(type="ResNet", depth=18, norm_cfg=dict(type="SN"))),
    ("mmaction.registry", dict(type="ResNet3d", depth=18, pretrained=None, pretrained2d=False,
                               norm_cfg=dict(type="SN3d"))),
]


@pytest.mark.parametrize("registry_module,cfg", BACKBONES, ids=[b[0].split(".")[0] for b in BACKBONES])
def test_norm_eval_puts_sn_layers_in_eval_mode(registry_module, cfg):
    model = _backbone(registry_module, norm_eval=True, **cfg)
    model.train()
    assert model.training
    layers = _sn_layers(model)
    assert layers and all(not m.training for m in layers)
    model.norm_eval = False
    model.train()
    assert all(m.training for m in layers)


def test_norm_eval_keeps_sn_statistics_during_training():
    model = _backbone("mmdet.registry", norm_eval=True, **BACKBONES[0][1])
    model.train()
    before = {id(m): m.running_mean.clone() for m in _sn_layers(model)}
    model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(before[id(m)], m.running_mean) for m in _sn_layers(model))


def test_frozen_stages_freeze_sn_parameters_and_statistics():
    model = _backbone("mmdet.registry", type="ResNet", depth=18, norm_cfg=dict(type="SN"), frozen_stages=1,
                      norm_eval=False, zero_init_residual=False)
    model.init_weights()
    model.train()
    frozen = [model.norm1] + [m for m in model.layer1.modules() if isinstance(m, SwitchNormBase)]
    trained = [m for m in model.layer2.modules() if isinstance(m, SwitchNormBase)]
    state = {id(m): {k: v.clone() for k, v in m.state_dict().items()} for m in frozen + trained}
    assert all(not m.training and not any(p.requires_grad for p in m.parameters()) for m in frozen)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = sum(out.square().mean() for out in model(torch.randn(2, 3, 64, 64)))
    loss.backward()
    optimizer.step()
    for m in frozen:
        assert all(torch.equal(v, state[id(m)][k]) for k, v in m.state_dict().items())
    for m in trained:
        assert not torch.equal(m.running_mean, state[id(m)]["running_mean"])
        assert not torch.equal(m.mean_weight, state[id(m)]["mean_weight"])


@pytest.mark.parametrize("zero_init_residual", [False, True])
def test_default_init_and_zero_init_residual(zero_init_residual):
    model = _backbone("mmdet.registry", type="ResNet", depth=50, norm_cfg=dict(type="SN"),
                      zero_init_residual=zero_init_residual)
    model.init_weights()
    for name, m in model.named_modules():
        if isinstance(m, SwitchNormBase):
            last_of_block = name.endswith(".sn3")
            gamma = 0.0 if (zero_init_residual and last_of_block) else 1.0
            assert torch.all(m.weight == gamma), name
            assert torch.all(m.bias == 0), name
            assert torch.all(m.mean_weight == 1) and torch.all(m.var_weight == 1), name


# -- sync_bn, revert_sync_batchnorm, SyncSN ------------------------------------------------------
def _mixed_model():
    model = nn.Sequential(
        _backbone("mmdet.registry", type="ResNet", depth=18, norm_cfg=dict(type="SN")),
    )
    model.add_module("bn", nn.BatchNorm2d(4))
    model.add_module("sync_sn", build_norm_layer(dict(type="SyncSN"), 4)[1])
    return model


@pytest.fixture
def single_process_group():
    """A one-process gloo group: the Runner converts to SyncBN only under distributed training."""
    import socket
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("implementation", ["torch", "mmcv"])
def test_runner_sync_bn_conversion_leaves_sn_intact(implementation, single_process_group):
    model = _mixed_model()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SwitchNormBase)}
    with torch.no_grad():
        for m in layers.values():
            m.running_mean.uniform_()
            m.mean_weight.uniform_()
    states = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in layers.items()}

    converted = convert_sync_batchnorm(model, implementation)
    assert "SyncBatchNorm" in type(converted.bn).__name__
    reverted = revert_sync_batchnorm(converted)
    assert not isinstance(reverted.bn, nn.SyncBatchNorm)
    for model_after in (converted, reverted):
        after = {name: m for name, m in model_after.named_modules() if isinstance(m, SwitchNormBase)}
        assert after.keys() == layers.keys()
        for name, m in after.items():
            assert type(m) is type(layers[name])
            assert all(torch.equal(v, states[name][k]) for k, v in m.state_dict().items())
    assert type(reverted.sync_sn) is sn_plugin.SyncSwitchNorm


def test_sync_sn_on_one_process_is_sn():
    torch.manual_seed(0)
    _, sync = build_norm_layer(dict(type="SyncSN"), 6)
    _, plain = build_norm_layer(dict(type="SN"), 6)
    with torch.no_grad():
        for p in sync.parameters():
            p.uniform_(0.5, 1.5)
    plain.load_state_dict(sync.state_dict())
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    out_sync, out_plain = sync(x), plain(y)
    torch.testing.assert_close(out_sync, out_plain)
    out_sync.square().sum().backward()
    out_plain.square().sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    torch.testing.assert_close(sync.mean_weight.grad, plain.mean_weight.grad)
    torch.testing.assert_close(sync.running_var, plain.running_var)


# -- weight decay --------------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.sn = build_norm_layer(dict(type="SN"), 4)[1]
        self.bn = nn.BatchNorm2d(4)


def _groups(model, **wrapper_cfg):
    cfg = dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9, weight_decay=1e-4), **wrapper_cfg)
    optimizer = build_optim_wrapper(model, cfg).optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(g["params"][0])]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups}


SN_PARAMS = ("sn.weight", "sn.bias", "sn.mean_weight", "sn.var_weight")


def test_default_constructor_does_not_know_sn_is_a_norm_layer():
    groups = _groups(_Tiny(), paramwise_cfg=dict(norm_decay_mult=0.0))
    assert groups["bn.weight"][1] == 0.0
    assert all(groups[n][1] == 1e-4 for n in SN_PARAMS)


def test_sn_constructor_applies_norm_rules_to_every_sn_parameter():
    model = _Tiny()
    groups = _groups(model, constructor="SNOptimWrapperConstructor",
                     paramwise_cfg=dict(norm_decay_mult=0.0, bias_lr_mult=2.0))
    assert all(groups[n] == (0.1, 0.0) for n in SN_PARAMS)
    assert groups["bn.weight"] == (0.1, 0.0) and groups["bn.bias"] == (0.1, 0.0)
    assert groups["conv.weight"] == (0.1, 1e-4)
    assert groups["conv.bias"] == (0.2, 1e-4)
    # custom_keys take precedence, as for every other layer.
    groups = _groups(model, constructor="SNOptimWrapperConstructor",
                     paramwise_cfg=dict(norm_decay_mult=0.0, custom_keys={".mean_weight": dict(decay_mult=1.0)}))
    assert groups["sn.mean_weight"][1] == 1e-4 and groups["sn.var_weight"][1] == 0.0
    # Without norm_decay_mult SN keeps the base decay.
    groups = _groups(model, constructor="SNOptimWrapperConstructor", paramwise_cfg=dict(bias_decay_mult=1.0))
    assert all(groups[n] == (0.1, 1e-4) for n in SN_PARAMS)


def test_sn_constructor_logs_its_per_parameter_lines_at_debug_level_like_mmengine():
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        _groups(_Tiny(), constructor="SNOptimWrapperConstructor", paramwise_cfg=dict(norm_decay_mult=0.0))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    sn_lines = [r for r in records if "(SN)" in r.getMessage()]
    assert sn_lines and all(r.levelno == logging.DEBUG for r in sn_lines)


# -- batch-statistics hook without training data ---------------------------------------------------
def test_batch_stats_hook_refuses_to_test_without_statistics_or_training_data():
    model = nn.Sequential(build_norm_layer(dict(type="SN", using_moving_average=False), 4)[1])
    runner = types.SimpleNamespace(model=model, cfg={}, train_loop=None, hooks=[])
    hook = mm_sn.SNBatchStatsHook(num_batches=2)
    with pytest.raises(RuntimeError, match="no batch-average statistics"):
        hook.before_test(runner)
    model[0].num_batches_tracked.fill_(5)  # a checkpoint that has them
    hook.before_test(runner)


def test_hooks_reject_bad_arguments():
    with pytest.raises(ValueError, match="num_batches"):
        mm_sn.SNBatchStatsHook(num_batches=0)
    with pytest.raises(ValueError, match="interval"):
        mm_sn.SNWeightLoggerHook(interval=0)


# -- the patches of toolkit internals --------------------------------------------------------------
def test_registering_over_another_class_of_the_same_name_is_refused():
    class Other(nn.Module):
        pass

    MODELS.module_dict["SN1d"] = Other
    try:
        with pytest.raises(KeyError, match="already holds a different 'SN1d'.*custom_imports"):
            mm_sn.register_norm_types()
    finally:
        MODELS.module_dict["SN1d"] = sn_plugin.SwitchNorm1d


@pytest.fixture
def reinstall_patches():
    """Leaves the adapter's patches installed again, whatever the test did."""
    yield
    mm_sn.uninstall_patches()
    mm_sn.install_patches()


def _has_drn_finder():
    return any(isinstance(f, mmaction_compat.MissingPackagePlaceholder) for f in sys.meta_path)


def test_patches_uninstall_and_reinstall(reinstall_patches):
    from mmengine.model import BaseModule

    from mmengine.config import Config

    from sn_plugin.integrations import config_scope

    expected = ("mmengine.model.BaseModule.train", "mmengine.config.Config._get_cfg_path")
    if mmaction_compat.module_missing(mmaction_compat.DRN_PACKAGE):
        expected += (mmaction_compat.DRN_PACKAGE,)
    assert mm_sn.installed_patches() == expected
    assert "train" in vars(BaseModule) and config_scope.installed()
    assert _has_drn_finder() == (mmaction_compat.DRN_PACKAGE in expected)
    mmengine_get_cfg_path = config_scope._original

    mm_sn.uninstall_patches()
    assert mm_sn.installed_patches() == ()
    assert "train" not in vars(BaseModule) and not _has_drn_finder()  # mmengine's own state again
    assert not config_scope.installed() and vars(Config)["_get_cfg_path"] is mmengine_get_cfg_path
    model = _backbone("mmdet.registry", norm_eval=True, **BACKBONES[0][1])
    model.train()
    assert all(m.training for m in _sn_layers(model))  # without the patch norm_eval misses SN

    mm_sn.install_patches()
    mm_sn.install_patches()  # once only
    assert mm_sn.installed_patches() == expected
    model.train()
    assert not any(m.training for m in _sn_layers(model))


def test_drn_placeholder_only_where_mmaction2_is_installed(monkeypatch, reinstall_patches):
    mm_sn.uninstall_patches()
    monkeypatch.setitem(sys.modules, "mmaction", None)  # as for a user with mmdet only
    mm_sn.install_patches()
    assert mmaction_compat.DRN_PACKAGE not in mm_sn.installed_patches()
    assert not _has_drn_finder()


def test_a_patch_warns_on_a_toolkit_version_it_was_not_written_for(monkeypatch, reinstall_patches):
    from sn_plugin.integrations import common

    mm_sn.uninstall_patches()
    monkeypatch.setattr(common, "toolkit_version", lambda distribution, module: "0.11.0")
    with pytest.warns(RuntimeWarning, match=r"BaseModule\.train .*written and tested for mmengine 0\.10.*0\.11\.0"):
        mm_sn.install_patches()
    assert "mmengine.model.BaseModule.train" in mm_sn.installed_patches()


# -- mmaction2 1.2.0 packaging bug ---------------------------------------------------------------
def test_mmaction_models_import_and_drn_says_why_it_is_missing():
    import mmaction
    import mmaction.models  # noqa: F401  (fails without the placeholder on mmaction2 1.2.0 from PyPI)
    from mmaction.registry import MODELS as ACTION_MODELS
    i3d = _build_in_scope(ACTION_MODELS, dict(type="ResNet3d", depth=18, pretrained=None, pretrained2d=False,
                                              norm_cfg=dict(type="SN3d")))
    assert len(_sn_layers(i3d)) == 20
    if mmaction.__version__ == "1.2.0":  # the release whose PyPI files lack the DRN package
        assert mmaction_compat.drn_placeholder_in_use()
    if mmaction_compat.drn_placeholder_in_use():
        with pytest.raises(ImportError, match="packaging bug"):
            _build_in_scope(ACTION_MODELS, dict(type="DRN"))


def _fake_toolkit(root: Path, name: str, with_drn: bool) -> str:
    """A package ``name`` with ``models/localizers/__init__.py`` importing ``.drn.drn`` like mmaction2's."""
    localizers = root / name / "models" / "localizers"
    localizers.mkdir(parents=True)
    for package in (root / name, root / name / "models"):
        (package / "__init__.py").write_text("")
    (localizers / "__init__.py").write_text("from .drn.drn import DRN\n")
    if with_drn:
        (localizers / "drn").mkdir()
        (localizers / "drn" / "__init__.py").write_text("")
        (localizers / "drn" / "drn.py").write_text("class DRN:\n    real = True\n")
    return f"{name}.models.localizers.drn"


@pytest.mark.parametrize("with_drn", [False, True])
def test_the_placeholder_is_used_only_when_the_package_lacks_drn(tmp_path, monkeypatch, with_drn):
    name = f"fake_toolkit_{'fixed' if with_drn else 'broken'}"
    package = _fake_toolkit(tmp_path, name, with_drn)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", sys.meta_path + [mmaction_compat.MissingPackagePlaceholder(package)])
    try:
        localizers = __import__(f"{name}.models.localizers", fromlist=["DRN"])
        assert getattr(localizers.DRN, "real", False) is with_drn
        if not with_drn:
            with pytest.raises(ImportError, match="packaging bug"):
                localizers.DRN()
    finally:
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]
