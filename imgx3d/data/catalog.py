"""Find the cases of a dataset folder and split them deterministically.

Layouts:
    msd      dataset.json with a ``training`` list (Medical Segmentation Decathlon)
    nnunet   nnU-Net v2 raw: dataset.json with ``channel_names``, ``labels``, ``file_ending``;
             ``imagesTr/CASE_0000.nii.gz`` …, ``labelsTr/CASE.nii.gz``
    btcv     ``img/imgNNNN.nii.gz`` + ``label/labelNNNN.nii.gz``
    cases    one folder per case, channels and label found by glob patterns
             (``data.channels``, ``data.label_pattern``), e.g. BraTS
    pairs    ``images/`` + ``labels/`` (or ``imagesTr/`` + ``labelsTr/``, ``image/`` + ``label/``,
             ``images/`` + ``masks/`` …) with matching names; with ``data.mode: image`` the files
             are 2D images (ISBI 2012, Kvasir-SEG, DRIVE)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgx3d.config import DataConfig, SplitConfig
from imgx3d.data.io import (
    COLOR_CHANNELS,
    is_image_path,
    is_volume_path,
    read_label,
    strip_suffix,
)
from imgx3d.errors import InputError

BTCV_LABELS = {
    0: "background", 1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder",
    5: "esophagus", 6: "liver", 7: "stomach", 8: "aorta", 9: "inferior_vena_cava",
    10: "portal_and_splenic_vein", 11: "pancreas", 12: "right_adrenal_gland", 13: "left_adrenal_gland",
}
SPLIT_GROUPS = {"train": "train", "training": "train", "val": "val", "validation": "val",
                "test": "test", "testing": "test"}


@dataclass
class Case:
    """One subject: its image channel files, optional label file, optional predefined split."""

    case_id: str
    images: list[Path]
    label: Path | None = None
    group: str = ""


@dataclass
class Catalog:
    """The cases of a dataset with its label names and channel names."""

    root: Path
    layout: str
    cases: list[Case]
    labels: dict[int, str]
    channel_names: list[str] = field(default_factory=lambda: ["image"])
    four_d: bool = False  # MSD multi-modal: one 4D file holds all channels
    ignore_label: int | None = None  # the value of voxels not annotated (not among ``labels``)
    # nnU-Net v2 region labels of dataset.json (name → values; their regions_class_order): data.regions' default
    regions: dict[str, list[int]] = field(default_factory=dict)
    region_labels: list[int] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of output classes (max label value + 1, background included)."""
        return max(self.labels) + 1

    @property
    def in_channels(self) -> int:
        """Number of image channels."""
        return len(self.channel_names)

    def by_id(self) -> dict[str, Case]:
        """Cases keyed by id."""
        return {c.case_id: c for c in self.cases}


@dataclass
class Split:
    """Case ids of each part of a split."""

    train: list[str]
    val: list[str]
    test: list[str]

    def to_json(self) -> dict[str, list[str]]:
        """Plain-dict form, saved beside each run."""
        return {"train": self.train, "val": self.val, "test": self.test}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: malformed JSON ({err}); fix the file") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: must hold a JSON object")
    return data


def _region_labels(meta: dict, source: Path) -> tuple[dict[str, list[int]], list[int]]:
    """nnU-Net v2's region-based dataset.json: ``labels`` maps a region name to a list of values (a single
    value is a one-value region) and ``regions_class_order`` names what each writes. ``({}, [])`` otherwise."""
    labels = meta.get("labels", {})
    if "regions_class_order" not in meta and not any(isinstance(v, list) for v in labels.values()):
        return {}, []
    try:
        regions = {str(name): [int(x) for x in (v if isinstance(v, list) else [v])] for name, v in labels.items()
                   if (v if isinstance(v, list) else [v]) != [0]}
        order = [int(x) for x in meta.get("regions_class_order", [])]
    except (TypeError, ValueError):
        raise InputError(f"{source}: region 'labels' must map names to label values or lists of them") from None
    return regions, order


def _int_labels(labels: dict, source: Path) -> dict[int, str]:
    """MSD maps value→name ({"0": "background"}); nnU-Net v2 maps name→value, or name→[values] for a region
    (then the classes are the values the regions name: ``label_<value>``)."""
    if any(isinstance(v, list) for v in labels.values()):
        values = sorted({int(x) for v in labels.values() for x in (v if isinstance(v, list) else [v])} | {0})
        return {v: "background" if v == 0 else f"label_{v}" for v in values}
    out: dict[int, str] = {}
    try:
        for key, value in labels.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[int(value)] = str(key)
            else:
                out[int(key)] = str(value)
    except (TypeError, ValueError):
        raise InputError(f"{source}: 'labels' must map label values to names") from None
    if 0 not in out:
        out[0] = "background"
    return dict(sorted(out.items()))


def _must_exist(path: Path, listed_in: Path) -> Path:
    if not path.exists():
        raise InputError(f"{listed_in}: lists {path}, which does not exist; fix the entry or add the file")
    return path


def _msd(root: Path, meta: dict, json_path: Path) -> Catalog:
    entries = meta.get("training")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{json_path}: 'training' must be a non-empty list of {{image, label}} entries")
    cases = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry:
            raise InputError(f"{json_path}: training entry {i} has no 'image' key")
        image = _must_exist(root / entry["image"], json_path)
        label = _must_exist(root / entry["label"], json_path) if entry.get("label") else None
        cases.append(Case(strip_suffix(image.name), [image], label))
    modality = meta.get("modality") or {"0": "image"}
    channels = [str(v) for _, v in sorted(modality.items(), key=lambda kv: int(kv[0]))]
    if "labels" not in meta:
        raise InputError(f"{json_path}: missing 'labels' (e.g. {{\"0\": \"background\", \"1\": \"organ\"}})")
    return Catalog(root, "msd", cases, _int_labels(meta["labels"], json_path), channels, four_d=len(channels) > 1)


def _nnunet(root: Path, meta: dict, json_path: Path) -> Catalog:
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise InputError(f"{json_path}: missing '{key}' required by the nnU-Net v2 layout")
    ending = meta["file_ending"]
    channels = [str(v) for _, v in sorted(meta["channel_names"].items(), key=lambda kv: int(kv[0]))]
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise InputError(f"{root}: nnU-Net layout needs an imagesTr/ folder")
    ids = sorted({p.name[: -len(ending)][:-5] for p in images_dir.glob(f"*_0000{ending}")})
    cases = []
    for case_id in ids:
        images = [_must_exist(images_dir / f"{case_id}_{c:04d}{ending}", json_path) for c in range(len(channels))]
        label = root / "labelsTr" / f"{case_id}{ending}"
        cases.append(Case(case_id, images, label if label.exists() else None))
    regions, order = _region_labels(meta, json_path)
    return Catalog(root, "nnunet", cases, _int_labels(meta["labels"], json_path), channels, regions=regions,
                   region_labels=order)


def _btcv(root: Path) -> Catalog:
    base = root if (root / "img").is_dir() else root / "Training"
    cases = []
    for image in sorted((base / "img").glob("img*.nii*")):
        number = strip_suffix(image.name)[3:]
        labels = list((base / "label").glob(f"label{number}.nii*"))
        cases.append(Case(f"btcv_{number}", [image], labels[0] if labels else None))
    return Catalog(root, "btcv", cases, dict(BTCV_LABELS))


def _match_one(folder: Path, pattern: str) -> Path | None:
    hits = sorted(p for p in folder.glob(pattern) if p.is_file())
    if len(hits) > 1:
        raise InputError(f"{folder}: pattern '{pattern}' matches {len(hits)} files; make data.channels/label_pattern specific")
    return hits[0] if hits else None


def _cases(root: Path, cfg: DataConfig) -> Catalog:
    if not cfg.channels:
        raise InputError(f"{root}: layout 'cases' needs data.channels (glob patterns of the channel files)")
    cases = []
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()) + [root]:
        first = _match_one(folder, cfg.channels[0])
        if first is None:
            continue
        images = [first] + [_match_one(folder, pattern) for pattern in cfg.channels[1:]]
        if any(image is None for image in images):
            missing = cfg.channels[images.index(None)]
            raise InputError(f"{folder}: no file matches channel pattern '{missing}'; add it or fix data.channels")
        label = _match_one(folder, cfg.label_pattern) if cfg.label_pattern else None
        group = SPLIT_GROUPS.get(folder.parent.name.lower(), "") if folder != root else ""
        cases.append(Case(folder.name, images, label, group))
    channels = [p.split("*")[0].strip("_.") or f"channel{i}" for i, p in enumerate(cfg.channels)]
    return Catalog(root, "cases", cases, {}, channels)


IMAGE_DIRS = ("images", "imagesTr", "image", "imgs", "test_images")
LABEL_DIRS = ("labels", "labelsTr", "label", "masks", "1st_manual", "mask", "gt", "test_masks")


def _pair_folders(root: Path, cfg: DataConfig) -> tuple[Path, Path]:
    images = [cfg.image_dir] if cfg.image_dir else [n for n in IMAGE_DIRS if (root / n).is_dir()]
    labels = [cfg.label_dir] if cfg.label_dir else [n for n in LABEL_DIRS if (root / n).is_dir()]
    if not images or not (root / images[0]).is_dir():
        raise InputError(
            f"{root}: dataset layout not recognised; expected dataset.json (MSD / nnU-Net v2), img/ + label/ (BTCV), "
            "images/ + labels/ (pairs; or set data.image_dir and data.label_dir), or data.layout=cases with data.channels"
        )
    return root / images[0], root / (labels[0] if labels else "labels")


def _pairs(root: Path, cfg: DataConfig) -> Catalog:
    """Image and label folders with matching names; DRIVE-style names match by their leading id
    (``21_training.tif`` ↔ ``21_manual1.gif``) when no full name matches."""
    wanted = is_image_path if cfg.mode == "image" else is_volume_path
    images_dir, labels_dir = _pair_folders(root, cfg)
    images = sorted(p for p in images_dir.iterdir() if wanted(p) and not p.name.startswith("."))
    if not images and cfg.mode == "volume" and any(is_image_path(p) for p in images_dir.iterdir()):
        raise InputError(f"{images_dir}: holds 2D images, not volumes; train a 2D method on them with --image")
    label_files = sorted(p for p in labels_dir.iterdir() if wanted(p)) if labels_dir.is_dir() else []
    by_name = {strip_suffix(p.name): p for p in label_files}
    by_id: dict[str, list[Path]] = {}
    for p in label_files:
        by_id.setdefault(strip_suffix(p.name).split("_")[0], []).append(p)
    cases = []
    for image in images:
        name = strip_suffix(image.name)
        same_id = by_id.get(name.split("_")[0], [])
        label = by_name.get(name) or (same_id[0] if len(same_id) == 1 else None)
        cases.append(Case(name, [image], label))
    channels = COLOR_CHANNELS[cfg.color] if cfg.mode == "image" else ["image"]
    return Catalog(root, "pairs", cases, {}, channels)


def _labels_from_files(catalog: Catalog, cfg: DataConfig) -> dict[int, str]:
    values: set[int] = {0}
    for case in catalog.cases:
        if case.label is not None:
            values |= {int(v) for v in np.unique(read_label(case.label, cfg).array)}
    if max(values) == 255 and cfg.mask_threshold is None and not cfg.label_map:
        raise InputError(f"{catalog.root}: label files hold values {sorted(values)[:4]}..., like 8-bit masks; set "
                         "data.mask_threshold=127 for binary 0/255 masks, or data.labels / data.label_map")
    return {v: ("background" if v == 0 else f"label_{v}") for v in sorted(values)}


def find_cases(root: str | Path, cfg: DataConfig | None = None) -> Catalog:
    """Find the cases of the dataset at ``root``.

    Raises:
        InputError: missing folder, unrecognised layout, malformed dataset.json, listed files
            missing, duplicate case ids, or no cases.
    """
    cfg = cfg or DataConfig()
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: dataset folder not found; check --data")
    if not root.is_dir():
        raise InputError(f"{root}: is a file; --data expects a dataset folder")
    layout = cfg.layout
    json_path = root / "dataset.json"
    meta = _read_json(json_path) if json_path.is_file() and layout in ("auto", "msd", "nnunet") else None
    if layout == "auto":
        if meta is not None:
            layout = "nnunet" if "file_ending" in meta and "channel_names" in meta else "msd"
        elif cfg.mode == "volume" and ((root / "img").is_dir() or (root / "Training" / "img").is_dir()):
            layout = "btcv"
        elif cfg.channels:
            layout = "cases"
        else:
            layout = "pairs"
    if layout in ("msd", "nnunet") and meta is None:
        raise InputError(f"{root}: layout '{layout}' needs a dataset.json in the folder")
    builders = {"msd": lambda: _msd(root, meta, json_path), "nnunet": lambda: _nnunet(root, meta, json_path),
                "btcv": lambda: _btcv(root), "cases": lambda: _cases(root, cfg), "pairs": lambda: _pairs(root, cfg)}
    catalog = builders[layout]()
    if not catalog.cases:
        raise InputError(f"{root}: no cases found for layout '{layout}'; check the folder and data.layout")
    ids = [c.case_id for c in catalog.cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InputError(f"{root}: duplicate case id '{duplicates[0]}'; give every case a unique file or folder name")
    if cfg.labels:
        catalog.labels = {0: "background", **dict(sorted(cfg.labels.items()))}
    elif not catalog.labels:
        catalog.labels = _labels_from_files(catalog, cfg)
    _take_ignore_label(catalog, cfg.ignore_label, json_path if meta is not None else root)
    return catalog


def _take_ignore_label(catalog: Catalog, configured: int | None, source: Path) -> None:
    """Move the ignore label (``data.ignore_label``, else a label named ``ignore``) out of the classes.

    Raises:
        InputError: it is not above every class value (nnU-Net v2's rule: the classes stay 0 … K−1).
    """
    named = [v for v, name in catalog.labels.items() if name.strip().lower() == "ignore"]
    value = configured if configured is not None else (named[0] if named else None)
    if value is None:
        return
    catalog.labels.pop(value, None)
    if value <= max(catalog.labels):
        raise InputError(f"{source}: the ignore label {value} must be above every class value "
                         f"({sorted(catalog.labels)}); give the not-annotated voxels the highest value")
    catalog.ignore_label = value


def make_split(catalog: Catalog, cfg: SplitConfig) -> Split:
    """Deterministic train / val / test split of the labelled cases.

    Predefined groups (case folders under ``train/``, ``validation/``, ``test/``) are used
    when every case has one; otherwise a seeded shuffle of the sorted ids is cut: the test share
    first, then the rest into validation and training (holdout), or into ``folds`` parts of which
    ``fold`` validates (cross-validation, nnU-Net's meaning).
    """
    labelled = [c for c in catalog.cases if c.label is not None]
    if not labelled:
        raise InputError(f"{catalog.root}: no case has a label file; training needs labelled cases")
    if all(c.group for c in labelled):
        groups = {g: sorted(c.case_id for c in labelled if c.group == g) for g in ("train", "val", "test")}
        if groups["train"]:
            return Split(groups["train"], groups["val"], groups["test"])
    ids = np.array(sorted(c.case_id for c in labelled))
    perm = list(ids[np.random.default_rng(cfg.seed).permutation(len(ids))])
    n_test = int(round(cfg.test_fraction * len(perm)))
    test, rest = perm[:n_test], perm[n_test:]
    if cfg.folds:  # nnU-Net's cross-validation: fold k is the validation part of the non-test cases
        if cfg.folds > len(rest):
            raise InputError(f"{catalog.root}: {len(rest)} labelled cases outside the test set cannot make "
                             f"{cfg.folds} folds; use fewer folds or a smaller data.split.test_fraction")
        folds = [list(f) for f in np.array_split(np.array(rest, dtype=object), cfg.folds)]
        val = folds[cfg.fold]
        train = [i for k, f in enumerate(folds) if k != cfg.fold for i in f]
    else:
        n_val = int(round(cfg.val_fraction * len(rest)))
        if cfg.val_fraction > 0 and n_val == 0 and len(rest) > 1:
            n_val = 1
        val, train = rest[:n_val], rest[n_val:]
    if cfg.max_train > 0:
        train = train[:cfg.max_train]  # a seeded subset: the shuffle already randomised the order
    if not train:
        raise InputError(f"{catalog.root}: only {len(perm)} labelled cases; too few for the configured split")
    return Split(sorted(map(str, train)), sorted(map(str, val)), sorted(map(str, test)))
