"""Build sn_plugin: the package (metadata in pyproject.toml), its shipped configs, and its C++ CPU kernels.

    pip install -e . --no-build-isolation     # builds sn_plugin/kernels/_C against the installed torch
    python setup.py build_ext --inplace       # rebuilds the kernels in place during development
    pip wheel --no-deps --no-build-isolation . # a wheel with the configs under sn_plugin/.mim/

Configs: a built wheel carries the repository's ``configs/`` and ``model-index.yml`` under
``sn_plugin/.mim/``, the layout OpenMMLab's mim packages use (see
sn_plugin/integrations/config_files.py); an editable install uses the checkout's own.

Kernels: the extension is compiled against the torch of the build environment, as mmcv's
is; pip's default isolated build has no torch, hence ``--no-build-isolation``. Without
torch, or when the compiler fails, the package installs without the extension and runs on
the pure-PyTorch reference path (a warning at run time says how to build the kernels).
"""
import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

KERNEL_SOURCES = sorted(glob.glob(os.path.join("sn_plugin", "kernels", "csrc", "*.cpp")))
NOT_BUILT = (
    "sn_plugin: the C++ CPU kernels (sn_plugin.kernels._C) are not built: {reason}. The package "
    "works without them, on the slower pure-PyTorch path. To build them, install with torch and a "
    "C++17 compiler present: pip install -e . --no-build-isolation"
)


class BuildPyWithConfigs(build_py):
    """Copies configs/ and model-index.yml into the built package's .mim/ folder (not for editable installs)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        mim = os.path.join(self.build_lib, "sn_plugin", ".mim")
        shutil.rmtree(mim, ignore_errors=True)  # a config deleted from configs/ must leave the next wheel too
        shutil.copytree("configs", os.path.join(mim, "configs"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))
        shutil.copy2("model-index.yml", mim)


def extension_build():
    """(ext_modules, cmdclass entries): the kernels' extension if torch's build helpers are importable."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(NOT_BUILT.format(reason="torch is not importable at build time"), file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Builds the kernels if it can; a failed compile leaves the package usable without them."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # compiler missing or failing: the reference path remains
                print(NOT_BUILT.format(reason=f"the build failed ({error})"), file=sys.stderr)

    kernels = CppExtension(
        "sn_plugin.kernels._C",
        KERNEL_SOURCES,
        # -fopenmp: ATen's parallel_for is OpenMP in torch's builds and runs serially without it
        # (the process shares torch's libgomp); -fno-math-errno lets sqrt vectorise.
        extra_compile_args={"cxx": ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-Wno-unknown-pragmas"]},
        extra_link_args=["-fopenmp"],
    )
    return [kernels], {"build_ext": OptionalBuildExtension}


ext_modules, extension_commands = extension_build()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithConfigs, **extension_commands})
