"""Do a generator's pairs under bf16 / fp16 autocast stay within its fp32 pairs' seed-to-seed spread?

For each generator run (pig, siamese), ``imgx3d synth`` draws the same ``--n`` pairs (seed 0) in fp32
and in each reduced precision, and once more in fp32 with seed 1. A reduced-precision pair is
compared with the fp32 pair of the same seed; the fp32 pairs of seeds 0 and 1 give the spread a
different draw alone makes. Per precision: the mean absolute image difference (images in [0, 1])
and the share of either-foreground mask pixels labelled alike, each beside the seed spread's.

Usage:
    python -m benchmarks.synth_precision RUN [RUN ...] [--n 32] [--precisions bf16 fp16] [--masks DATA]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.common import emit, machine

from imgx3d.synthesis.synth import synthesize


def draw(run: Path, out: Path, n: int, seed: int, precision: str, masks: str | None) -> tuple[np.ndarray, np.ndarray, float]:
    """``n`` pairs of ``run`` (images, masks) drawn with ``seed`` under ``precision``, and the seconds per pair."""
    t0 = time.perf_counter()
    synthesize(str(run), n, out, seed=seed, batch=min(n, 16), device="cpu", masks=masks, precision=precision)
    seconds = (time.perf_counter() - t0) / n
    names = sorted((out / "imagesTr").glob("synth_*.nii.gz"))
    images = np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in names])
    labels = np.stack([np.asarray(nib.load(out / "labelsTr" / p.name).dataobj) for p in names])
    return images, labels, seconds


def compare(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Mean absolute image difference and the share of either-foreground mask pixels labelled alike."""
    foreground = (a[1] != 0) | (b[1] != 0)
    alike = float((foreground & (a[1] == b[1])).sum() / max(int(foreground.sum()), 1))
    return {"image_mad": float(np.abs(a[0] - b[0]).mean()), "mask_agreement": alike}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="generator run folders (best.pt)")
    parser.add_argument("--n", type=int, default=32, help="pairs per draw")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--masks", help="dataset folder of the masks a mask-conditioned generator (siamese) needs")
    args = parser.parse_args()
    emit("synth_precision.setup", None, "", machine=machine(), runs=[str(r) for r in args.runs], n=args.n)
    for run in args.runs:
        work = Path(tempfile.mkdtemp(prefix="synth-precision-"))
        reference = draw(run, work / "fp32_seed0", args.n, 0, "fp32", args.masks)
        other_seed = draw(run, work / "fp32_seed1", args.n, 1, "fp32", args.masks)
        spread = compare(reference[:2], other_seed[:2])
        emit(f"synth_precision.{run.name}.fp32_seed_spread.image_mad", round(spread["image_mad"], 5), "mean |Δ| in [0, 1]",
             mask_agreement=round(spread["mask_agreement"], 4), seconds_per_pair=round(reference[2], 3), pairs=args.n)
        for precision in args.precisions:
            got = draw(run, work / f"{precision}_seed0", args.n, 0, precision, args.masks)
            diff = compare(reference[:2], got[:2])
            emit(f"synth_precision.{run.name}.{precision}.image_mad", round(diff["image_mad"], 5), "mean |Δ| in [0, 1]",
                 mask_agreement=round(diff["mask_agreement"], 4), seed_spread_image_mad=round(spread["image_mad"], 5),
                 seed_spread_mask_agreement=round(spread["mask_agreement"], 4),
                 within_seed_spread=diff["image_mad"] <= spread["image_mad"]
                 and diff["mask_agreement"] >= spread["mask_agreement"],
                 seconds_per_pair=round(got[2], 3), pairs=args.n)


if __name__ == "__main__":
    main()
