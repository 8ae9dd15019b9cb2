"""2D images (``--image``): reading, label conventions, catalog, 2D metrics, train → predict → evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgx3d.cli import main
from imgx3d.config import DataConfig, from_dict
from imgx3d.data.catalog import find_cases
from imgx3d.data.io import read_label, read_volume, write_image2d
from imgx3d.data.labels import class_to_file, file_to_class
from imgx3d.errors import InputError
from imgx3d.evaluation.metrics import score_case
from tests.conftest import tree_digest


def disc_image(rng: np.random.Generator, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc (mask 255) on a noisy grey background, 8-bit."""
    yy, xx = np.mgrid[:size, :size]
    centre = rng.uniform(14, size - 14, 2)
    mask = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < rng.uniform(6, 10) ** 2).astype(np.uint8) * 255
    image = np.clip(80 + 100 * (mask > 0) + rng.normal(0, 12, mask.shape), 0, 255).astype(np.uint8)
    return image, mask


@pytest.fixture
def png_dataset(tmp_path):
    """10 grey PNG images in image/ with 0/255 masks in label/ (the ISBI 2012 layout)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pngs"
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir()
    for i in range(10):
        image, mask = disc_image(rng)
        Image.fromarray(image).save(root / "image" / f"{i}.png")
        Image.fromarray(mask).save(root / "label" / f"{i}.png")
    return root


def test_images_read_as_one_slice_volumes_in_every_colour_mode(tmp_path):
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 200, 30
    Image.fromarray(rgb).save(tmp_path / "c.png")
    grey = read_volume(tmp_path / "c.png")
    assert grey.array.shape == (5, 7, 1) and np.allclose(grey.affine, np.eye(4))
    assert np.allclose(grey.array[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    assert np.all(read_volume(tmp_path / "c.png", color="green").array == 200)
    colour = read_volume(tmp_path / "c.png", color="rgb").array
    assert colour.shape == (3, 5, 7, 1) and colour[:, 0, 0, 0].tolist() == [10, 200, 30]
    # palette images: the indices are label values (not their colours' luminance)
    palette = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "p.png")
    assert read_label(tmp_path / "p.png").array[..., 0].tolist() == [[0, 1], [2, 1]]
    Image.fromarray(np.array([[0, 255]], np.uint8)).save(tmp_path / "m.gif")
    assert read_label(tmp_path / "m.gif").array[..., 0].tolist() == [[0, 255]]


def test_label_conventions_round_trip(tmp_path):
    membrane = from_dict(DataConfig, {"label_map": {0: 1, 255: 0}})
    file_values = np.array([[0, 255], [255, 0]])
    classes = file_to_class(file_values, membrane)
    assert classes.tolist() == [[1, 0], [0, 1]]
    assert class_to_file(classes, membrane).tolist() == file_values.tolist()
    jpeg = from_dict(DataConfig, {"mask_threshold": 127})
    noisy = np.array([0, 3, 126, 128, 250, 255])
    assert file_to_class(noisy, jpeg).tolist() == [0, 0, 0, 1, 1, 1]
    assert class_to_file(file_to_class(noisy, jpeg), jpeg).tolist() == [0, 0, 0, 255, 255, 255]
    for values in (np.array([[0, 3], [255, 7]]), np.array([[0, 300], [65535, 2]])):
        write_image2d(values[..., None], tmp_path / "out.png")
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), values)


def test_catalog_pairs_images_with_masks_by_name_or_leading_id(tmp_path, png_dataset):
    cfg = from_dict(DataConfig, {"mode": "image", "mask_threshold": 127})
    catalog = find_cases(png_dataset, cfg)
    assert len(catalog.cases) == 10 and catalog.labels == {0: "background", 1: "label_1"}
    assert catalog.channel_names == ["grey"]
    with pytest.raises(InputError, match="mask_threshold=127"):
        find_cases(png_dataset, from_dict(DataConfig, {"mode": "image"}))
    drive = tmp_path / "drive"
    for folder, name in (("images", "21_training.tif"), ("1st_manual", "21_manual1.gif"), ("mask", "21_training_mask.gif")):
        (drive / folder).mkdir(parents=True)
        Image.fromarray(np.array([[0, 255], [255, 255]], np.uint8)).save(drive / folder / name)
    case = find_cases(drive, cfg).cases[0]
    assert case.case_id == "21_training" and case.label.name == "21_manual1.gif"  # 1st_manual, not the FOV mask


def test_2d_metrics_use_contours_not_the_whole_slice():
    ref = np.zeros((40, 40, 1), np.int64)
    ref[10:30, 10:30] = 1
    pred = np.zeros_like(ref)
    pred[12:30, 10:30] = 1
    flat = score_case(pred, ref, [1])[1]
    assert flat["hd95"] == pytest.approx(2.0)
    # scored in 3D, a one-slice volume would count every pixel as surface: the 2D contour NSD is lower
    thick = score_case(np.repeat(pred, 3, 2), np.repeat(ref, 3, 2), [1])[1]
    assert flat["nsd"] < thick["nsd"] and flat["dice"] == pytest.approx(thick["dice"])


def _predict_and_evaluate_pngs(run: Path, dataset: Path, config: Path, pred: Path, capsys) -> str:
    """Predict the dataset's PNGs with ``run`` (checking size and mask values), evaluate them; the printed table."""
    assert main(["predict", "--run", str(run), "--input", str(dataset / "image"), "--output", str(pred)]) == 0
    for i in range(10):
        image = np.asarray(Image.open(pred / f"{i}.png"))
        assert image.shape == (48, 48) and set(np.unique(image).tolist()) <= {0, 255}
    assert main(["evaluate", "--pred", str(pred), "--ref", str(dataset / "label"), "--config", str(config)]) == 0
    return capsys.readouterr().out


def test_train_predict_evaluate_pngs_in_the_masks_convention(png_dataset, tmp_path, capsys):
    config = tmp_path / "disc.yaml"
    config.write_text("""
dataset: discs
method: {name: unet, spatial_dims: 2, channels: [8, 16, 32], strides: [2, 2], num_res_units: 1}
data:
  mode: image
  preset: none
  mask_threshold: 127
  labels: {1: disc}
  batch_size: 4
  flip_axes: [0, 1]
  slices: {size: [32, 32], keep_empty: 1.0}
  split: {test_fraction: 0.2, val_fraction: 0.15}
train: {max_steps: 60, val_every: 30, checkpoint_every: 30, lr: 0.01, warmup_steps: 0}
""")
    before = tree_digest(png_dataset)
    assert main(["train", "--volume", "--config", str(config), "--data", str(png_dataset), "--no-track",
                 "--run-dir", str(tmp_path / "vol")]) == 2
    assert "holds 2D images, not volumes; train a 2D method on them with --image" in capsys.readouterr().err
    assert main(["train", "--image", "--config", str(config), "--data", str(png_dataset), "--no-track",
                 "--run-dir", str(tmp_path / "run")]) == 0
    assert "disc" in capsys.readouterr().out
    out = _predict_and_evaluate_pngs(tmp_path / "run", png_dataset, config, tmp_path / "pred", capsys)
    dice = float(out.split("disc")[1].split()[0])
    assert dice > 0.8, out  # 60 steps find bright discs on every image
    assert tree_digest(png_dataset) == before
    assert main(["predict", "--run", str(tmp_path / "run"), "--input", str(tmp_path / "disc.yaml"),
                 "--output", str(tmp_path / "p2")]) == 2
    assert "trained on 2D images" in capsys.readouterr().err


def test_a_3d_method_on_images_is_a_config_error(png_dataset, tmp_path, capsys):
    config = tmp_path / "u.yaml"
    config.write_text("dataset: d\nmethod: {name: unet}\ndata: {mask_threshold: 127}\n")
    assert main(["train", "--image", "--config", str(config), "--data", str(png_dataset), "--no-track",
                 "--run-dir", str(tmp_path / "run")]) == 2
    assert "need a 2D method" in capsys.readouterr().err


def test_sdseg_trains_and_predicts_pngs_with_image(png_dataset, tmp_path, capsys):
    """The latent 2D method through --image: codec phase, SDSeg, one-step PNG predictions of the input's size."""
    from tests.test_sdseg import TINY_SDSEG

    config = tmp_path / "disc.yaml"
    config.write_text("dataset: discs\ndata: {mode: image, preset: none, mask_threshold: 127, labels: {1: disc}, "
                      "batch_size: 4, slices: {keep_empty: 1.0}, split: {test_fraction: 0.2, val_fraction: 0.15}}\n"
                      "train: {max_steps: 6, val_every: 6, checkpoint_every: 6, warmup_steps: 0}\n")
    import torch

    assert main(["train", "--image", "--config", str(config), "--data", str(png_dataset), "--no-track",
                 "--run-dir", str(tmp_path / "run"), *TINY_SDSEG, "method.codec_steps=3"]) == 0
    assert "disc" in capsys.readouterr().out
    saved = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=False)
    assert saved["step"] == 6 and saved["config"]["method"]["infer_steps"] == 1, "SDSeg's single step"
    assert "disc" in _predict_and_evaluate_pngs(tmp_path / "run", png_dataset, config, tmp_path / "pred", capsys)
    # one deterministic step: predicting again gives the same masks
    assert main(["predict", "--run", str(tmp_path / "run"), "--input", str(png_dataset / "image"), "--output",
                 str(tmp_path / "again")]) == 0
    for i in range(10):
        assert (tmp_path / "pred" / f"{i}.png").read_bytes() == (tmp_path / "again" / f"{i}.png").read_bytes()
