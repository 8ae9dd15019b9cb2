"""Reading cases into model space for training, augmentation, and the training patch sampler.

The native ⇄ model-space map itself lives in :mod:`imgx3d.data.geometry`; this module reads a
case's files, checks them, and applies it (:class:`Preprocessor`), then draws augmented patches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np
from scipy import ndimage
import torch
from monai.transforms import (
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    EnsureTyped,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    RandomizableTransform,
    RandSpatialCropd,
    SpatialPad,
    SpatialPadd,
)
from monai.transforms.utils import map_binary_to_indices
from monai.transforms.utils_morphological_ops import dilate, erode
from torch.utils.data import IterableDataset, get_worker_info

from imgx3d.config import DataConfig
from imgx3d.data.catalog import Case
from imgx3d.data.geometry import GridMap, grid_map, image_to_model, label_to_model
from imgx3d.data.io import Volume, read_grid, read_label, read_volume
from imgx3d.data.labels import IGNORE_INDEX
from imgx3d.errors import InputError

AFFINE_TOLERANCE = 1e-3  # mm / direction-cosine tolerance for image-label agreement


class Preprocessor:
    """Reads cases and maps them between the native grid and model space.

    Args:
        cfg: the run's data settings.
        previous_stage: a cascade's low-resolution stage (``data.cascade``;
            :class:`~imgx3d.inference.cascade.PreviousStage`): called with the image volume and its
            model grid, it returns the channels appended to the normalised image.
    """

    def __init__(self, cfg: DataConfig, previous_stage: Callable[[Volume, GridMap], torch.Tensor] | None = None):
        self.cfg, self.previous_stage = cfg, previous_stage

    def model_image(self, volume: Volume, grid: GridMap) -> torch.Tensor:
        """An image volume (``array`` ``(C, X, Y, Z)``) normalised on its model grid, with a cascade's channels."""
        image = image_to_model(volume.array, grid, self.cfg)
        if self.previous_stage is None:
            return image
        return torch.cat([image, self.previous_stage(volume, grid)])

    def read_image(self, paths: list, expected_channels: int | None = None) -> tuple[np.ndarray, Volume]:
        """Read channel files into a (C, X, Y, Z) array; returns it and the first channel's volume."""
        volumes = [read_volume(p, allow_channels=len(paths) == 1, color=self.cfg.color) for p in paths]
        ref = volumes[0]
        for vol in volumes[1:]:
            _check_same_grid(ref, vol, "channel")
        arrays = [v.array if v.array.ndim == 4 else v.array[None] for v in volumes]
        return self.checked_image(replace(ref, array=np.concatenate(arrays, axis=0)), expected_channels,
                                  "pass all channel files of the case")

    @staticmethod
    def checked_image(volume: Volume, expected_channels: int | None = None,
                      fix: str = "pass an image with every channel the model was trained on"
                      ) -> tuple[np.ndarray, Volume]:
        """An image volume as channel-first ``(C, X, Y, Z)``, refusing a wrong channel count (with
        ``fix`` as the advice) or a constant image; returns the array and the volume holding it."""
        array = volume.array if volume.array.ndim == 4 else volume.array[None]
        if expected_channels is not None and array.shape[0] != expected_channels:
            raise InputError(f"{volume.path}: has {array.shape[0]} channel(s) but the model expects "
                             f"{expected_channels}; {fix}")
        if np.all(array == array.reshape(array.shape[0], -1)[:, :1, None, None]):
            raise InputError(f"{volume.path}: image is constant (every voxel {float(array.flat[0]):g}); "
                             "it holds no image")
        return array, replace(volume, array=array)

    def load_case(self, case: Case, labels: dict[int, str], in_channels: int | None = None) -> dict[str, Any]:
        """Read and preprocess a labelled case into model space, validating the label."""
        _, volume = self.read_image(case.images, in_channels)
        grid = grid_map(volume, self.cfg)
        item: dict[str, Any] = {"case_id": case.case_id}
        if case.label is not None:
            label = read_label(case.label, self.cfg)
            _check_same_grid(volume, label, "label")
            unknown = sorted(set(np.unique(label.array).tolist()) - set(labels) - {self.cfg.ignore_label})
            if unknown:
                raise InputError(
                    f"{case.label}: label values {unknown} are not among the dataset's labels {sorted(labels)}; "
                    "fix the label map or the 'labels' of dataset.json / data.labels"
                )
            item["label"] = label_to_model(label.array, grid)
        # after the label's checks: a cascade's previous stage predicts the case here
        return {**item, "image": self.model_image(volume, grid)}


def _check_same_grid(ref: Volume, other: Volume, what: str) -> None:
    check_grids(ref.path, ref.spatial_shape, ref.affine, other.path, other.spatial_shape, other.affine, what)


def check_grids(ref_path, ref_shape, ref_affine, path, shape, affine, what: str) -> None:
    """Refuse a channel or label that is not on its image's grid (shape, affine within tolerance)."""
    if tuple(shape) != tuple(ref_shape):
        raise InputError(
            f"{path}: {what} shape {tuple(shape)} differs from image {ref_path} shape {tuple(ref_shape)}; "
            f"resample the {what} onto the image grid"
        )
    if not np.allclose(affine, ref_affine, atol=AFFINE_TOLERANCE):
        raise InputError(
            f"{path}: {what} affine differs from image {ref_path} beyond {AFFINE_TOLERANCE}; "
            f"the {what} is not on the image grid (fix its header or resample it)"
        )


def check_case_grids(cases: list[Case]) -> None:
    """Header-only check that every case's channels and label share one grid (fails fast, before training)."""
    for case in cases:
        shape, affine = read_grid(case.images[0])
        for other, what in [(p, "channel") for p in case.images[1:]] + ([(case.label, "label")] if case.label else []):
            check_grids(case.images[0], shape, affine, other, *read_grid(other), what)


def crop_indices(label: torch.Tensor, patch_size: list[int],
                 ignore_label: int | None = None) -> dict[str, torch.Tensor]:
    """Foreground / background voxel indices of a case's label as the patch sampler sees it (padded
    to ``patch_size``), computed once per case: MONAI's ``RandCropByPosNegLabeld`` would otherwise
    rescan the whole label for every patch. int32 where the volume allows: together they take
    4 bytes per voxel, less than the int64 label map they replace. Voxels of ``ignore_label`` are
    neither: patches are centred on annotated voxels."""
    padded = SpatialPad(patch_size, mode="constant")(label)
    padded = padded.as_tensor() if hasattr(padded, "as_tensor") else padded
    # bool maps: MONAI negates the label, and ~ of a uint8 map is never 0 (every voxel, the foreground
    # included, was a background centre); its image argument limits the background to annotated voxels
    foreground = padded > 0
    if ignore_label is None:
        fg, bg = map_binary_to_indices(foreground)
    else:
        annotated = padded != ignore_label
        fg, bg = map_binary_to_indices(foreground & annotated, annotated, 0)
    dtype = torch.int32 if padded.numel() < 2**31 else torch.int64
    return {"fg_indices": torch.as_tensor(fg).to(dtype), "bg_indices": torch.as_tensor(bg).to(dtype)}


def item_bytes(item: dict[str, Any]) -> int:
    """Host memory a cached training case takes, its crop indices included."""
    image, label = item["image"], item["label"]
    return image.numel() * image.element_size() + label.numel() * (label.element_size() + 4)


@dataclass
class DeferredCase:
    """A training case left on disk (over ``data.cache_gib``): read and preprocessed each time it is drawn."""

    case: Case
    preprocessor: "Preprocessor"
    labels: dict[int, str]
    in_channels: int
    extra: bool = False

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-like access to the flags a sampler reads before loading (``extra``)."""
        return self.extra if key == "extra" else default

    def load(self, patch_size: list[int]) -> dict[str, Any]:
        """The case as a cached item would hold it, crop indices included."""
        item = self.preprocessor.load_case(self.case, self.labels, self.in_channels)
        return {**item, **crop_indices(item["label"], patch_size, self.preprocessor.cfg.ignore_label)}


def train_transforms(cfg: DataConfig, previous_channels: int = 0) -> Compose:
    """Random patch sampling and augmentation (MONAI) on model-space {image, label} dicts; the
    precomputed ``fg_indices`` / ``bg_indices`` of :func:`crop_indices` are used when present.

    Args:
        previous_channels: a cascade's (``data.cascade``): the image's last channels are the previous
            stage's prediction. They move with the patch as a label does (nearest neighbour), are
            degraded as nnU-Net does (:class:`DegradePreviousStage`) and never see the intensity
            augmentation.
    """
    keys = ["image", "label"] + (["previous"] if previous_channels else [])
    transforms: list = [SplitPreviousStage(previous_channels)] if previous_channels else []
    transforms += [
        SpatialPadd(keys, spatial_size=cfg.patch_size, mode="constant"),
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=cfg.patch_size,
                               pos=cfg.pos_fraction, neg=1.0 - cfg.pos_fraction, num_samples=1,
                               fg_indices_key="fg_indices", bg_indices_key="bg_indices"),
    ]
    if cfg.translate:  # a zero border of `translate` voxels (not along a one-voxel axis), the patch cut at random
        border = [p + 2 * cfg.translate if p > 1 else p for p in cfg.patch_size]
        transforms += [SpatialPadd(keys, spatial_size=border, mode="constant"),
                       RandSpatialCropd(keys, roi_size=cfg.patch_size, random_size=False)]
    if cfg.affine_prob > 0:
        angle = float(np.deg2rad(cfg.rotate_deg))
        transforms.append(RandAffined(keys, prob=cfg.affine_prob, rotate_range=[angle] * 3,
                                      scale_range=[cfg.scale_range] * 3,
                                      mode=("bilinear", *["nearest"] * (len(keys) - 1)), padding_mode="zeros"))
    transforms += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in cfg.flip_axes]
    if cfg.intensity_aug:
        transforms += intensity_transforms(cfg.intensity_scheme)
    if previous_channels:
        transforms += [DegradePreviousStage(), EnsureTyped(["image", "previous"], track_meta=False),
                       ConcatItemsd(["image", "previous"], "image"), DeleteItemsd("previous")]
    return Compose(transforms)


class SplitPreviousStage:
    """Moves a cascade's last ``channels`` image channels (the previous stage's) to the key ``previous`` (MONAI's
    ``SplitDimd`` makes one key per channel; ``ConcatItemsd`` joins them back at the end)."""

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        image = data["image"]
        return {**data, "image": image[:-self.channels], "previous": image[-self.channels:]}


class DegradePreviousStage(RandomizableTransform):
    """nnU-Net's augmentation of a cascade's previous-stage channels: the stage predicted its own
    training cases better than it will predict new ones, so the next stage must not learn to copy it.

    Per patch, with probability ``morphology_prob``, each channel is dilated, eroded, opened or closed
    (one at random) by a cube of half-width 1 to ``max_radius`` voxels (nnU-Net: a ball; MONAI's morphology
    takes cubes); then with probability ``remove_prob`` one connected component of a channel, smaller
    than ``max_removed`` of the patch, is removed. (No MONAI transform draws these at random: hand-written
    around MONAI's ``dilate`` / ``erode`` and SciPy's component labelling.)
    """

    def __init__(self, morphology_prob: float = 0.4, remove_prob: float = 0.2, max_radius: int = 8,
                 max_removed: float = 0.15):
        RandomizableTransform.__init__(self, prob=1.0)
        self.morphology_prob, self.remove_prob = morphology_prob, remove_prob
        self.max_radius, self.max_removed = max_radius, max_removed

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        previous = _plain(data["previous"]).clone()
        if self.R.random() < self.morphology_prob:
            for c in range(previous.shape[0]):
                operator = self.R.choice(["dilate", "erode", "open", "close"])
                previous[c] = binary_morphology(previous[c], operator, int(self.R.randint(1, self.max_radius + 1)))
        if self.R.random() < self.remove_prob:
            for c in range(previous.shape[0]):
                previous[c] = self._remove_a_component(previous[c])
        return {**data, "previous": previous}

    def _remove_a_component(self, channel: torch.Tensor) -> torch.Tensor:
        components, count = ndimage.label(channel.numpy() > 0.5)
        if count == 0:
            return channel
        sizes = np.bincount(components.ravel())[1:]
        small = np.flatnonzero(sizes < self.max_removed * channel.numel()) + 1
        if len(small) == 0:
            return channel
        return channel * torch.from_numpy(components != small[self.R.randint(len(small))]).to(channel.dtype)


def binary_morphology(mask: torch.Tensor, operator: str, radius: int) -> torch.Tensor:
    """A 0/1 map (X, Y, Z) dilated, eroded, opened or closed by a cube of half-width ``radius`` (MONAI's
    ``dilate`` / ``erode``: what lies outside the patch is unknown, so it neither grows nor erodes the map)."""
    size = 2 * radius + 1
    steps = {"dilate": (dilate,), "erode": (erode,), "open": (erode, dilate), "close": (dilate, erode)}[operator]
    x = mask.float()[None, None]
    for step in steps:
        x = step(x, size)
    return x[0, 0].to(mask.dtype)


def intensity_transforms(scheme: str) -> list:
    """The image-only augmentations of ``data.intensity_scheme`` (MONAI transforms on key ``image``).

    Args:
        scheme: ``light`` (mild scale, shift, noise and gamma) or ``nnunet`` (nnU-Net v2's default
            set and probabilities; two approximations: MONAI draws the noise's standard deviation,
            not its variance, uniformly, and upsamples the simulated low resolution trilinearly,
            not cubically).
    """
    if scheme == "light":
        return [
            RandScaleIntensityd("image", factors=0.1, prob=0.2),
            RandShiftIntensityd("image", offsets=0.1, prob=0.2),
            RandGaussianNoised("image", prob=0.1, std=0.05),
            RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.15),
        ]
    sigma = (0.5, 1.0)
    return [
        RandGaussianNoised("image", prob=0.1, std=0.1 ** 0.5),
        RandGaussianSmoothd("image", sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=0.2),
        RandScaleIntensityd("image", factors=0.25, prob=0.15),  # brightness: × 0.75-1.25
        RandScaleIntensityFixedMeand("image", factors=0.25, preserve_range=True, prob=0.15),  # contrast
        RandSimulateLowResolutiond("image", prob=0.25, zoom_range=(0.5, 1.0), downsample_mode="nearest",
                                   upsample_mode="trilinear"),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), invert_image=True, retain_stats=True, prob=0.1),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), retain_stats=True, prob=0.3),
    ]


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def draw_indices(rng: np.random.Generator, n: int, is_extra: np.ndarray, extra_fraction: float | None) -> np.ndarray:
    """``n`` indices into a pool: uniform, or with ``extra_fraction`` of them drawn from its extra
    (generated) entries and the rest from its real ones."""
    if extra_fraction is None or is_extra.all() or not is_extra.any():
        return rng.integers(len(is_extra), size=n)
    real, extra = np.flatnonzero(~is_extra), np.flatnonzero(is_extra)
    from_extra = rng.random(n) < extra_fraction
    return np.where(from_extra, extra[rng.integers(len(extra), size=n)], real[rng.integers(len(real), size=n)])


class PatchBatches(IterableDataset):
    """Training batches as a pure function of (seed, step).

    Batch ``s`` is drawn with randomness seeded by ``(seed, s)``, so a resumed run sees
    exactly the batches the uninterrupted run would have seen, with any number of loader
    workers (worker ``w`` of ``n`` makes the batches ``s ≡ w (mod n)``, which the DataLoader
    returns in step order).
    """

    def __init__(self, items: list[dict[str, Any]], transform: Compose | None, batch_size: int, seed: int,
                 start_step: int, stop_step: int, extra_fraction: float | None = None,
                 patch_size: list[int] | None = None, ignore_label: int | None = None):
        if patch_size is not None:  # the sampler's indices, once per case (see crop_indices)
            items = [item if isinstance(item, DeferredCase) else
                     {**item, **crop_indices(item["label"], patch_size, ignore_label)} for item in items]
        self.ignore_label = ignore_label  # its voxels become IGNORE_INDEX in the batches
        self.items, self.transform, self.batch_size, self.patch_size = items, transform, batch_size, patch_size
        self.seed, self.start_step, self.stop_step = seed, start_step, stop_step
        self.extra_fraction = extra_fraction  # items with "extra": True are generated data (data.extra)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of training step ``step``."""
        rng = np.random.default_rng([self.seed, step])
        samples = []
        is_extra = np.array([bool(item.get("extra")) for item in self.items])
        for index in draw_indices(rng, self.batch_size, is_extra, self.extra_fraction):
            item = self.items[int(index)]
            if isinstance(item, DeferredCase):
                item = item.load(self.patch_size)
            self.transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
            out = self.transform({k: item[k] for k in ("image", "label", "fg_indices", "bg_indices") if k in item})
            out = out[0] if isinstance(out, list) else out
            samples.append(out)
        label = torch.stack([_plain(s["label"]) for s in samples]).long()
        if self.ignore_label is not None:
            label[label == self.ignore_label] = IGNORE_INDEX
        return {"image": torch.stack([_plain(s["image"]) for s in samples]), "label": label}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start_step + worker, self.stop_step, workers):
            yield self.batch(step)
