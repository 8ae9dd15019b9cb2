"""Does PIG help a segmenter with little real data? Real only vs real + PIG pairs (1x, 2x), 3 seeds.

The low-data regime of METHODS.md §3 (paper Table 2) on MSD Hippocampus:

1. PIG (configs/hippocampus/pig.yaml) trains on the slices of ``--max-train`` training volumes.
2. ``imgx3d synth`` generates 2x as many pairs as those volumes have foreground slices; the 1x
   set is its first half (pair i depends only on seed and i).
3. The same 2D U-Net (configs/hippocampus/unet2d.yaml) trains on the same real volumes alone,
   and with ``data.extra`` = the 1x or the 2x pairs (drawn in proportion to their number), for
   ``--seeds``, each on a budget of its own CPU time; all are scored in 3D on the native grid
   on the same real test split (validation and test stay real).
4. Mask-image agreement: Dice between each generated mask and the real-only seed-0 U-Net's
   prediction on the generated image.
5. Fréchet distance and KID of the generated slices to the real training slices on that
   U-Net's bottleneck features (named ``segmenter``, not FID), with real test vs real training
   slices as the floor.

Every run logs to one mlflow experiment; JSON lines on stdout, then the table.

    python scripts/bench_augment.py --seg-minutes 5 --parallel 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench import emit, machine  # noqa: E402

from imgx3d.config import load_config  # noqa: E402
from imgx3d.data.catalog import find_cases  # noqa: E402
from imgx3d.data.transforms import Preprocessor  # noqa: E402
from imgx3d.data.slices import foreground_slices as slice_foreground  # noqa: E402
from imgx3d.engine.infer import Predictor  # noqa: E402
from imgx3d.engine.synth_quality import extract, frechet_distance, kernel_distance, segmenter_features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "hippocampus"


def cli(*argv: str, log: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "GIT_PYTHON_REFRESH": "quiet"}
    return subprocess.Popen([sys.executable, "-m", "imgx3d", *argv], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env)


def wait(procs: dict[str, subprocess.Popen], out: Path) -> None:
    for name, proc in procs.items():
        if proc.wait():
            raise SystemExit(f"{name} failed (exit {proc.returncode}); see {out / (name + '.log')}")


def real_slice_count(run_dir: Path, data: str) -> int:
    """Foreground slices (the generator's training pool) of the run's training volumes."""
    cfg = load_config(run_dir / "config.yaml")
    catalog = find_cases(data, cfg.data)
    cases, pre = catalog.by_id(), Preprocessor(cfg.data)
    train = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))["train"]
    axis = cfg.data.slices.axis
    count = 0
    for case_id in train:
        label = pre.load_case(cases[case_id], catalog.labels)["label"][0]
        count += int((label > 0).any(dim=[a for a in range(3) if a != axis]).sum())
    return count


def first_pairs(source: Path, target: Path, n: int) -> None:
    """A dataset of the first ``n`` pairs of ``source`` (links, and its dataset.json cut to them)."""
    dataset = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    for entry in dataset["training"][:n]:
        for key in ("image", "label"):
            link = target / entry[key]
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to((source / entry[key]).resolve())
    dataset.update(training=dataset["training"][:n], numTraining=n)
    (target / "dataset.json").write_text(json.dumps(dataset, indent=1), encoding="utf-8")


def mask_image_agreement(segmenter: Path, pairs: Path, limit: int) -> float:
    """Mean foreground Dice between generated masks and a real-only segmenter's predictions on the generated images."""
    predictor = Predictor.from_checkpoint(segmenter / "best.pt", "cpu")
    dataset = json.loads((pairs / "dataset.json").read_text(encoding="utf-8"))
    import nibabel as nib

    scores = []
    for entry in dataset["training"][:limit]:
        labelmap, _, _ = predictor.predict_paths([pairs / entry["image"]])
        mask = np.asarray(nib.load(str(pairs / entry["label"])).dataobj)
        present = np.union1d(np.unique(labelmap[labelmap > 0]), np.unique(mask[mask > 0]))  # either side's classes
        if len(present):
            per_class = [2 * ((labelmap == c) & (mask == c)).sum() / ((labelmap == c).sum() + (mask == c).sum())
                         for c in present]
            scores.append(float(np.mean(per_class)))
    return float(np.mean(scores)) if scores else float("nan")


def foreground_slices(run_dir: Path, data: str, part: str) -> torch.Tensor:
    """The foreground slices ``(N, C, H, W)`` in [-1, 1] of a split part, as the run's method saw them."""
    cfg = load_config(run_dir / "config.yaml")
    catalog = find_cases(data, cfg.data)
    cases, pre = catalog.by_id(), Preprocessor(cfg.data)
    ids = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))[part]
    items = [pre.load_case(cases[case_id], catalog.labels) for case_id in ids]
    return slice_foreground(items, cfg.data.slices, limit=sys.maxsize)[0]


def generated_slices(pairs: Path, axis: int) -> torch.Tensor:
    """The generated images ``(N, C, H, W)`` of a synth folder, back in [-1, 1]."""
    import nibabel as nib

    dataset = json.loads((pairs / "dataset.json").read_text(encoding="utf-8"))
    images = [np.asarray(nib.load(str(pairs / e["image"])).dataobj, dtype=np.float32) for e in dataset["training"]]
    return torch.stack([torch.from_numpy(i).squeeze(axis)[None] * 2 - 1 for i in images])


def generation_quality(segmenter: Path, pig: Path, pairs: Path, data: str) -> None:
    """Fréchet distance and KID on the real-only segmenter's bottleneck features (not FID: no
    Inception network here): generated vs real training slices, and real test vs real training
    slices as the floor two real samples reach."""
    features = segmenter_features(Predictor.from_checkpoint(segmenter / "best.pt", "cpu").method)
    real_train, real_test = (extract(features, foreground_slices(pig, data, part)) for part in ("train", "test"))
    generated = extract(features, generated_slices(pairs, load_config(pig / "config.yaml").data.slices.axis))
    for name, sample in (("generated_vs_real_train", generated), ("real_test_vs_real_train", real_test)):
        kid, kid_std = kernel_distance(sample, real_train)
        emit(f"augment.frechet_distance.segmenter.{name}", round(frechet_distance(sample, real_train), 3), "",
             n=len(sample), n_reference=len(real_train), features=f"{segmenter.name} U-Net bottleneck (not FID)")
        emit(f"augment.kernel_distance.segmenter.{name}", round(kid, 5), "", std=round(kid_std, 5), n=len(sample))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hippocampus"))
    parser.add_argument("--max-train", type=int, default=20, help="real training volumes (low-data regime)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seg-minutes", type=float, default=5.0, help="CPU minutes per segmenter run")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=2, help="segmenter runs at once (1 thread each)")
    parser.add_argument("--out", default="runs/bench-augment")
    parser.add_argument("--experiment", default="bench-augment")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    track = ["--experiment", args.experiment, "--tracking-uri", args.tracking_uri]
    low_data = [f"data.split.max_train={args.max_train}", "data.num_workers=0"]
    emit("augment.setup", None, "", machine=machine(), max_train=args.max_train, seeds=args.seeds,
         seg_cpu_minutes=args.seg_minutes, sample_steps=args.sample_steps)

    pig = out / "pig"
    if not (pig / "best.pt").exists() or "test:" not in (out / "pig.log").read_text(encoding="utf-8"):
        t0 = time.perf_counter()
        wait({"pig": cli("train", "--config", str(CONFIGS / "pig.yaml"), "--data", args.data, "--run-dir", str(pig),
                         *track, *low_data, log=out / "pig.log", threads=cores)}, out)
        emit("augment.pig.train_minutes", round((time.perf_counter() - t0) / 60, 1), "min")
    n_real = real_slice_count(pig, args.data)
    emit("augment.real_foreground_slices", n_real, "slices", volumes=args.max_train)

    t0 = time.perf_counter()
    synth2x = out / "synth2x"
    wait({"synth": cli("synth", "--run", str(pig), "--n", str(2 * n_real), "--output", str(synth2x), "--batch", "32",
                       "--steps", str(args.sample_steps), log=out / "synth.log", threads=cores)}, out)
    emit("augment.synth.seconds_per_pair", round((time.perf_counter() - t0) / (2 * n_real), 3), "s",
         pairs=2 * n_real, steps=args.sample_steps)
    first_pairs(synth2x, out / "synth1x", n_real)

    variants = {"real": [], "pig1x": [f"data.extra=[{out / 'synth1x'}]"], "pig2x": [f"data.extra=[{out / 'synth2x'}]"]}
    runs = [(f"{v}-seed{s}", s, extra) for s in args.seeds for v, extra in variants.items()]
    pending, running = list(runs), {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name, seed, extra = pending.pop(0)
            if (out / name / "test_metrics" / "summary.json").exists():
                continue  # finished in an earlier invocation
            running[name] = cli("train", "--config", str(CONFIGS / "unet2d.yaml"), "--data", args.data, "--run-dir",
                                str(out / name), "--seed", str(seed), *track, *low_data, *extra,
                                f"train.max_minutes={args.seg_minutes}", "train.budget_clock=cpu",
                                log=out / f"{name}.log", threads=1)
        time.sleep(5)
        for name in [n for n, p in running.items() if p.poll() is not None]:
            wait({name: running.pop(name)}, out)

    dice: dict[str, list[float]] = {v: [] for v in variants}
    for name, seed, _ in runs:
        summary = json.loads((out / name / "test_metrics" / "summary.json").read_text(encoding="utf-8"))
        variant = name.split("-")[0]
        dice[variant].append(summary["foreground_mean"]["dice"])
        emit(f"augment.{name}.test_dice", round(summary["foreground_mean"]["dice"], 4), "dice",
             per_class={c: round(s["dice"]["mean"], 4) for c, s in summary["per_class"].items()},
             hd95=round(summary["foreground_mean"]["hd95"], 3), cases=summary["cases"])
    for variant, values in dice.items():
        emit(f"augment.{variant}.test_dice_mean", round(float(np.mean(values)), 4), "dice",
             std=round(float(np.std(values)), 4), seeds=len(values),
             delta_vs_real=round(float(np.mean(values) - np.mean(dice["real"])), 4))
    agreement = mask_image_agreement(out / f"real-seed{args.seeds[0]}", synth2x, limit=n_real)
    emit("augment.mask_image_agreement_dice", round(agreement, 4), "dice", pairs=n_real,
         segmenter=f"real-seed{args.seeds[0]}")
    generation_quality(out / f"real-seed{args.seeds[0]}", pig, synth2x, args.data)
    print("\n| training data | test Dice (mean ± std over seeds) |\n|---|---|")
    for variant, values in dice.items():
        print(f"| {variant} | {np.mean(values):.4f} ± {np.std(values):.4f} |")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
