"""The MONAI Label task of the automatic models (SAM3D): type segmentation, named labels.

Slicer lists it in its auto-segmentation panel and OHIF in its Auto-Segmentation tab; both send
only the image (and the config keys a user changed). The label values are the model's upstream
class ids (/info/ maps names to them); classes without a name are left out.
"""

import logging
import os

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType

from ..request import boolean, result_options
from .base import SamInferTask

logger = logging.getLogger(__name__)


class AutoSegmentation(SamInferTask):
    def __init__(self, engine, missing_checkpoint_hint: str = ""):
        spec = engine.spec
        description = f"{spec.title}: automatic segmentation of {', '.join(spec.labels)}"
        if missing_checkpoint_hint:
            description += f". UNAVAILABLE: {missing_checkpoint_hint}"
        super().__init__(path=None, network=None, type=InferType.SEGMENTATION, labels=dict(spec.labels), dimension=3,
                         description=description, config={"mirroring": False})
        self.engine = engine

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        missing = self.engine.missing_message()  # asked each time: a training run may have written a decoder since
        if missing:
            raise HTTPException(status_code=503, detail=f"{self.engine.spec.title}: {missing}")
        if not data.get("image_path") or not os.path.exists(data["image_path"]):
            raise HTTPException(status_code=404, detail="image not found in the datastore or session")
        result_options(data)  # a bad result option is refused before any model work
        mirror = boolean(data, "mirroring", False)
        data.update(self.engine.segment(data["image_path"], mirror=mirror))
        logger.info(f"request {data['request_id']}: {self.engine.spec.name}: {data['result']}")
        return data

    def post_transforms(self, data=None):
        return []
