"""Memory-bounded sliding window vs MONAI's ``sliding_window_inference`` on a large CT-sized volume.

A 512 x 512 x 300 volume, a 14-class 3D U-Net (MONAI ``UNet``; untrained: the cost and the
memory do not depend on the weights), roi 96^3, gaussian blending. MONAI runs 4 windows per forward pass; ``streaming`` one per
forward pass, two passes at once on a CPU of 2+ threads (what ``imgx3d predict`` does on CPU:
:class:`~imgx3d.inference.windows.ConcurrentBatches`), ``streaming_serial`` one window at a time,
``streaming_batch4`` 4 at a time (its GPU mode), ``streaming_fp16`` one at a time with float16
accumulators; the streaming variants' network has
the CPU kernels ``imgx3d predict`` loads it with (``use_fast_cpu_kernels``: every convolution on
oneDNN), MONAI's is the stock module a MONAI user calls. Each variant runs in its own
process, so its peak resident memory (``ru_maxrss``) is its own; the parent prints JSON lines
with seconds, peak RSS and the fraction of voxels whose labels differ (float summation order).

    python -m benchmarks.sliding_window            # --shape 512 512 300 --classes 14
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.children import Child, last_json, module, run_children
from benchmarks.common import emit, machine


VARIANTS = ("monai", "streaming", "streaming_serial", "streaming_batch4", "streaming_fp16")


def _run_variant(variant: str, shape: list[int], classes: int, roi: int, overlap: float, out: Path) -> None:
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    from imgx3d.inference.windows import ConcurrentBatches, streaming_argmax, window_streams
    from imgx3d.resources import use_fast_cpu_kernels

    torch.manual_seed(0)
    net = UNet(3, 1, classes, channels=[8, 16, 32, 64], strides=[2, 2, 2], num_res_units=1).eval()
    if variant != "monai":
        use_fast_cpu_kernels(net, torch.device("cpu"), training=False)  # as imgx3d predict loads its networks

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(net(x).float(), 1)

    axes = [torch.sin(6 * torch.linspace(-1, 1, n)) for n in shape]  # smooth structure, no full-size temporaries
    image = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
    noise = torch.Generator().manual_seed(0)
    for z in range(shape[2]):  # slice by slice: no volume-sized temporary in the peak
        image[..., z].add_(torch.randn(shape[:2], generator=noise), alpha=0.1)
    image = image[None, None]
    t0 = time.perf_counter()
    with torch.inference_mode():
        if variant == "monai":
            labels = sliding_window_inference(image, [roi] * 3, 4, fn, overlap=overlap, mode="gaussian")[0].max(0).indices
        else:
            dtype = torch.float16 if variant == "streaming_fp16" else torch.float32
            chunk = 4 if variant == "streaming_batch4" else 1
            streams = window_streams(torch.device("cpu")) if variant == "streaming" else 1
            with ConcurrentBatches(fn, chunk, streams) as batches:
                labels = streaming_argmax(batches, image, [roi] * 3, batches.batch_size, overlap, "gaussian", dtype)
    seconds = time.perf_counter() - t0
    np.save(out, labels.to(torch.uint8).numpy())
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_gib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="monai (the baseline) is always run")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _run_variant(args.variant, args.shape, args.classes, args.roi, args.overlap, Path(args.out))
        return
    emit("sliding_window.setup", None, "", machine=machine(), shape=args.shape, classes=args.classes,
         roi=args.roi, overlap=args.overlap, network="MONAI UNet [8,16,32,64], untrained")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ["monai", *[v for v in args.variants if v != "monai"]]:
            out = Path(tmp) / f"{variant}.npy"
            ran = run_children([Child(variant, module(__spec__.name, "--variant", variant, "--out", str(out), "--shape",
                                                      *map(str, args.shape), "--classes", str(args.classes), "--roi",
                                                      str(args.roi), "--overlap", str(args.overlap)))])
            results[variant] = last_json(ran[variant])
            results[variant]["labels"] = np.load(out)
    base = results["monai"]
    emit("sliding_window.monai.peak_rss", round(base["peak_rss_gib"], 2), "GiB", seconds=round(base["seconds"], 1))
    for variant in [v for v in results if v != "monai"]:
        ours = results[variant]
        emit(f"sliding_window.{variant}.peak_rss", round(ours["peak_rss_gib"], 2), "GiB",
             seconds=round(ours["seconds"], 1), baseline_gib=round(base["peak_rss_gib"], 2),
             time_ratio=round(ours["seconds"] / base["seconds"], 3),
             labels_differing_fraction=float((base["labels"] != ours["labels"]).mean()), goal="<= 3 GiB, time <= 1.1x")


if __name__ == "__main__":
    main()
