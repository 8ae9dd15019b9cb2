"""The one way a benchmark starts child processes.

A child is ``python ARGV`` (``-m imgx3d train ...``, ``-m benchmarks.plan --arm hand ...``,
``-m torch.distributed.run ...``) with its own CPU thread count and its own log; children run
``parallel`` at a time, each once the children it waits for have finished. Children find the
``benchmarks`` package from any working directory (the repository root is put on their
``PYTHONPATH``), so relative paths in their arguments mean what they meant to the caller.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Child:
    """One child process.

    Attributes:
        name: names its log (``NAME.log``) and what other children wait for.
        argv: the arguments after the Python executable.
        threads: its OMP / MKL threads (None: the caller's environment).
        after: names of children that must finish first.
        env: extra environment variables.
    """

    name: str
    argv: list[str]
    threads: int | None = None
    after: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Finished:
    """A child that ran: its exit status, what it printed (stdout and stderr) and its wall seconds."""

    name: str
    returncode: int
    output: str
    seconds: float


def imgx3d(*args: str) -> list[str]:
    """The argv of ``python -m imgx3d ARGS``."""
    return ["-m", "imgx3d", *args]


def module(name: str, *args: str) -> list[str]:
    """The argv of ``python -m NAME ARGS`` (a benchmark re-running itself passes its ``__spec__.name``)."""
    return ["-m", name, *args]


def _environment(child: Child) -> dict[str, str]:
    env = {**os.environ, "GIT_PYTHON_REFRESH": "quiet", **child.env,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    if child.threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(child.threads)
    return env


def run_children(children: list[Child], *, parallel: int = 1, logs: Path | None = None, resume: bool = False,
                 check: bool = True, echo: bool = False) -> dict[str, Finished]:
    """Run ``children`` ``parallel`` at a time, each after the children named in its ``after``.

    Args:
        logs: folder of each child's ``NAME.log``; None: temporary files, removed afterwards.
        resume: skip a child whose ``logs/NAME.done`` exists and leave that file when one
            succeeds, so a benchmark run again goes on where it stopped (needs ``logs``).
        check: a failing child stops the others and the benchmark, naming its log.
        echo: print each child's output once it has finished (its JSON lines reach the caller's stdout).

    Returns:
        The children this call ran, by name, in the order they finished.

    Raises:
        SystemExit: with ``check``, a child exited non-zero (its name, exit status and log or last output).
    """
    if resume and logs is None:
        raise ValueError("resume needs a logs folder for its .done marks")
    folder = Path(tempfile.mkdtemp(prefix="bench-children-")) if logs is None else logs
    folder.mkdir(parents=True, exist_ok=True)
    pending = [c for c in children if not (resume and (folder / f"{c.name}.done").exists())]
    done = {c.name for c in children} - {c.name for c in pending}
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    finished: dict[str, Finished] = {}
    try:
        while pending or running:
            for child in [c for c in pending if set(c.after) <= done]:
                if len(running) >= parallel:
                    break
                pending.remove(child)
                with open(folder / f"{child.name}.log", "w", encoding="utf-8") as log:
                    proc = subprocess.Popen([sys.executable, *child.argv], stdout=log, stderr=subprocess.STDOUT,
                                            env=_environment(child))
                running[child.name] = (proc, time.perf_counter())
            if pending and not running:
                raise SystemExit(f"children wait on children that never run: {[c.name for c in pending]}")
            time.sleep(0.2)
            for name, (proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                path = folder / f"{name}.log"
                output = path.read_text(encoding="utf-8", errors="replace")
                finished[name] = Finished(name, proc.returncode, output, time.perf_counter() - t0)
                if echo:
                    print(output, end="", flush=True)
                if proc.returncode and check:
                    where = f"see {path}" if logs is not None else f"its output ends:\n{output[-3000:]}"
                    raise SystemExit(f"{name} failed (exit {proc.returncode}); {where}")
                done.add(name)
                if resume and not proc.returncode:
                    (folder / f"{name}.done").touch()
    finally:
        for proc, _ in running.values():
            proc.terminate()
        if logs is None:
            for path in folder.glob("*.log"):
                path.unlink()
            folder.rmdir()
    return finished


def last_json(finished: Finished) -> dict:
    """The last JSON line a child printed (a child benchmark's result)."""
    lines = [line for line in finished.output.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{finished.name} printed no JSON line; its output ends:\n{finished.output[-3000:]}")
    return json.loads(lines[-1])
