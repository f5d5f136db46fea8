"""Switchable Normalization (Luo et al., ICLR 2019) for detection, segmentation and video toolkits.

The core (this package's top level) needs only torch; the toolkit integrations
live in ``sn_plugin.integrations`` and import their toolkit when imported.
"""
from .batch_stats import LayerStatsReport, recompute_batch_stats
from .conversion import (
    BatchNormXd, SNSource, convert_sync_sn, convert_to_sn, register_sn_converter, revert_sync_sn, sn_source,
    sparsify,
)
from .functional import switch_norm
from .introspection import importance_summary, importance_weights, stage_of, switch_norm_layers
from .switchable_norm import (
    FrozenSwitchNorm, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchNormBase, SwitchNormNd, SyncSwitchNorm,
)

__version__ = "0.1.0"

__all__ = [
    "FrozenSwitchNorm", "SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "SwitchNormBase", "SyncSwitchNorm", "switch_norm",
    "importance_summary", "importance_weights", "stage_of", "switch_norm_layers",
    "LayerStatsReport", "recompute_batch_stats",
    "BatchNormXd", "SwitchNormNd", "convert_sync_sn", "convert_to_sn", "register_sn_converter", "revert_sync_sn",
    "SNSource", "sn_source", "sparsify",
]
