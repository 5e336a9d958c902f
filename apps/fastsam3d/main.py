"""MONAI Label app serving medical Segment-Anything models (FastSAM3D, SAM-Med3D-turbo, MedSAM, SAM-Med2D).

Start it with::

    monailabel start_server --app apps/fastsam3d --studies <folder or DICOMweb URL> [--conf models fastsam3d]

Conf keys (``--conf KEY VALUE``): samlabel.settings.OUR_KEYS; they are checked at start-up.
Each model is served by the TaskConfig of its registry family (samlabel/configs).
"""

import logging
import os
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Dict

import nibabel as nib
import numpy as np
import torch
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

import samlabel
from samlabel.configs import config_families
from samlabel.datastore import hardened_datastore
from samlabel.engine2d import SliceSegmenter
from samlabel.dicom import as_dicom_seg_store
from samlabel.errors import InputError
from samlabel.images import ImageCache
from samlabel.prefetch import Prefetcher
from samlabel.registry import get_spec
from samlabel.server_guards import install_guards
from samlabel.server_routes import install_routes
from samlabel.settings import AppSettings

logger = logging.getLogger(__name__)


class FastSAM3DApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        self.settings = AppSettings.from_conf(conf)
        logger.info(f"FastSAM3D app: models requested = {list(self.settings.models) if self.settings.explicit else ['all']}")
        families = config_families()
        images = ImageCache(max_bytes=self.settings.image_cache_bytes)
        self.configs = {}
        missing = {}
        for name in self.settings.models:
            config = families[get_spec(name).family]()
            config.init(name, str(Path(app_dir) / "model"), conf, None, settings=self.settings, images=images)
            if config.missing:
                missing[name] = config.missing
                logger.warning(f"{config.spec.title}: {config.missing}")
                if not self.settings.explicit:
                    continue  # by default only models whose checkpoint is present; the log and /info/ say what is missing
            self.configs[name] = config
        description = "Medical Segment-Anything models for interactive segmentation"
        if missing:
            description += ". Missing checkpoints: " + "; ".join(f"{n}: {m}" for n, m in missing.items())
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="FastSAM3D",
                         description=description, version=samlabel.__version__)
        # images read when opened (samlabel.server_routes), and the 2D models' likely slice encoded where cheap
        self.prefetcher = Prefetcher(images.get, [config.engine.prefetch_slice for config in self.configs.values()
                                                  if isinstance(config.engine, SliceSegmenter) and not config.missing])
        install_guards(self.settings.upload_mb)  # checked uploads, ids, tags and body sizes
        install_routes()  # blocking routes in worker threads, clients told apart, DICOMweb proxy keeps queries

    def init_datastore(self):
        """Validated ids and tags, atomic writes; on DICOMweb: evenly spaced series, DICOM SEG metadata."""
        return hardened_datastore(self.studies) or as_dicom_seg_store(super().init_datastore())

    def init_infers(self) -> Dict[str, InferTask]:
        infers = {}
        for config in self.configs.values():
            infers.update(config.infer())
            config.preload()
        logger.info(f"FastSAM3D app: serving {list(infers) or 'no models'} on {self.settings.device} "
                    f"({self.settings.dtype}, threads: {torch.get_num_threads()})")
        threading.Thread(target=warm_up_writer, daemon=True).start()
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {name: task for config in self.configs.values() for name, task in config.trainers().items()}

    def infer(self, request, datastore=None):
        """MONAI Label's own refusals (e.g. an unknown model) as HTTP errors with their message; a
        task's declared secondary outputs are stored in the datastore next to the image. A result
        saved with `save_label` goes under the task's configured label_tag unless the request names one."""
        request = {**request, "request_id": request.get("request_id") or uuid.uuid4().hex[:12]}
        task = self._infers.get(request.get("model"))
        if request.get("save_label") and "label_tag" not in request and task is not None:
            request["label_tag"] = task.config().get("label_tag", DefaultLabelTag.ORIGINAL.value)
        try:
            result = super().infer(request, datastore)
        except MONAILabelException as error:
            status = 400 if error.error == MONAILabelError.INVALID_INPUT else 500
            raise HTTPException(status_code=status, detail=error.msg) from None
        except InputError as error:  # the datastore refused to save the result (e.g. an empty DICOM SEG)
            raise HTTPException(status_code=400, detail=f"the result was not saved: {error}") from None
        outputs = task.take_secondary(request["request_id"]) if hasattr(task, "take_secondary") else {}
        image = request.get("image")
        store = datastore or self.datastore()
        for key, (array, affine) in outputs.items():
            # a datastore id, not a session's or an uploaded file
            if isinstance(store, LocalDatastore) and isinstance(image, str) and image and not os.path.exists(image):
                tag = request["model"]  # e.g. fastsam3d_uncertainty
                save_map(store, image, tag, array, affine, {"model": request["model"], "kind": task.secondary_outputs[key]})
                result.setdefault("params", {})[f"{key}_map"] = {"image": image, "tag": tag}
        return result

    def check_train_request(self, model: str, params: dict) -> None:
        """The train task's checks of a request, before MONAI Label starts its process (InputError: 400)."""
        task = self._trainers.get(model)
        if hasattr(task, "check"):
            task.check({**task.config(), **params}, self.datastore())

    def batch_infer(self, request, datastore=None):
        """MONAI Label's, with two fixes: an image the task refuses (a 2D one, say) is logged and
        skipped instead of ending the whole run (MONAI Label stops there when it runs one worker),
        and it works without CUDA (its default multi_gpu divides by the number of CUDA devices)."""
        if not torch.cuda.is_available():
            request = {**request, "multi_gpu": False}

        def infer_one(one, store):
            try:
                return self.infer(one, store)
            except HTTPException as error:
                logger.warning(f"batch inference: image {one.get('image')} skipped: {error.detail}")
                return {}

        return self._batch_infer(request, datastore or self.datastore(), infer_one)


def save_map(store: LocalDatastore, image: str, tag: str, array: np.ndarray, affine: np.ndarray, info: dict) -> None:
    handle, path = tempfile.mkstemp(suffix=".nii.gz")
    os.close(handle)
    try:
        nib.save(nib.Nifti1Image(array, affine), path)
        store.save_label(image, path, tag, info)
    finally:
        os.remove(path)


def warm_up_writer():
    """ITK loads its image IO modules on first use (seconds): do it now, not on the first click."""
    from monailabel.transform.writer import write_itk

    with tempfile.TemporaryDirectory() as folder:
        for extension in (".nrrd", ".nii.gz"):
            write_itk(np.zeros((2, 2, 2), np.uint8), os.path.join(folder, "warm-up" + extension), np.eye(4), "uint8", False)
