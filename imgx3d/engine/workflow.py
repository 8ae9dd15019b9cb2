"""End-to-end jobs behind the CLI: train a run, then score it on its test split."""

from __future__ import annotations

import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from imgx3d.config import Config, save_config, to_dict
from imgx3d.data.catalog import Catalog, Split, find_cases, make_split
from imgx3d.data.io import label_dtype, write_nifti
from imgx3d.data.slices import SliceBatches
from imgx3d.data.transforms import PatchBatches, Preprocessor, check_case_grids, train_transforms
from imgx3d.engine.infer import Predictor, resolve_device
from imgx3d.engine.metrics import evaluate_folders, format_table
from imgx3d.engine.tracking import NullTracker, Tracker, download_run_checkpoint, flatten
from imgx3d.engine.trainer import Trainer, seed_everything
from imgx3d.errors import CheckpointError
from imgx3d.methods.base import build_method, load_method_state


@dataclass
class TrainResult:
    """What a finished training run produced."""

    run_dir: Path
    run_id: str | None
    best_val_dice: float
    steps: int
    stop_reason: str
    test_summary: dict[str, Any] | None


def _load_items(pre: Preprocessor, catalog: Catalog, ids: list[str]) -> list[dict[str, Any]]:
    cases = catalog.by_id()
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda i: pre.load_case(cases[i], catalog.labels, catalog.in_channels), ids))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _batches(items: list[dict[str, Any]], cfg: Config, start_step: int, spatial_dims: int):
    """Training batches: 3D patches, or 2D slices through the slice adapter for 2D methods."""
    if spatial_dims == 2:
        dataset = SliceBatches(items, cfg.data.slices, cfg.data.flip_axes, cfg.data.batch_size, cfg.seed, start_step,
                               cfg.train.max_steps)
    else:
        dataset = PatchBatches(items, train_transforms(cfg.data), cfg.data.batch_size, cfg.seed, start_step,
                               cfg.train.max_steps)
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.data.num_workers, worker_init_fn=_worker_init,
                        prefetch_factor=4 if cfg.data.num_workers else None)
    return iter(loader)


def _run_tags(cfg: Config, split: Split) -> dict[str, str]:
    return {"method": cfg.method["name"], "dataset": cfg.dataset, "seed": str(cfg.seed),
            "split": f"seed{cfg.data.split.seed}-" + (f"fold{cfg.data.split.fold}of{cfg.data.split.folds}"
                                                       if cfg.data.split.folds else f"test{cfg.data.split.test_fraction}"),
            "n_train": str(len(split.train)), "n_val": str(len(split.val)), "n_test": str(len(split.test))}


def train_run(cfg: Config, data_root: str | Path, run_dir: str | Path | None = None, resume: str | Path | None = None,
              test_at_end: bool = True) -> TrainResult:
    """Train ``cfg`` on the dataset at ``data_root`` and evaluate on its held-out test cases.

    Args:
        run_dir: output folder (default ``runs/<dataset>/<method>-<time>``).
        resume: a run folder or its ``last.pt``: continue that run exactly.
        test_at_end: predict the test split on the native grid and log per-class metrics.
    """
    resume_ckpt = None
    if resume is not None:
        resume = Path(resume)
        last = resume / "last.pt" if resume.is_dir() else resume
        if not last.is_file():
            raise CheckpointError(f"{resume}: no last.pt to resume from; pass the run folder of an earlier imgx3d train")
        resume_ckpt = torch.load(last, map_location="cpu", weights_only=False)
        run_dir = last.parent
        if resume_ckpt.get("config", {}).get("method", {}).get("name") != cfg.method["name"]:
            raise CheckpointError(f"{last}: was trained with method '{resume_ckpt.get('method')}', not "
                                  f"'{cfg.method['name']}'; resume with the run's own config")
    run_dir = Path(run_dir or Path("runs") / cfg.dataset / f"{cfg.method['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    catalog = find_cases(data_root, cfg.data)
    split = make_split(catalog, cfg.data.split)
    check_case_grids([c for c in catalog.cases if c.label is not None])
    (run_dir / "split.json").write_text(json.dumps(split.to_json(), indent=1), encoding="utf-8")
    save_config(cfg, run_dir / "config.yaml")
    pre = Preprocessor(cfg.data)
    train_items = _load_items(pre, catalog, split.train)
    val_items = _load_items(pre, catalog, split.val)

    method = build_method(cfg.method, catalog.num_classes, catalog.in_channels)
    device = resolve_device(cfg.train.device)
    tracker: Tracker | NullTracker = NullTracker()
    if cfg.tracking.enabled:
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment or cfg.dataset,
                          run_name=run_dir.name, tags=_run_tags(cfg, split),
                          run_id=resume_ckpt.get("mlflow_run_id") if resume_ckpt else None)
    meta = {"num_classes": catalog.num_classes, "in_channels": catalog.in_channels, "labels": catalog.labels,
            "channel_names": catalog.channel_names, "mlflow_run_id": tracker.run_id}
    trainer = Trainer(cfg, method, run_dir, meta, tracker, device)
    if resume_ckpt is not None:
        trainer.restore(resume_ckpt)
    else:
        n_params = sum(p.numel() for p in method.parameters())
        tracker.log_params({**{k: v for k, v in flatten(to_dict(cfg)).items() if not isinstance(v, (list, dict))
                               or len(str(v)) < 100}, "n_parameters": n_params})
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "split.json")

    try:
        state = trainer.fit(_batches(train_items, cfg, trainer.state.step, method.spatial_dims), val_items,
                            catalog.labels)
        tracker.log_metrics({"train/minutes": state.elapsed_s / 60, "train/steps": state.step,
                             "val/best_dice_mean": state.best_metric}, state.step)
        tracker.set_tags({"stop_reason": state.stop_reason})
        tracker.log_artifact(run_dir / "best.pt", "checkpoint")
        summary = None
        if test_at_end and split.test and method.segments:
            summary = evaluate_test_split(run_dir, catalog, split, tracker, state.step)
        elif test_at_end and split.test:  # a codec: its own metrics on the test volumes, best weights
            best = run_dir / "best.pt"
            load_method_state(method, torch.load(best, map_location="cpu", weights_only=False)["model"], str(best))
            summary = method.validation_metrics(_load_items(pre, catalog, split.test), catalog.labels, cfg.data.slices)
            summary = {k.replace("val/", "test/"): v for k, v in summary.items()}
            tracker.log_metrics(summary, state.step)
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("KILLED")
        raise
    return TrainResult(run_dir, tracker.run_id, state.best_metric, state.step, state.stop_reason, summary)


def evaluate_test_split(run_dir: Path, catalog: Catalog, split: Split, tracker: Tracker | NullTracker,
                        step: int) -> dict[str, Any]:
    """Predict the test cases from ``best.pt`` on their native grid, score, and log."""
    predictor = Predictor.from_checkpoint(run_dir / "best.pt")
    cases = catalog.by_id()
    pred_dir, ref_dir = run_dir / "test_predictions", run_dir / "test_references"
    ref_dir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for case_id in split.test:  # predict per case so case ids follow the catalog, not file names
        case = cases[case_id]
        labelmap, _, ref = predictor.predict_paths(case.images)
        write_nifti(labelmap, pred_dir / f"{case_id}.nii.gz", ref, dtype=label_dtype(catalog.labels))
        link = ref_dir / f"{case_id}.nii.gz"
        if not link.exists():
            link.symlink_to(Path(case.label).resolve())
    seconds = (time.perf_counter() - t0) / len(split.test)
    rows, summary = evaluate_folders(pred_dir, ref_dir, catalog.labels, output_dir=run_dir / "test_metrics")
    summary["seconds_per_volume"] = seconds
    metrics = {"test/seconds_per_volume": seconds}
    for name, stats in summary["per_class"].items():
        metrics.update({f"test/{m}/{name}": s["mean"] for m, s in stats.items()})
    metrics.update({f"test/{m}_mean": v for m, v in summary["foreground_mean"].items()})
    tracker.log_metrics(metrics, step)
    tracker.log_artifact(run_dir / "test_metrics", "test_metrics")
    (run_dir / "test_metrics" / "table.txt").write_text(format_table(summary) + "\n", encoding="utf-8")
    return summary


def load_predictor(run: str, tracking_uri: str, device: str = "auto") -> Predictor:
    """A predictor from a checkpoint path, a run folder, or an mlflow run id."""
    path = Path(run)
    if path.is_file():
        return Predictor.from_checkpoint(path, device)
    if path.is_dir():
        return Predictor.from_checkpoint(path / "best.pt", device)
    with tempfile.TemporaryDirectory() as tmp:
        return Predictor.from_checkpoint(download_run_checkpoint(run, tracking_uri, Path(tmp)), device)

