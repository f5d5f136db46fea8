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

# The normalization family next to SN: Consistent Normalization, XBNBlock, estimation shift.
from .consistent import (  # noqa: E402
    ConsistentStep, branch_assignment, consistent_branch, consistent_norm_layers, consistent_train_step,
    convert_to_cn, export_branch,
)
from .consistent_norm import ConsistentNorm, ConsistentNorm1d, ConsistentNorm2d, ConsistentNorm3d  # noqa: E402
from .estimation_shift import (  # noqa: E402
    LayerShift, estimated_statistics_layers, estimation_shift, perturbed_running_stats, plot_estimation_shift,
    plot_estimation_shift_history, write_estimation_shift_csv,
)
from .xbn import (  # noqa: E402
    ResidualBlock, XBNLoadReport, build_bfn, convert_to_xbn, load_bn_state_dict, register_xbn_block,
    residual_blocks, xbn_plan,
)

__all__ += [
    "ConsistentNorm", "ConsistentNorm1d", "ConsistentNorm2d", "ConsistentNorm3d", "ConsistentStep",
    "branch_assignment", "consistent_branch", "consistent_norm_layers", "consistent_train_step", "convert_to_cn",
    "export_branch",
    "LayerShift", "estimated_statistics_layers", "estimation_shift", "perturbed_running_stats",
    "plot_estimation_shift", "plot_estimation_shift_history", "write_estimation_shift_csv",
    "ResidualBlock", "XBNLoadReport", "build_bfn", "convert_to_xbn", "load_bn_state_dict", "register_xbn_block",
    "residual_blocks", "xbn_plan",
]
