"""Makes ``mmaction.models`` importable from the mmaction2 1.2.0 PyPI package.

Both the wheel and the sdist of mmaction2 1.2.0 lack the package
``mmaction.models.localizers.drn`` that ``mmaction/models/localizers/__init__.py``
imports, so ``import mmaction.models`` (and with it every mmaction2 config)
fails with ``ModuleNotFoundError``. :data:`DRN_PLACEHOLDER` is the OpenMMLab
adapter's patch for it: an import finder at the end of ``sys.meta_path`` that
supplies a placeholder for exactly that package. The adapter installs it only
when mmaction2 is installed and that package is missing from it
(:func:`module_missing`), so nothing changes for users without mmaction2 or
with a release that ships ``drn``. Nothing is imported or registered until
mmaction2 itself imports ``drn``. The placeholder's ``DRN`` is registered under
the real name and raises on use, so only the DRN localizer is unavailable, with
an error that says why.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Callable

from .common import Patch

DRN_PACKAGE = "mmaction.models.localizers.drn"


class DRNUnavailable:
    """Stands in for mmaction2's DRN localizer, which the installed package does not contain."""

    def __init__(self, *args, **kwargs) -> None:
        raise ImportError(
            "DRN is not available: the installed mmaction2 package lacks 'mmaction.models.localizers.drn' "
            "(a packaging bug of the mmaction2 1.2.0 release on PyPI; sn_plugin supplied a placeholder so "
            "that the rest of mmaction.models imports). To use DRN, install mmaction2 from its GitHub source."
        )


class MissingPackagePlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A last-resort finder for ``package`` and its module ``package.drn``.

    The package is empty; the module gets a ``DRN`` subclass of
    :class:`DRNUnavailable`, registered in mmaction2's ``MODELS`` when the
    package is mmaction2's.
    """

    def __init__(self, package: str = DRN_PACKAGE) -> None:
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.package:
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        if fullname == self.package + ".drn":
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        if module.__name__ != self.package + ".drn":
            return
        module.DRN = type("DRN", (DRNUnavailable,), {"__module__": module.__name__})
        if self.package == DRN_PACKAGE:
            from mmaction.registry import MODELS
            if "DRN" not in MODELS.module_dict:
                MODELS.register_module("DRN", module=module.DRN)


def module_missing(name: str) -> bool:
    """Whether the installed package that should hold the dotted module ``name`` lacks it.

    True only if every package above ``name`` is found and ``name`` is not;
    False if the top-level package is not installed. Looks at the files only:
    nothing is imported (importing the parent is what fails).
    """
    top, *parts = name.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or spec.submodule_search_locations is None or not parts:
        return False
    found = top
    for index, part in enumerate(parts):
        found = f"{found}.{part}"
        spec = importlib.machinery.PathFinder.find_spec(found, list(spec.submodule_search_locations))
        last = index == len(parts) - 1
        if spec is None:
            return last
        if not last and spec.submodule_search_locations is None:
            return False  # a module where a package should be: not the layout this is about
    return False


def _add_drn_placeholder() -> Callable[[], None]:
    finder = MissingPackagePlaceholder(DRN_PACKAGE)
    sys.meta_path.append(finder)

    def undo() -> None:
        # Modules already imported through the placeholder stay in sys.modules.
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)

    return undo


DRN_PLACEHOLDER = Patch(
    target=DRN_PACKAGE,
    reason="a placeholder, because the mmaction2 1.2.0 PyPI files lack this package and "
           "'import mmaction.models' fails without it",
    distribution="mmaction2", module="mmaction", written_for="1.2.0", apply=_add_drn_placeholder)


def drn_placeholder_in_use() -> bool:
    """Whether mmaction2 imported the placeholder because its own ``drn`` package is missing."""
    module = sys.modules.get(DRN_PACKAGE + ".drn")
    return module is not None and isinstance(getattr(module, "__loader__", None), MissingPackagePlaceholder)
