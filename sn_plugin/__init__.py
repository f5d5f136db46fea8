"""Switchable Normalization (Luo et al., ICLR 2019) for detection, segmentation and video toolkits.

The core (this package's top level) needs only torch; the toolkit integrations
live in their own modules and import their toolkit when they are imported.
"""
from .functional import switch_norm
from .switchable_norm import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d

__version__ = "0.1.0"

__all__ = ["SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "switch_norm"]
