"""ImgX K-step volume prediction time relative to one U-Net sliding-window pass, same process.

Hippocampus-sized volumes (36 x 50 x 35, one window), the hippocampus configs' networks with
random weights (the cost does not depend on the weights), no TTA. ImgX runs K = 5 network
passes of its FiLM time U-Net; its cost per pass relative to the U-Net's sets the ratio. Both
up-path variants are measured: ``up_subunits`` 1 (the default: MONAI UNet's decoder exactly)
and 2 (before issue 21), each in fp32 and in the precision ``infer.precision: auto``
picks on this machine, with the CPU kernels and weight layout the Predictor loads them with
(``use_fast_cpu_kernels``). The U-Net is also timed with PyTorch's own choice of convolution
kernel (``unet_torch_kernels``: its im2col kernel for the small batch-1 convolutions of the
deeper levels in fp32), the baseline of that routing. The bare networks are timed too, one forward
pass on the window-sized input each (``net_ratio``: ImgX's network on [image, x_t] with its FiLM time
conditioning against the U-Net's): K times it is the ratio a sampler and window costing nothing
would reach, the floor of ``ratio_to_unet`` for a K-step chain of whole-network passes. JSON lines.

    python -m benchmarks.imgx_inference [--repeats 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import emit, machine

from imgx3d.config import load_config
from imgx3d.inference.predictor import predict_probabilities
from imgx3d.inference.windows import make_window
from imgx3d.methods.base import build_method
from imgx3d.resources import (
    autocast,
    channels_last_pays_in_inference,
    choose_precision,
    precision_name,
    use_fast_cpu_kernels,
    use_fast_cpu_layout,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "hippocampus"


def seconds(calls: dict[str, Callable[[], object]], repeats: int, rounds: int) -> dict[str, float]:
    """Seconds of each call: the calls take turns, ``rounds`` times ``repeats`` calls each after a warm-up,
    and each keeps its fastest round's mean (a drift of the machine's speed during the run then weighs on
    every call alike)."""
    best = {name: float("inf") for name in calls}
    for call in calls.values():
        call()
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for _ in range(repeats):
                call()
            best[name] = min(best[name], (time.perf_counter() - t0) / repeats)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=[36, 50, 35])
    args = parser.parse_args()
    # the U-Net on ImgX's levels (the shipped config's full-resolution level off: ImgX's network has none),
    # so the ratio is the cost of the K passes and their sampler, not of a different topology
    unet_cfg = load_config(CONFIGS / "unet.yaml", ["method.full_res_features=0"])
    imgx_cfg = load_config(CONFIGS / "imgx.yaml")
    torch.manual_seed(0)
    image = torch.randn(1, *args.shape)
    cpu = torch.device("cpu")
    nets = {"unet": build_method(unet_cfg.method, 3, 1).eval()}
    for up in (1, 2):
        nets[f"imgx_up_subunits_{up}"] = build_method(
            dataclasses.replace(imgx_cfg.method, up_subunits=up), 3, 1).eval()
    for method in nets.values():
        use_fast_cpu_kernels(method, cpu, training=False)  # as the Predictor loads them
    nets["unet_torch_kernels"] = build_method(unet_cfg.method, 3, 1).eval()
    if channels_last_pays_in_inference():  # the predictor's layout, torch's kernel choice
        use_fast_cpu_layout(nets["unet_torch_kernels"], cpu)
    emit("imgx_inference.setup", None, "", machine=machine(), shape=args.shape, repeats=args.repeats,
         rounds=args.rounds,
         k=imgx_cfg.method.infer_steps)
    for setting in ("fp32", "auto"):
        dtype = choose_precision(setting, cpu)
        windows = {name: make_window((unet_cfg if name.startswith("unet") else imgx_cfg).infer,
                                     unet_cfg.data.patch_size) for name in nets}
        calls = {name: functools.partial(predict_probabilities, method, image, windows[name])
                 for name, method in nets.items()}
        window_input = {"unet": torch.randn(1, 1, *unet_cfg.data.patch_size),  # what one window's pass sees
                        "imgx": torch.randn(1, 1 + nets["unet"].num_classes, *unet_cfg.data.patch_size)}
        step = torch.full((1,), imgx_cfg.method.infer_steps - 1, dtype=torch.long)
        bare = {"unet": functools.partial(nets["unet"].net, window_input["unet"]),
                "imgx_up_subunits_1": functools.partial(nets["imgx_up_subunits_1"].net, window_input["imgx"], step)}
        with torch.inference_mode(), autocast(cpu, dtype):
            took = seconds(calls, args.repeats, args.rounds)
            net = seconds(bare, args.repeats, args.rounds)
        prefix = f"imgx_inference.{precision_name(dtype)}"
        for name, value in took.items():
            if name == "unet":
                extra = {}
            elif name == "unet_torch_kernels":
                extra = {"speedup_of_onednn_routing": round(value / took["unet"], 2)}
            else:
                extra = {"ratio_to_unet": round(value / took["unet"], 2), "goal": "<= 5x (stretch 3x)"}
            emit(f"{prefix}.{name}.seconds_per_volume", round(value, 4), "s", precision=setting, **extra)
        net_ratio = net["imgx_up_subunits_1"] / net["unet"]
        emit(f"{prefix}.net_ratio", round(net_ratio, 3), "ratio", precision=setting,
             unet_ms=round(1000 * net["unet"], 2), imgx_ms=round(1000 * net["imgx_up_subunits_1"], 2),
             k_times_net_ratio=round(imgx_cfg.method.infer_steps * net_ratio, 2),
             whole_prediction_ratio=round(took["imgx_up_subunits_1"] / took["unet"], 2))


if __name__ == "__main__":
    main()
