"""``NORM: "SN"``/``"SyncSN"`` and SN under ``FREEZE_AT``: the patches of detectron2 internals.

Detectron2 v0.6 has no registry of norm layers: ``get_norm`` looks names up in
a dict local to the function, and ``CNNBlockBase.freeze`` (``FREEZE_AT``)
calls ``FrozenBatchNorm2d.convert_frozen_batchnorm``, which converts BN only.
So :func:`register` (importing the adapter calls it) installs two patches,
both checked against detectron2 0.6 and both undone by :func:`unregister`:

* ``detectron2.layers.get_norm``: replaced by :func:`get_norm`, which builds
  SN for the names in :data:`NORM_TYPES` and hands everything else to
  detectron2's own function. detectron2's modules hold the function by name
  (``from detectron2.layers import get_norm`` in resnet, fpn, the box and mask
  heads...), so it is replaced in every loaded ``detectron2.*`` module holding
  it; modules imported later take it from the patched ``detectron2.layers``
  and ``detectron2.layers.batch_norm``. Modules outside detectron2 are not
  touched.
* ``FrozenBatchNorm2d.convert_frozen_batchnorm``: also freezes SN layers, with
  :meth:`sn_plugin.FrozenSwitchNorm.convert_frozen_switch_norm`.
"""
import contextlib
import sys
import threading
from typing import Any, Callable, Dict, Iterator, Optional

import detectron2.layers.batch_norm as d2_batch_norm
import detectron2.modeling  # noqa: F401  (loads the modules that hold get_norm by name)
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from ...switchable_norm import FrozenSwitchNorm, SwitchNorm2d, SwitchNormBase, SyncSwitchNorm
from ..common import Patch, PatchSet, replace_attribute

# The norm names this adapter adds to detectron2's get_norm, and the layer each builds.
NORM_TYPES = {"SN": SwitchNorm2d, "SyncSN": SyncSwitchNorm}
# Further norm names, with the function building each from the channel count; filled by the
# adapter's other modules when imported (family.py: "CN").
NORM_BUILDERS: Dict[str, Callable[[int], nn.Module]] = {}

# The SN layer options a config may set: every constructor argument of the core layers
# except the channel count, which get_norm passes.
LAYER_OPTIONS = tuple(name for name in SwitchNormBase.option_names() if name != "num_features")

_DETECTRON2_GET_NORM = d2_batch_norm.get_norm
_DETECTRON2_CONVERT_FROZEN = FrozenBatchNorm2d.__dict__["convert_frozen_batchnorm"]  # a classmethod

_state = threading.local()


def _layer_options() -> Dict[str, Any]:
    return getattr(_state, "layer_options", {})


@contextlib.contextmanager
def sn_layer_options(**options) -> Iterator[None]:
    """Constructor arguments for the SN layers that ``"SN"``/``"SyncSN"`` build inside the block.

    Detectron2's ``get_norm(name, channels)`` has no room for layer options, so
    the config's ``MODEL.SN.*`` reach the layers this way
    (``SNTrainer.build_model`` does it)::

        with sn_layer_options(using_moving_average=False):
            model = build_model(cfg)

    Accepted: :data:`LAYER_OPTIONS` (see :class:`sn_plugin.SwitchNormBase`). Per thread; nests.
    """
    unknown = sorted(set(options) - set(LAYER_OPTIONS))
    if unknown:
        raise TypeError(f"sn_layer_options: unknown SN layer option(s) {unknown}; accepted: {list(LAYER_OPTIONS)}")
    previous = _layer_options()
    _state.layer_options = {**previous, **options}
    try:
        yield
    finally:
        _state.layer_options = previous


def get_norm(norm, out_channels: int) -> Optional[nn.Module]:
    """Detectron2's ``get_norm`` that also knows ``"SN"`` and ``"SyncSN"`` (and :data:`NORM_BUILDERS`' names).

    Every other name or callable goes to detectron2's own ``get_norm``, so
    unknown names fail with detectron2's own error.
    """
    if isinstance(norm, str) and (norm in NORM_TYPES or norm in NORM_BUILDERS):
        if not is_registered():
            raise KeyError(
                f"Norm {norm!r} is sn_plugin's, which is not registered with "
                f"detectron2 in this process. Call sn_plugin.integrations.detectron2.register() (importing "
                f"sn_plugin.integrations.detectron2 does it) before building the model, or pass the class "
                f"itself (norm=sn_plugin.SwitchNorm2d)."
            )
        if norm in NORM_BUILDERS:
            return NORM_BUILDERS[norm](out_channels)
        return NORM_TYPES[norm](out_channels, **_layer_options())
    return _DETECTRON2_GET_NORM(norm, out_channels)


def _rebind_get_norm(old, new) -> None:
    """Replace ``old`` by ``new`` as ``get_norm`` in every loaded detectron2 module."""
    for name, module in list(sys.modules.items()):
        if (name == "detectron2" or name.startswith("detectron2.")) \
                and getattr(module, "__dict__", {}).get("get_norm") is old:
            module.get_norm = new


def _replace_get_norm():
    _rebind_get_norm(_DETECTRON2_GET_NORM, get_norm)
    # Also where modules imported since took the wrapper from the patched namespaces.
    return lambda: _rebind_get_norm(get_norm, _DETECTRON2_GET_NORM)


def _convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
    """``FrozenBatchNorm2d.convert_frozen_batchnorm``, also freezing SN layers."""
    return _DETECTRON2_CONVERT_FROZEN.__func__(cls, FrozenSwitchNorm.convert_frozen_switch_norm(module))


PATCHES = (
    Patch(target="detectron2.layers.get_norm",
          reason="v0.6 looks norm names up in a dict inside get_norm; the wrapper adds 'SN' and 'SyncSN' and is "
                 "set in every loaded detectron2 module that holds get_norm",
          distribution="detectron2", module="detectron2", written_for="0.6", apply=_replace_get_norm),
    Patch(target="detectron2.layers.FrozenBatchNorm2d.convert_frozen_batchnorm",
          reason="FREEZE_AT freezes through it, and it converts only BatchNorm; the wrapper freezes SN too",
          distribution="detectron2", module="detectron2", written_for="0.6",
          apply=lambda: replace_attribute(FrozenBatchNorm2d, "convert_frozen_batchnorm",
                                          classmethod(_convert_frozen_batchnorm))),
)

_installed = PatchSet()


def register() -> None:
    """Make detectron2 build and freeze SN: install :data:`PATCHES` (idempotent).

    Importing :mod:`sn_plugin.integrations.detectron2` calls it. Every process
    that builds a model needs it: import the adapter at the top level of a
    training script (``detectron2.engine.launch`` workers import the script's
    module again), or run :mod:`sn_plugin.integrations.detectron2.train_net`.
    """
    _installed.install(PATCHES)


def unregister() -> None:
    """Undo :func:`register`: detectron2's own functions again. Models already built keep their SN layers."""
    _installed.uninstall()


def is_registered() -> bool:
    return bool(_installed.installed)
