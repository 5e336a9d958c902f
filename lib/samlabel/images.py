"""Stored images: read once with MONAI's loader (as MONAI Label reads them, so voxel indices mean
what the front ends send) and cached while the file stays the same."""

import os
import threading
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .cache import LRUCache
from .errors import InputError


@dataclass(frozen=True)
class StoredImage:
    """An image as stored: array in file axis order, affine voxel index -> RAS mm."""

    key: Tuple  # identifies the file's content: changes when the file is rewritten or replaced
    array: np.ndarray
    affine: np.ndarray


def file_key(path: str) -> Tuple:
    """(path, size, mtime, ctime, inode): a replaced file (new inode) or one rewritten in place
    (new ctime, which no one can set back) gets a new key even with the same size and mtime."""
    stat = os.stat(path)
    return path, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


NIFTI = (".nii", ".nii.gz")
MAX_CHANNELS = 8  # co-registered sequences stored as one 4D image (i, j, k, channel), e.g. BraTS' 4


def load_image(path: str) -> StoredImage:
    """Read a 3D volume (NIfTI, NRRD, DICOM folder...), or a 4D one with its channels last, with MONAI's
    LoadImage. Raises InputError for what cannot be served (ImageCache.get checks the channels)."""
    from monai.transforms import LoadImage

    key = file_key(path)
    if os.path.isdir(path):  # a DICOM series folder: refuse unevenly spaced slices (answered 400)
        from .dicom import check_uniform_slices  # imported here: samlabel.dicom imports monailabel

        check_uniform_slices(path)
    try:
        if path.endswith(NIFTI) and os.path.isfile(path):
            array, affine = read_nifti(path)
        else:
            image = LoadImage(image_only=True, dtype=None)(path)
            array, affine = np.asarray(image.array), np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # noqa: BLE001 - readers raise many types; the client needs the message
        raise InputError(f"cannot read image {os.path.basename(path)}: {error}") from None
    while array.ndim > 3 and array.shape[-1] == 1:  # (X, Y, Z, 1) volumes
        array = array[..., 0]
    if not (array.ndim == 3 or array.ndim == 4 and array.shape[-1] <= MAX_CHANNELS):
        raise InputError(f"the models need a 3D volume; this image has shape {tuple(array.shape)}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError("the image contains NaN or infinite values")
    return StoredImage(key, array, affine)


def read_nifti(path: str):
    """(array, affine) of a NIfTI file exactly as MONAI's LoadImage gives them (its NibabelReader: the
    header corrected as MONAI corrects it, the scaled voxels, nibabel's affine), about 3x faster: the
    array stays in the file's (Fortran) order, where MONAI copies it into C order (1.3 of 2.1 s for a
    512 x 512 x 300 CT). tests/test_images.py compares the two on every kind of header."""
    import nibabel as nib
    from monai.data.utils import correct_nifti_header_if_necessary

    image = correct_nifti_header_if_necessary(nib.load(path, mmap=False))  # in memory, as MONAI's
    return np.asanyarray(image.dataobj), np.array(image.affine, dtype=np.float64)


class ImageCache:
    """Loaded images by file key (reloaded when the file changes); bounded in bytes."""

    def __init__(self, max_bytes: float = 2e9):
        self._cache = LRUCache(max_bytes, cost=lambda image: image.array.nbytes)
        self._lock = threading.Lock()

    def holds(self, path: str) -> bool:
        """Whether the image at path, as it is now, is loaded."""
        return file_key(path) in self._cache

    @property
    def bytes(self) -> float:
        return self._cache.total

    def get(self, path: str, channels: int = 1) -> StoredImage:
        """The image at path; InputError unless it is a 3D volume (channels 1) or a 4D one with that
        many channels last."""
        image = self._get(path)
        shape = tuple(image.array.shape)
        if channels == 1 and len(shape) != 3:
            raise InputError(f"the models need a 3D volume; this image has shape {shape}")
        if channels > 1 and (len(shape) != 4 or shape[-1] != channels):
            raise InputError(f"the model takes {channels} co-registered sequences as one 4D image (i, j, k, {channels}); "
                             f"this image has shape {shape}")
        return image

    def _get(self, path: str) -> StoredImage:
        key = file_key(path)
        image = self._cache.get(key)
        if image is None:
            with self._lock:  # one reader per image at a time
                image = self._cache.get(key)
                if image is None:
                    image = load_image(path)
                    self._cache.put(image.key, image)
        return image
