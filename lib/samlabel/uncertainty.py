"""Self-ensembling (FastSAM-3DSlicer, Eq. 1-3): encode once, decode N times with prompts sampled
from the first mask M0; the mean of the N logit maps is the result, their per-voxel standard
deviation the uncertainty (transforms.EnsembleStatisticsd).

Sampling, per ensemble member: the user's own clicks (they stay authoritative), plus
`positives` points drawn uniformly from M0's interior (M0 eroded by one cell, or M0 itself when
erosion empties it) and `negatives` points from its surroundings (M0 dilated by `ring` cells,
minus M0). Points are low-res cell centres in the model frame. Interior and surroundings are
where the model is confident, so disagreement between members concentrates where the mask is
uncertain: near its boundary. A seeded generator makes the same request give the same answer.
"""

from dataclasses import dataclass
from typing import Tuple

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class EnsembleConfig:
    size: int = 8  # N decoder runs
    positives: int = 3  # points drawn from M0's interior per member
    negatives: int = 3  # points drawn from M0's surroundings per member
    ring: int = 2  # low-res cells around M0 that count as its surroundings
    seed: int = 0


def sample_prompt_sets(first_mask: np.ndarray, points: np.ndarray, labels: np.ndarray, cell: float,
                       config: EnsembleConfig, xy: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """N prompt sets: (N, P, D) float32 points in the model frame and (N, P) int64 labels.

    first_mask: M0 on the low-res grid (bool, D axes); points/labels: the user's prompts
    (P0, D) / (P0,) in the model frame; cell: model-frame pixels per low-res cell; xy: 2D points
    are (x, y) = (column, row) while the grid is (row, column)."""
    rng = np.random.default_rng(config.seed)
    interior = ndimage.binary_erosion(first_mask)
    interior = interior if interior.any() else first_mask
    surroundings = ndimage.binary_dilation(first_mask, iterations=config.ring) & ~first_mask
    pools = [(np.argwhere(interior), config.positives, 1), (np.argwhere(surroundings), config.negatives, 0)]
    all_points, all_labels = [], []
    for _ in range(config.size):
        member_points, member_labels = [np.asarray(points, dtype=np.float64)], [np.asarray(labels)]
        for pool, count, label in pools:
            if len(pool) and count:
                chosen = pool[rng.integers(0, len(pool), count)]
                chosen = chosen[:, ::-1] if xy else chosen
                member_points.append((chosen + 0.5) * cell - 0.5)  # cell centre in model pixels
                member_labels.append(np.full(count, label))
        all_points.append(np.concatenate(member_points))
        all_labels.append(np.concatenate(member_labels))
    return np.stack(all_points).astype(np.float32), np.stack(all_labels).astype(np.int64)


def ensemble_statistics(logits: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation over the members (axis 0): Eq. 2 and 3.
    The result mask is mean > 0 (Eq. 1: sigmoid(mean) > 0.5; a tie at 0 is background)."""
    return logits.mean(0, keepdims=True), logits.std(0, keepdims=True)


def jittered_boxes(box: np.ndarray, config: EnsembleConfig, shift: float = 20.0) -> np.ndarray:
    """N boxes for a box-prompted model (MedSAM): each side moved out by up to `shift` model
    pixels, as MedSAM's training jittered its boxes."""
    rng = np.random.default_rng(config.seed)
    grow = rng.uniform(0, shift, (config.size, 4)) * np.array([-1, -1, 1, 1])
    return (np.asarray(box, dtype=np.float64).reshape(1, 4) + grow).astype(np.float32)
