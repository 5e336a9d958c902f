"""The NRRD writer every click result goes through: geometry and voxels as SimpleITK (Slicer)
and pynrrd read them, compressed and raw."""

import gzip

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from samlabel.nrrd_io import gzip_parallel, write_nrrd

OBLIQUE_LPS_STORED = np.array([  # voxel -> RAS: anisotropic, oblique, x and y flipped
    [-0.78, 0.12, 0.30, 41.5],
    [-0.10, -0.79, 0.22, -17.25],
    [0.05, 0.07, 2.48, -90.0],
    [0, 0, 0, 1],
])


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
def test_nrrd_round_trip(tmp_path, compress, dtype):
    rng = np.random.default_rng(0)
    array = (rng.random((37, 41, 23)) * 100).astype(dtype)
    path = str(tmp_path / "label.nrrd")
    write_nrrd(path, array, OBLIQUE_LPS_STORED, compress)
    data, header = nrrd.read(path)
    assert np.array_equal(data, array) and header["encoding"] == ("gzip" if compress else "raw")
    image = sitk.ReadImage(path)
    assert np.array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), array)
    directions = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps = np.diag([-1, -1, 1]) @ OBLIQUE_LPS_STORED[:3]
    assert np.allclose(directions, lps[:, :3], atol=1e-9) and np.allclose(image.GetOrigin(), lps[:, 3])


def test_parallel_gzip_is_one_ordinary_gzip_stream():
    data = np.random.default_rng(1).integers(0, 3, 1_000_003, dtype=np.uint8)
    stream = gzip_parallel(memoryview(data), chunk_bytes=65_536)  # 16 chunks
    assert gzip.decompress(stream) == data.tobytes()
    assert stream[:2] == b"\x1f\x8b" and stream.count(b"\x1f\x8b\x08") >= 1


def test_rejects_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="3D"):
        write_nrrd(str(tmp_path / "x.nrrd"), np.zeros((2, 2), np.uint8), np.eye(4))
