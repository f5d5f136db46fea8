"""What every benchmark and the demo share: atomic file writes and a record of the run's machine."""
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from typing import Dict, Iterable, List, Sequence


def write_atomically(path: str, data, binary: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader never sees a half-written file: it finds the old one, or none, or the new one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would otherwise stay on the result
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
