"""scripts/gpu_check.py runs in CI at toy sizes on the CPU (--dry-run), so the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from imgx3d.resources import choose_precision, precision_name

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_dry_run_passes_every_section(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                       "GIT_PYTHON_REFRESH": "quiet"})
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [line for line in lines if not line.get("ok")]
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-2000:])
    names = {line["name"] for line in lines}
    assert {f"{section}.{m}" for m in ("unet", "imgx", "sdseg", "pig", "siamese", "vae", "darl")
            for section in ("method", "syncs")} <= names
    assert {"env", "torchrun", "large_volume.monai", "large_volume.imgx3d", "large_volume.ratio",
            "hippocampus.test.dice.foreground_mean", "imgx_inference.ratio", "plan.budget_fit", "regions.unet",
            "cascade.unet", "gpu_check"} <= names
    summary = next(line for line in lines if line["name"] == "gpu_check")
    assert summary["value"] == 22 and summary["failed"] == 0
    pig = next(line for line in lines if line["name"] == "method.pig")
    auto = precision_name(choose_precision("auto", torch.device("cpu")))
    assert pig["synth_auto_precision"] == auto, "synth's auto is this CPU's"
    assert pig["synth_auto_vs_fp32_image_mad"] >= 0.0 and (auto != "fp32" or pig["synth_auto_vs_fp32_image_mad"] == 0)
    torchrun = next(line for line in lines if line["name"] == "torchrun")
    assert torchrun["value"] == 10 and torchrun["first_run_steps"] == 8, "trained to step 8, resumed to 10"


def test_gpu_check_refuses_to_run_without_cuda_unless_dry():
    import pytest

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for real")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA device here" in proc.stderr
