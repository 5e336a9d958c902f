"""The FastSAM3D MONAI Label app starts offline in a real server and answers like one."""

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from conftest import NETWORK_HOOK_SOURCE, NETWORK_MARKER


def test_info_has_the_shape_the_slicer_plugin_reads(fastsam3d_server):
    info = requests.get(f"{fastsam3d_server}/info/", timeout=30).json()
    assert info["name"] == "FastSAM3D"
    assert isinstance(info["models"], dict)
    assert isinstance(info["labels"], (list, dict))
    for key in ("description", "version", "trainers", "strategies", "scoring", "datastore"):
        assert key in info
    # The Slicer plugin refuses a server whose /info/ has a top-level "config".
    assert "config" not in info
    for model in info["models"].values():
        assert {"type", "labels", "dimension", "description", "config"} <= set(model)


def test_datastore_counts_the_sample_studies(fastsam3d_server, sample_studies_module):
    stats = requests.get(f"{fastsam3d_server}/datastore/?output=stats", timeout=30).json()
    assert stats["total"] == 2
    info = requests.get(f"{fastsam3d_server}/info/", timeout=30).json()
    assert info["datastore"]["total"] == 2

    listing = requests.get(f"{fastsam3d_server}/datastore/?output=all", timeout=30).json()
    names = {sample_studies_module.MRI_NAME, sample_studies_module.CT_NAME}
    assert {v["image"]["info"]["name"] for v in listing["objects"].values()} == names


def assert_no_network_use(log: str) -> None:
    """No look-up of or connection to a non-loopback host (the conftest's audit hook), and no
    download messages from MONAI, MONAI Label or torch.hub."""
    assert NETWORK_MARKER not in log, log
    assert not re.search(r"\b(downloading|downloaded)\b", log, re.IGNORECASE), log


def test_start_up_downloads_nothing(monailabel_server):
    server = monailabel_server()
    assert "Application startup complete" in server.log()
    requests.get(f"{server.url}/info/", timeout=30).raise_for_status()
    assert_no_network_use(server.log())


def test_network_hook_sees_a_download_try(tmp_path):
    """The hook that the no-download tests rely on does report a non-loopback look-up."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(NETWORK_HOOK_SOURCE)
    code = "import socket\ntry:\n    socket.getaddrinfo('example.invalid', 443)\nexcept OSError:\n    pass\n"
    env = dict(os.environ, PYTHONPATH=str(hook_dir))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert f"{NETWORK_MARKER}: getaddrinfo 'example.invalid'" in out.stderr


def test_conf_models_is_accepted(monailabel_server):
    server = monailabel_server(conf={"models": "fastsam3d"})
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["name"] == "FastSAM3D"
    assert "models requested = ['fastsam3d']" in server.log()


class _EmptyDICOMweb(BaseHTTPRequestHandler):
    """A DICOMweb stub that knows no studies: every QIDO search answers []."""

    def do_GET(self):
        body = json.dumps([]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def empty_dicomweb():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _EmptyDICOMweb)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"
    httpd.shutdown()
    httpd.server_close()


def test_dicomweb_datastore_starts_offline(monailabel_server, empty_dicomweb):
    """With a DICOMweb datastore MONAI Label wants dcmqi's itkimage2segimage; the dcmqi wheel
    provides it, so nothing is downloaded (offline, a download would kill the start-up)."""
    server = monailabel_server(studies=empty_dicomweb)
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["name"] == "FastSAM3D"
    assert info["datastore"]["total"] == 0
    assert_no_network_use(server.log())
