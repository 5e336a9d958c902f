"""scripts/fetch_checkpoints.py (the fetch step of `make serve`) against a local stand-in for the Hugging Face Hub.

FakeHub serves, on 127.0.0.1 only, what huggingface_hub's download uses: HEAD/GET on
/{repo}/resolve/{revision}/{filename} answer like the Hub does for an LFS file (a redirect to a CDN
URL on another port, with X-Repo-Commit, X-Linked-Etag = the published sha256, X-Linked-Size), and the CDN serves
the bytes with Range support. The script runs as `make serve` runs it, in a subprocess, with
HF_ENDPOINT on FakeHub, HF_HOME in a temporary folder, proxies off, and the conftest's audit hook
that reports any look-up of or connection to a host other than loopback.
"""

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import NETWORK_HOOK_SOURCE, NETWORK_MARKER, REPO_ROOT, _free_port, click_marker

from samlabel.checkpoint import expected_shapes
from samlabel.registry import get_spec, registered
from samlabel.seeded import save_in_official_layout, write_seeded_checkpoints

SCRIPT = REPO_ROOT / "scripts" / "fetch_checkpoints.py"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the fake repos' head commit
FETCH_TIMEOUT_S = 300


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FakeHub:
    """A Hugging Face Hub stand-in on 127.0.0.1 (see the module docstring); ``requests`` logs
    (method, path, Range header) of every request."""

    def __init__(self):
        self.files = []  # dicts: repo, filename, path, size, sha256 (published), break_off_at
        self.requests = []
        # The Hub and its CDN, on two origins: huggingface_hub follows a redirect on the Hub's own origin
        # while it looks for a file's metadata, and reads the metadata off a redirect to another one.
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler) for _ in range(2)]
        for server in self.servers:
            server.daemon_threads = True
            server.hub = self
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url, self.cdn_url = (f"http://127.0.0.1:{server.server_address[1]}" for server in self.servers)

    def publish(self, repo: str, filename: str, path: Path, sha256: str = None, break_off_at: int = None):
        """Serve `path` as `filename` of model repo `repo`, published with `sha256` (default: its
        own); `break_off_at`: the first download of it stops after that many bytes of the body."""
        self.files.append(dict(repo=repo, filename=filename, path=Path(path), size=Path(path).stat().st_size,
                               sha256=sha256 or file_sha256(path), break_off_at=break_off_at))

    def gets(self):
        return [r for r in self.requests if r[0] == "GET"]

    def close(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        hub = self.server.hub
        hub.requests.append((self.command, self.path, self.headers.get("Range")))
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        blob = re.fullmatch(r"/cdn/(\d+)", path)
        if resolve:
            repo, revision, filename = resolve.groups()
            if not any(f["repo"] == repo for f in hub.files):
                return self._error(404, "RepoNotFound", "Repository not found")
            if revision not in ("main", COMMIT):
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            for index, f in enumerate(hub.files):
                if (f["repo"], f["filename"]) == (repo, filename):
                    # The Hub's answer for an LFS file: a redirect to the CDN, with the file's metadata.
                    return self._send(302, {"Location": f"{hub.cdn_url}/cdn/{index}", "X-Repo-Commit": COMMIT,
                                            "X-Linked-Etag": f'"{f["sha256"]}"', "X-Linked-Size": str(f["size"]),
                                            "ETag": '"' + "a" * 40 + '"', "Content-Length": "0"})
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": COMMIT})
        if blob and int(blob.group(1)) < len(hub.files):
            return self._blob(hub.files[int(blob.group(1))], body)
        return self._error(404, None, "not found")

    def _send(self, status, headers):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _error(self, status, code, message, headers=None):
        data = message.encode()
        headers = dict(headers or {}, **{"Content-Type": "text/plain", "Content-Length": str(len(data))})
        if code:
            headers["X-Error-Code"] = code
            headers["X-Error-Message"] = message
        self._send(status, headers)
        if self.command != "HEAD":
            self.wfile.write(data)

    def _blob(self, f, body: bool):
        size, start, status = f["size"], 0, 200
        headers = {"ETag": f'"{f["sha256"]}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if wanted:
            start, status = int(wanted.group(1)), 206
            end = int(wanted.group(2)) if wanted.group(2) else size - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        else:
            end = size - 1
        headers["Content-Length"] = str(end - start + 1)
        self._send(status, headers)
        if not body:
            return
        stop, break_off = end + 1, f["break_off_at"] is not None
        if break_off:  # once
            stop, f["break_off_at"] = min(stop, start + f["break_off_at"]), None
        with open(f["path"], "rb") as source:
            source.seek(start)
            left = stop - start
            try:
                while left > 0:
                    block = source.read(min(left, 1 << 20))
                    self.wfile.write(block)
                    left -= len(block)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return
        if break_off:  # the connection drops mid-body
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture(scope="module")
def fastsam3d_file(tmp_path_factory):
    """A full-size FastSAM3D checkpoint (seeded weights) in the official layout (~213 MB)."""
    folder = tmp_path_factory.mktemp("official")
    path = write_seeded_checkpoints(folder, {"fastsam3d": 31})["fastsam3d"]
    yield path
    path.unlink()


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    yield folder
    for path in folder.glob("*.pth"):  # the full-size files are not kept in pytest's temporary folders
        path.unlink()


def run_fetch(tmp_path: Path, endpoint: str, model_dir: Path, *args, env=None) -> subprocess.CompletedProcess:
    hook_dir = tmp_path / "network-hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(NETWORK_HOOK_SOURCE)
    clean = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith("HF_")}
    clean.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
                 HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                 PYTHONPATH=os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH", "")) if p))
    clean.update(env or {})
    result = subprocess.run([sys.executable, str(SCRIPT), "--model-dir", str(model_dir), *args], env=clean,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
    result.output = result.stdout + result.stderr
    assert NETWORK_MARKER not in result.output, result.output  # nothing but loopback
    return result


def test_a_good_download_is_verified_and_named(tmp_path, hub, fastsam3d_file, model_dir):
    hub.publish("techlove/FastSAM3D", "FastSAM3D.pth", fastsam3d_file)
    result = run_fetch(tmp_path, hub.url, model_dir, "--models", "fastsam3d")
    assert result.returncode == 0, result.output
    dest = model_dir / "FastSAM3D.pth"
    assert file_sha256(dest) == file_sha256(fastsam3d_file)
    assert f"sha256 {file_sha256(fastsam3d_file)} (sha256 as published)" in result.output
    assert "keys and shapes match FastSAM3D" in result.output
    assert sorted(p.name for p in model_dir.iterdir()) == ["FastSAM3D.pth"]  # no staging folder left
    assert ("HEAD", "/techlove/FastSAM3D/resolve/main/FastSAM3D.pth", None) in hub.requests
    assert [path for _, path, _ in hub.gets()] == ["/cdn/0"]

    # The next `make serve`: the file is there, nothing is downloaded.
    hub.requests.clear()
    again = run_fetch(tmp_path, hub.url, model_dir, "--models", "fastsam3d")
    assert again.returncode == 0 and "is present" in again.output, again.output
    assert hub.requests == []


def test_a_download_that_breaks_off_is_resumed(tmp_path, hub, fastsam3d_file, model_dir):
    cut = fastsam3d_file.stat().st_size // 3
    hub.publish("techlove/FastSAM3D", "FastSAM3D.pth", fastsam3d_file, break_off_at=cut)
    result = run_fetch(tmp_path, hub.url, model_dir, "--models", "fastsam3d")
    assert result.returncode == 0, result.output
    assert file_sha256(model_dir / "FastSAM3D.pth") == file_sha256(fastsam3d_file)
    assert "sha256 as published" in result.output
    # The second GET asks only for what the first did not write (the client keeps whole chunks of what it got).
    first, second = [rng for _, _, rng in hub.gets()]
    assert first is None and re.fullmatch(r"bytes=(\d+)-", second or ""), hub.requests
    assert 0 < int(second[len("bytes="):-1]) <= cut, hub.requests
    assert sorted(p.name for p in model_dir.iterdir()) == ["FastSAM3D.pth"]


def test_a_corrupted_download_is_refused_and_removed(tmp_path, hub, model_dir):
    """The bytes that arrive are not those the Hub published the sha256 of."""
    source = tmp_path / "FastSAM3D.pth"
    source.write_bytes(os.urandom(64 * 1024))
    published = hashlib.sha256(b"the file the authors uploaded").hexdigest()
    hub.publish("techlove/FastSAM3D", "FastSAM3D.pth", source, sha256=published)
    result = run_fetch(tmp_path, hub.url, model_dir, "--models", "fastsam3d")
    assert result.returncode == 1, result.output
    assert "REFUSED" in result.output and f"is not the published {published}" in result.output, result.output
    assert list(model_dir.iterdir()) == []  # neither the file nor a partial copy is left
    assert f"put it at {model_dir / 'FastSAM3D.pth'}" in result.output


def _another_model(path: Path) -> None:
    """The test-double click model's checkpoint (official 3D layout, one unrelated key)."""
    click_marker.write_checkpoint(path)


def _wrong_shapes(path: Path) -> None:
    """FastSAM3D's keys in its official layout, every tensor of the wrong shape."""
    spec = get_spec("fastsam3d")
    save_in_official_layout(spec, {key: torch.zeros(1) for key in expected_shapes(spec)}, path)


@pytest.mark.parametrize("make_file, reason", [(_another_model, "missing keys"), (_wrong_shapes, "shape mismatches")])
def test_a_file_of_another_model_is_refused_and_removed(tmp_path, hub, model_dir, make_file, reason):
    """Its sha256 is the published one, but it is not FastSAM3D: the key/shape check refuses it."""
    source = tmp_path / "published.pth"
    make_file(source)
    hub.publish("techlove/FastSAM3D", "FastSAM3D.pth", source)
    result = run_fetch(tmp_path, hub.url, model_dir, "--models", "fastsam3d")
    assert result.returncode == 1, result.output
    assert "REFUSED" in result.output and "is not a FastSAM3D checkpoint" in result.output, result.output
    assert reason in result.output
    assert list(model_dir.iterdir()) == []


@pytest.mark.parametrize("offline", ["unreachable", "HF_HUB_OFFLINE", "not on the Hub"])
def test_offline_it_says_what_to_put_where_and_exits_0(tmp_path, model_dir, offline):
    """Every registered model: the Hub unreachable, not to be asked, or without the repos (404)."""
    hub = FakeHub() if offline == "not on the Hub" else None  # publishes nothing
    endpoint = hub.url if hub else f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    env = {"HF_HUB_OFFLINE": "1"} if offline == "HF_HUB_OFFLINE" else {}
    try:
        result = run_fetch(tmp_path, endpoint, model_dir, env=env)
    finally:
        if hub:
            hub.close()
    assert result.returncode == 0, result.output
    assert "Traceback" not in result.output, result.output
    for spec in registered().values():
        prefix = f"fetch_checkpoints: {spec.name}: "
        line = next((x for x in result.stdout.splitlines() if x.startswith(prefix) and "Download" in x), "")
        if spec.encoder_checkpoint_file:  # SAM3D: the decoder, its plans beside it, and Meta's encoder
            name = Path(spec.checkpoint_file).name
            assert f"Download {name} and {name}.pkl from " in line, result.output
            assert f"put them in {(model_dir / spec.checkpoint_file).parent}" in line, line
            assert f"needs {spec.encoder_checkpoint_file}" in line and f"at {model_dir / spec.encoder_checkpoint_file}" in line
        else:
            assert f"Download {spec.checkpoint_file} from " in line, result.output
            assert f"put it at {model_dir / spec.checkpoint_file}" in line, line
        if spec.hf_repo:
            assert f"/{spec.hf_repo}/resolve/main/{spec.hf_filename}" in line, line
            reason = {"unreachable": "the Hub cannot be reached (offline?)", "HF_HUB_OFFLINE": "HF_HUB_OFFLINE is set",
                      "not on the Hub": "it could not be fetched: RepositoryNotFoundError"}[offline]
            assert reason in line, line
        else:
            assert spec.download_page and spec.download_page in line, line
    assert list(model_dir.iterdir()) == []


def test_every_model_says_where_its_file_comes_from():
    for spec in registered().values():
        assert bool(spec.hf_repo) != bool(spec.download_page), spec.name  # fetched, or downloaded by hand from a page
        if spec.hf_repo:
            assert spec.hf_filename == spec.checkpoint_file


def test_make_serve_fetches_unless_fetch_0():
    def planned(*args):
        return subprocess.run(["make", "-n", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60).stdout

    assert "scripts/fetch_checkpoints.py --model-dir apps/fastsam3d/model" in planned("serve")
    assert "fetch_checkpoints" not in planned("serve", "FETCH=0")
    assert "fetch_checkpoints" not in planned("test")
