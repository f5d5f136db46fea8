"""The command behind ``tools/convert_checkpoint.py``: :func:`main`."""
import argparse
import sys
from typing import List, Optional

from .convert import BN_SOURCES, DEFAULT_BN_START_WEIGHT, SN_SOURCES, SN_TARGETS, convert_checkpoint
from .errors import CheckpointError

_DESCRIPTION = "Convert SN-ResNet checkpoints between the authors' released files and the toolkits' layouts."
_EXAMPLES = """\
Examples (see docs/model_zoo.md for every released model):

    # the authors' ResNet50v1+SN -> an mmdet / mmseg backbone (init_cfg=dict(type='Pretrained', ...))
    python tools/convert_checkpoint.py released mmdet resnet50v1_sn.pth sn_r50_mmdet.pth
    # ... -> detectron2 (MODEL.WEIGHTS; .pkl or .pth)
    python tools/convert_checkpoint.py released detectron2 resnet50v1_sn.pth sn_r50_d2.pkl
    # ... -> mmaction2 I3D ResNet3d (2D kernels inflated as in its I3D R50 config)
    python tools/convert_checkpoint.py released mmaction2 resnet50v1_sn.pth sn_i3d_r50.pth
    # ours -> the released layout
    python tools/convert_checkpoint.py mmpretrain released my_sn_classifier.pth resnet50v1_sn.pth
    # a BN ResNet -> SN layers that start as that BN
    python tools/convert_checkpoint.py torchvision mmdet resnet50-0676ba61.pth sn_from_bn_r50.pth --from-bn

The input is never modified; the output is written atomically. Prints what was
mapped, dropped and missing; exits with status 1 and a message on bad input.
"""


def _inflate(text: str):
    """'1,1,1;1,0,1,0;...' -> ((1, 1, 1), (1, 0, 1, 0), ...)"""
    try:
        return tuple(tuple(int(v) for v in stage.split(",")) for stage in text.split(";"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--inflate takes 0/1 flags, ',' between blocks and ';' between "
                                         f"the 4 stages, e.g. '1,1,1;1,0,1,0;1,0,1,0,1,0;0,1,0'; got '{text}'")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=_EXAMPLES)
    parser.add_argument("source_format", choices=sorted(set(SN_SOURCES) | set(BN_SOURCES)),
                        help="layout of the input: 'released' (the authors' files), a toolkit, or "
                             "'torchvision' (BN, with --from-bn)")
    parser.add_argument("target", choices=SN_TARGETS, help="layout to write")
    parser.add_argument("input", help="checkpoint to read (.pth/.pkl); never modified")
    parser.add_argument("output", help="file to write (.pkl: detectron2's pickle format)")
    parser.add_argument("--from-bn", action="store_true",
                        help="the input has BatchNorm layers: write SN layers that start as those BNs")
    parser.add_argument("--bn-start-weight", type=float, default=DEFAULT_BN_START_WEIGHT,
                        help="with --from-bn: BN's starting importance weight (default %(default)s, as "
                             "sn_plugin.convert_to_sn; 0.9999999 reproduces the BN network's outputs within 1e-4 "
                             "but leaves the logits almost no gradient; see docs/model_zoo.md)")
    parser.add_argument("--depth", type=int, help="expected ResNet depth (checked; default: found in the file)")
    parser.add_argument("--prefix", default="",
                        help="put before every key: 'backbone.' for mmdet/mmseg load_from, "
                             "'backbone.bottom_up.' for detectron2 without name matching")
    parser.add_argument("--conv1-kernel-t", type=int, default=5,
                        help="mmaction2: temporal kernel of the stem conv (ResNet3d conv1_kernel[0])")
    parser.add_argument("--inflate", type=_inflate, default="1,1,1;1,0,1,0;1,0,1,0,1,0;0,1,0",
                        help="mmaction2: ResNet3d's inflate flags per block (default: its I3D R50 config)")
    parser.add_argument("--inflate-style", default="3x1x1", choices=("3x1x1", "3x3x3"),
                        help="mmaction2: ResNet3d's inflate_style")
    parser.add_argument("--verbose", action="store_true", help="list every mapped key")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                        help="progress bar (auto: when stderr is a terminal)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """The command: convert, print the summary; 0 on success, 1 (with a message) on bad input."""
    args = parse_args(argv)
    show_progress = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    try:
        _, summary = convert_checkpoint(
            args.input, args.source_format, args.target, args.output,
            from_bn=args.from_bn, bn_start_weight=args.bn_start_weight, depth=args.depth, prefix=args.prefix,
            conv1_kernel_t=args.conv1_kernel_t, inflate=args.inflate, inflate_style=args.inflate_style,
            show_progress=show_progress,
        )
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary.report(verbose=args.verbose))
    print(f"wrote {args.output}")
    return 0
