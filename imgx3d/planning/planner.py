"""From a fingerprint to a complete, readable config: documented rules, each with its reason.

The rules follow nnU-Net's experiment planner (``nnunetv2/experiment_planning/
experiment_planners/default_experiment_planner.py``) where they can, and say where and why they
depart. One addition nnU-Net does not have: the plan fits a **compute budget** on the machine at
hand. Candidate (width, batch) plans are timed for a few real optimiser steps (at most
:data:`TIMING_SECONDS` in all) and the largest that still reaches :data:`ENOUGH_STEPS` steps
within the budget is kept.

Every decision is recorded as a :class:`Decision` (key, value, reason); ``imgx3d plan`` prints
them and writes the plan as a complete config.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml

from imgx3d.config import Config, load_config, to_dict
from imgx3d.errors import ResourceError
from imgx3d.methods.base import build_method
from imgx3d.planning.evidence import evidence as quote_evidence
from imgx3d.planning.fingerprint import Fingerprint
from imgx3d.registry import method_class
from imgx3d.resources import resolve_device

ANISO_THRESHOLD = 3.0  # nnU-Net: an axis is "anisotropic" beyond 3x the finest spacing
MIN_FEATURE_MAP = 4  # nnU-Net: no pooling below 4 voxels along an axis
MAX_LEVELS = 5  # levels of the U-Net (pooling steps + 1); nnU-Net allows more on large patches
MAX_WIDTH = 320  # nnU-Net's cap on feature maps per level
NONZERO_BACKGROUND = 0.75  # nnU-Net: normalise inside the non-zero mask when it covers < 75 % of the volume
# "Enough steps" for a 3D U-Net within the budget (evidence: enough_steps); a plan that cannot reach them is too
# large for its budget. The measured figures behind every rule are in evidence.yaml, quoted by the reasons.
ENOUGH_STEPS = 2000
# Context over steps: when no width and batch reach ENOUGH_STEPS, the patch stays the whole median case while the
# smallest reaches CONTEXT_STEPS, and shrinks only to reach it. A smaller patch buys more optimiser steps for about
# the same voxels seen, and loses context (evidence: context_over_steps).
CONTEXT_STEPS = 250
TIMING_SECONDS = 60.0  # the whole budget measurement
MIN_PATCH_SIDE = 32  # a shrunk patch keeps at least this many voxels along an axis (or the median extent)
PROBE_VOXELS = 64**3  # the calibration step's patch at most: cheap to time on any device
WIDTHS = (32, 24, 16)  # first-level feature maps tried, largest first (nnU-Net: 32)
# Features of the full-resolution level on top of MONAI's UNet (``method.full_res_features``): nnU-Net's
# first stage is at full resolution, MONAI's UNet convolves its input with stride 2 at once (evidence:
# full_res_features).
FULL_RES_FEATURES = 16
TRANSLATE = 4  # voxels of random patch shift planned where the patch covers the median case (data.translate)
TTA_SHIFTS = 2  # phase shifts averaged at inference by 3D methods (imgx3d.inference.predictor.predict_probabilities)
BATCHES = (4, 2)  # batch sizes tried (nnU-Net: 2, more when the patch is small)
SLICE_BATCHES = (16, 8, 4, 2)
SLICE_SCALES = (1, 2)  # in-plane resampling factors tried for the 2D U-Net rival of a thin-slab plan  # slices per step tried for per-slice methods (the shipped 2D configs use 8-16)
LATERAL_WORDS = {"left", "right"}
POSITION_WORDS = {"anterior", "posterior", "superior", "inferior", "upper", "lower", "dorsal", "ventral", "cranial",
                  "caudal"}
MIN_SLICE = 32  # the smallest slice side planned (smaller sides leave a latent method a few latent pixels)
# Thin-slab data (cardiac cine, prostate, many clinical MRI series): few thick slices. Recognised from the
# header (the coarsest spacing over ANISO_THRESHOLD x the finest) or, since converted headers often claim 1 mm
# slices, from the shape alone: at most THIN_SLAB_SLICES slices and at most 1/THIN_SLAB_RATIO of the in-plane extent.
THIN_SLAB_SLICES = 24
THIN_SLAB_RATIO = 4
# A race (imgx3d.training.race): each candidate plan trains for this share of the budget; the best on validation
# Dice continues from its checkpoint, so the losers cost (candidates - 1) x this share of the budget.
RACE_SHARE = 0.15
UNET_2D = {"spatial_dims": 2, "arch": "unet", "channels": [32, 64, 128, 256], "strides": [2, 2, 2],
           "num_res_units": 2, "full_res_features": 0, "norm": "instance"}  # configs/hippocampus/unet2d.yaml's network

# Mirroring by evidence (ordered_axes): two classes lie in the same order along an axis in at least this share of
# the cases where both appear, and in at least MIN_ORDERED_CASES of them (by chance, 10 of 10 cases agree with
# probability 2^-9 for one pair and axis; BraTS's 6 cases, where 2^-5 over 18 pairs and axes did find an "order"
# among tumour sub-regions, are too few)
ORDERED_SHARE = 0.95
MIN_ORDERED_CASES = 10
GPU_MEMORY_SHARE = 0.8  # a candidate may take this share of the GPU memory free when planning (the rest:
# validation, the loader's pinned batches, other processes' growth)

StepTimer = Callable[[Config], float]  # seconds per optimiser step of a candidate plan
PassTimer = Callable[[Config, tuple[int, ...]], float]  # seconds of one prediction pass (no TTA) over a model-space
# image of this shape
# Prediction's price: the plan keeps a median case's prediction, its TTA included, within this share of the training
# budget (at least MIN_PREDICT_SECONDS): shifts go first, then mirrors, until it fits (issue: TTA passes have a price).
PREDICT_SHARE = 0.01
# ... and all that is predicted after training (the last validation, the postprocessing decision's validation cases
# and the test split, TTA included) within this share of the budget (evidence: prediction_share)
PREDICT_TOTAL_SHARE = 0.05
MIN_PREDICT_SECONDS = 2.0


# The cascade (nnU-Net's 3d_lowres -> 3d_cascade_fullres, data.cascade): proposed when the patch covers less
# than this share of the median case; the low-resolution stage's spacing grows by LOWRES_SPACING_STEP
# (its finest axes first while others are over twice as coarse) until the patch covers this share of the
# median case at it (nnU-Net's lowres_creation_threshold and spacing_increase_factor)
LOWRES_COVERAGE = 0.25
LOWRES_SPACING_STEP = 1.03
LOWRES_SHARE = 1 / 3  # the share of a budget the low-resolution stage trains (the rest: the full-resolution stage)


class CandidateTooLarge(Exception):
    """Raised by a :data:`StepTimer` when a candidate does not fit the device's memory."""


@dataclass
class Decision:
    """One planning decision: the config key, the value chosen, and why."""

    key: str
    value: Any
    reason: str


@dataclass
class Plan:
    """A complete config (``tree``) and the decisions that made it."""

    tree: dict[str, Any]
    decisions: list[Decision] = field(default_factory=list)
    planned: dict[str, Any] = field(default_factory=dict)  # what was planned, for how long, where (written out)
    # other candidate plans a planned training races against this one (name → plan; see RACE_SHARE)
    rivals: dict[str, "Plan"] = field(default_factory=dict)
    name: str = "3d"  # this candidate's name in a race
    # a proposed low-resolution stage (lowres_stage): imgx3d plan writes it beside this plan
    cascade: "Plan | None" = None

    def decide(self, key: str, value: Any, reason: str) -> Any:
        """Set ``key`` (dotted) in the tree and record why."""
        node = self.tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        self.decisions = [d for d in self.decisions if d.key != key]  # a later decision replaces an earlier one
        self.decisions.append(Decision(key, value, reason))
        return value

    def override(self, changes: dict[str, Any] | list[tuple[str, Any]], reason: str) -> None:
        """Set keys over the plan, each recorded with ``reason``: a config tree (a file's; its ``method``
        section replaces the plan's when it names another method, as ``extends`` does) or (dotted key,
        value) pairs (the command line's)."""
        if isinstance(changes, dict):
            method = changes.get("method") or {}
            if method.get("name", self.tree["method"]["name"]) != self.tree["method"]["name"]:
                self.tree["method"] = {}
                self.rivals = {}  # another method: the race was between U-Net plans
            changes = list(_leaves(changes))
        if any(key.startswith(("method.", "data.patch_size", "data.slices")) for key, _ in changes):
            self.rivals = {}  # the network or window is set by hand: the plan the user shaped trains, unraced
            self.cascade = None  # and its coverage of the median case is no longer the planner's
        for rival in self.rivals.values():
            rival.override(changes, reason)
        if self.cascade is not None:  # the stage keeps its own spacing, minutes and (no) cascade
            self.cascade.override([(k, v) for k, v in changes if k not in ("data.spacing", "train.max_minutes",
                                                                         "data.cascade")], reason)
        for key, value in changes:
            node = self.tree
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node != value:  # the plan's own value stays the plan's decision
                self.decide(key, value, reason)

    def forget(self, key: str) -> None:
        """Remove ``key`` (dotted) and its decision: a re-planned network may no longer need it."""
        *parents, leaf = key.split(".")
        node = self.tree
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
        self.decisions = [d for d in self.decisions if d.key != key]

    def config(self, overrides: list[str] | None = None) -> Config:
        """The plan as a checked, complete :class:`Config` (``overrides``: ``key=value`` on top)."""
        return load_config(None, overrides, base=self.tree)

    def explain(self) -> list[str]:
        """One line per decision."""
        return [f"{d.key} = {d.value}: {d.reason}" for d in self.decisions]

    def to_yaml(self) -> str:
        """The complete config as YAML, the decisions as comments above it."""
        header = "\n".join(f"# {line}" for line in ["imgx3d plan: every decision and its reason", *self.explain()])
        body = {"planned": self.planned, **to_dict(self.config())} if self.planned else to_dict(self.config())
        return header + "\n" + yaml.safe_dump(body, sort_keys=False)


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a config tree: nested mappings merge key by key, as
    :func:`~imgx3d.config.merge_sections` merges them."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.extend(_leaves(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def target_spacing(fp: Fingerprint) -> tuple[np.ndarray, str]:
    """nnU-Net's rule: the median spacing per axis; for an anisotropic dataset (the coarse axis more
    than 3x the finest, and its median extent less than a third of the others'), the coarse axis
    at its 10th percentile instead (finer, so fewer cases are upsampled along it), not below the
    other axes."""
    spacings, shapes = fp.spacings, fp.shapes
    target = np.median(spacings, axis=0)
    size = np.median(shapes * spacings, axis=0) / target
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    if target[worst] > ANISO_THRESHOLD * target[others].min() and size[worst] * ANISO_THRESHOLD < size[others].min():
        coarse = max(float(np.percentile(spacings[:, worst], 10)), float(target[others].max()) + 1e-5)
        target[worst] = coarse
        return target, f"anisotropic: axis {worst} at the 10th percentile of its spacings (nnU-Net's rule)"
    return target, "the median spacing per axis (nnU-Net's rule)"


def topology(patch: np.ndarray, spacing: np.ndarray) -> tuple[list[list[int]], list[list[int]], np.ndarray]:
    """Per-level strides and kernels, and the patch rounded up to what the strides divide.

    nnU-Net's ``get_pool_and_conv_props``: an axis is pooled while its feature map stays at least
    ``2 * MIN_FEATURE_MAP`` and its spacing is at most twice the finest current spacing (a coarse
    axis waits until pooling the fine ones has caught up); its kernel is 1 while its spacing is more
    than twice the finest (no mixing across thick slices), else 3.
    """
    size, current = patch.astype(float).copy(), spacing.astype(float).copy()
    strides, kernels = [], []

    def kernel(spacing_now: np.ndarray) -> list[int]:
        return [3 if spacing_now[a] <= 2 * spacing_now.min() else 1 for a in range(3)]

    for _ in range(MAX_LEVELS - 1):
        pool = [bool(size[a] >= 2 * MIN_FEATURE_MAP and current[a] <= 2 * current.min()) for a in range(3)]
        if not any(pool):
            break
        kernels.append(kernel(current))
        strides.append([2 if p else 1 for p in pool])
        size = np.where(pool, size / 2, size)
        current = np.where(pool, current * 2, current)
    kernels.append(kernel(current))  # the bottom level
    divisor = np.prod(np.array(strides or [[1, 1, 1]]), axis=0)
    rounded = (np.ceil(patch / divisor) * divisor).astype(int)
    return strides, kernels, rounded


def planning_clock(budget_clock: str, device: str) -> Callable[[], float]:
    """The clock candidates are timed on: the run's budget clock (``train.budget_clock``: ``cpu`` is this
    process's CPU time, the same whatever else runs on the machine), wall time on a GPU."""
    return time.process_time if budget_clock == "cpu" and resolve_device(device).type != "cuda" else time.perf_counter


def measured_step_seconds(device: str, clock: Callable[[], float] = time.perf_counter) -> StepTimer:
    """A :data:`StepTimer` that trains the candidate for a few real steps on random tensors, timed by
    ``clock`` (see :func:`planning_clock`).

    On CUDA the candidate's peak memory is measured too: one that needs more than
    :data:`GPU_MEMORY_SHARE` of the memory free when planning, or runs out of memory, raises
    :class:`CandidateTooLarge` (nnU-Net sizes its patch against a reference GPU's memory; here the
    GPU at hand is measured).
    """
    from imgx3d.resources import autocast, choose_precision, gib, use_fast_cpu_kernels

    dev = resolve_device(device)
    free_bytes = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None

    def timer(cfg: Config) -> float:
        if dev.type != "cuda":
            return _time_steps(cfg)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            seconds = _time_steps(cfg)
        except torch.cuda.OutOfMemoryError:
            raise CandidateTooLarge(f"out of GPU memory ({gib(free_bytes)} free)") from None
        finally:
            torch.cuda.empty_cache()
        peak = torch.cuda.max_memory_allocated(dev)
        if peak > GPU_MEMORY_SHARE * free_bytes:
            raise CandidateTooLarge(f"needs {gib(peak)} of GPU memory, over {GPU_MEMORY_SHARE:.0%} of the "
                                    f"{gib(free_bytes)} free")
        return seconds

    def _time_steps(cfg: Config) -> float:
        method = build_method(cfg.method, 3, 1).to(dev).train()
        use_fast_cpu_kernels(method, dev, training=True)  # the trainer's step: its kernels, layout and precision
        precision = choose_precision(cfg.train.precision_setting(), dev)
        params = [p for group in method.parameter_groups().values() for p in group]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        size = cfg.data.slices.size if method.spatial_dims == 2 else cfg.data.patch_size
        shape = (cfg.data.batch_size, 1, *size)
        batch = {"image": torch.randn(shape, device=dev),
                 "label": torch.randint(0, 3, (shape[0], 1, *shape[2:]), device=dev)}
        main_stage = sum(stage.steps or 0 for stage in method.plan.stages[:-1])  # after a codec-first stage
        seconds = []
        for step in range(main_stage, main_stage + 4):  # the first is a warm-up (allocations, cuDNN autotuning)
            t0 = clock()
            with autocast(dev, precision):
                loss = sum(v for k, v in method.training_step(batch, step).items() if k.startswith("loss/"))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds.append(clock() - t0)
        return float(np.median(seconds[1:]))

    return timer


def measured_pass_seconds(device: str, clock: Callable[[], float] = time.perf_counter) -> PassTimer:
    """A :data:`PassTimer` that predicts a random model-space image with the candidate's untrained network by
    the rules ``imgx3d predict`` follows (windows, precision; no TTA) and times it: on a crop of two window
    batches (3D) or one slice batch (2D), the second of two runs, scaled to the batches of the whole image —
    a whole pass of a large case on a CPU can take a minute, longer than the rest of the planning."""
    from imgx3d.inference.predictor import InferSettings, Predictor

    def timer(cfg: Config, shape: tuple[int, ...]) -> float:
        crop, batches, crop_batches = _pass_crop(cfg, shape)
        method = build_method(cfg.method, 3, 1)
        predictor = Predictor(method, cfg, {0: "background", 1: "a", 2: "b"},
                              InferSettings.from_config(cfg.infer, device=device))
        image = torch.randn(1, *crop)
        seconds = []
        for _ in range(2):  # the first pays for allocations and kernel choices
            t0 = clock()
            predictor.model_space_classes(image)
            seconds.append(clock() - t0)
        return seconds[-1] * batches / crop_batches

    return timer


def _pass_crop(cfg: Config, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    """(the crop timed, forward batches of a pass over ``shape``, forward batches of a pass over the crop)."""
    if getattr(cfg.method, "spatial_dims", 3) == 2:
        axis, per_batch = cfg.data.slices.axis, cfg.data.slices.predict_batch
        crop = tuple(min(n, per_batch) if a == axis else n for a, n in enumerate(shape))
        return crop, int(np.ceil(shape[axis] / per_batch)), 1
    window = list(cfg.infer.roi_size or cfg.data.patch_size)
    interval = [max(1, int(w * (1 - cfg.infer.overlap))) for w in window]

    def windows(size: tuple[int, ...]) -> int:
        return int(np.prod([1 + max(0, int(np.ceil((n - w) / i))) for n, w, i in zip(size, window, interval)]))

    per_batch = cfg.infer.sw_batch_size
    crop = [min(n, w) for n, w in zip(shape, window)]
    for axis in np.argsort(shape)[::-1]:  # grow the longest axis first until the crop holds two batches
        while windows(tuple(crop)) < 2 * per_batch and crop[axis] < shape[axis]:
            crop[axis] = min(shape[axis], crop[axis] + interval[axis])
    return tuple(crop), int(np.ceil(windows(shape) / per_batch)), max(1, int(np.ceil(windows(tuple(crop)) / per_batch)))


def plan(fp: Fingerprint, method: str = "unet", budget_minutes: float = 30.0, device: str = "auto",
         step_timer: StepTimer | None = None, pass_timer: PassTimer | None = None,
         budget_clock: str = "wall") -> Plan:
    """The plan of ``method`` for the dataset ``fp`` describes, fitted to ``budget_minutes`` of training.

    Args:
        step_timer: seconds per step of a candidate config (default: measured on ``device``).
        pass_timer: seconds of one prediction pass (default: measured on ``device``; with a ``step_timer``
            given and no ``pass_timer``, prediction is taken as free).
        budget_clock: what the budget counts (``train.budget_clock``): the measurements and the planning
            time subtracted from the budget are on that clock (:func:`planning_clock`).
    """
    return plan_methods(fp, [method], budget_minutes, device, step_timer, pass_timer, budget_clock)[method]


def plan_methods(fp: Fingerprint, methods: list[str], budget_minutes: float = 30.0, device: str = "auto",
                 step_timer: StepTimer | None = None, pass_timer: PassTimer | None = None,
                 budget_clock: str = "wall") -> dict[str, Plan]:
    """The plans of several methods from **one** U-Net plan and budget measurement, so that a
    comparison of them shares the split, data section, budget and (3D) topology by construction."""
    clock = planning_clock(budget_clock, device)
    started = clock()
    if pass_timer is None:
        pass_timer = measured_pass_seconds(device, clock) if step_timer is None else (lambda cfg, shape: 0.0)
    plans = _plan_methods(fp, methods, budget_minutes, device, step_timer, clock)
    for result in plans.values():
        for candidate in [result, *result.rivals.values()]:
            _plan_prediction(candidate, fp, budget_minutes, pass_timer)
    planning_minutes = (clock() - started) / 60
    for result in plans.values():
        for candidate in [result, *result.rivals.values()]:
            _fit_whole_run(candidate, fp, budget_minutes, planning_minutes)
    if "unet" in plans:
        _propose_cascade(plans["unet"], fp)
    return plans


def _propose_cascade(result: Plan, fp: Fingerprint) -> None:
    """Attach :func:`lowres_stage` to a 3D U-Net plan whose patch covers little of the median case, and say so."""
    stage = lowres_stage(result, fp)
    if stage is None:
        return
    result.cascade = stage
    data, coverage = stage.tree["data"], patch_coverage(result, fp)
    result.planned["cascade"] = {"coverage": round(coverage, 4), "spacing": data["spacing"],
                                 "patch_size": data["patch_size"], "minutes": stage.tree["train"]["max_minutes"]}
    result.decisions.append(Decision(
        "planned.cascade", data["spacing"],
        f"the patch covers {coverage:.1%} of the median case, under nnU-Net's "
        f"{LOWRES_COVERAGE:.0%} for a cascade: a low-resolution stage at {data['spacing']} mm (patch "
        f"{data['patch_size']}, {stage.tree['train']['max_minutes']:g} minutes) is proposed, whose prediction "
        f"becomes this plan's extra input (data.cascade); not trained unless asked ({quote_evidence('cascade')})"))


def _split_sizes(cases: int, data: dict[str, Any]) -> tuple[int, int]:
    """(validation, test) cases of the planned split (``data.split``'s fractions of ``cases``)."""
    split = data.get("split") or {}
    test = int(round(cases * split.get("test_fraction", 0.2)))
    return int(round((cases - test) * split.get("val_fraction", 0.1))), test


def _plan_prediction(result: Plan, fp: Fingerprint, budget_minutes: float, pass_timer: PassTimer) -> None:
    """Measure one prediction pass of a median case and keep the TTA within :data:`PREDICT_SHARE` of the budget
    per case and all prediction after training within :data:`PREDICT_TOTAL_SHARE`: phase shifts are dropped
    first, then mirrors (the last axis first); the seconds per case are recorded
    (``planned.predict_seconds_per_case``) and printed."""
    _, median_shape = _target_grid(result, fp)
    shape = tuple(int(np.ceil(n)) for n in median_shape)
    cfg = result.config(["tracking.enabled=false"])
    one = pass_timer(cfg, shape)
    n_val, n_test = _split_sizes(len(fp.cases), result.tree["data"])
    per_case = max(MIN_PREDICT_SECONDS, PREDICT_SHARE * 60 * budget_minutes)
    # the last validation is one pass a case; the rest (postprocessing decision, test) pays the TTA
    total = (PREDICT_TOTAL_SHARE * 60 * budget_minutes - n_val * one) / max(1, n_val + n_test)
    limit = min(per_case, total)
    infer = result.tree.setdefault("infer", {})
    flips = list(infer.get("tta_flips") or [])
    spatial_dims = getattr(cfg.method, "spatial_dims", method_class(cfg.method.name).spatial_dims)
    shifts = int(infer.get("tta_shifts") or 1) if spatial_dims == 3 else 1

    def seconds() -> float:
        return one * 2 ** len(flips) * shifts

    planned = seconds()
    dropped = []
    while seconds() > limit and (shifts > 1 or flips):
        if shifts > 1:
            shifts = 1
            dropped.append("the phase shifts")
        else:
            dropped.append(f"the axis-{flips.pop()} mirror")
    passes = 2 ** len(flips) * shifts
    within = "within" if seconds() <= limit else "over, even without TTA,"
    rule = (f"{PREDICT_SHARE:.0%} of the budget per case" if limit == per_case else
            f"{PREDICT_TOTAL_SHARE:.0%} of the budget for the {n_val} validation and {n_test} test cases "
            "predicted after training")
    why = (f"a median case {list(shape)} takes {one:.2f} s a pass, {seconds():.1f} s with {passes} TTA pass(es), "
           f"{within} {rule} ({max(limit, 0):.1f} s a case)")
    if dropped:
        why += f"; {planned:.1f} s with the full TTA, so {', '.join(dropped)} dropped"
        result.decide("infer.tta_flips", flips, why)
        if "tta_shifts" in infer:
            result.decide("infer.tta_shifts", shifts, why)
    result.planned["predict_seconds_per_case"] = round(seconds(), 2)
    result.planned["predict_seconds_per_pass"] = round(one, 3)
    result.decisions.append(Decision("planned.predict_seconds_per_case", round(seconds(), 2), why))


def _fit_whole_run(result: Plan, fp: Fingerprint, budget_minutes: float, planning_minutes: float) -> None:
    """Training minutes such that planning, training with its validations, the final validation, the
    postprocessing decision and the test split's scoring together keep to the budget."""
    n_val, n_test = _split_sizes(len(fp.cases), result.tree["data"])
    one = result.planned["predict_seconds_per_pass"]
    per_case = result.planned["predict_seconds_per_case"]
    after = (n_val * one + (n_val + n_test) * per_case) / 60  # last validation (no TTA), postprocessing, test
    minutes = max(0.5 * budget_minutes, budget_minutes - planning_minutes - after)
    result.decide("train.max_minutes", round(minutes, 2),
                  f"the {budget_minutes:g}-minute budget less planning ({planning_minutes:.1f} min) and what follows "
                  f"training ({after:.1f} min: {n_val} validation and {n_test} test cases predicted), so the whole "
                  "run keeps to the budget (at least half of it trains)")


def _plan_methods(fp: Fingerprint, methods: list[str], budget_minutes: float, device: str,
                  step_timer: StepTimer | None, clock: Callable[[], float] = time.perf_counter) -> dict[str, Plan]:
    """The plans, before prediction is priced (see :func:`plan_methods`)."""
    base = Plan({"dataset": fp.dataset, "seed": 0, "method": {"name": "unet"}, "data": copy.deepcopy(fp.reading)})
    _plan_data(base, fp)
    measured_on = (f"{resolve_device(device)}, {torch.get_num_threads()} threads"
                   + (", CPU time" if clock is time.process_time else "") if step_timer is None else "a given step timer")
    step_timer = step_timer or measured_step_seconds(device, clock)
    if fp.reading.get("mode") == "image":  # 2D images: one-slice volumes, planned as slices from the start
        _plan_training(base, budget_minutes)
        base = _slice_unet(base, fp, 2, "2D images", budget_minutes, step_timer)
        base.planned = {"dataset": fp.dataset, "cases": len(fp.cases), "budget_minutes": budget_minutes,
                        "measured_on": measured_on}
        plans = {m: copy.deepcopy(base) for m in methods}
        for method in methods:
            if method != "unet":
                _adapt(plans[method], fp, method, budget_minutes, step_timer)
        return plans
    _plan_network(base, fp)
    _plan_budget(base, fp, budget_minutes, step_timer)
    _plan_training(base, budget_minutes)
    base.planned = {"dataset": fp.dataset, "cases": len(fp.cases), "budget_minutes": budget_minutes,
                    "measured_on": measured_on}
    plans = {}
    for method in methods:
        plans[method] = copy.deepcopy(base)
        if method != "unet":
            _adapt(plans[method], fp, method, budget_minutes, step_timer)
    if "unet" in plans:
        axis, evidence = thin_slab_axis(fp)
        if axis is not None:
            plans["unet"].rivals["2d"] = _slice_unet(base, fp, axis, evidence, budget_minutes, step_timer)
    return plans


def _slice_unet(base: Plan, fp: Fingerprint, axis: int, evidence: str, budget_minutes: float,
                step_timer: StepTimer) -> Plan:
    """The 2D U-Net on slices across the thin axis (nnU-Net's ``2d`` configuration), the rival of a thin-slab 3D
    plan: which of the two learns more in the budget is measured by racing them (``imgx3d.training.race``)."""
    result = copy.deepcopy(base)
    result.name, result.rivals = "2d", {}
    for key in ("infer.tta_shifts", "data.translate", "data.patch_size", "method.kernel_size",
                "method.full_res_features", "method.channels", "method.strides", "method.arch"):
        result.forget(key)
    result.tree["method"] = {"name": "unet"}
    result.decide("method.spatial_dims", 2, "2D images: the 2D U-Net" if evidence == "2D images" else
                  f"thin-slab data ({evidence}): the 2D U-Net on its slices, raced against the 3D plan (nnU-Net "
                  "trains both and keeps the better)")
    for key, value in UNET_2D.items():
        if key != "spatial_dims":
            result.decide(f"method.{key}", value, "configs/hippocampus/unet2d.yaml's 2D network")
    _, median_shape = _target_grid(result, fp)
    plane = [a for a in range(3) if a != axis]
    multiple = 2 ** len(UNET_2D["strides"])
    flips = [a for a in base.tree["data"]["flip_axes"] if a != axis]
    result.decide("data.flip_axes", flips, "the 3D plan's in-plane mirrors")
    result.decide("infer.tta_flips", flips, "the training's mirrors, averaged at inference")
    result.decide("data.slices.axis", axis, "slices across the thin axis")
    full = [int(max(MIN_SLICE, np.ceil(median_shape[a] / multiple) * multiple)) for a in plane]
    for factor in SLICE_SCALES:  # whole slices, at a coarser in-plane grid when the budget is short
        size = [int(max(MIN_SLICE, np.ceil(n / factor / multiple) * multiple)) for n in full]
        coarser = "" if factor == 1 else (f", resampled {factor}x coarser in-plane: at full resolution no batch "
                                          f"reached {ENOUGH_STEPS} steps")
        result.decide("data.slices.size", size, f"the in-plane median shape {full} rounded up to what the strides "
                                                f"divide ({multiple}): whole slices, as nnU-Net's 2D patch{coarser}")
        if _plan_slice_batch(result, budget_minutes, step_timer) >= ENOUGH_STEPS or min(size) <= MIN_SLICE:
            break
    return result


def _adapt(result: Plan, fp: Fingerprint, method: str, budget_minutes: float, step_timer: StepTimer) -> None:
    """Another method on the U-Net's plan: the same data section, split and budget; a 3D method takes
    the U-Net's topology (the keys its config shares: levels, widths, strides), so comparisons are
    fair by construction; a per-slice method gets the 2D plan."""
    cls = method_class(method)
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    unet = result.tree["method"]
    shared = {k: v for k, v in unet.items() if k in fields and k != "name"}
    if "strides" in shared and any(isinstance(s, list) for s in shared["strides"]):
        shared["strides"] = [max(s) if isinstance(s, list) else s for s in shared["strides"]]
        result.decisions.append(Decision("method.strides", shared["strides"], f"{method}'s backbone pools every axis "
                                         "alike: the U-Net's levels with isotropic strides"))
    result.tree["method"] = {"name": method}
    spatial_dims = cls.spatial_dims
    if spatial_dims == 3:
        result.tree["method"].update(shared)
        unshared = " (not its full-resolution level on top: the method's network has none)" \
            if unet.get("full_res_features") and "full_res_features" not in fields else ""
        result.decisions.append(Decision("method", method, f"the U-Net plan's topology ({', '.join(sorted(shared))})"
                                         f"{unshared} and data section: the same network levels, a fair comparison"))
        return
    for key in ("infer.tta_shifts", "data.translate"):  # per-slice methods resize their slices: neither applies
        result.forget(key)
    spacing, median_shape = _target_grid(result, fp)
    axis = int(np.argmax(spacing)) if spacing.max() > spacing.min() * 1.01 else 2
    plane = [a for a in range(3) if a != axis]
    multiple = build_method(result.tree["method"], len(fp.classes) + 1, len(fp.channels)).size_multiple()
    size = [int(max(MIN_SLICE, np.ceil(median_shape[a] / multiple) * multiple)) for a in plane]
    result.decide("data.slices.axis", axis, "slices across the coarsest axis (axial when isotropic)")
    median_plane = np.ceil(median_shape[plane]).astype(int).tolist()
    result.decide("data.slices.size", size, f"the in-plane median shape ({median_plane}) rounded up to what "
                                            f"{method}'s networks divide ({multiple}: their downsampling, a latent "
                                            f"codec's included), at least {MIN_SLICE}")
    result.decisions.append(Decision("method", method, "a per-slice method: the 2D plan with the U-Net plan's data "
                                     "section and budget (its own network defaults)"))
    _plan_slice_batch(result, budget_minutes, step_timer)


def _plan_slice_batch(result: Plan, budget_minutes: float, step_timer: StepTimer) -> int:
    """Slices per step of a per-slice method: the largest of :data:`SLICE_BATCHES` whose measured step (the
    method's main stage, after any codec-first stage, on its own network defaults) still reaches
    ``ENOUGH_STEPS`` in the budget — the U-Net's rule applied to the method's own step. The smallest is timed
    first; a larger one it predicts under half the target is not timed. Returns the chosen batch's steps."""
    timing = _Timing(step_timer, budget_minutes)

    def trial(batch: int) -> Plan:
        candidate = copy.deepcopy(result)
        candidate.tree["data"]["batch_size"] = batch
        return candidate

    smallest = SLICE_BATCHES[-1]  # timed first: it must fit, and it predicts the others (linear in the slices)
    measured = {smallest: timing.measure(trial(smallest), f"batch {smallest}", required=True)}
    for batch in SLICE_BATCHES:
        if batch not in measured:
            predicted = measured[smallest] * smallest // batch
            if predicted < ENOUGH_STEPS / 2:
                timing.tried.append(f"batch {batch}: predicted {predicted} steps, not timed")
                continue
            measured[batch] = timing.measure(trial(batch), f"batch {batch}")
        steps = measured[batch]
        if steps is not None and (steps >= ENOUGH_STEPS or batch == smallest or timing.out_of_time()):
            reach = "the largest reaching" if steps >= ENOUGH_STEPS else "the smallest: none reached"
            result.decide("data.batch_size", batch, f"{reach} {ENOUGH_STEPS} steps of the method's main stage in "
                                                    f"{budget_minutes:g} minutes (measured: {timing.measured})")
            return steps
    return 0


def mirror_axes(class_names: list[str]) -> tuple[list[int], str]:
    """Mirroring axes (RAS): every axis, as nnU-Net, except where the class names carry the position a
    mirror would swap — left/right names keep axis 0, and any other position word (anterior, superior,
    upper, ...) keeps axes 1 and 2 — since a mirrored patch would then teach the wrong class."""
    words = {w for name in class_names for w in re.split(r"[^a-z]+", name.lower())}
    sided, placed = bool(words & LATERAL_WORDS), bool(words & POSITION_WORDS)
    axes = [a for a in range(3) if not (a == 0 and sided) and not (a > 0 and placed)]
    if not (sided or placed):
        return axes, "every axis (nnU-Net's default): no class is named by its position"
    named = " and ".join(w for w, hit in (("side", sided), ("position", placed)) if hit)
    return axes, (f"{f'axes {axes} only' if axes else 'no mirroring'}: classes named by {named} would swap under "
                  f"the other mirrors (nnU-Net mirrors every axis; {quote_evidence('mirror_every_axis')})")


def ordered_axes(fp: Fingerprint) -> tuple[list[int], str]:
    """RAS axes along which two classes lie in a fixed order in (nearly) every case — the right kidney to the
    right of the left one, the liver above the kidneys, the right ventricle beside the left — with the
    pair that shows it. Mirroring such an axis shows the network arrangements no patient has, and where
    the classes differ only by position it teaches the wrong class. Read from the labels' centroids, so
    it needs no class names (converted data often has none)."""
    names = {str(c.value): c.name for c in fp.classes}
    ordered, evidence = [], []
    for axis in range(3):
        for a, b in itertools.combinations(names, 2):
            gaps = np.array([c.centroids[a][axis] - c.centroids[b][axis] for c in fp.cases
                             if a in c.centroids and b in c.centroids])
            same_side = max(np.mean(gaps > 0), np.mean(gaps < 0)) if len(gaps) >= MIN_ORDERED_CASES else 0.0
            if same_side >= ORDERED_SHARE:
                ordered.append(axis)
                evidence.append(f"axis {axis}: {names[a]} on the {'+' if np.median(gaps) > 0 else '-'} side of "
                                f"{names[b]} in {same_side:.0%} of {len(gaps)} cases")
                break  # one pair is evidence enough for this axis
    return ordered, "; ".join(evidence)


def _plan_data(result: Plan, fp: Fingerprint) -> None:
    spacing, why = target_spacing(fp)
    if np.allclose(fp.spacings, spacing, atol=1e-3):
        result.decide("data.spacing", None, f"every case is already at {spacing.round(3).tolist()} mm ({why}): "
                                            "no resampling")
    else:
        result.decide("data.spacing", [round(float(s), 4) for s in spacing], why)
    if fp.modality == "CT":
        ch = fp.channels[0]
        result.decide("data.preset", "ct", "CT (names or Hounsfield intensities)")
        result.decide("data.ct_window", [round(ch.p00_5, 1), round(ch.p99_5, 1)],
                      "the foreground's 0.5 / 99.5 percentiles (nnU-Net's CT clip; scaled to [0, 1] rather than "
                      "z-scored: an affine map of the same clipped range, which the first normalisation layer absorbs)")
    else:
        result.decide("data.preset", "mri", f"{fp.modality}: per-case z-score (nnU-Net's default scheme)")
        result.decide("data.mri_norm", "zscore", "per case and channel")
        nonzero = float(np.median([c.nonzero_fraction for c in fp.cases]))
        result.decide("data.mri_nonzero", nonzero < NONZERO_BACKGROUND,
                      f"the non-zero region covers {nonzero:.0%} of a median volume (nnU-Net: inside the mask when "
                      f"under {NONZERO_BACKGROUND:.0%})")
    axes, why = mirror_axes([c.name for c in fp.classes])
    ordered, evidence = ordered_axes(fp)
    if set(ordered) & set(axes):
        axes = [a for a in axes if a not in ordered]
        why = (f"{f'axes {axes} only' if axes else 'no mirroring'}: classes keep their order along the others in "
               f"the labels ({evidence}); by name: {why}")
    result.decide("data.flip_axes", axes, why)
    result.decide("infer.tta_flips", axes, "the training's mirrors, averaged at inference")
    result.decide("infer.tta_shifts", TTA_SHIFTS,
                  "the volume also predicted shifted by 1 voxel along every axis (another phase of the network's "
                  f"pooling grid) and the maps averaged, at each mirroring, for twice the inference time: "
                  f"{quote_evidence('tta_shifts')}")
    result.decide("data.affine_prob", 0.2, "random rotation (±15°) and scaling (±15 %) with probability 0.2 "
                                           "(nnU-Net: p 0.2, ±30°, 0.7-1.4; milder here for minute-long budgets: "
                                           f"{quote_evidence('augmentation')})")
    result.decide("data.pos_fraction", 0.67, "two thirds of the patches centred on foreground (nnU-Net forces 1/3; "
                                             "more here: short runs see fewer patches)")
    result.decide("data.num_workers", 1, "one loader process prepares batches while the model trains")
    result.decide("data.split", {"seed": 0, "test_fraction": 0.2, "val_fraction": 0.1},
                  "a held-out 20 % test split, 10 % of the rest to validate (seeded: the same split for every method; "
                  f"{quote_evidence('train_on_validation')}, at the price of the best checkpoint and the learned "
                  "postprocessing)")


def thin_slab_axis(fp: Fingerprint) -> tuple[int | None, str]:
    """The slice axis of thin-slab data (see :data:`THIN_SLAB_SLICES`) and the evidence, or (None, "")."""
    spacing, shape = np.median(fp.spacings, axis=0), np.median(fp.shapes, axis=0)
    coarse = int(np.argmax(spacing))
    finest = min(spacing[a] for a in range(3) if a != coarse)
    if spacing[coarse] > ANISO_THRESHOLD * finest:
        return coarse, (f"axis {coarse} at {spacing[coarse]:.3g} mm, {spacing[coarse] / finest:.1f}x the in-plane "
                        f"{finest:.3g} mm (header)")
    thin = int(np.argmin(shape))
    in_plane = min(shape[a] for a in range(3) if a != thin)
    if shape[thin] <= THIN_SLAB_SLICES and shape[thin] * THIN_SLAB_RATIO <= in_plane:
        return thin, (f"axis {thin} has {shape[thin]:.0f} slices against {in_plane:.0f} voxels in-plane (shape; the "
                      f"header's {spacing[thin]:.3g} mm slices are not trusted)")
    return None, ""


def _target_grid(result: Plan, fp: Fingerprint) -> tuple[np.ndarray, np.ndarray]:
    """The spacing the topology is planned on and the median case shape at the planned spacing (voxels, RAS).

    The topology spacing is the planned one, except along the slice axis of data recognised as thin-slab by its
    shape alone (:func:`thin_slab_axis`): there it is taken as at least :data:`ANISO_THRESHOLD` x the finest, so
    that axis gets nnU-Net's anisotropic treatment (in-plane kernels, pooled last) whatever the header claims.
    """
    spacing = np.asarray(result.tree["data"]["spacing"] or np.median(fp.spacings, axis=0), dtype=float)
    median_shape = np.median(fp.shapes * fp.spacings, axis=0) / spacing
    axis, _ = thin_slab_axis(fp)
    if axis is not None:
        spacing = spacing.copy()
        spacing[axis] = max(spacing[axis], ANISO_THRESHOLD * 1.01 * min(spacing[a] for a in range(3) if a != axis))
    return spacing, median_shape


def shrink_patch(patch: np.ndarray, median_shape: np.ndarray, spacing: np.ndarray, max_voxels: float) -> np.ndarray:
    """The patch reduced to at most ``max_voxels`` by nnU-Net's rule (``plan_experiment``): the axis
    largest relative to the median shape loses what its strides divide, and the topology is derived
    again, until it fits — or no axis can lose more without dropping below :data:`MIN_PATCH_SIDE`
    voxels (or its median extent, if smaller): a window without context segments nothing, so a
    budget too small for it gets fewer steps instead."""
    floor = np.minimum(MIN_PATCH_SIDE, np.ceil(median_shape))
    strides, _, patch = topology(np.asarray(patch), spacing)
    while np.prod(patch) > max_voxels:
        divisor = np.prod(np.array(strides or [[1, 1, 1]]), axis=0)
        axes = [a for a in np.argsort(-(patch / median_shape)) if patch[a] - divisor[a] >= floor[a]]
        if not axes:
            break
        patch = patch.copy()
        patch[axes[0]] -= divisor[axes[0]]
        strides, _, patch = topology(patch, spacing)
    return patch


def _plan_network(result: Plan, fp: Fingerprint, patch: np.ndarray | None = None, why_patch: str = "") -> None:
    """Topology and patch: the median case shape (or ``patch``, a shrunk one) rounded up to what the strides divide."""
    spacing, median_shape = _target_grid(result, fp)
    strides, kernels, rounded = topology(np.ceil(median_shape) if patch is None else patch, spacing)
    result.decide("data.patch_size", rounded.tolist(), why_patch or
                  f"the median shape at the target spacing ({np.ceil(median_shape).astype(int).tolist()}), rounded up "
                  "to what the strides divide: every window sees a whole median case (nnU-Net starts from it too)")
    if patch is None:
        result.decide("data.translate", TRANSLATE,
                      f"each patch shifted by a random -{TRANSLATE} … {TRANSLATE} voxels per axis (every phase of the "
                      "8-voxel grid of 3 poolings, the hippocampus's): a case smaller than the patch is otherwise "
                      f"always centred in it, at one phase; {quote_evidence('translate')}")
    else:
        result.decide("data.translate", 0, "the patch is smaller than the median case: its random crops already place "
                                           "cases at every phase of the network's pooling grid")
    isotropic = all(k == [3, 3, 3] for k in kernels) and all(len(set(s)) == 1 for s in strides)
    if isotropic:
        result.forget("method.kernel_size")
        result.decide("method.arch", "unet", "isotropic kernels: MONAI's residual UNet (the hippocampus baseline's)")
        result.decide("method.strides", [s[0] for s in strides], f"{len(strides)} poolings while every axis stays "
                                                                 f">= {2 * MIN_FEATURE_MAP} voxels")
        result.decide("method.full_res_features", FULL_RES_FEATURES,
                      f"a level of {FULL_RES_FEATURES} features at full resolution on top (nnU-Net's first stage is "
                      f"at full resolution; MONAI's UNet pools its input at once): {quote_evidence('full_res_features')}")
    else:
        result.forget("method.full_res_features")  # DynUNet's first level is at full resolution already
        result.decide("method.arch", "dynunet", "per-axis kernels or strides: MONAI's DynUNet (nnU-Net's network)")
        result.decide("method.strides", strides, "per axis: pool an axis only while it stays large enough and not "
                                                 "much coarser than the finest (nnU-Net's rule)")
        result.decide("method.kernel_size", kernels, "3, and 1 along an axis more than twice as coarse as the finest "
                                                     "(nnU-Net's rule)")
    result.decide("method.num_res_units", 2, "two residual units per block (the baseline's)")
    result.decide("method.norm", "instance", "instance norm (nnU-Net's)")


def patch_coverage(result: Plan, fp: Fingerprint) -> float:
    """The share of the median case (at the planned spacing) one training patch covers (at most 1)."""
    _, median_shape = _target_grid(result, fp)
    patch = np.asarray(result.tree["data"]["patch_size"], dtype=float)
    return float(np.prod(np.minimum(patch, median_shape)) / np.prod(median_shape))


def lowres_stage(result: Plan, fp: Fingerprint, threshold: float = LOWRES_COVERAGE) -> Plan | None:
    """A cascade's low-resolution stage for a 3D plan whose patch covers under ``threshold`` (default
    :data:`LOWRES_COVERAGE`) of the median case (nnU-Net's ``3d_lowres``), or None when the patch covers enough.

    Its spacing grows as nnU-Net's does until the plan's patch covers ``threshold`` of the median case
    at it; its patch is the median case there (rounded to what its strides divide), shrunk by nnU-Net's rule to
    at most the full-resolution patch's voxels, so a step costs no more than one of the full-resolution stage;
    width and batch are the plan's. Its training minutes are :data:`LOWRES_SHARE` of the plan's; the
    full-resolution stage then trains the rest with ``data.cascade`` naming the stage's run.
    """
    if result.tree["method"].get("spatial_dims", 3) != 3 or fp.reading.get("mode") == "image":
        return None  # slices and 2D images: no patch of a volume to cover
    coverage = patch_coverage(result, fp)
    if coverage >= threshold:
        return None
    spacing = np.asarray(result.tree["data"]["spacing"] or np.median(fp.spacings, axis=0), dtype=float)
    _, median_shape = _target_grid(result, fp)
    extent = median_shape * spacing  # mm
    patch = np.asarray(result.tree["data"]["patch_size"], dtype=float)
    low = spacing.copy()
    while np.prod(np.minimum(patch, extent / low)) / np.prod(extent / low) < threshold:
        finer = low.max() / low > 2
        low = np.where(finer, low * LOWRES_SPACING_STEP, low) if finer.any() else low * LOWRES_SPACING_STEP
    stage = Plan(copy.deepcopy(result.tree), copy.deepcopy(result.decisions), dict(result.planned), name="lowres")
    stage.decide("data.spacing", [round(float(v), 3) for v in low],
                 f"the cascade's low-resolution stage: the patch covers {coverage:.0%} of the median case at "
                 f"{spacing.round(3).tolist()} mm, under {threshold:.0%}: the spacing grown by "
                 f"{LOWRES_SPACING_STEP:g}x steps (nnU-Net's rule) until it covers {threshold:.0%}")
    topology_spacing, low_median = _target_grid(stage, fp)
    whole = topology(np.ceil(low_median), topology_spacing)[2]
    shrunk = shrink_patch(whole, low_median, topology_spacing, float(np.prod(patch)))
    _plan_network(stage, fp, shrunk, f"the median case at the low-resolution spacing "
                                     f"({np.ceil(low_median).astype(int).tolist()}), rounded to what the strides divide"
                                     + ("" if (shrunk == whole).all() else ", shrunk by nnU-Net's rule to at most the "
                                        "full-resolution patch's voxels (a step costs no more)"))
    stage = _candidate(stage, fp, int(result.tree["method"]["channels"][0]), int(result.tree["data"]["batch_size"]))
    minutes = round(float(result.tree["train"]["max_minutes"]) * LOWRES_SHARE, 2)
    stage.decide("train.max_minutes", minutes, f"{LOWRES_SHARE:.0%} of the plan's training minutes; the "
                                               "full-resolution stage (data.cascade) trains the rest")
    return stage


def _candidate(result: Plan, fp: Fingerprint, width: int, batch: int, patch: np.ndarray | None = None) -> Plan:
    """The plan with ``width`` features at the first level (doubling per level), ``batch`` and, if given, ``patch``."""
    trial = copy.deepcopy(result)
    if patch is not None and list(patch) != trial.tree["data"]["patch_size"]:
        _plan_network(trial, fp, patch)
    levels = len(trial.tree["method"]["strides"]) + 1
    trial.tree["method"]["channels"] = [min(width * 2**i, MAX_WIDTH) for i in range(levels)]
    trial.tree["data"]["batch_size"] = batch
    return trial


@dataclass
class _Timing:
    """Candidates timed with ``step_timer`` against the budget, each measurement (or why a candidate was
    skipped) kept in ``tried`` for the decision's reason."""

    step_timer: StepTimer
    budget_minutes: float
    tried: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def steps(self, seconds: float) -> int:
        """Optimiser steps of ``seconds`` each within the budget."""
        return int(60 * self.budget_minutes / max(seconds, 1e-9))

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.started > TIMING_SECONDS

    @property
    def measured(self) -> str:
        return "; ".join(self.tried)

    def measure(self, trial: Plan, what: str, *, required: bool = False) -> int | None:
        """Steps ``trial`` reaches in the budget; None when it does not fit the device (an error if ``required``)."""
        try:
            seconds = self.step_timer(trial.config(["tracking.enabled=false"]))
        except CandidateTooLarge as err:
            self.tried.append(f"{what}: {err}")
            if required:
                raise ResourceError(f"even the smallest plan does not fit this device ({self.measured}): plan with "
                                    "--device cpu, or free GPU memory") from None
            return None
        self.tried.append(f"{what}: {seconds:.3f} s/step, {self.steps(seconds)} steps")
        print(f"plan: timed {what}: {seconds:.3f} s/step, {self.steps(seconds)} steps in the budget "
              f"({time.perf_counter() - self.started:.0f} s of timing so far)", flush=True)
        return self.steps(seconds)


def _plan_budget(result: Plan, fp: Fingerprint, budget_minutes: float, step_timer: StepTimer) -> None:
    """Fit width, batch and patch to the budget, measured (see :data:`ENOUGH_STEPS`).

    1. Calibrate: the smallest candidate is timed on a probe patch (the planned one shrunk to at most
       :data:`PROBE_VOXELS`): seconds per sample, voxel and squared width (a convolution's cost).
    2. (width, batch) candidates on the whole patch, largest first: one the calibration predicts
       under half of ``ENOUGH_STEPS`` is not timed (on large volumes one step of it would take
       minutes and gigabytes); the others are timed, and the first measured to reach it is kept.
    3. None does: the smallest width and batch keep it, and the patch shrinks by nnU-Net's rule
       (:func:`shrink_patch`; nnU-Net shrinks to a reference GPU's memory, here to the measured
       time) to the predicted size, timed, and shrunk again by the measured shortfall.
    """
    timing = _Timing(step_timer, budget_minutes)
    spacing, median_shape = _target_grid(result, fp)
    full = np.asarray(result.tree["data"]["patch_size"])
    small = (WIDTHS[-1], BATCHES[-1])

    probe_patch = shrink_patch(full, median_shape, spacing, PROBE_VOXELS)
    probe_what = f"width {small[0]} batch {small[1]}" + ("" if (probe_patch == full).all()
                                                         else f" on the probe patch {probe_patch.tolist()}")
    probe_steps = timing.measure(_candidate(result, fp, *small, probe_patch), probe_what, required=True)
    per_unit = 60 * budget_minutes / probe_steps / (small[1] * np.prod(probe_patch) * small[0] ** 2)

    def predicted(width: int, batch: int, patch: np.ndarray) -> int:
        return timing.steps(per_unit * batch * float(np.prod(patch)) * width**2)

    whole: int | None = None  # steps of the smallest width and batch on the whole patch, once measured
    for width in WIDTHS:
        for batch in BATCHES:
            what = f"width {width} batch {batch}"
            if (width, batch) == small and (probe_patch == full).all():
                steps = probe_steps
            elif predicted(width, batch, full) < ENOUGH_STEPS / 2:
                timing.tried.append(f"{what}: predicted {predicted(width, batch, full)} steps, not timed")
                continue
            else:
                steps = timing.measure(_candidate(result, fp, width, batch), what)
            if (width, batch) == small:
                whole = steps
            if steps is not None and (steps >= ENOUGH_STEPS or timing.out_of_time()):
                return _keep(result, fp, width, batch, None, steps, budget_minutes, timing.measured)
    if whole is None and predicted(*small, full) >= CONTEXT_STEPS / 2:
        whole = timing.measure(_candidate(result, fp, *small), f"width {small[0]} batch {small[1]} on the whole patch")
    if whole is not None and whole >= CONTEXT_STEPS:  # context over steps (see CONTEXT_STEPS)
        return _keep(result, fp, *small, None, whole, budget_minutes, timing.measured)
    patch, steps = full, whole or predicted(*small, full)
    for _ in range(3):  # shrink to the prediction, then correct by what the shrunk patch measures
        smaller = shrink_patch(patch, median_shape, spacing, 0.9 * np.prod(patch) * steps / CONTEXT_STEPS)
        if (smaller == patch).all():
            break
        patch = smaller
        measured = timing.measure(_candidate(result, fp, *small, patch), f"width {small[0]} batch {small[1]} "
                                                                          f"patch {patch.tolist()}")
        steps = measured if measured is not None else steps // 2  # over the device's memory: shrink further
        if steps >= CONTEXT_STEPS or timing.out_of_time():
            break
    _keep(result, fp, *small, patch, steps, budget_minutes, timing.measured)


def _keep(result: Plan, fp: Fingerprint, width: int, batch: int, patch: np.ndarray | None, steps: int,
          budget_minutes: float, measured: str) -> None:
    """Record the chosen candidate (and, if the patch shrank, its topology) with the measurements."""
    reach = (f"reaching {ENOUGH_STEPS} steps in {budget_minutes:g} minutes" if steps >= ENOUGH_STEPS
             else f"none reached {ENOUGH_STEPS} steps in {budget_minutes:g} minutes; the whole patch is kept while the "
                  f"smallest reaches {CONTEXT_STEPS} (context over steps: {quote_evidence('context_over_steps')})")
    if patch is not None:
        _plan_network(result, fp, patch, "the median shape did not fit the budget: shrunk by nnU-Net's rule (the "
                                         "axis largest relative to the median shape first) until the smallest width "
                                         f"and batch measured {steps} steps in {budget_minutes:g} minutes (at least "
                                         f"{CONTEXT_STEPS}: context over steps, {quote_evidence('context_over_steps')})")
    chosen = _candidate(result, fp, width, batch)
    which = "the largest candidate" if patch is None else "the smallest width and batch on the shrunk patch"
    result.decide("method.channels", chosen.tree["method"]["channels"], f"{which} {reach} (measured: {measured})")
    result.decide("data.batch_size", batch, f"with width {width}: {steps} steps in the budget")


def _plan_training(result: Plan, budget_minutes: float) -> None:
    result.decide("train.max_minutes", budget_minutes, "the budget")
    result.decide("train.max_steps", 100_000, "a ceiling: the budget ends the run first")
    result.decide("train.schedule_over", "budget", "the cosine anneals over the budget, whatever the machine's speed")
    result.decide("train.lr", 0.002, f"AdamW 2e-3 with cosine decay (the hippocampus baseline's; {quote_evidence('learning_rate')})")
    result.decide("train.min_lr", 1e-5, "the cosine's floor, 1/200 of the peak (the hippocampus baseline's)")
    result.decide("train.warmup_steps", 100, "a short linear warm-up")
    result.decide("train.val_every", 500, "validation every 500 steps")
    result.decide("train.checkpoint_every", 500, "a checkpoint at every validation")
