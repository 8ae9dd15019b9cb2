"""ImgX-DiffSeg ablation on hippocampus, against the 3D U-Net, same split and same CPU budget.

Runs, all in one mlflow experiment:
    unet              the baseline (configs/hippocampus/unet.yaml)
    imgx_k5_max       ImgX K = 5, recycling max (default)
    imgx_k5_next      ImgX K = 5, recycling next (v0.1)
    imgx_k5_none      ImgX K = 5, no recycling
    imgx_t1001_k5     ImgX trained on the 1001-step chain (plain DDPM training, no recycling),
                      sampled with the K = 5 resampled chain: the misalignment the paper fixes

Every run gets ``--minutes`` of training (``train.max_minutes``; the configs anneal their LR
over the budget) and is scored on the 40 test volumes on their native grid. Afterwards, in this one process, each best checkpoint predicts
the preprocessed test volumes without TTA and its seconds per volume are divided by the
U-Net's (one sliding-window pass). Prints JSON lines.

Usage: python scripts/bench_imgx_ablation.py [--minutes 30] [--runs unet imgx_k5_max ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench import emit, machine  # noqa: E402

from imgx3d.config import load_config  # noqa: E402
from imgx3d.data.catalog import find_cases  # noqa: E402
from imgx3d.data.transforms import Preprocessor  # noqa: E402
from imgx3d.engine.infer import Predictor, make_window, predict_probabilities  # noqa: E402
from imgx3d.engine.workflow import train_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "hippocampus"
RUNS = {
    "unet": ("unet.yaml", []),
    "imgx_k5_max": ("imgx.yaml", ["method.recycling=max"]),
    "imgx_k5_next": ("imgx.yaml", ["method.recycling=next"]),
    "imgx_k5_none": ("imgx.yaml", ["method.recycling=none"]),
    "imgx_t1001_k5": ("imgx.yaml", ["method.train_steps=1001", "method.recycling=none"]),
}


def seconds_per_volume(run_dir: Path, images: list[torch.Tensor]) -> float:
    """Mean seconds of one whole-volume prediction (no TTA) over ``images``."""
    predictor = Predictor.from_checkpoint(run_dir / "best.pt", "cpu")
    window = make_window(predictor.config.infer, predictor.config.data.patch_size)
    predict_probabilities(predictor.method, images[0], window)  # warm-up
    t0 = time.perf_counter()
    for image in images:
        predict_probabilities(predictor.method, image, window)
    return (time.perf_counter() - t0) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hippocampus"))
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", default="runs/bench-imgx-ablation")
    parser.add_argument("--experiment", default="bench-hippocampus-imgx")
    args = parser.parse_args()
    emit("imgx_ablation.setup", None, "", machine=machine(), minutes_per_run=args.minutes,
         split="hippocampus seed0: 144 train / 16 val / 40 test")
    results = {}
    for name in args.runs:
        config, extra = RUNS[name]
        cfg = load_config(CONFIGS / config, [*extra, f"train.max_minutes={args.minutes}",
                                             f"tracking.experiment={args.experiment}"])
        result = train_run(cfg, args.data, Path(args.out) / name)
        results[name] = result
        summary = result.test_summary
        for cls, stats in summary["per_class"].items():
            emit(f"imgx_ablation.{name}.test.dice.{cls}", round(stats["dice"]["mean"], 4), "dice",
                 std=round(stats["dice"]["std"], 4))
            emit(f"imgx_ablation.{name}.test.hd95.{cls}", round(stats["hd95"]["mean"], 3), "mm",
                 std=round(stats["hd95"]["std"], 3))
        emit(f"imgx_ablation.{name}.test.dice.foreground_mean", round(summary["foreground_mean"]["dice"], 4), "dice",
             steps=result.steps, stop_reason=result.stop_reason, run_id=result.run_id)

    # inference cost, all measured here, one after another, on the same preprocessed volumes
    first = next(iter(results.values()))
    cfg = load_config(first.run_dir / "config.yaml")
    catalog = find_cases(args.data, cfg.data)
    split = json.loads((first.run_dir / "split.json").read_text(encoding="utf-8"))
    pre = Preprocessor(cfg.data)
    cases = catalog.by_id()
    images = [pre.load_case(cases[c], catalog.labels)["image"] for c in split["test"]]
    timing = {name: seconds_per_volume(r.run_dir, images) for name, r in results.items()}
    for name, seconds in timing.items():
        extra = {"ratio_to_unet": round(seconds / timing["unet"], 2)} if "unet" in timing else {}
        emit(f"imgx_ablation.{name}.inference_seconds_per_volume", round(seconds, 4), "s", **extra)
    if {"unet", "imgx_k5_max"} <= set(results):
        gap = (results["imgx_k5_max"].test_summary["foreground_mean"]["dice"]
               - results["unet"].test_summary["foreground_mean"]["dice"])
        emit("imgx_ablation.dice_gap.imgx_k5_max_minus_unet", round(gap, 4), "dice", target=">= -0.01")
    if {"imgx_k5_max", "imgx_k5_none"} <= set(results):
        gain = (results["imgx_k5_max"].test_summary["foreground_mean"]["dice"]
                - results["imgx_k5_none"].test_summary["foreground_mean"]["dice"])
        emit("imgx_ablation.dice_gain.recycling_max_minus_none", round(gain, 4), "dice", target=">= 0")


if __name__ == "__main__":
    main()
