"""Siamese-Diffusion on real hippocampus slices: the ablation and the augmentation experiment.

METHODS.md §4 claims (1) noise consistency improves synthesis fidelity over mask-only
training and (2) images from the mask branch raise downstream Dice. On MSD Hippocampus, in the
low-data regime of benchmarks/augment.py (``--max-train`` real training volumes):

1. A codec run (configs/hippocampus/siamese.yaml, codec phase only) gives every variant the same
   latent space; a real-only 2D U-Net (configs/hippocampus/unet2d.yaml) per seed.
2. Three Siamese variants train the same number of steps from that codec: ``full`` (noise
   consistency + online augmentation), ``no_consistency`` (w_c = 0), ``no_online`` (no L_m').
3. Each synthesises one image per foreground mask slice of the real training volumes (the
   training split only: test masks never reach training data), DDIM-50, with the config's guidance (1 since stop 14: no control CFG; the figures of stop 13 used 9).
4. Fidelity: Fréchet distance and KID of each variant's images to the real training slices on
   the real-only U-Net's features (as in bench_augment; real test slices give the floor), and
   mask–image agreement (that U-Net's Dice on the generated image against its mask).
5. Downstream: the 2D U-Net on real + each variant's pairs (``data.extra``), scored in 3D on the
   native grid on the real test split; ``full`` and real-only over ``--seeds``, the ablations on
   the first seed. ``--pig-pairs DIR`` (a bench_augment synth folder of the same split) adds real
   + PIG pairs over the seeds.

Every run logs to one mlflow experiment; JSON lines on stdout, then the two tables.

    python -m benchmarks.siamese --steps 1000 --parallel 2
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from benchmarks.children import Child
from benchmarks.common import emit, machine
from benchmarks.synthesis import (CONFIGS, FeatureSpace, emit_mean_dice, first_pairs, job, low_data_parser,
                                  mask_image_agreement, print_dice_table, real_slice_count, run_jobs, test_dice,
                                  training_cases)

ABLATIONS = {"full": [], "no_consistency": ["method.consistency_weight=0"],
             "no_online": ["method.online_augmentation=false"]}


def main() -> None:
    parser = low_data_parser(__doc__, "siamese")
    parser.add_argument("--codec-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1000, help="diffusion steps per Siamese variant (= N_iter)")
    parser.add_argument("--pig-pairs", default="", help="a PIG synth folder of the same split (bench_augment)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    track = ["--experiment", args.experiment, "--tracking-uri", args.tracking_uri]
    low_data = ["--data", args.data, *track, f"data.split.max_train={args.max_train}", "data.num_workers=0"]
    emit("siamese_bench.setup", None, "", machine=machine(), max_train=args.max_train, seeds=args.seeds,
         codec_steps=args.codec_steps, steps=args.steps, seg_cpu_minutes=args.seg_minutes,
         sample_steps=args.sample_steps)

    def segmenter(name: str, seed: int, extra: list[str], after: list[str]) -> Child:
        return job(name, ["train", "--config", str(CONFIGS / "unet2d.yaml"), "--run-dir", str(out / name),
                          "--seed", str(seed), *low_data, *extra, f"train.max_minutes={args.seg_minutes}",
                          "train.budget_clock=cpu"], after=after)

    codec = out / "codec"
    run_jobs([job("codec", ["train", "--config", str(CONFIGS / "siamese.yaml"), "--run-dir", str(codec), *low_data,
                            f"method.codec_steps={args.codec_steps}", f"train.max_steps={args.codec_steps}"]),
              segmenter(f"real-seed{args.seeds[0]}", args.seeds[0], [], [])], out, args.parallel)
    n_real = real_slice_count(codec, args.data)
    emit("siamese_bench.real_foreground_slices", n_real, "slices", volumes=args.max_train)
    masks = out / "train_masks"
    training_cases(Path(args.data), codec, masks)

    synth_sets = {variant: out / f"synth-{variant}" for variant in ABLATIONS}
    # the long generator runs first, so the queue keeps every core busy
    same = [f"method.codec.path={codec}", f"train.max_steps={args.steps}", f"method.ramp_steps={args.steps}",
            "train.val_every=250"]
    jobs = [job(variant, ["train", "--config", str(CONFIGS / "siamese.yaml"), "--run-dir", str(out / variant),
                          *low_data, *same, *overrides]) for variant, overrides in ABLATIONS.items()]
    jobs += [segmenter(f"real-seed{s}", s, [], []) for s in args.seeds[1:]]
    for variant, pairs in synth_sets.items():
        jobs.append(job(f"synth-{variant}", ["synth", "--run", str(out / variant), "--masks", str(masks), "--n",
                                             str(n_real), "--output", str(pairs), "--batch", "32", "--steps",
                                             str(args.sample_steps)], after=[variant]))
        seeds = args.seeds if variant == "full" else args.seeds[:1]
        jobs += [segmenter(f"{variant}-seed{s}", s, [f"data.extra=[{pairs}]"], [f"synth-{variant}"]) for s in seeds]
    if args.pig_pairs:
        synth_sets["pig"] = out / "synth-pig"
        first_pairs(Path(args.pig_pairs), synth_sets["pig"], n_real)
        jobs += [segmenter(f"pig-seed{s}", s, [f"data.extra=[{synth_sets['pig']}]"], []) for s in args.seeds]
    run_jobs(jobs, out, args.parallel)

    real_only = out / f"real-seed{args.seeds[0]}"
    space = FeatureSpace(real_only, codec, args.data)
    floor = space.report("siamese_bench", "real_test_vs_real_train")
    quality = {}
    for variant, pairs in synth_sets.items():
        quality[variant] = space.report("siamese_bench", f"{variant}_vs_real_train", pairs)
        quality[variant]["agreement"] = mask_image_agreement(real_only, pairs, limit=n_real)
        emit(f"siamese_bench.{variant}.mask_image_agreement_dice", round(quality[variant]["agreement"], 4), "dice",
             pairs=n_real, segmenter=real_only.name)
    dice: dict[str, list[float]] = {}
    for variant in ["real", *synth_sets]:
        for seed in args.seeds:
            if (out / f"{variant}-seed{seed}" / "test_metrics").is_dir():
                dice.setdefault(variant, []).append(test_dice("siamese_bench", out / f"{variant}-seed{seed}"))
    emit_mean_dice("siamese_bench", dice)

    print(f"\n| generator | FD (segmenter features) | KID | mask-image agreement | test Dice, real + pairs |"
          f"\n|---|---|---|---|---|\n| real test slices (floor) | {floor['fd']:.3f} | {floor['kid']:.4f} | | |")
    for variant, q in quality.items():
        print(f"| {variant} | {q['fd']:.3f} | {q['kid']:.4f} | {q['agreement']:.3f} | "
              f"{np.mean(dice[variant]):.4f} ({len(dice[variant])} seed(s)) |")
    print_dice_table(dice)


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
