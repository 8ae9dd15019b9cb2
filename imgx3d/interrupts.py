"""SIGTERM and SIGINT as requests to stop at the next safe point.

A batch scheduler (SLURM preemption, Kubernetes eviction) sends SIGTERM some time before it
kills; a user at a terminal presses Ctrl-C (SIGINT). Inside :func:`stop_on_signals` the first
of these only records the request: the long loops (training steps, cases of ``predict``,
blocks of ``synth``) call :func:`requested` where stopping loses nothing — after a step, a
written case — save what they hold and raise :class:`~imgx3d.errors.Interrupted`, which the
CLI prints as one line and turns into exit code 128 + signal (143, 130). A second signal
raises at once: every file is written to a temp name and renamed, so no half-written file
ever carries a final name, whichever instruction the exception interrupts.

Outside :func:`stop_on_signals` (imgx3d used as a library) nothing is installed and
:func:`requested` is always None: the caller's own signal handling stays in charge.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from imgx3d.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []


def requested() -> int | None:
    """The signal number whose stop request is pending, or None."""
    return _received[0] if _received else None


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15."""
    return signal.Signals(signum).name


def _handler(signum: int, frame) -> None:
    if _received:
        raise Interrupted(f"stopped at once by a second {signal_name(signum)}; files under their final names are "
                          "complete, run the same command (or --resume) to continue", signum)
    _received.append(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM / SIGINT into stop requests while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _received.clear()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()


def raise_if_requested(what: str) -> None:
    """Raise :class:`Interrupted` for a pending request; ``what`` completes "…stopped: <what>"."""
    signum = requested()
    if signum is not None:
        raise Interrupted(f"{signal_name(signum)} received; stopped: {what}", signum)
