"""Cross-validation benchmark: a 5-fold ensemble (with learned postprocessing) vs one run, same compute.

nnU-Net's workflow in imgx3d on ../shared/data/hippocampus: the same 40 test cases (seed 0,
``test_fraction`` 0.2) for both arms; the single run trains on the holdout split (144 train /
16 validation) for ``--single-minutes``; the cross-validation cuts the other 160 cases into
``--folds`` folds (128 train / 32 validation each) and trains each for ``--fold-minutes`` (5 × 6 =
30 minutes by default: the same total). The ensemble averages the folds' probabilities, and
its postprocessing is decided on all folds' validation cases together. Both arms predict the
test cases with and without their learned postprocessing; the table and the paired Wilcoxon
tests are ``imgx3d compare``'s. Rerun with the same ``--out`` to reuse finished runs.

Usage:
    python -m benchmarks.crossval [--data DIR] [--folds 5] [--fold-minutes 6] [--single-minutes 30]
                                     [--clock cpu --threads 1] [--out runs/bench-cv]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import add_hippocampus_args, emit, machine

from imgx3d.config import load_config
from imgx3d.data.catalog import find_cases
from imgx3d.evaluation.compare import compare, to_markdown
from imgx3d.evaluation.cv import records_from_folder, summarise
from imgx3d.evaluation.metrics import evaluate_folders
from imgx3d.evaluation.records import RunRecord
from imgx3d.inference.folder import prediction_path, write_prediction
from imgx3d.inference.predictor import Predictor
from imgx3d.training.folds import train_folds
from imgx3d.training.workflow import RESULT_FILE, train_run


def _timed(fn) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - wall) / 60, (time.process_time() - cpu) / 60


def predict_test(predictor: Predictor, catalog, test: list[str], out: Path, name: str) -> tuple[RunRecord, float]:
    """Predict and score the test cases; the run's record for ``compare`` and the seconds per volume."""
    cases = catalog.by_id()
    pred_dir, ref_dir = out / "predictions" / name, out / "references"
    ref_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for case_id in test:
        prediction = predictor.predict_files(cases[case_id].images)
        write_prediction(prediction, prediction_path(pred_dir, case_id, predictor.config.data), predictor.codec)
        link = ref_dir / f"{case_id}.nii.gz"
        if not link.exists():
            link.symlink_to(Path(cases[case_id].label).resolve())
    seconds = (time.perf_counter() - t0) / len(test)
    rows, _ = evaluate_folders(pred_dir, ref_dir, catalog.labels, output_dir=out / "metrics" / name,
                               data_cfg=predictor.config.data)
    cases_metrics = {(r["case"], r["name"]): {m: r[m] for m in ("dice", "iou", "hd95", "nsd")} for r in rows}
    return RunRecord(name, name, "unet", seconds, float("nan"), float("nan"), float("nan"), cases_metrics), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_hippocampus_args(parser)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold-minutes", type=float, default=6.0)
    parser.add_argument("--single-minutes", type=float, default=30.0)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench-cv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    common = [f"train.budget_clock={args.clock}", "tracking.enabled=false"]
    if args.clock == "cpu":
        common.append("data.num_workers=0")  # a worker's CPU time would escape the budget
    emit("cv_bench.setup", None, "", machine=machine(), folds=args.folds, fold_minutes=args.fold_minutes,
         single_minutes=args.single_minutes, clock=args.clock, threads=args.threads,
         split="hippocampus seed0: 40 test; single: 144 train / 16 val; folds: 128 train / 32 val")

    single_dir = out / "single"
    if not (single_dir / RESULT_FILE).is_file():
        cfg = load_config(args.config, [f"train.max_minutes={args.single_minutes}", *common])
        _, wall, cpu = _timed(lambda: train_run(cfg, args.data, single_dir))
        emit("cv_bench.single.train_minutes", round(wall, 2), "min", cpu_minutes=round(cpu, 2),
             note="training, validation, postprocessing decision and test scoring")
    result = json.loads((single_dir / RESULT_FILE).read_text(encoding="utf-8"))
    emit("cv_bench.single.steps", result["steps"], "steps", best_val_dice=round(result["best_val_dice"], 4))

    cfg = load_config(args.config, [f"train.max_minutes={args.fold_minutes}", *common])
    _, wall, cpu = _timed(lambda: train_folds(cfg, args.data, args.folds, list(range(args.folds)), out / "cv"))
    emit("cv_bench.folds.train_minutes", round(wall, 2), "min", cpu_minutes=round(cpu, 2),
         note="all folds trained by this call (0 when reused)")
    for summary in summarise(records_from_folder(out / "cv")):
        for row in summary.rows:
            fold_result = json.loads((Path(row.run) / RESULT_FILE).read_text(encoding="utf-8"))
            emit(f"cv_bench.fold{row.fold}.val_dice", round(row.val_dice, 4), "dice", steps=fold_result["steps"],
                 test_dice=round(row.test_dice, 4), val_dice_postprocessed=round(row.val_dice_postprocessed, 4))
        mean, std = summary.mean_std("val_dice")
        emit("cv_bench.cv.val_dice_mean", round(mean, 4), "dice", std=round(std, 4), folds=len(summary.rows))

    catalog = find_cases(args.data, cfg.data)
    test = json.loads((single_dir / "split.json").read_text(encoding="utf-8"))["test"]
    records = []
    for arm, source in (("single", single_dir), ("ensemble", out / "cv")):
        for post in (True, False):
            predictor = Predictor.load(source, device="cpu", postprocess=post)
            name = f"{arm}{'' if post else '_raw'}"
            record, seconds = predict_test(predictor, catalog, test, out, name)
            records.append(record)
            dice = sum(record.case_means("dice").values()) / len(test)
            emit(f"cv_bench.{name}.test.dice.foreground_mean", round(dice, 4), "dice",
                 seconds_per_volume=round(seconds, 3), models=len(predictor.members),
                 postprocessing=predictor.postprocessing.to_json() if post else None)
    comparison = compare(records, "dice", reference="single")
    for row in comparison.paired:
        emit(f"cv_bench.paired.{row['run']}_vs_single.{row['class']}", round(row["mean_difference"], 4), "dice",
             p_value=float(f"{row['p_value']:.3g}"), n_cases=row["n_cases"], test="Wilcoxon signed-rank")
    table = to_markdown(comparison)
    (out / "table.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
