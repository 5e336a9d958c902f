"""Routes of MONAI Label 0.8.5's server, replaced from the app (``install_routes``, called when the
app loads).

- Its endpoints are ``async def`` functions that call blocking code (inference, DICOMweb
  downloads, DICOM SEG conversion) on the event loop, so one inference holds up every other
  request: ``/info/`` and the DICOMweb proxy that OHIF loads images through wait for it. They
  are re-registered to run in worker threads (the engines are thread-safe).
- Its DICOMweb proxy (``/proxy/dicom/...``) drops the query string, so OHIF's study list shows
  every patient whatever the filter, and it fetches on the event loop. It is replaced.
- A request the app refuses (samlabel.errors.InputError, e.g. an unevenly spaced DICOM series)
  is answered 400 with its message instead of 500.
- Interaction state is kept per client. OHIF sends no client id and Slicer's default is the same
  for everyone, so the infer route prefixes the client's own id with the best identity there is:
  the signed-in user when MONAI Label's auth is on, else the connection's address.
- A client opening an image (Slicer's download or upload, OHIF's first request for a series,
  the next active-learning sample) starts reading it in the background (samlabel.prefetch).
"""

import importlib
import inspect
import json
import logging
import re
import sys
from contextlib import nullcontext
from typing import Callable

import anyio.to_thread
import requests
from anyio import CapacityLimiter
from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints import proxy as monailabel_proxy
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from .errors import InputError

logger = logging.getLogger(__name__)

# MONAI Label's routers whose endpoints only call blocking code.
BLOCKING_ROUTERS = ("info", "infer", "datastore", "activelearning", "session", "scoring", "batch_infer")
PROXY_PATH = "/proxy/dicom/{path:path}"
# Inferences take their worker threads from a pool of their own, so that however many run or
# wait, /info/, the datastore and the DICOMweb proxy still find threads in the shared pool (40).
INFER_LIMITER = CapacityLimiter(4)
# Not forwarded: they describe one connection, or the body that Starlette sizes itself.
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "proxy-connection"}
PROXY_TIMEOUT_S = (10, 300)  # connect, read


def install_routes(fastapi_app=None) -> bool:
    """Put our routes first in the running MONAI Label server (monailabel.app.app unless given),
    where they shadow MONAI Label's (the first route that matches a request serves it). Does
    nothing outside a server (e.g. the `monailabel infer` CLI) or when already done (the app
    is rebuilt by /reload). Returns whether it installed them."""
    if fastapi_app is None:
        module = sys.modules.get("monailabel.app")
        if module is None:
            return False
        fastapi_app = module.app
    if any(getattr(getattr(r, "endpoint", None), "samlabel", False) for r in fastapi_app.router.routes):
        return False
    prefix, ours = settings.MONAI_LABEL_API_STR, []
    for name in BLOCKING_ROUTERS:
        for route in importlib.import_module(f"monailabel.endpoints.{name}").router.routes:
            if isinstance(route, APIRoute) and inspect.iscoroutinefunction(route.endpoint):
                if route.path == "/infer/{model}":
                    endpoint = in_worker_thread(route.endpoint, after=note_model, limiter=INFER_LIMITER, tell_clients_apart=True,
                                                inference=True)
                else:
                    endpoint = in_worker_thread(route.endpoint, after=OPENS_AN_IMAGE.get(route.path))
                ours.append(copy_route(route, prefix + route.path, endpoint, fastapi_app))
    ours.append(APIRoute(prefix + PROXY_PATH, proxy_dicom, methods=["GET", "POST"], include_in_schema=False,
                         dependency_overrides_provider=fastapi_app))
    fastapi_app.router.routes[0:0] = ours
    logger.info(f"samlabel: {len(ours) - 1} blocking routes run in worker threads; the DICOMweb proxy keeps queries")
    return True


def in_worker_thread(endpoint: Callable, after: Callable = None, limiter: CapacityLimiter = None,
                     tell_clients_apart: bool = False, inference: bool = False) -> Callable:
    """An endpoint with endpoint's signature that runs endpoint's coroutine in a worker thread
    (taking a token of limiter, default: the pool every route shares). MONAI Label's endpoints
    never await: the coroutine ends on its first step; one that would suspend is an error, not
    a hang. (Not functools.wraps: FastAPI would follow __wrapped__ to the original.)
    after(result, **kwargs): called with a successful answer. tell_clients_apart: the `params`
    form field's client_id gets the asker's identity (who). inference: no prefetch starts meanwhile."""

    def drive(kwargs):
        prefetcher = getattr(app_instance(), "prefetcher", None) if inference else None
        with prefetcher.inference() if prefetcher is not None else nullcontext():
            coroutine = endpoint(**kwargs)
            try:
                coroutine.send(None)
            except StopIteration as done:
                if after is not None:
                    after(done.value, **kwargs)
                return done.value
            except InputError as error:
                raise HTTPException(status_code=400, detail=str(error)) from None
            coroutine.close()
            raise RuntimeError(f"{endpoint.__name__} awaited: it cannot run in a worker thread")

    async def run(**kwargs):
        http_request = kwargs.pop(ASKER, None)
        if tell_clients_apart:
            kwargs["params"] = with_identity(kwargs.get("params"), who(http_request, kwargs.get("user")))
        return await anyio.to_thread.run_sync(drive, kwargs, limiter=limiter)

    signature = inspect.signature(endpoint)
    if tell_clients_apart:
        asker = inspect.Parameter(ASKER, inspect.Parameter.KEYWORD_ONLY, annotation=Request)
        signature = signature.replace(parameters=[*signature.parameters.values(), asker])
    run.__signature__ = signature
    run.__name__, run.__doc__, run.samlabel = endpoint.__name__, endpoint.__doc__, True
    return run


ASKER = "samlabel_http_request"  # the parameter under which FastAPI hands over the HTTP request


def who(http_request: Request, user) -> str:
    """The best identity of the one asking: the signed-in user when MONAI Label's auth is on, else
    the connection's address (users behind one address, e.g. one proxy, then share it)."""
    if settings.MONAI_LABEL_AUTH_ENABLE and getattr(user, "username", None):
        return f"user {user.username}"
    return f"host {http_request.client.host if http_request is not None and http_request.client else 'unknown'}"


def with_identity(params, identity: str):
    """The JSON params with client_id = '<identity>/<the client's own id>' (or the identity alone).
    Params that are not a JSON object, or a client_id that is not a string, stay as they are: the
    request checks refuse them with their message."""
    try:
        body = json.loads(params) if params else {}
    except (TypeError, ValueError):
        return params
    own = body.get("client_id") if isinstance(body, dict) else None
    if not isinstance(body, dict) or isinstance(own, bool) or not (own is None or isinstance(own, (str, int))):
        return params
    body["client_id"] = f"{identity}/{own}" if own not in (None, "") else identity
    return json.dumps(body)


def copy_route(route: APIRoute, path: str, endpoint: Callable, fastapi_app) -> APIRoute:
    return APIRoute(
        path, endpoint, methods=route.methods, name=route.name, tags=route.tags, summary=route.summary,
        description=route.description, responses=route.responses, deprecated=route.deprecated,
        include_in_schema=route.include_in_schema, response_class=route.response_class,
        dependencies=route.dependencies, dependency_overrides_provider=fastapi_app,
    )  # fmt: skip


def note_model(result, model: str = "", image: str = "", **_) -> None:
    """After an inference: which model segmented the image, for the DICOM SEG saved for it."""
    store = app_instance().datastore()
    if image and hasattr(store, "note_model"):
        store.note_model(image, model)


def prefetch(key, locate: Callable[[], str]) -> None:
    prefetcher = getattr(app_instance(), "prefetcher", None)
    if prefetcher is not None and key:
        prefetcher.open(key, locate)


def prefetch_datastore_image(image_id) -> None:
    if isinstance(image_id, str):
        prefetch(image_id, lambda: app_instance().datastore().get_image_uri(image_id))


# Routes by which a client opens an image: after(result, **request) starts reading it.
OPENS_AN_IMAGE = {
    "/datastore/image": lambda result, image="", **_: prefetch_datastore_image(image),  # Slicer: the image to show
    "/session/": lambda result, **_: prefetch(result.get("session_id"), lambda: result["session_info"]["image"]),
    "/activelearning/{strategy}": lambda result, **_: prefetch_datastore_image((result or {}).get("id")),
}
SERIES_PATH = re.compile(r"studies/[0-9.]+/series/([0-9.]+)")  # a series' metadata, instances or frames


async def proxy_dicom(request: Request, path: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    """/proxy/dicom/{wado,qido,stow,}/path?query -> the DICOMweb server, query string included;
    the request to it runs in a worker thread."""
    op, _, rest = path.partition("/")
    if op not in ("wado", "qido", "stow"):
        op, rest = "", path
    query = request.url.query
    if "googleapis.com" in settings.MONAI_LABEL_STUDIES:  # MONAI Label's proxy refreshes Google's token
        return await monailabel_proxy.proxy_dicom(request, op, f"{rest}?{query}" if query else rest)

    prefix = {"wado": settings.MONAI_LABEL_WADO_PREFIX, "qido": settings.MONAI_LABEL_QIDO_PREFIX,
              "stow": settings.MONAI_LABEL_STOW_PREFIX}.get(op)  # fmt: skip
    if op == "qido" and rest.endswith("metadata"):  # as MONAI Label: some OHIF versions ask metadata by QIDO
        prefix = settings.MONAI_LABEL_WADO_PREFIX
    url = "/".join(p for p in (settings.MONAI_LABEL_STUDIES.rstrip("/"), prefix, rest) if p)
    if query:
        url += "?" + query  # as received, already encoded
    auth = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        auth = (settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    headers, body = {}, None
    if request.method == "POST":
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
        body = await request.body()

    def forward():
        with requests.request(request.method, url, data=body, headers=headers, auth=auth, stream=True,
                              timeout=PROXY_TIMEOUT_S) as upstream:
            # raw: the body as sent, still in its Content-Encoding, which is forwarded with it
            return upstream.status_code, upstream.headers, upstream.raw.read()

    try:
        status, upstream_headers, content = await run_in_threadpool(forward)
    except requests.RequestException as error:
        raise HTTPException(502, detail=f"DICOMweb server {settings.MONAI_LABEL_STUDIES}: {error}") from None
    series = SERIES_PATH.match(rest) if op == "wado" and status == 200 else None
    if series:  # OHIF is loading this series: fetch and read it for the first click
        prefetch_datastore_image(series.group(1))
    headers = {k: v for k, v in upstream_headers.items() if k.lower() not in HOP_BY_HOP}
    return Response(content=content, status_code=status, headers=headers)


proxy_dicom.samlabel = True
