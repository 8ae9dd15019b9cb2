"""End-to-end jobs behind the CLI: train a run, then score it on its test split."""

from __future__ import annotations

import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from imgx3d.checkpoint import PREVIOUS_STAGE, Checkpoint, add_to_checkpoint, cascade_channels, load_checkpoint
from imgx3d.config import Config, save_config, to_dict
from imgx3d.data.catalog import Catalog, Split, find_cases, make_split
from imgx3d.data.demo import DEMO_LABELS, write_demo_dataset
from imgx3d.data.io import read_grid, read_label, strip_suffix
from imgx3d.data.labels import Regions
from imgx3d.data.slices import SliceBatches, slice_spacing
from imgx3d.data.transforms import (
    DeferredCase,
    PatchBatches,
    Preprocessor,
    check_case_grids,
    item_bytes,
    train_transforms,
)
from imgx3d.errors import CheckpointError, ConfigError, InputError
from imgx3d.evaluation.metrics import evaluate_folders, format_table
from imgx3d.evaluation.plots import overlay_montage
from imgx3d.evaluation.uncertainty import UNCERTAINTY_METRICS, UncertaintyScores, case_dice
from imgx3d.files import atomic_write_text
from imgx3d.inference.cascade import PreviousStage, RecordedStage, load_previous_stage
from imgx3d.inference.folder import predict_to_folder, prediction_path, write_prediction
from imgx3d.inference.postprocess import case_candidates, learn_postprocessing
from imgx3d.inference.predictor import Predictor
from imgx3d.methods.base import (
    Method,
    Segmenter,
    SelfValidating,
    build_method,
    load_method_state,
    regions_of,
)
from imgx3d.progress import tee_to_file
from imgx3d.resources import device_tags, resolve_device
from imgx3d.tracking import NullTracker, Tracker, flatten
from imgx3d.training import distributed
from imgx3d.training.trainer import Trainer, seed_everything

RESULT_FILE = "result.json"  # in a run folder once training and test scoring finished (rank 0)
LOG_FILE = "train.log"  # in every run folder: what the run printed, as it went (rank 0)
OVERLAY_CASES = 4  # contour montages of the first test cases, logged with the run
SPACING_CASES = 8  # training cases whose headers give the slice geometry of 2D runs
RANK_SEED_STRIDE = 1_000_003  # distributed rank r trains on seed + r * stride


@dataclass
class TrainResult:
    """What a finished training run produced."""

    run_dir: Path
    run_id: str | None
    best_val_dice: float
    steps: int
    stop_reason: str
    test_summary: dict[str, Any] | None
    rank: int = 0  # under torchrun: the process that returned this (only rank 0's has a test summary)

    def to_json(self) -> dict[str, Any]:
        """What ``result.json`` records (the test summary's foreground mean Dice, not the table)."""
        test = (self.test_summary or {}).get("foreground_mean", {}).get("dice")
        best = self.best_val_dice if math.isfinite(self.best_val_dice) else None
        return {"run_id": self.run_id, "best_val_dice": best, "steps": self.steps, "stop_reason": self.stop_reason,
                "test_dice_mean": test}


def _load_items(pre: Preprocessor, catalog: Catalog, ids: list[str], labels: bool = True,
                cache_gib: float | None = None) -> list[dict[str, Any] | DeferredCase]:
    """Preprocessed cases; ``labels=False`` never opens their label files (self-supervised training).

    With ``cache_gib`` the cases are loaded in order until they fill it; the rest stay on disk
    as :class:`DeferredCase` items, loaded when drawn (a cascade's with its stage's channels kept:
    :class:`~imgx3d.inference.cascade.RecordedStage`).
    """
    cases = catalog.by_id()
    if not labels:
        cases = {i: replace(cases[i], label=None) for i in ids}
    if cache_gib is None:
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(lambda i: pre.load_case(cases[i], catalog.labels, catalog.in_channels), ids))
    items: list[dict[str, Any] | DeferredCase] = []
    room = cache_gib * 2**30
    for case_id in ids:
        cascade = pre.previous_stage is not None  # its stage predicts every case now, kept in memory or not
        item = pre.load_case(cases[case_id], catalog.labels, catalog.in_channels) if room > 0 or cascade else None
        if room > 0:
            room -= item_bytes(item)
            if room >= 0:
                items.append(item)
                continue
        deferred_pre = pre
        if cascade:  # left on disk, the case keeps the stage's channels: drawn again (in a loader worker too,
            # which could not run the stage on a GPU), it is read, not predicted again
            deferred_pre = Preprocessor(pre.cfg, RecordedStage(item["image"][catalog.in_channels:]))
        items.append(DeferredCase(cases[case_id], deferred_pre, catalog.labels, catalog.in_channels))
    return items


def _extra_items(cfg: Config, catalog: Catalog, pre: Preprocessor, ctx: distributed.DistContext) -> list[dict[str, Any]]:
    """The generated pairs of ``data.extra`` (synth folders), as training items marked ``extra``.

    They are read as MSD-layout volumes without an intensity preset (synth writes [0, 1]
    images on the method's slice grid); their labels must be the dataset's.
    """
    extra_cfg = replace(cfg.data, mode="volume", layout="auto", preset="none", crop_air=None, labels={}, label_map={},
                        mask_threshold=None, spacing=None, image_dir="", label_dir="", channels=[], label_pattern="")
    items: list[dict[str, Any]] = []
    for root in cfg.data.extra:
        extra = find_cases(root, extra_cfg)
        if extra.labels != catalog.labels:
            raise InputError(f"{Path(root) / 'dataset.json'}: labels {extra.labels} differ from the dataset's "
                             f"{catalog.labels}; generate the pairs with a run trained on this dataset")
        ids = [c.case_id for c in extra.cases if c.label is not None][ctx.rank::ctx.world_size]
        extra_pre = Preprocessor(extra_cfg, pre.previous_stage)
        items += [{**item, "extra": True} for item in _load_items(extra_pre, extra, ids)]
    return items


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    # The main process decides when to stop (imgx3d.interrupts) and ends its workers itself; a
    # signal sent to the whole process group must not kill them under it mid-batch.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _batches(items: list[dict[str, Any]], cfg: Config, start_step: int, spatial_dims: int, rank: int = 0,
             pin_memory: bool = False, previous_channels: int = 0):
    """Training batches: 3D patches (the last ``previous_channels`` of the image a cascade's previous
    stage), or 2D slices through the slice adapter for 2D methods.

    Rank ``r`` of a torchrun job draws its own stream (seed offset by rank; rank 0 keeps the
    one-process stream) from its own shard of the training cases.
    """
    seed = cfg.seed + RANK_SEED_STRIDE * rank
    if spatial_dims == 2:
        dataset = SliceBatches(items, cfg.data.slices, cfg.data.flip_axes, cfg.data.batch_size, seed, start_step,
                               cfg.train.max_steps, cfg.data.extra_fraction)
    else:
        dataset = PatchBatches(items, train_transforms(cfg.data, previous_channels), cfg.data.batch_size, seed,
                               start_step, cfg.train.max_steps, cfg.data.extra_fraction, patch_size=cfg.data.patch_size,
                               ignore_label=cfg.data.ignore_label)
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.data.num_workers, worker_init_fn=_worker_init,
                        prefetch_factor=4 if cfg.data.num_workers else None, pin_memory=pin_memory)
    return iter(loader)


def _code_tags() -> dict[str, str]:
    """The imgx3d version, and the git commit of the working directory when it is a repository."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tags = {"imgx3d_version": version("imgx3d")}
    except PackageNotFoundError:
        tags = {"imgx3d_version": "unknown"}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return tags
    if commit.returncode == 0:
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
    return tags


def cv_group(cfg: Config) -> str:
    """The name shared by the folds of one cross-validation: the method and a digest of the config
    with the fold, the device and the tracking settings left out (what makes runs comparable)."""
    tree = to_dict(replace(cfg, data=replace(cfg.data, split=replace(cfg.data.split, fold=0))))
    tree.pop("tracking", None)
    tree.get("train", {}).pop("device", None)
    digest = hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cfg.method.name}-{cfg.data.split.folds}fold-{digest}"


def fold_fields(cfg: Config) -> dict[str, Any]:
    """A fold run's ``fold``, ``folds`` and ``cv_group`` (its mlflow tags and ``result.json`` fields); {} otherwise."""
    s = cfg.data.split
    return {"fold": s.fold, "folds": s.folds, "cv_group": cv_group(cfg)} if s.folds else {}


def _run_tags(cfg: Config, split: Split) -> dict[str, str]:
    s = cfg.data.split
    tags = {**_code_tags(), "method": cfg.method.name, "dataset": cfg.dataset, "seed": str(cfg.seed),
            "split": f"seed{s.seed}-test{s.test_fraction}" + (f"-fold{s.fold}of{s.folds}" if s.folds else ""),
            "n_train": str(len(split.train)), "n_val": str(len(split.val)), "n_test": str(len(split.test))}
    return {**tags, **{k: str(v) for k, v in fold_fields(cfg).items()}}


def train_run(cfg: Config, data_root: str | Path, run_dir: str | Path | None = None, resume: str | Path | None = None,
              test_at_end: bool = True, records: dict[str, str] | None = None,
              pause_after_minutes: float | None = None) -> TrainResult:
    """Train ``cfg`` on the dataset at ``data_root`` and evaluate on its held-out test cases.

    Under ``torchrun`` every rank calls this; training is data-parallel and rank 0 alone writes
    the run folder, logs to mlflow and scores the test split (the other ranks return no summary).

    Args:
        run_dir: output folder (default ``runs/<dataset>/<method>-<time>``).
        resume: a run folder or its ``last.pt``: continue that run exactly.
        test_at_end: predict the test split on the native grid and log per-class metrics.
        records: more files for the run folder and mlflow, name → text (a plan's ``plan.yaml`` and
            ``fingerprint.json``).
        pause_after_minutes: stop when the run's clock passes this (validated, ``last.pt`` saved, stop
            reason ``paused``, nothing scored, no ``result.json``): ``resume`` continues it to the budget.
    """
    ctx, dist_device = distributed.setup(cfg.train.device)
    finished = False
    try:
        result = _train_run(cfg, data_root, run_dir, resume, test_at_end, ctx, dist_device, records or {},
                            pause_after_minutes)
        finished = True
        return result
    finally:
        distributed.teardown(ctx, finished)


def _load_resume(resume: str | Path, cfg: Config, ctx: distributed.DistContext) -> Checkpoint:
    """The ``last.pt`` to resume from, checked against ``cfg``; rank 0 clears interrupted temp files."""
    resume = Path(resume)
    last = resume / "last.pt" if resume.is_dir() else resume
    if not last.is_file():
        raise CheckpointError(f"{resume}: no last.pt to resume from; pass the run folder of an earlier imgx3d train")
    ckpt = load_checkpoint(last)
    if ctx.is_main:
        for stale in [*last.parent.glob(".last.pt.*"), *last.parent.glob(".best.pt.*")]:
            stale.unlink()  # temp files of checkpoint writes the crash interrupted
    if ckpt.method_name != cfg.method.name:
        raise CheckpointError(f"{last}: was trained with method '{ckpt.method_name}', not "
                              f"'{cfg.method.name}'; resume with the run's own config")
    return ckpt


def _train_run(cfg: Config, data_root: str | Path, run_dir: str | Path | None, resume: str | Path | None,
               test_at_end: bool, ctx: distributed.DistContext, dist_device: torch.device | None,
               records: dict[str, str], pause_after_minutes: float | None = None) -> TrainResult:
    resume_ckpt = _load_resume(resume, cfg, ctx) if resume is not None else None
    if resume is not None:
        run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
    # the default folder name carries the time: rank 0's name for every rank
    run_dir = Path(ctx.broadcast(str(run_dir or Path("runs") / cfg.dataset /
                                     f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}")))
    seed_everything(cfg.seed)

    catalog = find_cases(data_root, cfg.data)
    split = make_split(catalog, cfg.data.split)
    previous = _previous_stage(cfg, split, resume_ckpt)
    method = build_method(cfg.method, catalog.num_classes, catalog.in_channels + cascade_channels(previous),
                          _regions(cfg, catalog))
    if previous is not None and method.spatial_dims != 3:
        raise ConfigError(f"data.cascade ({cfg.data.cascade}): method '{cfg.method.name}' sees slices, which have no "
                          "room for the first stage's channels; the cascade's next stage must be a 3D method")
    _record_ignore_label(cfg, catalog, method)
    _check_and_record(cfg, catalog, split, method, run_dir, ctx, records)
    with tee_to_file(run_dir / LOG_FILE, ctx.is_main):  # train.log: everything printed from here on
        if ctx.is_main:
            _print_plan(records)
        return _train_in_folder(cfg, catalog, split, method, run_dir, resume_ckpt, test_at_end, ctx, dist_device,
                                records, pause_after_minutes, previous)


def _previous_stage(cfg: Config, split: Split, resume_ckpt: Checkpoint | None) -> Checkpoint | None:
    """A cascade's low-resolution stage (``data.cascade``): the one a resumed run stored, else the named run's
    checkpoint (checked: a segmenter that trained on none of this run's validation and test cases)."""
    if not cfg.data.cascade:
        return None
    if resume_ckpt is not None and resume_ckpt.previous_stage is not None:
        return resume_ckpt.previous_stage
    return load_previous_stage(cfg.data.cascade, {"train": split.train, "val": split.val, "test": split.test})


def _regions(cfg: Config, catalog: Catalog) -> Regions | None:
    """The run's regions: ``data.regions``, else the region labels of the dataset's dataset.json, recorded in the
    run's config (the checkpoint, ``predict`` and ``evaluate --config`` read them there). None: label-based."""
    if not cfg.data.regions and catalog.regions:
        cfg.data.regions, cfg.data.region_labels = dict(catalog.regions), list(catalog.region_labels)
    return Regions.of(cfg.data, catalog.labels)


def _record_ignore_label(cfg: Config, catalog: Catalog, method: Method) -> None:
    """Record the dataset's ignore label in the run's config (``data.ignore_label``: the checkpoint, the
    validation and ``evaluate --config`` read it there).

    Raises:
        ConfigError: the method does not train on partial labels (``Method.partial_labels``).
    """
    if catalog.ignore_label is None:
        return
    if not method.partial_labels:
        raise ConfigError(f"{catalog.root}: the labels mark voxels not annotated (ignore label {catalog.ignore_label}),"
                          f" which method '{cfg.method.name}' ({method.spatial_dims}D) cannot train on; use the 3D "
                          "unet or label every voxel")
    cfg.data.ignore_label = catalog.ignore_label


def _train_in_folder(cfg: Config, catalog: Catalog, split: Split, method: Method, run_dir: Path,
                     resume_ckpt: Checkpoint | None, test_at_end: bool, ctx: distributed.DistContext,
                     dist_device: torch.device | None, records: dict[str, str],
                     pause_after_minutes: float | None, previous: Checkpoint | None = None) -> TrainResult:
    """Load the cases, train, score: the part of :func:`train_run` whose output ``train.log`` keeps."""
    device = dist_device or resolve_device(cfg.train.device, "train.device")
    stage = PreviousStage.from_checkpoint(previous, str(device)) if previous is not None else None
    pre = Preprocessor(cfg.data, stage)
    loading = time.perf_counter()
    # each rank holds only its shard of the training cases; validation cases are predicted by all ranks in turn
    train_items = _load_items(pre, catalog, split.train[ctx.rank::ctx.world_size], labels=method.plan.uses_labels,
                              cache_gib=cfg.data.cache_gib if method.spatial_dims == 3 else None)
    train_items += _extra_items(cfg, catalog, pre, ctx)
    val_ids = split.val[:cfg.train.val_cases] if cfg.train.val_cases else split.val  # the split's first N
    val_items = _load_items(pre, catalog, val_ids)  # every rank: each predicts its share of them
    if stage is not None and ctx.is_main:  # outside the training budget: say what it cost
        print(f"cascade: the low-resolution stage predicted {len(train_items) + len(val_items)} cases in "
              f"{time.perf_counter() - loading:.0f} s (before the budget's clock starts)")
    tracker: Tracker | NullTracker = NullTracker()
    if cfg.tracking.enabled and ctx.is_main:
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment or cfg.dataset,
                          run_name=run_dir.name, tags={**_run_tags(cfg, split), "processes": str(ctx.world_size)},
                          run_id=resume_ckpt.get("mlflow_run_id") if resume_ckpt else None)
    if ctx.is_main:
        tracker.keep_locally(run_dir / "mlflow_offline.jsonl")
        if cfg.tracking.system_metrics:
            tracker.monitor_system(cfg.tracking.system_metrics_seconds, resume=resume_ckpt is not None)
    meta = _checkpoint_meta(cfg, catalog, split, method, train_items, ctx, tracker.run_id)
    if previous is not None:
        meta[PREVIOUS_STAGE] = previous.state
    trainer = Trainer(cfg, method, run_dir, meta, tracker, device, ctx)
    tracker.set_tags(device_tags(device, trainer.autocast_dtype))
    if resume_ckpt is not None:
        trainer.restore(resume_ckpt.state)
    else:
        if ctx.enabled:  # ranks draw their own noise and timesteps
            torch.manual_seed(cfg.seed + RANK_SEED_STRIDE * ctx.rank)
        n_params = sum(p.numel() for p in method.parameters())
        tracker.log_params({**{k: v for k, v in flatten(to_dict(cfg)).items() if not isinstance(v, (list, dict))
                               or len(str(v)) < 100}, "n_parameters": n_params, "processes": ctx.world_size})
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "split.json")
        for name in records:
            tracker.log_artifact(run_dir / name)

    try:
        batches = _batches(train_items, cfg, trainer.state.step, method.spatial_dims, ctx.rank, device.type == "cuda",
                           stage.channels if stage is not None else 0)
        pause_s = None if pause_after_minutes is None else 60 * pause_after_minutes
        state = trainer.fit(batches, val_items, catalog.labels, pause_s)
        summary = None
        trainer.release()  # the test split is scored from best.pt: the training copy and optimisers go
        if state.stop_reason == "paused":
            tracker.end("FINISHED")  # a resume reopens the same mlflow run
            return TrainResult(run_dir, tracker.run_id, state.best_metric, state.step, state.stop_reason, None,
                               ctx.rank)
        if ctx.is_main:
            summary = _finish_run(cfg, run_dir, catalog, split, method, pre, tracker, state, test_at_end, device)
        result = TrainResult(run_dir, tracker.run_id, state.best_metric, state.step, state.stop_reason, summary,
                             ctx.rank)
        if ctx.is_main:
            print_result(result)
            tracker.log_artifact(run_dir / LOG_FILE)
        tracker.end("FINISHED")
    except BaseException:
        if ctx.is_main and (run_dir / LOG_FILE).is_file():
            tracker.log_artifact(run_dir / LOG_FILE)  # the log up to the interruption
        tracker.end("KILLED")
        raise
    if ctx.is_main:
        atomic_write_text(run_dir / RESULT_FILE, json.dumps({"method": cfg.method.name, **result.to_json(),
                                                             **fold_fields(cfg)}, indent=1))
    return result


def _print_plan(records: dict[str, str]) -> None:
    """A planned run's decisions (its ``plan.yaml``'s reasons), first in its log."""
    reasons = [line[2:] for line in records.get("plan.yaml", "").splitlines()[1:] if line.startswith("# ")]
    if reasons:
        print("\n".join(["plan:", *("  " + line for line in reasons)]), flush=True)


def print_result(result: TrainResult) -> None:
    """The finished run in a few lines: folder, mlflow run, steps, best validation Dice, the test table."""
    print(f"run folder: {result.run_dir}")
    if result.run_id:
        print(f"mlflow run: {result.run_id}")
    best = (f"{result.best_val_dice:.4f}" if result.best_val_dice > float("-inf")
            else "n/a (no validation cases, or the method reports no Dice)")
    print(f"steps: {result.steps} ({result.stop_reason}); best validation Dice: {best}")
    if result.test_summary and "per_class" in result.test_summary:
        print(f"test cases ({result.test_summary['cases']}), native grid:")
        print(format_table(result.test_summary))
    elif result.test_summary:  # a codec's own test metrics
        print("test: " + ", ".join(f"{k.removeprefix('test/')} {v:.4f}" for k, v in result.test_summary.items()))
    sys.stdout.flush()


def _check_and_record(cfg: Config, catalog: Catalog, split: Split, method: Method, run_dir: Path,
                      ctx: distributed.DistContext, records: dict[str, str]) -> None:
    """Refuse what cannot train (grids, too few cases for the ranks, a 3D method on 2D images); rank 0
    writes the run folder's ``split.json`` and complete ``config.yaml``."""
    unread = set() if method.plan.uses_labels else set(split.train)  # self-supervised: training labels stay closed
    check_case_grids([c for c in catalog.cases if c.label is not None and c.case_id not in unread])
    if len(split.train) < ctx.world_size:
        raise ConfigError(f"{len(split.train)} training case(s) cannot be shared by {ctx.world_size} processes; "
                          "use fewer processes (--nproc_per_node)")
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "split.json", json.dumps(split.to_json(), indent=1))
        save_config(cfg, run_dir / "config.yaml")
        for name, text in records.items():
            atomic_write_text(run_dir / name, text)
    if cfg.data.mode == "image" and method.spatial_dims != 2:
        raise ConfigError(f"method '{cfg.method.name}' is 3D; 2D images (--image) need a 2D method "
                          "(sdseg, vae, or unet with method.spatial_dims: 2)")


def _checkpoint_meta(cfg: Config, catalog: Catalog, split: Split, method: Method, train_items: list,
                     ctx: distributed.DistContext, mlflow_run_id: str | None) -> dict[str, Any]:
    """What every checkpoint stores besides config and weights: classes, channels, label names, the
    mlflow run, and for 2D methods the slices' spacing (what a generator's synthetic slices are written on)."""
    meta = {"num_classes": catalog.num_classes, "in_channels": catalog.in_channels, "labels": catalog.labels,
            "channel_names": catalog.channel_names, "mlflow_run_id": mlflow_run_id}
    if method.spatial_dims == 2:
        cases = catalog.by_id()
        grids = [read_grid(cases[i].images[0]) for i in split.train[ctx.rank::ctx.world_size][:SPACING_CASES]]
        meta["slice_spacing"] = slice_spacing(grids, [item["image"].shape[1:] for item in train_items], cfg.data.slices,
                                              cfg.data.spacing)
    return meta


def _finish_run(cfg: Config, run_dir: Path, catalog: Catalog, split: Split, method: Any, pre: Preprocessor,
                tracker: Tracker | NullTracker, state: Any, test_at_end: bool, device: torch.device
                ) -> dict[str, Any] | None:
    """Log the run's totals and best checkpoint, then score the test split (rank 0)."""
    totals = {"train/minutes": state.elapsed_s / 60, "train/steps": state.step}
    if math.isfinite(state.best_metric):  # no validation Dice: no validation cases, or a generator's run
        totals["val/best_dice_mean"] = state.best_metric
    tracker.log_metrics(totals, state.step)
    tracker.set_tags({"stop_reason": state.stop_reason})
    if isinstance(method, Segmenter) and cfg.infer.postprocess and split.val:
        learn_run_postprocessing(run_dir, catalog, split.val, tracker, state.step, str(device))
    tracker.log_artifact(run_dir / "best.pt", "checkpoint")
    if isinstance(method, Segmenter) and isinstance(tracker, Tracker) and cfg.tracking.log_model:
        log_mlflow_model(run_dir, catalog.in_channels, tracker, cfg.tracking.register)
    if not (test_at_end and split.test):
        return None
    if isinstance(method, Segmenter):
        return evaluate_test_split(run_dir, catalog, split, tracker, state.step, str(device))
    if not isinstance(method, SelfValidating):
        return None
    # a codec or a generator: its own metrics on the test volumes, best weights
    best = load_checkpoint(run_dir / "best.pt")
    load_method_state(method, best.weights, str(best.path))
    method.to(device)
    summary = method.validation_metrics(_load_items(pre, catalog, split.test), catalog.labels, cfg.data.slices)
    summary = {k.replace("val/", "test/"): v for k, v in summary.items()}
    tracker.log_metrics(summary, state.step)
    return summary


def log_mlflow_model(run_dir: Path, in_channels: int, tracker: Tracker, register: str = "") -> None:
    """Save the run as an mlflow model (``<run>/mlflow_model``), log it as the run's ``model``
    artifact, and register it under ``register`` when named."""
    from imgx3d.inference.mlflow_model import MODEL_ARTIFACT, save_mlflow_model  # mlflow.pyfunc: imported when used

    save_mlflow_model(run_dir / "best.pt", in_channels, run_dir / "mlflow_model")
    tracker.log_artifact(run_dir / "mlflow_model", MODEL_ARTIFACT)
    if register:
        uri = tracker.register_model(register, MODEL_ARTIFACT)
        if uri:
            print(f"registered as {uri}")


def learn_run_postprocessing(run_dir: Path, catalog: Catalog, val_ids: list[str], tracker: Tracker | NullTracker,
                             step: int, device: str = "auto") -> None:
    """Decide the run's postprocessing on its validation cases (``best.pt``'s raw predictions on the
    native grid) and store the decision and the per-case scores it came from in ``best.pt``
    (ensembles pool the scores) and ``postprocessing.json``."""
    predictor = Predictor.load(run_dir / "best.pt", device=device, postprocess=False)
    regions = regions_of(predictor.method)  # a region run decides per region (nnU-Net's rule)
    classes = [c for c in (regions.scored if regions else catalog.labels) if c != 0]
    cases = catalog.by_id()
    records = []
    for case_id in val_ids:
        prediction = predictor.predict_case(predictor.read(cases[case_id].images))
        reference = read_label(cases[case_id].label, predictor.config.data).array
        records.append(case_candidates(prediction.labels.array, reference, classes,
                                       predictor.config.data.ignore_label, regions))
    decision, dice = learn_postprocessing(records, classes)
    add_to_checkpoint(run_dir / "best.pt", postprocessing=decision.to_json(),
                      postprocessing_validation=[r.to_json() for r in records])
    atomic_write_text(run_dir / "postprocessing.json", json.dumps({**decision.to_json(), "validation_dice": dice,
                                                                  "cases": len(records)}, indent=1))
    tracker.log_metrics({"val/postprocessing_raw_dice_mean": dice["raw"],
                         "val/postprocessing_dice_mean": dice["postprocessed"]}, step)
    tracker.set_tags({"postprocessing": json.dumps(decision.to_json())})
    tracker.log_artifact(run_dir / "postprocessing.json")


def evaluate_test_split(run_dir: Path, catalog: Catalog, split: Split, tracker: Tracker | NullTracker,
                        step: int, device: str = "auto") -> dict[str, Any]:
    """Predict the test cases from ``best.pt`` on their native grid (on the training's ``device``), score, and log;
    with ``train.test_uncertainty``, the uncertainty is scored too (``test_metrics/uncertainty.json``)."""
    predictor = Predictor.load(run_dir / "best.pt", device=device)
    cases = catalog.by_id()
    pred_dir, ref_dir = run_dir / "test_predictions", run_dir / "test_references"
    ref_dir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    data_cfg = predictor.config.data
    overlays: list[Path] = []
    scores = UncertaintyScores(sorted(catalog.labels), data_cfg.ignore_label) \
        if predictor.config.train.test_uncertainty and regions_of(predictor.method) is None else None
    for case_id in split.test:  # predict per case so case ids follow the catalog, not file names
        case = cases[case_id]
        model_case = predictor.read(case.images)
        uncertain = scores is not None and predictor.whole_maps_fit(model_case)
        prediction = predictor.predict_case(model_case, probabilities=uncertain, uncertainty=uncertain)
        write_prediction(prediction, prediction_path(pred_dir, case_id, data_cfg), predictor.codec)
        reference = read_label(case.label, data_cfg).array
        entropy = None
        if uncertain:
            entropy = prediction.uncertainty.array[0]
            scores.add(case_id, prediction.labels.array, reference, entropy,
                       np.moveaxis(prediction.probabilities.array, 0, -1))
        if len(overlays) < OVERLAY_CASES:
            shown = None if entropy is None else entropy / math.log(max(len(catalog.labels), 2))
            overlays.append(overlay_montage(model_case.source.array[0], prediction.labels.array, catalog.labels,
                                            run_dir / "test_overlays" / f"{case_id}.png", reference=reference,
                                            title=case_id, uncertainty=shown))
        link = ref_dir / (case_id + case.label.name[len(strip_suffix(case.label.name)):])
        if not link.exists():
            link.symlink_to(Path(case.label).resolve())
    seconds = (time.perf_counter() - t0) / len(split.test)
    rows, summary = evaluate_folders(pred_dir, ref_dir, catalog.labels, output_dir=run_dir / "test_metrics",
                                     data_cfg=data_cfg)
    summary["seconds_per_volume"] = seconds
    metrics = {"test/seconds_per_volume": seconds}
    for name, stats in summary["per_class"].items():
        metrics.update({f"test/{m}/{name}": s["mean"] for m, s in stats.items()})
    metrics.update({f"test/{m}_mean": v for m, v in summary["foreground_mean"].items()})
    if scores is not None and scores.case_entropy:
        summary["uncertainty"] = _score_uncertainty(scores, rows, run_dir / "test_metrics" / "uncertainty.json")
        metrics.update({f"test/uncertainty/{k}": v for k, v in summary["uncertainty"].items()
                        if k in UNCERTAINTY_METRICS and v is not None and math.isfinite(v)})
    tracker.log_metrics(metrics, step)
    tracker.log_artifact(run_dir / "test_metrics", "test_metrics")
    if overlays:
        tracker.log_artifact(run_dir / "test_overlays", "test_overlays")
    atomic_write_text(run_dir / "test_metrics" / "table.txt", format_table(summary) + "\n")
    return summary


def _score_uncertainty(scores: UncertaintyScores, rows: list[dict], path: Path) -> dict[str, Any]:
    """The test split's uncertainty scores against each case's mean foreground Dice, written to ``path``
    (with the per-case rows); returned without them."""
    result = scores.result(case_dice(rows))
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return {k: v for k, v in result.items() if k != "per_case"}


def run_demo(cfg: Config, workdir: Path, n_cases: int) -> None:
    """Generate data, train, predict the held-out volumes to NIfTI, evaluate, print the table."""
    data = write_demo_dataset(workdir / "data", n_cases, seed=cfg.seed)
    print(f"demo data: {n_cases} volumes in {data}")
    result = train_run(cfg, data, workdir / "run", test_at_end=False)
    split = json.loads((result.run_dir / "split.json").read_text(encoding="utf-8"))
    inputs = [data / "imagesTr" / f"{case}.nii.gz" for case in split["test"]]
    pred_dir = workdir / "predictions"
    overlay_dir = workdir / "overlays"
    predict_to_folder(Predictor.load(result.run_dir / "best.pt"), inputs, pred_dir, overwrite=True,
                      overlay_dir=overlay_dir)
    ref_dir = workdir / "references"
    ref_dir.mkdir(exist_ok=True)
    for case in split["test"]:
        link = ref_dir / f"{case}.nii.gz"
        if not link.exists():
            link.symlink_to((data / "labelsTr" / f"{case}.nii.gz").resolve())
    _, summary = evaluate_folders(pred_dir, ref_dir, DEMO_LABELS, workdir / "evaluation")
    print(f"run folder: {result.run_dir}  (mlflow run {result.run_id})")
    print(f"trained {result.steps} steps ({result.stop_reason}); predictions for {len(inputs)} held-out volumes in {pred_dir}")
    print(format_table(summary))
    print(f"contour overlays of the predictions: {overlay_dir}")
