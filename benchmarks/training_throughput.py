"""Training throughput on hippocampus: cached cases and loader workers vs reading every batch from disk.

The trainer preloads every training case once, preprocessed (what MONAI's ``CacheDataset``
does), and draws augmented patch batches from memory, optionally in ``data.num_workers``
loader processes. The baseline re-reads and re-preprocesses the cases of each batch from disk
in the training process (no caching, 0 workers). Steps per second are measured over the same
batches (a pure function of seed and step) with the hippocampus U-Net config; JSON lines.

    python -m benchmarks.training_throughput --steps 60
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import add_hippocampus_args, emit, machine

from imgx3d.config import load_config
from imgx3d.data.catalog import find_cases, make_split
from imgx3d.data.transforms import PatchBatches, Preprocessor, train_transforms
from imgx3d.methods.base import build_method
from imgx3d.training.workflow import _load_items, _worker_init


class UncachedBatches(PatchBatches):
    """The same batches, but each case is read and preprocessed from disk when drawn."""

    def __init__(self, pre: Preprocessor, catalog, ids: list[str], *args):
        super().__init__([None] * len(ids), *args)
        self.pre, self.catalog, self.ids = pre, catalog, ids

    def batch(self, step: int):
        rng = np.random.default_rng([self.seed, step])
        drawn = {int(i) for i in rng.integers(len(self.ids), size=self.batch_size)}
        cases = self.catalog.by_id()
        self.items = [self.pre.load_case(cases[self.ids[i]], self.catalog.labels, self.catalog.in_channels)
                      if i in drawn else None for i in range(len(self.ids))]
        return super().batch(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_hippocampus_args(parser)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    cfg = load_config(args.config, ["tracking.enabled=false"])
    catalog = find_cases(args.data, cfg.data)
    split = make_split(catalog, cfg.data.split)
    pre = Preprocessor(cfg.data)
    emit("training_throughput.setup", None, "", machine=machine(), steps=args.steps, batch_size=cfg.data.batch_size,
         patch=cfg.data.patch_size, train_cases=len(split.train))
    t0 = time.perf_counter()
    items = _load_items(pre, catalog, split.train)
    emit("training_throughput.cache_seconds", round(time.perf_counter() - t0, 2), "s", cases=len(items))
    common = (train_transforms(cfg.data), cfg.data.batch_size, cfg.seed, 0, args.steps)
    variants = [("uncached_workers0", UncachedBatches(pre, catalog, split.train, *common), 0)]
    variants += [(f"cached_workers{w}", PatchBatches(items, *common), w) for w in args.workers]
    rates = {}
    for name, dataset, workers in variants:
        method = build_method(cfg.method, catalog.num_classes, catalog.in_channels)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=_worker_init,
                            prefetch_factor=4 if workers else None)
        optimizer = torch.optim.AdamW(method.parameters(), cfg.train.lr)
        batches = iter(loader)
        first = next(batches)  # worker start-up is not throughput
        method.train()
        t0 = time.perf_counter()
        n = 0
        for batch in [first, *batches]:
            loss = sum(method.training_step(batch, n).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            n += 1
        rates[name] = n / (time.perf_counter() - t0)
    base = rates["uncached_workers0"]
    for name, rate in rates.items():
        emit(f"training_throughput.{name}.steps_per_second", round(rate, 3), "steps/s",
             speedup_vs_uncached_workers0=round(rate / base, 2), goal=">= 1.5x")


if __name__ == "__main__":
    main()
