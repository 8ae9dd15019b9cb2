"""What ``imgx3d compare`` reads and builds: one finished run's record and a comparison table.

Plain data, shared by :mod:`imgx3d.evaluation.compare` (which fills them from mlflow) and
:mod:`imgx3d.evaluation.plots` (which draws them), so neither imports the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RunRecord:
    """What one finished training run reports.

    Attributes:
        cases: per test case and class name, each metric (from ``test_metrics/metrics.csv``).
        val_curve: (step, validation Dice) history.
        uncertainty: the test split's uncertainty scores the run logged (``ece``, ``error_auc``,
            ``spearman_dice``; :mod:`imgx3d.evaluation.uncertainty`), empty for runs without them.
    """

    run_id: str
    name: str
    method: str
    seconds_per_volume: float
    train_minutes: float
    n_parameters: float
    best_val_dice: float
    cases: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    uncertainty: dict[str, float] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """Class names in the order of the metrics file."""
        return list(dict.fromkeys(name for _, name in self.cases))

    def values(self, metric: str, class_name: str) -> dict[str, float]:
        """case id → ``metric`` of ``class_name`` (NaN where undefined, e.g. HD95 with an empty map)."""
        return {case: row[metric] for (case, name), row in self.cases.items() if name == class_name}

    def case_means(self, metric: str) -> dict[str, float]:
        """case id → ``metric`` averaged over the foreground classes (NaNs left out)."""
        out = {}
        for case in dict.fromkeys(case for case, _ in self.cases):
            values = [row[metric] for (c, _), row in self.cases.items() if c == case and not math.isnan(row[metric])]
            out[case] = float(np.mean(values)) if values else math.nan
        return out


@dataclass
class Comparison:
    """The comparison table and the paired tests, ready to print or save."""

    metric: str
    columns: list[str]
    rows: list[dict[str, object]]
    paired: list[dict[str, object]]
    reference: str
