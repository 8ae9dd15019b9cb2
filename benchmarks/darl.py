"""DARL vs Frangi on DRIVE, both label-free, measured in the same run.

DARL (configs/drive/darl.yaml) trains on the 20 DRIVE training photographs for ``--minutes`` of
its own CPU time without reading a label file and without label-based model selection (no
validation split: the last weights are used). The baseline is Frangi vesselness (scikit-image)
with an Otsu threshold. Both are scored against the manual annotations (1st_manual) inside the
field-of-view masks, on the same 20 images: Dice, sensitivity, specificity (DARL thresholded at
0.5), AUC of the continuous maps; and seconds per image. JSON lines.

    python -m benchmarks.darl --minutes 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from PIL import Image

from benchmarks.children import REPO, Child, imgx3d, run_children
from benchmarks.common import emit, machine

from imgx3d.data.vessels import frangi_segmentation
from imgx3d.inference.predictor import Predictor


def scores(probability: np.ndarray, binary: np.ndarray, truth: np.ndarray, fov: np.ndarray) -> dict[str, float]:
    """Dice, sensitivity, specificity of ``binary`` and AUC of ``probability``, inside ``fov``."""
    p, t = binary[fov], truth[fov]
    tp, fp, fn, tn = (p & t).sum(), (p & ~t).sum(), (~p & t).sum(), (~p & ~t).sum()
    auc = compute_roc_auc(torch.from_numpy(probability[fov].astype(np.float32)), torch.from_numpy(t.astype(np.float32)))
    return {"dice": 2 * tp / max(2 * tp + fp + fn, 1), "sensitivity": tp / max(tp + fn, 1),
            "specificity": tn / max(tn + fp, 1), "auc": float(auc)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "drive" / "training"))
    parser.add_argument("--minutes", type=float, default=30.0, help="DARL's CPU-time training budget")
    parser.add_argument("--out", default="runs/bench-darl")
    parser.add_argument("--experiment", default="bench-drive-darl")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit("darl.setup", None, "", machine=machine(), minutes=args.minutes, images=len(list((data / "images").glob("*"))))

    run = out / "darl"
    if not (run / "last.pt").exists():
        t0 = time.perf_counter()
        run_children([Child("darl", imgx3d(
            "train", "--image", "--config", str(REPO / "configs/drive/darl.yaml"), "--data", str(data), "--run-dir",
            str(run), "--experiment", args.experiment, "--tracking-uri", args.tracking_uri,
            f"train.max_minutes={args.minutes}", "train.budget_clock=cpu", "data.split.val_fraction=0.0",
            "data.split.test_fraction=0.0"))], logs=out)
        emit("darl.train_wall_minutes", round((time.perf_counter() - t0) / 60, 1), "min")
    steps = torch.load(run / "last.pt", map_location="cpu", weights_only=False)["step"]
    predictor = Predictor.load(run / "best.pt", device="cpu")

    results: dict[str, list[dict[str, float]]] = {"darl": [], "frangi": []}
    seconds = {"darl": 0.0, "frangi": 0.0}
    images = sorted((data / "images").glob("*_training.tif"))
    for path in images:
        case = path.name.split("_")[0]
        truth = np.asarray(Image.open(data / "1st_manual" / f"{case}_manual1.gif")) > 0
        fov = np.asarray(Image.open(data / "mask" / f"{case}_training_mask.gif")) > 0
        t0 = time.perf_counter()
        probs = predictor.predict_files([path], probabilities=True).probabilities.array
        seconds["darl"] += time.perf_counter() - t0
        vessel = probs[1, :, :, 0]
        results["darl"].append(scores(vessel, vessel > 0.5, truth, fov))
        green = np.asarray(Image.open(path))[..., 1].astype(np.float64)
        t0 = time.perf_counter()
        response, binary = frangi_segmentation(green, fov)
        seconds["frangi"] += time.perf_counter() - t0
        results["frangi"].append(scores(response, binary, truth, fov))
    for name, rows in results.items():
        for metric in ("dice", "sensitivity", "specificity", "auc"):
            values = [r[metric] for r in rows]
            emit(f"darl_bench.{name}.{metric}", round(float(np.mean(values)), 4), metric,
                 std=round(float(np.std(values)), 4), images=len(values))
        emit(f"darl_bench.{name}.seconds_per_image", round(seconds[name] / len(images), 3), "s",
             **({"train_steps": steps, "inference": "one step at t = 0, 4 polyphase sub-images"} if name == "darl" else {}))
    (out / "per_image.json").write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
