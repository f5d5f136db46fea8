"""Where sn_plugin's config files are, in a wheel install and in a source checkout.

A built wheel carries the repository's ``configs/`` under ``sn_plugin/.mim/configs``, the
layout OpenMMLab's mim packages use (mmdet ships ``mmdet/.mim/configs``); ``setup.py``
copies them there at build time. An editable install or a source checkout has no such
copy: its configs are the checkout's ``configs/`` beside the package. The toolkit
adapters find configs by name through :func:`config_file`, whichever of the two is
present. Standard library only: nothing here imports a toolkit.
"""
import difflib
from pathlib import Path, PurePosixPath
from typing import List, Optional

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_INSTALLED = _PACKAGE_DIR / ".mim" / "configs"
_CHECKOUT = _PACKAGE_DIR.parent / "configs"
_CONFIG_SUFFIXES = (".py", ".yaml", ".yml")


def config_root() -> Path:
    """The folder holding the shipped configs (``mmdet/``, ``detectron2/``, ...)."""
    if _INSTALLED.is_dir():
        return _INSTALLED
    # A checkout is recognised by its pyproject.toml: an installed package's parent is
    # site-packages, where another distribution's top-level ``configs`` folder may lie.
    if _CHECKOUT.is_dir() and (_CHECKOUT.parent / "pyproject.toml").is_file():
        return _CHECKOUT
    raise FileNotFoundError(
        f"sn_plugin's configs are not installed: neither {_INSTALLED} nor a source checkout's "
        f"{_CHECKOUT} exists. Install sn_plugin from a wheel built by its setup.py "
        "(`pip wheel --no-deps --no-build-isolation <checkout>`), or `pip install -e <checkout>`.")


def list_configs(toolkit: Optional[str] = None) -> List[str]:
    """Names of the shipped configs (``'mmdet/faster-rcnn_r50_fpn_sn-all_1x_coco.py'``, ...), sorted.

    ``toolkit`` (``'mmdet'``, ``'detectron2'``, ...) keeps only that folder. Bases
    (``_base_/``, ``Base-*.yaml``) are listed too: they can be inherited as well.
    """
    root = config_root()
    folder = root / toolkit if toolkit else root
    return sorted(
        path.relative_to(root).as_posix() for path in folder.rglob("*")
        if path.suffix in _CONFIG_SUFFIXES and path.is_file() and "__pycache__" not in path.parts
        and path.name != "metafile.yml")


def config_file(name: str) -> str:
    """The absolute path of the shipped config ``name``, relative to the configs folder.

    ``name`` is e.g. ``'mmdet/faster-rcnn_r50_fpn_sn-all_1x_coco.py'`` or
    ``'detectron2/COCO-Detection/faster_rcnn_R_50_FPN_1x_sn.yaml'``. A name that
    is not shipped raises ``FileNotFoundError`` naming the closest shipped ones.
    """
    relative = PurePosixPath(name.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"config name {name!r} must be a path inside sn_plugin's configs folder, "
                         "like 'mmdet/faster-rcnn_r50_fpn_sn-all_1x_coco.py'")
    path = config_root().joinpath(*relative.parts)
    if path.is_file():
        return str(path)
    shipped = list_configs()
    close = difflib.get_close_matches(relative.as_posix(), shipped, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"shipped configs: {', '.join(shipped)}"
    raise FileNotFoundError(f"sn_plugin ships no config {name!r} (looked in {config_root()}); {hint}")
