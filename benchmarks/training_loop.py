"""Training steps per second: imgx3d's trainer against a bare MONAI training loop, same network, patch, batch.

The bare loop is MONAI's tutorial recipe: ``CacheDataset`` over the training files
(``LoadImaged`` → ``EnsureChannelFirstd`` → ``Orientationd`` → ``NormalizeIntensityd``, cached),
then per sample the same random transforms as imgx3d (pad, ``RandCropByPosNegLabeld`` —
foreground indices recomputed each draw, as in the tutorials —, affine, flips, intensity), a
shuffling ``DataLoader`` with imgx3d's worker count, and ``DiceCELoss`` + AdamW with gradient
clipping. imgx3d is its ``Trainer.step`` on the batches ``imgx3d train`` draws (cached cases,
crop indices computed once per case, the smallest label dtype, weights in the CPU's fast layout,
the config's precision). Arms, all timed in this one process over the same number of steps
after a warm-up:

    monai_fp32        the bare loop as a MONAI user runs it (fp32, default memory layout)
    monai_same_math   the bare loop in imgx3d's precision and memory layout: the difference from
                      imgx3d is then the loader and augmentation plumbing alone
    imgx3d            the trainer

Prints JSON lines with each arm's steps/s and imgx3d's ratio to both bare loops.

    python -m benchmarks.training_loop [--steps 60] [--config configs/hippocampus/unet.yaml]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceCELoss
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, Orientationd

from benchmarks.common import add_hippocampus_args, emit, machine

from imgx3d.config import load_config
from imgx3d.data.catalog import find_cases, make_split
from imgx3d.data.transforms import Preprocessor, train_transforms
from imgx3d.methods.base import build_method
from imgx3d.resources import autocast, choose_precision, precision_name, use_fast_cpu_kernels
from imgx3d.training.trainer import Trainer
from imgx3d.training.workflow import _batches, _load_items


def monai_batches(cfg, cases: list) -> Iterator[dict[str, torch.Tensor]]:
    """The tutorial's endless stream of (image, label) batches."""
    keys = ["image", "label"]
    load = Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
                    NormalizeIntensityd("image", channel_wise=True)])
    data = CacheDataset([{"image": str(c.images[0]), "label": str(c.label)} for c in cases],
                        Compose([load, train_transforms(cfg.data)]), num_workers=2, progress=False)
    loader = DataLoader(data, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers)
    while True:
        for batch in loader:
            yield {"image": batch["image"].as_tensor(), "label": batch["label"].as_tensor()}


def time_steps(step, batches: Iterator, steps: int, warmup: int) -> float:
    """Steps per second of ``step(batch)`` over ``steps`` batches after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step(next(batches))
    t0 = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    return steps / (time.perf_counter() - t0)


def monai_step(cfg, num_classes: int, in_channels: int, precision: torch.dtype | None, fast_layout: bool):
    """One optimisation step of the bare loop: the same network as imgx3d's, DiceCE, AdamW, clipping."""
    net = build_method(cfg.method, num_classes, in_channels).net
    if fast_layout:
        use_fast_cpu_kernels(net, torch.device("cpu"), training=True)
    m = cfg.method
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=m.batch_dice,
                         lambda_dice=m.lambda_dice, lambda_ce=m.lambda_ce)
    optimizer = torch.optim.AdamW(net.parameters(), cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def step(batch: dict[str, torch.Tensor]) -> None:
        net.train()
        with autocast(torch.device("cpu"), precision):
            loss = loss_fn(net(batch["image"]), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_hippocampus_args(parser)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args()
    cfg = load_config(args.config, ["tracking.enabled=false", *args.overrides])
    catalog = find_cases(args.data, cfg.data)
    split = make_split(catalog, cfg.data.split)
    train_cases = [c for c in catalog.cases if c.case_id in set(split.train)]
    device = torch.device("cpu")
    precision = choose_precision(cfg.train.precision, device)
    emit("training_loop.setup", None, "", machine=machine(), steps=args.steps, batch_size=cfg.data.batch_size,
         patch=cfg.data.patch_size, channels=cfg.method.channels, train_cases=len(train_cases),
         num_workers=cfg.data.num_workers, precision=precision_name(precision))
    n_cls, n_in = catalog.num_classes, catalog.in_channels
    torch.manual_seed(cfg.seed)
    rates = {"monai_fp32": time_steps(monai_step(cfg, n_cls, n_in, None, False), monai_batches(cfg, train_cases),
                                      args.steps, args.warmup)}
    torch.manual_seed(cfg.seed)
    rates["monai_same_math"] = time_steps(monai_step(cfg, n_cls, n_in, precision, True),
                                          monai_batches(cfg, train_cases), args.steps, args.warmup)
    torch.manual_seed(cfg.seed)
    items = _load_items(Preprocessor(cfg.data), catalog, split.train)
    method = build_method(cfg.method, n_cls, n_in)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, method, Path(run_dir), {}, device=device)
        rates["imgx3d"] = time_steps(trainer.step, _batches(items, cfg, 0, method.spatial_dims), args.steps,
                                     args.warmup)
    for name, rate in rates.items():
        emit(f"training_loop.{name}.steps_per_second", round(rate, 3), "steps/s")
    for base in ("monai_fp32", "monai_same_math"):
        emit(f"training_loop.imgx3d_over_{base}", round(rates["imgx3d"] / rates[base], 3), "ratio",
             goal=">= 1.0 (no plumbing overhead)")


if __name__ == "__main__":
    main()
