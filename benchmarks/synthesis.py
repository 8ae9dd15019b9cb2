"""Shared pieces of the synthesis → augmentation benchmarks (benchmarks/augment.py, benchmarks/siamese.py).

A benchmark runs ``imgx3d`` CLI jobs (train a generator, synth, train segmenters) as
subprocesses, then scores what they wrote: downstream test Dice, mask–image agreement, and
Fréchet / kernel distances on a real-only segmenter's features.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.children import REPO, Child, Finished, imgx3d, run_children
from benchmarks.common import emit

from imgx3d.config import load_config
from imgx3d.data.catalog import find_cases
from imgx3d.data.slices import foreground_slices as slice_foreground
from imgx3d.data.transforms import Preprocessor
from imgx3d.inference.predictor import Predictor
from imgx3d.synthesis.quality import (
    extract,
    frechet_distance,
    kernel_distance,
    segmenter_features,
)

CONFIGS = REPO / "configs" / "hippocampus"


def low_data_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The arguments every augmentation benchmark shares (data, low-data regime, seeds, budgets,
    outputs); ``name`` names its output folder and mlflow experiment (``bench-NAME``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"))
    parser.add_argument("--max-train", type=int, default=20, help="real training volumes (low-data regime)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seg-minutes", type=float, default=5.0, help="CPU minutes per segmenter run")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (1 thread each)")
    parser.add_argument("--out", default=f"runs/bench-{name}")
    parser.add_argument("--experiment", default=f"bench-{name}")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    return parser


def run_jobs(jobs: list[Child], out: Path, parallel: int) -> dict[str, Finished]:
    """Run ``imgx3d`` CLI jobs ``parallel`` at a time, each after the jobs it names in ``after``.

    A finished job leaves ``out/NAME.done``; a later invocation skips it (benchmarks resume).

    Returns:
        The jobs this call ran.

    Raises:
        SystemExit: a job failed (its log is ``out/NAME.log``).
    """
    return run_children(jobs, parallel=parallel, logs=out, resume=True)


def job(name: str, argv: list[str], threads: int = 1, after: list[str] | None = None) -> Child:
    """One ``imgx3d`` CLI call of ``threads`` CPU threads, started once the jobs named in ``after`` have finished."""
    return Child(name, imgx3d(*argv), threads=threads, after=after or [])


def split_ids(run_dir: Path, part: str) -> list[str]:
    """The case ids of a split part (train / val / test) of a run."""
    return json.loads((run_dir / "split.json").read_text(encoding="utf-8"))[part]


def _items(run_dir: Path, data: str, part: str) -> tuple[list[dict], object]:
    cfg = load_config(run_dir / "config.yaml")
    catalog = find_cases(data, cfg.data)
    cases, pre = catalog.by_id(), Preprocessor(cfg.data)
    return [pre.load_case(cases[case_id], catalog.labels) for case_id in split_ids(run_dir, part)], cfg


def real_slice_count(run_dir: Path, data: str) -> int:
    """Foreground slices (a generator's training pool) of the run's training volumes."""
    items, cfg = _items(run_dir, data, "train")
    axis = cfg.data.slices.axis
    return sum(int((item["label"][0] > 0).any(dim=[a for a in range(3) if a != axis]).sum()) for item in items)


def foreground_slices(run_dir: Path, data: str, part: str) -> torch.Tensor:
    """The foreground slices ``(N, C, H, W)`` in [-1, 1] of a split part, as the run's method saw them."""
    items, cfg = _items(run_dir, data, part)
    return slice_foreground(items, cfg.data.slices, limit=sys.maxsize)[0]


def link_dataset(source: Path, target: Path, entries: list[dict[str, str]]) -> None:
    """An MSD-style dataset at ``target`` of ``entries`` of ``source``'s dataset.json (symlinks, no copies)."""
    dataset = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    for entry in entries:
        for key in ("image", "label"):
            link = target / entry[key]
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to((source / entry[key]).resolve())
    dataset.update(training=entries, numTraining=len(entries), test=[], numTest=0)
    (target / "dataset.json").write_text(json.dumps(dataset, indent=1), encoding="utf-8")


def first_pairs(source: Path, target: Path, n: int) -> None:
    """A dataset of the first ``n`` pairs of a synth folder ``source``."""
    dataset = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    link_dataset(source, target, dataset["training"][:n])


def training_cases(data: Path, run_dir: Path, target: Path) -> None:
    """A dataset of the run's training cases only: the masks a mask-conditioned generator may see
    (test masks must not reach the synthetic training data)."""
    cases = find_cases(data, load_config(run_dir / "config.yaml").data).by_id()
    link_dataset(data, target, [{"image": os.path.relpath(cases[i].images[0], data),
                                 "label": os.path.relpath(cases[i].label, data)} for i in split_ids(run_dir, "train")])


def mask_image_agreement(segmenter: Path, pairs: Path, limit: int) -> float:
    """Mean foreground Dice between generated masks and a real-only segmenter's predictions on the generated images."""
    import nibabel as nib

    predictor = Predictor.load(segmenter / "best.pt", device="cpu")
    dataset = json.loads((pairs / "dataset.json").read_text(encoding="utf-8"))
    scores = []
    for entry in dataset["training"][:limit]:
        labelmap = predictor.predict_files([pairs / entry["image"]]).labels.array
        mask = np.asarray(nib.load(str(pairs / entry["label"])).dataobj)
        present = np.union1d(np.unique(labelmap[labelmap > 0]), np.unique(mask[mask > 0]))  # either side's classes
        if len(present):
            per_class = [2 * ((labelmap == c) & (mask == c)).sum() / ((labelmap == c).sum() + (mask == c).sum())
                         for c in present]
            scores.append(float(np.mean(per_class)))
    return float(np.mean(scores)) if scores else float("nan")


def generated_slices(pairs: Path, axis: int) -> torch.Tensor:
    """The generated images ``(N, C, H, W)`` of a synth folder, back in [-1, 1]."""
    import nibabel as nib

    dataset = json.loads((pairs / "dataset.json").read_text(encoding="utf-8"))
    images = [np.asarray(nib.load(str(pairs / e["image"])).dataobj, dtype=np.float32) for e in dataset["training"]]
    return torch.stack([torch.from_numpy(i).squeeze(axis)[None] * 2 - 1 for i in images])


class FeatureSpace:
    """Fréchet distance and KID on a real-only segmenter's bottleneck features (named ``segmenter``,
    not FID: no Inception network here), against the real training slices of a generator run."""

    def __init__(self, segmenter: Path, generator: Path, data: str):
        self.features = segmenter_features(Predictor.load(segmenter / "best.pt", device="cpu").method)
        self.label = f"{segmenter.name} U-Net bottleneck (not FID)"
        self.axis = load_config(generator / "config.yaml").data.slices.axis
        self.real_train = extract(self.features, foreground_slices(generator, data, "train"))
        self.real_test = extract(self.features, foreground_slices(generator, data, "test"))

    def report(self, prefix: str, name: str, pairs: Path | None = None) -> dict[str, float]:
        """Emit and return FD / KID of ``pairs`` (None: the real test slices, the floor two real samples reach)."""
        sample = self.real_test if pairs is None else extract(self.features, generated_slices(pairs, self.axis))
        fd = frechet_distance(sample, self.real_train)
        kid, kid_std = kernel_distance(sample, self.real_train)
        emit(f"{prefix}.frechet_distance.segmenter.{name}", round(fd, 3), "", n=len(sample),
             n_reference=len(self.real_train), features=self.label)
        emit(f"{prefix}.kernel_distance.segmenter.{name}", round(kid, 5), "", std=round(kid_std, 5), n=len(sample))
        return {"fd": fd, "kid": kid}


def test_dice(prefix: str, run_dir: Path) -> float:
    """Emit and return the foreground-mean test Dice of a finished segmenter run."""
    summary = json.loads((run_dir / "test_metrics" / "summary.json").read_text(encoding="utf-8"))
    dice = summary["foreground_mean"]["dice"]
    emit(f"{prefix}.{run_dir.name}.test_dice", round(dice, 4), "dice",
         per_class={c: round(s["dice"]["mean"], 4) for c, s in summary["per_class"].items()},
         hd95=round(summary["foreground_mean"]["hd95"], 3), cases=summary["cases"])
    return dice


def emit_mean_dice(prefix: str, dice: dict[str, list[float]], reference: str = "real") -> None:
    """Mean ± std over seeds per training-data variant, and the difference to ``reference``."""
    for variant, values in dice.items():
        emit(f"{prefix}.{variant}.test_dice_mean", round(float(np.mean(values)), 4), "dice",
             std=round(float(np.std(values)), 4), seeds=len(values),
             delta_vs_real=round(float(np.mean(values) - np.mean(dice[reference])), 4))


def print_dice_table(dice: dict[str, list[float]]) -> None:
    """The Markdown table of test Dice per training-data variant, mean ± std over seeds."""
    print("\n| training data | test Dice (mean ± std over seeds) | seeds |\n|---|---|---|")
    for variant, values in dice.items():
        print(f"| {variant} | {np.mean(values):.4f} ± {np.std(values):.4f} | {len(values)} |")
