#!/usr/bin/env python
"""Plot every SN layer's importance weights (the paper's Fig. 7) and write them as CSV.

    python tools/plot_sn_weights.py work_dirs/mask_rcnn_sn/epoch_12.pth --out weights.png
    python tools/plot_sn_weights.py my_package.models:build_model --out weights.png

CHECKPOINT_OR_MODEL is a checkpoint file (a state dict, or a dict holding one
under 'state_dict' or 'model'; 'module.' prefixes are fine), whose
'<layer>.mean_weight' / '<layer>.var_weight' logits are read directly, without
building the model; or 'package.module:callable', a callable returning a model
(e.g. one that builds it and loads trained weights). The CSV goes next to the
figure (same name, .csv) unless --csv says otherwise. Both are written
atomically.
"""
import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch import nn  # noqa: E402

from sn_plugin.plotting import (  # noqa: E402
    importance_weights_from_checkpoint, plot_importance_weights, save_importance_figure, write_importance_csv,
)
from sn_plugin.introspection import importance_weights  # noqa: E402


def load_weights(source: str):
    if os.path.isfile(source):
        return importance_weights_from_checkpoint(source)
    if ":" not in source:
        raise SystemExit(f"error: {source!r} is neither an existing checkpoint file nor 'module:callable'")
    module_name, _, attr = source.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"error: cannot load {source!r}: {e}")
    model = builder()
    if not isinstance(model, nn.Module):
        raise SystemExit(f"error: {source} returned a {type(model).__name__}, not a torch.nn.Module")
    weights = importance_weights(model)
    if not weights:
        raise SystemExit(f"error: the model built by {source} has no Switchable Normalization layers")
    return weights


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="CHECKPOINT_OR_MODEL",
                        help="checkpoint file, or 'package.module:callable' returning a model")
    parser.add_argument("--out", required=True, help="figure path (.png, .pdf, .svg)")
    parser.add_argument("--csv", help="CSV path (default: the figure's path with .csv)")
    parser.add_argument("--title", help="figure title (default: the source)")
    parser.add_argument("--dpi", type=int, default=130)
    args = parser.parse_args(argv)

    try:
        weights = load_weights(args.source)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    csv_path = args.csv or os.path.splitext(args.out)[0] + ".csv"
    figure = plot_importance_weights(weights, title=args.title or os.path.basename(args.source))
    save_importance_figure(figure, args.out, dpi=args.dpi)
    write_importance_csv(weights, csv_path)
    print(f"{len(weights)} SN layers: figure {args.out}, numbers {csv_path}")


if __name__ == "__main__":
    main()
