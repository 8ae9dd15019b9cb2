"""Test-time augmentation of trained runs: the same checkpoints, scored under each inference variant.

Training is untouched, so one set of trained runs (e.g. ``benchmarks/recipe.py``'s
``runs/bench-recipe/fullres16.seed0`` and ``.seed1``) serves every variant, and the differences
are the variants' alone. Each run's ``best.pt`` predicts its validation and test cases (its own
``split.json``; its learned postprocessing applied, as ``imgx3d predict`` does) under:

    flips       the run's ``infer.tta_flips``, no shifts (``infer.tta_shifts: 1``): the baseline
    shifts2     the same mirrorings at 2 phase shifts (0 and 1 voxel along every axis)
    shifts4     at 4 phase shifts (0 … 3 voxels)

and, with two runs or more, their ensemble (class probabilities averaged: a second model trained for
the same time, the other way of spending more inference passes) under ``flips``. Prints JSON lines:
foreground-mean Dice per run, variant and split, each variant's mean over the runs, and its
difference from ``flips`` with the per-run differences.

Usage: python -m benchmarks.tta runs/bench-recipe/fullres16.seed0 runs/bench-recipe/fullres16.seed1
       [--variants shifts2] [--flips 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import HIPPOCAMPUS, emit, machine

from imgx3d.data.catalog import find_cases
from imgx3d.data.io import read_label
from imgx3d.evaluation.metrics import score_case
from imgx3d.inference.predictor import Predictor

SHIFTS = {"flips": 1, "shifts2": 2, "shifts4": 4}


def foreground_dice(predictor: Predictor, data: Path, case_ids: list[str]) -> tuple[float, float]:
    """Mean over cases and foreground classes of the Dice of ``predictor``'s label maps, and the seconds per case."""
    cases = find_cases(data, predictor.config.data).by_id()
    classes = [c for c in predictor.labels if c != 0]
    scores = []
    t0 = time.perf_counter()
    for case_id in case_ids:
        labels = predictor.predict_case(predictor.read(cases[case_id].images)).labels.array
        reference = read_label(cases[case_id].label, predictor.config.data).array
        scores += [m["dice"] for m in score_case(labels, reference, classes, metrics=("dice",)).values()]
    return float(np.mean(scores)), (time.perf_counter() - t0) / len(case_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (best.pt, split.json); the same split")
    parser.add_argument("--data", type=Path, default=HIPPOCAMPUS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", choices=list(SHIFTS), default=list(SHIFTS),
                        help="the variants scored besides flips, the baseline (a K-step diffusion method pays K passes "
                             "for each: shifts4 is 4x flips)")
    parser.add_argument("--flips", nargs="*", type=int, help="the mirrored axes of every variant instead of each run's "
                        "infer.tta_flips (e.g. 0 1 2: a hand config's full mirroring, against a plan that capped it)")
    args = parser.parse_args()
    flips = {} if args.flips is None else {"tta_flips": tuple(args.flips)}
    variants = {name: shifts for name, shifts in SHIFTS.items() if name == "flips" or name in args.variants}
    splits = [json.loads((run / "split.json").read_text(encoding="utf-8")) for run in args.runs]
    if any(s["test"] != splits[0]["test"] or s["val"] != splits[0]["val"] for s in splits):
        sys.exit("benchmarks/tta.py: the runs were trained on different splits; pass runs of one split")
    emit("tta.setup", None, "", machine=machine(), runs=[str(r) for r in args.runs], variants=variants,
         val_cases=len(splits[0]["val"]), test_cases=len(splits[0]["test"]))
    dice: dict[tuple[str, str, str], float] = {}
    for run in args.runs:
        for variant, shifts in variants.items():
            predictor = Predictor.load(run / "best.pt", device=args.device, tta_shifts=shifts, **flips)
            for part in ("val", "test"):
                value, seconds = foreground_dice(predictor, args.data, splits[0][part])
                dice[run.name, variant, part] = value
                emit(f"tta.{run.name}.{variant}.{part}.dice.foreground_mean", round(value, 4), "dice",
                     tta_flips=list(predictor.settings.tta_flips), tta_shifts=shifts,
                     seconds_per_case=round(seconds, 3))
    names = [run.name for run in args.runs]
    for part in ("val", "test"):
        for variant in variants:
            per_run = [dice[name, variant, part] for name in names]
            emit(f"tta.{variant}.{part}.dice.foreground_mean.run_mean", round(statistics.fmean(per_run), 4), "dice",
                 per_run=[round(d, 4) for d in per_run])
            if variant != "flips":
                gaps = [dice[name, variant, part] - dice[name, "flips", part] for name in names]
                emit(f"tta.{variant}_minus_flips.{part}.dice.foreground_mean", round(statistics.fmean(gaps), 4),
                     "dice", per_run=[round(g, 4) for g in gaps])
        if len(args.runs) > 1:
            ensemble = Predictor.load([run / "best.pt" for run in args.runs], device=args.device, tta_shifts=1,
                                      **flips)
            value, seconds = foreground_dice(ensemble, args.data, splits[0][part])
            single = statistics.fmean(dice[name, "flips", part] for name in names)
            emit(f"tta.ensemble_of_{len(names)}.flips.{part}.dice.foreground_mean", round(value, 4), "dice",
                 minus_single_run_mean=round(value - single, 4), seconds_per_case=round(seconds, 3))


if __name__ == "__main__":
    main()
