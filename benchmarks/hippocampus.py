"""Hippocampus benchmark: the U-Net config under a fixed CPU budget, scored on 40 test cases.

Fixed split of ../shared/data/hippocampus (seed 0: 40 test cases; of the other 160,
16 validate and 144 train), the config's training budget (default 30 minutes), then the
best checkpoint predicts the 40 test volumes on their native grid and they are scored per
class (Dice, HD95). Prints JSON lines; logs the run to mlflow.

Usage:
    python -m benchmarks.hippocampus [--data ../shared/data/hippocampus] [--config ...] [key=value ...]
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import add_hippocampus_args, emit, machine

from imgx3d.config import load_config
from imgx3d.training.workflow import train_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_hippocampus_args(parser)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--experiment", default="bench-hippocampus")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"tracking.experiment={args.experiment}", *args.overrides])
    t0 = time.perf_counter()
    result = train_run(cfg, args.data, args.run_dir)
    wall = time.perf_counter() - t0
    method = cfg.method.name
    summary = result.test_summary
    emit(f"hippocampus.{method}.setup", None, "", machine=machine(), run_id=result.run_id,
         split="seed0: 144 train / 16 val / 40 test", budget_minutes=cfg.train.max_minutes)
    emit(f"hippocampus.{method}.train_steps", result.steps, "steps", stop_reason=result.stop_reason)
    emit(f"hippocampus.{method}.wall_minutes", round(wall / 60, 2), "min", note="training + validation + test prediction")
    for name, stats in summary["per_class"].items():
        for metric, unit in (("dice", "dice"), ("hd95", "mm")):
            emit(f"hippocampus.{method}.test.{metric}.{name}", round(stats[metric]["mean"], 4), unit,
                 std=round(stats[metric]["std"], 4), cases=summary["cases"])
    emit(f"hippocampus.{method}.test.dice.foreground_mean", round(summary["foreground_mean"]["dice"], 4), "dice",
         target=0.87, reference="nnU-Net 3d_fullres ~0.89-0.90 (full GPU training, literature, not measured here)")
    emit(f"hippocampus.{method}.test.seconds_per_volume", round(summary["seconds_per_volume"], 4), "s")


if __name__ == "__main__":
    main()
