"""Shared fixtures: sample studies and real `monailabel start_server` processes.

``monailabel_server(conf=None, studies=None, app_dir=APP_DIR)`` starts (once per distinct
arguments, for the whole session) a real server on 127.0.0.1 with a free port, waits for
``/info/`` and returns a ``Server`` (``.url``, ``.log_path``, ``.log()``). Every server is
terminated at the end of the session; the tail of every running server's log is attached
to the report of a failing test.

Seeded full-size checkpoints in the official layouts: ``checkpoints`` (FastSAM3D, SAM-Med3D),
``slice_checkpoints`` (MedSAM, SAM-Med2D) and ``click_marker_checkpoint`` (the test double that
tests/marker_app serves).
"""

import importlib.util
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import pytest
import requests
import torch

from samlabel.modeling.sam3d_decoder import Sam3DDecoder
from samlabel.registry import get_spec
from samlabel.seeded import save_sam3d_decoder_files, seeded_state_dict, write_seeded_checkpoints

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "fastsam3d"
SAMPLE_STUDIES_SCRIPT = REPO_ROOT / "scripts" / "sample_studies.py"
SERVER_START_TIMEOUT_S = float(os.environ.get("SAMLABEL_TEST_SERVER_TIMEOUT", "180"))
LOG_TAIL_LINES = 200

# Loaded into every test server (sitecustomize on its PYTHONPATH): an audit hook that logs
# each name look-up or connection to a host other than loopback, i.e. any download try.
NETWORK_MARKER = "SAMLABEL-TEST-NETWORK"
NETWORK_HOOK_SOURCE = f"""
import sys

_LOCAL = {{None, "localhost", "127.0.0.1", "::1", b"localhost", b"127.0.0.1"}}


def _samlabel_test_network_hook(event, args):
    if event == "socket.getaddrinfo" and args[0] not in _LOCAL:
        sys.stderr.write("{NETWORK_MARKER}: getaddrinfo %r\\n" % (args[0],))
    elif event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in _LOCAL:
        sys.stderr.write("{NETWORK_MARKER}: connect %r\\n" % (args[1],))


sys.addaudithook(_samlabel_test_network_hook)
"""

_running_servers: list = []


def load_module(path: Path):
    """Import a file that is not in a package (scripts/, tests/marker_app/) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_sample_studies_module():
    return load_module(SAMPLE_STUDIES_SCRIPT)


dicomweb_store = load_module(REPO_ROOT / "scripts" / "dicomweb_store.py")
click_marker = load_module(REPO_ROOT / "tests" / "marker_app" / "click_marker.py")  # registers nothing


@pytest.fixture(scope="session")
def sample_studies_module():
    return load_sample_studies_module()


@pytest.fixture(scope="module")
def orthanc_ct(tmp_path_factory, sample_studies_module):
    """Orthanc on loopback holding the sample DICOM CT series, one per test module:
    (store, StudyInstanceUID, SeriesInstanceUID)."""
    work = tmp_path_factory.mktemp("orthanc")
    store = dicomweb_store.OrthancStore(work, _free_port()).start()
    try:
        study, series = sample_studies_module.write_ct_dicom(work / "series")
        assert store.upload(work / "series") == sample_studies_module.DICOM_CT.shape[2]
        yield store, study, series
    finally:
        store.stop()


def start_training(server, task: str, **params) -> requests.Response:
    """POST /train/<task> with the options as its JSON body."""
    return requests.post(f"{server.url}/train/{task}", json=params, timeout=60)


def finished_training(server, timeout_s: float) -> dict:
    """GET /train/ until MONAI Label's training process is neither submitted nor running: its last state."""
    deadline = time.monotonic() + timeout_s
    while (task := requests.get(f"{server.url}/train/", timeout=30).json())["status"] in ("SUBMITTED", "RUNNING"):
        assert time.monotonic() < deadline, f"training did not finish within {timeout_s} s"
        time.sleep(1)
    return task


@pytest.fixture(scope="session")
def sample_studies_dir(tmp_path_factory, sample_studies_module) -> Path:
    """A fresh studies folder holding the sample studies (written once per session)."""
    out = tmp_path_factory.mktemp("sample-studies")
    sample_studies_module.write_sample_studies(out)
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    args: list

    def log(self) -> str:
        return dicomweb_store.read_log(self.log_path)

    def stop(self) -> None:
        dicomweb_store.stop_process_group(self.proc)  # it runs in its own session


def start_server(
    app_dir: Path, studies, conf: Optional[Dict[str, str]], work_dir: Path, timeout_s: float = SERVER_START_TIMEOUT_S,
    env: Optional[Dict[str, str]] = None,
) -> Server:
    """``env``: variables set for the server process on top of ours (e.g. TMPDIR)."""
    port = _free_port()
    args = [
        sys.executable, "-m", "monailabel.main", "start_server",
        "--app", str(app_dir), "--studies", str(studies),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    for key, value in (conf or {}).items():
        args += ["--conf", str(key), str(value)]

    process_env = dict(os.environ)
    # The venv's bin first: dcmqi's itkimage2segimage lives there (else MONAI Label downloads it).
    process_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + process_env.get("PATH", "")
    process_env["MONAI_LABEL_SESSION_PATH"] = str(work_dir / "sessions")
    process_env["MONAI_LABEL_DATASTORE_CACHE_PATH"] = str(work_dir / "cache")
    process_env["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str(work_dir / "dicomweb-cache")
    process_env["PYTHONUNBUFFERED"] = "1"
    hook_dir = work_dir / "network-hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(NETWORK_HOOK_SOURCE)
    process_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook_dir), process_env.get("PYTHONPATH", "")) if p)
    process_env.update(env or {})

    log_path = work_dir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args, cwd=work_dir, env=process_env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    server = Server(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, args=args)

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"monailabel exited with {proc.returncode} before /info/ answered:\n{server.log()}")
        try:
            if requests.get(f"{server.url}/info/", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"monailabel did not answer /info/ within {timeout_s} s:\n{server.log()}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def monailabel_server(tmp_path_factory, sample_studies_dir):
    """Factory: ``monailabel_server(conf=None, studies=None, app_dir=APP_DIR, env=None) -> Server``.

    ``studies`` defaults to the session's sample studies folder; servers with the same
    arguments are shared within the session; ``monailabel_server.stop_all()`` stops them.
    """
    servers: Dict[tuple, Server] = {}

    def factory(conf: Optional[Dict[str, str]] = None, studies=None, app_dir: Path = APP_DIR,
                env: Optional[Dict[str, str]] = None) -> Server:
        studies = sample_studies_dir if studies is None else studies
        key = (str(app_dir), str(studies), tuple(sorted((conf or {}).items())), tuple(sorted((env or {}).items())))
        if key not in servers:
            servers[key] = start_server(Path(app_dir), studies, conf, tmp_path_factory.mktemp("monailabel"), env=env)
            _running_servers.append(servers[key])
        return servers[key]

    def stop_all() -> None:
        """Stop the shared servers (a later call of the factory starts them again): for tests that
        need much memory of their own, so that the suite fits the CI machine's 24 GB."""
        for server in servers.values():
            server.stop()
            _running_servers.remove(server)
        servers.clear()

    factory.stop_all = stop_all
    try:
        yield factory
    finally:
        stop_all()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Dict[str, Path]:
    """FastSAM3D and SAM-Med3D (the official training-script layout)."""
    return write_seeded_checkpoints(tmp_path_factory.mktemp("checkpoints"), {"fastsam3d": 11, "sam_med3d": 12})


@pytest.fixture(scope="session")
def slice_checkpoints(tmp_path_factory) -> Dict[str, Path]:
    """MedSAM (bare state dict) and SAM-Med2D (under 'model')."""
    return write_seeded_checkpoints(tmp_path_factory.mktemp("checkpoints-2d"), {"medsam": 21, "sam_med2d": 22})


@pytest.fixture(scope="session")
def click_marker_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint of the test-double model served by tests/marker_app."""
    path = tmp_path_factory.mktemp("marker") / "click_marker.pth"
    click_marker.write_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def sam3d_checkpoints(tmp_path_factory, slice_checkpoints) -> Dict[str, str]:
    """The --conf of a server with SAM3D's Synapse entry on seeded files in the official formats. Plans
    in nnU-Net's (z, y, x) order: 4 mm slices, 1.3 mm in-plane, so the sample CTs are resampled with
    the separate-z path (4 / 1.3 > 3) and fit one 64 x 176 x 176 window in-plane."""
    name = "sam3d_synapse"
    path = tmp_path_factory.mktemp("sam3d") / name / "model_final_checkpoint.model"
    path.parent.mkdir()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Sam3DDecoder(num_classes=14).state_dict().items()}
    save_sam3d_decoder_files(path, seeded_state_dict(shapes, 31), patch_size=get_spec(name).input_size,
                             spacing=(4.0, 1.3, 1.3))
    # MedSAM's seeded file has Meta's SAM ViT-B layout: it stands in for sam_vit_b_01ec64.pth
    return {"models": name, f"{name}_checkpoint": str(path), "sam_vit_b_checkpoint": str(slice_checkpoints["medsam"])}


@pytest.fixture(scope="session")
def fastsam3d_server(monailabel_server) -> str:
    """Base URL of the FastSAM3D app served on the sample studies with the default conf."""
    return monailabel_server().url


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in _running_servers:
            tail = "\n".join(server.log().splitlines()[-LOG_TAIL_LINES:])
            report.sections.append((f"monailabel server log ({server.url}, last {LOG_TAIL_LINES} lines)", tail))
