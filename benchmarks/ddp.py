"""Data-parallel training throughput: N torchrun processes vs one process, same config and machine.

Each variant is launched with ``python -m torch.distributed.run --standalone --nproc_per_node N``
on this script; every rank loads its shard of the hippocampus training cases, runs the
trainer's own step (DDP gradient averaging when N > 1) and rank 0 reports training samples per
second over all ranks, after a few warm-up steps. The machine's cores are split among the
processes (OMP_NUM_THREADS = cores // N), so the comparison is at equal hardware. JSON lines.

    python -m benchmarks.ddp --steps 40 --procs 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.children import Child, last_json, module, run_children
from benchmarks.common import emit, machine

WARMUP_STEPS = 3


def worker(args: argparse.Namespace) -> None:
    """One rank: time ``args.steps`` trainer steps after the warm-up."""
    import torch

    from imgx3d.config import load_config
    from imgx3d.data.catalog import find_cases, make_split
    from imgx3d.data.transforms import Preprocessor
    from imgx3d.methods.base import build_method
    from imgx3d.training import distributed
    from imgx3d.training.trainer import Trainer
    from imgx3d.training.workflow import _batches, _load_items

    ctx, device = distributed.setup("cpu")
    total = WARMUP_STEPS + args.steps
    cfg = load_config(args.config, ["tracking.enabled=false", f"train.max_steps={total}"])
    catalog = find_cases(args.data, cfg.data)
    split = make_split(catalog, cfg.data.split)
    items = _load_items(Preprocessor(cfg.data), catalog, split.train[ctx.rank::ctx.world_size])
    torch.manual_seed(cfg.seed)
    method = build_method(cfg.method, catalog.num_classes, catalog.in_channels)
    trainer = Trainer(cfg, method, Path(args.out), {}, device=device or torch.device("cpu"), dist=ctx)
    batches = _batches(items, cfg, 0, method.spatial_dims, ctx.rank)
    for step in range(total):
        if step == WARMUP_STEPS:
            ctx.barrier()
            t0 = time.perf_counter()
        trainer.step(next(batches))
        trainer.state.step += 1
    seconds = time.perf_counter() - t0
    trainer.dist.check_same_weights(method)
    if ctx.is_main:
        samples = args.steps * cfg.data.batch_size * ctx.world_size
        print(json.dumps({"processes": ctx.world_size, "samples_per_second": samples / seconds,
                          "steps_per_second": args.steps / seconds, "batch_per_rank": cfg.data.batch_size,
                          "threads_per_process": torch.get_num_threads(), "machine": machine()}), flush=True)
    distributed.teardown(ctx)


def main() -> None:
    from _bench import add_hippocampus_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_hippocampus_args(parser)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="/tmp/imgx3d_bench_ddp")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    cores = os.cpu_count() or 1
    rates = {}
    for n in args.procs:
        ran = run_children([Child(f"processes{n}", module("torch.distributed.run", "--standalone",
                                                          f"--nproc_per_node={n}", "-m", __spec__.name, "--worker",
                                                          "--data", args.data, "--config", args.config, "--steps",
                                                          str(args.steps), "--out", args.out),
                                  threads=max(1, cores // n))])
        result = last_json(ran[f"processes{n}"])
        rates[n] = result["samples_per_second"]
        emit(f"ddp.processes{n}.samples_per_second", round(rates[n], 3), "samples/s",
             speedup_vs_1_process=round(rates[n] / rates[args.procs[0]], 2), **result)


if __name__ == "__main__":
    main()
