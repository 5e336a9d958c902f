"""MONAI Label app serving medical Segment-Anything models (FastSAM3D, SAM-Med3D-turbo, MedSAM, SAM-Med2D).

Start it with::

    monailabel start_server --app apps/fastsam3d --studies <folder or DICOMweb URL> [--conf models fastsam3d]

Conf keys (``--conf KEY VALUE``):
    models:                comma-separated model names, or "all" (default: every model whose checkpoint is present)
    <model>_checkpoint:    checkpoint path, instead of model/<official file name> (e.g. fastsam3d_checkpoint)
    device:                cpu or cuda (default: cuda when available)
    image_cache_mb:        memory for loaded images (default 2048)
    propagation_seconds:   time bound of the 2D models' 3D propagation tasks (default 60)
"""

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask

import samlabel
from samlabel.checkpoint import CheckpointError, find_checkpoint
from samlabel.engine import ClickSegmenter3D, ImageCache
from samlabel.registry import MODELS, get_spec
from samlabel.slices import SliceSegmenter
from samlabel.tasks.clicks import UNCERTAINTY_MAP_KEY, ClickSegmentation, UncertaintyBands

logger = logging.getLogger(__name__)


class FastSAM3DApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        self.model_dir = Path(app_dir) / "model"
        self.conf_values = conf
        requested = [m.strip() for m in conf.get("models", "").split(",") if m.strip()]
        self.explicit = requested and requested != ["all"]
        self.models: List[str] = requested if self.explicit else list(MODELS)
        for name in self.models:
            get_spec(name)  # unknown names stop the start-up with the list of known ones
        self.missing = {}  # model -> what to do about its checkpoint
        for name in self.models:
            spec = get_spec(name)
            path = find_checkpoint(spec, self.model_dir, conf)
            if not path.is_file():
                self.missing[name] = f"checkpoint not found: put {spec.checkpoint_file} at {path} (download: {spec.source})"
                logger.warning(f"{spec.title}: {self.missing[name]}")
        description = "Medical Segment-Anything models for interactive segmentation"
        if self.missing:
            description += ". Missing checkpoints: " + "; ".join(f"{n}: {m}" for n, m in self.missing.items())
        logger.info(f"FastSAM3D app: models requested = {requested or ['all']}")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="FastSAM3D",
                         description=description, version=samlabel.__version__)

    def init_infers(self) -> Dict[str, InferTask]:
        device = self.conf_values.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        images = ImageCache(max_bytes=float(self.conf_values.get("image_cache_mb", 2048)) * 2**20)
        infers = {}
        for name in self.models:
            if name in self.missing and not self.explicit:
                continue  # by default only models whose checkpoint is present; the log and /info/ say what is missing
            spec = get_spec(name)
            engine = ClickSegmenter3D if spec.dimension == 3 else SliceSegmenter
            segmenter = engine(spec, find_checkpoint(spec, self.model_dir, self.conf_values), images, device)
            infers[name] = ClickSegmentation(segmenter, self.missing.get(name, ""))
            # where the self-ensemble disagrees, as labelled bands
            infers[f"{name}_uncertainty"] = UncertaintyBands(segmenter, self.missing.get(name, ""))
            if spec.dimension == 2:  # the same model as a 3D task, propagating from the clicked slice
                seconds = float(self.conf_values.get("propagation_seconds", 60))
                infers[f"{name}_3d"] = ClickSegmentation(segmenter, self.missing.get(name, ""), propagate=True,
                                                         propagation_seconds=seconds)
            if name not in self.missing:  # load the weights now, not on the first click
                threading.Thread(target=preload, args=(segmenter,), daemon=True).start()
        logger.info(f"FastSAM3D app: serving {list(infers) or 'no models'} on {device} (threads: {os.cpu_count()})")
        threading.Thread(target=warm_up_writer, daemon=True).start()
        return infers

    def infer(self, request, datastore=None):
        """MONAI Label's own refusals (e.g. an unknown model) as HTTP errors with their message; an
        uncertainty task's float map is stored in the datastore next to the image."""
        try:
            result = super().infer(request, datastore)
        except MONAILabelException as error:
            status = 400 if error.error == MONAILabelError.INVALID_INPUT else 500
            raise HTTPException(status_code=status, detail=error.msg) from None
        float_map = (result.get("params") or {}).pop(UNCERTAINTY_MAP_KEY, None)
        if float_map:
            store = datastore or self.datastore()
            image = request.get("image")
            if isinstance(store, LocalDatastore) and image and not os.path.exists(image):  # a datastore id, not a session
                tag = request["model"]  # e.g. fastsam3d_uncertainty
                store.save_label(image, float_map, tag, {"model": request["model"], "kind": "ensemble std"})
                result["params"]["uncertainty_map"] = {"image": image, "tag": tag}
            os.remove(float_map)
        return result


def warm_up_writer():
    """ITK loads its image IO modules on first use (seconds): do it now, not on the first click."""
    from monailabel.transform.writer import write_itk

    with tempfile.TemporaryDirectory() as folder:
        for extension in (".nrrd", ".nii.gz"):
            write_itk(np.zeros((2, 2, 2), np.uint8), os.path.join(folder, "warm-up" + extension), np.eye(4), "uint8", False)


def preload(segmenter):
    try:
        segmenter.predictor() if isinstance(segmenter, ClickSegmenter3D) else segmenter.model()
    except CheckpointError as error:  # infer calls answer 503 with the same message
        logger.error(f"{segmenter.spec.title}: {error}")
