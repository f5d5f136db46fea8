"""Writing files so that nobody ever sees a half-written one."""
import os
import tempfile
from typing import IO, Callable


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = True) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``.

    A reader finds the old file, or none, or the complete new one; a failure (an
    exception, a full disk) removes the temporary file and leaves an existing
    ``path`` as it was. The result gets the permissions a plain ``open`` would
    give it (``mkstemp``'s private 0600 is not kept).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask."""
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask
