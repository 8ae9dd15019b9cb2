"""Cross-validation as nnU-Net runs it: ``imgx3d train ... --folds 5 --fold all``.

The test share (``data.split.test_fraction``) is cut first and never seen; the other cases are
cut into ``folds`` parts and fold ``k`` validates on part ``k`` while the others train
(:func:`imgx3d.data.catalog.make_split`). ``--fold all`` trains every fold in turn into
``<run_dir>/fold_<k>``; rerun with the same folder, it skips folds that finished (their
``result.json``) and resumes one that was interrupted (its ``last.pt``), as ``imgx3d study`` does.
That folder is then a model: ``imgx3d predict --run <run_dir>`` ensembles its folds, with the
postprocessing decided on all folds' validation cases together.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from imgx3d.config import Config
from imgx3d.errors import ConfigError
from imgx3d.training.workflow import RESULT_FILE, TrainResult, train_run


def fold_dir(run_dir: Path, fold: int) -> Path:
    """Where fold ``fold`` of a cross-validation in ``run_dir`` trains."""
    return Path(run_dir) / f"fold_{fold}"


def parse_folds(fold: str, folds: int) -> list[int]:
    """``all`` → every fold, else the one fold ``fold`` names (a one-line error when out of range)."""
    if fold == "all":
        return list(range(folds))
    if not fold.isdigit() or not 0 <= int(fold) < folds:
        raise ConfigError(f"--fold {fold}: must be 'all' or a fold number from 0 to {folds - 1}")
    return [int(fold)]


def train_folds(cfg: Config, data_root: str | Path, folds: int, which: list[int], run_dir: str | Path | None = None,
                records: dict[str, str] | None = None) -> list[TrainResult]:
    """Train folds ``which`` of a ``folds``-fold cross-validation of ``cfg``, each into ``<run_dir>/fold_<k>``.

    Args:
        run_dir: the cross-validation's folder (default ``runs/<dataset>/<method>-cv-<time>``);
            finished folds in it are skipped, an interrupted one resumes.
        records: files every fold's run folder records (a plan).

    Returns:
        The results of the folds trained by this call (skipped folds are not in it).
    """
    if folds < 2:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least 2 folds")
    base = Path(run_dir or Path("runs") / cfg.dataset / f"{cfg.method.name}-cv-{time.strftime('%Y%m%d-%H%M%S')}")
    results = []
    for k in which:
        folder = fold_dir(base, k)
        if (folder / RESULT_FILE).is_file():
            print(f"cross-validation: fold {k} finished earlier ({folder}), skipped ({folds} folds in all)", flush=True)
            continue
        resume = folder if (folder / "last.pt").is_file() else None
        print(f"cross-validation: {'resuming' if resume else 'training'} fold {k} of {folds} in {folder}", flush=True)
        fold_cfg = replace(cfg, data=replace(cfg.data, split=replace(cfg.data.split, folds=folds, fold=k)))
        results.append(train_run(fold_cfg, data_root, folder, resume, records=records))
    return results
