"""What one click gives back: the mask on the image grid, its geometry and the result's summary."""

from dataclasses import dataclass, field
from typing import Dict, Optional

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
    mask's boundary (or anywhere, for an empty mask)."""
    boundary = mask.astype(bool) ^ ndimage.binary_erosion(mask.astype(bool))
    band = ndimage.binary_dilation(boundary) if boundary.any() else np.ones_like(boundary)
    candidates = np.where(band, uncertainty, -1.0)
    suggestion = np.unravel_index(int(np.argmax(candidates)), uncertainty.shape)
    return {
        "uncertainty_max": float(uncertainty.max()),
        "uncertainty_mean_on_boundary": float(uncertainty[boundary].mean()) if boundary.any() else 0.0,
        "suggested_click": [int(c) for c in suggestion],
        "suggested_click_uncertainty": float(uncertainty[suggestion]),
    }
