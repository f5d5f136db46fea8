"""Reading checkpoint files of every toolkit, writing them atomically, and a progress bar."""
import os
import pickle
import sys
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, TypeVar

import torch

from ..atomic import atomic_write
from ..state_dicts import inner_state_dict
from .errors import CheckpointError

T = TypeVar("T")


def load_file(path: str) -> Any:
    """The object saved in ``path``: a torch file, or a pickle (``.pkl``, detectron2's format).

    torch files are read with ``weights_only=True`` first; files whose extra
    entries (e.g. a numpy ``best_prec1``) need full unpickling are read again
    without it, which, as for any pickle, runs code from the file: convert only
    files you trust.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file at '{path}'")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "weights_only" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # any reader failure means the same thing to the user
        raise CheckpointError(
            f"'{path}' is not a checkpoint that torch.load{' or pickle' if path.endswith('.pkl') else ''} "
            f"can read ({type(err).__name__}: {err}). Pass the .pth/.pkl file the model was saved to."
        ) from err


def state_dict_of(obj: Any, source: str) -> Dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: its ``state_dict`` (released, mmengine), ``model``
    (detectron2), ``module`` or the dict itself; numpy arrays (detectron2 ``.pkl``) become tensors."""
    if isinstance(obj, Mapping):
        obj = inner_state_dict(obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    state: Dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            state[key] = value
        elif type(value).__module__ == "numpy" and hasattr(value, "shape"):
            state[key] = torch.as_tensor(value)
    if not state:
        raise CheckpointError(f"{source} holds no tensors: it is not a model checkpoint")
    return state


def atomic_save(obj: Any, path: str, pickle_format: bool = False) -> None:
    """Save ``obj`` (``torch.save``, or pickle for detectron2's ``.pkl``) atomically: a
    failure leaves no half-written file, and an existing ``path`` stays intact until the end."""
    if pickle_format:
        atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))
    else:
        atomic_write(path, lambda f: torch.save(obj, f))


def progress(items: Iterable[T], total: int, desc: str, enabled: bool) -> Iterator[T]:
    """``items`` with a progress bar on stderr when ``enabled``: tqdm's if installed, else a
    line updated every 10 percent."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc=desc, unit="tensor", file=sys.stderr)
        return
    step = max(1, total // 10)
    for i, item in enumerate(items, start=1):
        yield item
        if i % step == 0 or i == total:
            sys.stderr.write(f"\r{desc}: {i}/{total} tensors")
            sys.stderr.flush()
    sys.stderr.write("\n")


def same_file(a: str, b: Optional[str]) -> bool:
    return b is not None and os.path.exists(b) and os.path.samefile(a, b)
