"""Images as Python objects: what :meth:`Predictor.predict` takes besides files, and gives back.

A notebook or a service holds images, not paths. The predictor takes a nibabel image, a
SimpleITK image or an ``(array, affine)`` pair (``(X, Y, Z)`` or channel-last ``(X, Y, Z, C)``,
a 4 x 4 voxel → RAS+ mm affine, as nibabel gives them) and returns the label map as the same
kind on the same grid: a ``Nifti1Image`` for a nibabel image, a ``SimpleITK.Image`` with the
input's origin, spacing and direction for a SimpleITK image, an ``(array, affine)`` pair for a pair.
"""

from __future__ import annotations

from typing import Any, Union

import nibabel as nib
import numpy as np

from imgx3d.data.io import Volume, sitk_to_volume, volume_from_array, volume_to_sitk
from imgx3d.data.labels import label_dtype
from imgx3d.errors import InputError

ImageObject = Union[nib.spatialimages.SpatialImage, tuple, Any]  # Any: a SimpleITK.Image (imported on use)


def _is_sitk(image: Any) -> bool:
    return type(image).__module__.startswith("SimpleITK")


def to_volume(image: ImageObject) -> Volume:
    """The checked :class:`Volume` of an in-memory image.

    Raises:
        InputError: an unsupported kind, or an image that fails the checks a file gets (one line).
    """
    if isinstance(image, nib.spatialimages.SpatialImage):
        header = image.header.copy() if isinstance(image, nib.Nifti1Image) else None
        return volume_from_array(np.asarray(image.dataobj, dtype=np.float32), image.affine, "<nibabel image>", header)
    if _is_sitk(image):
        return sitk_to_volume(image)
    if isinstance(image, tuple) and len(image) == 2:
        return volume_from_array(image[0], image[1])
    raise InputError(f"{type(image).__name__}: not an image imgx3d reads; pass a file path, a nibabel image, a "
                     "SimpleITK image or an (array, affine) pair")


def like(image: ImageObject, volume: Volume) -> Any:
    """``volume`` (a label map on ``image``'s grid) as the same kind as ``image``, in the smallest
    unsigned integer type that holds its values (as label files are written)."""
    values = np.asarray(volume.array)
    volume = Volume(values.astype(label_dtype(int(values.max()) if values.size else 0)), volume.affine)
    if isinstance(image, nib.spatialimages.SpatialImage):
        out = nib.Nifti1Image(volume.array, volume.affine)
        out.set_qform(volume.affine, code=1)
        out.set_sform(volume.affine, code=1)
        return out
    if _is_sitk(image):
        return volume_to_sitk(volume)
    return volume.array, volume.affine
