"""Prediction of one folder by 1 process against N processes sharing it with ``--part K/N``: cases/s, JSON lines.

Every configuration predicts the same folder from scratch into a folder of its own (the same
outputs: byte-identical, checked here), with ``torch`` threads split evenly between the processes
(``--threads`` in all), and is timed wall-clock from the first process's start to the last's end.

Usage:
    python -m benchmarks.predict_parts --run runs/hippocampus/unet-A --input FOLDER [--processes 1 2] \\
        [--threads 2] [--out runs/bench-predict-parts]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks.children import Child, imgx3d, run_children
from benchmarks.common import emit, machine


def run_parts(run: str, inputs: Path, out: Path, processes: int, threads: int) -> float:
    """Wall seconds for ``processes`` processes predicting ``inputs`` into ``out`` (part k of n each)."""
    shutil.rmtree(out, ignore_errors=True)
    each = max(1, threads // processes)
    t0 = time.perf_counter()
    run_children([Child(f"part{k}", imgx3d("predict", "--run", run, "--input", str(inputs), "--output", str(out),
                                           *(["--part", f"{k}/{processes}"] if processes > 1 else [])), threads=each)
                  for k in range(processes)], parallel=processes)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-predict-parts"))
    args = parser.parse_args()
    cases = len([p for p in args.input.iterdir() if p.name.endswith((".nii", ".nii.gz"))])
    emit("predict_parts.setup", None, "", machine=machine(), run=args.run, cases=cases, threads=args.threads)
    outputs = {}
    for n in args.processes:
        seconds = run_parts(args.run, args.input, args.out / f"p{n}", n, args.threads)
        outputs[n] = {p.name: p.read_bytes() for p in sorted((args.out / f"p{n}").glob("*.nii.gz"))}
        emit(f"predict_parts.processes_{n}", round(cases / seconds, 3), "cases/s", seconds=round(seconds, 1),
             threads_per_process=max(1, args.threads // n), identical_to_first=outputs[n] == outputs[args.processes[0]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
