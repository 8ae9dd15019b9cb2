"""What a user watching a run sees, on a terminal or in a log file.

On a terminal training shows a progress bar, with validation lines printed above it. When the
output is a file or a pipe (``imgx3d train ... > train.log 2>&1``, SLURM, ``nohup``, CI) bars
turn themselves off, so plain lines report instead: a step line every ~30 s (or every
``train.log_every`` steps), one line per validation, one line per predicted or synthesised case.
Every line is flushed as it is written. :func:`tee_to_file` keeps a copy of everything printed
(warnings included) in a run folder's ``train.log`` as it goes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PROGRESS_SECONDS = 30.0  # seconds between plain progress lines when nothing else sets it


def on_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default stdout) is an interactive terminal."""
    stream = stream or sys.stdout
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """``45s``, ``6m12s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def say(text: str, bar: Any = None) -> None:
    """Print one line now (above ``bar``, a tqdm bar, when one is showing)."""
    if bar is not None and not getattr(bar, "disable", True):
        bar.write(text)
    else:
        print(text, flush=True)


class CaseProgress:
    """``<what>: 3/40 cases, 1.2 s/case, ~45s left`` after every case (``predict``, ``synth``, ``plan``).

    Args:
        what: the line's prefix.
        total: the number of cases (or items) to do.
        unit: what is counted (``cases``, ``pairs``).
        enabled: False prints nothing (a torchrun rank other than 0).
    """

    def __init__(self, what: str, total: int, unit: str = "cases", enabled: bool = True):
        self.what, self.total, self.unit, self.enabled = what, total, unit, enabled
        self.done = 0
        self.start = time.monotonic()

    def advance(self, count: int = 1, note: str = "") -> None:
        """Count ``count`` more done and print the line (``note``: the case's name, a result)."""
        self.done += count
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        per = elapsed / max(self.done, 1)
        left = per * max(self.total - self.done, 0)
        say(f"{self.what}: {self.done}/{self.total} {self.unit}, {per:.2f} s/{self.unit.rstrip('s')}, "
            f"~{duration(left)} left" + (f" ({note})" if note else ""))


class _Tee:
    """A text stream that writes to ``stream`` and appends to ``copy`` (flushed per line). Text with a
    carriage return (a terminal's redrawn progress bar) goes to ``stream`` only."""

    def __init__(self, stream: IO[str], copy: IO[str]):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        if "\r" not in text:
            self.copy.write(text)
            if "\n" in text:
                self.copy.flush()
        return written

    def flush(self) -> None:
        self.stream.flush()
        self.copy.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding ...: the real stream's
        return getattr(self.stream, name)


@contextlib.contextmanager
def tee_to_file(path: Path, enabled: bool = True) -> Iterator[None]:
    """Inside the block, everything printed to stdout and stderr is also appended to ``path`` as it is
    written (a resumed run appends to its log). ``enabled`` False: nothing is copied."""
    if not enabled:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as copy:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, copy), _Tee(err, copy)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            sys.stdout, sys.stderr = out, err


def rank_prefix() -> str:
    """``[rank N] `` in a torchrun process other than rank 0 (whose lines are the run's), else ``""``."""
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and os.environ.get("RANK", "0") != "0":
        return f"[rank {os.environ['RANK']}] "
    return ""


def prefix_warnings_with_rank() -> None:
    """Under torchrun, other ranks' warnings reach stderr marked with their rank (rank 0 prints as usual)."""
    prefix = rank_prefix()
    if not prefix or getattr(warnings.showwarning, "imgx3d_rank", False):
        return
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
        shown(f"{prefix}{message}", category, filename, lineno, file, line)

    show.imgx3d_rank = True  # type: ignore[attr-defined]
    warnings.showwarning = show
