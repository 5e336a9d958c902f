"""MONAI Label infer task for the click models (type deepgrow; dimension 3, or 2 for slice models).

Requests as the stock plugins send them: `foreground` / `background` voxel indices of the
image as stored, plus (Slicer) `label`, `client_id`, `reset_state`, `result_extension`,
`result_dtype`, and for 2D models `slice` (the k of the clicks) and `roi`. OHIF sends no
`slice`: its clicks are already filtered to one slice. The mask comes back on the image's own
grid with its geometry (2D models: on that slice only).

Results asked for as .nrrd are written here, not by MONAI Label's ITK writer: gzip level 1
unless the client asks for no compression (OHIF sends result_compress=false and needs raw).
A mostly-empty 512x512x300 mask is then 0.4 MB instead of 79 MB to write, send and parse.

Interaction state is kept per (client_id, image, label). OHIF sends neither client_id nor
label, so its state is per image; a request whose clicks do not contain the previous clicks
(another segment, clicks removed) starts a new interaction, which separates OHIF's segments.
"""

import logging
import os
import tempfile

import nibabel as nib
import numpy as np


from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.utils.others.generic import file_ext, strtobool

from ..checkpoint import CheckpointError
from ..engine import InputError
from ..uncertainty import EnsembleConfig
from ..nrrd_io import write_nrrd

logger = logging.getLogger(__name__)
LABELS = ["segment"]  # OHIF offers a segment only for declared labels; Slicer sends its own segment name


class ClickSegmentation(BasicInferTask):
    def __init__(self, segmenter, missing_checkpoint_hint: str = "", propagate: bool = False,
                 propagation_seconds: float = 60.0):
        """propagate: a 2D model as a 3D task: the clicked slice, then its neighbours (SliceSegmenter.propagate)."""
        spec = segmenter.spec
        self.propagate, self.propagation_seconds = propagate, propagation_seconds
        if propagate:
            description = (f"{spec.title} in 3D: segments the slice of the last positive click, then propagates "
                           "slice by slice until the structure ends")
        elif spec.dimension == 3:
            description = f"{spec.title}: 3D segmentation from positive/negative clicks ({spec.input_size[0]}^3 window, {spec.spacing_mm} mm)"
        else:
            prompts = "a box (ROI) or clicks" if spec.prompt == "box" else "positive/negative clicks"
            description = f"{spec.title}: segmentation of the clicked slice from {prompts}"
        if missing_checkpoint_hint:
            description += f". UNAVAILABLE: {missing_checkpoint_hint}"
        config = {"reset_state": False}
        if not propagate:  # self-ensembling: the mean of N decoder runs; the JSON says where it is unsure
            config.update({"uncertainty": False, "ensemble_size": 8})
        super().__init__(path=None, network=None, type=InferType.DEEPGROW, labels=LABELS, dimension=3 if propagate else spec.dimension,
                         description=description, config=config)
        self.segmenter = segmenter
        self.missing_checkpoint_hint = missing_checkpoint_hint

    def is_valid(self) -> bool:
        return True  # listed in /info/ even without its checkpoint, whose absence the description states

    def pre_transforms(self, data=None):
        return []

    def post_transforms(self, data=None):
        return []

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        if not self.segmenter.checkpoint.is_file():
            raise HTTPException(status_code=503, detail=self.missing_checkpoint_hint or f"checkpoint {self.segmenter.checkpoint} is missing")
        if not data.get("image_path") or not os.path.exists(data["image_path"]):
            raise HTTPException(status_code=404, detail="image not found in the datastore or session")
        key = (data.get("client_id"), data.get("image_path"), data.get("label"))
        foreground, background, extra = data.get("foreground") or [], data.get("background") or [], {}
        if self.segmenter.spec.dimension == 2:
            slice_index = data.get("slice")
            extra = {"slice_index": None if slice_index in (None, "") else int(slice_index), "roi": data.get("roi")}
            if self.propagate and extra["slice_index"] is None and foreground:  # a 3D task: all clicks of the segment
                start = foreground[-1][2]
                foreground, background = ([p for p in points if p[2] == start] for points in (foreground, background))
        if self.propagate:
            extra["seconds"] = self.propagation_seconds
        elif strtobool(str(data.get("uncertainty", False))):
            extra["ensemble"] = ensemble_config(data)
        segment = self.segmenter.propagate if self.propagate else self.segmenter.segment
        try:
            result = segment(data["image_path"], foreground, background, key,
                             reset=strtobool(str(data.get("reset_state", False))), **extra)
        except InputError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        except CheckpointError as error:
            raise HTTPException(status_code=503, detail=str(error)) from None
        logger.info(f"{self.segmenter.spec.name}: {result.info}")
        if not self.propagate:  # for the uncertainty companion task
            slice_extra = {k: v for k, v in extra.items() if k in ("slice_index", "roi")}
            self.segmenter.latest[key[:2]] = (key, foreground, background, slice_extra)
        data["pred"] = result.mask
        data["pred_meta_dict"] = {"affine": result.affine}
        data["result"] = result.info
        return data

    def writer(self, data, extension=None, dtype=None):
        extension = extension or data.get("result_extension") or file_ext(data["image_path"])
        if extension != ".nrrd":
            return super().writer(data, extension, dtype)
        output = tempfile.NamedTemporaryFile(suffix=".nrrd", delete=False).name
        mask = data["pred"].astype(dtype or data.get("result_dtype") or "uint8", copy=False)
        write_nrrd(output, mask, data["pred_meta_dict"]["affine"], compress=strtobool(str(data.get("result_compress", True))))
        return output, data["result"]


def ensemble_config(data) -> EnsembleConfig:
    size = int(data.get("ensemble_size", 8))
    if not 1 <= size <= 256:
        raise HTTPException(status_code=400, detail=f"ensemble_size must be between 1 and 256, got {size}")
    return EnsembleConfig(size=size)


UNCERTAINTY_MAP_KEY = "uncertainty_map_file"  # the float std map, for the app to store next to the image
UNCERTAINTY_BANDS = {"uncertainty low": 1, "uncertainty medium": 2, "uncertainty high": 3}
BAND_EDGES = (0.1, 1 / 3, 2 / 3)  # fractions of the largest std: above each edge, the next band


class UncertaintyBands(ClickSegmentation):
    """Companion of a click task, shown by the stock front ends as a segmentation model: the
    self-ensemble's std for the user's current interaction on the image, as three labelled bands
    (Slicer makes a segment per label name; OHIF colours label values). The JSON carries the
    summary and the suggested next click. Nothing of the interaction changes."""

    def __init__(self, segmenter, missing_checkpoint_hint: str = ""):
        super().__init__(segmenter, missing_checkpoint_hint)
        self.type = InferType.SEGMENTATION
        self.labels = dict(UNCERTAINTY_BANDS)
        self.description = f"{segmenter.spec.title} uncertainty: where an ensemble of decoder runs disagrees (click first)"
        self._config = {**{k: v for k, v in self._config.items() if k != "uncertainty"}, "ensemble_size": 8}

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        if not self.segmenter.checkpoint.is_file():
            raise HTTPException(status_code=503, detail=self.missing_checkpoint_hint or "checkpoint missing")
        latest = self.segmenter.latest.get((data.get("client_id"), data.get("image_path")))
        if latest is None:
            raise HTTPException(status_code=400, detail=f"no clicks yet on this image: segment with {self.segmenter.spec.name} first")
        key, foreground, background, slice_extra = latest
        try:
            result = self.segmenter.segment(data["image_path"], foreground, background, key,
                                            ensemble=ensemble_config(data), persist=False, **slice_extra)
        except InputError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        peak = float(result.uncertainty.max())
        bands = np.zeros(result.uncertainty.shape, dtype=np.uint8, order="F")
        for value, edge in enumerate(BAND_EDGES, start=1):
            bands[result.uncertainty > edge * peak] = value
        float_map = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        nib.save(nib.Nifti1Image(result.uncertainty, result.affine), float_map)  # the app stores it in the datastore
        data["pred"] = bands
        data["pred_meta_dict"] = {"affine": result.affine}
        data["result"] = {**result.info, "band_edges_std": [edge * peak for edge in BAND_EDGES],
                          UNCERTAINTY_MAP_KEY: float_map}
        return data
