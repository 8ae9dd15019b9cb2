"""The checkpoint file: one format, written in one place and read in one place.

A checkpoint (``best.pt`` / ``last.pt``) holds the run's complete config, the method's weights,
what the data told the run (classes, channels, label names, the slices' spacing) and, in
``last.pt``, the state a resume needs (optimisers, RNG states, the trainer's counters).

Format ``imgx3d-checkpoint-v2`` stores the fully resolved config (every method default written
out). ``v1`` files, from before configs were complete, still load: their ``method:`` section
holds only the keys the user wrote, and the missing ones take today's defaults (so a v1 run is
rebuilt as it ran unless a default changed since; retrain or write the keys into
``config.method`` of the file to pin them).

This module sits at the top level, beside :mod:`imgx3d.config`, rather than in ``training/``:
the trainer writes checkpoints, but inference, synthesis and the latent codec (which takes a
``vae`` run as its weights) read them, and none of those stages should import the trainer's
package to do so.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgx3d.config import Config, from_dict, to_dict
from imgx3d.errors import CheckpointError, ConfigError
from imgx3d.files import atomic_write

CHECKPOINT_FORMAT = "imgx3d-checkpoint-v2"
PREVIOUS_STAGE = "previous_stage"  # a cascade's low-resolution stage: its whole best.pt state
READABLE_FORMATS = ("imgx3d-checkpoint-v1", CHECKPOINT_FORMAT)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as read from disk.

    Attributes:
        path: the file.
        config: the run's config, complete.
        state: everything the file holds (``model`` weights, metadata, resume state).
    """

    path: Path
    config: Config
    state: dict[str, Any]

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The method's ``state_dict``."""
        return self.state["model"]

    @property
    def num_classes(self) -> int:
        return int(self.state["num_classes"])

    @property
    def in_channels(self) -> int:
        return int(self.state["in_channels"])

    @property
    def network_in_channels(self) -> int:
        """Channels the network takes: the image's, and a cascade's one per label of its previous stage."""
        return self.in_channels + cascade_channels(self.previous_stage)

    @property
    def previous_stage(self) -> "Checkpoint | None":
        """A cascade's low-resolution stage (``data.cascade``), stored in this file; None for other runs."""
        state = self.state.get(PREVIOUS_STAGE)
        if state is None:
            return None
        return Checkpoint(self.path, from_dict(Config, state["config"]), state)

    @property
    def labels(self) -> dict[int, str]:
        """Class value → name, as the dataset declared them."""
        return {int(k): v for k, v in self.state["labels"].items()}

    @property
    def method_name(self) -> str:
        return self.config.method.name

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata field (``mlflow_run_id``, ``slice_spacing``, ``channel_names``, ``step``, ...)."""
        return self.state.get(key, default)


def previous_stage_classes(stage: Checkpoint) -> list[int]:
    """The label values a cascade's previous stage predicts, one input channel each (not 0, not ignore)."""
    return [value for value in sorted(stage.labels) if value not in (0, stage.config.data.ignore_label)]


def cascade_channels(stage: Checkpoint | None) -> int:
    """Input channels a cascade's previous stage adds (0 without one)."""
    return 0 if stage is None else len(previous_stage_classes(stage))


def checkpoint_state(config: Config, weights: dict[str, torch.Tensor], **fields: Any) -> dict[str, Any]:
    """The dict a checkpoint file holds: format tag, the complete config, the weights and ``fields``."""
    return {"format": CHECKPOINT_FORMAT, "config": to_dict(config), "method": config.method.name, "model": weights,
            **fields}


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (see :func:`checkpoint_state`) atomically: temp file, then rename.

    Serialised in memory first: torch's own file writer reports a full disk as a bare
    ``RuntimeError``, a Python write as the ``OSError`` that ``atomic_write`` explains.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(buffer.getbuffer()))
    return Path(path)


def add_to_checkpoint(path: Path, **fields: Any) -> None:
    """Add metadata ``fields`` to a written checkpoint (atomically: the old file stays whole until the new one is)."""
    checkpoint = load_checkpoint(path)
    save_checkpoint(checkpoint.path, {**checkpoint.state, **fields})


def resolve_checkpoint_path(source: str | Path) -> Path:
    """A checkpoint file, or the ``best.pt`` of a run folder."""
    path = Path(source)
    return path / "best.pt" if path.is_dir() else path


def load_checkpoint(source: str | Path) -> Checkpoint:
    """Read a checkpoint file (or a run folder's ``best.pt``) written by ``imgx3d train``.

    Raises:
        CheckpointError: missing, unreadable, not an imgx3d checkpoint, or a config that no longer loads.
    """
    path = resolve_checkpoint_path(source)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass a best.pt/last.pt from a run folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}); "
                              "pass a best.pt from imgx3d train") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: not an imgx3d checkpoint; pass a best.pt from imgx3d train")
    try:
        config = from_dict(Config, state["config"])
    except ConfigError as err:  # a key or choice this version no longer has
        raise CheckpointError(f"{path}: its config does not load in this imgx3d version ({err}); use the version "
                              "that trained it, or edit the key in the checkpoint's config") from None
    return Checkpoint(path, config, state)
