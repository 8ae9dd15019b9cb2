"""The cascade (nnU-Net's 3d_lowres → 3d_cascade_fullres) against the full-resolution U-Net alone, same budget.

Three U-Net runs of one plan on one split, each a child process (one thread, CPU-time budgets):

1. ``fullres``: the plan (``--config``, or planned here for ``--minutes`` with ``--plan``) for ``--minutes``.
2. ``lowres``: the planner's low-resolution stage of that plan (``imgx3d.planning.planner.lowres_stage``:
   nnU-Net's spacing rule, the median case as its patch) for its share of the minutes (``LOWRES_SHARE``).
3. ``cascade``: the plan with ``data.cascade`` naming the ``lowres`` run, for the rest of the minutes —
   so ``lowres`` + ``cascade`` train as long as ``fullres`` alone. (The first stage's prediction of the
   training and validation cases comes before the second stage's clock starts; its seconds are printed.)

Prints JSON lines: the plan's patch coverage and the stage's spacing and patch, then per run its steps and
per-class test Dice (``lowres`` scored alone too, on the native grid), and cascade minus fullres.
``--set KEY=VALUE`` goes to every run (e.g. BraTS's regions, or no TTA on large volumes).

Usage:
    python -m benchmarks.cascade --data ../shared/data/brats2015 --config configs/brats/plan.yaml [--minutes 15]
    python -m benchmarks.cascade --data ../shared/data/chaos_t2spir --plan [--minutes 15] [--force]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import yaml

from benchmarks.children import REPO
from benchmarks.common import (add_arm_args, emit, emit_test_summary, machine, save_train_result,
                               train_arm_if_child, train_in_children)

RUNS = ("fullres", "lowres", "cascade")


def configs(args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """(the full-resolution config, the low-resolution stage's config, what the planner said), written under
    ``--out``: the plan read from ``--config`` or planned, and the planner's stage of it."""
    from imgx3d.config import load_yaml
    from imgx3d.planning import plan_folder, reading_config
    from imgx3d.planning.fingerprint import fingerprint
    from imgx3d.planning.planner import Plan, lowres_stage, patch_coverage
    from imgx3d.planning.resolve import resolve_plan

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plan:
        torch.set_num_threads(args.threads)  # planned with the threads each run trains on, on CPU time
        plan, fp = resolve_plan(args.data, "unet", args.minutes, "cpu", overrides=["train.budget_clock=cpu"],
                                cache_dir=plan_folder(args.data) / "bench")
        plan.rivals = {}
        tree = yaml.safe_load(plan.to_yaml())
    else:
        tree = load_yaml(args.config)
        fp = fingerprint(args.data, reading_config(tree), cache_dir=plan_folder(args.data) / "bench")
    tree.pop("planned", None)
    full = Plan(tree)
    stage = lowres_stage(full, fp)
    coverage = patch_coverage(full, fp)
    if stage is None:
        if not args.force:
            raise SystemExit(f"the patch covers {coverage:.0%} of the median case: the planner proposes no cascade "
                             "(--force measures one all the same, its stage's patch covering the whole median case)")
        stage = lowres_stage(full, fp, threshold=1.0)
    full_path, stage_path = out / "fullres.yaml", out / "lowres.yaml"
    full_path.write_text(yaml.safe_dump(full.tree, sort_keys=False), encoding="utf-8")
    stage_path.write_text(yaml.safe_dump(stage.tree, sort_keys=False), encoding="utf-8")
    said = {"coverage": round(coverage, 4), "proposed": coverage < 0.25, "fullres_patch": tree["data"]["patch_size"],
            "fullres_spacing": tree["data"]["spacing"], "lowres_spacing": stage.tree["data"]["spacing"],
            "lowres_patch": stage.tree["data"]["patch_size"], "lowres_strides": stage.tree["method"]["strides"]}
    return full_path, stage_path, said


def train_one(name: str, args: argparse.Namespace) -> dict:
    """Train and test one run; its figures are also saved to ``<out>/<name>/bench_result.json``."""
    from imgx3d.config import load_config
    from imgx3d.planning.planner import LOWRES_SHARE
    from imgx3d.training.workflow import train_run

    out = Path(args.out)
    minutes = {"fullres": args.minutes, "lowres": args.minutes * LOWRES_SHARE,
               "cascade": args.minutes * (1 - LOWRES_SHARE)}[name]
    config = out / ("lowres.yaml" if name == "lowres" else "fullres.yaml")
    cascade = [f"data.cascade={out / 'lowres'}"] if name == "cascade" else []
    overrides = [f"train.max_minutes={minutes:.3f}", f"train.budget_clock={args.clock}", "data.num_workers=0",
                 "train.max_steps=1000000", f"tracking.experiment={args.experiment}", *cascade, *args.set]
    result = train_run(load_config(config, overrides), args.data, out / name)
    log = (out / name / "train.log").read_text(encoding="utf-8")
    first = re.search(r"predicted (\d+) cases in (\d+) s", log)
    return save_train_result(result, minutes=round(minutes, 3),
                             first_stage_seconds=int(first.group(2)) if first else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "brats2015"))
    parser.add_argument("--config", default=str(REPO / "configs" / "brats" / "plan.yaml"))
    parser.add_argument("--plan", action="store_true", help="plan the dataset here (CPU time, --threads) instead")
    parser.add_argument("--force", action="store_true", help="measure a cascade where the planner proposes none")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (the cascade waits for lowres)")
    add_arm_args(parser, "cascade", RUNS)
    args = parser.parse_args()
    if train_arm_if_child(args, train_one):
        return
    name = Path(args.data).resolve().name
    if not (Path(args.out) / "fullres.yaml").exists():
        _, _, said = configs(args)
        (Path(args.out) / "planned.json").write_text(json.dumps(said), encoding="utf-8")
    said = json.loads((Path(args.out) / "planned.json").read_text(encoding="utf-8"))
    emit("cascade.setup", None, "", machine=machine(), dataset=name, minutes=args.minutes, clock=args.clock,
         overrides=args.set, **said)
    forwarded = [f"--{k}={getattr(args, k)}" for k in ("data", "minutes", "clock", "out", "experiment")]
    results = train_in_children(__spec__.name, list(RUNS), forwarded + [f"--set={s}" for s in args.set],
                                Path(args.out), args.parallel, args.threads, after={"cascade": ["lowres"]},
                                resume=True)
    dice = {}
    for run, result in results.items():
        validation = json.loads((Path(result["run_dir"]) / "result.json").read_text(encoding="utf-8"))["best_val_dice"]
        emit_test_summary(f"cascade.{name}.{run}", result["test_summary"], steps=result["steps"],
                          minutes=result["minutes"], stop_reason=result["stop_reason"],
                          best_val_dice=round(validation, 4),
                          cases=result["test_summary"]["cases"], first_stage_seconds=result["first_stage_seconds"])
        dice[run] = result["test_summary"]["foreground_mean"]["dice"]
    emit(f"cascade.{name}.cascade_minus_fullres", round(dice["cascade"] - dice["fullres"], 4), "dice",
         cases=results["fullres"]["test_summary"]["cases"], proposed=said["proposed"])


if __name__ == "__main__":
    main()
