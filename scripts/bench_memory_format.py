"""Channels-last 3D weights on the CPU: a training step and a window pass, default layout as the baseline.

The hippocampus U-Net (``configs/hippocampus/unet.yaml``: widths 24-192, batch 4 of 40 x 56 x 40
patches; windows of 4 x 64³ as ``bench_inference.py``) with its loss and AdamW. Two copies with the
same weights, one in PyTorch's default layout, one after ``imgx3d.resources.use_fast_cpu_layout``
(what the trainer and the predictor do on the CPU), timed alternately in this one process, so load
from elsewhere hits both alike; medians are reported, with the largest output difference.

Usage: python scripts/bench_memory_format.py [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench import emit, machine  # noqa: E402

from imgx3d.config import load_config  # noqa: E402
from imgx3d.methods.base import build_method  # noqa: E402
from imgx3d.resources import use_fast_cpu_layout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _alternate(runs: dict[str, callable], repeats: int) -> dict[str, list[float]]:
    """Seconds of each callable, run in turn ``repeats`` times after one warm-up each."""
    for fn in runs.values():
        fn()
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    emit("memory_format.setup", None, "", machine=machine(), repeats=args.repeats)
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "hippocampus" / "unet.yaml")
    default = build_method(cfg.method, num_classes=3, in_channels=1)
    fast = copy.deepcopy(default)
    use_fast_cpu_layout(fast, torch.device("cpu"))
    batch = {"image": torch.randn(cfg.data.batch_size, 1, *cfg.data.patch_size),
             "label": torch.randint(0, 3, (cfg.data.batch_size, 1, *cfg.data.patch_size))}
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (default, fast)}

    def train_step(method):
        loss = sum(v for k, v in method.training_step(batch, 0).items() if k.startswith("loss/"))
        loss.backward()
        optimizers[id(method)].step()
        optimizers[id(method)].zero_grad(set_to_none=True)

    seconds = _alternate({"default": lambda: train_step(default), "channels_last_3d": lambda: train_step(fast)},
                         args.repeats)
    base = statistics.median(seconds["default"])
    emit("memory_format.train_step.default.seconds", round(base, 4), "s", baseline=True, runs=seconds["default"])
    ours = statistics.median(seconds["channels_last_3d"])
    emit("memory_format.train_step.channels_last_3d.seconds", round(ours, 4), "s", speedup=round(base / ours, 3))

    windows = torch.randn(4, 1, 64, 64, 64)
    fast.load_state_dict(default.state_dict())  # the same weights again (copied into the channels-last storage)
    default.eval(), fast.eval()
    with torch.inference_mode():
        seconds = _alternate({"default": lambda: default.window_probabilities(windows),
                              "channels_last_3d": lambda: fast.window_probabilities(windows)}, args.repeats)
        difference = (default.window_probabilities(windows) - fast.window_probabilities(windows)).abs().max()
    base = statistics.median(seconds["default"])
    emit("memory_format.window_pass.default.seconds", round(base, 4), "s", baseline=True, runs=seconds["default"])
    ours = statistics.median(seconds["channels_last_3d"])
    emit("memory_format.window_pass.channels_last_3d.seconds", round(ours, 4), "s", speedup=round(base / ours, 3),
         max_probability_difference=float(difference))


if __name__ == "__main__":
    main()
