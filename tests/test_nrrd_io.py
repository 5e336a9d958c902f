"""The NRRD writer every click result goes through: geometry and voxels as SimpleITK (Slicer)
and pynrrd read them, compressed and raw."""

import gzip
import zlib

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from samlabel.nrrd_io import crc32_combine, gzip_parallel, write_nrrd

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


def test_zero_chunks_are_reused_and_the_stream_stays_valid():
    """A click's mask: zeros but for a block; zero chunks of both lengths (whole and the last, shorter)
    take cached bytes, and the CRC is combined from the chunks'."""
    data = np.zeros(1_000_003, dtype=np.uint8)
    data[300_000:420_000] = np.random.default_rng(2).integers(0, 2, 120_000)
    stream = gzip_parallel(memoryview(data), chunk_bytes=65_536)
    assert gzip.decompress(stream) == data.tobytes()
    assert gzip.decompress(gzip_parallel(memoryview(np.zeros(5, np.uint8)))) == bytes(5)
    assert gzip.decompress(gzip_parallel(memoryview(np.zeros(0, np.uint8)))) == b""


@pytest.mark.parametrize("lengths", [(0, 0), (0, 7), (7, 0), (1, 1), (3000, 65_536), (65_537, 11)])
def test_crc32_combine_is_the_crc_of_the_concatenation(lengths):
    rng = np.random.default_rng(sum(lengths))
    a, b = (rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_rejects_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="3D"):
        write_nrrd(str(tmp_path / "x.nrrd"), np.zeros((2, 2), np.uint8), np.eye(4))
