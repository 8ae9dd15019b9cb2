"""The Python API: ``from imgx3d import Predictor, train, plan, evaluate``, and ``Predictor.predict``
on a path, a nibabel image, a SimpleITK image or an ``(array, affine)`` pair, each answered in kind
on the input's grid with the same labels as the file-to-file prediction."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import imgx3d
from imgx3d.errors import InputError
from tests.conftest import oblique_affine, train_tiny_unet


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_unet(tmp_path_factory.mktemp("api"))


def test_the_package_exports_the_api_lazily():
    from imgx3d import Predictor, evaluate, load_config, plan, train
    from imgx3d.evaluation.metrics import evaluate_folders
    from imgx3d.inference.predictor import Predictor as PredictorClass
    from imgx3d.planning import plan_dataset
    from imgx3d.training.race import train as train_planned

    assert (Predictor, train, plan, evaluate) == (PredictorClass, train_planned, plan_dataset, evaluate_folders)
    assert load_config(None).method.name == "unet"
    assert {"Predictor", "train", "plan", "evaluate"} <= set(dir(imgx3d))
    with pytest.raises(AttributeError, match="no attribute 'predictor_v2'"):
        imgx3d.predictor_v2  # noqa: B018


def test_predict_answers_each_kind_of_image_in_kind_on_its_grid(trained, tmp_path):
    run, data = trained
    predictor = imgx3d.Predictor.load(run, device="cpu")
    path = sorted((data / "imagesTr").glob("*.nii.gz"))[0]
    source = nib.load(str(path))
    # an oblique affine: geometry must survive each kind's round trip, not only the identity
    moved = nib.Nifti1Image(np.asarray(source.dataobj, dtype=np.float32), oblique_affine())
    nib.save(moved, str(tmp_path / "oblique.nii.gz"))
    expected = predictor.predict(tmp_path / "oblique.nii.gz")  # a path: a Prediction
    assert isinstance(expected, imgx3d.inference.predictor.Prediction)

    labels = predictor.predict(moved)
    assert isinstance(labels, nib.Nifti1Image)
    np.testing.assert_allclose(labels.affine, moved.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(labels.dataobj), expected.labels.array)

    array, affine = predictor.predict((np.asarray(moved.dataobj), moved.affine))
    np.testing.assert_array_equal(array, expected.labels.array)
    np.testing.assert_allclose(affine, moved.affine, atol=1e-6)

    image = sitk.ReadImage(str(tmp_path / "oblique.nii.gz"))
    out = predictor.predict(image)
    assert isinstance(out, sitk.Image)
    assert np.allclose(out.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert np.allclose(out.GetSpacing(), image.GetSpacing(), atol=1e-5)
    assert np.allclose(out.GetDirection(), image.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out).transpose(2, 1, 0), expected.labels.array)

    with_probabilities = predictor.predict(moved, probabilities=True)
    np.testing.assert_array_equal(with_probabilities.labels.array, expected.labels.array)


@pytest.mark.parametrize("bad, message", [
    ((np.zeros((4, 5)), np.eye(4)), "is 2D"),
    ((np.full((6, 6, 6), np.nan), np.eye(4)), "NaN or infinite"),
    ((np.random.default_rng(0).random((6, 6, 6)), np.eye(3)), "4 x 4"),
    ((np.ones((6, 6, 6)), np.eye(4)), "constant"),
    ("not an image".split(), "not an image imgx3d reads"),
])
def test_bad_in_memory_images_are_one_line_errors(trained, bad, message):
    predictor = imgx3d.Predictor.load(trained[0], device="cpu")
    with pytest.raises(InputError, match=message) as err:
        predictor.predict(bad)
    assert "\n" not in str(err.value)
