"""ImgX-DiffSeg ablation on hippocampus, against the 3D U-Net, same split and same CPU budget.

Runs, all in one mlflow experiment:
    unet              the baseline (configs/hippocampus/unet.yaml)
    imgx_k5_max       ImgX K = 5, recycling max (default)
    imgx_k5_next      ImgX K = 5, recycling next (v0.1)
    imgx_k5_none      ImgX K = 5, no recycling
    imgx_t1001_k5     ImgX trained on the 1001-step chain (plain DDPM training, no recycling),
                      sampled with the K = 5 resampled chain: the misalignment the paper fixes
    imgx_up2, imgx_up2_seed1, imgx_k5_max_seed1
                      (not in the default set) ``method.up_subunits: 2`` (the up path before issue 21)
                      against the default 1 (MONAI UNet's up path, cheaper), two seeds each
    imgx_dice_present, imgx_dice_present_seed1
                      (not in the default set) ``method.dice_over: present``, the authors' Dice
                      without the classes absent from a sample, against imgx_k5_max(_seed1)

Every run gets ``--minutes`` of training (``train.max_minutes``; the configs anneal their LR
over the budget) and is scored on the 40 test volumes on their native grid. With
``--parallel N`` the runs train N at a time in child processes of ``--threads`` threads each;
``--clock cpu`` then makes the budget each process's own CPU time, so runs sharing the
machine get the same compute whatever else is running (data loading moves in-process for
that). Afterwards, in this one process, each best checkpoint predicts the preprocessed test
volumes without TTA and its seconds per volume are divided by the U-Net's (one
sliding-window pass). Prints JSON lines.

Usage: python -m benchmarks.imgx_ablation [--minutes 30] [--runs unet imgx_k5_max ...]
       python -m benchmarks.imgx_ablation --parallel 2 --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import add_hippocampus_args, emit, emit_test_summary, machine, save_train_result, train_in_children

from imgx3d.config import load_config
from imgx3d.data.catalog import find_cases
from imgx3d.data.transforms import Preprocessor
from imgx3d.inference.predictor import Predictor, predict_probabilities
from imgx3d.inference.windows import make_window
from imgx3d.training.workflow import train_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "hippocampus"
RUNS = {
    "unet": ("unet.yaml", []),
    "imgx_k5_max": ("imgx.yaml", ["method.recycling=max"]),
    "imgx_k5_next": ("imgx.yaml", ["method.recycling=next"]),
    "imgx_k5_none": ("imgx.yaml", ["method.recycling=none"]),
    "imgx_t1001_k5": ("imgx.yaml", ["method.train_steps=1001", "method.recycling=none"]),
    # the up path with two sub-units per residual unit (before issue 21) against the default one; two seeds
    "imgx_k5_max_seed1": ("imgx.yaml", ["method.recycling=max", "seed=1"]),
    "imgx_up2": ("imgx.yaml", ["method.up_subunits=2"]),
    "imgx_up2_seed1": ("imgx.yaml", ["method.up_subunits=2", "seed=1"]),
    # the authors' Dice (classes absent from a sample left out) against MONAI's (every class counts)
    "imgx_dice_present": ("imgx.yaml", ["method.dice_over=present"]),
    "imgx_dice_present_seed1": ("imgx.yaml", ["method.dice_over=present", "seed=1"]),
}
DEFAULT_RUNS = ["unet", "imgx_k5_max", "imgx_k5_next", "imgx_k5_none", "imgx_t1001_k5"]


def seconds_per_volume(run_dir: Path, images: list[torch.Tensor]) -> float:
    """Mean seconds of one whole-volume prediction (no TTA) over ``images``."""
    predictor = Predictor.load(run_dir / "best.pt", device="cpu")
    window = make_window(predictor.config.infer, predictor.config.data.patch_size)
    predict_probabilities(predictor.method, images[0], window)  # warm-up
    t0 = time.perf_counter()
    for image in images:
        predict_probabilities(predictor.method, image, window)
    return (time.perf_counter() - t0) / len(images)


def train_one(name: str, args: argparse.Namespace) -> dict:
    """Train and test one run; its figures are also saved to ``<out>/<name>/bench_result.json``."""
    config, extra = RUNS[name]
    overrides = [*extra, *args.set, f"train.max_minutes={args.minutes}", f"train.budget_clock={args.clock}",
                 f"tracking.experiment={args.experiment}"]
    if args.clock == "cpu":
        overrides.append("data.num_workers=0")  # a worker's CPU time would escape the budget
    cfg = load_config(CONFIGS / config, overrides)
    return save_train_result(train_run(cfg, args.data, Path(args.out) / name))


def train_parallel(args: argparse.Namespace) -> dict[str, dict]:
    """Train the runs ``--parallel`` at a time, each in a child process of ``--threads`` threads."""
    forwarded = [f"--{k}={getattr(args, k)}" for k in ("data", "minutes", "clock", "out", "experiment")]
    forwarded += [f"--set={item}" for item in args.set]
    return train_in_children(__spec__.name, args.runs, forwarded, Path(args.out), args.parallel, args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_hippocampus_args(parser, config=False)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="what the budget counts")
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS))
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once (child processes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per training run (0: default)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip training for runs whose <out>/<run>/bench_result.json exists (re-time only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (e.g. train.precision=fp32); repeatable")
    parser.add_argument("--train-one", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="runs/bench-imgx-ablation")
    parser.add_argument("--experiment", default="bench-hippocampus-imgx")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    if args.train_one:
        if args.threads:
            torch.set_num_threads(args.threads)
        train_one(args.train_one, args)
        return
    saved = {name: Path(args.out) / name / "bench_result.json" for name in args.runs}
    reused = {name: json.loads(path.read_text(encoding="utf-8")) for name, path in saved.items()
              if args.reuse and path.is_file()}
    args.runs = [name for name in args.runs if name not in reused]
    emit("imgx_ablation.setup", None, "", machine=machine(), minutes_per_run=args.minutes, clock=args.clock,
         parallel=args.parallel, threads_per_run=args.threads or threads,
         split="hippocampus seed0: 144 train / 16 val / 40 test",
         reused_runs=sorted(reused), overrides=args.set)
    if args.parallel > 1:
        results = train_parallel(args)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        results = {name: train_one(name, args) for name in args.runs}
        torch.set_num_threads(threads)
    results = {name: reused.get(name) or results[name] for name in saved}
    for name, result in results.items():
        emit_test_summary(f"imgx_ablation.{name}", result["test_summary"], steps=result["steps"],
                          stop_reason=result["stop_reason"], run_id=result["run_id"])

    # inference cost, all measured here, one after another, on the same preprocessed volumes
    run_dirs = {name: Path(r["run_dir"]) for name, r in results.items()}
    first = next(iter(run_dirs.values()))
    cfg = load_config(first / "config.yaml")
    catalog = find_cases(args.data, cfg.data)
    split = json.loads((first / "split.json").read_text(encoding="utf-8"))
    pre = Preprocessor(cfg.data)
    cases = catalog.by_id()
    images = [pre.load_case(cases[c], catalog.labels)["image"] for c in split["test"]]
    timing = {name: seconds_per_volume(run_dir, images) for name, run_dir in run_dirs.items()}
    for name, seconds in timing.items():
        extra = {"ratio_to_unet": round(seconds / timing["unet"], 2)} if "unet" in timing else {}
        emit(f"imgx_ablation.{name}.inference_seconds_per_volume", round(seconds, 4), "s", threads=threads, **extra)
    dice = {name: r["test_summary"]["foreground_mean"]["dice"] for name, r in results.items()}
    if {"unet", "imgx_k5_max"} <= set(dice):
        emit("imgx_ablation.dice_gap.imgx_k5_max_minus_unet", round(dice["imgx_k5_max"] - dice["unet"], 4), "dice",
             target=">= -0.01")
    up1 = [dice[n] for n in ("imgx_k5_max", "imgx_k5_max_seed1") if n in dice]
    up2 = [dice[n] for n in ("imgx_up2", "imgx_up2_seed1") if n in dice]
    if up1 and up2:
        emit("imgx_ablation.dice_gap.up_subunits_1_minus_2", round(sum(up1) / len(up1) - sum(up2) / len(up2), 4),
             "dice", up_subunits_1=[round(d, 4) for d in up1], up_subunits_2=[round(d, 4) for d in up2])
    if {"imgx_k5_max", "imgx_k5_none"} <= set(dice):
        emit("imgx_ablation.dice_gain.recycling_max_minus_none", round(dice["imgx_k5_max"] - dice["imgx_k5_none"], 4),
             "dice", target=">= 0")


if __name__ == "__main__":
    main()
