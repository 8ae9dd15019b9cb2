"""``imgx3d synth``: generated image/mask pairs written as a dataset the catalog reads.

Each pair is a one-slice NIfTI volume ``(H, W, 1)`` on the source data's slice geometry
(in-plane pixel spacing of the training slices at the method's resolution, the slice
thickness along the third axis, RAS), in an MSD layout: ``imagesTr/``, ``labelsTr/`` and a
``dataset.json`` with the source labels and modalities, written last, so a folder whose
synthesis was interrupted is never taken for a complete dataset. Images are written in
[0, 1] (background ~0, as MR/CT foregrounds after normalisation); train on them with
``data.extra``.

Pair ``i`` depends only on (seed, i) and the batch layout, and pairs are generated in fixed
blocks of ``batch``: an interrupted synthesis, run again with the same arguments, regenerates
only the missing pairs and writes exactly what an uninterrupted run writes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Affine
from tqdm.auto import tqdm

from imgx3d.checkpoint import Checkpoint, load_checkpoint
from imgx3d.data.catalog import find_cases
from imgx3d.data.geometry import volume_to_slices
from imgx3d.data.transforms import Preprocessor
from imgx3d.errors import CheckpointError, ConfigError, InputError
from imgx3d.files import atomic_write, atomic_write_text
from imgx3d.interrupts import raise_if_requested
from imgx3d.methods.base import GenerateSettings, Generator, method_from_checkpoint
from imgx3d.progress import CaseProgress, on_terminal
from imgx3d.resources import autocast, choose_precision, resolve_device

SETTINGS_FILE = "synth.json"


def _pair_names(index: int) -> tuple[str, str]:
    name = f"synth_{index:05d}.nii.gz"
    return f"imagesTr/{name}", f"labelsTr/{name}"


def _write(array: np.ndarray, path: Path, affine: np.ndarray, dtype: type) -> None:
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


def _check_settings(output: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix pairs of two different syntheses in one folder; record the settings."""
    file = output / SETTINGS_FILE
    if file.exists():
        previous = json.loads(file.read_text(encoding="utf-8"))
        differ = sorted(k for k in ("checkpoint", "seed", "steps", "batch") if previous.get(k) != settings[k])
        differ += ["precision"] if previous.get("precision", "fp32") != settings["precision"] else []
        if differ:
            raise InputError(f"{output}: holds pairs of another synthesis (different {', '.join(differ)}); "
                             "choose a new --output, or rerun with the same settings to resume")
    elif output.exists() and any(output.iterdir()):
        raise InputError(f"{output}: not empty and not an imgx3d synth folder; choose a new --output")
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, json.dumps(settings, indent=1))


def random_mask_transform(mask: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Siamese-Diffusion's "Random" masks: a label slice ``(1, H, W)`` scaled (0.8–1.2), rotated
    (±30°) and shifted (±10 % of each side), nearest neighbour (MONAI ``Affine``)."""
    affine = Affine(rotate_params=math.radians(rng.uniform(-30, 30)), scale_params=[rng.uniform(0.8, 1.2)] * 2,
                    translate_params=[rng.uniform(-0.1, 0.1) * n for n in mask.shape[-2:]], mode="nearest",
                    padding_mode="zeros", image_only=True)
    out = affine(mask.float())
    return (out.as_tensor() if hasattr(out, "as_tensor") else out).round().long()


def mask_slices(root: str | Path, run: Checkpoint, held_out: set[str] = frozenset()) -> torch.Tensor:
    """The foreground label slices ``(M, 1, H, W)`` of a dataset folder, as the run's method sees them.

    Args:
        held_out: case ids left out (the generator run's validation and test cases: their masks
            must not become training data of the segmenters the pairs are for).
    """
    data_cfg = run.config.data
    catalog = find_cases(root, data_cfg)
    if catalog.labels != run.labels:
        raise InputError(f"{root}: labels {catalog.labels} differ from the run's {run.labels}; pass masks "
                         "of the dataset the generator was trained on")
    pre, slices = Preprocessor(data_cfg), []
    for case in (c for c in catalog.cases if c.label is not None and c.case_id not in held_out):
        model = pre.load_case(case, catalog.labels)["label"]  # through the image's grid map (crop, resize)
        cut = volume_to_slices(model, data_cfg.slices.axis, data_cfg.slices.size, label=True)
        slices.append(cut[cut.flatten(1).amax(1) > 0])
    if not slices or sum(len(s) for s in slices) == 0:
        raise InputError(f"{root}: no label slice with foreground" + (" outside the run's validation and test cases"
                         if held_out else "") + "; pass a dataset folder with masks")
    return torch.cat(slices)


def held_out_cases(checkpoint: Path) -> set[str]:
    """The validation and test case ids of the run a checkpoint belongs to (none without its ``split.json``)."""
    split = checkpoint.parent / "split.json"
    if not split.is_file():
        return set()
    parts = json.loads(split.read_text(encoding="utf-8"))
    return set(parts.get("val", [])) | set(parts.get("test", []))


def synthesize(run: str, n: int, output: str | Path, seed: int = 0, batch: int = 8, steps: int | None = None,
               device: str = "auto", masks: str | Path | None = None, random_masks: bool = False,
               precision: str = "fp32") -> Path:
    """Generate ``n`` pairs with the generator of ``run`` (a checkpoint or run folder) into ``output``; resumable.

    Args:
        steps: sampling steps (default: the method's ``sample_steps``).
        masks: a dataset folder whose label slices condition a mask-conditioned generator
            (pair i takes mask i mod M). Cases of the run's validation and test split
            (``split.json`` beside the checkpoint) are left out.
        random_masks: scale / rotate / shift each mask first (seeded by pair).
        precision: the generator's autocast precision (``fp32``, ``bf16``, ``fp16`` or ``auto``, as
            ``infer.precision``); one folder holds pairs of one precision.
    """
    if n < 1 or batch < 1:
        raise ConfigError(f"--n {n} and --batch {batch} must be >= 1")
    meta = load_checkpoint(run)
    checkpoint = meta.path
    method = method_from_checkpoint(meta)
    if not isinstance(method, Generator):
        raise CheckpointError(f"{checkpoint}: method '{method.name}' does not generate image/mask pairs; synth needs "
                              "a generator run (pig, siamese)")
    dev = resolve_device(device)
    method.to(dev).eval()
    output = Path(output)
    settings = GenerateSettings(seed=seed, steps=steps or method.cfg.sample_steps)
    bank = mask_slices(masks, meta, held_out_cases(checkpoint)) if masks else None
    _check_settings(output, {"checkpoint": str(checkpoint.resolve()), "seed": seed, "steps": settings.steps,
                             "batch": batch, "n": n, "masks": str(Path(masks).resolve()) if masks else None,
                             "random_masks": random_masks, "precision": precision})
    size = list(meta.config.data.slices.size)
    axis = meta.config.data.slices.axis  # slices lie across this RAS axis, as the method saw them
    spacing = np.empty(3)
    spacing[[a for a in range(3) if a != axis]], spacing[axis] = meta.get("slice_spacing", [1.0, 1.0, 1.0])[:2], \
        meta.get("slice_spacing", [1.0, 1.0, 1.0])[2]
    affine = np.diag([*spacing, 1.0])

    def mask_of(i: int) -> torch.Tensor:
        mask = bank[i % len(bank)]
        return random_mask_transform(mask, np.random.default_rng([seed, i])) if random_masks else mask

    missing = [i for i in range(n) if not all((output / p).exists() for p in _pair_names(i))]
    blocks = sorted({i // batch for i in missing})
    complete = n - len(missing)
    bar = tqdm(total=n, initial=complete, desc="synth", unit="pair", disable=not on_terminal(sys.stderr))
    lines = CaseProgress("synth", len(missing), unit="pairs", enabled=bar.disable)  # a line per pair in a log
    for block in blocks:
        raise_if_requested(f"{complete} of {n} pair(s) are in {output}, each complete; run the same command again to "
                           "write the rest")
        indices = list(range(block * batch, (block + 1) * batch))  # whole blocks: the same numbers as a fresh run
        block_masks = torch.stack([mask_of(i) for i in indices]) if bank is not None else None
        with autocast(dev, choose_precision(precision, dev)):
            images, labels = method.generate(indices, size, block_masks, settings)
        for i, image, label in zip(indices, images.cpu().numpy(), labels.cpu().numpy()):
            if i >= n or i not in missing:
                continue
            image_path, label_path = (output / p for p in _pair_names(i))
            volume = np.moveaxis(np.expand_dims((image + 1) / 2, axis + 1), 0, -1)  # (X, Y, Z, C) in [0, 1]
            _write(volume[..., 0] if volume.shape[-1] == 1 else volume, image_path, affine, np.float32)
            _write(np.expand_dims(label[0], axis), label_path, affine, np.uint8)
            complete += 1
            bar.update(1)
            lines.advance(note=image_path.name)
    bar.close()
    labels = {str(k): v for k, v in sorted(meta.labels.items())}
    channels = meta.get("channel_names")
    dataset = {"name": f"synth-{method.name}", "description": f"{n} pairs generated by imgx3d synth",
               "labels": labels, "modality": {str(i): name for i, name in enumerate(channels or ["image"])},
               "numTraining": n,
               "training": [{"image": f"./{a}", "label": f"./{b}"} for a, b in map(_pair_names, range(n))]}
    atomic_write_text(output / "dataset.json", json.dumps(dataset, indent=1))
    return output
