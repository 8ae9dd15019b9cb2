"""The fidelity issue's GPU run (about 6 minutes on one modern GPU): JSON lines.

CPU budgets cannot test the papers' claims at their sizes; this runs them at the papers' slice
sizes on MSD Hippocampus (the bench split), under one GPU budget per model:

1. ``sdseg_bench.*``: benchmarks/sdseg.py on CUDA at SDSeg's 256 x 256 slices — SDSeg with an
   EMA of its weights (test Dice from the final weights and from their EMA, the validation curve,
   the codec's mask reconstruction ceiling) against the 2D U-Net on exactly the same slices,
   split and budget.
   The codec trains 400 steps (its mask reconstruction reaches ~0.9 Dice by then) so that the
   denoiser gets most of a one-minute budget.
2. ``siamese_gpu.*``: the (structurally fixed) Siamese-Diffusion at the paper's 384 x 384 slices
   (an f = 8 codec, 48 x 48 latents) trains for the budget, draws pairs from training masks
   (DDIM 50, no control CFG), and the 2D U-Net of part 1 scores mask-image agreement on them.

No mlflow is needed (runs are not tracked). Usage on a GPU machine:

    python -m benchmarks.gpu_fidelity --hippocampus DIR [--minutes 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.children import REPO as ROOT
from benchmarks.children import Child, module, run_children
from benchmarks.common import emit
from benchmarks.synthesis import mask_image_agreement, training_cases

SIAMESE_384 = ["data.slices.size=[384,384]", "method.codec.widths=[32,64,128,128]", "method.codec_steps=300",
               "method.ramp_steps=700", "train.max_steps=1000", "data.batch_size=8", "train.val_every=500",
               "train.checkpoint_every=500", "tracking.enabled=false"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hippocampus", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=1.0, help="training minutes of each model")
    parser.add_argument("--pairs", type=int, default=16, help="Siamese pairs drawn and scored")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script at toy budgets")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="gpu_fidelity_"))
    sdseg = run_children([Child("sdseg", module("benchmarks.sdseg", "--data", str(args.hippocampus), "--device",
                                                args.device, "--size", "256", "256", "--minutes", str(args.minutes),
                                                "--unet2d", "--skip-speed", "--no-track", "--codec-steps", "400",
                                                "--out", str(work / "sdseg")))], check=False, echo=True)["sdseg"]
    siamese_ok = siamese(args, work)
    return 0 if sdseg.returncode == 0 and siamese_ok else 1


def siamese(args: argparse.Namespace, work: Path) -> bool:
    from imgx3d.config import load_config
    from imgx3d.synthesis.synth import synthesize
    from imgx3d.training.workflow import train_run

    try:
        cfg = load_config(ROOT / "configs" / "hippocampus" / "siamese.yaml",
                          [*SIAMESE_384, f"train.max_minutes={args.minutes}", f"train.device={args.device}"])
        t0 = time.perf_counter()
        result = train_run(cfg, args.hippocampus, work / "siamese", test_at_end=False)
        seconds = time.perf_counter() - t0
        emit("siamese_gpu.train", result.steps, "steps", ok=True, seconds=round(seconds, 1),
             steps_per_s=round(result.steps / seconds, 2), stop_reason=result.stop_reason, slice_size=[384, 384])
        masks = work / "train_masks"
        training_cases(args.hippocampus, work / "siamese", masks)
        t0 = time.perf_counter()
        pairs = synthesize(str(work / "siamese"), args.pairs, work / "siamese_pairs", batch=args.pairs,
                           device=args.device, masks=masks)
        emit("siamese_gpu.synth", args.pairs, "pairs", ok=True, seconds=round(time.perf_counter() - t0, 1))
        agreement = mask_image_agreement(work / "sdseg" / "unet2d", pairs, args.pairs)
        emit("siamese_gpu.mask_image_agreement_dice", round(agreement, 4), "dice", ok=True,
             segmenter="2D U-Net of sdseg_bench (256 x 256 slices)", pairs=args.pairs)
        return True
    except Exception as err:  # noqa: BLE001 - reported as a JSON line; part 1's lines stand
        emit("siamese_gpu.error", f"{type(err).__name__}: {str(err)[:300]}", "error", ok=False)
        return False


if __name__ == "__main__":
    sys.exit(main())
