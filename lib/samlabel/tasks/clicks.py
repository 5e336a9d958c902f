"""MONAI Label infer tasks for the click models (type deepgrow; dimension 3, or 2 for slice models).

Requests as the stock plugins send them: `foreground` / `background` voxel indices of the
image as stored, plus (Slicer) `label`, `client_id`, `reset_state`, `result_extension`,
`result_dtype`, and for 2D models `slice` (the k of the clicks) and `roi`. OHIF sends no
`slice`: its clicks are already filtered to one slice. All of them are checked in one place
(samlabel.request). The engine leaves the model's logits; the post-transforms put the mask (and
the ensemble's std) on the image's own grid; the interaction advances only once the result is
written.

Interaction state is kept per (client_id, image, label). OHIF sends neither client_id nor
label, so its state is per image; a request whose clicks do not contain the previous clicks
(another segment, clicks removed) starts a new interaction, which separates OHIF's segments.
"""

import logging
import os
from dataclasses import replace

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType

from ..request import MAX_ENSEMBLE, integer, parse_click_request, result_options
from ..transforms import UncertaintyBandsd
from .base import SamInferTask

logger = logging.getLogger(__name__)
# OHIF offers a segment only for declared labels (Slicer sends its own segment name). Both stock
# front ends colour a label by its name: from Slicer's GenericAnatomyColors table when the name is
# in it (OHIF then falls back to a hash of the name), and OHIF numbers its segments by the sorted
# names of all models' labels. "region 1" is the table's generic entry, drawn cyan (0, 226, 255) in
# both; the band names sort in the order of their meaning and hash to distinct bright colours in
# OHIF: green, cyan, red-orange.
LABELS = ["region 1"]
UNCERTAINTY_BANDS = {"uncertainty band 1: minor": 1, "uncertainty band 2: intermediate": 2, "uncertainty band 3: highest": 3}
# save_label: MONAI Label's infer option that stores the result as a label of the image, the stock
# OHIF panel's only way to save (its Options dialog shows a task's config, this as a checkbox);
# label_tag: the tag it is saved under when the request names none (final: on DICOMweb, a DICOM SEG).
SAVE_CONFIG = {"save_label": False, "label_tag": "final"}


class EngineTask(SamInferTask):
    """A task served by a click engine (engine.ClickEngine)."""

    def __init__(self, engine, description: str, missing_checkpoint_hint: str = "", **kwargs):
        if missing_checkpoint_hint:
            description += f". UNAVAILABLE: {missing_checkpoint_hint}"
        super().__init__(path=None, network=None, description=description, **kwargs)
        self.engine = engine
        self.missing_checkpoint_hint = missing_checkpoint_hint

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        if self.missing_checkpoint_hint and not self.engine.checkpoint.is_file():
            raise HTTPException(status_code=503, detail=self.missing_checkpoint_hint)
        if not data.get("image_path") or not os.path.exists(data["image_path"]):
            raise HTTPException(status_code=404, detail="image not found in the datastore or session")
        result_options(data)  # a bad result option is refused before any model work
        data.update(self.run_engine(data["image_path"], data))
        logger.info(f"request {data['request_id']}: {self.engine.spec.name}: {data['result']}")
        return data

    def run_engine(self, image_path: str, data: dict) -> dict:
        raise NotImplementedError

    def post_transforms(self, data=None):
        return self.engine.post_transforms()


class ClickSegmentation(EngineTask):
    """Clicks -> the mask; with `uncertainty`, the mean of a self-ensemble and its std in the JSON."""

    def __init__(self, engine, missing_checkpoint_hint: str = ""):
        spec = engine.spec
        if engine.dimension == 3:
            description = f"{spec.title}: 3D segmentation from positive/negative clicks ({spec.input_size[0]}^3 window, {spec.spacing_mm} mm)"
        else:
            prompts = "a box (ROI) or clicks" if spec.prompt.takes_box else "positive/negative clicks"
            description = f"{spec.title}: segmentation of the clicked slice from {prompts}"
        super().__init__(engine, description, missing_checkpoint_hint, type=InferType.DEEPGROW, labels=LABELS,
                         dimension=engine.dimension, config={"reset_state": False, "uncertainty": False, "ensemble_size": 8, **SAVE_CONFIG})

    def run_engine(self, image_path: str, data: dict) -> dict:
        return self.engine.predict(image_path, parse_click_request(data))

    def writer(self, data, extension=None, dtype=None):
        written = super().writer(data, extension, dtype)
        self.engine.commit(data)  # the interaction advances only with a written result
        return written


class Propagation(EngineTask):
    """A 2D model as a 3D task: the slice of the last positive click, then its neighbours."""

    def __init__(self, engine, missing_checkpoint_hint: str = "", seconds: float = 60.0):
        description = (f"{engine.spec.title} in 3D: segments the slice of the last positive click, then propagates "
                       "slice by slice until the structure ends")
        super().__init__(engine, description, missing_checkpoint_hint, type=InferType.DEEPGROW, labels=LABELS,
                         dimension=3, config={"reset_state": False, **SAVE_CONFIG})
        self.seconds = seconds

    def run_engine(self, image_path: str, data: dict) -> dict:
        request = parse_click_request(data)
        if request.slice_index is None and request.foreground:  # all clicks of the segment: the last one's slice
            start = round(request.foreground[-1][2])
            request = replace(request, foreground=tuple(p for p in request.foreground if round(p[2]) == start),
                              background=tuple(p for p in request.background if round(p[2]) == start))
        return self.engine.propagate(image_path, request, self.seconds)


class UncertaintyBands(EngineTask):
    """Companion of a click task, shown by the stock front ends as a segmentation model: the
    self-ensemble's std for the user's current interaction on the image, as three labelled bands
    (Slicer makes a segment per label name; OHIF colours label values). The JSON carries the
    summary and the suggested next click; the float std map is a secondary output that the app
    stores next to the image. Nothing of the interaction changes."""

    secondary_outputs = {"uncertainty": "ensemble std"}

    def __init__(self, engine, missing_checkpoint_hint: str = ""):
        super().__init__(engine, f"{engine.spec.title} uncertainty: where an ensemble of decoder runs disagrees (click first)",
                         missing_checkpoint_hint, type=InferType.SEGMENTATION, labels=dict(UNCERTAINTY_BANDS),
                         dimension=engine.dimension, config={"ensemble_size": 8})

    def run_engine(self, image_path: str, data: dict) -> dict:
        latest = self.engine.latest_request(parse_click_request(data).client, image_path)
        if latest is None:
            raise HTTPException(status_code=400, detail=f"no clicks yet on this image: segment with {self.engine.spec.name} first")
        size = integer(data, "ensemble_size", 8, 1, MAX_ENSEMBLE)
        return self.engine.predict(image_path, replace(latest, ensemble_size=size, reset=False))

    def post_transforms(self, data=None):
        return self.engine.post_transforms() + [UncertaintyBandsd("uncertainty")]
