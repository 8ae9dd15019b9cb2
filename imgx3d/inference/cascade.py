"""The cascade (nnU-Net's ``3d_lowres`` → ``3d_cascade_fullres``): a low-resolution stage sees the
whole case, and its prediction is an extra input of the full-resolution stage.

The full-resolution run names its previous stage in ``data.cascade``. Each case is predicted by
that stage on the case's native grid, as any prediction is (its own spacing, windows, TTA and
postprocessing), brought onto the full-resolution run's model grid the way a label map is
(nearest neighbour), and appended to the normalised image as one 0/1 channel per foreground label.
Training, validation, the test split and ``imgx3d predict`` all build the input this one way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from imgx3d.checkpoint import Checkpoint, load_checkpoint, previous_stage_classes
from imgx3d.data.geometry import GridMap, label_to_model
from imgx3d.data.io import Volume
from imgx3d.errors import ConfigError
from imgx3d.methods.base import Segmenter, method_from_checkpoint

if TYPE_CHECKING:  # the predictor imports this module; this one only calls it
    from imgx3d.inference.predictor import Predictor


class PreviousStage:
    """The low-resolution stage of a cascade, as the callable that makes its input channels.

    Args:
        predictor: the stage's predictor (its own settings; on the device the next stage runs on).
        classes: the label values it predicts, one channel each, in this order.
    """

    def __init__(self, predictor: "Predictor", classes: list[int]):
        self.predictor, self.classes = predictor, classes

    @classmethod
    def from_checkpoint(cls, stage: Checkpoint, device: str = "auto") -> "PreviousStage":
        """The stage stored in (or read from) a checkpoint, predicting on ``device``."""
        from imgx3d.inference.predictor import Predictor  # the predictor imports this module

        return cls(Predictor.from_checkpoints([stage], device=device), previous_stage_classes(stage))

    @property
    def channels(self) -> int:
        """Input channels the stage adds."""
        return len(self.classes)

    def __call__(self, volume: Volume, grid: GridMap) -> torch.Tensor:
        """The stage's prediction of an image volume (``array`` ``(C, X, Y, Z)``, native) as
        ``(K, X', Y', Z')`` float32 channels on the model grid ``grid`` of the next stage."""
        labels = self.predictor.predict_case(self.predictor.from_volume(volume)).labels.array
        model = label_to_model(labels, grid)[0]
        return torch.stack([model == value for value in self.classes]).float()


class RecordedStage:
    """A previous stage's channels of one case, predicted once and kept (uint8: a byte a voxel and label).

    A training case left on disk (over ``data.cache_gib``) is read again each time it is drawn,
    in a loader worker when ``data.num_workers`` > 0; with this as its preprocessor's stage it is
    not predicted again, and a worker never runs the stage (a forked worker cannot use the GPU).
    """

    def __init__(self, channels: torch.Tensor):
        self.maps = channels.to(torch.uint8)

    def __call__(self, volume: Volume, grid: GridMap) -> torch.Tensor:
        """The kept channels as float32 (the case's own; ``volume`` and ``grid`` are the same each time)."""
        return self.maps.float()


def load_previous_stage(source: str | Path, split: dict[str, list[str]]) -> Checkpoint:
    """The checkpoint a run's ``data.cascade`` names, refused in one line when it cannot be a previous stage.

    Args:
        source: the low-resolution run's folder or checkpoint.
        split: this run's split (``train`` / ``val`` / ``test`` case ids).

    Raises:
        ConfigError: not a segmenter, itself a cascade, or trained on a case this run validates or tests
            on (its predictions of those cases would be better than of unseen ones).
    """
    stage = load_checkpoint(source)
    if not isinstance(method_from_checkpoint(stage), Segmenter):
        raise ConfigError(f"{stage.path}: data.cascade needs a segmenting run as the first stage, not "
                          f"'{stage.config.method.name}', which does not predict labels")
    if stage.previous_stage is not None:
        raise ConfigError(f"{stage.path}: is itself a cascade's second stage; name its low-resolution run in "
                          "data.cascade (one stage before this one)")
    split_file = stage.path.parent / "split.json"
    if not split_file.is_file():
        raise ConfigError(f"{split_file}: not found, so which cases the low-resolution stage trained on is unknown; "
                          "name a run folder written by imgx3d train in data.cascade")
    seen = set(json.loads(split_file.read_text(encoding="utf-8"))["train"])
    leaked = sorted(seen & set(split["val"] + split["test"]))
    if leaked:
        raise ConfigError(f"{stage.path}: the low-resolution stage trained on {len(leaked)} of this run's validation "
                          f"or test cases ({', '.join(leaked[:3])}{', ...' if len(leaked) > 3 else ''}); train both "
                          "stages with the same data.split")
    return stage
