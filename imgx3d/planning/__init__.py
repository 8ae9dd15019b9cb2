"""Planning: a dataset's fingerprint (``fingerprint``) and the documented rules that turn it into a
complete config (``planner``), as nnU-Net's experiment planner does, fitted to a compute budget.

May import: ``data``, ``methods`` (their config dataclasses), ``nets``, ``inference`` (a prediction pass is
timed to price test-time augmentation) and the top-level ``config``, ``errors``, ``files``, ``registry``,
``resources``. Imported by the CLI, ``training.study``
and ``training.race``; ``resolve`` is the one way from flags or API arguments to a run's config.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgx3d.config import DataConfig
from imgx3d.errors import InputError

if TYPE_CHECKING:
    from imgx3d.planning.planner import Plan


def parse_budget(text: str) -> float:
    """``30m``, ``2h``, ``90s`` or a bare number of minutes → minutes."""
    units = {"s": 1 / 60, "m": 1.0, "h": 60.0}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "m")
    try:
        minutes = float(number) * units[unit]
    except ValueError:
        raise InputError(f"--budget {text}: not a duration; use e.g. 30m, 2h or 90s") from None
    if minutes <= 0:
        raise InputError(f"--budget {text}: must be more than 0")
    return minutes


def reading_config(tree: dict[str, Any] | None = None, overrides: list[str] | None = None) -> DataConfig:
    """How to read a dataset (:data:`~imgx3d.config.READING_KEYS`: layout, channel files,
    labels) as a config tree and ``key=value`` overrides say; every other key is left to the plan."""
    from imgx3d.config import READING_KEYS, from_dict, parse_overrides, set_dotted

    given = copy.deepcopy(tree or {})
    for key, value in parse_overrides(overrides or []):
        set_dotted(given, key, value)
    data = given.get("data") or {}
    return from_dict(DataConfig, {k: v for k, v in data.items() if k in READING_KEYS}, "data")


def plan_folder(data: str | Path) -> Path:
    """Where plans (and the cached fingerprint) of a dataset go: ``plans/<dataset folder name>``."""
    return Path("plans") / Path(data).resolve().name


def plan_dataset(data: str | Path, method: str = "unet", budget: str | float = "30m", device: str = "auto",
                 cache_dir: str | Path | None = None, reading: list[str] | None = None) -> Plan:
    """Fingerprint the dataset at ``data`` and plan ``method`` for ``budget`` of training (``"30m"``,
    ``"2h"`` or minutes): what ``imgx3d plan`` does (:func:`imgx3d.planning.resolve.resolve_plan`);
    ``.config()`` is the complete config, ``imgx3d.train`` trains it (racing its rivals, if any).

    Args:
        cache_dir: where the fingerprint is cached (default ``plans/<dataset folder name>``).
        reading: ``data.*`` overrides saying how to read the dataset when its layout is not found
            alone, e.g. ``["data.layout=cases", "data.channels=[Flair*,T1c*]"]``.
    """
    from imgx3d.planning.resolve import resolve_plan

    return resolve_plan(data, method, budget, device, overrides=reading, cache_dir=cache_dir)[0]
