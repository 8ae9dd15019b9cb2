"""SDSeg on hippocampus: 3D Dice against the 3D U-Net, one-step vs DDIM speed, seed stability, codec Dice.

1. Trains configs/hippocampus/sdseg.yaml (codec phase, then SDSeg) for ``--minutes`` on the
   U-Net benchmark's split and scores the 40 test volumes in 3D on their native grid. The
   U-Net under the same budget, clock and threads is either trained here (``--train-unet``)
   or read from a ``bench_result.json`` of scripts/bench_imgx_ablation.py (``--unet-result``).
2. Codec: mask reconstruction Dice (3D, per class) of the trained codec on the test volumes.
3. Speed: one-step and DDIM-``--ddim-steps`` seconds per volume and their Dice on the first
   ``--subset`` test volumes, measured one after the other in this process.
4. Stability: one-step predictions with 5 seeds; PSNR / SSIM between the foreground
   probability volumes of every pair of seeds (the paper's instance-level stability).

Usage: python scripts/bench_sdseg.py [--minutes 30] [--clock cpu --threads 1]
                                     [--unet-result runs/bench-imgx-ablation/unet/bench_result.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric

sys.path.insert(0, str(Path(__file__).parent))
from _bench import emit, emit_test_summary, machine  # noqa: E402

from imgx3d.config import load_config  # noqa: E402
from imgx3d.data.catalog import find_cases  # noqa: E402
from imgx3d.data.io import read_label  # noqa: E402
from imgx3d.evaluation.metrics import score_case  # noqa: E402
from imgx3d.inference.predictor import Predictor  # noqa: E402
from imgx3d.methods.vae import codec_validation  # noqa: E402
from imgx3d.training.workflow import train_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train(config: str, args: argparse.Namespace, name: str) -> dict:
    overrides = [f"train.max_minutes={args.minutes}", f"train.budget_clock={args.clock}",
                 f"tracking.experiment={args.experiment}"]
    if args.clock == "cpu":
        overrides.append("data.num_workers=0")  # a worker's CPU time would escape the budget
    result = train_run(load_config(ROOT / "configs" / "hippocampus" / config, overrides), args.data,
                       Path(args.out) / name)
    return {"run_dir": str(result.run_dir), "run_id": result.run_id, "steps": result.steps,
            "stop_reason": result.stop_reason, "test_summary": result.test_summary}


def emit_test(name: str, record: dict) -> None:
    emit_test_summary(f"sdseg_bench.{name}", record["test_summary"], steps=record["steps"],
                      stop_reason=record["stop_reason"], run_id=record["run_id"])


def predict_subset(predictor: Predictor, cases: list, classes: list[int]) -> tuple[float, float, list[torch.Tensor]]:
    """(seconds per volume, mean foreground Dice, foreground probability volumes) over ``cases``."""
    seconds, dice, fg = 0.0, [], []
    for case in cases:
        t0 = time.perf_counter()
        prediction = predictor.predict_files(case.images, probabilities=True)
        labelmap, probs = prediction.labels.array, torch.from_numpy(prediction.probabilities.array)
        seconds += time.perf_counter() - t0
        label = read_label(case.label)
        scores = score_case(labelmap, label.array, classes, label.spacing, metrics=("dice",))
        dice.append(np.mean([scores[c]["dice"] for c in classes]))
        fg.append(1 - probs[0])
    return seconds / len(cases), float(np.mean(dice)), fg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hippocampus"))
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--threads", type=int, default=0, help="torch threads while training (0: default)")
    parser.add_argument("--unet-result", help="bench_result.json of a U-Net run with the same budget")
    parser.add_argument("--train-unet", action="store_true", help="train the U-Net baseline here")
    parser.add_argument("--subset", type=int, default=8, help="test volumes for the speed and stability parts")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--out", default="runs/bench-sdseg")
    parser.add_argument("--experiment", default="bench-hippocampus-sdseg")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    emit("sdseg_bench.setup", None, "", machine=machine(), minutes=args.minutes, clock=args.clock,
         train_threads=args.threads or threads, split="hippocampus seed0: 144 train / 16 val / 40 test")
    if args.threads:
        torch.set_num_threads(args.threads)
    sdseg = train("sdseg.yaml", args, "sdseg")
    unet = train("unet.yaml", args, "unet") if args.train_unet else None
    torch.set_num_threads(threads)
    if args.unet_result:
        unet = json.loads(Path(args.unet_result).read_text(encoding="utf-8"))
    emit_test("sdseg_one_step", sdseg)
    if unet:
        emit_test("unet", unet)
        gap = sdseg["test_summary"]["foreground_mean"]["dice"] - unet["test_summary"]["foreground_mean"]["dice"]
        emit("sdseg_bench.dice_gap.sdseg_minus_unet", round(gap, 4), "dice")

    run_dir = Path(sdseg["run_dir"])
    predictor = Predictor.load(run_dir / "best.pt", device="cpu")
    cfg = predictor.config
    catalog = find_cases(args.data, cfg.data)
    split = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
    by_id = catalog.by_id()
    test_cases = [by_id[c] for c in split["test"]]
    classes = [c for c in sorted(catalog.labels) if c != 0]

    from imgx3d.data.transforms import Preprocessor

    pre = Preprocessor(cfg.data)
    items = [pre.load_case(c, catalog.labels) for c in test_cases]
    codec = codec_validation(predictor.method.codec, items, catalog.labels, cfg.data.slices)
    for key, value in codec.items():
        unit = "dB" if "psnr" in key else "dice"
        emit(f"sdseg_bench.codec.{key.replace('val/', 'test_')}", round(value, 4), unit, volumes=len(items))

    subset = test_cases[: args.subset]
    timing = {}
    for steps in (1, args.ddim_steps):
        predictor.method.cfg.infer_steps = steps
        predict_subset(predictor, subset[:1], classes)  # warm-up
        timing[steps] = predict_subset(predictor, subset, classes)
    for steps, (seconds, dice, _) in timing.items():
        emit(f"sdseg_bench.infer.steps{steps}.seconds_per_volume", round(seconds, 3), "s", volumes=len(subset),
             dice=round(dice, 4))
    emit("sdseg_bench.infer.speedup_one_step_vs_ddim", round(timing[args.ddim_steps][0] / timing[1][0], 1), "x",
         dice_difference=round(timing[1][1] - timing[args.ddim_steps][1], 4), goal=">= 20x at <= 0.01 Dice loss")

    predictor.method.cfg.infer_steps = 1
    per_seed = []
    for seed in range(5):
        predictor.method.cfg.seed = seed
        per_seed.append(predict_subset(predictor, subset, classes))
    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=3, data_range=1.0)
    psnrs, ssims = [], []
    for a, b in itertools.combinations(range(5), 2):
        for va, vb in zip(per_seed[a][2], per_seed[b][2]):
            psnrs.append(float(psnr(va[None, None], vb[None, None]).mean()))
            ssims.append(float(ssim(va[None, None], vb[None, None]).mean()))
    finite = [p for p in psnrs if np.isfinite(p)]
    emit("sdseg_bench.stability.psnr_between_seeds", round(float(np.mean(finite)), 2) if finite else None, "dB",
         identical_pairs=len(psnrs) - len(finite), pairs=len(psnrs))
    emit("sdseg_bench.stability.ssim_between_seeds", round(float(np.mean(ssims)), 4), "ssim", pairs=len(ssims))
    dices = [d for _, d, _ in per_seed]
    emit("sdseg_bench.stability.dice_over_seeds", round(float(np.mean(dices)), 4), "dice",
         std=round(float(np.std(dices)), 4), seeds=5, volumes=len(subset))


if __name__ == "__main__":
    main()
