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


def sample_window(volume: np.ndarray, image_affine: np.ndarray, window: Window) -> torch.Tensor:
    """Trilinear samples of the stored array on the window grid, 0 outside the image: (size,)*3."""
    window_to_image = np.linalg.inv(image_affine) @ window.affine
    corners = apply(window_to_image, _corners(window.size, 0))
    shape = np.array(volume.shape)
    low = np.clip(np.floor(corners.min(0)).astype(int), 0, shape - 1)
    high = np.clip(np.ceil(corners.max(0)).astype(int) + 1, 1, shape)
    block = volume[low[0]:high[0], low[1]:high[1], low[2]:high[2]]  # only what the window sees
    block = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    shift = np.eye(4)
    shift[:3, 3] = -low
    return _resample(block, (window.size,) * 3, shift @ window_to_image, "zeros")


def logits_to_image(logits: torch.Tensor, window: Window, image_shape: Tuple[int, int, int],
                    image_affine: np.ndarray, positive_only: bool = False) -> Tuple[np.ndarray, Tuple[slice, ...]]:
    """Low-res logits (…, L, L, L) of the window, trilinearly sampled at each image voxel the
    window covers: the official trilinear upsampling to the window (align_corners=False, which
    clamps at the border cells), read at that voxel. Returns (logits on the covered block of
    the image, the block's slices); voxels of the block outside the window are -inf.

    positive_only: cover only the part of the window where a logit can be > 0 (within one cell
    of a positive cell: trilinear interpolation of non-positive values is never positive)."""
    image_shape = np.array(image_shape)
    low_res = logits.reshape(logits.shape[-3:]).float()
    cells = low_res.shape[0] / window.size
    region = np.array([[-0.5] * 3, [window.size - 0.5] * 3])  # window voxel box
    if positive_only:
        positive = torch.nonzero(low_res > 0)
        if positive.numel() == 0:
            return np.zeros(0), (slice(0, 0),) * 3
        centre = lambda c: (c.numpy() + 0.5) / cells - 0.5  # noqa: E731 - cell index -> window voxel
        reach = 1 / cells  # one cell, in window voxels
        region = np.clip([centre(positive.min(0).values) - reach, centre(positive.max(0).values) + reach], -0.5, window.size - 0.5)
    box = np.stack(np.meshgrid(*region.T, indexing="ij"), -1).reshape(-1, 3)
    corners = apply(np.linalg.inv(image_affine) @ window.affine, box)
    low = np.clip(np.floor(corners.min(0)).astype(int), 0, image_shape)
    high = np.clip(np.ceil(corners.max(0)).astype(int) + 1, 0, image_shape)
    block = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    if np.any(high <= low):
        return np.zeros(0), block
    # image block index -> image index -> window index u -> low-res cell (u + 0.5) * cells - 0.5
    to_cells = np.diag([cells, cells, cells, 1.0])
    to_cells[:3, 3] = 0.5 * cells - 0.5
    shift = np.eye(4)
    shift[:3, 3] = low
    block_to_cells = to_cells @ np.linalg.inv(window.affine) @ image_affine @ shift
    values, grid = _resample(low_res, tuple(high - low), block_to_cells, "border", return_grid=True)
    half_cell = 0.5 / (low_res.shape[0] - 1)  # the window reaches half a cell beyond the outer cell centres
    inside = (grid.abs() <= 1 + 2 * half_cell + 1e-6).all(-1)[0].numpy()
    return np.where(inside, values.numpy(), -np.inf), block


def _corners(size: int, overhang: float) -> np.ndarray:
    ends = [-overhang, size - 1 + overhang]
    return np.stack(np.meshgrid(ends, ends, ends, indexing="ij"), -1).reshape(-1, 3)


def _resample(block: torch.Tensor, out_shape, out_to_block: np.ndarray, padding_mode: str, return_grid: bool = False):
    """Trilinear resampling of `block` (D0, D1, D2) on an out_shape grid, where out_to_block
    (4x4) maps output voxel indices to block voxel indices (both in array axis order)."""
    out_n = np.maximum(np.array(out_shape, dtype=np.float64) - 1, 1)
    in_n = np.maximum(np.array(block.shape, dtype=np.float64) - 1, 1)
    from_normalised = np.diag([*(out_n / 2), 1.0])  # align_corners=True: x = 2 i / (n - 1) - 1
    from_normalised[:3, 3] = out_n / 2
    to_normalised = np.diag([*(2 / in_n), 1.0])
    to_normalised[:3, 3] = -1
    theta = to_normalised @ out_to_block @ from_normalised
    reverse = np.eye(4)[[2, 1, 0, 3]]  # affine_grid and grid_sample order coordinates (x=last axis, y, z)
    theta = torch.from_numpy((reverse @ theta @ reverse)[:3]).float()[None]
    grid = F.affine_grid(theta, [1, 1, *out_shape], align_corners=True)
    values = F.grid_sample(block[None, None].float(), grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)[0, 0]
    return (values, grid) if return_grid else values
