"""Reading state dicts however a trainer saved them."""
from typing import Mapping, Sequence

CHECKPOINT_KEYS = ("state_dict", "model", "module")  # mmengine / released files, detectron2, some trainers


def inner_state_dict(checkpoint: Mapping) -> Mapping:
    """The state dict inside a checkpoint (under one of ``CHECKPOINT_KEYS``), or the checkpoint itself."""
    for key in CHECKPOINT_KEYS:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            return inner
    return checkpoint


def strip_prefixes(key: str, prefixes: Sequence[str]) -> str:
    """``key`` without any of ``prefixes`` in front, however often and in whatever order they
    were stacked (e.g. ``module._orig_mod.`` from DDP around a compiled model)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key
