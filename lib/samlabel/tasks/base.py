"""The base of every task this app serves: one error boundary and the fast result writer.

Failures map to HTTP answers in one place: a bad request (InputError) 400, a missing or wrong
checkpoint (CheckpointError) 503, anything else 500 with a message naming the request, whose
traceback goes to the log under the same id. Secondary outputs (maps a task makes besides its
label, such as the uncertainty float map) are declared by the task and handed to the app per
request id, which stores them.
"""

import logging
import os
import tempfile
import threading
import uuid
from typing import Dict, Tuple

import numpy as np
from fastapi import HTTPException
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.utils.others.generic import file_ext

from ..checkpoint import CheckpointError
from ..errors import InputError
from ..nrrd_io import write_nrrd
from ..request import result_options

logger = logging.getLogger(__name__)


def request_id(request: dict) -> str:
    """The id that names a request in errors and the log (the app sets one per request)."""
    return str(request.get("request_id") or uuid.uuid4().hex[:12])


class SamInferTask(BasicInferTask):
    secondary_outputs: Dict[str, str] = {}  # data key -> what it is, for the app to store next to the image

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._secondary: Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]] = {}
        self._secondary_lock = threading.Lock()

    def __call__(self, request, callbacks=None):
        rid = request.setdefault("request_id", request_id(request))
        try:
            return super().__call__(request, callbacks)
        except HTTPException:
            raise
        except InputError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        except CheckpointError as error:
            raise HTTPException(status_code=503, detail=str(error)) from None
        except Exception as error:  # noqa: BLE001 - the boundary: logged with its traceback, answered with its id
            logger.exception(f"request {rid} ({self.description}) failed")
            raise HTTPException(status_code=500, detail=f"internal error in request {rid}: {type(error).__name__}: {error}") from None

    def pre_transforms(self, data=None):
        return []

    def is_valid(self) -> bool:
        return True  # listed in /info/ even without its checkpoint, whose absence the description states

    def writer(self, data, extension=None, dtype=None):
        """NRRD results written here (gzip level 1 in parallel, or raw when the client asks: OHIF
        sends result_compress=false); other extensions by MONAI Label's writer."""
        requested_extension, requested_dtype, compress = result_options(data)
        extension = extension or requested_extension or file_ext(data["image_path"])
        data["pred_meta_dict"] = {"affine": data["affine"]}
        if extension == ".nrrd":
            handle, output = tempfile.mkstemp(suffix=".nrrd")
            os.close(handle)
            try:
                write_nrrd(output, data["pred"].astype(dtype or requested_dtype or "uint8", copy=False), data["affine"], compress)
            except BaseException:
                os.remove(output)
                raise
            written = output, data["result"]
        else:
            written = super().writer(data, extension, dtype or requested_dtype)
        self.keep_secondary(data)
        return written

    def keep_secondary(self, data) -> None:
        outputs = {key: (data[key], data["affine"]) for key in self.secondary_outputs if data.get(key) is not None}
        if outputs:
            with self._secondary_lock:
                self._secondary[data["request_id"]] = outputs

    def take_secondary(self, rid: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
        """The secondary outputs of request `rid` (data key -> (array, affine)), handed over once."""
        with self._secondary_lock:
            return self._secondary.pop(rid, {})
