"""Geometry between the stored image, the model's window, and back.

The official 3D pipeline resamples the image to 1.5 mm, reorients it to RAS+ (TorchIO
ToCanonical: the closest permutation/flip of the image's own axes), crops 128^3 around the
target and z-normalises over voxels > 0. We build the same window directly: a 128^3 grid of
1.5 mm voxels along the image's own axes, permuted and flipped to RAS+, centred on the clicks,
and sample the stored array through the affines in one trilinear interpolation. Nothing else
of the volume is resampled or reoriented.

Affines map voxel indices of an array, in the array's axis order, to RAS millimetres.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Window:
    """A cubic grid of `size` voxels; affine: window voxel index -> RAS mm."""

    affine: np.ndarray
    size: int

    def key(self) -> bytes:
        return np.round(self.affine, 6).tobytes() + bytes([self.size % 256])

    def to_window(self, points_ras: np.ndarray) -> np.ndarray:
        return apply(np.linalg.inv(self.affine), points_ras)

    def contains(self, points_ras: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Which points lie inside the window, at least `margin` voxels from its faces."""
        u = self.to_window(points_ras)
        return np.all((u >= margin - 0.5) & (u <= self.size - 0.5 - margin), axis=-1)


def apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return points @ affine[:3, :3].T + affine[:3, 3]


def ras_axes(image_affine: np.ndarray) -> np.ndarray:
    """3x3 unit direction matrix whose columns are the image's own axes, permuted and flipped so
    that column r points closest to R, A, S (r = 0, 1, 2): TorchIO's ToCanonical ordering."""
    orientation = nib.orientations.io_orientation(image_affine)  # per image axis: (RAS axis, flip)
    directions = image_affine[:3, :3] / np.linalg.norm(image_affine[:3, :3], axis=0)
    axes = np.zeros((3, 3))
    for image_axis, (ras_axis, flip) in enumerate(orientation):
        axes[:, int(ras_axis)] = directions[:, image_axis] * flip
    return axes


def window_around(image_affine: np.ndarray, center_ras: np.ndarray, size: int = 128, spacing: float = 1.5) -> Window:
    """The model window of `size`^3 voxels of `spacing` mm, RAS+ ordered, centred on center_ras."""
    affine = np.eye(4)
    affine[:3, :3] = ras_axes(image_affine) * spacing
    affine[:3, 3] = np.asarray(center_ras, dtype=np.float64) - affine[:3, :3] @ np.full(3, (size - 1) / 2)
    return Window(affine, size)


def place_window(image_affine: np.ndarray, clicks_ras: np.ndarray, size: int = 128, spacing: float = 1.5,
                 anchor_ras: Optional[np.ndarray] = None) -> Window:
    """A window holding all clicks: centred on their bounding box in window axes. Where they span
    more than the window along an axis, that axis is centred on `anchor_ras` (the newest click)
    instead, so the newest click is always inside and the farthest clicks fall out."""
    axes = ras_axes(image_affine)
    along = np.asarray(clicks_ras, dtype=np.float64).reshape(-1, 3) @ axes  # mm along the window axes
    low, high = along.min(0), along.max(0)
    center = (low + high) / 2
    too_wide = high - low > (size - 1) * spacing - 1e-6
    if too_wide.any():
        anchor = np.asarray(anchor_ras if anchor_ras is not None else clicks_ras[-1], dtype=np.float64) @ axes
        center = np.where(too_wide, anchor, center)
    return window_around(image_affine, axes @ center, size, spacing)


def image_coordinates(window: Window, image_affine: np.ndarray) -> np.ndarray:
    """(size, size, size, 3) continuous image voxel indices of every window voxel."""
    to_image = np.linalg.inv(image_affine) @ window.affine
    n = window.size
    index = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64),) * 3, indexing="ij"), -1)
    return index @ to_image[:3, :3].T + to_image[:3, 3]


def sample_window(volume: np.ndarray, image_affine: np.ndarray, window: Window) -> torch.Tensor:
    """Trilinear samples of the stored array on the window grid, 0 outside the image: (size,)*3."""
    coords = image_coordinates(window, image_affine)
    low = np.clip(np.floor(coords.reshape(-1, 3).min(0)).astype(int), 0, np.array(volume.shape) - 1)
    high = np.clip(np.ceil(coords.reshape(-1, 3).max(0)).astype(int) + 1, 1, np.array(volume.shape))
    block = torch.from_numpy(np.ascontiguousarray(volume[low[0]:high[0], low[1]:high[1], low[2]:high[2]], dtype=np.float32))
    return _sample(block, coords - low, align_corners=True)[0, 0]


def _sample(block: torch.Tensor, coords: np.ndarray, align_corners: bool, padding_mode: str = "zeros") -> torch.Tensor:
    """grid_sample of a (D0, D1, D2) block at continuous indices coords (A, B, C, 3)."""
    shape = np.array(block.shape[-3:], dtype=np.float64)
    if align_corners:
        normalised = 2 * coords / np.maximum(shape - 1, 1) - 1
    else:
        normalised = (2 * coords + 1) / shape - 1
    grid = torch.from_numpy(normalised[..., ::-1].astype(np.float32).copy())[None]  # grid_sample wants (x=last axis, y, z)
    return F.grid_sample(block.reshape(1, 1, *block.shape[-3:]).float(), grid, mode="bilinear",
                         padding_mode=padding_mode, align_corners=align_corners)


def logits_to_image(logits: torch.Tensor, window: Window, image_shape: Tuple[int, int, int],
                    image_affine: np.ndarray) -> Tuple[np.ndarray, Tuple[slice, ...]]:
    """Low-res logits (…, L, L, L) of the window, trilinearly sampled at each image voxel the
    window covers (the official trilinear upsampling to the window, read at that point).
    Returns (logits on the covered block of the image, the block's slices); voxels of the block
    outside the window are -inf."""
    image_shape = np.array(image_shape)
    to_window = np.linalg.inv(window.affine) @ image_affine
    corners = np.stack(np.meshgrid(*([-0.5, window.size - 0.5],) * 3, indexing="ij"), -1).reshape(-1, 3)
    corners_image = apply(np.linalg.inv(image_affine) @ window.affine, corners)
    low = np.clip(np.floor(corners_image.min(0)).astype(int), 0, image_shape)
    high = np.clip(np.ceil(corners_image.max(0)).astype(int) + 1, 0, image_shape)
    block = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    if np.any(high <= low):
        return np.zeros(0), block
    index = np.stack(np.meshgrid(*(np.arange(a, b, dtype=np.float64) for a, b in zip(low, high)), indexing="ij"), -1)
    u = index @ to_window[:3, :3].T + to_window[:3, 3]  # window voxel coordinates
    inside = np.all((u >= -0.5) & (u <= window.size - 0.5), axis=-1)
    low_res = logits.reshape(logits.shape[-3:]).float()
    # Low-res cell coordinates as in trilinear upsampling with align_corners=False, which clamps
    # at the border cells (padding_mode="border").
    scaled = (u + 0.5) * (low_res.shape[0] / window.size) - 0.5
    values = _sample(low_res, scaled, align_corners=True, padding_mode="border")[0, 0].numpy()
    return np.where(inside, values, -np.inf), block
