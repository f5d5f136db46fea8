"""Where each toolkit keeps the modules of a ResNet v1: one renaming per layout.

A :class:`Layout` maps a canonical module (see :mod:`.resnet`) to the module
name a toolkit's ResNet gives it, for SN (``norm="sn"``) or BatchNorm
(``norm="bn"``) layers. Every conversion goes through the canonical names, so a
new toolkit is one function here, and reading and writing a layout use the same
map (which is what makes the round trips exact).
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .errors import CheckpointError
from .resnet import RESNET_DEPTHS, Module, ResNetSpec


def _torchvision(m: Module, norm: str) -> Optional[str]:
    """torchvision / the released files / OpenMMLab's ResNet: ``bn1``/``sn1`` norms, ``downsample.0/1``."""
    if m.kind != "norm" or m.role == "shortcut":
        return m.name
    if m.role == "stem":
        return f"{norm}1"
    return f"layer{m.stage}.{m.block}.{norm}{m.index}"


def _openmmlab_backbone(m: Module, norm: str) -> Optional[str]:
    """mmdet / mmseg ``ResNet`` (``build_norm_layer`` names norms by the layer's abbreviation); no fc."""
    return None if m.kind == "fc" else _torchvision(m, norm)


def _mmpretrain(m: Module, norm: str) -> Optional[str]:
    """mmpretrain ``ImageClassifier``: the ResNet under ``backbone.``, the fc of ``LinearClsHead`` as ``head.fc``."""
    return "head.fc" if m.kind == "fc" else "backbone." + _torchvision(m, norm)


def _detectron2(m: Module, norm: str) -> Optional[str]:
    """detectron2 ``ResNet``: ``stem.conv1``, ``res2..res5`` blocks, norms inside their conv as ``.norm``."""
    if m.kind == "fc":
        return None
    if m.role == "stem":
        conv = "stem.conv1"
    elif m.role == "shortcut":
        conv = f"res{m.stage + 1}.0.shortcut"
    else:
        conv = f"res{m.stage + 1}.{m.block}.conv{m.index}"
    return conv + ".norm" if m.kind == "norm" else conv


def _mmaction2(m: Module, norm: str) -> Optional[str]:
    """mmaction2 ``ResNet3d``: every conv a ``ConvModule`` holding ``.conv`` and its norm (``.sn``/``.bn``)."""
    if m.kind == "fc":
        return None
    if m.role == "stem":
        module = "conv1"
    elif m.role == "shortcut":
        module = f"layer{m.stage}.0.downsample"
    else:
        module = f"layer{m.stage}.{m.block}.conv{m.index}"
    return f"{module}.conv" if m.kind == "conv" else f"{module}.{norm}"


@dataclass(frozen=True)
class Layout:
    """A toolkit's names for the ResNet modules.

    Args:
        name: the name the API and the command line use.
        rename: canonical module, norm abbreviation -> the layout's module name
            (``None``: the layout has no such module, e.g. a backbone has no fc).
        video: convs are 3D (mmaction2's I3D): the 2D kernels are inflated.
        strip_prefixes: prefixes removed when reading a checkpoint of this layout
            (DataParallel's ``module.``; a whole detector's ``backbone.``).
    """

    name: str
    rename: Callable[[Module, str], Optional[str]]
    video: bool = False
    strip_prefixes: Tuple[str, ...] = ("module.", "backbone.bottom_up.", "backbone.")

    def module_map(self, spec: ResNetSpec, norm: str) -> Dict[str, Optional[str]]:
        """Canonical module name -> this layout's module name, for a ResNet ``spec``."""
        return {m.name: self.rename(m, norm) for m in spec.modules()}

    def inverse_map(self, norm: str) -> Dict[str, str]:
        """This layout's module name -> canonical name, over every known depth."""
        inverse: Dict[str, str] = {}
        for depth in RESNET_DEPTHS:
            for m in ResNetSpec(depth).modules():
                name = self.rename(m, norm)
                if name is not None:
                    inverse[name] = m.name
        return inverse


LAYOUTS: Dict[str, Layout] = {
    "released": Layout("released", _torchvision),
    "torchvision": Layout("torchvision", _torchvision),
    "mmdet": Layout("mmdet", _openmmlab_backbone),
    "mmseg": Layout("mmseg", _openmmlab_backbone),
    "mmpretrain": Layout("mmpretrain", _mmpretrain, strip_prefixes=("module.",)),
    "detectron2": Layout("detectron2", _detectron2),
    "mmaction2": Layout("mmaction2", _mmaction2, video=True),
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise CheckpointError(f"unknown checkpoint layout '{name}'; choose one of {', '.join(LAYOUTS)}") from None

