"""Simulated clicks and the clicks-to-Dice metrics of interactive segmentation.

The standard protocol (Xu et al. 2016, "Deep interactive object selection"; RITM; the SAM-Med3D
and FastSAM3D evaluations): the first click at the structure's interior point farthest from its
boundary; each next click at the farthest-from-boundary point (the centre) of the largest error
region, positive in a false negative, negative in a false positive. Distances are in mm (the
voxel spacing), and the image border counts as boundary. Metrics per structure: Dice after k
clicks, and NoC@t, the clicks needed to reach Dice t, counted as the cap when never reached.

`simulate` runs the clicks through a real click engine as a front end sends them: every request
carries the whole click history of one interaction (Slicer's foreground/background lists).
Training samples its clicks differently, at random in the error region (samlabel.click_training).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .errors import InputError
from .images import load_image
from .request import Click, ClickRequest

DICE_AFTER = (1, 3, 5)  # clicks after which Dice is reported
NOC_THRESHOLDS = (0.8, 0.9)
MAX_CLICKS = 20  # NoC's cap: a structure that never reaches the threshold counts this many
CLIENT = "click-simulation"


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing in mm along each array axis."""
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def central_point(region: np.ndarray, spacing: Sequence[float]) -> Tuple[int, ...]:
    """The voxel of `region` (bool, not empty) farthest from its boundary, in mm; the array's
    border counts as boundary. Ties: the first in C order."""
    box = ndimage.find_objects(region.astype(np.uint8))[0]
    distance = ndimage.distance_transform_edt(np.pad(region[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    inner = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return tuple(int(s.start + i) for s, i in zip(box, inner))


def first_click(truth: np.ndarray, spacing: Sequence[float]) -> Click:
    return central_point(truth, spacing), 1


def largest_region(mask: np.ndarray) -> Tuple[int, Optional[np.ndarray]]:
    """(voxels, mask) of the largest 26-connected component of `mask`; (0, None) when empty."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if not count:
        return 0, None
    sizes = np.bincount(components.ravel())[1:]
    biggest = int(np.argmax(sizes))
    return int(sizes[biggest]), components == biggest + 1


def next_click(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> Optional[Click]:
    """The click at the centre of the largest error region (a false negative on equal size), or
    None when the prediction is exact."""
    false_negative = largest_region(truth & ~prediction)
    false_positive = largest_region(prediction & ~truth)
    (size, region), label = (false_negative, 1) if false_negative[0] >= false_positive[0] else (false_positive, 0)
    return None if not size else (central_point(region, spacing), label)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & truth).sum()) / total


def clicks_to_reach(dice_per_click: Sequence[float], threshold: float, cap: int = MAX_CLICKS) -> int:
    """NoC@threshold: the first click count whose Dice reaches the threshold, else the cap."""
    return next((k for k, value in enumerate(dice_per_click[:cap], start=1) if value >= threshold), cap)


@dataclass
class ClickCurve:
    """One structure's simulated interaction: Dice after each click."""

    image: str
    structure: int  # its value in the label
    dice: List[float] = field(default_factory=list)
    clicks: List[Click] = field(default_factory=list)

    def dice_after(self, clicks: int) -> float:
        """Dice after `clicks` clicks; an interaction that stopped earlier (exact, or every threshold
        reached after DICE_AFTER's last count) keeps its last Dice."""
        return self.dice[min(clicks, len(self.dice)) - 1]

    def summary(self, cap: int = MAX_CLICKS) -> Dict:
        return {"image": self.image, "structure": self.structure, "clicks": len(self.clicks),
                **{f"dice@{k}": round(self.dice_after(k), 4) for k in DICE_AFTER},
                **{f"noc@{round(t * 100)}": clicks_to_reach(self.dice, t, cap) for t in NOC_THRESHOLDS}}


def simulate(engine, image_path: str, truth: np.ndarray, spacing: Sequence[float], structure: int = 1,
             max_clicks: int = MAX_CLICKS) -> ClickCurve:
    """Click on `truth` (bool, on the image's grid) through `engine` (a ClickEngine) until every
    NoC threshold is reached after at least DICE_AFTER's last count, the prediction is exact, or
    max_clicks; each request holds the interaction's whole click history."""
    curve = ClickCurve(image_path, structure)
    click: Optional[Click] = first_click(truth, spacing)
    while click is not None and len(curve.clicks) < max_clicks:
        curve.clicks.append(click)
        request = ClickRequest(foreground=tuple(p for p, label in curve.clicks if label == 1),
                               background=tuple(p for p, label in curve.clicks if label == 0),
                               client=CLIENT, label=str(structure), reset=len(curve.clicks) == 1)
        prediction = engine.segment(image_path, request).mask.astype(bool)
        curve.dice.append(dice(prediction, truth))
        if len(curve.dice) >= max(DICE_AFTER) and curve.dice[-1] >= max(NOC_THRESHOLDS):
            break
        click = next_click(prediction, truth, spacing)
    return curve


def label_structures(label_path: str, image_shape: Sequence[int]) -> Dict[int, np.ndarray]:
    """value -> bool mask of each structure (nonzero value) of a label map on the image's grid."""
    label = load_image(label_path).array
    if tuple(label.shape) != tuple(image_shape):
        raise InputError(f"{label_path}: shape {tuple(label.shape)}, its image {tuple(image_shape)}: "
                         "the label must lie on the image's grid")
    values = np.rint(label).astype(np.int64)
    return {int(v): values == v for v in np.unique(values) if v != 0}


def evaluate(engine, pairs: Sequence[Tuple[str, str]], max_clicks: int = MAX_CLICKS) -> Dict:
    """Clicks-to-Dice of every structure of every (image path, label path): per structure and the mean."""
    rows = []
    for image_path, label_path in pairs:
        image = engine.images.get(image_path)
        spacing = spacing_of(image.affine)
        for value, truth in label_structures(label_path, image.array.shape).items():
            rows.append(simulate(engine, image_path, truth, spacing, value, max_clicks).summary(max_clicks))
    if not rows:
        raise InputError("no labelled structures to evaluate")
    metrics = [key for key in rows[0] if key.startswith(("dice@", "noc@"))]
    return {"structures": rows, "mean": {key: round(float(np.mean([row[key] for row in rows])), 4) for key in metrics},
            "max_clicks": max_clicks}
