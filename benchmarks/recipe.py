"""Recipe ablation of the hippocampus U-Net: arms × seeds, each the same CPU budget, the same split.

Every run is ``configs/hippocampus/unet.yaml`` with centred patches and no shifted predictions (``CENTRED``:
the recipe before this round's ``data.translate`` and ``infer.tta_shifts``), an arm's overrides and a seed (``seed=N``:
initialisation and patch sampling; the split stays seed 0's: 144 train / 16 val / 40 test),
trained for ``--minutes`` and scored on the 40 test volumes on their native grid. Runs train
``--parallel`` at a time in child processes of ``--threads`` threads; ``--clock cpu`` (the default)
makes each budget the process's own CPU time, so runs sharing the machine get the same compute.
Prints JSON lines: each run's test Dice, each arm's mean over the seeds, and each arm's
difference from the first arm (the baseline) with the per-seed differences.

Arms:
    fp32   the networks in fp32 (training and inference)
    bf16   bf16 autocast (training and inference): oneDNN's bf16 convolutions on CPUs with
           AVX512-BF16 / AMX; the loss, the optimiser and the weights stay fp32
    fullres8, fullres16, fullres32
           bf16 with a full-resolution level on top (strides [1, 2, 2, 2], 8, 16 or 32 features there):
           MONAI's UNet with strides [2, 2, 2] convolves the input with stride 2 at once, so no
           feature map sees the full 1 mm grid but the last up-convolution; nnU-Net's first stage
           is at full resolution
    fullres16_mirror3
           fullres16 mirrored along every axis in training and averaged over the 8 mirrorings at
           inference (nnU-Net's rule; the plan mirrors only axis 0 where class names carry a position)
    fullres16_nnunet_da
           fullres16_mirror3 with the rest of nnU-Net v2's default augmentation: rotation ±30° and
           scaling 0.7-1.3 with probability 0.2, and its intensity set (``data.intensity_scheme:
           nnunet``: noise, blur, brightness, contrast, simulated low resolution, gamma)
    fullres16_ema
           fullres16 validated, kept and tested with an exponential moving average of its weights
           (``train.ema`` 0.998, a ~500-step horizon, from step 500: a run of ~2 500 steps)
    fullres16_batch8
           fullres16 at batch 8 instead of 4 (nnU-Net: 9 on the hippocampus): half the steps in the
           budget, each on twice the patches (validation flattens by ~1 500 steps at batch 4)
    dynunet16
           bf16 MONAI DynUNet (nnU-Net's network: two conv-norm-LeakyReLU per level, transposed
           convolutions up) with features [16, 32, 64, 128], its first level at full resolution;
           nnU-Net's 32 at the top costs 2.6x fullres16's step time (~1 000 steps in 30 minutes)
    dynunet16_ds1
           dynunet16 with deep supervision on the half-resolution decoder level (weights 2/3, 1/3:
           nnU-Net's, whose coarsest head's zero weight leaves one head at 4 levels)
    fullres16_trainval
           fullres16 trained on the 16 validation cases too (160 cases, ``data.split.val_fraction: 0``;
           the test split is cut first, so it stays the same 40): no validation, so the last weights
           (the end of the cosine schedule, nnU-Net's final checkpoint) are tested and no
           postprocessing is learned (the validation runs kept none)
    fullres16_sgd
           fullres16 with nnU-Net's optimiser: SGD, Nesterov momentum 0.99, LR 1e-2 with poly (0.9)
           decay over the budget and no warmup, weight decay 3e-5, gradient norm clipped at 12
    fullres16_lr1e3
           fullres16 with AdamW's peak LR at 1e-3 instead of 2e-3 (the cosine's floor stays 1e-5)
    fullres16_translate2
           fullres16 with each patch shifted by a random -2 … 2 voxels per axis (``data.translate: 2``):
           a hippocampus case is smaller than its patch, so the plain sampler always centres it, at one
           phase of the network's pooling grid (the phase shifts of ``infer.tta_shifts`` pay at inference)
    fullres16_translate4
           the same with -4 … 4 voxels: every phase of the 3 poolings' 8-voxel grid, at the price of cutting
           a voxel or two of a case's border from some patches (hippocampus cases leave 2-3 voxels of the patch);
           what the plan ships
    imgx, imgx_translate4
           ImgX-DiffSeg (``configs/hippocampus/imgx.yaml``: the U-Net config's data, split and budget, K = 5 over
           the baseline's topology with FiLM time conditioning) in bf16, centred, and with ``data.translate: 4``:
           whether the phase shifts the U-Net's plan ships pay for the diffusion method too (score its shifted
           predictions with ``benchmarks/tta.py``); compare it with the U-Net arms for ImgX against the baseline

Usage: python -m benchmarks.recipe [--arms bf16 fullres8] [--seeds 0 1] [--minutes 30] [--parallel 2]

More runs at once than the machine has cores make each CPU-second buy fewer steps (4 runs on 2 cores:
~1.1 CPU-s per DynUNet-16 step against 0.51 s idle), so compare arms only across equal ``--parallel``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import add_hippocampus_args, emit, emit_test_summary, machine, save_train_result, train_in_children

from imgx3d.config import load_config
from imgx3d.training.workflow import train_run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "hippocampus" / "unet.yaml"
IMGX_CONFIG = ROOT / "configs" / "hippocampus" / "imgx.yaml"
BF16 = ["train.precision=bf16", "infer.precision=bf16"]
FULLRES16 = [*BF16, "method.full_res_features=16"]
# every arm starts from the recipe as it was before the phase changes of issue 21 (patches centred, no shifted
# predictions), so arms measured in different rounds stay comparable; the arms that test them set them, and
# benchmarks/tta.py scores trained runs with infer.tta_shifts
CENTRED = ["data.translate=0", "infer.tta_shifts=1"]
DYNUNET16 = [*BF16, "method.arch=dynunet", "method.full_res_features=0", "method.channels=[16,32,64,128]"]
MIRROR3 = ["data.flip_axes=[0,1,2]", "infer.tta_flips=[0,1,2]"]
ARMS = {  # the config carries the plan's full-resolution level (16 features): the arms set it explicitly
    "fp32": ["train.precision=fp32", "infer.precision=fp32", "method.full_res_features=0"],
    "bf16": [*BF16, "method.full_res_features=0"],
    "fullres8": [*BF16, "method.full_res_features=8"],
    "fullres16": FULLRES16,
    "fullres32": [*BF16, "method.full_res_features=32"],
    "fullres16_mirror3": [*FULLRES16, *MIRROR3],
    "fullres16_nnunet_da": [*FULLRES16, *MIRROR3, "data.affine_prob=0.2", "data.rotate_deg=30", "data.scale_range=0.3",
                            "data.intensity_scheme=nnunet"],
    "fullres16_ema": [*FULLRES16, "train.ema=0.998", "train.ema_start=500"],
    "fullres16_batch8": [*FULLRES16, "data.batch_size=8"],
    "dynunet16": DYNUNET16,
    "dynunet16_ds1": [*DYNUNET16, "method.deep_supervision=1"],
    "fullres16_trainval": [*FULLRES16, "data.split.val_fraction=0"],
    "fullres16_sgd": [*FULLRES16, "train.optimizer=sgd", "train.lr=0.01", "train.scheduler=poly", "train.warmup_steps=0",
                      "train.weight_decay=0.00003", "train.grad_clip=12"],
    "fullres16_lr1e3": [*FULLRES16, "train.lr=0.001"],
    "fullres16_translate2": [*FULLRES16, "data.translate=2"],
    "fullres16_translate4": [*FULLRES16, "data.translate=4"],
    "imgx": BF16,
    "imgx_translate4": [*BF16, "data.translate=4"],
}
CONFIGS = {"imgx": IMGX_CONFIG, "imgx_translate4": IMGX_CONFIG}  # the arms on another config than CONFIG


def run_name(arm: str, seed: int) -> str:
    """``arm.seedN``: a run's name, its folder under ``--out`` and its mlflow run name."""
    return f"{arm}.seed{seed}"


def train_one(name: str, args: argparse.Namespace) -> dict:
    """Train and test one ``arm.seedN`` run."""
    arm, seed = name.rsplit(".seed", 1)
    overrides = [*CENTRED, *ARMS[arm], f"seed={seed}", f"train.max_minutes={args.minutes}",
                 f"train.budget_clock={args.clock}", f"tracking.experiment={args.experiment}"]
    if args.clock == "cpu":
        overrides.append("data.num_workers=0")  # a worker's CPU time would escape the budget
    cfg = load_config(CONFIGS.get(arm, CONFIG), overrides)
    return save_train_result(train_run(cfg, args.data, Path(args.out) / name), arm=arm, seed=int(seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_hippocampus_args(parser, config=False)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="the first is the baseline")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu", help="what the budget counts")
    parser.add_argument("--parallel", type=int, default=2, help="runs trained at once (child processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--reuse", action="store_true", help="skip runs whose <out>/<run>/bench_result.json exists")
    parser.add_argument("--train-one", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="runs/bench-recipe")
    parser.add_argument("--experiment", default="bench-hippocampus-recipe")
    args = parser.parse_args()
    if args.train_one:
        torch.set_num_threads(args.threads)
        train_one(args.train_one, args)
        return
    out = Path(args.out)
    names = [run_name(arm, seed) for seed in args.seeds for arm in args.arms]  # a seed's arms side by side
    todo = [n for n in names if not (args.reuse and (out / n / "bench_result.json").is_file())]
    emit("recipe.setup", None, "", machine=machine(), minutes_per_run=args.minutes, clock=args.clock,
         parallel=args.parallel, threads_per_run=args.threads, arms={a: ARMS[a] for a in args.arms},
         seeds=args.seeds, split="hippocampus seed0: 144 train / 16 val / 40 test",
         reused=sorted(set(names) - set(todo)))
    forwarded = [f"--{k}={getattr(args, k)}" for k in ("data", "minutes", "clock", "out", "experiment")]
    train_in_children(__spec__.name, todo, forwarded, out, args.parallel, args.threads)
    results = {n: json.loads((out / n / "bench_result.json").read_text(encoding="utf-8")) for n in names}
    for name, r in results.items():
        emit_test_summary(f"recipe.{name}", r["test_summary"], steps=r["steps"], stop_reason=r["stop_reason"],
                          run_id=r["run_id"])
    dice = {n: r["test_summary"]["foreground_mean"]["dice"] for n, r in results.items()}
    steps = {n: r["steps"] for n, r in results.items()}
    base = args.arms[0]
    for arm in args.arms:
        per_seed = [dice[run_name(arm, s)] for s in args.seeds]
        emit(f"recipe.{arm}.test.dice.foreground_mean.seed_mean", round(statistics.fmean(per_seed), 4), "dice",
             per_seed=[round(d, 4) for d in per_seed], steps=[steps[run_name(arm, s)] for s in args.seeds],
             target=0.88)
        if arm != base:
            gaps = [dice[run_name(arm, s)] - dice[run_name(base, s)] for s in args.seeds]
            emit(f"recipe.{arm}_minus_{base}.test.dice.foreground_mean", round(statistics.fmean(gaps), 4), "dice",
                 per_seed=[round(g, 4) for g in gaps])


if __name__ == "__main__":
    main()
