"""Guards on MONAI Label 0.8.5's upload and infer endpoints, installed by the app (``install_guards``).

MONAI Label takes any existing path as an image (``/infer/m?image=/etc/passwd``), unpacks
``/session/?uncompress=true`` archives with ``shutil.unpack_archive`` (tar members with ``../``
land anywhere), accepts bodies of any size, and removes its temporary copies of uploads only
after a successful answer.

Its route handlers (``api_run_inference``, ``api_save_label``...) parse the request, then call
module-level functions (``run_inference``, ``save_label``, ``add_image``, ``create_session``) by
their global name. ``install_guards`` replaces those four names with checked versions, so the
checks hold whichever route object serves the path (MONAI Label's own, or a copy of it placed in
front by the app). The size limit wraps the FastAPI router's middleware stack: the app is built
inside uvicorn's lifespan, after ``FastAPI.add_middleware`` stops being allowed, but the router
looks its stack up on every request, and there the 413 still gets the CORS headers.
"""

import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Dict

from fastapi import HTTPException
from monailabel.endpoints import datastore as datastore_endpoints
from monailabel.endpoints import infer as infer_endpoints
from monailabel.endpoints import session as session_endpoints
from monailabel.endpoints import train as train_endpoints
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.utils import tasks as async_tasks
from monailabel.utils.others.generic import get_basename
from starlette.datastructures import Headers

from .datastore import NAME, HardenedDatastore, InvalidName, check_name
from .errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_UPLOAD_MB = 2048
IMAGE_NOT_FOUND = "image not found: give the id of an image in the datastore, or a session_id"
ORIGINAL = {  # MONAI Label's functions, taken before any replacement
    "run_inference": infer_endpoints.run_inference,
    "add_image": datastore_endpoints.add_image,
    "save_label": datastore_endpoints.save_label,
    "run_model": train_endpoints.run_model,
}
_upload_limit = {"bytes": DEFAULT_UPLOAD_MB * 2**20, "detail": ""}


# ---- request checks ----------------------------------------------------------------------------

@contextmanager
def answer_errors():
    """The datastore's refusals as 4xx with their message (MONAI Label lets them through as 500)."""
    try:
        yield
    except InvalidName as error:
        raise HTTPException(status_code=400, detail=error.msg) from None
    except ImageNotFoundException as error:
        raise HTTPException(status_code=404, detail=error.msg) from None


def parse_params(params) -> Dict:
    try:
        value = json.loads(params) if params else {}
    except ValueError as error:
        raise HTTPException(status_code=400, detail=f"params is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise HTTPException(status_code=400, detail="params must be a JSON object")
    return value


def require_image(datastore, image) -> None:
    """Only datastore ids: MONAI Label reads any existing path. Existing files and others get the same 404."""
    if isinstance(datastore, HardenedDatastore):
        known = datastore.has_image(image)
    else:  # DICOMweb: series UIDs, looked up remotely; a plain name that is no local path
        known = isinstance(image, str) and bool(NAME.fullmatch(image)) and not os.path.exists(image)
    if not known:
        raise HTTPException(status_code=404, detail=IMAGE_NOT_FOUND)


def require_name(value, what: str) -> str:
    with answer_errors():
        return check_name(value, what)


def run_original(name: str, background_tasks, *args):
    """MONAI Label's function; on an error, the removals of its upload copies that it queued are run
    here, since FastAPI runs background tasks only with a successful response."""
    try:
        with answer_errors():
            return ORIGINAL[name](background_tasks, *args)
    except BaseException:
        for task in background_tasks.tasks:
            task.func(*task.args, **task.kwargs)
        background_tasks.tasks.clear()
        raise


# ---- the replacements (same parameters as MONAI Label's) -----------------------------------------

def run_inference(background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None):
    request = parse_params(params)
    instance = app_instance()
    if session_id:  # the session's image is read; `image` then only names it (the Slicer plugin sends its node's name)
        sessions = instance.sessions()
        if not NAME.fullmatch(session_id) or not sessions or not sessions.get_session(session_id, update_ts=False):
            raise HTTPException(status_code=404, detail=f"session not found: {session_id!r}")
    else:
        if image:
            require_image(instance.datastore(), image)
        if "image" in request:  # params override the query and an uploaded file in MONAI Label
            require_image(instance.datastore(), request["image"])
    if "label_tag" in request:  # save_label writes to labels/<tag>/
        require_name(request["label_tag"], "label_tag")
    if not isinstance(request.get("save_label", False), bool):  # a string "false" would save
        raise HTTPException(status_code=400, detail="save_label must be true or false")
    if not (file or image or request.get("image") or session_id):
        raise HTTPException(status_code=400, detail="give image (a datastore id), session_id or an uploaded file")
    return run_original("run_inference", background_tasks, model, image, session_id, params, file, label, output)


def add_image(background_tasks, image=None, params="{}", file=None, user=None):
    parse_params(params)
    if not image:  # MONAI Label's default id: the file name less its extensions
        filename = (file.filename if file else "") or ""
        image = os.path.basename(filename).replace("".join(PurePosixPath(filename).suffixes), "")
    require_name(image, "image id")
    return run_original("add_image", background_tasks, image, params, file, user)


def save_label(background_tasks, image, params="{}", tag=DefaultLabelTag.FINAL.value, label=None, user=None):
    parse_params(params)
    tag = require_name(tag or DefaultLabelTag.FINAL.value, "label tag")
    require_image(app_instance().datastore(), image)
    return run_original("save_label", background_tasks, image, params, tag, label, user)


def run_train(model, params=None, run_sync=False, enqueue=False):
    """MONAI Label's POST /train/<model>, after the task's own checks (no labels, bad options, a run
    going): refused with 400 before a training process is started, not as a failed run later."""
    if not isinstance(params, (dict, type(None))):
        raise HTTPException(status_code=400, detail="params must be a JSON object")
    instance = app_instance()
    trainers = instance.info().get("trainers", {})  # info() gathers every task's info and stats: once
    if model not in trainers:
        raise HTTPException(status_code=404, detail=f"no train task {model!r}; known: {', '.join(trainers)}")
    if not enqueue and any(task.get("status") in ("SUBMITTED", "RUNNING") for task in async_tasks("train")):
        # MONAI Label only sees a run once its process has started: one submitted just before would be queued
        raise HTTPException(status_code=409, detail="a training run is already going; wait for it to end (or stop it: DELETE /train/)")
    check = getattr(instance, "check_train_request", None)
    if check is not None:
        try:
            check(model, params or {})
        except InputError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
    return ORIGINAL["run_model"](model, params, run_sync, enqueue)


def create_session(background_tasks, uncompress=False, expiry=0, files=()):
    """MONAI Label's, with a safe unpacking, and no temporary folder left behind by an error."""
    sessions = app_instance().sessions()
    if sessions is None:
        raise HTTPException(status_code=406, detail="Session Feature is Not Enabled")
    if not files:
        raise HTTPException(status_code=404, detail="Image(s) Not Found")
    received = tempfile.mkdtemp()
    try:
        paths = []
        for number, upload in enumerate(files):
            name = get_basename(upload.filename or "")
            paths.append(os.path.join(received, name if name not in ("", ".", "..") else f"upload-{number}"))
            with open(paths[-1], "wb") as out:
                shutil.copyfileobj(upload.file, out, 1 << 20)
        source = paths[0] if len(paths) == 1 else received
        if uncompress and len(paths) == 1:
            source = unpack(paths[0], tempfile.mkdtemp(dir=received))
        session_id, session_info = sessions.add_session(source, expiry, uncompress=False)
    finally:
        shutil.rmtree(received, ignore_errors=True)  # its content was moved to the session store
    return {"session_id": session_id, "session_info": session_info.to_json()}


def _unsafe(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts


def unpack(archive: str, folder: str) -> str:
    """Extract a tar or zip into folder; refuse the whole archive if one member is an absolute path,
    has a '..' component, or is a link or device (a link could send a later member elsewhere)."""
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if _unsafe(member.name) or not (member.isfile() or member.isdir()):
                        raise HTTPException(status_code=400, detail=f"unsafe archive member refused: {member.name!r}")
                tar.extractall(folder, filter="data")
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                for name in bundle.namelist():
                    if _unsafe(name):
                        raise HTTPException(status_code=400, detail=f"unsafe archive member refused: {name!r}")
                bundle.extractall(folder)
        else:
            raise HTTPException(status_code=400, detail="uncompress=true needs a tar or zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise HTTPException(status_code=400, detail=f"cannot unpack the archive: {error}") from None
    return folder


# ---- body size -------------------------------------------------------------------------------

class _TooLarge(Exception):
    pass


def limit_bodies(app):
    """ASGI wrapper: 413 before reading a body whose Content-Length is over the limit; a chunked body
    is counted as it arrives and cut off at the limit (its parts went to unnamed temporary files)."""

    async def too_large(send):
        body = json.dumps({"detail": _upload_limit["detail"]}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # the rest of the body is never read
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def limited(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        limit = _upload_limit["bytes"]
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await too_large(send)
        received, exceeded = 0, False

        async def receive_counted():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def send_unless_exceeded(message):
            if not exceeded:  # FastAPI answers the interrupted parse with a 400: ours replaces it
                await send(message)

        try:
            await app(scope, receive_counted, send_unless_exceeded)
        except Exception:
            if not exceeded:
                raise
        if exceeded:
            await too_large(send)

    limited.samlabel_limit = True
    return limited


# ---- installation ------------------------------------------------------------------------------

def install_guards(upload_mb: float = DEFAULT_UPLOAD_MB) -> None:
    """Called by the app's __init__ (again when /reload re-creates it: idempotent)."""
    _upload_limit.update(bytes=int(upload_mb * 2**20),
                         detail=f"request body too large: the limit is {upload_mb:g} MB (--conf upload_mb)")

    infer_endpoints.run_inference = run_inference
    datastore_endpoints.add_image = add_image
    datastore_endpoints.save_label = save_label
    session_endpoints.create_session = create_session
    train_endpoints.run_model = run_train

    server = sys.modules.get("monailabel.app")  # imported by uvicorn; absent when the app is built in-process
    if server is not None and not getattr(server.app.router.middleware_stack, "samlabel_limit", False):
        server.app.router.middleware_stack = limit_bodies(server.app.router.middleware_stack)
    remove_uvicorn_log_config()
    logger.info(f"samlabel guards installed; request bodies up to {upload_mb:g} MB")


def remove_uvicorn_log_config() -> None:
    """``monailabel start_server`` writes its logging config to a NamedTemporaryFile(suffix=".json") for uvicorn
    and never removes it: one file per start. A single-process uvicorn has read it before building the app
    (a reloader or worker processes read it again: then it is kept)."""
    import uvicorn

    frame = sys._getframe(1)
    while frame is not None and not isinstance(frame.f_locals.get("config"), uvicorn.Config):
        frame = frame.f_back  # up to uvicorn.run(), whose local `config` is the server's
    if frame is None:
        return
    config = frame.f_locals["config"]
    path = config.log_config
    if (isinstance(path, str) and not config.use_subprocess and os.path.dirname(path) == tempfile.gettempdir()
            and os.path.basename(path).startswith("tmp") and path.endswith(".json")):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
