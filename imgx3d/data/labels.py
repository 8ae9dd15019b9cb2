"""Label values, in one place: class index ⇄ class value ⇄ file value, and the dtypes they take.

Three numberings meet here:

- **class index** ``0 … K−1``: a network's output channel;
- **class value**: the dataset's label value (``dataset.json`` / ``data.labels``), usually
  equal to the index, but not always (labels ``{0, 1, 4}``: index 2 is value 4);
- **file value**: what a label file stores, when ``data.mask_threshold`` (masks of 0/255, JPEG
  masks) or ``data.label_map`` (ISBI 2012: ``{0: 1, 255: 0}``) translate it.

:class:`LabelCodec` goes both ways and picks the smallest dtype a written label map needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import MapLabelValue

from imgx3d.config import DataConfig
from imgx3d.errors import ConfigError


def file_to_class(array: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """File label values → class values: ``data.mask_threshold``, then ``data.label_map``."""
    values = (array > cfg.mask_threshold).astype(np.int64) if cfg.mask_threshold is not None else array.astype(np.int64)
    if not cfg.label_map:
        return values
    return MapLabelValue(list(cfg.label_map), list(cfg.label_map.values()), dtype=np.int64)(values)


def class_to_file(array: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Class values → the label files' values (inverse of :func:`file_to_class`; 1 → 255 for thresholded masks)."""
    if not cfg.label_map and cfg.mask_threshold is None:
        return array  # file values are the class values: no int64 copy of the volume
    out = np.asarray(array, dtype=np.int64)
    if cfg.label_map:
        out = MapLabelValue(list(cfg.label_map.values()), list(cfg.label_map), dtype=np.int64)(out)
    return out * 255 if cfg.mask_threshold is not None else out


def label_dtype(largest: int) -> type:
    """The smallest unsigned integer type of a label file whose largest value is ``largest``."""
    return np.uint8 if largest < 256 else np.uint16


def label_storage_dtype(max_value: int) -> torch.dtype:
    """The smallest integer torch dtype holding label values up to ``max_value`` (the training cache)."""
    return torch.uint8 if max_value < 256 else torch.int16 if max_value < 2**15 else torch.int32


IGNORE_INDEX = -100  # what a training batch holds where data.ignore_label was (torch's cross-entropy default)


@dataclass(frozen=True)
class LabelCodec:
    """How a run's class indices become the values its label files hold, and back.

    Attributes:
        labels: class value → name, as the dataset declares them.
        data: the run's data config (``mask_threshold``, ``label_map``).
    """

    labels: dict[int, str]
    data: DataConfig

    def to_values(self, indices: np.ndarray, n_classes: int) -> np.ndarray:
        """Class indices (of an ``n_classes``-channel output) → class values (unchanged when they are 0 … K−1)."""
        values = np.array(sorted(self.labels), dtype=np.int64)
        if len(values) != n_classes or not np.array_equal(values, np.arange(len(values))):
            indices = values[np.clip(indices, 0, len(values) - 1)]
        return indices

    def to_file(self, values: np.ndarray) -> np.ndarray:
        """Class values → file values."""
        return class_to_file(values, self.data)

    def from_file(self, array: np.ndarray) -> np.ndarray:
        """File values → class values."""
        return file_to_class(array, self.data)

    @property
    def file_dtype(self) -> type:
        """The dtype of a written label map: the smallest that holds the largest file value."""
        return label_dtype(int(self.to_file(np.array(sorted(self.labels))).max()))


@dataclass(frozen=True)
class Regions:
    """Region-based training (nnU-Net's ``regions_class_order``; the BraTS convention), in one place.

    A region unites label values (whole tumour = edema ∪ necrosis ∪ non-enhancing ∪ enhancing);
    regions may overlap. The network has one sigmoid output per region; a prediction becomes a
    label map region by region in order, each region writing its label where its probability
    exceeds 0.5, over what earlier regions wrote (nnU-Net's conversion).

    Attributes:
        names: the regions' names, in order.
        members: per region, the label values it unites.
        writes: per region, the label value it writes into a label map.
        class_values: every class value of the dataset, ascending (index i ⇄ value ``class_values[i]``).
    """

    names: tuple[str, ...]
    members: tuple[tuple[int, ...], ...]
    writes: tuple[int, ...]
    class_values: tuple[int, ...]

    @classmethod
    def of(cls, data: DataConfig, labels: dict[int, str]) -> Regions | None:
        """The regions of ``data.regions`` over a dataset's ``labels`` (None: label-based training).

        Raises:
            ConfigError: a region names a value that is not a foreground label, or a region's label
                value cannot be derived (two regions alike): set ``data.region_labels``.
        """
        if not data.regions:
            return None
        values = tuple(sorted(labels))
        names, members = tuple(data.regions), tuple(tuple(sorted(set(v))) for v in data.regions.values())
        for name, member in zip(names, members):
            unknown = sorted(set(member) - set(values) | ({0} & set(member)))
            if unknown:
                raise ConfigError(f"data.regions: region '{name}' names label value(s) {unknown}, not among the "
                                  f"foreground labels {[v for v in values if v != 0]}; fix data.regions")
        writes = tuple(data.region_labels)
        if not writes:
            derived = []
            for r, (name, member) in enumerate(zip(names, members)):
                own = sorted(set(member) - {v for later in members[r + 1:] for v in later})
                if not own:
                    raise ConfigError(f"data.regions: every value of region '{name}' is in a later region, so "
                                      "which label it writes is not clear; set data.region_labels (one value per region)")
                derived.append(own[0])
            writes = tuple(derived)
        for name, member, value in zip(names, members, writes):
            if value not in member:
                raise ConfigError(f"data.region_labels: region '{name}' writes {value}, which it does not hold "
                                  f"({list(member)}); give each region one of its own values")
        return cls(names, members, writes, values)

    @property
    def scored(self) -> dict[int, str]:
        """The scored structures as a labels mapping: 0 background, then region ``r`` as key ``r + 1``."""
        return {0: "background", **{r + 1: name for r, name in enumerate(self.names)}}

    def targets(self, label: torch.Tensor) -> torch.Tensor:
        """Class values ``(B, 1, ...)`` → region memberships ``(B, R, ...)`` as float 0/1 (the sigmoid targets).
        Compared with Python numbers, so no tensor is copied to the device per step."""
        return torch.cat([sum((label == v).float() for v in m) for m in self.members], dim=1).clamp_(max=1.0)

    def masks(self, values: np.ndarray) -> list[np.ndarray]:
        """A label map of class values → one boolean mask per region (what region Dice compares)."""
        return [np.isin(values, m) for m in self.members]

    def decode(self, probs: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
        """Region probabilities ``(R, ...)`` → class indices (of ``class_values``), region by region in order."""
        index = {v: i for i, v in enumerate(self.class_values)}
        out = torch.zeros(probs.shape[1:], dtype=torch.uint8 if len(self.class_values) <= 256 else torch.int64,
                          device=probs.device)
        for r, value in enumerate(self.writes):  # torch.where, not a boolean index: no host sync on a GPU
            out = torch.where(probs[r] > 0.5, index[value], out)
        return out[None] if keepdim else out
