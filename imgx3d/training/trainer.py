"""The generic training loop; it never knows which method it runs.

One optimiser per parameter group of the method, each updated from its own
``loss/<group>``; the LR follows :func:`lr_factor` (a function of step and elapsed time).
Mixed precision where the device supports it, gradient clipping, whole-volume validation with the sliding window, best checkpoint by
validation Dice, early stopping, a wall-time budget, atomic checkpoints and an exact
resume (model, optimisers, step, elapsed time, RNG states; batches are a function of step).
Under torchrun the same loop runs on every rank (see :mod:`imgx3d.training.distributed`).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from imgx3d.checkpoint import checkpoint_state, save_checkpoint
from imgx3d.config import Config, TrainConfig
from imgx3d.errors import ConfigError, Interrupted, ResourceError
from imgx3d.evaluation.metrics import score_case
from imgx3d.inference.predictor import InferSettings, Predictor
from imgx3d.interrupts import requested, signal_name
from imgx3d.methods.base import Method, SelfValidating, load_method_state, regions_of
from imgx3d.progress import PROGRESS_SECONDS, duration, on_terminal, say
from imgx3d.resources import autocast, choose_precision, gib, use_fast_cpu_kernels, use_fast_cuda_kernels
from imgx3d.tracking import NullTracker, Tracker
from imgx3d.training.distributed import DistContext
from imgx3d.training.ema import WeightAverage

STOP_CHECK_EVERY = 10  # torchrun: steps between the ranks' agreements on stopping (budget, pause, signal)
LOG_EVERY = 50  # steps between logged running means (and, on CUDA, loss finiteness checks)


def _mean(values: list[torch.Tensor | float]) -> float:
    """Mean of a running list of scalars: one device sync for tensors, however many."""
    if torch.is_tensor(values[0]):
        return float(torch.stack(values).float().mean())
    return float(np.mean(values))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """Multiplier of the base LR: linear warmup, then cosine / poly / constant decay.

    Progress is ``step / max_steps``; with ``schedule_over: budget`` and a time budget it is
    whichever is further along, steps or ``elapsed / max_minutes``, so a budgeted run anneals
    fully whatever the machine's speed (at the price of bit-reproducibility).
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.schedule_over == "budget" and cfg.max_minutes:
        progress = max(progress, elapsed_s / (60 * cfg.max_minutes))
    progress = min(1.0, progress)
    floor = cfg.min_lr / cfg.lr
    if cfg.scheduler == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.scheduler == "poly":
        return max(floor, (1 - progress) ** 0.9)
    return 1.0


def _plateau(cfg: TrainConfig) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """PyTorch's ``ReduceLROnPlateau`` (mode max, on the validation Dice) driving a scale, not an LR:
    it steps a one-parameter stand-in optimiser whose LR starts at 1, and that LR multiplies the
    schedule of :func:`lr_factor` (warmup included) for every real optimiser; its state is in
    ``last.pt``, so a resume continues its count of bad validations."""
    scale = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(scale, mode="max", factor=cfg.plateau_factor,
                                                      patience=cfg.plateau_patience, min_lr=0.0)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.99 (nnU-Net)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


@dataclass
class TrainState:
    """What a resume restores besides weights and optimiser states."""

    step: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    bad_validations: int = 0
    elapsed_s: float = 0.0
    stop_reason: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    lr_scale: float = 1.0  # the plateau schedule's reductions so far (every rank gets rank 0's)


def peak_memory(device: torch.device) -> str:
    """The process's peak memory so far: allocated GPU memory on CUDA, resident host memory elsewhere."""
    if device.type == "cuda":
        return f"peak GPU {gib(torch.cuda.max_memory_allocated(device))}"
    try:
        import resource
    except ImportError:  # Windows
        return "peak memory n/a"
    return f"peak RSS {gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}"


def validation_line(state: TrainState, metrics: dict[str, float], improved: bool) -> str:
    """``validation at step 1500: Anterior 0.8123, Posterior 0.7921, mean 0.8022 (best 0.8022 at step 1500,
    best.pt written)`` (per class, or per region of a region-based run); a generator's own metrics as they are named."""
    per_class = [f"{k.removeprefix('val/dice/')} {v:.4f}" for k, v in metrics.items() if k.startswith("val/dice/")]
    others = [f"{k.removeprefix('val/')} {v:.4g}" for k, v in metrics.items()
              if not k.startswith("val/dice") and isinstance(v, float)]
    parts = per_class + ([f"mean {metrics['val/dice_mean']:.4f}"] if "val/dice_mean" in metrics else []) + others
    best = (f"best {state.best_metric:.4f} at step {state.best_step}" if math.isfinite(state.best_metric)
            else f"latest at step {state.best_step}")
    return f"validation at step {state.step}: {', '.join(parts) or 'no metrics'} ({best}" + \
        (", best.pt written)" if improved else ")")


class StepLines:
    """Plain step lines while training into a file or a pipe: every ``train.log_every`` steps, or
    every :data:`~imgx3d.progress.PROGRESS_SECONDS` of wall time (N steps at the measured speed).

    ``step 1200/100000 | loss_model 0.4321 | lr 1.8e-03 | 3.21 steps/s | elapsed 6m12s | left ~23m48s
    (budget) | peak RSS 1.2 GiB``
    """

    def __init__(self, trainer: "Trainer", start: float, elapsed0: float):
        self.trainer, self.start, self.elapsed0 = trainer, start, elapsed0
        self.every = trainer.cfg.train.log_every
        self.last_time, self.last_step = time.monotonic(), trainer.state.step
        self.latest: dict[str, float] = {}  # the last logged running means (when no step is pending)

    def due(self) -> bool:
        """Whether a line is due after the step just taken."""
        if self.every:
            return self.trainer.state.step % self.every == 0
        return time.monotonic() - self.last_time >= PROGRESS_SECONDS

    def report(self, running: dict[str, list[Any]]) -> None:
        """Print the line (one device sync for the running losses)."""
        trainer, t = self.trainer, self.trainer.cfg.train
        step, now = trainer.state.step, time.monotonic()
        speed = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        elapsed = self.elapsed0 + trainer._clock() - self.start
        means = {f"train/{k.replace('loss/', 'loss_')}": _mean(v) for k, v in running.items() if v} or self.latest
        losses = [f"{k.removeprefix('train/')} {v:.4f}" for k, v in means.items() if "loss" in k]
        lr = means.get("train/lr")
        if t.max_minutes:
            left = f"left ~{duration(60 * t.max_minutes - elapsed)} (budget)"
        else:
            left = f"left ~{duration((t.max_steps - step) / max(speed, 1e-9))} (steps)"
        parts = [f"step {step}/{t.max_steps}", *losses, *([f"lr {lr:.2e}"] if lr is not None else []),
                 f"{speed:.2f} steps/s", f"elapsed {duration(elapsed)}", left, peak_memory(trainer.device)]
        say(" | ".join(parts))


class Trainer:
    """Runs a method's ``training_step`` over batches and validates on whole volumes.

    Args:
        cfg: the run config (``train`` and ``infer`` sections are used here).
        method: the method to train.
        run_dir: where ``last.pt`` and ``best.pt`` are written.
        meta: extra fields stored in every checkpoint (labels, channels, class counts).
        tracker: mlflow tracker (or :class:`NullTracker`).
        dist: this process's place in a torchrun job; every rank validates its share; rank 0 checkpoints and logs.
    """

    def __init__(self, cfg: Config, method: Method, run_dir: Path, meta: dict[str, Any],
                 tracker: Tracker | NullTracker | None = None, device: torch.device | None = None,
                 dist: DistContext | None = None):
        self.cfg, self.method, self.run_dir, self.meta = cfg, method, Path(run_dir), meta
        self.tracker = tracker or NullTracker()
        self.device = device or torch.device("cpu")
        self.dist = dist or DistContext()
        self.method.to(self.device)
        use_fast_cuda_kernels(self.device)
        use_fast_cpu_kernels(self.method, self.device, training=True)
        self.groups = method.parameter_groups()
        self.training_step, self.average_gradients = self.dist.wrap(method.training_step, method, self.device,
                                                                    len(self.groups))
        self.optimizers = {g: make_optimizer(p, cfg.train) for g, p in self.groups.items()}
        self.autocast_dtype = choose_precision(cfg.train.precision_setting(), self.device)
        # fp16 gradients underflow without loss scaling; disabled (a no-op) for every other precision
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.state = TrainState()
        self._bar: Any = None  # the progress bar while fit runs (validation lines print above it)
        # its state (weights and counters) is saved in last.pt, so a resume continues the average
        # bit for bit; one update after each optimisation step
        self.ema = WeightAverage(method, cfg.train.ema) if cfg.train.ema > 0 else None
        self.plateau = _plateau(cfg.train) if cfg.train.scheduler == "plateau" else None
        self._clock = time.process_time if cfg.train.budget_clock == "cpu" else time.monotonic
        # validation predicts with the one Predictor: the run's infer: settings, on the training device
        self.infer_settings = InferSettings.from_config(cfg.infer, device=str(self.device))

    def release(self) -> None:
        """Free the device memory training held (weights, optimiser states, the weight average) once
        ``best.pt`` is written: the test split is predicted from that checkpoint, not from this copy."""
        self.optimizers.clear()
        self.ema = None
        self.method.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint(self, weights_only: bool = False) -> dict[str, Any]:
        """Everything needed to predict (and, unless ``weights_only``, to resume).

        A full checkpoint holds every rank's RNG states (``rng_ranks``), so every rank of a
        distributed run must call this together.
        """
        ckpt = checkpoint_state(self.cfg, self.method.state_dict(), step=self.state.step, **self.meta)
        if not weights_only:
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
            ckpt.update({
                "optimizers": {g: o.state_dict() for g, o in self.optimizers.items()},
                "grad_scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "plateau": self.plateau.state_dict() if self.plateau is not None else None,
                "train_state": vars(self.state).copy(),
                "rng_ranks": self.dist.gather(rng),
            })
        return ckpt

    def save(self, name: str, weights_only: bool = False) -> Path:
        """Write a checkpoint atomically (temp file + rename); only rank 0 writes."""
        path = self.run_dir / name
        ckpt = self.checkpoint(weights_only)
        if self.dist.is_main:
            save_checkpoint(path, ckpt)
        return path

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a ``last.pt`` checkpoint exactly where it stopped (each rank its own RNG)."""
        load_method_state(self.method, ckpt["model"], str(self.run_dir / "last.pt"))
        for g, o in self.optimizers.items():
            o.load_state_dict(ckpt["optimizers"][g])
        if ckpt.get("grad_scaler"):
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"], self.method)
        if self.plateau is not None and ckpt.get("plateau") is not None:
            self.plateau.load_state_dict(ckpt["plateau"])
            self.plateau.optimizer.param_groups[0]["lr"] = self.state.lr_scale
        self.state = TrainState(**ckpt["train_state"])
        ranks = ckpt["rng_ranks"] if "rng_ranks" in ckpt else [ckpt["rng"]]  # "rng": before torchrun support
        if len(ranks) != self.dist.world_size:
            if self.dist.is_main:
                warnings.warn(f"{self.run_dir / 'last.pt'} was written by {len(ranks)} process(es) and is resumed "
                              f"by {self.dist.world_size}: training goes on, but not as the same sequence of batches",
                              stacklevel=2)
            torch.manual_seed(self.cfg.seed + self.state.step + 7919 * self.dist.rank)
            return
        rng = ranks[self.dist.rank]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -- one step ------------------------------------------------------------------------
    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimisation step over every parameter group."""
        self.method.train()
        lr = self.cfg.train.lr * lr_factor(self.cfg.train, self.state.step, self.state.elapsed_s) * self.state.lr_scale
        for group, optimizer in self.optimizers.items():
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr * self.method.plan.lr_scale(group)
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast(self.device, self.autocast_dtype):
            out = self.training_step(batch, self.state.step)
        names = [g for g in self.groups if f"loss/{g}" in out]  # a staged method trains some groups per step
        if not names:
            raise RuntimeError(f"{self.method.name}.training_step returned no loss/<group> of {sorted(self.groups)}")
        for i, group in enumerate(names):
            params = [p for p in self.groups[group] if p.requires_grad]
            loss = out[f"loss/{group}"]
            if self.device.type != "cuda" and not torch.isfinite(loss):  # on CUDA: checked when logged (no sync)
                raise self._not_finite(f"loss/{group}", float(loss.detach()), f"at step {self.state.step}")
            # backward (not autograd.grad): DDP's gradient averaging hooks fire as .grad is accumulated
            self.scaler.scale(loss).backward(inputs=params, retain_graph=i < len(names) - 1)
            if self.average_gradients:  # several groups: no DDP (see DistContext.wrap)
                self.dist.average_gradients(params)
            if self.cfg.train.grad_clip > 0:
                self.scaler.unscale_(self.optimizers[group])  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
            self.scaler.step(self.optimizers[group])  # skipped when fp16 gradients overflowed
            self.optimizers[group].zero_grad(set_to_none=True)
        self.scaler.update()
        # detached tensors, not floats: a float() per scalar would wait for the GPU every step
        scalars: dict[str, torch.Tensor | float] = {k: v.detach() for k, v in out.items()}
        scalars["lr"] = lr
        return scalars

    def _not_finite(self, name: str, value: float, when: str) -> ConfigError:
        return ConfigError(f"{name} is {value} {when} of run {self.run_dir}; lower train.lr (now "
                           f"{self.cfg.train.lr:g}) or check the data for extreme values, then train again (or "
                           "--resume from its last.pt)")

    # -- validation ----------------------------------------------------------------------
    def validate(self, cases: list[dict[str, Any]], labels: dict[int, str]) -> dict[str, float]:
        """Mean Dice per class over whole validation volumes, predicted in model space by the same
        :class:`~imgx3d.inference.predictor.Predictor` rules as ``imgx3d predict`` (windows on the device,
        volumes on the host, streaming where it applies).

        Under torchrun every rank calls this with every validation case and predicts its share
        (case ``i`` on rank ``i mod N``); the per-case scores are gathered, so each rank returns the
        mean over all cases. A method that validates itself (a codec, a generator) does so on rank 0.
        """
        self.method.eval()
        if isinstance(self.method, SelfValidating):  # rank 0 alone
            return self.method.validation_metrics(cases, labels, self.cfg.data.slices) if self.dist.is_main else {}
        regions = regions_of(self.method)
        scored = regions.scored if regions is not None else labels  # regions: Dice per region (whole tumour, ...)
        classes = [c for c in sorted(scored) if c != 0]
        mine: dict[int, list[float]] = {c: [] for c in classes}
        for case in cases[self.dist.rank::self.dist.world_size]:
            predictor = Predictor(self.method, self.cfg, labels, self.infer_settings)
            pred = predictor.model_space_classes(case["image"]).numpy()
            scores = score_case(pred, case["label"][0].numpy(), classes, metrics=("dice",),
                                ignore_label=self.cfg.data.ignore_label, regions=regions)
            for c in classes:
                mine[c].append(scores[c]["dice"])
        per_class = {c: [d for part in self.dist.gather(mine) for d in part[c]] for c in classes}
        metrics = {f"val/dice/{scored[c]}": float(np.mean(v)) for c, v in per_class.items()}
        metrics["val/dice_mean"] = float(np.mean(list(metrics.values())))
        return metrics

    # -- the loop ------------------------------------------------------------------------
    def fit(self, batches: Iterator[dict[str, torch.Tensor]], val_cases: list[dict[str, Any]],
            labels: dict[int, str], pause_after_s: float | None = None) -> TrainState:
        """Train until ``max_steps``, the time budget, or early stopping.

        Args:
            pause_after_s: stop once the run's clock passes this many seconds (stop reason
                ``paused``), validated and saved in ``last.pt``; the schedule stays that of the whole
                budget, so a resume continues the same run (how a planned race trains its candidates).

        Raises:
            Interrupted: after SIGTERM / SIGINT (see :mod:`imgx3d.interrupts`), once ``last.pt``
                holds the step reached; resuming from it continues exactly.
            ResourceError: out of GPU memory, naming the peak, the settings to lower and the
                checkpoint to resume from.
        """
        try:
            return self._fit(batches, val_cases, labels, pause_after_s)
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory() from None

    def _out_of_memory(self) -> ResourceError:
        """The one-line error of a CUDA out-of-memory during training."""
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            peak = f"peak {gib(torch.cuda.max_memory_allocated(self.device))} of {gib(total)} on {self.device}"
        else:
            peak = f"on {self.device}"
        d = self.cfg.data
        last = self.run_dir / "last.pt"
        then = (f"then continue from {last} with --resume {self.run_dir}" if last.is_file()
                else "then train again (no checkpoint was written yet)")
        return ResourceError(f"out of GPU memory at training step {self.state.step} ({peak}); lower data.batch_size "
                             f"(now {d.batch_size}) or data.patch_size (now {d.patch_size}), or infer.sw_batch_size "
                             f"(now {self.cfg.infer.sw_batch_size}) if it ran out while validating; {then}")

    def _stop_for_signal(self, signum: int) -> None:
        """Save ``last.pt`` at the step reached, mark the run interrupted, and raise :class:`Interrupted`."""
        self.save("last.pt")
        name = signal_name(signum)
        self.state.stop_reason = f"interrupted ({name})"
        self.tracker.set_tags({"imgx3d.interrupted": name, "stop_reason": self.state.stop_reason})
        raise Interrupted(f"{name} received: training stopped at step {self.state.step} and saved it in "
                          f"{self.run_dir / 'last.pt'}", signum, resume_dir=self.run_dir)

    def _fit(self, batches: Iterator[dict[str, torch.Tensor]], val_cases: list[dict[str, Any]],
             labels: dict[int, str], pause_after_s: float | None = None) -> TrainState:
        t = self.cfg.train
        start, elapsed0 = self._clock(), self.state.elapsed_s
        # a bar on a terminal; in a file or a pipe plain step lines instead (rank 0 only either way)
        bar = tqdm(total=t.max_steps, initial=self.state.step, desc="train", unit="step",
                   disable=not (self.dist.is_main and on_terminal(sys.stderr)))
        self._bar = bar
        lines = StepLines(self, start, elapsed0) if self.dist.is_main and bar.disable else None
        running: dict[str, list[float]] = {}
        validated_at = -1
        while self.state.step < t.max_steps:
            self.state.elapsed_s = elapsed0 + self._clock() - start
            out_of_time = bool(t.max_minutes) and self.state.elapsed_s >= 60 * t.max_minutes
            paused = pause_after_s is not None and self.state.elapsed_s >= pause_after_s
            # rank 0's clock and signals decide, so every rank stops at the same step (1: budget, 2: pause);
            # under torchrun asked every STOP_CHECK_EVERY steps, as the collective waits for the devices
            why, signum = 0, None
            if not self.dist.enabled or self.state.step % STOP_CHECK_EVERY == 0:
                why, signum = self.dist.agree_to_stop(1 if out_of_time else 2 if paused else 0, requested())
            if signum is not None:
                bar.close()
                self._stop_for_signal(signum)
            if why:
                self.state.stop_reason = "time budget" if why == 1 else "paused"
                break
            scalars = self.step(next(batches))
            self.state.step += 1
            if self.ema is not None and self.state.step > t.ema_start:
                self.ema.update(self.method, self.method.plan.stage_index(self.state.step - 1))
            bar.update(1)
            for k, v in scalars.items():
                running.setdefault(k, []).append(v)
            if lines is not None and lines.due():
                lines.report(running)
            if self.state.step % LOG_EVERY == 0 or self.state.step == t.max_steps:
                means = self.dist.mean({f"train/{k.replace('loss/', 'loss_')}": _mean(v)
                                        for k, v in running.items()})
                for name, value in means.items():
                    if "loss" in name and not math.isfinite(value):
                        raise self._not_finite(name.replace("train/loss_", "loss/"), value,
                                               f"in steps {self.state.step - len(running[next(iter(running))]) + 1}"
                                               f"–{self.state.step}")
                self.tracker.log_metrics(means, self.state.step)
                if lines is not None:
                    lines.latest = means
                bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in means.items() if "loss" in k})
                running = {}
            if self.state.step % t.val_every == 0:
                validated_at = self.state.step
                if self._validate_and_checkpoint(val_cases, labels, start, elapsed0):
                    self.state.stop_reason = "early stopping"
                    break
            elif self.state.step % t.checkpoint_every == 0:
                self.state.elapsed_s = elapsed0 + self._clock() - start
                self.save("last.pt")
        else:
            self.state.stop_reason = "max steps"
        if validated_at != self.state.step:
            self._validate_and_checkpoint(val_cases, labels, start, elapsed0)
        bar.close()
        self.dist.check_same_weights(self.method)
        return self.state

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Inside the block the method holds the moving average of its weights (``train.ema``, once
        the average has started); the training weights come back after it."""
        if self.ema is None:
            yield
            return
        with self.ema.applied_to(self.method):
            yield

    def _validate_and_checkpoint(self, val_cases: list[dict[str, Any]], labels: dict[int, str],
                                 start: float, elapsed0: float) -> bool:
        """Validate, keep the best weights, save ``last.pt``; True when patience ran out.

        Under torchrun every rank validates its share of the cases (see :meth:`validate`); rank
        0 keeps the books and hands them to every rank, so their checkpoints and stops agree.
        """
        with self.averaged_weights():  # validation and best.pt: the averaged weights, when train.ema is on
            self._validate_and_save_best(val_cases, labels)
        self.state.elapsed_s = elapsed0 + self._clock() - start
        self.state = self.dist.broadcast(self.state)
        self.save("last.pt")  # the training weights (and the average's own state): an exact resume
        return bool(self.cfg.train.patience) and self.state.bad_validations >= self.cfg.train.patience

    def _validate_and_save_best(self, val_cases: list[dict[str, Any]], labels: dict[int, str]) -> None:
        metrics = self.validate(val_cases, labels) if val_cases else {}
        if self.dist.is_main and val_cases:
            self.tracker.log_metrics(metrics, self.state.step)
            self.state.history.append({"step": self.state.step, **metrics})
            score = metrics.get("val/dice_mean", -math.inf)  # a generator may report no Dice (it keeps the latest)
            if self.plateau is not None and math.isfinite(score):
                self.plateau.step(score)
                self.state.lr_scale = self.plateau.optimizer.param_groups[0]["lr"]
            improved = score > self.state.best_metric or self.method.plan.keep == "latest"
            if improved:
                self.state.best_metric, self.state.best_step, self.state.bad_validations = score, self.state.step, 0
                self.save("best.pt", weights_only=True)
            else:
                self.state.bad_validations += 1
            say(validation_line(self.state, metrics, improved), self._bar)
        elif self.dist.is_main:  # no validation cases: the latest weights are the ones to use
            self.state.best_step = self.state.step
            self.save("best.pt", weights_only=True)
