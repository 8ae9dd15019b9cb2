"""Region-based against label-based training (nnU-Net's regions on BraTS): same split, config and budget.

Two U-Net runs of the same config — one on the label maps (softmax over necrosis, edema,
non-enhancing, enhancing), one on overlapping regions (``data.regions``: sigmoid outputs for whole
tumour, tumour core, enhancing tumour) — train side by side (one thread each, CPU-time budgets)
and both are scored the BraTS way, per region, on the same test cases (the label run's maps
turned into the same regions). Prints JSON lines: steps, per-region test Dice of each run, and
the difference of the means.

Usage:
    python -m benchmarks.regions [--data ../shared/data/brats2015] [--config configs/brats/plan.yaml]
        [--minutes 15] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from benchmarks.children import REPO
from benchmarks.common import add_arm_args, train_arm_if_child, emit, emit_test_summary, machine, save_train_result, train_in_children

from imgx3d.config import load_config
from imgx3d.evaluation.metrics import evaluate_folders

RUNS = ("labels", "regions")
# BraTS 2015's labels (1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing) as the challenge scores them
BRATS_REGIONS = {"whole_tumour": [1, 2, 3, 4], "tumour_core": [1, 3, 4], "enhancing_tumour": [4]}
# the same for both runs: whole-volume test-time augmentation on 240 x 240 x 155 would cost more than training
SAME = ["infer.tta_flips=[]", "infer.tta_shifts=1", "data.num_workers=0", "train.max_steps=1000000"]


def train_one(name: str, args: argparse.Namespace) -> dict:
    """Train and test one run; its figures are also saved to ``<out>/<name>/bench_result.json``."""
    from imgx3d.training.workflow import train_run

    regions = [f"data.regions={json.dumps(BRATS_REGIONS)}"] if name == "regions" else []
    overrides = [f"train.max_minutes={args.minutes}", f"train.budget_clock={args.clock}",
                 f"tracking.experiment={args.experiment}", *SAME, *regions, *args.set]
    return save_train_result(train_run(load_config(args.config, overrides), args.data, Path(args.out) / name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "brats2015"))
    parser.add_argument("--config", default=str(REPO / "configs" / "brats" / "plan.yaml"))
    parser.add_argument("--minutes", type=float, default=15.0)
    add_arm_args(parser, "regions", RUNS)
    args = parser.parse_args()
    if train_arm_if_child(args, train_one):
        return
    emit("regions.setup", None, "", machine=machine(), minutes=args.minutes, clock=args.clock, config=args.config,
         regions=BRATS_REGIONS, overrides=[*SAME, *args.set])
    forwarded = [f"--{k}={getattr(args, k)}" for k in ("data", "config", "minutes", "clock", "out", "experiment")]
    results = train_in_children(__spec__.name, list(RUNS), forwarded + [f"--set={s}" for s in args.set],
                                Path(args.out), 2, args.threads)
    dice = {}
    for name, result in results.items():  # both scored per region on their own test predictions
        run_dir = Path(result["run_dir"])
        cfg = load_config(run_dir / "config.yaml")
        cfg.data.regions = BRATS_REGIONS
        _, summary = evaluate_folders(run_dir / "test_predictions", run_dir / "test_references", data_cfg=cfg.data,
                                      labels={0: "background", **{int(k): v for k, v in cfg.data.labels.items()}})
        emit_test_summary(f"regions.{name}", summary, steps=result["steps"], stop_reason=result["stop_reason"],
                          cases=summary["cases"], scored_as="BraTS regions")
        dice[name] = summary["foreground_mean"]["dice"]
    emit("regions.regions_minus_labels", round(dice["regions"] - dice["labels"], 4), "dice",
         cases=summary["cases"])


if __name__ == "__main__":
    main()
