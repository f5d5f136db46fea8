"""The one exception every checkpoint conversion raises for bad input."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the key, the problem and the fix."""
