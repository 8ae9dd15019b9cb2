"""Does PIG help a segmenter with little real data? Real only vs real + PIG pairs (1x, 2x), 3 seeds.

The low-data regime of METHODS.md §3 (paper Table 2) on MSD Hippocampus:

1. PIG (configs/hippocampus/pig.yaml) trains on the slices of ``--max-train`` training volumes.
2. ``imgx3d synth`` generates 2x as many pairs as those volumes have foreground slices; the 1x
   set is its first half (pair i depends only on seed and i).
3. The same 2D U-Net (configs/hippocampus/unet2d.yaml) trains on the same real volumes alone,
   and with ``data.extra`` = the 1x or the 2x pairs (drawn in proportion to their number), for
   ``--seeds``, each on a budget of its own CPU time; all are scored in 3D on the native grid
   on the same real test split (validation and test stay real).
4. Mask-image agreement: Dice between each generated mask and the real-only seed-0 U-Net's
   prediction on the generated image.
5. Fréchet distance and KID of the generated slices to the real training slices on that
   U-Net's bottleneck features (named ``segmenter``, not FID), with real test vs real training
   slices as the floor.

Every run logs to one mlflow experiment; JSON lines on stdout, then the table.

    python -m benchmarks.augment --seg-minutes 5 --parallel 2
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from benchmarks.common import emit, machine
from benchmarks.synthesis import (CONFIGS, FeatureSpace, emit_mean_dice, first_pairs, job, low_data_parser,
                                  mask_image_agreement, print_dice_table, real_slice_count, run_jobs, test_dice)


def main() -> None:
    parser = low_data_parser(__doc__, "augment")
    parser.add_argument("--pig-steps", type=int, default=0, help="PIG training steps (0: the config's)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    track = ["--experiment", args.experiment, "--tracking-uri", args.tracking_uri]
    low_data = [f"data.split.max_train={args.max_train}", "data.num_workers=0"]
    emit("augment.setup", None, "", machine=machine(), max_train=args.max_train, seeds=args.seeds,
         seg_cpu_minutes=args.seg_minutes, sample_steps=args.sample_steps)

    pig, synth2x = out / "pig", out / "synth2x"
    t0 = time.perf_counter()
    if run_jobs([job("pig", ["train", "--config", str(CONFIGS / "pig.yaml"), "--data", args.data, "--run-dir",
                             str(pig), *track, *low_data,
                             *([f"train.max_steps={args.pig_steps}", f"method.stage1_steps={args.pig_steps // 2}"]
                               if args.pig_steps else [])], threads=cores)], out, 1):
        emit("augment.pig.train_minutes", round((time.perf_counter() - t0) / 60, 1), "min")
    n_real = real_slice_count(pig, args.data)
    emit("augment.real_foreground_slices", n_real, "slices", volumes=args.max_train)

    t0 = time.perf_counter()
    if run_jobs([job("synth", ["synth", "--run", str(pig), "--n", str(2 * n_real), "--output", str(synth2x),
                               "--batch", "32", "--steps", str(args.sample_steps)], threads=cores)], out, 1):
        emit("augment.synth.seconds_per_pair", round((time.perf_counter() - t0) / (2 * n_real), 3), "s",
             pairs=2 * n_real, steps=args.sample_steps)
    first_pairs(synth2x, out / "synth1x", n_real)

    variants = {"real": [], "pig1x": [f"data.extra=[{out / 'synth1x'}]"], "pig2x": [f"data.extra=[{out / 'synth2x'}]"]}
    runs = [(f"{v}-seed{s}", s, extra) for s in args.seeds for v, extra in variants.items()]
    run_jobs([job(name, ["train", "--config", str(CONFIGS / "unet2d.yaml"), "--data", args.data, "--run-dir",
                         str(out / name), "--seed", str(seed), *track, *low_data, *extra,
                         f"train.max_minutes={args.seg_minutes}", "train.budget_clock=cpu"])
              for name, seed, extra in runs], out, args.parallel)

    dice: dict[str, list[float]] = {v: [] for v in variants}
    for name, _, _ in runs:
        dice[name.split("-")[0]].append(test_dice("augment", out / name))
    emit_mean_dice("augment", dice)
    agreement = mask_image_agreement(out / f"real-seed{args.seeds[0]}", synth2x, limit=n_real)
    emit("augment.mask_image_agreement_dice", round(agreement, 4), "dice", pairs=n_real,
         segmenter=f"real-seed{args.seeds[0]}")
    space = FeatureSpace(out / f"real-seed{args.seeds[0]}", pig, args.data)
    space.report("augment", "generated_vs_real_train", synth2x)
    space.report("augment", "real_test_vs_real_train")
    print_dice_table(dice)


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
