import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from imgx3d.data.io import read_label, read_volume, write_nifti
from imgx3d.errors import InputError
from tests.conftest import oblique_affine, save_nifti

OBLIQUE = oblique_affine()


def _sitk_image(array_xyz: np.ndarray, spacing, origin, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(array_xyz.transpose(2, 1, 0).copy())
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def test_nifti_write_keeps_affine_header_codes(tmp_path):
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    img = nib.Nifti1Image(array, OBLIQUE)
    img.set_qform(OBLIQUE, code=1)
    img.set_sform(OBLIQUE, code=2)
    nib.save(img, str(tmp_path / "in.nii.gz"))
    volume = read_volume(tmp_path / "in.nii.gz")
    np.testing.assert_allclose(volume.affine, OBLIQUE, atol=1e-6)
    write_nifti((array > 0).astype(np.uint8), tmp_path / "out.nii.gz", volume)
    out = nib.load(str(tmp_path / "out.nii.gz"))
    assert out.shape == array.shape
    np.testing.assert_allclose(out.affine, OBLIQUE, atol=1e-5)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    np.testing.assert_array_equal(np.asarray(out.dataobj), (array > 0).astype(np.uint8))
    assert not list(tmp_path.glob(".*")), "no temporary file may be left behind"


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_simpleitk_formats_match_nifti_geometry(tmp_path, suffix):
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    sitk.WriteImage(_sitk_image(array, (0.7, 0.8, 2.5), (10.0, -4.0, 7.0), direction), str(tmp_path / f"v{suffix}"))
    sitk.WriteImage(_sitk_image(array, (0.7, 0.8, 2.5), (10.0, -4.0, 7.0), direction), str(tmp_path / "v.nii.gz"))
    ours, via_nifti = read_volume(tmp_path / f"v{suffix}"), read_volume(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(ours.array, array)
    np.testing.assert_array_equal(via_nifti.array, array)
    np.testing.assert_allclose(ours.affine, via_nifti.affine, atol=1e-5)  # SimpleITK's own NIfTI writer agrees
    np.testing.assert_allclose(ours.spacing, (0.7, 0.8, 2.5), atol=1e-6)


def write_dicom_series(folder, array_xyz: np.ndarray, spacing=(0.8, 0.8, 2.0), origin=(-20.0, 10.0, 5.0)):
    """A CT-like DICOM series, one file per z slice, written with SimpleITK."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = _sitk_image(array_xyz.astype(np.int16), spacing, origin, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.42"
    for z in range(volume.GetDepth()):
        s = volume[:, :, z]
        position = volume.TransformIndexToPhysicalPoint((0, 0, z))
        for tag, value in (("0020|000e", series_uid), ("0020|0013", str(z + 1)), ("0008|0060", "CT"),
                           ("0020|0032", "\\".join(map(str, position))), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0018|0050", str(spacing[2])), ("0008|0018", f"{series_uid}.{z + 1}")):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(s)
    return folder


def test_dicom_series_geometry(tmp_path):
    array = np.random.default_rng(1).integers(-100, 100, size=(6, 7, 5)).astype(np.int16)
    volume = read_volume(write_dicom_series(tmp_path / "series", array))
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.spacing, (0.8, 0.8, 2.0), atol=1e-4)
    # DICOM is LPS: x and y world axes flip sign in RAS
    np.testing.assert_allclose(volume.affine[:3, 3], (20.0, -10.0, 5.0), atol=1e-4)
    np.testing.assert_allclose(np.diag(volume.affine)[:3], (-0.8, -0.8, 2.0), atol=1e-4)


def test_bad_inputs_are_one_line_errors(tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "absent.nii.gz", "not found")
    good = save_nifti(tmp_path / "good.nii.gz", np.ones((4, 4, 4), np.float32))
    raw = good.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    cases["truncated"] = (tmp_path / "trunc.nii.gz", "unreadable or truncated")
    (tmp_path / "magic.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 30))
    cases["magic"] = (tmp_path / "magic.nii.gz", "unreadable or truncated")
    cases["2d"] = (save_nifti(tmp_path / "flat.nii.gz", np.ones((4, 4), np.float32)), "is 2D .* --image")
    cases["4d"] = (save_nifti(tmp_path / "four.nii.gz", np.ones((4, 4, 4, 2), np.float32)), "4D")
    nan = np.ones((4, 4, 4), np.float32)
    nan[1, 1, 1] = np.nan
    cases["nan"] = (save_nifti(tmp_path / "nan.nii.gz", nan), "NaN or infinite")
    cases["format"] = (tmp_path / "x.xyz", "unsupported format")
    (tmp_path / "x.xyz").write_bytes(b"xyz")
    cases["bad png"] = (tmp_path / "x.png", "unreadable or truncated image")
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    zero = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    zero.set_qform(None, code=0)
    zero.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)  # nibabel itself repairs a zero pixdim, not a zero sform
    nib.save(zero, str(tmp_path / "zero.nii.gz"))
    cases["zero spacing"] = (tmp_path / "zero.nii.gz", "spacing")
    for name, (path, message) in cases.items():
        with pytest.raises(InputError, match=message) as err:
            read_volume(path)
        text = str(err.value)
        assert str(path) in text and "\n" not in text, name


def test_label_checks(tmp_path):
    with pytest.raises(InputError, match="non-integer"):
        read_label(save_nifti(tmp_path / "f.nii.gz", np.full((3, 3, 3), 0.5, np.float32)))
    with pytest.raises(InputError, match="negative"):
        read_label(save_nifti(tmp_path / "n.nii.gz", np.full((3, 3, 3), -1, np.int16)))
    label = read_label(save_nifti(tmp_path / "ok.nii.gz", np.full((3, 3, 3), 2, np.uint8)))
    assert label.array.dtype == np.int64 and label.array.max() == 2


@pytest.mark.parametrize("fast", [True, False])
def test_gzip_reads_and_writes_standard_files_with_or_without_isal(tmp_path, monkeypatch, fast):
    from imgx3d.data import io

    if not fast:
        monkeypatch.setattr(io, "fast_gzip", None)
    else:
        assert io.fast_gzip is not None  # isal is a dependency: the fast path is the one users run
    rng = np.random.default_rng(0)
    image = (rng.normal(size=(13, 11, 7)) * 100).astype(np.int16)
    src = nib.Nifti1Image(image, oblique_affine())
    src.header.set_slope_inter(0.5, 10.0)  # scaled storage: the reader must apply it
    nib.save(src, str(tmp_path / "in.nii.gz"))
    volume = read_volume(tmp_path / "in.nii.gz")
    np.testing.assert_allclose(volume.array, image * 0.5 + 10.0)
    np.testing.assert_allclose(volume.affine, oblique_affine())
    labels = rng.integers(0, 3, size=(13, 11, 7)).astype(np.uint8)
    write_nifti(labels, tmp_path / "out.nii.gz", volume)
    first = (tmp_path / "out.nii.gz").read_bytes()
    assert first[4:8] == bytes(4)  # gzip's MTIME field is 0 (as nibabel writes it): the same map, the same bytes
    raw = gzip.decompress(first)  # a standard gzip stream
    written = nib.Nifti1Image.from_bytes(raw)
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    np.testing.assert_allclose(written.affine, oblique_affine(), atol=1e-6)


def test_gzip_size_check_reads_the_trailer_not_the_stream(tmp_path, monkeypatch):
    """A well-formed .nii.gz is size-checked from its gzip trailer (ISIZE = header + voxels), not by
    decompressing it a second time: the check must count the 352-byte header nibabel reads past
    (a loaded header's vox_offset is 0)."""
    import imgx3d.data.io as io

    array = np.random.default_rng(1).normal(size=(9, 8, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(array, OBLIQUE), str(tmp_path / "in.nii.gz"))

    def no_stream(*args, **kwargs):
        raise AssertionError("the size check decompressed the file")

    monkeypatch.setattr(io.gzip, "open", no_stream)
    np.testing.assert_array_equal(read_volume(tmp_path / "in.nii.gz").array, array)
