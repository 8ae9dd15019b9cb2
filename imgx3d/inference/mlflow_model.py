"""A trained segmenter as an mlflow model (pyfunc flavour): loadable by mlflow's own API and servable.

``imgx3d train`` (with tracking) saves every segmenter run as an mlflow model in the run's
``model`` artifact: the checkpoint (weights, complete config, learned postprocessing), imgx3d's
own code (so the model loads where imgx3d is not installed), pinned requirements, a signature
and an input example. Then::

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")     # or "models:/<name>/<version>"
    labels = model.predict({"image": array, "affine": affine})   # (X, Y, Z) label values

and ``mlflow models serve -m runs:/<run id>/model`` hosts it (JSON ``{"inputs": {"image": ...,
"affine": ...}}``). The input is the image on its own grid (``(X, Y, Z)``, or ``(C, X, Y, Z)`` for
several channels) with its 4 x 4 voxel-to-RAS affine (nibabel's ``img.affine``); the output is
the label map on that same grid, in the dataset's label values — what :meth:`Predictor.predict`
answers for an ``(array, affine)`` pair.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from imgx3d.errors import CheckpointError

MODEL_ARTIFACT = "model"  # where imgx3d train logs the model in its run: runs:/<run id>/model
# imgx3d's requirements, pinned to the versions this model was trained with
REQUIREMENTS = ("torch", "monai", "nibabel", "SimpleITK", "einops", "numpy", "scipy", "mlflow", "diffusers",
                "safetensors", "pillow", "matplotlib", "scikit-image", "pyyaml", "tqdm")
EXAMPLE_SHAPE = (12, 12, 8)  # the input example: a small volume (any size is accepted)


class SegmenterModel:
    """mlflow's view of an imgx3d :class:`~imgx3d.inference.predictor.Predictor` (what :func:`_load_pyfunc`
    returns; a plain class through pyfunc's ``loader_module``, so no pickled Python object is stored)."""

    def __init__(self, checkpoint: str | Path):
        from imgx3d.inference.predictor import Predictor

        self.predictor = Predictor.load(checkpoint)

    def predict(self, model_input: dict[str, np.ndarray], params: dict | None = None) -> np.ndarray:
        """The label map of ``model_input["image"]`` on its grid (``model_input["affine"]``), as an int64
        array of the image's spatial shape."""
        if not isinstance(model_input, dict) or not {"image", "affine"} <= set(model_input):
            raise ValueError("model input: pass {'image': array (X, Y, Z) or (C, X, Y, Z), 'affine': 4 x 4 array}")
        image = np.asarray(model_input["image"], dtype=np.float32)
        labels, _ = self.predictor.predict((image, np.asarray(model_input["affine"], dtype=np.float64)))
        return np.asarray(labels, dtype=np.int64)


def _load_pyfunc(data_path: str) -> SegmenterModel:
    """mlflow's entry point (``loader_module``): ``data_path`` is the model's copy of ``best.pt``."""
    return SegmenterModel(data_path)


def _requirements() -> list[str]:
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


def _signature(in_channels: int):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    image_shape = (-1, -1, -1) if in_channels == 1 else (in_channels, -1, -1, -1)
    inputs = Schema([TensorSpec(np.dtype(np.float32), image_shape, "image"),
                     TensorSpec(np.dtype(np.float64), (4, 4), "affine")])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1, -1))]))


def input_example(in_channels: int) -> dict[str, np.ndarray]:
    """A small image (a smooth ramp, not constant: constant images are refused) and an identity affine."""
    grid = np.indices(EXAMPLE_SHAPE).sum(0).astype(np.float32)
    image = grid if in_channels == 1 else np.stack([grid + c for c in range(in_channels)])
    return {"image": image, "affine": np.eye(4)}


def save_mlflow_model(checkpoint_path: Path, in_channels: int, output: Path) -> Path:
    """Write the mlflow model of the run whose ``best.pt`` is ``checkpoint_path`` to the folder ``output``
    (replacing an earlier one; written beside it first, so an interrupted save leaves none half-written)."""
    import mlflow.pyfunc

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    output = Path(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent)) / "model"
    try:
        mlflow.pyfunc.save_model(str(staging), loader_module=__name__, data_path=str(checkpoint_path),
                                 code_paths=[str(Path(__file__).resolve().parents[1])],  # the imgx3d package
                                 signature=_signature(in_channels),
                                 input_example=input_example(in_channels), pip_requirements=_requirements())
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)
    return output


def checkpoint_of_model(uri: str, tracking_uri: str, dst: Path) -> Path:
    """The ``best.pt`` inside an mlflow model (``models:/NAME/VERSION``, ``models:/NAME@alias``, ``runs:/ID/model``)."""
    from mlflow.artifacts import download_artifacts

    from imgx3d.tracking import resolve_uri

    try:
        folder = Path(download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=resolve_uri(tracking_uri)))
    except Exception as err:
        raise CheckpointError(f"{uri}: not found at '{tracking_uri}' ({type(err).__name__}); check the model name "
                              "and version (mlflow models list) or --tracking-uri") from None
    found = sorted(folder.rglob("best.pt"))  # the model keeps the checkpoint's file name
    if not found:
        raise CheckpointError(f"{uri}: holds no imgx3d checkpoint; pass a model logged by imgx3d train")
    return found[0]
