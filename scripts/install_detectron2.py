#!/usr/bin/env python
"""Install detectron2's Python package (v0.6) without its compiled extension.

Run with the interpreter of the target environment (scripts/setup_env.sh runs
it as ``.venv/bin/python scripts/install_detectron2.py``).

* If ``import detectron2`` already works, nothing is touched (a user's own
  detectron2 build, e.g. one compiled from source with CUDA, always wins).
* Otherwise the ``pb1-detectron2==0.6`` sdist is fetched from the package index
  with pip.  It carries upstream detectron2 v0.6's Python code unchanged, but
  without ``detectron2/layers/csrc``, so ``detectron2._C`` cannot be compiled
  from it.  Its own ``setup.py`` would also drop the model-zoo configs and pull
  in ``black==21.4b2``, so it is not installed as is: the ``detectron2``
  package (plus the PointRend / DeepLab / Panoptic-DeepLab projects that
  upstream installs under ``detectron2.projects``) is staged in a temporary
  folder, a placeholder ``detectron2/_C.py`` is added, and the result is
  installed with pip as the distribution ``detectron2==0.6+nocsrc``
  (so ``pip uninstall detectron2`` removes it cleanly).

The placeholder only exists in this install.  Attribute access on it returns a
stub whose call raises ``Detectron2ExtensionMissingError``; the standard
R-CNN / RetinaNet paths never call ``_C`` (NMS and RoIAlign come from
torchvision), while rotated boxes, deformable conv and the fast C++ COCO
evaluator (``COCOEvaluator(..., use_fast_impl=False)`` avoids it) need it.

Environment variables:
  SN_D2_SPEC       requirement to download (default: pb1-detectron2==0.6)
  SN_CONSTRAINTS   constraints file passed to pip (optional)
"""
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap

SPEC = os.environ.get("SN_D2_SPEC", "pb1-detectron2==0.6")
DIST_VERSION = "0.6+nocsrc"
PROJECTS = {  # detectron2.projects.<name> -> folder in the sdist (as upstream setup.py)
    "point_rend": "projects/PointRend/point_rend",
    "deeplab": "projects/DeepLab/deeplab",
    "panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}
RUNTIME_DEPS = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]

PLACEHOLDER_C = '''\
"""Placeholder for detectron2's compiled extension ``detectron2._C``.

Written by sn_plugin's scripts/install_detectron2.py, which installed detectron2's
Python package from the ``pb1-detectron2==0.6`` sdist; that sdist has no C++/CUDA
sources, so the real extension could not be built.  The standard R-CNN path
(NMS / RoIAlign from torchvision) never calls into ``_C``.
"""

__sn_plugin_placeholder__ = True

MESSAGE = (
    "detectron2 was installed by sn_plugin's setup without its compiled extension "
    "(detectron2._C); rotated boxes / deformable conv (and the fast C++ COCO "
    "evaluator) are unavailable; install detectron2 from source for them "
    "(https://detectron2.readthedocs.io/en/latest/tutorials/install.html)."
)


class Detectron2ExtensionMissingError(RuntimeError):
    pass


# Read by detectron2.utils.collect_env (called by engine.default_setup);
# answering them keeps environment reports working.
def get_compiler_version():
    return "not built (sn_plugin placeholder for detectron2._C)"


def get_cuda_version():
    return "not built (sn_plugin placeholder for detectron2._C)"


def has_cuda():
    return False


class _Missing:
    def __init__(self, name):
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args, **kwargs):
        raise Detectron2ExtensionMissingError(MESSAGE + " [needed: detectron2._C.%s]" % self.__name__)

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise Detectron2ExtensionMissingError(MESSAGE + " [needed: detectron2._C.%s]" % self.__name__)

    def __repr__(self):
        return "<missing detectron2._C.%s (sn_plugin placeholder)>" % self.__name__


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing(name)
'''


def log(msg):
    print("[install_detectron2] " + msg, flush=True)


def detectron2_importable():
    return subprocess.call(
        [sys.executable, "-c", "import detectron2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ) == 0


def pip(*args):
    cmd = [sys.executable, "-m", "pip"] + list(args)
    log("+ " + " ".join(cmd))
    subprocess.check_call(cmd)


def main():
    if detectron2_importable():
        log("detectron2 already importable; leaving it untouched")
        return 0
    tmp = tempfile.mkdtemp(prefix="sn_d2_")
    try:
        dl = os.path.join(tmp, "dl")
        # --no-build-isolation: pip prepares the sdist's metadata by running its
        # setup.py, which imports torch (present in this environment).
        pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
            "-d", dl, SPEC)
        archives = [f for f in os.listdir(dl) if f.endswith((".tar.gz", ".zip"))]
        if len(archives) != 1:
            raise SystemExit("expected one sdist in %s, got %r" % (dl, os.listdir(dl)))
        src = os.path.join(tmp, "src")
        with tarfile.open(os.path.join(dl, archives[0])) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(src, filter="data")
            else:
                tf.extractall(src)
        (top,) = os.listdir(src)
        src = os.path.join(src, top)

        stage = os.path.join(tmp, "stage")
        pkg = os.path.join(stage, "detectron2")
        shutil.copytree(os.path.join(src, "detectron2"), pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
        if not os.path.isdir(os.path.join(pkg, "model_zoo", "configs")):
            raise SystemExit("sdist has no detectron2/model_zoo/configs")
        for name, rel in PROJECTS.items():
            p = os.path.join(src, rel)
            if os.path.isdir(p):
                shutil.copytree(p, os.path.join(pkg, "projects", name),
                                ignore=shutil.ignore_patterns("__pycache__"))
        if os.path.exists(os.path.join(pkg, "layers", "csrc")):
            log("note: this sdist has layers/csrc, but it is not compiled here")
        with open(os.path.join(pkg, "_C.py"), "w") as f:
            f.write(PLACEHOLDER_C)
        for extra in ("LICENSE",):
            if os.path.exists(os.path.join(src, extra)):
                shutil.copy(os.path.join(src, extra), stage)
        with open(os.path.join(stage, "setup.py"), "w") as f:
            f.write(textwrap.dedent("""\
                from setuptools import find_packages, setup
                setup(
                    name="detectron2",
                    version=%r,
                    description="detectron2 v0.6 Python package (from the pb1-detectron2 sdist) "
                                "without its compiled extension; installed by sn_plugin's setup",
                    url="https://github.com/facebookresearch/detectron2",
                    license="Apache-2.0",
                    packages=find_packages(include=["detectron2", "detectron2.*"]),
                    package_data={"detectron2.model_zoo": ["configs/*.yaml", "configs/**/*.yaml",
                                                           "configs/**/*.py"]},
                    python_requires=">=3.6",
                    install_requires=%r,
                )
                """ % (DIST_VERSION, RUNTIME_DEPS)))
        args = ["install", "--no-build-isolation"]
        cons = os.environ.get("SN_CONSTRAINTS")
        if cons:
            args += ["-c", cons]
        pip(*(args + [stage]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    out = subprocess.check_output([sys.executable, "-c", (
        "import os, detectron2, detectron2._C as C, detectron2.model_zoo as mz\n"
        "assert getattr(C, '__sn_plugin_placeholder__', False)\n"
        "p = mz.get_config_file('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml')\n"
        "assert os.path.isfile(p), p\n"
        "print(detectron2.__version__, os.path.dirname(detectron2.__file__))\n")])
    log("installed detectron2 %s" % out.decode().strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
