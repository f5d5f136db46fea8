#!/usr/bin/env python
"""Console view of one set-up step's pip output: what is happening, progress, time left.

``scripts/setup_env.sh`` pipes each pip run through this filter (the full output goes
to the set-up log). Standard library only: it runs with the base interpreter.

* Default mode: pip's lines pass through (less pip's index-location noise).
* ``--build`` mode, for ``pip install -v`` of a package compiled from source (mmcv,
  this project's C++ extension): only pip's key lines pass through, and compile
  progress is shown instead of the compiler commands: files done out of the total
  from ninja's ``[done/total]`` lines (torch's extension builder runs ninja when it
  is installed), or a count of compiler commands without ninja, with the time
  elapsed and, once the total is known, an estimate of the time left.
* Both modes print a line after ``--heartbeat`` seconds without output (pip is
  silent while it downloads to a pipe and while it links), so a long step never
  looks stuck.
"""
import argparse
import queue
import re
import sys
import threading
import time
from typing import Callable, Optional, TextIO

NINJA = re.compile(r"^\s*\[(\d+)/(\d+)\]\s+(.*)$")  # pip -v indents the build's output
COMPILE = re.compile(r"(?:^|[\s/])(?:[\w.+-]*-)?(?:gcc|g\+\+|c\+\+|cc|clang\+\+|clang|nvcc)(?:-[\d.]+)?(?=\s)"
                     r".*?\s-c\s+(\S+\.(?:cpp|cc|cxx|c|cu))(?=\s|$)")
BUILD_START = re.compile(r"^\s*(Building wheel for|Building editable for|running build_ext)")
NOISE = re.compile(r"^WARNING: Location '.*' is ignored|^\[notice\]")
# pip's own lines that stay visible in --build mode (everything else is compiler chatter).
KEY = re.compile(r"^\s*(Collecting|Processing|Using cached|Downloading|Building wheel|Created wheel|Stored in "
                 r"directory|Successfully|Installing collected|Attempting uninstall|Building editable|Obtaining|ERROR|error:|\S*\.(?:cpp|cu|h):\d+:\d+: (?:fatal )?error)")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Turns a pip log into console lines; ``emit`` prints one line."""

    def __init__(self, label: str, build: bool, emit: Callable[[str], None], clock: Callable[[], float],
                 every: float = 10.0) -> None:
        self.label, self.build, self.emit, self.clock, self.every = label, build, emit, clock, every
        self.start = self.build_start = clock()
        self.compiled = 0
        self.total: Optional[int] = None
        self.last_report = float("-inf")

    def elapsed(self, now: Optional[float] = None) -> str:
        return _duration((self.clock() if now is None else now) - self.start)

    def line(self, text: str) -> None:
        text = text.rstrip("\n")
        if NOISE.search(text):
            return
        if BUILD_START.match(text) and not self.compiled:
            self.build_start = self.clock()  # the estimate leaves out pip's download and resolution
        ninja = NINJA.match(text)
        compiled = None if ninja else COMPILE.search(text)
        if ninja:
            self.compiled, self.total = int(ninja.group(1)), int(ninja.group(2))
            source = COMPILE.search(ninja.group(3))
            self._report(source.group(1) if source else None)
        elif compiled:  # a build without ninja: no total
            self.compiled, self.total = self.compiled + 1, None
            self._report(compiled.group(1))
        elif not self.build or KEY.search(text):
            self.emit(text)

    def _report(self, source: Optional[str]) -> None:
        now = self.clock()
        done = self.total is not None and self.compiled >= self.total
        if now - self.last_report < self.every and self.compiled > 1 and not done:
            return
        self.last_report = now
        what = f" ({source.rsplit('/', 1)[-1]})" if source else ""
        if self.total:
            left = (now - self.build_start) / self.compiled * (self.total - self.compiled)
            estimate = "" if done else f", about {_duration(left)} left"
            self.emit(f"[{self.label}] compiled {self.compiled}/{self.total} files{what}, "
                      f"{self.elapsed(now)} elapsed{estimate}")
        else:
            self.emit(f"[{self.label}] compiled {self.compiled} files{what}, {self.elapsed(now)} elapsed")

    def heartbeat(self) -> None:
        doing = f"compiling, {self.compiled} files done" if self.compiled else "working"
        self.emit(f"[{self.label}] still {doing}, {self.elapsed()} elapsed")

    def finish(self) -> None:
        if self.compiled:
            self.emit(f"[{self.label}] compiler finished after {self.elapsed()}")


def run(stream: TextIO, progress: Progress, heartbeat: float) -> None:
    """Feed ``stream``'s lines to ``progress``; a heartbeat after ``heartbeat`` silent seconds."""
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def read() -> None:
        for text in stream:
            lines.put(text)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    while True:
        try:
            text = lines.get(timeout=heartbeat)
        except queue.Empty:
            progress.heartbeat()
            continue
        if text is None:
            break
        progress.line(text)
    progress.finish()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="what the step installs, e.g. mmcv")
    parser.add_argument("--build", action="store_true", help="pip -v output of a source build: show progress")
    parser.add_argument("--heartbeat", type=float, default=60.0, help="seconds of silence before a status line")
    args = parser.parse_args(argv)

    def emit(text: str) -> None:
        print(text, flush=True)

    run(sys.stdin, Progress(args.label, args.build, emit, time.monotonic), args.heartbeat)


if __name__ == "__main__":
    main()
