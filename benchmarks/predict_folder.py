"""Folder prediction throughput: reading ahead / writing behind (``--workers``) vs one case at a time.

Predicts the same N real volumes (MSD hippocampus by default) with ``imgx3d predict``'s engine,
sequentially (``workers=0``, the baseline) and with reader/writer threads, in one process, on
one model; checks the outputs are byte-identical and prints volumes per minute as JSON lines.
The model is the hippocampus U-Net config trained for a few steps (its weights do not change
the cost); pass ``--checkpoint`` to time a trained one.

    python -m benchmarks.predict_folder --data ../shared/data/hippocampus --cases 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_hippocampus_args, emit, machine

from imgx3d.config import load_config
from imgx3d.inference.folder import predict_to_folder
from imgx3d.inference.predictor import Predictor
from imgx3d.training.workflow import train_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_hippocampus_args(parser)
    parser.add_argument("--checkpoint", help="a best.pt to time (default: train the config for 5 steps)")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per setting (best is kept)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None:
            cfg = load_config(args.config, ["train.max_steps=5", "train.max_minutes=0", "train.val_every=5",
                                            "data.num_workers=0", "tracking.enabled=false"])
            checkpoint = train_run(cfg, args.data, tmp / "run", test_at_end=False).run_dir / "best.pt"
        inputs = sorted((Path(args.data) / "imagesTr").glob("*.nii.gz"))[: args.cases]
        predictor = Predictor.load(checkpoint, device="cpu")
        emit("predict_folder.setup", None, "", machine=machine(), cases=len(inputs), data=str(args.data))
        outputs, rates = {}, {}
        for workers in [0, *args.workers]:
            best = float("inf")
            for r in range(args.repeats):
                out = tmp / f"w{workers}_{r}"
                t0 = time.perf_counter()
                predict_to_folder(predictor, inputs, out, workers=workers)
                best = min(best, time.perf_counter() - t0)
            outputs[workers] = {p.name: p.read_bytes() for p in sorted(out.glob("*.nii.gz"))}
            rates[workers] = 60.0 * len(inputs) / best
        for workers in args.workers:
            emit(f"predict_folder.workers{workers}.volumes_per_minute", round(rates[workers], 1), "volumes/min",
                 baseline_sequential=round(rates[0], 1), speedup=round(rates[workers] / rates[0], 2),
                 identical_outputs=outputs[workers] == outputs[0])


if __name__ == "__main__":
    main()
