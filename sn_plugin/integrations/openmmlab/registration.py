"""SN's names in mmengine's registry, and the patches of OpenMMLab internals.

The norm types are registered through mmengine's public registry; nothing is
patched for them. Three things need a change of a toolkit's internals; all are
:class:`~sn_plugin.integrations.common.Patch` objects that :func:`install_patches`
puts in (importing the adapter calls it) and :func:`uninstall_patches` takes out:

* ``mmengine.model.BaseModule.train`` (mmengine 0.10): ``norm_eval=True`` must
  put SN layers in eval mode too (:func:`_train_with_norm_eval`);
* ``mmengine.config.Config._get_cfg_path`` (mmengine 0.10): ``_base_`` files
  named ``sn_plugin::<toolkit>/<config>`` (:mod:`sn_plugin.integrations.config_scope`);
* ``mmaction.models.localizers.drn`` (mmaction2 1.2.0): a placeholder for the
  package its PyPI files lack, only when it is missing
  (:mod:`sn_plugin.integrations.mmaction_compat`).
"""
from typing import Dict, List, Tuple

from mmengine.model import BaseModule
from mmengine.registry import MODELS

from ...switchable_norm import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchNormBase, SyncSwitchNorm
from .. import config_scope
from ..common import Patch, PatchSet, replace_attribute
from ..mmaction_compat import DRN_PACKAGE, DRN_PLACEHOLDER, module_missing

NORM_TYPES: Dict[str, type] = {
    "SN": SwitchNorm2d,
    "SN1d": SwitchNorm1d,
    "SN2d": SwitchNorm2d,
    "SN3d": SwitchNorm3d,
    "SyncSN": SyncSwitchNorm,
}


def register_norm_types() -> None:
    """Register :data:`NORM_TYPES` in mmengine's root ``MODELS`` (idempotent)."""
    for name, cls in NORM_TYPES.items():
        register_once(MODELS, name, cls)


def register_once(registry, name: str, obj) -> None:
    """Register ``obj`` in one of mmengine's registries under ``name``, unless it is there already
    (idempotent); another object under that name is refused."""
    registered = registry.module_dict.get(name)
    if registered is None:
        registry.register_module(name, module=obj)
    elif registered is not obj:
        raise KeyError(
            f"mmengine's '{registry.name}' registry already holds a different '{name}' "
            f"({registered.__module__}.{registered.__qualname__}); sn_plugin cannot register its "
            f"{obj.__qualname__} under that name. Remove the other registration from your custom_imports.")


_INHERITED_TRAIN = BaseModule.train  # torch's nn.Module.train: mmengine 0.10's BaseModule has none of its own


def _train_with_norm_eval(self: BaseModule, mode: bool = True) -> BaseModule:
    """``BaseModule.train`` that also covers SN under ``norm_eval=True``.

    The toolkits' backbones (ResNet, ResNet3d, HRNet, ...) implement
    ``norm_eval`` in their ``train()`` by calling ``eval()`` on every
    ``_BatchNorm`` after ``super().train(mode)``; SN is not a ``_BatchNorm``.
    Every such ``super().train`` reaches ``BaseModule.train``, so this one
    method covers them all: after the usual ``train(mode)``, a module whose own
    ``norm_eval`` is True puts the SN layers below it in eval mode. Modules
    without ``norm_eval`` (or with it False) are unaffected.
    """
    result = _INHERITED_TRAIN(self, mode)
    if mode and getattr(self, "norm_eval", False) is True:
        for module in self.modules():
            if isinstance(module, SwitchNormBase):
                module.eval()
    return result


NORM_EVAL = Patch(
    target="mmengine.model.BaseModule.train",
    reason="the backbones' norm_eval=True puts only _BatchNorm layers in eval mode; the wrapper adds SN",
    distribution="mmengine", module="mmengine", written_for="0.10",
    apply=lambda: replace_attribute(BaseModule, "train", _train_with_norm_eval))


def _add_config_bases():
    config_scope.install()
    return config_scope.uninstall


CONFIG_BASES = Patch(
    target="mmengine.config.Config._get_cfg_path",
    reason="mmengine resolves 'package::path' config bases only for the OpenMMLab packages it lists; the "
           "wrapper adds 'sn_plugin::'",
    distribution="mmengine", module="mmengine", written_for="0.10", apply=_add_config_bases)

_installed = PatchSet()


def needed_patches() -> List[Patch]:
    """The patches this environment needs: the DRN placeholder only where mmaction2 is
    installed and lacks the package."""
    return [NORM_EVAL, CONFIG_BASES] + ([DRN_PLACEHOLDER] if module_missing(DRN_PACKAGE) else [])


def install_patches() -> None:
    """Install :func:`needed_patches` (each once; a warning if the toolkit's version is not the
    one a patch was written for)."""
    _installed.install(needed_patches())


def uninstall_patches() -> None:
    """Undo :func:`install_patches`. Models already built keep their layers; modules mmaction2
    already imported through the DRN placeholder stay imported."""
    _installed.uninstall()


def installed_patches() -> Tuple[str, ...]:
    """The targets of the installed patches, e.g. ``('mmengine.model.BaseModule.train',)``."""
    return _installed.installed
