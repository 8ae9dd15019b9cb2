"""``imgx3d`` command line: train, predict, evaluate, compare, demo.

User errors (:class:`Imgx3dError`) are printed as one line and exit with code 2; "no room to write"
errors likewise; ``train``, ``predict``, ``synth`` and ``demo`` stop at a safe point on SIGTERM /
SIGINT (:mod:`imgx3d.interrupts`) and exit 143 / 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from imgx3d.config import TrackingConfig, infer_overrides
from imgx3d.errors import Imgx3dError, InputError, Interrupted, resource_error
from imgx3d.interrupts import stop_on_signals
from imgx3d.planning import parse_budget, plan_folder
from imgx3d.progress import rank_prefix

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACKING_URI = TrackingConfig.uri  # the config's own default


def _add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="mlflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlflow.db in the working directory)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="imgx3d", description="3D medical image segmentation with diffusion models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a method on a dataset folder")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--volume", action="store_true", help="the data are 3D volumes (the default)")
    mode.add_argument("--image", action="store_true", help="the data are 2D images with masks (PNG/JPEG/TIFF/GIF/"
                      "BMP, e.g. image/ + label/); needs a 2D method such as sdseg")
    p.add_argument("--config", help="YAML config, e.g. configs/hippocampus/unet.yaml; without it the dataset is "
                   "planned first (imgx3d plan), and with --budget the file's keys override the plan")
    p.add_argument("--budget", help="plan the dataset for this much training (30m, 2h, 90s; bare numbers are "
                   "minutes) and train on the plan")
    p.add_argument("--data", required=True, help="dataset folder (MSD, nnU-Net v2, BTCV, case folders or pairs)")
    p.add_argument("--method", help="train this method instead of the config's (keys it shares with the "
                   "config's method are kept), e.g. --method vae to train the codec an sdseg config describes")
    p.add_argument("--seed", type=int, help="seed of Python, NumPy, torch and the patch sampler")
    p.add_argument("--run-dir", help="output folder of the run (default runs/<dataset>/<method>-<time>)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (train.device; under torchrun each rank takes its "
                   "own GPU)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt")
    p.add_argument("--folds", type=int, help="cross-validation as in nnU-Net: the non-test cases cut into N folds, "
                   "each validating once; with --fold all every fold trains into RUN_DIR/fold_<k> (rerun to resume), "
                   "and predict --run RUN_DIR ensembles them")
    p.add_argument("--fold", help="with --folds: the validation fold to train (0 ... N-1) or all (the default)")
    p.add_argument("--experiment", help="mlflow experiment (default: the config's dataset name)")
    p.add_argument("--register", metavar="NAME", help="register the trained model in mlflow's model registry under "
                   "NAME (predict with --model models:/NAME/VERSION)")
    p.add_argument("--no-track", action="store_true", help="do not log to mlflow")
    _add_tracking(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=500")

    p = sub.add_parser("plan", help="fingerprint a dataset and write a complete config for it, every decision "
                       "explained (nnU-Net's rules, fitted to a measured compute budget)")
    p.add_argument("--data", required=True, help="dataset folder (MSD, nnU-Net v2, BTCV, case folders or pairs)")
    p.add_argument("--method", default="unet", help="the method to plan (3D methods share the U-Net's topology; "
                   "per-slice methods get the 2D plan)")
    p.add_argument("--budget", default="30m", help="training time the plan must fit: 30m, 2h, 90s (bare: minutes)")
    p.add_argument("--device", default="auto", help="where the budget is measured: auto, cpu, cuda or cuda:N")
    p.add_argument("--output", help="the plan's YAML (default plans/<dataset>/<method>.yaml)")
    p.add_argument("--config", help="a config whose keys go over the plan (and whose data.layout, channels, labels "
                   "... say how to read the dataset)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="keys over the plan, e.g. data.layout=cases "
                   "data.channels=[Flair*,T1c*] for case folders")

    p = sub.add_parser("study", help="plan a dataset once, train several methods on the same split and budget, "
                       "and compare them (table, paired tests, plots); an interrupted study resumes")
    p.add_argument("--data", required=True, help="dataset folder (MSD, nnU-Net v2, BTCV, case folders or pairs)")
    p.add_argument("--methods", required=True, help="comma-separated segmenters, e.g. unet,imgx,sdseg")
    p.add_argument("--budget", default="30m", help="training time of each method: 30m, 2h, 90s (bare: minutes)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (planning and training)")
    p.add_argument("--study-dir", help="the study's folder (default studies/<dataset folder name>); rerun with "
                   "the same folder to resume")
    p.add_argument("--experiment", help="mlflow experiment (default study-<study folder name>)")
    _add_tracking(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every method")

    p = sub.add_parser("predict", help="predict NIfTI label maps for volumes or folders")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", nargs="+", help="mlflow run id, or a run folder; several, or a cross-validation "
                     "folder (fold_*/): an ensemble averaging their class probabilities")
    src.add_argument("--checkpoint", help="a best.pt / last.pt checkpoint")
    src.add_argument("--model", help="an mlflow model logged by imgx3d train: models:/NAME/VERSION, "
                     "models:/NAME@ALIAS or runs:/RUN_ID/model")
    p.add_argument("--input", nargs="+", required=True, help="volume files, DICOM folders, or folders of volumes")
    p.add_argument("--output", required=True, help="output folder (never an input folder)")
    p.add_argument("--overwrite", action="store_true", help="re-predict cases whose output exists")
    p.add_argument("--probabilities", action="store_true", help="also write <case>_probabilities.nii.gz")
    p.add_argument("--uncertainty", action="store_true", help="also write <case>_uncertainty.nii.gz (predictive "
                   "entropy; and the mutual information of the members when TTA, an ensemble or samples are "
                   "averaged) and uncertainty.csv, the cases most unsure first")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation over all three axes")
    p.add_argument("--tta-shifts", type=int, metavar="N", help="3D methods: also predict the volume shifted by "
                   "1 … N-1 voxels along every axis and average (infer.tta_shifts; 1: none, N times faster)")
    p.add_argument("--no-postprocess", action="store_true", help="the raw label map, without the largest-component "
                   "steps the run learned from its validation cases")
    p.add_argument("--overlay", metavar="DIR", help="also write a PNG montage of each case's contours to DIR")
    p.add_argument("--workers", type=int, default=0, help="threads reading the next cases while one is predicted, "
                   "results written behind it (0, the default: one case at a time; pays off when reading is slow "
                   "and cores are free)")
    p.add_argument("--part", metavar="K/N", help="predict only every N-th case starting at the K-th (0 <= K < N), "
                   "nnU-Net's -part_id/-num_parts: N jobs of an array, processes or machines share one folder "
                   "(under torchrun the processes split each part further by rank)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--sw-batch-size", type=int, help="windows per forward pass (infer.sw_batch_size; larger is faster "
                   "on a GPU with memory to spare)")
    p.add_argument("--overlap", type=float, help="sliding-window overlap fraction (infer.overlap, nnU-Net: 0.5)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision of the network (infer.precision; auto: bf16/fp16 on CUDA, bf16 on a CPU "
                   "with bf16 instructions, else fp32)")
    _add_tracking(p)
    p.add_argument("overrides", nargs="*", metavar="infer.key=value", help="the run's infer: settings to change for "
                   "this prediction (e.g. infer.tta_flips=[0,1] infer.streaming=on); the flags above win")

    p = sub.add_parser("synth", help="generate image/mask pairs with a generator run (pig, siamese) as a dataset")
    p.add_argument("--run", required=True, help="the generator's run folder or checkpoint")
    p.add_argument("--n", type=int, required=True, help="number of pairs")
    p.add_argument("--output", required=True, help="dataset folder to write (an interrupted synthesis resumes)")
    p.add_argument("--masks", help="dataset folder whose label slices condition a mask-conditioned generator "
                   "(siamese); pair i takes mask i mod M; the run's validation and test cases are left out")
    p.add_argument("--random-masks", action="store_true", help="scale, rotate and shift each mask first")
    p.add_argument("--seed", type=int, default=0, help="pair i depends only on (seed, i)")
    p.add_argument("--batch", type=int, default=8, help="pairs generated per forward pass")
    p.add_argument("--steps", type=int, help="sampling steps (default: the method's sample_steps)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="fp32",
                   help="autocast precision of the generator (default fp32; see docs/scaling.md for bf16's pairs)")

    p = sub.add_parser("evaluate", help="score predictions against references (Dice, IoU, HD95, NSD)")
    p.add_argument("--pred", required=True, help="folder of predicted label maps")
    p.add_argument("--ref", required=True, help="folder of reference label maps with the same file names")
    p.add_argument("--labels", nargs="*", type=int, help="label values to score (default: all found)")
    p.add_argument("--output", help="where metrics.csv and summary.json go (default: --pred)")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, help="surface tolerance in mm for NSD")
    p.add_argument("--overlay", metavar="DIR", help="write a PNG montage per case, prediction (solid) and "
                   "reference (dashed) contours, on the image from --images when given")
    p.add_argument("--images", help="folder of the images (same case names), the overlays' background")
    p.add_argument("--uncertainty", metavar="DIR", help="also score the uncertainty maps of predict --uncertainty in "
                   "DIR (usually --pred): ECE of <case>_probabilities.nii.gz, the AUC of the entropy for finding "
                   "errors, the Spearman correlation of per-case uncertainty with Dice")
    p.add_argument("--config", help="a training config (a run's config.yaml): its data.labels names the classes, its "
                   "data.mask_threshold / data.label_map turn both folders' file values into classes and its "
                   "data.ignore_label leaves the reference's voxels not annotated out")
    p.add_argument("--regions", help="score regions, the BraTS way (data.regions): name → label values, e.g. "
                   "'{whole: [1, 2, 3, 4], core: [1, 3, 4], enhancing: [4]}'")

    p = sub.add_parser("compare", help="compare the runs of an mlflow experiment: table, paired tests, plots")
    p.add_argument("--experiment", required=True, help="mlflow experiment (the dataset name by default in train)")
    p.add_argument("--runs", nargs="*", help="run ids or run names to compare (default: every finished run)")
    p.add_argument("--metric", default="dice", choices=["dice", "iou", "hd95", "nsd"],
                   help="the per-class metric of the table, the box plots and the paired tests")
    p.add_argument("--by", default="run", choices=["run", "method"],
                   help="one row per run, or per method (its run with the best validation Dice)")
    p.add_argument("--reference", help="run id or name the others are tested against (default: the first unet run)")
    p.add_argument("--output", help="folder for table.md, table.csv, paired.csv and the plots "
                   "(default: comparisons/<experiment>)")
    p.add_argument("--no-log", action="store_true", help="do not log the comparison as an mlflow run")
    _add_tracking(p)

    p = sub.add_parser("cv", help="summarise cross-validations: per-fold validation Dice (raw and postprocessed), "
                       "test Dice, and their mean")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--experiment", help="the mlflow experiment the folds were logged to")
    where.add_argument("--folder", help="a cross-validation folder (the --run-dir of train --folds)")
    p.add_argument("--output", help="folder for cv.md and cv.json (default: --folder, else comparisons/<experiment>)")
    _add_tracking(p)

    p = sub.add_parser("export", help="a trained single-pass segmenter (unet) as TorchScript or ONNX, with a JSON of "
                       "its preprocessing, window and labels, for use without imgx3d")
    p.add_argument("--run", required=True, help="mlflow run id, a run folder or a checkpoint")
    p.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    p.add_argument("--output", required=True, help="folder for model.pt / model.onnx and imgx3d_export.json")
    _add_tracking(p)

    p = sub.add_parser("demo", help="the main job on built-in procedural data: train, predict, evaluate")
    p.add_argument("--workdir", default="imgx3d_demo", help="folder for data, runs, predictions")
    p.add_argument("--method", choices=["unet", "imgx"], default="unet",
                   help="unet (configs/demo.yaml) or imgx (configs/demo_imgx.yaml)")
    p.add_argument("--config", help="demo config (default: by --method)")
    p.add_argument("--cases", type=int, default=36, help="number of generated volumes")
    p.add_argument("--no-track", action="store_true", help="do not log to mlflow")
    _add_tracking(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return parser



def _load_overrides(args: argparse.Namespace):
    """The run's :class:`~imgx3d.planning.resolve.Resolved` config: the flags as ``key=value`` overrides,
    through the one resolver the Python API and the benchmarks use too."""
    from imgx3d.planning.resolve import resolve_run

    overrides = list(args.overrides)
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "device", None):
        overrides.append(f"train.device={args.device}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if getattr(args, "experiment", None):
        overrides.append(f"tracking.experiment={args.experiment}")
    if args.no_track:
        overrides.append("tracking.enabled=false")
    if getattr(args, "register", None):
        overrides.append(f"tracking.register={args.register}")
    if getattr(args, "image", False) or getattr(args, "volume", False):
        overrides.append(f"data.mode={'image' if args.image else 'volume'}")
    return resolve_run(getattr(args, "data", None), args.config, getattr(args, "method", None),
                       getattr(args, "budget", None), getattr(args, "device", None) or "auto", overrides)


def tracking_uri(flag: str | None) -> str:
    """mlflow's own convention: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _load(args: argparse.Namespace):
    """The run's config — the file (or the dataset's plan), the flags and overrides, then mlflow's
    environment variables (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``) where neither flag
    nor file set the value — and the files that record a plan in the run folder."""
    resolved = _load_overrides(args)
    for run in [resolved, *resolved.rivals.values()]:
        cfg = run.config
        if not args.tracking_uri and cfg.tracking.uri == DEFAULT_TRACKING_URI:
            cfg.tracking.uri = tracking_uri(None)
        if not getattr(args, "experiment", None) and not cfg.tracking.experiment:
            cfg.tracking.experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "")
    return resolved


def cmd_train(args: argparse.Namespace) -> int:
    from imgx3d.training.workflow import train_run

    if args.fold is not None and args.folds is None:
        raise InputError(f"--fold {args.fold}: needs --folds N (the number of cross-validation folds)")
    resolved = _load(args)
    cfg, records = resolved.config, resolved.records
    if resolved.rivals and args.folds is None and not args.resume:
        from imgx3d.training.race import train_resolved

        train_resolved(resolved, args.data, args.run_dir)  # the run prints its result (and keeps it in train.log)
        return 0
    if args.folds is not None:
        from imgx3d.training.folds import parse_folds, train_folds

        if args.resume:
            raise InputError("--resume with --folds: rerun the same command with --run-dir of the cross-validation; "
                             "finished folds are skipped and an interrupted one resumes")
        which = parse_folds(args.fold or "all", args.folds)
        train_folds(cfg, args.data, args.folds, which, args.run_dir, records)
        return 0
    train_run(cfg, args.data, args.run_dir, args.resume, records=records)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from imgx3d.checkpoint import load_checkpoint
    from imgx3d.inference.folder import predict_to_folder
    from imgx3d.inference.predictor import Predictor

    if args.workers < 0:
        raise InputError(f"--workers {args.workers}: must be >= 0")
    part, device = prediction_share(args.part, args.device)
    # the run's infer: settings, overridden by the flags (--sw-batch-size 0, --overlap 1.5: the config's own errors)
    # --run: folders or mlflow run ids (several: an ensemble)
    source = load_checkpoint(args.checkpoint) if args.checkpoint else args.run
    if args.model:
        from imgx3d.inference.mlflow_model import checkpoint_of_model

        with tempfile.TemporaryDirectory() as tmp:  # the checkpoint is read whole; the download can go
            source = load_checkpoint(checkpoint_of_model(args.model, tracking_uri(args.tracking_uri), Path(tmp)))
    flags = {"tta_flips": [0, 1, 2] if args.tta else None, "tta_shifts": args.tta_shifts,
             "sw_batch_size": args.sw_batch_size, "overlap": args.overlap, "precision": args.precision,
             "postprocess": False if args.no_postprocess else None}
    settings = {**infer_overrides(args.overrides), **{k: v for k, v in flags.items() if v is not None}}
    predictor = Predictor.load(source, tracking_uri=tracking_uri(args.tracking_uri), device=device, **settings)
    written = predict_to_folder(predictor, args.input, args.output, args.overwrite, args.probabilities, args.overlay,
                                args.workers, part, args.uncertainty)
    share = f" (part {part[0]}/{part[1]})" if part[1] > 1 else ""
    print(f"{rank_prefix()}{len(written)} prediction(s){share} in {args.output}")
    return 0


def prediction_share(part: str | None, device: str) -> tuple[tuple[int, int], str]:
    """The share of the cases this process predicts, ``(k, n)``, and its device.

    ``--part K/N`` gives every N-th case from the K-th; under ``torchrun`` (``WORLD_SIZE`` > 1) the
    processes split that part further, rank ``r`` of ``G`` taking part ``K + N·r`` of ``N·G``, each
    on GPU ``LOCAL_RANK`` when there are GPUs and ``--device auto``. No process group is formed: the
    shares are disjoint and the folder's locks keep any overlap (a restarted job) from writing twice.
    """
    k, n = 0, 1
    if part:
        try:
            k, n = (int(x) for x in part.split("/"))
        except ValueError:
            raise InputError(f"--part {part}: write K/N, e.g. --part 0/4 for the first of 4 parts") from None
        if not 0 <= k < n:
            raise InputError(f"--part {part}: needs 0 <= K < N (parts are numbered from 0, as nnU-Net's -part_id)")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        k, n = k + n * rank, n * world  # cases[K::N][rank::world]
        if device == "auto":
            import torch

            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return (k, n), device


def cmd_evaluate(args: argparse.Namespace) -> int:
    from imgx3d.evaluation.metrics import evaluate_folders, format_table

    labels, data_cfg = None, None
    if args.config:
        from imgx3d.config import load_config

        data_cfg = load_config(args.config).data
        labels = {0: "background", **data_cfg.labels} if data_cfg.labels else None
    if args.labels:
        labels = {0: "background", **{v: (labels or {}).get(v, f"label_{v}") for v in args.labels if v != 0}}
    if args.regions:  # checked as the config key is, then over the --config's data settings (or the defaults)
        import dataclasses

        from imgx3d.config import DataConfig, load_config

        regions = load_config(None, [f"data.regions={args.regions}"]).data.regions
        data_cfg = dataclasses.replace(data_cfg or DataConfig(), regions=regions, region_labels=[])
    rows, summary = evaluate_folders(args.pred, args.ref, labels, args.output or args.pred, args.nsd_tolerance,
                                     data_cfg)
    if args.overlay:
        from imgx3d.evaluation.plots import overlay_folder

        n = len(overlay_folder(args.pred, args.ref, args.overlay, args.images, data_cfg))
        print(f"{n} overlay(s) in {args.overlay}")
    print(format_table(summary))
    print(f"metrics.csv and summary.json in {args.output or args.pred}")
    if args.uncertainty:
        _evaluate_uncertainty(args, rows, data_cfg)
    return 0


def _evaluate_uncertainty(args: argparse.Namespace, rows: list[dict], data_cfg) -> None:
    from imgx3d.evaluation.uncertainty import evaluate_uncertainty_folders
    from imgx3d.files import atomic_write_text

    try:
        result = evaluate_uncertainty_folders(args.pred, args.ref, args.uncertainty, rows, data_cfg)
    except FileNotFoundError as err:
        raise InputError(str(err)) from None
    output = Path(args.output or args.pred) / "uncertainty_metrics.json"
    atomic_write_text(output, json.dumps(result, indent=1))
    ece = "n/a (no <case>_probabilities.nii.gz: predict with --probabilities)" if result["ece"] is None \
        else f"{result['ece']:.4f}"
    print(f"uncertainty ({result['cases']} cases): ECE {ece}; error AUC {result['error_auc']:.4f}; Spearman "
          f"(foreground entropy, Dice) {result['spearman_dice']:.3f} (p {result['spearman_p']:.2g}); in {output}")


def cmd_plan(args: argparse.Namespace) -> int:
    import time

    from imgx3d.files import atomic_write_text
    from imgx3d.planning.planner import RACE_SHARE
    from imgx3d.planning.resolve import resolve_plan

    t0 = time.perf_counter()
    result, fp = resolve_plan(args.data, args.method, args.budget, args.device, args.config, args.overrides)
    print("fingerprint:")
    print("\n".join("  " + line for line in fp.summary()))
    print(f"plan for {args.method}, {parse_budget(args.budget):g} minutes of training "
          f"({time.perf_counter() - t0:.1f} s with the fingerprint):")
    print("\n".join("  " + line for line in result.explain()))
    output = Path(args.output or plan_folder(args.data) / f"{args.method}.yaml")
    atomic_write_text(output, result.to_yaml())
    print(f"plan written to {output}; train on it with: imgx3d train --config {output} --data {args.data}")
    if result.cascade is not None:
        stage_file = output.with_name(f"{output.stem}.lowres{output.suffix}")
        atomic_write_text(stage_file, result.cascade.to_yaml())
        stage_run = Path("runs") / result.tree["dataset"] / "lowres"
        rest = round(float(result.tree["train"]["max_minutes"]) - float(result.cascade.tree["train"]["max_minutes"]), 2)
        print(f"cascade proposed (the patch covers {result.planned['cascade']['coverage']:.1%} of the median case): "
              f"its low-resolution stage is written to {stage_file}; train the two stages in the same budget with:\n"
              f"  imgx3d train --config {stage_file} --data {args.data} --run-dir {stage_run}\n"
              f"  imgx3d train --config {output} --data {args.data} data.cascade={stage_run} "
              f"train.max_minutes={rest:g}")
    for name, rival in result.rivals.items():
        other = output.with_name(f"{output.stem}.{name}{output.suffix}")
        atomic_write_text(other, rival.to_yaml())
        print(f"rival plan {name} written to {other}: imgx3d train --budget {args.budget} --data {args.data} races "
              f"the two ({100 * RACE_SHARE:g} % of the budget each, the better on validation continues)")
        print("\n".join("  " + line for line in rival.explain() if line.startswith(("method.", "data.slices",
                                                                                     "data.batch_size"))))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from imgx3d.evaluation.compare import to_markdown
    from imgx3d.training.study import run_study

    study_dir = Path(args.study_dir or Path("studies") / Path(args.data).resolve().name)
    result = run_study(args.data, [m.strip() for m in args.methods.split(",") if m.strip()], study_dir,
                       parse_budget(args.budget), args.device, tracking_uri(args.tracking_uri),
                       args.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", ""), args.overrides)
    print(to_markdown(result.comparison))
    print(f"runs: {', '.join(f'{m} {d}' for m, d in result.runs.items())}; comparison in {study_dir / 'comparison'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from imgx3d.evaluation.compare import to_markdown, write_comparison

    output = Path(args.output or Path("comparisons") / args.experiment)
    comparison, files = write_comparison(tracking_uri(args.tracking_uri), args.experiment, output,
                                         args.runs, args.metric, args.by, args.reference, not args.no_log)
    print(to_markdown(comparison))
    print(f"{len(files)} files in {output}: " + ", ".join(f.name for f in files))
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from imgx3d.evaluation.cv import records_from_folder, records_from_mlflow, summarise, to_markdown
    from imgx3d.files import atomic_write_text

    if args.folder:
        records = records_from_folder(args.folder)
    else:
        records = records_from_mlflow(tracking_uri(args.tracking_uri), args.experiment)
    summaries = summarise(records)
    output = Path(args.output or args.folder or Path("comparisons") / args.experiment)
    atomic_write_text(output / "cv.md", to_markdown(summaries))
    atomic_write_text(output / "cv.json", json.dumps([s.to_json() for s in summaries], indent=1))
    print(to_markdown(summaries))
    print(f"cv.md and cv.json in {output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from imgx3d.inference.export import SETTINGS_FILE, export_run

    settings = export_run(args.run, args.format, args.output, tracking_uri(args.tracking_uri))
    check = ("not checked (install onnxruntime to check it)" if settings["max_abs_difference"] is None
             else f"max |exported - PyTorch| = {settings['max_abs_difference']:.2g}")
    print(f"{Path(args.output) / settings['file']} and {SETTINGS_FILE} written; {check}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from imgx3d.synthesis.synth import synthesize

    out = synthesize(args.run, args.n, args.output, args.seed, args.batch, args.steps, args.device, args.masks,
                     args.random_masks, args.precision)
    print(f"{args.n} pair(s) in {out} (train on them with data.extra=[{out}])")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from imgx3d.training.workflow import run_demo

    if not args.config:
        args.config = str(REPO_ROOT / "configs" / ("demo.yaml" if args.method == "unet" else "demo_imgx.yaml"))
    cfg = _load(args).config
    run_demo(cfg, Path(args.workdir), args.cases)
    return 0


def resume_command(argv: list[str], run_dir: Path, folds: bool = False) -> str:
    """The ``imgx3d train`` command line that continues ``run_dir``: ``argv`` with ``--resume RUN_DIR``
    in place of any ``--run-dir`` / ``--resume``; for a fold of a cross-validation (``folds``), the
    same command with ``--run-dir`` of the cross-validation (it skips finished folds and resumes this one)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--run-dir", "--resume"):
            skip = True
        elif not arg.startswith(("--run-dir=", "--resume=")):
            kept.append(arg)
    at = kept.index("train") + 1 if "train" in kept else 0
    flag, folder = ("--run-dir", run_dir.parent) if folds else ("--resume", run_dir)
    return shlex.join(["imgx3d", *kept[:at], flag, str(folder), *kept[at:]])


# Commands that stop at a safe point on SIGTERM / SIGINT (the rest stop at once).
STOPPABLE = ("train", "predict", "synth", "demo")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imgx3d`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # mlflow probes git; stay quiet without it
    commands = {"train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "compare": cmd_compare,
                "study": cmd_study, "cv": cmd_cv, "export": cmd_export,
                "demo": cmd_demo, "synth": cmd_synth, "plan": cmd_plan}
    try:
        with stop_on_signals() if args.command in STOPPABLE else contextlib.nullcontext():
            return commands[args.command](args)
    except Interrupted as err:
        resumable = err.resume_dir is not None and args.command == "train"
        folds = resumable and getattr(args, "folds", None) is not None
        hint = f"; continue with: {resume_command(argv, err.resume_dir, folds)}" if resumable else ""
        print(f"{rank_prefix()}imgx3d: interrupted: {err}{hint}", file=sys.stderr)
        return err.exit_code
    except Imgx3dError as err:
        print(f"{rank_prefix()}imgx3d: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # a write outside atomic_write (mlflow's store, a folder) that found no room
        no_room = resource_error(err)
        if no_room is None:
            raise
        print(f"{rank_prefix()}imgx3d: error: {no_room}", file=sys.stderr)
        return no_room.exit_code
    except KeyboardInterrupt:
        print(f"{rank_prefix()}imgx3d: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
