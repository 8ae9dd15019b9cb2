"""Channels-last 3D weights on the CPU: a training step and a window pass, default layout as the baseline.

The hippocampus U-Net (``configs/hippocampus/unet.yaml``: its full-resolution level and widths
24-192, batch 4 of 40 x 56 x 40 patches) with its loss and AdamW, and window passes of 4 x 64³
(as ``benchmarks/inference.py``) of that network and of ``benchmarks/inference.py``'s (widths 16-128, no
full-resolution level), each in fp32 and in the precision ``auto`` picks on this machine. Copies
with the same weights, all with their convolutions on oneDNN
(``imgx3d.resources.use_onednn_convolutions``, as the trainer and the predictor run them on the
CPU), one in PyTorch's default layout, one after ``imgx3d.resources.use_fast_cpu_layout``, and a
third with its channels-last weights but PyTorch's own instance norms (``channels_last_weights``:
the layout before the norms kept it; each norm then returns the default layout and the next
convolution converts back), timed alternately in this one process, so load from elsewhere hits
them alike; medians are reported, with the largest output difference from the default layout.

Usage: python -m benchmarks.memory_format [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import emit, machine

from imgx3d.config import load_config
from imgx3d.methods.base import build_method
from imgx3d.resources import (
    ChannelsLastInstanceNorm3d,
    autocast,
    choose_precision,
    precision_name,
    use_fast_cpu_layout,
    use_onednn_convolutions,
)

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
    use_onednn_convolutions(default)
    hippocampus = _layout_variants(default)
    batch = {"image": torch.randn(cfg.data.batch_size, 1, *cfg.data.patch_size),
             "label": torch.randint(0, 3, (cfg.data.batch_size, 1, *cfg.data.patch_size))}
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4) for m in hippocampus.values()}

    def train_step(method):
        loss = sum(v for k, v in method.training_step(batch, 0).items() if k.startswith("loss/"))
        loss.backward()
        optimizers[id(method)].step()
        optimizers[id(method)].zero_grad(set_to_none=True)

    seconds = _alternate({name: (lambda m=m: train_step(m)) for name, m in hippocampus.items()}, args.repeats)
    _emit_against_default("memory_format.train_step", seconds)

    windows = torch.randn(4, 1, 64, 64, 64)
    for variant in hippocampus.values():  # the same weights again (copied into the channels-last storage)
        variant.load_state_dict(default.state_dict())
    inference_net = load_config(None, ["method.name=unet", "method.channels=[16,32,64,128]", "method.strides=[2,2,2]"])
    plain = build_method(inference_net.method, num_classes=3, in_channels=1)
    use_onednn_convolutions(plain)
    nets = {"hippocampus": hippocampus, "bench_inference": _layout_variants(plain)}
    cpu = torch.device("cpu")
    for net_name, variants in nets.items():
        for method in variants.values():
            method.eval()
        for setting in ("fp32", "auto"):
            dtype = choose_precision(setting, cpu)
            with torch.inference_mode(), autocast(cpu, dtype):
                passes = {name: (lambda m=m: m.window_probabilities(windows)) for name, m in variants.items()}
                seconds = _alternate(passes, args.repeats)
                reference = passes["default"]()
                differences = {name: float((fn() - reference).abs().max()) for name, fn in passes.items()}
            _emit_against_default(f"memory_format.window_pass.{net_name}.{precision_name(dtype)}", seconds, differences)


def _layout_variants(method) -> dict:
    """``method`` (``default``) and two copies with its weights: after ``use_fast_cpu_layout``
    (``channels_last_3d``), and with channels-last weights but PyTorch's own instance norms
    (``channels_last_weights``: the layout before the norms kept it)."""
    fast = copy.deepcopy(method)
    use_fast_cpu_layout(fast, torch.device("cpu"))
    weights_only = copy.deepcopy(fast)
    for sub in weights_only.modules():
        if type(sub) is ChannelsLastInstanceNorm3d:
            sub.__class__ = torch.nn.InstanceNorm3d
    return {"default": method, "channels_last_weights": weights_only, "channels_last_3d": fast}


def _emit_against_default(name: str, seconds: dict[str, list[float]], differences: dict[str, float] | None = None) -> None:
    """Median seconds of each variant, the default layout as the baseline (speed-ups against it)."""
    base = statistics.median(seconds["default"])
    emit(f"{name}.default.seconds", round(base, 4), "s", baseline=True, runs=[round(s, 4) for s in seconds["default"]])
    for variant in ("channels_last_weights", "channels_last_3d"):
        ours = statistics.median(seconds[variant])
        extra = {"max_probability_difference": differences[variant]} if differences else {}
        emit(f"{name}.{variant}.seconds", round(ours, 4), "s", speedup=round(base / ours, 3), **extra)


if __name__ == "__main__":
    main()
