"""What every benchmark and the demo share: atomic file writes and a record of the run's machine."""
import json
import os
import platform
import sys
from importlib import metadata
from typing import Dict, Iterable, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sn_plugin.atomic import atomic_write  # noqa: E402


def write_atomically(path: str, data, binary: bool = False) -> None:
    """Write ``data`` to ``path`` so that a reader never sees a half-written file."""
    atomic_write(path, lambda f: f.write(data), binary=binary)


def save_figure_atomically(figure, path: str, **savefig_kwargs) -> None:
    """``figure.savefig`` through a temporary file and a rename (see :func:`write_atomically`)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format=os.path.splitext(path)[1].lstrip(".") or "png", **savefig_kwargs)
    write_atomically(path, buffer.getvalue(), binary=True)


def write_json_atomically(path: str, payload) -> None:
    write_atomically(path, json.dumps(payload, indent=2) + "\n")


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


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines: List[str] = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
