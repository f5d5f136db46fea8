"""SN-ResNet checkpoints: the authors' released files, every toolkit's layout, and BN starts.

``convert_checkpoint`` (and its shorthands ``released_to``, ``to_released``,
``bn_to_sn``) is the Python API of ``tools/convert_checkpoint.py``; see
``docs/model_zoo.md`` for the released models and the command per toolkit.
Needs only torch.
"""
from .convert import (DEFAULT_BN_START_WEIGHT, ConversionSummary, bn_to_sn, check_fits, convert_checkpoint, released_to,
                      to_released)
from .errors import CheckpointError
from .inflation import I3D_R50_INFLATE, i3d_temporal_kernels, inflate_conv
from .layouts import LAYOUTS, Layout
from .released_1d import convert_released_1d_state
from .resnet import RESNET_DEPTHS, ResNetSpec

__all__ = [
    "DEFAULT_BN_START_WEIGHT", "CheckpointError", "ConversionSummary", "I3D_R50_INFLATE", "LAYOUTS", "Layout",
    "RESNET_DEPTHS", "ResNetSpec", "bn_to_sn", "check_fits", "convert_checkpoint", "convert_released_1d_state",
    "i3d_temporal_kernels",
    "inflate_conv", "released_to", "to_released",
]
