"""Zero-config against a hand-tuned config: same split, same budget, any dataset.

Two arms, each a child process of this script (``--arm``), run one after the other or side by side
(``--parallel``, one thread each with ``train.budget_clock=cpu``: CPU-time budgets stay fair on a
shared machine):

1. ``hand``: the hand-tuned config (``--hand-config``, e.g. ``configs/hippocampus/unet.yaml`` as it was
   before it became an override of the plan: pass an old copy) trained for the budget.
2. ``plan``: ``imgx3d plan``'s fingerprint and plan of the dataset (timed on this machine with the
   arm's threads, each decision printed), with nothing from the hand-tuned config but the keys
   that say how to read the dataset (layout, channel files, labels) — then trained for the budget.
   With ``--parallel`` the plan is made first, alone: a budget measured while the other arm trains
   beside it would see half the machine and plan too small a patch.

Both arms use the same split (the planner's seeded 20 % / 10 % holdout is every config's default;
folders named train/ validation/ test/ fix it for both). Prints JSON lines: planning seconds, every
decision, steps, per-class test Dice and HD95, and the difference of the foreground means.
``--plan-only`` plans without training (a dataset whose labels are a model's output, such as the
TotalSegmentator example, gets its plan and planning time only).

Usage:
    python -m benchmarks.plan --data ../shared/data/hippocampus --hand-config OLD.yaml [--budget 30]
        [--parallel] [--plan-only] [--only hand|plan] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.children import Child, module, run_children
from benchmarks.common import emit, emit_test_summary, machine

ROOT = Path(__file__).resolve().parents[1]
TARGET = {"hippocampus": 0.865}  # the plans issue's target for the zero-config run


def _plan(args: argparse.Namespace):
    """Fingerprint and plan the dataset (reading keys from the hand-tuned config) through the one resolver
    the CLI uses; emit timings and decisions (the rivals' too)."""
    from imgx3d.config import load_yaml
    from imgx3d.planning import plan_folder, reading_config
    from imgx3d.planning.fingerprint import fingerprint
    from imgx3d.planning.resolve import resolve_plan

    given = load_yaml(args.hand_config) if args.hand_config else {}
    t0 = time.perf_counter()
    fp = fingerprint(args.data, reading_config(given, args.reading), cache_dir=plan_folder(args.data) / "bench")
    fingerprint_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reading = [f"data.{k}={json.dumps(v)}" for k, v in fp.reading.items()]
    clock = [o for o in args.overrides if o.startswith("train.budget_clock=")]  # --parallel: planned on CPU time
    result, _ = resolve_plan(args.data, "unet", args.budget, "cpu", overrides=reading + clock,
                             cache_dir=plan_folder(args.data) / "bench")
    plan_s = time.perf_counter() - t0
    emit("plan.zero_config.planning_seconds", round(fingerprint_s + plan_s, 1), "s",
         fingerprint_s=round(fingerprint_s, 1), budget_fit_s=round(plan_s, 1), cases=len(fp.cases),
         fingerprint_summary=fp.summary())
    for candidate in [result, *result.rivals.values()]:
        prefix = "plan.zero_config.decision" + ("" if candidate is result else f".{candidate.name}")
        for decision in candidate.decisions:
            emit(f"{prefix}.{decision.key}", str(decision.value), "", reason=decision.reason)
    return result


def run_arm(args: argparse.Namespace) -> None:
    """One arm in this process: train it for the budget and emit its steps and test scores."""
    import torch

    from imgx3d.config import load_config
    from imgx3d.training.workflow import train_run

    if args.threads:
        torch.set_num_threads(args.threads)
    # the hand-written config trains for the budget; the plan keeps its own training minutes (the budget less
    # planning and what follows training: the whole run keeps to the budget)
    overrides = [f"tracking.experiment={args.experiment}", *([f"train.max_minutes={args.budget}"]
                                                             if args.arm == "hand" else []), *args.overrides]
    plan_file = Path(args.plan_file)
    rivals = {}
    if args.arm == "plan":
        if not plan_file.is_file():  # plan here (the parent plans first when the arms run side by side)
            result = _plan(args)
            plan_file.write_text(result.to_yaml(), encoding="utf-8")
            for name, rival in result.rivals.items():
                plan_file.with_name(f"{plan_file.stem}.{name}.yaml").write_text(rival.to_yaml(), encoding="utf-8")
        if args.plan_only:
            return
        cfg, records = load_config(plan_file, overrides), {"plan.yaml": plan_file.read_text(encoding="utf-8")}
        rivals = {path.stem.split(".", 1)[1]: (load_config(path, overrides), {"plan.yaml": path.read_text("utf-8")})
                  for path in sorted(plan_file.parent.glob(f"{plan_file.stem}.*.yaml"))}
    else:
        cfg, records = load_config(args.hand_config, overrides), {}
    t0 = time.perf_counter()
    # each arm its own folder: both start in the same second, and the default name carries only the time
    run_dir = Path("runs") / cfg.dataset / f"bench-{args.arm}-{time.strftime('%Y%m%d-%H%M%S')}"
    if rivals:
        from imgx3d.planning.planner import RACE_SHARE
        from imgx3d.training.race import RACE_FILE, race_run

        runs = {"3d": (cfg, records), **rivals}
        run = race_run({n: c for n, (c, _) in runs.items()}, args.data, run_dir, RACE_SHARE,
                       {n: r for n, (_, r) in runs.items()})
        race = json.loads((run.run_dir / RACE_FILE).read_text(encoding="utf-8"))
        emit("plan.zero_config.race", race["winner"], "", **race)
        cfg = load_config(run.run_dir / "config.yaml")
    else:
        run = train_run(cfg, args.data, run_dir, records=records)
    name = "plan.zero_config" if args.arm == "plan" else "plan.hand_tuned"
    emit(f"{name}.train_steps", run.steps, "steps", stop_reason=run.stop_reason, run_id=run.run_id,
         wall_minutes=round((time.perf_counter() - t0) / 60, 2), cpu_minutes=round(time.process_time() / 60, 2),
         planned_train_minutes=cfg.train.max_minutes, best_val_dice=round(run.best_val_dice, 4),
         channels=cfg.method.channels, batch=cfg.data.batch_size, patch=cfg.data.patch_size,
         spatial_dims=cfg.method.spatial_dims)
    emit_test_summary(name, run.test_summary, cases=run.test_summary["cases"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hippocampus"))
    parser.add_argument("--hand-config", help="the hand-tuned config (its reading keys also tell the planner how "
                        "to read the dataset)")
    parser.add_argument("--budget", type=float, default=30.0, help="training minutes of each run")
    parser.add_argument("--experiment", default="bench-plan")
    parser.add_argument("--parallel", action="store_true", help="both arms at once, one thread each, CPU-time "
                        "budgets (train.budget_clock=cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of each arm (0: torch's default)")
    parser.add_argument("--plan-only", action="store_true", help="plan (timed) without training either arm")
    parser.add_argument("--only", choices=["hand", "plan"], help="train this arm alone (e.g. the plan again after a "
                        "planner change, against the hand arm's earlier score on the same split)")
    parser.add_argument("--reading", nargs="*", default=[], help="data.* keys saying how to read the dataset when "
                        "no --hand-config gives them")
    parser.add_argument("--arm", choices=["hand", "plan"], help=argparse.SUPPRESS)
    parser.add_argument("--plan-file", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value for both runs (e.g. train.budget_clock=cpu)")
    args = parser.parse_args()
    if args.arm:
        return run_arm(args)
    if args.parallel:
        args.threads, args.overrides = 1, ["train.budget_clock=cpu", *args.overrides]
    emit("plan.setup", None, "", machine=machine(), budget_minutes=args.budget, data=args.data,
         hand_config=args.hand_config, parallel=args.parallel, threads=args.threads, overrides=args.overrides)
    arms = ["plan"] if args.plan_only or not args.hand_config else [args.only] if args.only else ["hand", "plan"]
    plan_file = Path(tempfile.mkdtemp(prefix="bench-plan-")) / "plan.yaml"
    common = ["--plan-file", str(plan_file), "--data", args.data, "--budget", str(args.budget),
              "--experiment", args.experiment, "--threads", str(args.threads), *(["--hand-config", args.hand_config] if args.hand_config else []),
              *(["--plan-only"] if args.plan_only else []), *(["--reading", *args.reading] if args.reading else [])]
    if args.parallel and not args.plan_only and "plan" in arms:  # plan alone first: timed while no arm trains beside it
        run_children([Child("planning", module(__spec__.name, "--arm", "plan", "--plan-only", *common))], echo=True)
    arms_run = run_children([Child(arm, module(__spec__.name, "--arm", arm, *common, "--", *args.overrides))
                             for arm in arms], parallel=len(arms) if args.parallel else 1, echo=True)
    scores = {}
    for arm in arms:
        for line in arms_run[arm].output.splitlines():
            if line.startswith("{") and json.loads(line)["name"].endswith(".test.dice.foreground_mean"):
                scores[arm] = json.loads(line)["value"]
    if len(scores) == 2:
        emit("plan.zero_config_vs_hand_tuned", round(scores["plan"] - scores["hand"], 4), "dice",
             zero_config=scores["plan"], hand_tuned=scores["hand"],
             target=TARGET.get(Path(args.data).resolve().name))


if __name__ == "__main__":
    main()
