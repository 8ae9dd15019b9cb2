"""A fair study in one command: plan a dataset once, train each method on that plan, compare.

``imgx3d study --data DIR --methods unet,imgx,sdseg --budget 30m`` fingerprints the dataset, makes
one U-Net plan with one budget measurement and adapts it to every method
(:func:`imgx3d.planning.planner.plan_methods`: the same split, data section and budget; 3D methods
the same topology, per-slice methods the 2D plan; a thin-slab U-Net plan races its 2D rival as
``imgx3d train`` does), trains each method in turn into
``<study>/<method>`` (test cases predicted and scored on their native grid), and ends with
``compare``'s table, paired tests and plots over those runs, all in one mlflow experiment.

Interrupted, it resumes where it stopped: a method whose run finished is skipped (its
``result.json`` holds the mlflow run id), one with a ``last.pt`` continues from it, the others
start. The plans are written once (``<study>/plans/<method>.yaml``) and reused on a rerun, so a
rerun never re-measures the budget into a different plan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from imgx3d.config import load_config, load_yaml
from imgx3d.errors import ConfigError
from imgx3d.evaluation.compare import write_comparison
from imgx3d.evaluation.records import Comparison
from imgx3d.files import atomic_write_text
from imgx3d.methods.base import Segmenter
from imgx3d.planning import reading_config
from imgx3d.planning.fingerprint import fingerprint
from imgx3d.planning.planner import RACE_SHARE, plan_methods
from imgx3d.planning.resolve import budget_clock_of
from imgx3d.registry import method_class
from imgx3d.training.race import race_run
from imgx3d.training.workflow import RESULT_FILE, train_run

LEGACY_DONE = "study.json"  # the finished-run marker studies wrote before every run wrote result.json


@dataclass
class StudyResult:
    """Where each method's run went, its mlflow run id, and the comparison of them."""

    runs: dict[str, Path]
    run_ids: dict[str, str]
    comparison: Comparison
    files: list[Path]


def check_methods(methods: list[str]) -> None:
    """A study compares segmentations: every method must segment (one-line error otherwise)."""
    if not methods:
        raise ConfigError("--methods: name at least one method, e.g. unet,imgx,sdseg")
    for name in methods:
        if not issubclass(method_class(name), Segmenter):
            raise ConfigError(f"--methods {name}: it does not segment, so a study cannot score it; compare "
                              "segmenters (unet, imgx, sdseg, darl) and train generators with imgx3d train")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods {','.join(methods)}: a method is named twice")


def run_study(data: str | Path, methods: list[str], study_dir: str | Path, budget_minutes: float = 30.0,
              device: str = "auto", tracking_uri: str = "sqlite:///mlflow.db", experiment: str = "",
              overrides: list[str] | None = None) -> StudyResult:
    """Plan ``data`` once, train every method of ``methods`` on its plan, compare the runs.

    Args:
        study_dir: the study's folder (plans, one run folder per method, the comparison).
        experiment: the mlflow experiment of every run and the comparison (default: ``study-<folder name>``).
        overrides: ``key=value`` applied to every method's plan (e.g. ``train.max_steps=500``).
    """
    check_methods(methods)
    study_dir = Path(study_dir)
    experiment = experiment or f"study-{study_dir.resolve().name}"
    configs = _plans(data, methods, study_dir, budget_minutes, device, overrides or [])
    runs, run_ids = {}, {}
    for number, method in enumerate(methods, start=1):
        run_dir = study_dir / method
        done = run_dir / RESULT_FILE
        if not done.is_file() and (run_dir / LEGACY_DONE).is_file():
            done = run_dir / LEGACY_DONE  # a study from before result.json: its finished runs stay finished
        if not done.is_file():
            settings = [*(overrides or []), f"train.device={device}", f"tracking.uri={tracking_uri}",
                        f"tracking.experiment={experiment}", "tracking.enabled=true"]
            candidates = {"": configs[method], **{path.stem.split(".", 1)[1]: path for path in
                                                  sorted(configs[method].parent.glob(f"{method}.*.yaml"))}}
            resume = run_dir if (run_dir / "last.pt").is_file() else None
            print(f"study: {'resuming' if resume else 'training'} {method} ({number}/{len(methods)}) in {run_dir}; "
                  f"done: {', '.join(runs) or 'none yet'}", flush=True)
            if len(candidates) > 1 and resume is None:  # a thin-slab U-Net plan races its rival, as train does
                candidates["3d"] = candidates.pop("")
                race_run({n: load_config(None, settings, base=load_yaml(f)) for n, f in candidates.items()}, data,
                         run_dir, RACE_SHARE, {n: {"plan.yaml": f.read_text(encoding="utf-8")}
                                               for n, f in candidates.items()})
            else:
                cfg = load_config(None, settings, base=load_yaml(configs[method]))
                plan_text = configs[method].read_text(encoding="utf-8")
                train_run(cfg, data, run_dir, resume, records={"plan.yaml": plan_text})
        else:
            print(f"study: {method} ({number}/{len(methods)}) finished earlier ({run_dir}), skipped", flush=True)
        runs[method] = run_dir
        run_ids[method] = json.loads(done.read_text(encoding="utf-8"))["run_id"]
    reference = run_ids.get("unet", run_ids[methods[0]])
    comparison, files = write_comparison(tracking_uri, experiment, study_dir / "comparison", list(run_ids.values()),
                                         reference=reference)
    return StudyResult(runs, run_ids, comparison, files)


def _plans(data: str | Path, methods: list[str], study_dir: Path, budget_minutes: float, device: str,
           overrides: list[str]) -> dict[str, Path]:
    """Each method's plan file: written on the first run (one budget measurement for all), reused after;
    the ``data.*`` overrides that say how to read the dataset (layout, channels, labels) apply to the fingerprint."""
    folder = study_dir / "plans"
    files = {m: folder / f"{m}.yaml" for m in methods}
    missing = [m for m, f in files.items() if not f.is_file()]
    if missing:
        fp = fingerprint(data, reading_config(None, overrides), cache_dir=folder)
        clock = budget_clock_of(overrides)
        for method, result in plan_methods(fp, missing, budget_minutes, device, budget_clock=clock).items():
            print("\n".join([f"study: plan of {method}", *("  " + line for line in result.explain())]))
            for name, rival in result.rivals.items():  # written first: the method's own file marks the plans done
                atomic_write_text(folder / f"{method}.{name}.yaml", rival.to_yaml())
            atomic_write_text(files[method], result.to_yaml())
    return files
