"""What one click gives back: the mask on the image grid, its geometry and the result's summary."""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
from scipy import ndimage


@dataclass
class ClickResult:
    mask: np.ndarray  # uint8 on the image's own grid
    affine: np.ndarray  # the image's: voxel index -> RAS mm
    info: Dict = field(default_factory=dict)  # the JSON result
    uncertainty: Optional[np.ndarray] = None  # float32 ensemble std on the image's grid, when asked for
    geometry: object = None  # where the model's maps lie (geometry.WindowGeometry, engine2d.SliceGeometry)

    @classmethod
    def from_data(cls, data: dict) -> "ClickResult":
        """From a click's data after the post-transforms (transforms.click_post_transforms)."""
        return cls(data["pred"], data["affine"], data["result"], data.get("uncertainty"), data["geometry"])


def uncertainty_summary(uncertainty: np.ndarray, mask: np.ndarray) -> Dict:
    """Summary numbers and a suggested next click: the most uncertain voxel within one voxel of the
    mask's boundary (or anywhere, for an empty mask). The boundary and its band lie within the
    mask's bounding box grown by one voxel: the morphology runs there, not on the whole image."""
    box = bounding_box(mask, margin=1)
    if box is None:
        suggestion = np.unravel_index(int(np.argmax(uncertainty)), uncertainty.shape)
        boundary_mean = 0.0
    else:
        inside, local = np.asarray(mask[box]) != 0, uncertainty[box]
        boundary = inside ^ ndimage.binary_erosion(inside)
        candidates = np.where(ndimage.binary_dilation(boundary), local, -1.0)
        corner = np.unravel_index(int(np.argmax(candidates)), candidates.shape)
        suggestion = tuple(s.start + c for s, c in zip(box, corner))
        boundary_mean = float(local[boundary].mean())
    return {
        "uncertainty_max": float(uncertainty.max()),
        "uncertainty_mean_on_boundary": boundary_mean,
        "suggested_click": [int(c) for c in suggestion],
        "suggested_click_uncertainty": float(uncertainty[tuple(suggestion)]),
    }


def bounding_box(mask: np.ndarray, margin: int) -> Optional[Tuple[slice, ...]]:
    """The slices of the mask's nonzero voxels grown by `margin` within the array; None if it has none.
    (One reduction per axis: scipy's find_objects takes 40x longer on a 512 x 512 x 300 mask.)"""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(0, int(hit[0]) - margin), min(mask.shape[axis], int(hit[-1]) + margin + 1)))
    return tuple(box)
