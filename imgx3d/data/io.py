"""Read and write volumes with their geometry.

NIfTI is read with nibabel; NRRD, MHA/MHD and DICOM series with SimpleITK, whose LPS
geometry is converted to nibabel's RAS+ affine. Arrays are kept in the file's voxel order
(x, y, z) so that a prediction written with the input's affine and header lands exactly
on the input's grid. 2D images (PNG, JPEG, TIFF, GIF, BMP; read with Pillow, which unlike
SimpleITK reads GIF and palette PNGs) become one-slice volumes ``(rows, columns, 1)`` with
an identity affine, and predictions for them are written back as images of the same size.
Every problem a user can cause becomes an :class:`InputError`.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from imgx3d.config import DataConfig
from imgx3d.data.labels import file_to_class
from imgx3d.errors import InputError
from imgx3d.files import atomic_write
from imgx3d.resources import available_host_bytes, gib

if TYPE_CHECKING:
    import SimpleITK as sitk

try:  # ISA-L's gzip: the same standard .gz streams at about twice zlib's speed (reading and writing are a
    # visible share of a prediction's time: issue 21); without it, nibabel's own gzip
    from isal import igzip as fast_gzip
except ImportError:  # pragma: no cover
    fast_gzip = None
GZIP_LEVEL = 1  # nibabel's default for .nii.gz: fast, and labels compress well at any level

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
MULTIFRAME_SUFFIXES = (".dcm",)  # one file holding a whole volume (DBT); folders of .dcm slices are series
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")
SHEAR_TOLERANCE = 1e-3  # largest |cos| between voxel axes accepted as perpendicular
COLOR_CHANNELS = {"grey": ["grey"], "green": ["green"], "rgb": ["red", "green", "blue"]}
# SimpleITK/DICOM use LPS world coordinates; nibabel (and imgx3d) use RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Volume:
    """A 3D array with its voxel-to-world (RAS+, mm) affine.

    Attributes:
        array: (X, Y, Z) array in the file's voxel order, or (C, X, Y, Z) for multi-channel.
        affine: 4x4 voxel → RAS+ world matrix.
        path: where it was read from.
        header: the NIfTI header of the source file (None for other formats); reused on write.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    header: nib.Nifti1Header | None = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """The last three dimensions of ``array``."""
        return tuple(int(s) for s in self.array.shape[-3:])


def is_volume_path(path: Path) -> bool:
    """True for a file with a volume suffix imgx3d reads (not DICOM folders)."""
    name = path.name.lower()
    return name.endswith(NIFTI_SUFFIXES) or name.endswith(SITK_SUFFIXES)


def is_image_path(path: Path) -> bool:
    """True for a 2D image file imgx3d reads (PNG, JPEG, TIFF, GIF, BMP)."""
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def strip_suffix(name: str) -> str:
    """``case.nii.gz`` → ``case`` (any supported volume or image suffix)."""
    low = name.lower()
    for suffix in sorted(NIFTI_SUFFIXES + SITK_SUFFIXES + MULTIFRAME_SUFFIXES + IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _short(err: BaseException) -> str:
    """``Type: first line`` of an exception, for one-line messages."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__


def check_exists(path: Path, hint: str = "check the path") -> None:
    """A one-line error for a missing path, a broken symbolic link or a link loop."""
    if path.is_symlink() and not path.exists():
        raise InputError(f"{path}: is a broken symbolic link or a link loop; point it at a real file")
    if not path.exists():
        raise InputError(f"{path}: not found; {hint}")


def _check_readable(path: Path) -> None:
    check_exists(path)
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: cannot be read (permission denied); fix its permissions")


def _gzip_data_size(path: Path, expected: int) -> int:
    """Uncompressed size of a gzip file, read no further than ``expected + 1`` bytes.

    The trailer's ISIZE (size modulo 2**32) answers at once when it agrees; otherwise (a
    larger file, several gzip members, a truncated file) the stream is decompressed up to
    one byte past ``expected``, so an absurd header never makes this read unbounded.
    """
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected % 2**32:
            return expected
    total = 0
    with gzip.open(path, "rb") as f:
        while total <= expected:
            chunk = f.read(min(1 << 24, expected + 1 - total))
            if not chunk:
                break
            total += len(chunk)
    return total


def _check_nifti_size(path: Path, img: nib.Nifti1Image) -> None:
    """Refuse a header whose implied voxel data disagrees with the file, before allocating it.

    A corrupt header (or a truncated file) would otherwise make numpy allocate whatever the
    dimensions claim, ending in a bare ``MemoryError``.
    """
    header = img.header
    # the offset the data is read from: nibabel zeroes a loaded header's vox_offset (recomputed on
    # save), so header.get_data_offset() is 0 and the ISIZE shortcut below would never match
    offset = int(getattr(img.dataobj, "offset", header.get_data_offset()))
    expected = offset + int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
    try:
        found = _gzip_data_size(path, expected) if path.name.lower().endswith(".gz") else path.stat().st_size
    except (EOFError, zlib.error, OSError) as err:
        raise InputError(f"{path}: unreadable or truncated NIfTI file ({_short(err)}); re-export or re-copy it") from None
    if found < expected:
        shape = "x".join(str(n) for n in header.get_data_shape())
        raise InputError(f"{path}: unreadable or truncated NIfTI file (Expected {expected} bytes for its header's "
                         f"{shape} {header.get_data_dtype()} voxels, the file holds {found}); the header is corrupt "
                         "or the file was cut short: re-export or re-copy it")


def _check_fits_in_memory(path: Path, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse a volume whose array (as stored, plus its float32 copy) exceeds the free host memory."""
    voxels = int(np.prod(shape, dtype=np.int64))
    needed = voxels * (itemsize + 4)
    free = available_host_bytes()
    if free is not None and needed > free:
        raise InputError(f"{path}: its {'x'.join(map(str, shape))} voxels need {gib(needed)} to read but "
                         f"{gib(free)} of memory is free; check the header's dimensions, or crop or resample "
                         "the volume first (or read it on a machine with more memory)")


def _read_nifti(path: Path) -> Volume:
    try:
        img = nib.load(str(path))
        _check_nifti_size(path, img)
        _check_fits_in_memory(path, img.header.get_data_shape(), img.header.get_data_dtype().itemsize)
        if fast_gzip is not None and path.name.lower().endswith(".gz"):  # the same image, decompressed by ISA-L
            img = type(img).from_bytes(fast_gzip.decompress(path.read_bytes()))
        array = np.asarray(img.dataobj, dtype=np.float32)
    except (EOFError, zlib.error, OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise InputError(f"{path}: unreadable or truncated NIfTI file ({_short(err)}); re-export or re-copy it") from None
    header = img.header.copy()
    return Volume(array=array, affine=np.asarray(img.affine, dtype=np.float64), path=path, header=header)


def _simpleitk():
    """SimpleITK, imported on first use: NIfTI-only work (most of it) never loads its ~50 MB library."""
    import SimpleITK

    return SimpleITK


def _sitk_to_volume(image: sitk.Image, path: Path) -> Volume:
    sitk = _simpleitk()
    if image.GetDimension() != 3:
        raise InputError(f"{path}: is {image.GetDimension()}D; imgx3d --volume expects 3D volumes")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(f"{path}: has vector pixels; save each channel as its own scalar volume")
    array = np.ascontiguousarray(array.transpose(2, 1, 0))  # (z, y, x) → (x, y, z)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()
    return Volume(array=array, affine=LPS_TO_RAS @ lps, path=path, header=None)


def _read_dicom_series(folder: Path) -> Volume:
    reader = _simpleitk().ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder}: no DICOM series found; pass a folder of DICOM slices or a volume file")
    if len(series) > 1:
        raise InputError(
            f"{folder}: holds {len(series)} DICOM series; put each series in its own folder and pass one"
        )
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"{folder}: DICOM series could not be read ({str(err).splitlines()[0]}); check the slices") from None
    _check_slice_gaps(reader, len(files), folder)
    return _sitk_to_volume(image, folder)


def _check_slice_gaps(reader: sitk.ImageSeriesReader, n_files: int, folder: Path) -> None:
    """Refuse a series whose slice positions are unevenly spaced (missing slices): SimpleITK
    only warns and stacks them as if they were contiguous, which would put labels in the wrong place."""
    positions = []
    for i in range(n_files):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            return
        positions.append([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
    if len(positions) < 3:
        return
    steps = np.linalg.norm(np.diff(np.asarray(positions), axis=0), axis=1)
    if steps.max() > 1.5 * np.median(steps):
        gap = int(np.argmax(steps))
        raise InputError(f"{folder}: DICOM series has a gap after slice {gap + 1} of {n_files} ({steps.max():.2f} mm "
                         f"where slices are {np.median(steps):.2f} mm apart): slices are missing; export the full series")


def _read_sitk(path: Path) -> Volume:
    try:
        reader = _simpleitk().ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()  # the header alone: refuse an absurd size before SimpleITK allocates it
        _check_fits_in_memory(path, (*reader.GetSize(), reader.GetNumberOfComponents()), 8)
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"{path}: unreadable or truncated file ({str(err).strip().splitlines()[-1]}); re-export it") from None
    return _sitk_to_volume(image, path)


def _grey_palette(img) -> bool:
    """True when every colour a palette image uses is a grey (GIF masks): read it by luminance."""
    used = np.unique(np.asarray(img))
    colours = np.asarray(img.getpalette("RGB") or [], dtype=np.int64).reshape(-1, 3)
    used = used[used < len(colours)]
    return bool(np.all(colours[used] == colours[used][:, :1]))


def _image_pixels(img, color: str, what: str) -> np.ndarray:
    """Pixels of a Pillow image: ``(H, W)``, or ``(H, W, 3)`` for ``color == 'rgb'`` images."""
    if what == "label":
        if img.mode == "P" and not _grey_palette(img):  # colour-coded classes: the indices are the labels
            return np.asarray(img)
        return np.asarray(img if img.mode in ("L", "1", "I", "I;16", "F") else img.convert("L"))
    multi = img.mode not in ("L", "1", "I", "I;16", "I;16B", "F")
    if color == "rgb":
        rgb = np.asarray(img.convert("RGB") if multi else img)
        return rgb if rgb.ndim == 3 else np.repeat(rgb[..., None], 3, axis=-1)
    if color == "green" and multi:
        return np.asarray(img.convert("RGB"))[..., 1]
    return np.asarray(img.convert("L") if multi else img)


def _read_image2d(path: Path, color: str, what: str) -> Volume:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                raise InputError(f"{path}: has {img.n_frames} frames; save each frame as its own image")
            array = _image_pixels(img, color, what).astype(np.float32)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise InputError(f"{path}: unreadable or truncated image ({_short(err)}); re-export it") from None
    array = array[:, :, None] if array.ndim == 2 else np.moveaxis(array, -1, 0)[..., None]
    return Volume(array=np.ascontiguousarray(array), affine=np.eye(4), path=path, header=None)


def _as_3d(array: np.ndarray, path: Path, what: str, allow_channels: bool) -> np.ndarray:
    """A volume file's array as (X, Y, Z), or channel-first (C, X, Y, Z) when ``allow_channels``."""
    if array.size == 0:
        raise InputError(f"{path}: has a zero-size dimension (shape {array.shape}); the file is empty or corrupt")
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        raise InputError(f"{path}: is 2D (shape {array.shape}) where a 3D volume is expected; save 2D images as "
                         "PNG/TIFF and train a 2D method with --image, or stack them into a 3D volume")
    if array.ndim == 4:
        if not allow_channels:
            raise InputError(f"{path}: is 4D (shape {array.shape}) where a 3D {what} is expected; split it into 3D files")
        return np.moveaxis(array, 3, 0)
    if array.ndim != 3:
        raise InputError(f"{path}: has {array.ndim} dimensions; a 3D {what} is expected")
    return array


def read_volume(path: str | Path, *, allow_channels: bool = False, what: str = "image", color: str = "grey") -> Volume:
    """Read a 3D volume (or a 4D multi-channel one when ``allow_channels``), or a 2D image.

    Args:
        path: NIfTI, NRRD, MHA/MHD file, a folder holding one DICOM series, or a 2D image
            (read as a ``(rows, columns, 1)`` volume with an identity affine).
        allow_channels: accept a 4D NIfTI as (X, Y, Z, C) channels; returned channel-first.
        what: ``image`` or ``label``, for messages and value checks.
        color: 2D colour images: ``grey``, ``green`` or ``rgb`` (3 channels, channel-first).

    Raises:
        InputError: missing, unreadable, truncated, wrong dimensionality, empty, non-finite,
            or a malformed affine.
    """
    path = Path(path)
    _check_readable(path)
    if path.is_dir():
        volume = _read_dicom_series(path)
    elif path.name.lower().endswith(NIFTI_SUFFIXES):
        volume = _read_nifti(path)
    elif path.name.lower().endswith(SITK_SUFFIXES + MULTIFRAME_SUFFIXES):
        volume = _read_sitk(path)
    elif is_image_path(path):
        volume = _read_image2d(path, color, what)
    else:
        raise InputError(
            f"{path}: unsupported format; use NIfTI (.nii/.nii.gz), NRRD, MHA/MHD, a DICOM series folder, "
            "a multi-frame DICOM file, "
            "or a 2D image (PNG/JPEG/TIFF/GIF/BMP)"
        )
    array = volume.array if is_image_path(path) else _as_3d(volume.array, path, what, allow_channels)
    return _checked(replace(volume, array=array), path)


def _checked(volume: Volume, path: Path) -> Volume:
    """``volume`` with a contiguous array, once its values and affine pass the checks every input gets."""
    array = volume.array
    if 0 in array.shape:
        raise InputError(f"{path}: has a zero-size dimension (shape {array.shape}); the file is empty or corrupt")
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InputError(f"{path}: contains {bad} NaN or infinite voxels; replace them (e.g. with 0) before use")
    check_affine(volume.affine, path)
    return replace(volume, array=np.ascontiguousarray(array))


def volume_from_array(array: np.ndarray, affine: np.ndarray, name: str = "<array>",
                      header: nib.Nifti1Header | None = None) -> Volume:
    """An in-memory image as a checked :class:`Volume`, as a file would be read: ``(X, Y, Z)``, or
    ``(X, Y, Z, C)`` channels (returned channel-first), with a 4 x 4 voxel → RAS+ (mm) ``affine``.

    Raises:
        InputError: wrong dimensionality or affine shape, empty, non-finite or a malformed affine,
            in one line naming ``name``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError(f"{name}: the affine must be a 4 x 4 voxel -> RAS+ (mm) matrix, not shape {affine.shape}")
    array = _as_3d(np.asarray(array, dtype=np.float32), Path(name), "image", allow_channels=True)
    return _checked(Volume(array=array, affine=affine, path=Path(name), header=header), Path(name))


def sitk_to_volume(image: sitk.Image, name: str = "<SimpleITK image>") -> Volume:
    """A 3D scalar SimpleITK image as a checked :class:`Volume` (its LPS geometry turned into RAS+)."""
    return _checked(_sitk_to_volume(image, Path(name)), Path(name))


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """A 3D :class:`Volume` as a SimpleITK image with the same grid (RAS+ affine back to LPS
    origin, spacing and direction): the inverse of :func:`sitk_to_volume`."""
    sitk = _simpleitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume.array).transpose(2, 1, 0)))
    lps = np.linalg.inv(LPS_TO_RAS) @ volume.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    return image


def check_affine(affine: np.ndarray, path: Path | None) -> None:
    """Refuse non-finite affines, zero spacing and degenerate (singular) axes."""
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: affine has NaN or infinite entries; fix the header's qform/sform")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing < 1e-6):
        raise InputError(f"{path}: zero voxel spacing {tuple(float(s) for s in spacing.round(6))}; fix the header's pixdim/qform/sform")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9 * float(np.prod(spacing)):
        raise InputError(f"{path}: affine is singular (axes are collinear); fix the header's qform/sform")
    axes = affine[:3, :3] / spacing
    shear = float(np.abs(axes.T @ axes - np.eye(3)).max())
    if shear > SHEAR_TOLERANCE:
        raise InputError(f"{path}: affine is sheared (voxel axes {np.degrees(np.arccos(1 - shear)):.1f}° off "
                         "perpendicular, e.g. a tilted-gantry CT); resample it onto an orthogonal grid first")


def read_grid(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape and affine from the header alone (no voxel data is read)."""
    path = Path(path)
    _check_readable(path)
    try:
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            img = nib.load(str(path))
            _check_nifti_size(path, img)  # a corrupt header is named as such, not as a grid mismatch
            return tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)
    except (EOFError, zlib.error, OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise InputError(f"{path}: unreadable or truncated NIfTI file ({_short(err)}); re-export or re-copy it") from None
    volume = read_volume(path, allow_channels=True)
    return volume.spatial_shape, volume.affine


def read_label(path: str | Path, cfg: DataConfig | None = None) -> Volume:
    """Read a label map: 3D (or a 2D image), integer-valued and non-negative.

    With ``cfg``, its ``mask_threshold`` and ``label_map`` turn file values into class values.
    """
    volume = read_volume(path, what="label")
    array = volume.array
    if not np.all(np.equal(np.mod(array, 1), 0)):
        raise InputError(f"{path}: label map has non-integer values; labels must be whole numbers (0 = background)")
    if array.min() < 0:
        raise InputError(f"{path}: label map has negative values (min {array.min():g}); labels must be >= 0")
    return replace(volume, array=array.astype(np.int64) if cfg is None else file_to_class(array, cfg))


def write_nifti(array: np.ndarray, path: str | Path, reference: Volume, dtype: type = np.uint8) -> None:
    """Write ``array`` on ``reference``'s grid: same affine, and its NIfTI header when it has one.

    The qform/sform codes and matrices of the reference are kept; intensity scaling is
    reset so label values are stored as they are.
    """
    path = Path(path)
    if tuple(array.shape[:3]) != reference.spatial_shape:
        raise ValueError(f"array shape {array.shape} does not match reference grid {reference.spatial_shape}")
    array = np.asarray(array, dtype=dtype)
    if reference.header is not None:
        src = reference.header
        img = nib.Nifti1Image(array, reference.affine, header=src.copy())
        qform, qcode = src.get_qform(coded=True)
        sform, scode = src.get_sform(coded=True)
        img.set_qform(qform if qform is not None else reference.affine, code=int(qcode or 0))
        img.set_sform(sform if sform is not None else reference.affine, code=int(scode or 0))
    else:
        img = nib.Nifti1Image(array, reference.affine)
        img.set_qform(reference.affine, code=1)
        img.set_sform(reference.affine, code=1)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    if fast_gzip is not None and path.name.lower().endswith(".gz"):
        # mtime 0, as nibabel writes it: the same prediction gives the same bytes, whenever it is written
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(fast_gzip.compress(img.to_bytes(), GZIP_LEVEL, mtime=0)))
    else:
        atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


def write_image2d(array: np.ndarray, path: str | Path) -> None:
    """Write a label map of a 2D image (``(rows, columns[, 1])``) as an 8- or 16-bit grey image."""
    from PIL import Image

    array = np.asarray(array)
    array = array[..., 0] if array.ndim == 3 else array
    dtype = np.uint8 if array.max(initial=0) < 256 else np.uint16
    image = Image.fromarray(np.ascontiguousarray(array.astype(dtype)))
    atomic_write(Path(path), lambda tmp: image.save(tmp, format=Image.registered_extensions()[Path(path).suffix.lower()]))
