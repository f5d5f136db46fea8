"""2D -> 3D inflation of ResNet conv kernels for mmaction2's I3D ``ResNet3d``.

Each 2D kernel is repeated over the target's temporal kernel size ``t`` and
divided by ``t``, so that it sums over time to the 2D kernel: on a clip of
identical frames the 3D network computes what the 2D one computes on a frame
(I3D's "bootstrapping", and mmaction2's own ``inflate_weights``). Norm layers
need nothing: SN's parameters and statistics are per channel in 2D and 3D alike.
"""
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from .errors import CheckpointError
from .resnet import ResNetSpec

# mmaction2's I3D ResNet-50 (configs/_base_/models/i3d_r50.py): which blocks of each stage are inflated.
I3D_R50_INFLATE: Tuple[Tuple[int, ...], ...] = ((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0))
I3D_R50_CONV1_KERNEL_T = 5
InflateArg = Sequence[Union[int, Sequence[int]]]


def i3d_temporal_kernels(
    spec: ResNetSpec,
    conv1_kernel_t: int = I3D_R50_CONV1_KERNEL_T,
    inflate: InflateArg = I3D_R50_INFLATE,
    inflate_style: str = "3x1x1",
) -> Dict[str, int]:
    """Temporal kernel size of every canonical conv of an mmaction2 ``ResNet3d``.

    Arguments mean what they mean in ``ResNet3d``: ``inflate`` holds one 0/1 per
    block (or one for a whole stage); an inflated bottleneck gets a 3-frame
    kernel on ``conv1`` (``"3x1x1"``) or ``conv2`` (``"3x3x3"``), an inflated
    basic block on both its convs (mmaction2's ``BasicBlock3d`` ignores the
    style); shortcuts and everything else stay 1 frame.
    """
    if inflate_style not in ("3x1x1", "3x3x3"):
        raise CheckpointError(f"inflate_style must be '3x1x1' or '3x3x3', got '{inflate_style}'")
    if len(inflate) != 4:
        raise CheckpointError(f"inflate needs one entry per stage (4), got {len(inflate)}: {inflate}")
    per_block = []
    for stage, (flags, blocks) in enumerate(zip(inflate, spec.stage_blocks), start=1):
        flags = (flags,) * blocks if isinstance(flags, int) else tuple(flags)
        if len(flags) != blocks:
            raise CheckpointError(
                f"inflate for layer{stage} has {len(flags)} entries but ResNet-{spec.depth} has {blocks} blocks there"
            )
        per_block.append(flags)
    if spec.block == "bottleneck":
        inflated_convs = (1,) if inflate_style == "3x1x1" else (2,)
    else:
        inflated_convs = (1, 2)
    kernels = {}
    for m in spec.modules():
        if m.kind != "conv":
            continue
        if m.role == "stem":
            kernels[m.name] = conv1_kernel_t
        elif m.role == "block" and per_block[m.stage - 1][m.block] and m.index in inflated_convs:
            kernels[m.name] = 3
        else:
            kernels[m.name] = 1
    return kernels


def inflate_conv(weight: torch.Tensor, time: int) -> torch.Tensor:
    """A (O, I, k, k) kernel as (O, I, time, k, k) whose sum over time is ``weight``."""
    return (weight.unsqueeze(2) / time).repeat(1, 1, time, 1, 1)


def temporal_kernels_from_state(
    state: Mapping[str, torch.Tensor], conv_names: Mapping[str, Optional[str]]
) -> Dict[str, int]:
    """Temporal kernel sizes read off a 3D model's state dict (e.g. ``model.backbone.state_dict()``).

    ``conv_names`` maps canonical conv names to the model's module names.
    """
    kernels = {}
    for canonical, name in conv_names.items():
        key = f"{name}.weight"
        if name is None or key not in state:
            continue
        shape = tuple(state[key].shape)
        if len(shape) != 5:
            raise CheckpointError(f"target '{key}' has shape {shape}; a 3D conv kernel has 5 dimensions")
        kernels[canonical] = shape[2]
    return kernels
