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
