"""Zero-config against the hand-tuned config: same split, same budget (MSD hippocampus).

1. The hand-tuned baseline, measured in this run: ``scripts/bench_hippocampus.py`` (the shipped
   ``configs/hippocampus/unet.yaml``), in a subprocess; its JSON lines pass through.
2. The zero-config run: ``imgx3d plan``'s fingerprint and plan of the dataset (timed, each
   decision printed), then training on the plan with nothing but the split and the budget set —
   the same split as the hand-tuned config (seed 0: 144 train / 16 val / 40 test).

Prints JSON lines (planning seconds, the plan's key decisions, steps, test Dice and HD95 per
class, and the difference to the baseline), and logs both runs to one mlflow experiment.

Usage:
    python scripts/bench_plan.py [--data ../shared/data/hippocampus] [--budget 30] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench import emit, emit_test_summary, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hippocampus"))
    parser.add_argument("--budget", type=float, default=30.0, help="training minutes of each run")
    parser.add_argument("--experiment", default="bench-plan")
    parser.add_argument("--skip-baseline", action="store_true", help="only the zero-config run")
    parser.add_argument("overrides", nargs="*", help="key=value for both runs (e.g. train.budget_clock=cpu)")
    args = parser.parse_args()
    emit("plan.setup", None, "", machine=machine(), budget_minutes=args.budget, data=args.data)
    baseline = None
    if not args.skip_baseline:
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hippocampus.py"), "--data", args.data,
                               "--experiment", args.experiment, f"train.max_minutes={args.budget}", *args.overrides],
                              capture_output=True, text=True, cwd=ROOT)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
                if '"hippocampus.unet.test.dice.foreground_mean"' in line:
                    import json

                    baseline = json.loads(line)["value"]
        if proc.returncode:
            sys.exit(f"bench_hippocampus failed: {proc.stderr[-2000:]}")

    from imgx3d.cli import plan_folder
    from imgx3d.planning.fingerprint import fingerprint
    from imgx3d.planning.planner import plan
    from imgx3d.training.workflow import train_run

    t0 = time.perf_counter()
    fp = fingerprint(args.data, cache_dir=plan_folder(args.data) / "bench")
    fingerprint_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = plan(fp, "unet", args.budget, "cpu")
    plan_s = time.perf_counter() - t0
    emit("plan.zero_config.planning_seconds", round(fingerprint_s + plan_s, 1), "s",
         fingerprint_s=round(fingerprint_s, 1), budget_fit_s=round(plan_s, 1))
    for decision in result.decisions:
        emit(f"plan.zero_config.decision.{decision.key}", str(decision.value), "", reason=decision.reason)
    # the split of the hand-tuned config (its own default is the same 20 % / 10 %, seed 0), the budget, no other key
    cfg = result.config([f"tracking.experiment={args.experiment}", *args.overrides])
    t0 = time.perf_counter()
    run = train_run(cfg, args.data, records={"plan.yaml": result.to_yaml()})
    emit("plan.zero_config.train_steps", run.steps, "steps", stop_reason=run.stop_reason, run_id=run.run_id,
         wall_minutes=round((time.perf_counter() - t0) / 60, 2))
    ours = run.test_summary["foreground_mean"]["dice"]
    emit_test_summary("plan.zero_config", run.test_summary, target=0.865,
                      baseline_hand_tuned=baseline, difference=round(ours - baseline, 4) if baseline else None)


if __name__ == "__main__":
    main()
