"""How the benchmarks time things: every variant once per round, round after round (A B A B ...),
so that a change in the machine's load during the run affects every variant alike; the median
of the rounds per variant. Imports nothing beyond the standard library."""
import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional

__all__ = ["interleaved_medians", "interleaved_times"]


def interleaved_times(functions: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 0,
                      prepare: Optional[Callable[[str, int], None]] = None,
                      synchronize: Optional[Callable[[], None]] = None) -> Dict[str, List[float]]:
    """Seconds of each call of each function, per name, over ``rounds`` rounds after ``warmup``
    untimed ones. ``prepare(name, round_index)`` runs before a call, untimed (e.g. to set a backend
    or a seed); ``synchronize()`` runs just before and after it, inside the timing (e.g. to wait
    for a GPU)."""
    times: Dict[str, List[float]] = {name: [] for name in functions}
    for round_index in range(warmup + rounds):
        for name, function in functions.items():
            if prepare is not None:
                prepare(name, round_index)
            if synchronize is not None:
                synchronize()
            started = time.perf_counter()
            function()
            if synchronize is not None:
                synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - started)
    return times


def interleaved_medians(functions: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 0,
                        prepare: Optional[Callable[[str, int], None]] = None,
                        synchronize: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """The median seconds per function of :func:`interleaved_times`."""
    return {name: statistics.median(values)
            for name, values in interleaved_times(functions, rounds, warmup, prepare, synchronize).items()}
