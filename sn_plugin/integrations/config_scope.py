"""``_base_ = 'sn_plugin::mmdet/...'``: sn_plugin's configs as bases of OpenMMLab configs.

mmengine 0.10 resolves a ``<package>::<path>`` base only for the OpenMMLab packages
it lists (``mmengine.config.utils.MODULE2PACKAGE``; any other name fails an
assertion), and looks for it in ``<package>/.mim/configs``, which an editable
install does not have. :func:`install` wraps ``Config._get_cfg_path``, the one
function that resolves a base's path: ``sn_plugin::<path>`` becomes
:func:`sn_plugin.integrations.config_files.config_file` ``(<path>)``, every other
path goes to mmengine unchanged. The base is read as a local file (no registry
scope): sn_plugin's configs inherit the toolkits' own bases, whose dicts carry
the toolkit's scope, and sn_plugin has no registry scope of its own.

A config's ``_base_`` is resolved while the file is parsed, before its
``custom_imports`` run, so this must be installed before ``Config.fromfile``:
importing ``sn_plugin.integrations.openmmlab`` installs it (do that first in your
own script), ``python -m sn_plugin.integrations.config_scope SCRIPT ARGS`` runs a
toolkit's script (mmdet's ``tools/train.py``) with it, and :func:`uninstall` removes it.
"""
import os
import runpy
import sys
import warnings
from typing import List, Optional, Tuple

from mmengine import __version__ as mmengine_version
from mmengine.config import Config

from .config_files import config_file

PREFIX = "sn_plugin::"
WRITTEN_FOR = "0.10."  # mmengine versions whose static Config._get_cfg_path(cfg_path, filename) this wraps

_original: Optional[staticmethod] = None  # mmengine's own, while ours is installed


def _get_cfg_path(cfg_path: str, filename: str) -> Tuple[str, Optional[str]]:
    """``Config._get_cfg_path`` that also knows ``sn_plugin::`` bases."""
    if cfg_path.startswith(PREFIX):
        return config_file(cfg_path[len(PREFIX):]), None
    return _original.__func__(cfg_path, filename)


_WRAPPER = staticmethod(_get_cfg_path)


def installed() -> bool:
    return _original is not None


def install() -> None:
    """Make ``sn_plugin::<path>`` bases resolvable (idempotent).

    On an mmengine other than 0.10.x it warns and, if the wrapped function is
    missing or no longer a staticmethod, leaves mmengine alone.
    """
    global _original
    if installed():
        return
    current = Config.__dict__.get("_get_cfg_path")
    fallback = ("inherit the config by its path instead: "
                "sn_plugin.integrations.config_files.config_file('mmdet/...')")
    if not isinstance(current, staticmethod):
        warnings.warn(f"mmengine {mmengine_version} resolves config bases differently from the 0.10 series; "
                      f"'sn_plugin::' bases are not available: {fallback}.", stacklevel=2)
        return
    if not mmengine_version.startswith(WRITTEN_FOR):
        warnings.warn(f"'sn_plugin::' config bases were written for mmengine {WRITTEN_FOR}x, not "
                      f"{mmengine_version}; if one fails to load, {fallback}.", stacklevel=2)
    _original = current
    Config._get_cfg_path = _WRAPPER


def uninstall() -> None:
    """Restore mmengine's own base resolution (idempotent)."""
    global _original
    if not installed():
        return
    if Config.__dict__.get("_get_cfg_path") is not _WRAPPER:
        raise RuntimeError("mmengine's Config._get_cfg_path was replaced after sn_plugin wrapped it; "
                           "undo that replacement first, then uninstall sn_plugin's.")
    Config._get_cfg_path = _original
    _original = None


def main(argv: Optional[List[str]] = None) -> None:
    """Run a toolkit's script (e.g. mmdet's ``tools/train.py``) with ``sn_plugin::`` bases available.

    ``python -m sn_plugin.integrations.config_scope SCRIPT [ARGS...]`` is ``python SCRIPT [ARGS...]``
    with :func:`install` done first, since the script reads its config before any
    ``custom_imports`` run.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or not os.path.isfile(argv[0]):
        raise SystemExit("usage: python -m sn_plugin.integrations.config_scope SCRIPT [ARGS...]\n"
                         "runs SCRIPT (e.g. mmdet's tools/train.py) so that its config may inherit "
                         "_base_ = 'sn_plugin::<toolkit>/<config>'" + (f"; no such file: {argv[0]}" if argv else ""))
    install()
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python SCRIPT` does
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
