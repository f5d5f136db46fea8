"""Makes ``mmaction.models`` importable from the mmaction2 1.2.0 PyPI package.

Both the wheel and the sdist of mmaction2 1.2.0 lack the package
``mmaction.models.localizers.drn`` that ``mmaction/models/localizers/__init__.py``
imports, so ``import mmaction.models`` (and with it every mmaction2 config)
fails with ``ModuleNotFoundError``. :func:`install_drn_placeholder` appends an
import finder to ``sys.meta_path`` that supplies a placeholder for exactly that
package. Python consults it only after its regular finders have failed to find
the real package, so an mmaction2 release that ships ``drn`` imports its own,
and nothing is imported or registered until mmaction2 itself imports ``drn``.
The placeholder's ``DRN`` is registered under the real name and raises on use,
so only the DRN localizer is unavailable, with an error that says why.
"""
import importlib.abc
import importlib.util
import sys

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


def install_drn_placeholder() -> None:
    """Append the placeholder finder to ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MissingPackagePlaceholder) and finder.package == DRN_PACKAGE
               for finder in sys.meta_path):
        sys.meta_path.append(MissingPackagePlaceholder(DRN_PACKAGE))


def drn_placeholder_in_use() -> bool:
    """Whether mmaction2 imported the placeholder because its own ``drn`` package is missing."""
    module = sys.modules.get(DRN_PACKAGE + ".drn")
    return module is not None and isinstance(getattr(module, "__loader__", None), MissingPackagePlaceholder)
