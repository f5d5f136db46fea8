"""The ResNet-v1 structure every checkpoint layout here is a renaming of.

All layouts (the authors' released files, torchvision, OpenMMLab, detectron2,
mmaction2's I3D) hold the same modules of a torchvision-style ResNet v1: a 7x7
stem, stages ``layer1..4`` of blocks, the stride on the 3x3 conv and a
conv + norm shortcut in the first block of a stage. This module names those
modules once, in the *canonical* names of the released checkpoints (``conv1``,
``sn1``, ``layer2.0.conv2``, ``layer2.0.downsample.0`` ...), and knows the shape
of every tensor, so that each layout is only a map from canonical module names to
its own and every shape check says what was expected.
"""
import functools
import re
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple

from .errors import CheckpointError

# depth -> (block type, blocks per stage)
RESNET_DEPTHS: Dict[int, Tuple[str, Tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STEM_CHANNELS = 64
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}

# Entries of one norm layer in our layout. ``num_batches_tracked`` is BatchNorm's
# and SN's buffer; SN layers without a BN branch have no running statistics.
SN_PARAMS = ("weight", "bias", "mean_weight", "var_weight", "running_mean", "running_var", "num_batches_tracked")
BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class Module:
    """One conv, norm or fc module of the canonical ResNet.

    ``role`` says where it sits: ``"stem"``, ``"block"`` (conv/norm number
    ``index`` of block ``block`` of ``layer{stage}``), ``"shortcut"`` (the first
    block's downsample) or ``"fc"``. ``kernel`` is a conv's spatial kernel size.
    """

    name: str
    kind: str  # "conv" | "norm" | "fc"
    role: str  # "stem" | "block" | "shortcut" | "fc"
    out_channels: int
    in_channels: int = 0
    kernel: int = 1
    stage: int = 0
    block: int = 0
    index: int = 0


@dataclass(frozen=True)
class ResNetSpec:
    depth: int

    @property
    def block(self) -> str:
        return RESNET_DEPTHS[self.depth][0]

    @property
    def stage_blocks(self) -> Tuple[int, int, int, int]:
        return RESNET_DEPTHS[self.depth][1]

    @property
    def feature_channels(self) -> int:
        return STAGE_WIDTHS[-1] * EXPANSION[self.block]

    def modules(self) -> Iterator[Module]:
        """Every conv / norm module in forward order (the fc comes last)."""
        yield Module("conv1", "conv", "stem", STEM_CHANNELS, 3, 7)
        yield Module("sn1", "norm", "stem", STEM_CHANNELS)
        expansion = EXPANSION[self.block]
        kernels = (1, 3, 1) if self.block == "bottleneck" else (3, 3)
        in_channels = STEM_CHANNELS
        for stage, (width, blocks) in enumerate(zip(STAGE_WIDTHS, self.stage_blocks), start=1):
            out_channels = width * expansion
            for i in range(blocks):
                prefix = f"layer{stage}.{i}"
                block_in = in_channels if i == 0 else out_channels
                conv_in = block_in
                for j, kernel in enumerate(kernels, start=1):
                    conv_out = out_channels if j == len(kernels) else width
                    yield Module(f"{prefix}.conv{j}", "conv", "block", conv_out, conv_in, kernel, stage, i, j)
                    yield Module(f"{prefix}.sn{j}", "norm", "block", conv_out, stage=stage, block=i, index=j)
                    conv_in = conv_out
                if i == 0 and (stage > 1 or block_in != out_channels):
                    yield Module(f"{prefix}.downsample.0", "conv", "shortcut", out_channels, block_in, 1, stage)
                    yield Module(f"{prefix}.downsample.1", "norm", "shortcut", out_channels, stage=stage)
            in_channels = out_channels
        yield Module("fc", "fc", "fc", 0, self.feature_channels, stage=5)

    def module_dict(self) -> Dict[str, Module]:
        """Canonical name -> module (shared, do not modify)."""
        return _module_dict(self.depth)


@functools.lru_cache(maxsize=None)
def _module_dict(depth: int) -> Dict[str, Module]:
    return {m.name: m for m in ResNetSpec(depth).modules()}


def split_key(key: str) -> Tuple[str, str]:
    """``'layer1.0.sn1.weight'`` -> ``('layer1.0.sn1', 'weight')``."""
    module, _, param = key.rpartition(".")
    return module, param


_V2_MARKERS = (re.compile(r"(^|\.)sn_out\."), re.compile(r"(^|\.)bn_out\."),
               re.compile(r"\.downsample\.weight$"))
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.conv(\d)\.weight$")


def refuse_v2(keys: Iterable[str], source: str) -> None:
    """Raise for a pre-activation (v2) ResNet: ``sn_out`` layers and a bare-conv downsample."""
    for key in keys:
        if any(p.search(key) for p in _V2_MARKERS):
            raise CheckpointError(
                f"{source} looks like a pre-activation ResNet v2 (key '{key}': v2 has 'sn_out' and a bare-conv "
                f"downsample). Only ResNet v1 (ResNet50v1+SN, ResNet101v1+SN) checkpoints are supported; v2's "
                f"layer order has no counterpart in the mmdet/mmseg/mmaction2/mmpretrain/detectron2 ResNets."
            )


def infer_spec(canonical_keys: Iterable[str], depth: Optional[int] = None, source: str = "checkpoint",
               source_keys: Sequence[str] = ()) -> ResNetSpec:
    """The ResNet depth whose structure the canonical ``keys`` have.

    Refuses non-ResNet checkpoints and a ``depth`` that does not match the
    blocks found, naming what was found.
    """
    keys = list(canonical_keys)
    blocks: Dict[int, set] = {s: set() for s in range(1, 5)}
    convs_per_block = set()
    for key in keys:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
            convs_per_block.add(int(m.group(3)))
    if "conv1.weight" not in keys or not all(blocks.values()):
        sample = ", ".join(list(source_keys)[:5] or keys[:5]) or "no tensors"
        raise CheckpointError(
            f"{source} is not a ResNet v1 checkpoint: expected 'conv1.weight' and 'layer1..4.<i>.conv<j>.weight' "
            f"(after removing a 'module.'/'backbone.' prefix); found keys like: {sample}"
        )
    found = tuple(max(b) + 1 for _, b in sorted(blocks.items()))
    block = "bottleneck" if 3 in convs_per_block else "basic"
    matches = [d for d, (kind, stages) in RESNET_DEPTHS.items() if stages == found and kind == block]
    if not matches:
        raise CheckpointError(
            f"{source}: a ResNet with {block} blocks and {found} blocks per stage is no known depth "
            f"(known: {', '.join(f'{d}={RESNET_DEPTHS[d][1]}' for d in RESNET_DEPTHS)})"
        )
    found_depth = matches[0]
    if depth is not None and depth != found_depth:
        raise CheckpointError(
            f"depth mismatch: asked for ResNet-{depth} {RESNET_DEPTHS[depth][1] if depth in RESNET_DEPTHS else ''}"
            f", but {source} holds a ResNet-{found_depth} ({block} blocks {found} per stage). "
            f"Pass depth={found_depth} (--depth {found_depth}) or the matching checkpoint."
        )
    return ResNetSpec(found_depth)


def expected_shape(module: Module, param: str, fc_classes: Optional[int] = None) -> Optional[Tuple[int, ...]]:
    """Shape of ``module.param`` in our layout (2D convs; None: any shape)."""
    if module.kind == "conv":
        return (module.out_channels, module.in_channels, module.kernel, module.kernel)
    if module.kind == "fc":
        if fc_classes is None:
            return None
        return (fc_classes, module.in_channels) if param == "weight" else (fc_classes,)
    if param == "num_batches_tracked":
        return ()
    if param in ("mean_weight", "var_weight"):
        return None  # (3,) or (2,): checked with the layer's other entries
    return (module.out_channels,)


def format_shape(shape: Iterable[int]) -> str:
    return str(tuple(int(s) for s in shape))


def check_shape(key: str, found: Tuple[int, ...], expected: Tuple[int, ...], source: str) -> None:
    if tuple(found) != tuple(expected):
        raise CheckpointError(
            f"{source}: shape mismatch for '{key}': expected {format_shape(expected)}, found {format_shape(found)}"
        )

