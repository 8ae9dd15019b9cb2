"""What only a GPU can show, in one prepared run (≤ 8 minutes on one modern GPU): JSON lines.

1. ``env``: device, GPU name, compute capability, the precision ``auto`` picks, versions.
2. ``method.<name>``: each method trains 30 steps on the device with the automatic precision
   (a NaN loss or a device mismatch fails it) and then predicts one volume (segmenters), draws
   pairs (generators) or reconstructs slices (the codec); seconds, steps/s, peak GPU memory.
3. ``syncs.<name>``: host synchronisations per training step of each method (optimiser, EMA and
   logging included) under ``torch.cuda.set_sync_debug_mode("warn")``: 0 for the U-Net and ImgX, ≤ 1
   elsewhere.
4. ``torchrun``: ``torchrun --nproc_per_node 1`` (NCCL on a GPU) trains past step 60, then a
   second command resumes the run to step 80.
5. ``large_volume``: a 14-class U-Net predicts a 512 x 512 x 300 synthetic CT file to file
   (``imgx3d predict``'s path), against MONAI's ``sliding_window_inference`` with the same
   network in the same run: seconds, peak GPU memory, peak host RSS of each.
6. ``hippocampus``: the U-Net of ``configs/hippocampus/unet.yaml`` trains 3 minutes and scores
   the bench test split (Dice, steps/s); needs ``--hippocampus DIR`` (skipped without).
7. ``imgx_inference``: ImgX's K = 5 prediction time against one U-Net pass (hippocampus configs).
8. ``plan``: ``imgx3d plan``'s budget fit on the GPU (hippocampus, or the demo data without
   ``--hippocampus``): the candidates timed, their GPU memory bound, the width and batch kept.

Every section prints its lines even when another fails; the exit code is 1 if any failed.
``--dry-run`` runs every section on the CPU at toy sizes (the test suite does, so this script
cannot rot); on a GPU machine run it as it is:

    python scripts/gpu_check.py --hippocampus /path/to/hippocampus --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file on a bare GPU machine: the benchmarks package beside it
from benchmarks.common import emit  # noqa: E402
CONFIGS = ROOT / "configs"
METHODS = ("unet", "imgx", "sdseg", "pig", "siamese", "vae", "darl")

# Toy sizes for --dry-run (CPU): the same code paths, seconds instead of minutes.
TINY = {
    "unet": ["method.channels=[4,8,16]", "method.strides=[2,2]", "method.num_res_units=0"],
    "imgx": ["method.channels=[4,8,16]", "method.strides=[2,2]", "method.num_res_units=0"],
    "sdseg": ["method.codec.widths=[8,8,16,16]", "method.codec.norm_groups=8", "method.channels=[16,32]",
              "method.attention_levels=[false,true]", "method.num_res_blocks=1", "method.norm_groups=8",
              "method.num_head_channels=16", "method.codec_steps=1", "data.slices.size=[32,32]"],
    "pig": ["method.channels=[8,16]", "method.attention_levels=[false,false]", "method.num_res_blocks=1",
            "method.norm_groups=8", "method.num_head_channels=8", "method.stage1_steps=2", "method.val_steps=2",
            "data.slices.size=[32,32]"],
    "siamese": ["method.codec.widths=[8,16]", "method.codec.norm_groups=4", "method.codec.latent_channels=4",
                "method.codec_steps=1", "method.channels=[16,32]", "method.norm_groups=8",
                "method.attention_head_dim=4", "method.context_dim=16", "method.hint_widths=[8,16,32]",
                "method.sample_steps=2", "data.slices.size=[32,32]"],
    "vae": ["method.codec.widths=[8,8,16,16]", "method.codec.norm_groups=8", "data.slices.size=[32,32]"],
    "darl": ["method.diffusion_channels=[8,16]", "method.diffusion_attention=[false,false]", "method.norm_groups=8",
             "method.generator_channels=8", "method.generator_blocks=1", "method.spade_hidden=8",
             "method.discriminator_channels=8", "method.fractal_bank=4", "method.closing_window=5",
             "data.slices.size=[32,32]"],
}
# The demo volumes (48 x 48 x 32, labels 1-3) stand in for each method's dataset.
DEMO_DATA = ["data.patch_size=[32,32,32]", "data.split.test_fraction=0.25", "data.split.val_fraction=0.15",
             "data.num_workers=0", "data.flip_axes=[0]", "tracking.enabled=false", "train.max_minutes=0",
             "train.warmup_steps=0", "dataset=gpu_check"]
# DARL is self-supervised on vessels: its labels are only scored (the demo's tube and box as "vessel").
DARL_DATA = ["method.polyphase=false", "data.mode=volume", "data.layout=auto", "data.color=grey", "data.preset=mri",
             "data.labels={1: vessel}", "data.label_map={}", "data.mask_threshold=1.5"]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_gpu_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _config(method: str, steps: int, dry: bool, extra: list[str] = ()):
    """The method's shipped config (hippocampus; DARL: drive), resized to the demo data."""
    from imgx3d.config import load_config, load_yaml

    source = {"vae": "hippocampus/sdseg.yaml", "darl": "drive/darl.yaml"}.get(method, f"hippocampus/{method}.yaml")
    tree = load_yaml(CONFIGS / source)
    if method == "vae":  # the codec an SDSeg config describes (what `train --method vae` trains)
        tree["method"] = {"name": "vae", "codec": tree["method"].get("codec", {})}
    overrides = [*DEMO_DATA, *(DARL_DATA if method == "darl" else []), f"train.max_steps={steps}",
                 f"train.val_every={steps}", f"train.checkpoint_every={steps}", *(TINY[method] if dry else []), *extra]
    return load_config(None, overrides, base=tree)


def section(name: str):
    """Run a section; a failure is one JSON line with the error, and the script goes on."""
    def wrap(fn):
        def run(*args, **kwargs) -> bool:
            try:
                fn(*args, **kwargs)
                return True
            except Exception as err:  # noqa: BLE001 - every failure is reported, none stops the check
                which = f"{name}.{args[0]}" if args and isinstance(args[0], str) else name
                emit(f"{which}.error", f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
                     "error", ok=False, where=traceback.format_exc().strip().splitlines()[-3][:300])
                return False
        return run
    return wrap


@section("env")
def check_env(device: torch.device) -> None:
    from imgx3d.resources import choose_precision, device_tags

    tags = device_tags(device, choose_precision("auto", device))
    capability = ".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else None
    emit("env", tags["device_name"], "device", ok=True, capability=capability, **tags)


def _train(cfg, data: Path, run_dir: Path):
    from imgx3d.training.workflow import train_run

    t0 = time.perf_counter()
    result = train_run(cfg, data, run_dir, test_at_end=False)
    return result, time.perf_counter() - t0


@section("method")
def check_method(method: str, device: torch.device, data: Path, work: Path, dry: bool) -> None:
    import nibabel as nib

    from imgx3d.checkpoint import load_checkpoint
    from imgx3d.data.transforms import Preprocessor
    from imgx3d.inference.predictor import Predictor
    from imgx3d.methods.base import Generator, Segmenter, method_from_checkpoint
    from imgx3d.synthesis.synth import synthesize

    steps = 3 if dry else 30
    cfg = _config(method, steps, dry, [f"train.device={device}"])
    _reset_peak(device)
    result, seconds = _train(cfg, data, work / method)
    run = load_checkpoint(work / method / "best.pt")
    trained = method_from_checkpoint(run)
    volume = sorted((data / "imagesTr").glob("*.nii.gz"))[0]
    t0 = time.perf_counter()
    extra = {}
    if isinstance(trained, Generator):  # a generator: two pairs through imgx3d synth, in fp32 and at auto precision
        pairs = {}
        for precision in ("fp32", "auto"):
            out = synthesize(str(work / method), 2, work / f"{method}_pairs_{precision}", batch=2,
                             steps=2 if dry else None, device=str(device), masks=data if method == "siamese" else None,
                             precision=precision)
            pairs[precision] = np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float32)
                                         for p in sorted(out.glob("imagesTr/*.nii.gz"))])
            assert len(pairs[precision]) == 2 and np.isfinite(pairs[precision]).all(), precision
        extra = {"synth_auto_precision": _precision_name("auto", device),
                 "synth_auto_vs_fp32_image_mad": round(float(np.abs(pairs["auto"] - pairs["fp32"]).mean()), 5)}
        what = "2 pairs, fp32 and auto precision"
    elif isinstance(trained, Segmenter):
        predictor = Predictor.load(run, device=str(device))
        prediction = predictor.predict_files([volume])
        assert prediction.labels.array.shape == predictor.read([volume]).source.spatial_shape
        what = "one volume"
    else:  # the codec: its own test metrics on one volume
        item = Preprocessor(cfg.data).load_case(next(c for c in _catalog(data, cfg).cases if c.label is not None),
                                                run.labels)
        metrics = trained.to(device).eval().validation_metrics([item], run.labels, cfg.data.slices)
        assert np.isfinite(metrics["val/dice_mean"])
        what = "codec reconstruction"
    emit(f"method.{method}", round(result.steps / seconds, 3), "steps/s", ok=True, steps=result.steps,
         train_seconds=round(seconds, 1), predicted=what, predict_seconds=round(time.perf_counter() - t0, 2),
         peak_gpu_gib=_peak_gpu_gib(device), precision=_precision_name(cfg.train.precision, device), **extra)


@section("regions")
def check_regions(device: torch.device, data: Path, work: Path, dry: bool) -> None:
    """Region-based training (data.regions: sigmoid outputs) trains and predicts labels on the device."""
    from imgx3d.inference.predictor import Predictor

    regions = 'data.regions={"all": [1, 2, 3], "upper": [2, 3], "top": [3]}'
    cfg = _config("unet", 3 if dry else 30, dry, [f"train.device={device}", regions])
    result, seconds = _train(cfg, data, work / "regions")
    predictor = Predictor.load(work / "regions" / "best.pt", device=str(device))
    volume = sorted((data / "imagesTr").glob("*.nii.gz"))[0]
    labels = predictor.predict_files([volume]).labels.array
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3} and predictor.method.num_classes == 3
    emit("regions.unet", round(result.steps / seconds, 3), "steps/s", ok=True, steps=result.steps,
         predicted_values=sorted(np.unique(labels).tolist()), precision=_precision_name(cfg.train.precision, device))


@section("cascade")
def check_cascade(device: torch.device, data: Path, work: Path, dry: bool) -> None:
    """A cascade (data.cascade): a low-resolution stage, then the next stage with its prediction as input, both on
    the device (the next stage's training cases left on disk and drawn by a loader worker, which must not run the
    GPU stage); the next stage predicts from its own checkpoint alone."""
    from imgx3d.inference.predictor import Predictor

    steps = 3 if dry else 30
    low = _config("unet", steps, dry, [f"train.device={device}", "data.spacing=[2.0,2.0,2.0]"])
    _train(low, data, work / "cascade_lowres")
    cfg = _config("unet", steps, dry, [f"train.device={device}", f"data.cascade={work / 'cascade_lowres'}",
                                       "data.cache_gib=0", "data.num_workers=1"])
    result, seconds = _train(cfg, data, work / "cascade")
    predictor = Predictor.load(work / "cascade" / "best.pt", device=str(device))
    volume = sorted((data / "imagesTr").glob("*.nii.gz"))[0]
    case = predictor.read([volume])
    labels = predictor.predict_case(case).labels.array
    assert case.image.shape[0] == 1 + predictor.previous_stage.channels and labels.shape == case.source.spatial_shape
    emit("cascade.unet", round(result.steps / seconds, 3), "steps/s", ok=True, steps=result.steps,
         input_channels=int(case.image.shape[0]), precision=_precision_name(cfg.train.precision, device))


def _precision_name(setting: str, device: torch.device) -> str:
    """What ``setting`` (``auto`` …) resolves to on ``device``: fp32, bf16 or fp16."""
    from imgx3d.resources import choose_precision, precision_name

    return precision_name(choose_precision(setting, device))


def _catalog(data: Path, cfg):
    from imgx3d.data.catalog import find_cases

    return find_cases(data, cfg.data)


def _child_env() -> dict[str, str]:
    """The environment of a child process: this checkout first on its path, then the caller's path
    (packages installed with ``pip --target`` on a machine without the project installed)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _cli(*argv: str, torchrun: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**_child_env(), "GIT_PYTHON_REFRESH": "quiet"}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun \
        else [sys.executable]
    proc = subprocess.run([*prefix, "-m", "imgx3d", *argv], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"imgx3d {argv[0]} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-600:]}")
    return proc


@section("torchrun")
def check_torchrun(device: torch.device, data: Path, work: Path, dry: bool) -> None:
    from imgx3d.checkpoint import load_checkpoint

    first, last = (8, 10) if dry else (65, 80)
    config = work / "torchrun.yaml"
    config.write_text("method: {name: unet}\n")
    common = ["--config", str(config), "--data", str(data), "--no-track", *DEMO_DATA[:-3],
              *(TINY["unet"] if dry else []), "train.checkpoint_every=5", "train.val_every=1000"]
    run = work / "torchrun"
    t0 = time.perf_counter()
    _cli("train", "--run-dir", str(run), *common, f"train.max_steps={first}", torchrun=True)
    step = load_checkpoint(run / "last.pt").get("step")
    assert step == first, f"last.pt at step {step}, not {first}"
    _cli("train", "--resume", str(run), *common, f"train.max_steps={last}", torchrun=True)
    resumed = load_checkpoint(run / "last.pt").state
    assert resumed["step"] == last, f"the resumed run ended at {resumed['step']}"
    backend = "nccl" if device.type == "cuda" else "gloo"
    emit("torchrun", resumed["step"], "steps", ok=True, first_run_steps=first, backend=backend,
         seconds=round(time.perf_counter() - t0, 1))


LARGE_CHILD = """
import json, resource, sys, time, torch
from pathlib import Path
variant, path, classes, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
from imgx3d.config import load_config
from imgx3d.inference.folder import predict_to_folder
from imgx3d.inference.predictor import InferSettings, Predictor
from imgx3d.methods.base import build_method
cfg = load_config(None, ["method.name=unet", "method.channels=[16,32,64,128]", "method.strides=[2,2,2]",
                         "method.num_res_units=1", "data.patch_size=[96,96,96]", "data.preset=ct", "infer.overlap=0.5",
                         "infer.sw_batch_size=4"])
torch.manual_seed(0)
method = build_method(cfg.method, classes, 1).to(device).eval()
t0 = time.perf_counter()
if variant == "imgx3d":
    labels = {i: f"c{i}" for i in range(classes)}
    predict_to_folder(Predictor(method, cfg, labels, InferSettings.from_config(cfg.infer, device=str(device))), [path], out)
else:  # MONAI's window pass alone, on the tensor the same file holds
    import nibabel as nib
    from monai.inferers import sliding_window_inference
    image = torch.from_numpy(nib.load(str(path)).get_fdata(dtype="float32"))[None, None]
    with torch.inference_mode():
        probs = sliding_window_inference(image, [96, 96, 96], 4, lambda x: torch.softmax(method.net(x), 1),
                                         overlap=0.5, mode="gaussian", sw_device=device, device=torch.device("cpu"))
        probs.max(1).indices
if device.type == "cuda":
    torch.cuda.synchronize()
peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_gpu_gib": peak,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


@section("large_volume")
def check_large_volume(device: torch.device, work: Path, dry: bool) -> None:
    import nibabel as nib

    shape, classes = ((64, 64, 40), 3) if dry else ((512, 512, 300), 14)
    path = work / "large_ct.nii"
    axes = [np.sin(6 * np.linspace(-1, 1, n, dtype=np.float32)) for n in shape]
    ct = (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]) * 300.0
    nib.save(nib.Nifti1Image(ct, np.diag([0.8, 0.8, 1.5, 1.0])), str(path))
    del ct
    figures = {}
    for variant in ("monai", "imgx3d"):
        proc = subprocess.run([sys.executable, "-c", LARGE_CHILD, variant, str(path), str(classes),
                               str(work / f"large_{variant}")], capture_output=True, text=True, timeout=900,
                              env=_child_env())
        if proc.returncode != 0:
            raise RuntimeError(f"{variant}: {proc.stderr[-600:]}")
        figures[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        emit(f"large_volume.{variant}", round(figures[variant]["seconds"], 2), "s", ok=True, shape=list(shape),
             classes=classes, peak_gpu_gib=figures[variant]["peak_gpu_gib"],
             peak_rss_gib=round(figures[variant]["peak_rss_gib"], 2))
    emit("large_volume.ratio", round(figures["monai"]["seconds"] / figures["imgx3d"]["seconds"], 3),
         "monai_window_s / imgx3d_file_to_file_s", ok=True)


@section("hippocampus")
def check_hippocampus(device: torch.device, hippocampus: Path | None, data: Path, work: Path, dry: bool,
                      minutes: float = 3.0) -> None:
    from imgx3d.config import load_config

    if hippocampus is None and not dry:
        emit("hippocampus", None, "dice", ok=True, skipped="pass --hippocampus DIR (MSD Task04 layout)")
        return
    overrides = [f"train.device={device}", "tracking.enabled=false", "data.num_workers=2"]
    if dry:
        overrides += [*DEMO_DATA, *TINY["unet"], "train.max_steps=4", "train.val_every=4", "train.checkpoint_every=4"]
    else:
        overrides += [f"train.max_minutes={minutes}", "train.max_steps=100000"]
    cfg = load_config(CONFIGS / "hippocampus" / "unet.yaml", overrides)
    from imgx3d.training.workflow import train_run

    t0 = time.perf_counter()
    result = train_run(cfg, hippocampus or data, work / "hippocampus")
    seconds = time.perf_counter() - t0
    emit("hippocampus.test.dice.foreground_mean", round(result.test_summary["foreground_mean"]["dice"], 4), "dice",
         ok=True, steps=result.steps, steps_per_s=round(result.steps / seconds, 2),
         test_cases=result.test_summary["cases"], seconds=round(seconds, 1))


@section("plan")
def check_plan(device: torch.device, hippocampus: Path | None, data: Path, work: Path, dry: bool) -> None:
    from imgx3d.planning.fingerprint import fingerprint
    from imgx3d.planning.planner import plan

    t0 = time.perf_counter()
    fp = fingerprint(hippocampus or data, cache_dir=work / "plan")
    fingerprint_s = time.perf_counter() - t0
    result = plan(fp, "unet", budget_minutes=0.2 if dry else 30.0, device=str(device))
    decisions = {d.key: d for d in result.decisions}
    emit("plan.budget_fit", round(time.perf_counter() - t0, 1), "s", ok=True, fingerprint_s=round(fingerprint_s, 1),
         channels=decisions["method.channels"].value, batch_size=decisions["data.batch_size"].value,
         patch_size=decisions["data.patch_size"].value, reason=decisions["method.channels"].reason)


# Host synchronisations per training step the issue allows (U-Net and ImgX: none; elsewhere at most one).
SYNC_LIMITS = {"unet": 0, "imgx": 0}


@section("syncs")
def check_syncs(method: str, device: torch.device, work: Path, dry: bool) -> None:
    """Host synchronisations per training step (optimiser, EMA and scalars included), counted by
    ``torch.cuda.set_sync_debug_mode("warn")`` over 5 steps after 3 warm-up steps (the first steps
    fit a codec's scale and tune cuDNN). On the CPU (--dry-run) the same steps run, uncounted."""
    import warnings

    from imgx3d.methods.base import build_method
    from imgx3d.training.trainer import Trainer

    cfg = _config(method, 8, dry, [f"train.device={device}", "train.ema=0.999"])
    torch.manual_seed(0)
    num_classes = 2 if method == "darl" else 4
    trained = build_method(cfg.method, num_classes, 1)
    trainer = Trainer(cfg, trained, work / f"syncs_{method}", {}, device=device)
    spatial = list(cfg.data.patch_size) if trained.spatial_dims == 3 else list(cfg.data.slices.size)
    batch_size = cfg.data.batch_size
    g = torch.Generator().manual_seed(0)

    def one_step() -> None:
        batch = {"image": torch.rand(batch_size, 1, *spatial, generator=g) * 2 - 1,
                 "label": torch.randint(0, num_classes, (batch_size, 1, *spatial), generator=g)}
        trainer.step(batch)
        trainer.state.step += 1
        trainer.ema.update(trainer.method, trainer.method.plan.stage_index(trainer.state.step - 1))

    skip_codec = getattr(trained.plan.stages[0], "steps", None) if len(trained.plan.stages) > 1 else 0
    trainer.state.step = skip_codec or 0  # count the method's own stage, past a codec phase
    if skip_codec and hasattr(trained, "tau"):
        trained.tau.copy_from(trained.codec)
    for _ in range(3):
        one_step()
    counted = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(5):
                    one_step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counted = sum("synchroniz" in str(w.message) for w in caught)
    else:
        for _ in range(5):
            one_step()
    per_step = counted / 5
    limit = SYNC_LIMITS.get(method, 1)
    emit(f"syncs.{method}", per_step, "host syncs / training step", ok=per_step <= limit or device.type != "cuda",
         limit=limit, counted=device.type == "cuda")


@section("imgx_inference")
def check_imgx_inference(device: torch.device, dry: bool) -> None:
    from imgx3d.config import load_config
    from imgx3d.inference.predictor import predict_probabilities
    from imgx3d.inference.windows import make_window
    from imgx3d.methods.base import build_method

    def timed(name: str) -> float:
        same_levels = ["method.full_res_features=0"] if name == "unet" else []  # the U-Net on ImgX's levels
        cfg = load_config(CONFIGS / "hippocampus" / f"{name}.yaml", same_levels + (
            TINY[name] + ["data.patch_size=[32,32,32]"] if dry else []))
        torch.manual_seed(0)
        method = build_method(cfg.method, 3, 1).to(device).eval()
        image = torch.randn(1, 36, 50, 36, device=device)
        window = make_window(cfg.infer, cfg.data.patch_size)
        predict_probabilities(method, image, window)  # warm-up (cuDNN autotuning)
        repeats = 1 if dry else 5
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            predict_probabilities(method, image, window)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / repeats

    unet, imgx = timed("unet"), timed("imgx")
    emit("imgx_inference.ratio", round(imgx / unet, 2), "imgx_s / unet_s", ok=True, unet_s=round(unet, 4),
         imgx_s=round(imgx, 4))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every section on the CPU at toy sizes")
    parser.add_argument("--hippocampus", type=Path, help="MSD Task04 folder for the 3-minute training")
    parser.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS), help="methods to check")
    parser.add_argument("--minutes", type=float, default=3.0, help="the hippocampus training's minutes")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--only", nargs="*", choices=["env", "methods", "syncs", "torchrun", "large_volume",
                                                      "hippocampus", "imgx_inference", "plan", "regions", "cascade"],
                        help="run only these sections")
    args = parser.parse_args()
    device = torch.device("cpu") if args.dry_run else _device()
    if not args.dry_run and device.type != "cuda":
        print("gpu_check: no CUDA device here; use --dry-run to exercise the script on the CPU", file=sys.stderr)
        return 2
    work = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    from imgx3d.data.demo import write_demo_dataset

    data = write_demo_dataset(work / "demo", 10)
    wanted = set(args.only or ["env", "methods", "syncs", "torchrun", "large_volume", "hippocampus", "imgx_inference",
                               "plan", "regions", "cascade"])
    results = []
    if "env" in wanted:
        results.append(check_env(device))
    if "methods" in wanted:
        results += [check_method(m, device, data, work, args.dry_run) for m in args.methods]
    if "regions" in wanted:
        results.append(check_regions(device, data, work, args.dry_run))
    if "cascade" in wanted:
        results.append(check_cascade(device, data, work, args.dry_run))
    if "syncs" in wanted:
        results += [check_syncs(m, device, work, args.dry_run) for m in args.methods]
    if "torchrun" in wanted:
        results.append(check_torchrun(device, data, work, args.dry_run))
    if "large_volume" in wanted:
        results.append(check_large_volume(device, work, args.dry_run))
    if "hippocampus" in wanted:
        results.append(check_hippocampus(device, args.hippocampus, data, work, args.dry_run, args.minutes))
    if "imgx_inference" in wanted:
        results.append(check_imgx_inference(device, args.dry_run))
    if "plan" in wanted:
        results.append(check_plan(device, args.hippocampus, data, work, args.dry_run))
    emit("gpu_check", sum(results), "sections passed", ok=all(results), failed=len(results) - sum(results),
         peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
