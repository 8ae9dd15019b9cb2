"""Inference overhead: ``imgx3d predict`` of a 256×256×128 volume vs MONAI's sliding window alone.

Both use the same network (the hippocampus U-Net architecture, 3 classes, fixed random
weights: speed does not depend on training), the same window (64³, overlap 0.5, gaussian,
sw_batch_size 4) and the same softmax. The imgx3d figure includes reading the NIfTI,
reorientation (the file is stored LPS), normalisation, mapping back to the native grid,
argmax and writing the .nii.gz; the MONAI figure is the bare ``sliding_window_inference``
call on a tensor already in memory, twice: in fp32 (as a MONAI user calls it) and under the
autocast precision imgx3d chooses for this machine (``infer.precision: auto``: bf16 on a CPU
with bf16 instructions), so the like-for-like ratio isolates imgx3d's I/O and plumbing. A
fourth variant predicts a folder of ``--files`` such volumes with one reader and one writer
thread (``imgx3d predict --workers 1``): reading the next volume and writing the last one run
beside the window pass (on 2 cores they compete with it: measured no faster per volume than one
at a time), so its seconds per volume are what a folder of scans costs. Each
variant runs in its own subprocess (so peak RSS is its own), alternating, ``--repeats`` times;
medians are reported.

Usage: python -m benchmarks.inference [--repeats 3] [--shape 256 256 128] [--files 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.children import Child, last_json, module, run_children
from benchmarks.common import emit, machine

ROI, OVERLAP, SW_BATCH = [64, 64, 64], 0.5, 4
VARIANTS = ("monai_fp32", "monai_auto", "imgx3d", "imgx3d_folder")
AFFINE = np.diag([-0.8, -0.8, 2.0, 1.0])


def _config():
    from imgx3d.config import load_config

    return load_config(None, ["method.name=unet", "method.channels=[16,32,64,128]", "method.strides=[2,2,2]",
                              f"data.patch_size={ROI}", f"infer.overlap={OVERLAP}", f"infer.sw_batch_size={SW_BATCH}",
                              "data.preset=mri", "tracking.enabled=false"])


def prepare(folder: Path, shape: tuple[int, int, int], files: int) -> None:
    """Write the input volume, a folder of ``files`` others, and a checkpoint with fixed random weights."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    from imgx3d.checkpoint import CHECKPOINT_FORMAT
    from imgx3d.config import to_dict
    from imgx3d.methods.base import build_method

    for i, target in enumerate([folder / "in" / "volume.nii.gz",
                                *(folder / "many" / f"volume{n}.nii.gz" for n in range(files))]):
        rng = np.random.default_rng(i)
        image = (gaussian_filter(rng.normal(size=shape), 2) * 100 + 500).astype(np.float32)
        img = nib.Nifti1Image(image, AFFINE)
        img.set_qform(AFFINE, code=1)
        img.set_sform(AFFINE, code=1)
        target.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(target))
    cfg = _config()
    torch.manual_seed(0)
    method = build_method(cfg.method, num_classes=3, in_channels=1)
    torch.save({"format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "method": "unet", "model": method.state_dict(),
                "num_classes": 3, "in_channels": 1, "labels": {0: "background", 1: "a", 2: "b"}, "step": 0},
               folder / "model.pt")


def child(variant: str, folder: Path) -> None:
    """Run one variant of :data:`VARIANTS` once; print its seconds (per volume) and peak RSS as JSON."""
    from monai.inferers import sliding_window_inference

    from imgx3d.inference.folder import predict_to_folder
    from imgx3d.inference.predictor import Predictor
    from imgx3d.resources import autocast, choose_precision

    predictor = Predictor.load(folder / "model.pt", device="cpu")
    net = predictor.method.net
    dtype = choose_precision("fp32" if variant == "monai_fp32" else "auto", torch.device("cpu"))
    # warm up thread pools, the allocator and oneDNN's kernels for every window batch a pass runs
    # (sw_batch_size, and the smaller last batch): a first call of a new shape builds its kernels
    with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
        for batch in range(1, SW_BATCH + 1):
            net(torch.zeros(batch, 1, *ROI))
    if variant == "imgx3d":
        out = folder / f"out-{time.time_ns()}"
        t0 = time.perf_counter()
        predict_to_folder(predictor, [folder / "in" / "volume.nii.gz"], out)
        seconds = time.perf_counter() - t0
    elif variant == "imgx3d_folder":
        inputs = sorted((folder / "many").glob("*.nii.gz"))
        t0 = time.perf_counter()
        predict_to_folder(predictor, inputs, folder / f"out-{time.time_ns()}", workers=1)
        seconds = (time.perf_counter() - t0) / len(inputs)
    else:
        from imgx3d.data.io import read_volume

        x = torch.from_numpy(read_volume(folder / "in" / "volume.nii.gz").array)[None, None]
        x = (x - x.mean()) / x.std()
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
            sliding_window_inference(x, ROI, SW_BATCH, lambda p: torch.softmax(net(p).float(), 1), overlap=OVERLAP,
                                     mode="gaussian")
        seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 128])
    parser.add_argument("--files", type=int, default=4, help="volumes in the folder variant")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.folder))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder, tuple(args.shape), args.files)
        results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                ran = run_children([Child(variant, module(__spec__.name, "--child", variant, "--folder", tmp))])
                results[variant].append(last_json(ran[variant]))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mib")} for v, rs in results.items()}
    shape = "x".join(map(str, args.shape))
    common = {"volume": shape, "roi": ROI, "overlap": OVERLAP, "sw_batch_size": SW_BATCH, "repeats": args.repeats,
              "files": args.files}
    from imgx3d.resources import choose_precision, precision_name

    auto = choose_precision("auto", torch.device("cpu"))
    emit("inference.setup", None, "", machine=machine(), **common, auto_precision=precision_name(auto))
    emit("inference.imgx3d_predict.seconds", round(med["imgx3d"]["seconds"], 3), "s",
         includes="read .nii.gz + reorient + normalise + sliding window + native grid + argmax + write .nii.gz",
         runs=[round(r["seconds"], 3) for r in results["imgx3d"]])
    emit("inference.imgx3d_predict_folder.seconds_per_volume", round(med["imgx3d_folder"]["seconds"], 3), "s",
         includes=f"the same, for a folder of {args.files} volumes with one reader and one writer thread (--workers 1)",
         runs=[round(r["seconds"], 3) for r in results["imgx3d_folder"]])
    for variant, precision in (("monai_fp32", "fp32"), ("monai_auto", precision_name(auto))):
        emit(f"inference.{variant}_sliding_window.seconds", round(med[variant]["seconds"], 3), "s", baseline=True,
             precision=precision, includes="sliding_window_inference on an in-memory tensor",
             runs=[round(r["seconds"], 3) for r in results[variant]])
        emit(f"inference.throughput_ratio_vs_{variant}", round(med[variant]["seconds"] / med["imgx3d"]["seconds"], 4),
             "monai_seconds/imgx3d_seconds", goal=1.0)
        emit(f"inference.folder_throughput_ratio_vs_{variant}",
             round(med[variant]["seconds"] / med["imgx3d_folder"]["seconds"], 4), "monai_seconds/imgx3d_seconds",
             goal=1.0)
    for variant in VARIANTS:
        emit(f"inference.{variant}.peak_rss", round(med[variant]["peak_rss_mib"], 1), "MiB")


if __name__ == "__main__":
    main()
