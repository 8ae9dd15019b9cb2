"""How good are the uncertainty maps of ``imgx3d predict --uncertainty``? JSON lines, per prediction source.

For each ``--source NAME=RUN[,RUN...]`` (one run: its own TTA members; several: an ensemble of them)
the test split of the first run (its ``split.json``) is predicted with ``--uncertainty
--probabilities`` into ``--out/NAME`` and scored against the reference labels
(:mod:`imgx3d.evaluation.uncertainty`): ECE of the probabilities, the AUC of the voxel entropy
for finding errors, the Spearman correlation of per-case foreground uncertainty with Dice, and
the mean foreground Dice. ``--samples N`` sets ImgX's ``method.num_samples`` for its sources.

Usage:
    python -m benchmarks.uncertainty --data ../shared/data/hippocampus \\
        --source unet_tta=runs/hippocampus/unet-A --source ensemble=runs/A,runs/B \\
        --source imgx4=runs/hippocampus/imgx-C --samples 4 [--out runs/bench-uncertainty]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from benchmarks.common import emit, machine

from imgx3d.checkpoint import load_checkpoint
from imgx3d.data.catalog import Split, find_cases
from imgx3d.evaluation.metrics import evaluate_folders
from imgx3d.evaluation.uncertainty import evaluate_uncertainty_folders
from imgx3d.inference.folder import predict_to_folder
from imgx3d.inference.predictor import Predictor


def checkpoint_with_samples(run: Path, samples: int):
    """The run's best.pt, with ImgX's ``num_samples`` set to ``samples`` (other methods unchanged)."""
    checkpoint = load_checkpoint(run / "best.pt")
    if samples and hasattr(checkpoint.config.method, "num_samples"):
        method = dataclasses.replace(checkpoint.config.method, num_samples=samples)
        checkpoint = dataclasses.replace(checkpoint, config=dataclasses.replace(checkpoint.config, method=method))
    return checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--source", action="append", required=True, metavar="NAME=RUN[,RUN...]")
    parser.add_argument("--samples", type=int, default=0, help="ImgX's method.num_samples (0: the run's own)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-uncertainty"))
    parser.add_argument("--cases", type=int, default=0, help="the first N test cases only (0: all)")
    args = parser.parse_args()
    emit("uncertainty.setup", None, "", machine=machine(), sources=args.source, samples=args.samples)
    for source in args.source:
        name, runs = source.split("=", 1)
        run_dirs = [Path(r) for r in runs.split(",")]
        checkpoints = [checkpoint_with_samples(r, args.samples) for r in run_dirs]
        predictor = Predictor.from_checkpoints(checkpoints, device=args.device)
        split = Split(**json.loads((run_dirs[0] / "split.json").read_text(encoding="utf-8")))
        test = split.test[:args.cases] if args.cases else split.test
        catalog = find_cases(args.data, predictor.config.data)
        cases = catalog.by_id()
        out = args.out / name
        refs = out / "references"
        refs.mkdir(parents=True, exist_ok=True)
        for case_id in test:  # the references under the predictions' names
            link = refs / f"{case_id}.nii.gz"
            if not link.exists():
                link.symlink_to(Path(cases[case_id].label).resolve())
        inputs = out / "images"
        inputs.mkdir(exist_ok=True)
        for case_id in test:
            link = inputs / f"{case_id}.nii.gz"
            if not link.exists():
                link.symlink_to(Path(cases[case_id].images[0]).resolve())
        t0 = time.perf_counter()
        predict_to_folder(predictor, [inputs], out / "predictions", probabilities=True, uncertainty=True)
        seconds = (time.perf_counter() - t0) / len(test)
        rows, summary = evaluate_folders(out / "predictions", refs, catalog.labels, out / "predictions",
                                         data_cfg=predictor.config.data)
        result = evaluate_uncertainty_folders(out / "predictions", refs, out / "predictions", rows,
                                              predictor.config.data)
        members = sorted({int(line.split(",")[3]) for line in
                          (out / "predictions" / "uncertainty.csv").read_text().splitlines()[1:]})
        emit(f"uncertainty.{name}", round(result["error_auc"], 4), "error AUC of the voxel entropy",
             ece=None if result["ece"] is None else round(result["ece"], 4),
             spearman_dice=round(result["spearman_dice"], 3), spearman_p=float(f"{result['spearman_p']:.3g}"),
             dice=round(summary["foreground_mean"]["dice"], 4),
             cases=result["cases"], members=members, seconds_per_case=round(seconds, 2),
             runs=[str(r) for r in run_dirs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
