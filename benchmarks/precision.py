"""Does a trained run predict the same labels under bf16 / fp16 autocast as under fp32? JSON lines.

For each run folder (its ``best.pt`` and ``split.json``) the test split is predicted once per
precision on the native grid, and every precision is compared with fp32:

- ``agreement``: of the voxels that either prediction calls foreground, the share both label
  alike (issue 40's criterion: ≥ 99.5 %);
- ``dice``: mean foreground Dice against the reference labels, beside fp32's (criterion: within
  0.005), and seconds per volume.

Usage:
    python -m benchmarks.precision --data ../shared/data/hippocampus runs/hippocampus/sdseg-... \\
        [--precisions fp32 bf16 fp16] [--device cpu] [--cases 40]

On a CPU without bf16 instructions (AVX2 only) bf16 and fp16 run emulated: slow, and the figures
are those of the arithmetic, not the speed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import emit, machine

from imgx3d.data.catalog import Split, find_cases
from imgx3d.data.io import read_label
from imgx3d.evaluation.metrics import score_case
from imgx3d.inference.predictor import Predictor


def predict_split(run_dir: Path, data: Path, precision: str, device: str, cases: int,
                  inputs: list[Path] | None = None) -> dict:
    """Labels (class values), per-case foreground Dice and seconds per volume of the test split; or of
    ``inputs`` (files without references: a run trained without a test split, such as DARL's; no Dice)."""
    predictor = Predictor.load(run_dir / "best.pt", device=device, precision=precision)
    classes = [c for c in predictor.labels if c != 0]
    if inputs:
        todo = [(path.name, [path], None) for path in inputs[:cases]]
    else:
        split = Split(**json.loads((run_dir / "split.json").read_text(encoding="utf-8")))
        by_id = find_cases(data, predictor.config.data).by_id()
        todo = [(case_id, by_id[case_id].images, by_id[case_id].label) for case_id in split.test[:cases]]
    labels, dice, seconds = {}, [], 0.0
    for name, images, reference in todo:
        t0 = time.perf_counter()
        prediction = predictor.predict_files(images)
        seconds += time.perf_counter() - t0
        labels[name] = pred = prediction.labels.array
        if reference is not None:
            scores = score_case(pred, read_label(reference, predictor.config.data).array, classes, metrics=("dice",))
            dice.append(float(np.nanmean([scores[c]["dice"] for c in classes])))
    return {"labels": labels, "dice": float(np.mean(dice)) if dice else float("nan"),
            "seconds": seconds / max(len(labels), 1), "method": predictor.members[0].name}


def _rounded(value: float) -> float | None:
    """A Dice figure for a JSON line (None where there was nothing to score)."""
    return None if math.isnan(value) else round(value, 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (best.pt, split.json)")
    parser.add_argument("--data", type=Path, required=True, help="the dataset the runs were trained on")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cases", type=int, default=10**6, help="at most this many test cases")
    parser.add_argument("--inputs", type=Path, nargs="+", help="image files to predict instead of the test split "
                        "(agreement only: runs trained without a test split)")
    args = parser.parse_args()
    emit("precision.setup", None, "", machine=machine(), runs=[str(r) for r in args.runs], device=args.device)
    for run in args.runs:
        reference = predict_split(run, args.data, "fp32", args.device, args.cases, args.inputs)
        emit(f"precision.{run.name}.fp32.dice", _rounded(reference["dice"]), "mean foreground Dice",
             method=reference["method"], seconds_per_volume=round(reference["seconds"], 3),
             cases=len(reference["labels"]))
        for precision in [p for p in args.precisions if p != "fp32"]:
            other = predict_split(run, args.data, precision, args.device, args.cases, args.inputs)
            either = same = 0
            for case_id, ref_labels in reference["labels"].items():
                got = other["labels"][case_id]
                foreground = (ref_labels != 0) | (got != 0)
                either += int(foreground.sum())
                same += int((foreground & (ref_labels == got)).sum())
            emit(f"precision.{run.name}.{precision}.agreement", round(same / max(either, 1), 5),
                 "share of either-foreground voxels labelled alike", voxels=either, differing=either - same,
                 dice=_rounded(other["dice"]), dice_fp32=_rounded(reference["dice"]),
                 dice_change=_rounded(other["dice"] - reference["dice"]),
                 seconds_per_volume=round(other["seconds"], 3), method=reference["method"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
