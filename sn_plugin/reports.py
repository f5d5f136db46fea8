"""What the training reports and the benchmarks write: files written atomically, a record of the machine,
markdown tables, mean and spread over seeds, the training curve and pictures of detections.

The paper's Fig. 7 (importance weights) lives in :mod:`sn_plugin.plotting`.
matplotlib and Pillow are imported only when something is drawn.
"""
import io
import json
import math
import os
import platform
import statistics
import sys
from importlib import metadata
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .atomic import atomic_write

__all__ = [
    "DrawnObject", "draw_objects", "format_mean_spread", "machine_record", "markdown_table", "mean_and_spread",
    "plot_training_curve", "save_figure_atomically", "save_image_grid", "write_atomically", "write_json_atomically",
]

# Distinct colours for classes (cycled when there are more classes).
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))
IGNORED_COLOUR = (160, 160, 160)
# (class index, or None for a region ignored in evaluation (COCO's crowd); score; box [x, y, w, h] in image pixels;
# bool (H, W) mask or None)
DrawnObject = Tuple[Optional[int], float, Sequence[float], Optional[object]]


# -- files --------------------------------------------------------------------------------------------------------

def write_atomically(path: str, data, binary: bool = False) -> None:
    """Write ``data`` to ``path`` so that a reader never sees a half-written file."""
    atomic_write(path, lambda f: f.write(data), binary=binary)


def write_json_atomically(path: str, payload) -> None:
    write_atomically(path, json.dumps(payload, indent=2) + "\n")


def save_figure_atomically(figure, path: str, **savefig_kwargs) -> None:
    """``figure.savefig`` through a temporary file and a rename (see :func:`write_atomically`)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=os.path.splitext(path)[1].lstrip(".") or "png", **savefig_kwargs)
    write_atomically(path, buffer.getvalue(), binary=True)


def machine_record(packages: Iterable[str] = ("torch", "numpy")) -> Dict[str, object]:
    """Machine and package versions, for a results file to say where its numbers come from."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            module = sys.modules.get(name)
            versions[name] = getattr(module, "__version__", "not installed") if module else "not installed"
    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def machine_line(record: Dict[str, object], wall_seconds: float) -> str:
    """The closing line of a results file: machine, versions, wall time and the command that wrote it."""
    versions = ", ".join(f"{name} {version}" for name, version in record["versions"].items())
    return (f"Machine: {record['processor']} ({record['cpu_count']} CPUs), {record['platform']}; versions: {versions}; "
            f"wall time {wall_seconds / 60:.1f} min; command: `{record['command']}`.\n")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- tables -------------------------------------------------------------------------------------------------------

def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines: List[str] = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mean_and_spread(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean, sample standard deviation (None for fewer than 2 values), min and max of the values that are not None."""
    present = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not present:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(present), "mean": statistics.fmean(present),
            "std": statistics.stdev(present) if len(present) > 1 else None,
            "min": min(present), "max": max(present)}


def format_mean_spread(summary: Dict[str, Optional[float]], digits: int = 1) -> str:
    """``mean ± std`` (or just the mean for one value; ``n/a`` for none)."""
    if summary["mean"] is None:
        return "n/a"
    if summary["std"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


# -- figures ------------------------------------------------------------------------------------------------------

def plot_training_curve(rows: Sequence[Dict[str, float]], path: str, title: str) -> None:
    """Losses (``loss`` and every ``loss_*``) and the learning rate (``lr``) against ``step``, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if "loss" in row]
    if not rows:
        raise ValueError(f"no training losses to draw in {path}")
    steps = [row["step"] for row in rows]
    figure, (losses, rate) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[3, 1]))
    for key in ["loss"] + sorted(k for k in rows[0] if k.startswith("loss_")):
        losses.plot(steps, [row.get(key) for row in rows], label=key, linewidth=2.2 if key == "loss" else 1.2)
    losses.set_xlabel("iteration")
    losses.set_ylabel("training loss (window average)")
    losses.set_title(title)
    losses.legend(fontsize=8, ncol=2)
    losses.grid(alpha=0.3)
    rate.plot(steps, [row.get("lr") for row in rows], color="black")
    rate.set_xlabel("iteration")
    rate.set_title("learning rate")
    rate.grid(alpha=0.3)
    figure.tight_layout()
    save_figure_atomically(figure, path, dpi=110)
    plt.close(figure)


def draw_objects(image, objects: Sequence[DrawnObject], class_names: Sequence[str], show_scores: bool,
                 display_side: int = 384):
    """A PIL picture of an (H, W, 3) uint8 image, scaled so its longer side is ``display_side``, with each
    object's mask tinted in its class colour and its box outlined and labelled (with the score if asked);
    ignored regions in grey."""
    import numpy as np
    from PIL import Image, ImageDraw

    canvas = np.asarray(image, dtype=np.float32).copy()
    for label, _, _, mask in objects:
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            canvas[mask] = 0.45 * canvas[mask] + 0.55 * np.array(_colour(label))
    scale = display_side / max(canvas.shape[:2])
    picture = Image.fromarray(canvas.astype(np.uint8)).resize(
        (max(1, round(canvas.shape[1] * scale)), max(1, round(canvas.shape[0] * scale))),
        Image.NEAREST if scale >= 1 else Image.BILINEAR)
    draw = ImageDraw.Draw(picture)
    for label, score, (x, y, w, h), _ in objects:
        box = [x * scale, y * scale, (x + w) * scale, (y + h) * scale]
        draw.rectangle(box, outline=_colour(label), width=2)
        name = "ignored" if label is None else class_names[label]
        text = f"{name} {score:.2f}" if show_scores else name
        left, top, right, bottom = draw.textbbox((box[0] + 2, box[1] + 1), text)
        draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=(0, 0, 0))
        draw.text((box[0] + 2, box[1] + 1), text, fill=_colour(label))
    return picture


def _colour(label: Optional[int]) -> Tuple[int, int, int]:
    return IGNORED_COLOUR if label is None else PALETTE[label % len(PALETTE)]


def save_image_grid(rows: Sequence[Sequence[object]], column_titles: Sequence[str], path: str) -> None:
    """PIL pictures in a grid (one list per row, columns under ``column_titles``), as a PNG."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError(f"no pictures to put in {path}")
    width = max(picture.size[0] for row in rows for picture in row)
    heights = [max(picture.size[1] for picture in row) for row in rows]
    header, gap = 18, 6
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * (width + gap) - gap, sum(heights) + gap * (len(rows) - 1) + header),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(column_titles):
        draw.text((column * (width + gap) + 4, 3), title, fill=(0, 0, 0))
    top = header
    for row, height in zip(rows, heights):
        for column, picture in enumerate(row):
            grid.paste(picture, (column * (width + gap), top))
        top += height + gap
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    write_atomically(path, buffer.getvalue(), binary=True)
