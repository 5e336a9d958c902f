"""Geometry between the stored image, the model's window, and back.

The official 3D pipeline (SAM-Med3D's utils/infer_utils.py) resamples the image to 1.5 mm with
TorchIO's Resample (SimpleITK linear interpolation), reorients it to RAS+ (ToCanonical: the
closest permutation/flip of the image's own axes), crops 128^3 around the target (CropOrPad with
mask_name) and z-normalises over voxels > 0. We build the same window directly: a 128^3 grid of
1.5 mm voxels along the image's own axes, permuted and flipped to RAS+, and sample the stored
array through the affines in one trilinear interpolation with SimpleITK's border and cast rules
(`sample_window`). Nothing else of the volume is resampled or reoriented. The window is centred
on the clicks (grid "clicks") or placed on the official 1.5 mm grid with CropOrPad's rounding
(grid "official", `place_window`), where our encoder input equals the official one.

Affines map voxel indices of an array, in the array's axis order, to RAS millimetres.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch


@dataclass(frozen=True)
class Window:
    """A cubic grid of `size` voxels; affine: window voxel index -> RAS mm."""

    affine: np.ndarray
    size: int

    def key(self) -> bytes:
        return (np.round(self.affine, 6) + 0.0).tobytes() + bytes([self.size % 256])  # + 0.0: no -0.0

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


WINDOW_GRIDS = ("clicks", "official")  # ModelSpec.window_grid: where place_window puts the window


def official_grid(image_affine: np.ndarray, spacing: float = 1.5) -> np.ndarray:
    """The 1.5 mm grid the official preprocessing puts the image on, as an affine (grid index in
    RAS+ axis order -> RAS mm; the index labels are arbitrary, only the lattice counts).

    TorchIO's Resample(spacing) up to 0.20.10 (the torchio of SAM-Med3D's inference code, see
    README "Faithful to the checkpoints") keeps the image's direction and its outer corner: the
    first output voxel's centre lies at continuous index 0.5 * (spacing / zoom - 1) of the image
    along each axis, so the outer faces of the first voxels coincide. ToCanonical then permutes and
    flips the axes to RAS+, which relabels the same lattice points."""
    zooms = np.linalg.norm(image_affine[:3, :3], axis=0)
    first = 0.5 * (spacing / zooms - 1)  # image continuous index of the resampled voxel 0
    affine = np.eye(4)
    affine[:3, :3] = ras_axes(image_affine) * spacing
    affine[:3, 3] = apply(image_affine, first)[0]
    return affine


def place_window(image_affine: np.ndarray, clicks_ras: np.ndarray, size: int = 128, spacing: float = 1.5,
                 anchor_ras: Optional[np.ndarray] = None, grid: str = "clicks") -> Window:
    """A window holding all clicks. Where they span more than the window along an axis, that
    axis is placed on `anchor_ras` (the newest click) instead, so the newest click is always
    inside and the farthest clicks fall out.

    grid "clicks": centred exactly on the clicks' bounding box in window axes.
    grid "official": on the official 1.5 mm grid (`official_grid`), placed as TorchIO's
    CropOrPad(mask_name=...) places its crop around a mask: the mask is the grid voxels holding
    the clicks (nearest voxel centre), its bounding box [lo, hi + 1) has centre c = (lo + hi + 1)/2,
    which moves down by half a voxel when c is not a whole index for an even size (or is one for
    an odd size), and the crop starts at c - size / 2. One click in voxel v: window voxels
    v - 64 ... v + 63 along +R, +A, +S (the click at window index 64)."""
    clicks_ras = np.asarray(clicks_ras, dtype=np.float64).reshape(-1, 3)
    anchor = np.asarray(anchor_ras if anchor_ras is not None else clicks_ras[-1], dtype=np.float64).reshape(3)
    if grid == "official":
        lattice = official_grid(image_affine, spacing)
        to_lattice = np.linalg.inv(lattice)
        voxels = np.floor(apply(to_lattice, clicks_ras) + 0.5)  # the grid voxel holding each click
        low, high = voxels.min(0), voxels.max(0)
        too_wide = high - low + 1 > size
        if too_wide.any():
            anchor_voxel = np.floor(apply(to_lattice, anchor)[0] + 0.5)
            low, high = np.where(too_wide, anchor_voxel, low), np.where(too_wide, anchor_voxel, high)
        centre = (low + high + 1) / 2
        on_index = centre % 1 == 0
        centre = np.where(on_index ^ (size % 2 == 0), centre - 0.5, centre)  # even size: a whole index
        begin = centre - size / 2
        affine = lattice.copy()
        affine[:3, 3] = apply(lattice, begin)[0]
        return Window(affine, size)
    if grid != "clicks":
        raise ValueError(f"window grid must be one of {', '.join(WINDOW_GRIDS)}, got {grid!r}")
    axes = ras_axes(image_affine)
    along = clicks_ras @ axes  # mm along the window axes
    low, high = along.min(0), along.max(0)
    center = (low + high) / 2
    too_wide = high - low > (size - 1) * spacing + 1e-6
    if too_wide.any():
        center = np.where(too_wide, anchor @ axes, center)
    return window_around(image_affine, axes @ center, size, spacing)


def sample_window(volume: np.ndarray, image_affine: np.ndarray, window: Window) -> torch.Tensor:
    """The stored array on the window grid, as SimpleITK's linear ResampleImageFilter (the official
    pipeline's resampling, through TorchIO) gives it: (size,)*3 float32.

    - Trilinear interpolation between voxel centres (integer indices).
    - Border: a point within half a voxel of the image (continuous index in [-0.5, n - 0.5) along
      every axis, ITK's IsInsideBuffer) takes the interpolation with the neighbours clamped to the
      image, i.e. the edge value across the outer half voxel; farther out it is 0 (ITK's default
      pixel value, and CropOrPad's zero padding).
    - Integer images: the interpolated value is cast back to the stored type as ITK does (clamped to
      the type's range, truncated toward zero), since the official pipeline resamples the image in
      its own pixel type before normalising; interpolation then runs in float64, as ITK's (and for
      float64 images; float32 otherwise).

    The window's axes are the image's own axes (permuted, flipped, rescaled), so trilinear
    interpolation is three 1-D interpolations, one along each axis."""
    integer = np.issubdtype(volume.dtype, np.integer)
    dtype = np.float64 if integer or volume.dtype == np.float64 else np.float32
    axes, scale, offset = _axis_map(window, image_affine)
    u = np.arange(window.size, dtype=np.float64)
    positions = [offset[r] + scale[r] * u for r in range(3)]  # image index along axes[r]
    low = [max(0, int(np.floor(min(p[0], p[-1])))) for p in positions]
    high = [min(volume.shape[a], int(np.ceil(max(p[0], p[-1]))) + 1) for a, p in zip(axes, positions)]
    if any(h <= l for l, h in zip(low, high)):
        return torch.zeros((window.size,) * 3)
    crop = [slice(0, 0)] * 3
    for r, a in enumerate(axes):
        crop[a] = slice(low[r], high[r])
    block = torch.from_numpy(np.ascontiguousarray(volume[tuple(crop)], dtype=dtype)).permute(*axes)
    for r, a in enumerate(axes):
        inside = (positions[r] >= -0.5) & (positions[r] < volume.shape[a] - 0.5)
        block = _interpolate_axis(block, r, positions[r] - low[r], border=True, valid=inside)
    if integer:
        info = np.iinfo(volume.dtype)
        block = torch.trunc(block.clamp(float(info.min), float(info.max)))
    return block.to(torch.float32).contiguous()


def logits_to_image(logits: np.ndarray, window: Window, image_shape: Tuple[int, int, int],
                    image_affine: np.ndarray, positive_only: bool = False) -> Tuple[np.ndarray, Tuple[slice, ...]]:
    """Low-res logits (…, L, L, L) of the window, trilinearly sampled at each image voxel the
    window covers: the official trilinear upsampling to the window (align_corners=False, which
    clamps at the border cells), read at that voxel. Returns (logits on the block of image voxels
    inside the window, the block's slices); the window's axes are the image's own, so the voxels
    inside it form one block.

    positive_only: cover only the part of the window where a logit can be > 0 (within one cell
    of a positive cell: trilinear interpolation of non-positive values is never positive)."""
    low_res = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32).reshape(logits.shape[-3:]))
    cells = low_res.shape[0] / window.size
    region = np.array([[-0.5] * 3, [window.size - 0.5] * 3])  # window voxel box
    if positive_only:
        positive = torch.nonzero(low_res > 0)
        if positive.numel() == 0:
            return np.zeros(0), (slice(0, 0),) * 3
        centre = lambda c: (c.numpy() + 0.5) / cells - 0.5  # noqa: E731 - cell index -> window voxel
        region = np.clip([centre(positive.min(0).values) - 1 / cells, centre(positive.max(0).values) + 1 / cells],
                         -0.5, window.size - 0.5)
    axes, scale, offset = _axis_map(window, image_affine)
    block, matrices = [slice(0, 0)] * 3, [None] * 3
    for r, a in enumerate(axes):
        ends = offset[r] + scale[r] * region[:, r]  # the region's extent in image indices
        first = max(0, int(np.ceil(min(ends) - 1e-9)))
        last = min(image_shape[a] - 1, int(np.floor(max(ends) + 1e-9)))
        u = (np.arange(first, last + 1, dtype=np.float64) - offset[r]) / scale[r]  # window coordinates
        inside = np.flatnonzero((u >= -0.5 - 1e-9) & (u <= window.size - 0.5 + 1e-9))  # one run: u is monotone
        if inside.size == 0:
            return np.zeros(0), (slice(0, 0),) * 3
        block[a] = slice(first + int(inside[0]), first + int(inside[-1]) + 1)
        matrices[r] = _interpolation_matrix(low_res.shape[r], (u[inside[0]:inside[-1] + 1] + 0.5) * cells - 0.5,
                                            border=True)
    # Three matrix products, the largest last, over contiguous memory (L^3 -> L^2 c -> L b c -> a b c), with the
    # window axes taken in the order of image axes 2, 1, 0: the result is then in the image's file (Fortran)
    # order, as the volumes it is written into.
    order = [axes.index(a) for a in (2, 1, 0)]
    first, middle, last = (matrices[r] for r in order)
    values = middle @ (low_res.permute(*order).contiguous() @ last.T)
    values = (first @ values.reshape(values.shape[0], -1)).reshape(len(first), *values.shape[1:])
    return values.numpy().transpose(2, 1, 0), tuple(block)


def _axis_map(window: Window, image_affine: np.ndarray):
    """Per window axis r: the image axis axes[r] and image index = offset[r] + scale[r] * u_r."""
    window_to_image = np.linalg.inv(image_affine) @ window.affine
    linear = window_to_image[:3, :3]
    axes = np.argmax(np.abs(linear), axis=0)
    scale = linear[axes, [0, 1, 2]]
    off_axis = np.abs(linear).sum(0) - np.abs(scale)
    if sorted(axes) != [0, 1, 2] or np.any(off_axis > 1e-6 * np.abs(scale)):
        raise ValueError("the window's axes must be the image's own axes (permuted, flipped, rescaled)")
    return [int(a) for a in axes], scale, window_to_image[axes, 3]


def _interpolate_axis(values: torch.Tensor, dim: int, positions: np.ndarray, border: bool,
                      valid: Optional[np.ndarray] = None) -> torch.Tensor:
    """Linear interpolation of `values` along `dim` at continuous indices `positions`; outside
    the axis: 0 (border=False) or the edge value (border=True), as grid_sample's padding modes.
    Positions where `valid` is False give 0. Runs in the dtype of `values`.

    Short axes (the 32 low-res cells) go through a matrix product with the interpolation
    matrix; long ones (image blocks) through gathers of the two neighbours."""
    n = values.shape[dim]
    if n <= 64:
        matrix = _interpolation_matrix(n, positions, border, valid, values.dtype)
        return (values.movedim(dim, -1) @ matrix.T).movedim(-1, dim)
    neighbours = _neighbours(n, positions, border, valid)
    shape = [1, 1, 1]
    shape[dim] = -1
    return sum(values.index_select(dim, torch.from_numpy(index)) * torch.from_numpy(weight).to(values.dtype).reshape(shape)
               for index, weight in neighbours)


def _neighbours(n: int, positions: np.ndarray, border: bool, valid: Optional[np.ndarray] = None):
    """Linear interpolation at `positions` along an axis of n samples, as _interpolate_axis
    defines it: [(lower indices, their weights), (upper indices, their weights)]."""
    x = np.clip(positions, 0, n - 1) if border else positions
    lower = np.floor(x).astype(np.int64)
    keep = np.ones(len(positions), bool) if valid is None else np.asarray(valid, bool)
    return [(np.clip(index, 0, n - 1), np.where((index >= 0) & (index < n) & keep, weight, 0.0))
            for index, weight in ((lower, 1 - (x - lower)), (lower + 1, x - lower))]


def _interpolation_matrix(n: int, positions: np.ndarray, border: bool, valid: Optional[np.ndarray] = None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(len(positions), n): row i holds the weights of the linear interpolation at positions[i]."""
    matrix = torch.zeros(len(positions), n, dtype=dtype)
    for index, weight in _neighbours(n, positions, border, valid):
        matrix.index_put_((torch.arange(len(positions)), torch.from_numpy(index)), torch.from_numpy(weight).to(dtype),
                          accumulate=True)
    return matrix


@dataclass(frozen=True)
class WindowGeometry:
    """Where a 3D model's low-res maps lie on the image: its window on the image's grid."""

    window: Window
    image_shape: Sequence[int]
    image_affine: np.ndarray

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """uint8 volume on the image grid: 1 where the mapped logits are > 0."""
        values, block = logits_to_image(logits, self.window, self.image_shape, self.image_affine, positive_only=True)
        mask = np.zeros(self.image_shape, dtype=np.uint8, order="F")  # file order of NRRD/NIfTI data
        if values.size:
            mask[block] = values > 0
        return mask

    def field(self, values: np.ndarray) -> np.ndarray:
        """float32 volume on the image grid: the map trilinearly read at each voxel, 0 outside the window."""
        mapped, block = logits_to_image(values, self.window, self.image_shape, self.image_affine)
        volume = np.zeros(self.image_shape, dtype=np.float32, order="F")
        volume[block] = mapped
        return volume
