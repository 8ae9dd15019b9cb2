"""SDSeg on hippocampus: 3D Dice against the 2D and 3D U-Nets, with and without EMA, one-step vs
DDIM speed, seed stability, codec Dice, and where the Dice is lost.

1. Trains configs/hippocampus/sdseg.yaml (codec phase, then SDSeg) for ``--minutes`` on the
   U-Net benchmark's split, keeping an EMA of the weights (``--ema``, from the end of the codec
   phase), and scores the 40 test volumes in 3D on their native grid twice from the final
   ``last.pt``: with the training weights and with their EMA (the same trajectory and step, so
   the difference is the EMA's alone). The validation curve says whether Dice still rises with steps.
   The fair baseline of a per-slice method, the **2D U-Net on exactly the same slices** (axis,
   size, empty-slice fraction), split and budget, is trained here (``--unet2d``); the 3D U-Net
   under the same budget is trained here (``--train-unet``) or read from a ``bench_result.json``
   of benchmarks/imgx_ablation.py (``--unet-result``).
2. Codec: mask reconstruction Dice (3D, per class) of the trained codec on the test volumes —
   the ceiling of any latent method on this codec.
3. Speed: one-step and DDIM-``--ddim-steps`` seconds per volume and their Dice on the first
   ``--subset`` test volumes, measured one after the other in this process.
4. Stability: one-step predictions with 5 seeds; PSNR / SSIM between the foreground
   probability volumes of every pair of seeds (the paper's instance-level stability).

Usage: python -m benchmarks.sdseg [--minutes 30] [--clock cpu --threads 1] [--unet2d] [--ema 0.999] [--reuse]
                                     [--unet-result runs/bench-imgx-ablation/unet/bench_result.json]
       [--device cuda --size 256 256 --skip-speed]   (the GPU run at the paper's 256 x 256 slices)
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from benchmarks.common import emit, emit_test_summary, machine

from imgx3d.config import load_config
from imgx3d.data.catalog import find_cases
from imgx3d.data.io import read_label
from imgx3d.evaluation.metrics import score_case
from imgx3d.inference.predictor import Predictor
from imgx3d.methods.vae import codec_validation
from imgx3d.methods.base import method_from_checkpoint
from imgx3d.training.ema import averaged_state_dict
from imgx3d.training.workflow import train_run

ROOT = Path(__file__).resolve().parents[1]


def train(config: str, args: argparse.Namespace, name: str, extra: list[str] = ()) -> dict:
    finished = Path(args.out) / name / "result.json"
    if args.reuse and finished.exists():  # a run an earlier call of this benchmark finished
        result = json.loads(finished.read_text(encoding="utf-8"))
        summary = finished.parent / "test_metrics" / "summary.json"
        return {"run_dir": str(finished.parent), "run_id": result["run_id"], "steps": result["steps"],
                "stop_reason": result["stop_reason"],
                "test_summary": json.loads(summary.read_text(encoding="utf-8"))}
    overrides = [f"train.max_minutes={args.minutes}", f"train.budget_clock={args.clock}",
                 f"tracking.experiment={args.experiment}", f"train.device={args.device}", *extra]
    if args.clock == "cpu":
        overrides.append("data.num_workers=0")  # a worker's CPU time would escape the budget
    result = train_run(load_config(ROOT / "configs" / "hippocampus" / config, overrides), args.data,
                       Path(args.out) / name)
    return {"run_dir": str(result.run_dir), "run_id": result.run_id, "steps": result.steps,
            "stop_reason": result.stop_reason, "test_summary": result.test_summary}


def slice_overrides(args: argparse.Namespace) -> list[str]:
    """The SDSeg config's slices (``--size`` overriding their size): the 2D U-Net gets the same."""
    slices = load_config(ROOT / "configs" / "hippocampus" / "sdseg.yaml").data.slices
    size = args.size or slices.size
    return [f"data.slices.axis={slices.axis}", f"data.slices.size=[{size[0]},{size[1]}]",
            f"data.slices.keep_empty={slices.keep_empty}"]


def score_last_weights(run_dir: Path, data: str, device: str) -> dict[str, dict]:
    """Test summaries of the final ``last.pt`` with its training weights (``raw``) and with their
    EMA (``ema``), each written as the ``best.pt`` of a folder of its own and scored like a run."""
    from imgx3d.checkpoint import load_checkpoint, save_checkpoint
    from imgx3d.data.catalog import Split
    from imgx3d.tracking import NullTracker
    from imgx3d.training.workflow import evaluate_test_split

    last = load_checkpoint(run_dir / "last.pt")
    ema = last.get("ema")
    split = Split(**json.loads((run_dir / "split.json").read_text(encoding="utf-8")))
    catalog = find_cases(data, last.config.data)
    out = {}
    averaged = ema and averaged_state_dict(method_from_checkpoint(last), ema)
    for name, weights in (("raw", last.weights), ("ema", averaged)):
        if weights is None:
            continue
        folder = run_dir / f"last_{name}"
        folder.mkdir(exist_ok=True)
        save_checkpoint(folder / "best.pt", {**last.state, "model": weights})
        out[name] = evaluate_test_split(folder, catalog, split, NullTracker(), last.get("step"), device)
    return out


def validation_curve(run_dir: str) -> list[tuple[int, float]]:
    """(step, validation mean foreground Dice) of a run, from its ``last.pt`` (no mlflow needed)."""
    from imgx3d.checkpoint import load_checkpoint

    history = load_checkpoint(Path(run_dir) / "last.pt").get("train_state", {}).get("history", [])
    return [(h["step"], round(h["val/dice_mean"], 4)) for h in history if "val/dice_mean" in h]


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
    parser.add_argument("--unet2d", action="store_true", help="train the 2D U-Net on the same slices here")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay kept during SDSeg (0: none)")
    parser.add_argument("--device", default="auto", help="training and prediction device")
    parser.add_argument("--size", type=int, nargs=2, help="slice size (default: the config's; paper: 256 256)")
    parser.add_argument("--skip-speed", action="store_true", help="skip the speed and seed-stability parts")
    parser.add_argument("--reuse", action="store_true",
                        help="read the arms that an earlier call finished under --out instead of training them again")
    parser.add_argument("--codec-steps", type=int, help="codec phase steps (default: the config's)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--no-track", action="store_true", help="no mlflow (a machine without it)")
    parser.add_argument("--subset", type=int, default=8, help="test volumes for the speed and stability parts")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--out", default="runs/bench-sdseg")
    parser.add_argument("--experiment", default="bench-hippocampus-sdseg")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    emit("sdseg_bench.setup", None, "", machine=machine(), minutes=args.minutes, clock=args.clock,
         train_threads=args.threads or threads, split="hippocampus seed0: 144 train / 16 val / 40 test",
         ema=args.ema, device=args.device, slices=slice_overrides(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    codec_steps = args.codec_steps or load_config(ROOT / "configs" / "hippocampus" / "sdseg.yaml").method.codec_steps
    track = ["tracking.enabled=false"] if args.no_track else [f"tracking.uri={args.tracking_uri}"]
    sdseg = train("sdseg.yaml", args, "sdseg", [*slice_overrides(args), *track, f"train.ema={args.ema}",
                                               f"train.ema_start={codec_steps}", f"method.codec_steps={codec_steps}"])
    unet2d = train("unet2d.yaml", args, "unet2d", [*slice_overrides(args), *track]) if args.unet2d else None
    unet = train("unet.yaml", args, "unet", track) if args.train_unet else None
    torch.set_num_threads(threads)
    emit("sdseg_bench.validation_curve", validation_curve(sdseg["run_dir"]), "[step, dice]")
    for name, summary in score_last_weights(Path(sdseg["run_dir"]), args.data, args.device).items():
        emit_test_summary(f"sdseg_bench.last_{name}", summary, steps=sdseg["steps"])
    if unet2d:
        emit_test("unet2d_same_slices", unet2d)
        emit("sdseg_bench.validation_curve.unet2d", validation_curve(unet2d["run_dir"]),
             "[step, dice]")
    if args.unet_result:
        unet = json.loads(Path(args.unet_result).read_text(encoding="utf-8"))
    emit_test("sdseg_one_step", sdseg)
    if unet:
        emit_test("unet", unet)
        gap = sdseg["test_summary"]["foreground_mean"]["dice"] - unet["test_summary"]["foreground_mean"]["dice"]
        emit("sdseg_bench.dice_gap.sdseg_minus_unet", round(gap, 4), "dice")

    run_dir = Path(sdseg["run_dir"])
    predictor = Predictor.load(run_dir / "best.pt", device=args.device)
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

    if args.skip_speed:
        return
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
