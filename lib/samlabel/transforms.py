"""Post-transforms of the click tasks, as MONAI dictionary transforms.

The engines leave the model's low-res logits in data["logits"] ((N, C, *grid): N ensemble
members, one for a plain click) and in data["geometry"] where they lie on the image. The chain

    EnsembleStatisticsd -> MaskOnImaged -> StdOnImaged [-> UncertaintyBandsd]

turns them into what the front ends get: the mask (and the std map, its bands) on the image's
own grid. EnsembleStatisticsd is the uncertainty post-transform: any task that leaves ensemble
logits under a key can use it.
"""

from typing import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .results import uncertainty_summary
from .uncertainty import ensemble_statistics

BAND_EDGES = (0.1, 1 / 3, 2 / 3)  # fractions of the largest std: above each edge, the next band


class EnsembleStatisticsd(MapTransform):
    """Self-ensembling statistics (Eq. 1-3): data[key], (N, C, *grid) member logits, becomes their
    mean (1, C, *grid) and data[f"{key}_std"] their population std; with one member the logits
    stay as they are and the std is None."""

    def __init__(self, keys: KeysCollection = "logits", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            members = np.asarray(d[key])
            d[f"{key}_std"] = None
            if len(members) > 1:
                d[key], d[f"{key}_std"] = ensemble_statistics(members)
        return d


class MaskOnImaged(MapTransform):
    """The mask on the image grid: data[key] (low-res logits) read through data[geometry_key] and
    thresholded as its model's official output is, into data[output_key]; its voxel count
    into the result."""

    def __init__(self, keys: KeysCollection = "logits", geometry_key: str = "geometry", output_key: str = "pred",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.geometry_key, self.output_key = geometry_key, output_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = d[self.geometry_key].mask(d[key])
            d.setdefault("result", {})["voxels"] = int(np.count_nonzero(d[self.output_key]))
        return d


class StdOnImaged(MapTransform):
    """The ensemble std (data[key], None without an ensemble) on the image grid as float32 under
    data[output_key], with its summary and the suggested next click in the result."""

    def __init__(self, keys: KeysCollection = "logits_std", geometry_key: str = "geometry",
                 output_key: str = "uncertainty", mask_key: str = "pred", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.geometry_key, self.output_key, self.mask_key = geometry_key, output_key, mask_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key] is None:
                d[self.output_key] = None
                continue
            d[self.output_key] = d[self.geometry_key].field(d[key])
            d.setdefault("result", {}).update(uncertainty_summary(d[self.output_key], d[self.mask_key]))
        return d


class UncertaintyBandsd(MapTransform):
    """The std map (data[key]) as labelled bands in data[output_key]: 1, 2, 3 above `edges` of its
    largest value (low, medium, high), for front ends that show one label volume."""

    def __init__(self, keys: KeysCollection = "uncertainty", output_key: str = "pred",
                 edges: Sequence[float] = BAND_EDGES, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.output_key, self.edges = output_key, tuple(edges)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            std = d[key]
            peak = float(std.max())
            bands = np.zeros(std.shape, dtype=np.uint8, order="F")
            for value, edge in enumerate(self.edges, start=1):
                bands[std > edge * peak] = value
            d[self.output_key] = bands
            d.setdefault("result", {})["band_edges_std"] = [edge * peak for edge in self.edges]
        return d


def click_post_transforms() -> list:
    """The click tasks' chain: ensemble statistics, the mask and the std map on the image grid."""
    return [EnsembleStatisticsd("logits"), MaskOnImaged("logits"), StdOnImaged("logits_std")]
