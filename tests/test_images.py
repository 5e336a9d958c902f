"""The image reader (samlabel.images): NIfTI files are read with nibabel directly, faster than
MONAI's LoadImage, and must give exactly its voxels, dtype and affine, so that the voxel indices
the front ends send mean the same voxels. Every kind of header MONAI treats specially is here."""

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImage

from samlabel.images import load_image

OBLIQUE_LPS = np.array([[-0.78, 0.1, 0.05, 120.0], [-0.08, -0.79, 0.12, 95.0], [0.02, 0.3, 2.48, -60.0], [0, 0, 0, 1]])
rng = np.random.default_rng(7)


def nifti(path, data, affine=OBLIQUE_LPS, **header):
    image = nib.Nifti1Image(data, affine)
    for key, value in header.items():
        if key == "qform_only":
            image.set_sform(None, code=0)
            image.set_qform(affine, code=1)
        elif key == "slope":
            image.header.set_slope_inter(*value)
        elif key == "pixdim":
            image.header["pixdim"][1:4] = value  # zooms that do not match the affine: MONAI rewrites the header
    nib.save(image, str(path))
    return str(path)


CASES = {
    "int16_oblique_lps.nii.gz": lambda p: nifti(p, rng.integers(-1024, 3000, (31, 27, 9)).astype(np.int16)),
    "scaled_int16.nii.gz": lambda p: nifti(p, rng.integers(0, 4000, (20, 18, 7)).astype(np.int16), slope=(0.5, -1024.0)),
    "float32_uncompressed.nii": lambda p: nifti(p, rng.normal(0, 1, (17, 19, 5)).astype(np.float32)),
    "qform_only.nii.gz": lambda p: nifti(p, rng.integers(0, 255, (12, 14, 6)).astype(np.uint8), qform_only=True),
    "pixdim_mismatch.nii.gz": lambda p: nifti(p, rng.integers(0, 255, (12, 14, 6)).astype(np.int16), pixdim=(2.0, 3.0, 4.0)),
    "four_channels.nii.gz": lambda p: nifti(p, rng.normal(0, 1, (11, 13, 5, 4)).astype(np.float32)),
    "trailing_one.nii.gz": lambda p: nifti(p, rng.integers(0, 9, (11, 13, 5, 1)).astype(np.uint8)),
    "permuted_ras.nii.gz": lambda p: nifti(p, rng.integers(0, 9, (9, 10, 11)).astype(np.int16),
                                           affine=np.array([[0, 0, 1.5, 0], [2.0, 0, 0, 0], [0, 0.7, 0, 0], [0, 0, 0, 1.0]])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_nifti_read_is_monai_loadimage(tmp_path, name):
    path = CASES[name](tmp_path / name)
    ours = load_image(path)
    reference = LoadImage(image_only=True, dtype=None)(path)
    expected = np.asarray(reference)
    while expected.ndim > 3 and expected.shape[-1] == 1:  # load_image drops a trailing singleton, as before
        expected = expected[..., 0]
    assert ours.array.dtype == expected.dtype and ours.array.shape == expected.shape
    assert np.array_equal(ours.array, expected)
    assert np.array_equal(ours.affine, np.asarray(reference.affine, dtype=np.float64))


def test_unreadable_nifti_is_a_clear_input_error(tmp_path):
    from samlabel.errors import InputError

    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not a gzip stream")
    with pytest.raises(InputError, match="cannot read image broken.nii.gz"):
        load_image(str(tmp_path / "broken.nii.gz"))
