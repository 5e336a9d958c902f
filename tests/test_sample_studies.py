"""The sample studies are what scripts/sample_studies.py says, read back by nibabel and SimpleITK."""

import hashlib

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def ss(sample_studies_module):
    return sample_studies_module


@pytest.fixture(scope="module")
def ct_path(sample_studies_dir, ss):
    return sample_studies_dir / ss.CT_NAME


@pytest.fixture(scope="module")
def mri_path(sample_studies_dir, ss):
    return sample_studies_dir / ss.MRI_NAME


def test_ct_geometry_with_nibabel(ct_path, ss):
    img = nib.load(ct_path)
    assert img.shape == ss.CT_SHAPE == (171, 143, 57)
    assert all(n % 2 == 1 for n in img.shape)
    np.testing.assert_allclose(img.header.get_zooms(), (0.8, 0.8, 2.5), atol=1e-6)
    np.testing.assert_allclose(img.affine, ss.ct_affine(), atol=1e-5)
    np.testing.assert_allclose(img.get_qform(), ss.ct_affine(), atol=1e-5)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")

    direction = img.affine[:3, :3] / np.array(ss.CT_SPACING)
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-6)
    # Oblique: every voxel axis is tilted away from its nearest world axis.
    tilt = np.degrees(np.arccos(np.abs(direction).max(axis=0)))
    assert (tilt > 5).sum() >= 2, tilt
    assert (tilt < 25).all(), tilt
    np.testing.assert_allclose(img.affine[:3, 3], ss.CT_ORIGIN_RAS, atol=1e-4)


def test_ct_geometry_with_simpleitk(ct_path, ss):
    img = sitk.ReadImage(str(ct_path))
    assert img.GetSize() == ss.CT_SHAPE
    np.testing.assert_allclose(img.GetSpacing(), ss.CT_SPACING, atol=1e-6)
    direction_lps = np.array(img.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction_lps, LPS_FROM_RAS @ ss.ct_direction_ras(), atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), LPS_FROM_RAS @ np.array(ss.CT_ORIGIN_RAS), atol=1e-4)
    # LPS-ish: in ITK's LPS world the voxel axes are close to +L, +P, +S (identity), but not equal.
    assert (np.diag(direction_lps) > 0.9).all()
    assert np.abs(direction_lps - np.eye(3)).max() > 0.15


def test_ct_intensities_and_structures(ct_path, ss):
    data = np.asanyarray(nib.load(ct_path).dataobj)
    assert data.dtype == np.int16
    np.testing.assert_array_equal(data, ss.ct_volume())
    assert data.min() == -1000
    labels = ss.ct_label_array()
    for value, hu, _offset, _semi in ss.CT_STRUCTURES.values():
        inside = data[labels == value]
        assert inside.size > 1000
        assert abs(inside.mean() - hu) < 2
    body = ss.ct_body_mask()
    assert (data[~body] == -1000).all()
    assert 0.2 < body.mean() < 0.8


def test_ct_structure_centres_map_to_world(ss):
    """The ground truth is defined in world mm: a structure's centroid in voxels maps back to its centre."""
    labels = ss.ct_label_array()
    for value, _hu, offset, _semi in ss.CT_STRUCTURES.values():
        centroid_ijk = np.argwhere(labels == value).mean(axis=0)
        centre_ras = nib.affines.apply_affine(ss.ct_affine(), centroid_ijk)
        np.testing.assert_allclose(centre_ras, ss.ct_center_ras() + np.array(offset), atol=0.5)


def test_mri_is_the_mni152_t1_template(mri_path, ss):
    img = nib.load(mri_path)
    assert img.shape == (197, 233, 189)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 1.0))
    src = nib.load(ss.mni152_path())
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(src.dataobj))
    itk_img = sitk.ReadImage(str(mri_path))
    assert itk_img.GetSize() == img.shape


def test_sample_studies_are_deterministic(tmp_path, ss):
    a = ss.write_sample_studies(tmp_path / "a")
    b = ss.write_sample_studies(tmp_path / "b")
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in a]
    assert digest == [hashlib.sha256(p.read_bytes()).hexdigest() for p in b]


def test_ct_dicom_series_reads_back_as_the_phantom(ss, tmp_path):
    """The DICOM series, sorted and read by SimpleITK's GDCM reader (as MONAI Label converts it):
    the same voxels in the same order, the oblique geometry, and wider than the 192 mm window."""
    study, series = ss.write_ct_dicom(tmp_path)
    assert (study, series) == ss.write_ct_dicom(tmp_path / "again")  # the same UIDs every time
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    assert image.GetSize() == ss.DICOM_CT.shape
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), ss.ct_volume(ss.DICOM_CT))
    affine = ss.ct_affine(ss.DICOM_CT)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), LPS_FROM_RAS @ ss.ct_direction_ras(), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), LPS_FROM_RAS @ affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), ss.DICOM_CT.spacing, atol=1e-6)
    np.testing.assert_allclose(ss.ct_center_ras(), nib.affines.apply_affine(affine, (np.array(ss.DICOM_CT.shape) - 1) / 2))
    assert min(np.array(ss.DICOM_CT.shape) * ss.DICOM_CT.spacing) > 192
