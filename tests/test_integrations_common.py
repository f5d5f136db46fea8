"""sn_plugin.integrations.common and mmaction_compat: what the toolkit adapters share (torch only)."""
import importlib.metadata
import sys
import warnings

import pytest
import torch
from torch import nn

import sn_plugin
from sn_plugin.integrations import common
from sn_plugin.integrations.common import Patch, PatchSet, replace_attribute
from sn_plugin.integrations.mmaction_compat import module_missing


class Base:
    def method(self):
        return "base"


def test_replace_attribute_undoes_exactly_what_it_did():
    class Child(Base):
        pass

    class Own(Base):
        def method(self):
            return "own"

    undo_inherited = replace_attribute(Child, "method", lambda self: "patched")
    undo_own = replace_attribute(Own, "method", lambda self: "patched")
    assert Child().method() == Own().method() == "patched"
    undo_inherited()
    undo_own()
    assert "method" not in vars(Child) and Child().method() == "base"  # inherited again, not copied down
    assert Own().method() == "own"


def _patch(target, log, written_for="1.0"):
    def apply():
        log.append(f"+{target}")
        return lambda: log.append(f"-{target}")

    return Patch(target=target, reason="a test", distribution="no-such-toolkit", module="no_such_toolkit",
                 written_for=written_for, apply=apply)


def test_a_patch_set_installs_each_patch_once_and_uninstalls_the_last_first(monkeypatch):
    monkeypatch.setattr(common, "toolkit_version", lambda distribution, module: "1.0.3")
    log = []
    patches = PatchSet()
    first, second = _patch("a", log), _patch("b", log)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the version matches: no warning
        patches.install([first, second])
        patches.install([first, second])
    assert patches.installed == ("a", "b") and log == ["+a", "+b"]
    patches.uninstall()
    assert patches.installed == () and log == ["+a", "+b", "-b", "-a"]


@pytest.mark.parametrize("found", ["1.1.0", "0.9", None])
def test_a_patch_warns_when_the_toolkit_is_not_the_version_it_was_written_for(monkeypatch, found):
    monkeypatch.setattr(common, "toolkit_version", lambda distribution, module: found)
    log = []
    with pytest.warns(RuntimeWarning, match=f"written and tested for no-such-toolkit 1.0, but no-such-toolkit "
                                            f"{found or '.version unknown.'} is installed"):
        PatchSet().install([_patch("a", log)])
    assert log == ["+a"]  # installed anyway


def test_toolkit_versions_compare_by_release_prefix(monkeypatch):
    assert common.toolkit_version("torch", "torch") == importlib.metadata.version("torch")
    assert common.toolkit_version("no-such-distribution", "torch") == torch.__version__  # the module's own
    monkeypatch.setattr(common, "toolkit_version", lambda distribution, module: "0.6+nocsrc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PatchSet().install([_patch("a", [], written_for="0.6")])


def test_is_due_every_period_and_after_the_last_iteration():
    assert [n for n in range(1, 11) if common.is_due(n, 4, 10)] == [4, 8, 10]
    assert [n for n in range(1, 11) if common.is_due(n, 0, 10)] == [10]


def test_missing_batch_statistics_skips_frozen_and_estimated_layers():
    model = nn.Sequential(sn_plugin.SwitchNorm2d(2, using_moving_average=False),
                          sn_plugin.SwitchNorm2d(2, using_moving_average=False),
                          sn_plugin.SwitchNorm2d(2),
                          sn_plugin.SwitchNorm2d(2, using_moving_average=False, using_bn=False))
    model.add_module("frozen", sn_plugin.FrozenSwitchNorm(2, using_moving_average=False))
    model[1].num_batches_tracked.fill_(3)
    assert common.missing_batch_statistics(model) == ["0"]
    assert common.describe_missing(["0"]).startswith("1 SN layers (e.g. 0) have using_moving_average=False")


def test_unwrap_model_removes_every_wrapper():
    model = nn.Sequential(nn.Linear(2, 2))
    assert common.unwrap_model(nn.DataParallel(nn.DataParallel(model))) is model
    assert common.unwrap_model(model) is model
    assert common.unwrap_model(nn.DataParallel(model), is_wrapper=lambda m: False) is not model


def _fake_toolkit(root, name, with_drn):
    localizers = root / name / "models" / "localizers"
    localizers.mkdir(parents=True)
    for package in (root / name, root / name / "models", localizers):
        (package / "__init__.py").write_text("")
    if with_drn:
        (localizers / "drn").mkdir()
        (localizers / "drn" / "__init__.py").write_text("")


@pytest.mark.parametrize("with_drn", [False, True])
def test_module_missing_looks_at_the_installed_files_without_importing(tmp_path, monkeypatch, with_drn):
    name = f"fake_toolkit_{'fixed' if with_drn else 'broken'}_files"
    _fake_toolkit(tmp_path, name, with_drn)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module_missing(f"{name}.models.localizers.drn") is not with_drn
    assert not module_missing(f"{name}.models.localizers")
    assert not module_missing(f"{name}.models.other.drn")  # not the layout it is about
    assert not module_missing("no_such_toolkit_installed.models.localizers.drn")
    assert not any(m == name or m.startswith(name + ".") for m in sys.modules)
