"""Sparse annotation (nnU-Net v2's ignore label) against full labels: same split, config and budget.

A copy of the dataset is written to ``--work`` (images linked, not copied) whose labels keep every
``--every``-th slice along ``--axis`` and mark the rest with the ignore label (one above the highest
class, named ``ignore`` in its dataset.json). Two U-Net runs of the same config and budget — on the
full labels and on the sparse ones — are trained side by side (one thread each, CPU-time budgets),
and both are scored on the **full** labels of the same test cases. Prints JSON lines: each run's
steps and per-class test Dice, the annotated share of the voxels, and the difference.

Usage:
    python -m benchmarks.sparse [--data ../shared/data/hippocampus] [--minutes 10] [--every 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.common import add_arm_args, train_arm_if_child, add_hippocampus_args, emit, emit_test_summary, machine, save_train_result, train_in_children

from imgx3d.config import load_config
from imgx3d.evaluation.metrics import evaluate_folders

RUNS = ("full", "sparse")


def write_sparse_copy(data: Path, out: Path, every: int, axis: int) -> float:
    """The MSD dataset at ``data`` with labels kept on every ``every``-th slice along ``axis`` (the rest the
    ignore label) under ``out``; returns the share of voxels still annotated."""
    meta = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    ignore = max(int(v) for v in meta["labels"]) + 1
    meta["labels"][str(ignore)] = "ignore"
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    if not (out / "imagesTr").exists():
        (out / "imagesTr").symlink_to((data / "imagesTr").resolve())
    kept = total = 0
    for path in sorted((data / "labelsTr").glob("*.nii*")):
        image = nib.load(path)
        label = np.asarray(image.dataobj).astype(np.uint8)
        mask = np.zeros(label.shape[axis], bool)
        mask[::every] = True
        index = [slice(None)] * label.ndim
        index[axis] = ~mask
        label[tuple(index)] = ignore
        kept, total = kept + int((label != ignore).sum()), total + label.size
        nib.save(nib.Nifti1Image(label, image.affine, image.header), out / "labelsTr" / path.name)
    (out / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return kept / total


def train_one(name: str, args: argparse.Namespace) -> dict:
    """Train and test one run on its labels; its figures are also saved to ``<out>/<name>/bench_result.json``."""
    from imgx3d.training.workflow import train_run

    overrides = [f"train.max_minutes={args.minutes}", f"train.budget_clock={args.clock}", "data.num_workers=0",
                 f"tracking.experiment={args.experiment}", "train.max_steps=1000000", *args.set]
    cfg = load_config(args.config, overrides)
    data = args.data if name == "full" else str(Path(args.work) / "sparse")
    return save_train_result(train_run(cfg, data, Path(args.out) / name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_hippocampus_args(parser)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=int, default=5, help="keep the label of every N-th slice")
    parser.add_argument("--axis", type=int, default=2, help="the slice axis (of the label files' arrays)")
    parser.add_argument("--work", default="", help="where the sparse copy goes (default: a temporary folder)")
    add_arm_args(parser, "sparse", RUNS)
    args = parser.parse_args()
    if train_arm_if_child(args, train_one):
        return
    args.work = args.work or tempfile.mkdtemp(prefix="bench-sparse-")
    share = write_sparse_copy(Path(args.data), Path(args.work) / "sparse", args.every, args.axis)
    emit("sparse.setup", None, "", machine=machine(), minutes=args.minutes, clock=args.clock, every=args.every,
         axis=args.axis, annotated_voxel_share=round(share, 4), config=args.config, overrides=args.set)
    forwarded = [f"--{k}={getattr(args, k)}" for k in ("data", "config", "minutes", "clock", "work", "out",
                                                      "experiment")] + [f"--set={s}" for s in args.set]
    results = train_in_children(__spec__.name, list(RUNS), forwarded, Path(args.out), 2, args.threads)
    # both scored on the full labels (the sparse run's own test metrics see only its annotated slices)
    dice = {}
    for name, result in results.items():
        run_dir = Path(result["run_dir"])
        cfg = load_config(run_dir / "config.yaml")
        cfg.data.ignore_label = None
        names = json.loads((Path(args.data) / "dataset.json").read_text(encoding="utf-8"))["labels"]
        _, summary = evaluate_folders(run_dir / "test_predictions", Path(args.data) / "labelsTr", data_cfg=cfg.data,
                                      labels={int(k): v for k, v in names.items()})
        emit_test_summary(f"sparse.{name}", summary, steps=result["steps"], stop_reason=result["stop_reason"],
                          cases=summary["cases"], scored_on="full labels")
        dice[name] = summary["foreground_mean"]["dice"]
    emit("sparse.sparse_minus_full", round(dice["sparse"] - dice["full"], 4), "dice",
         annotated_voxel_share=round(share, 4))


if __name__ == "__main__":
    main()
