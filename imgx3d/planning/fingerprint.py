"""Dataset fingerprint: what the planner needs to know about a dataset, measured once.

As nnU-Net's fingerprint extractor (``nnunetv2/experiment_planning/dataset_fingerprint``):
per case the shape, spacing and orientation (in model space: RAS axis order) and channels; per
channel the distribution of foreground intensities (a fixed-size sample of labelled voxels per
case: percentiles 0.5 / 99.5, mean, std); per class the voxel count and bounding box; and one
thing nnU-Net takes from ``dataset.json`` alone, the modality, here confirmed by the intensities
(Hounsfield units are negative in air and fat: a channel whose foreground spans below −500 and
above +100 is CT whatever its name).

Reading is the expensive part, so a fingerprint is cached as JSON in the folder the caller names
(a run or plan folder — never the dataset folder), keyed by every file's size and mtime.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from imgx3d.config import READING_KEYS, DataConfig
from imgx3d.data.catalog import Catalog, find_cases
from imgx3d.data.geometry import grid_map, reorient
from imgx3d.data.io import read_label
from imgx3d.data.transforms import Preprocessor, check_grids
from imgx3d.files import atomic_write_text

FINGERPRINT_VERSION = 3
SAMPLES_PER_CASE = 10_000  # foreground voxels sampled per case and channel (nnU-Net: 10 000)
CT_NAMES = ("ct", "computed tomography")
HU_AIR, HU_TISSUE = -500.0, 100.0  # a CT channel's foreground spans below the first and above the second
# The data keys that say how to read a dataset (its layout, channel files, labels): the user's to set, never
# planned; the fingerprint is measured with them and a plan carries them.
@dataclass
class CaseStats:
    """One case in model space (RAS axis order)."""

    case_id: str
    shape: list[int]
    spacing: list[float]
    axcodes: str  # the file's own orientation, e.g. "LPS"
    nonzero_fraction: float  # share of voxels that are not 0 in the first channel (zero background?)
    centroids: dict[str, list[float]] = field(default_factory=dict)  # class value → RAS centroid in voxels


@dataclass
class ChannelStats:
    """Foreground intensities of one channel over every case."""

    name: str
    mean: float
    std: float
    p00_5: float
    p99_5: float
    minimum: float
    maximum: float


@dataclass
class ClassStats:
    """One foreground class: how large it is and in how many cases it appears."""

    value: int
    name: str
    cases: int
    voxels_median: float
    bbox_median: list[float]  # RAS extent in voxels, median over the cases that have it


@dataclass
class Fingerprint:
    """A dataset's fingerprint (see the module docstring)."""

    dataset: str
    modality: str  # "CT", "MRI" or "other"
    cases: list[CaseStats]
    channels: list[ChannelStats]
    classes: list[ClassStats]
    version: int = FINGERPRINT_VERSION
    files: dict[str, list[float]] = field(default_factory=dict)  # path → [size, mtime]: the cache key
    reading: dict[str, Any] = field(default_factory=dict)  # how the dataset was read (config.READING_KEYS): in the key too

    @property
    def spacings(self) -> np.ndarray:
        """``(N, 3)`` RAS spacings in mm."""
        return np.array([c.spacing for c in self.cases], dtype=float)

    @property
    def shapes(self) -> np.ndarray:
        """``(N, 3)`` RAS shapes in voxels."""
        return np.array([c.shape for c in self.cases], dtype=float)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Fingerprint":
        return cls(**{**data, "cases": [CaseStats(**c) for c in data["cases"]],
                      "channels": [ChannelStats(**c) for c in data["channels"]],
                      "classes": [ClassStats(**c) for c in data["classes"]]})

    def summary(self) -> list[str]:
        """A few lines a person reads before the plan."""
        median_spacing = np.median(self.spacings, axis=0)
        median_shape = np.median(self.shapes, axis=0)
        lines = [f"{self.dataset}: {len(self.cases)} labelled cases, {len(self.channels)} channel(s) "
                 f"({', '.join(c.name for c in self.channels)}), modality {self.modality}",
                 f"median spacing (RAS) {_fmt(median_spacing)} mm, median shape {_fmt(median_shape, 0)} voxels",
                 f"spacing range {_fmt(self.spacings.min(0))} … {_fmt(self.spacings.max(0))} mm"]
        for ch in self.channels:
            lines.append(f"channel {ch.name}: foreground mean {ch.mean:.4g} ± {ch.std:.4g}, "
                         f"[0.5, 99.5] percentiles [{ch.p00_5:.4g}, {ch.p99_5:.4g}]")
        for cl in self.classes:
            lines.append(f"class {cl.value} {cl.name}: in {cl.cases} case(s), median {cl.voxels_median:.0f} voxels, "
                         f"box {_fmt(cl.bbox_median, 0)}")
        if self.reading.get("regions"):
            lines.append("regions (region-based training, nnU-Net's convention): " + "; ".join(
                f"{name} = {values}" for name, values in self.reading["regions"].items()))
        return lines


def _fmt(values: Any, digits: int = 2) -> str:
    return " x ".join(f"{v:.{digits}f}" for v in values)


def reading_of(data_cfg: DataConfig) -> dict[str, Any]:
    """The keys of ``data_cfg`` that say how a dataset is read (:data:`READING_KEYS`) where they differ
    from the defaults, as JSON has them (label values as strings)."""
    default = DataConfig()
    return json.loads(json.dumps({k: getattr(data_cfg, k) for k in READING_KEYS
                                  if getattr(data_cfg, k) != getattr(default, k)}))


def _file_keys(catalog: Catalog) -> dict[str, list[float]]:
    keys = {}
    for case in catalog.cases:
        for path in [*case.images, *([case.label] if case.label else [])]:
            stat = os.stat(path)
            keys[str(Path(path).resolve())] = [float(stat.st_size), float(stat.st_mtime)]
    return keys


def _modality(names: list[str], channels: list[ChannelStats]) -> str:
    """CT when the names say so or the first channel's foreground spans Hounsfield units; MRI when
    the names say so; else other."""
    lowered = [n.lower() for n in names]
    hu = bool(channels) and channels[0].p00_5 < HU_AIR and channels[0].p99_5 > HU_TISSUE
    if any(n in CT_NAMES for n in lowered) or hu:
        return "CT"
    if any(("mr" in n or n in ("t1", "t2", "flair", "t1c", "t1ce", "adc", "dwi")) for n in lowered):
        return "MRI"
    return "other"


def _bbox(mask: np.ndarray) -> list[int]:
    extent = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        extent.append(int(hit[-1] - hit[0] + 1) if hit.size else 0)
    return extent


def fingerprint(root: str | Path, data_cfg: DataConfig | None = None, cache_dir: str | Path | None = None,
                seed: int = 0) -> Fingerprint:
    """The fingerprint of the labelled cases of the dataset at ``root`` (cached in ``cache_dir``)."""
    data_cfg = data_cfg or DataConfig()
    catalog = find_cases(root, data_cfg)
    keys, reading = _file_keys(catalog), reading_of(data_cfg)
    if catalog.regions and "regions" not in reading:  # nnU-Net v2 region labels: the plan trains on them
        reading.update(regions=catalog.regions, **({"region_labels": catalog.region_labels}
                                                   if catalog.region_labels else {}))
    cache = Path(cache_dir) / "fingerprint.json" if cache_dir else None
    if cache is not None and cache.is_file():
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if (cached.get("version"), cached.get("files"), cached.get("reading")) == (FINGERPRINT_VERSION, keys, reading):
            return Fingerprint.from_json(cached)
    rng = np.random.default_rng(seed)
    raw = replace(data_cfg, preset="none", spacing=None, crop_air=None)  # the files as they are
    pre = Preprocessor(raw)
    cases, samples, per_class = [], [[] for _ in range(catalog.in_channels)], {c: [] for c in catalog.labels if c}
    for case in (c for c in catalog.cases if c.label is not None):
        array, volume = pre.read_image(case.images, catalog.in_channels)
        grid = grid_map(volume, raw)
        to_ras = grid.to_ras
        spacing = np.asarray(volume.spacing)[[int(np.flatnonzero(to_ras[:, 0] == a)[0]) for a in range(3)]]
        axcodes = "".join(nib.orientations.aff2axcodes(volume.affine))
        label_volume = read_label(case.label, data_cfg)
        check_grids(volume.path, volume.spatial_shape, volume.affine, label_volume.path, label_volume.spatial_shape,
                    label_volume.affine, "label")  # sampled intensities must sit under their labels
        label = label_volume.array
        ras_label = reorient(torch.from_numpy(label)[None], to_ras)[0].numpy()
        stats = CaseStats(case.case_id, list(grid.ras_shape), [float(s) for s in spacing], axcodes,
                          float(np.count_nonzero(array[0]) / array[0].size))
        cases.append(stats)
        foreground = np.flatnonzero((label.reshape(-1) > 0) & (label.reshape(-1) != catalog.ignore_label))
        if foreground.size:
            picked = rng.choice(foreground, size=min(SAMPLES_PER_CASE, foreground.size), replace=False)
            for c in range(array.shape[0]):
                samples[c].append(array[c].reshape(-1)[picked].astype(np.float64))
        for value in per_class:
            mask = ras_label == value
            count = int(mask.sum())
            if count:
                per_class[value].append((count, _bbox(mask)))
                stats.centroids[str(value)] = [float(c.mean()) for c in np.nonzero(mask)]
    channels = []
    for name, parts in zip(catalog.channel_names, samples):
        values = np.concatenate(parts) if parts else np.zeros(1)
        channels.append(ChannelStats(name, float(values.mean()), float(values.std()),
                                     float(np.percentile(values, 0.5)), float(np.percentile(values, 99.5)),
                                     float(values.min()), float(values.max())))
    classes = [ClassStats(value, catalog.labels[value], len(found),
                          float(np.median([n for n, _ in found])) if found else 0.0,
                          [float(v) for v in np.median([b for _, b in found], axis=0)] if found else [0.0, 0.0, 0.0])
               for value, found in per_class.items()]
    result = Fingerprint(Path(root).resolve().name, _modality(catalog.channel_names, channels), cases, channels,
                         classes, files=keys, reading=reading)
    if cache is not None:
        atomic_write_text(cache, json.dumps(result.to_json(), indent=1))
    return result
