"""Files stay inside the studies and app folders, and survive kills, through real `monailabel start_server`
processes (lib/samlabel/datastore.py, lib/samlabel/server_guards.py).

Each attack answers a 4xx with a message; then nothing exists at the target it aimed at, the studies
folder and the datastore listing are byte-for-byte unchanged, the server's TMPDIR is empty and
/info/ still answers 200. The attacks: label tags and image ids with ``../`` or absolute paths
(PUT /datastore/label, PUT /datastore/image, /infer with save_label), image paths instead of
datastore ids (the same 404 whether the file exists or not), tar and zip members escaping the
session folder, bodies over ``--conf upload_mb``, and uploads refused after MONAI Label copied them.
Then: an unreadable datastore_v2.json no longer stops the server, and SIGKILLs during label saves
never lose an acknowledged label.
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import tarfile
import threading
import time
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import requests
from conftest import APP_DIR, REPO_ROOT, _running_servers, start_server

MARKER_APP = REPO_ROOT / "tests" / "marker_app"
IMAGE = "ct_synthetic"  # a datastore id of the sample studies (171 x 143 x 57)
CLICK = [65, 90, 18]  # inside its phantom
TIMEOUT = 60
UPLOAD_ROUTES = [("PUT", "/datastore/image?image=big", "file"), ("PUT", f"/datastore/label?image={IMAGE}&tag=big", "label"),
                 ("PUT", "/session/", "files"), ("POST", f"/infer/click_marker?image={IMAGE}", "file")]


def copy_studies(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.glob("*.nii.gz"):  # the images only: no datastore JSON or labels of other servers
        shutil.copy(path, target / path.name)
    return target


def nifti_gz(array: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, np.eye(4)).to_bytes(), compresslevel=1)


def label_array(seed: int, shape=(48, 48, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, shape, dtype=np.uint8)


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def datastore(url: str) -> dict:
    response = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def temp_left(tmpdir: Path, settle_s: float = 5.0) -> list:
    """What the server left in its TMPDIR, once its background removals (run after an answer) are done."""
    deadline = time.monotonic() + settle_s
    while True:
        left = sorted(p.name for p in tmpdir.iterdir())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def assert_refused(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert all(word in detail for word in words), detail
    return detail


def deep(path: Path) -> str:
    """A relative path that reaches ``path`` from any folder: enough ``../`` to hit / first."""
    return "../" * 30 + str(path).lstrip("/")


@contextmanager
def changes_nothing(ctx, *targets: Path):
    files, listing = files_of(ctx.studies), datastore(ctx.url)
    yield
    for target in targets:
        assert not os.path.lexists(target), f"written outside: {target}"
    assert not any(ctx.outside.iterdir())
    assert requests.get(f"{ctx.url}/info/", timeout=TIMEOUT).status_code == 200  # still serves
    assert files_of(ctx.studies) == files
    assert datastore(ctx.url) == listing
    assert temp_left(ctx.tmpdir) == []


def make_context(root: Path, sample_studies_dir: Path) -> SimpleNamespace:
    ctx = SimpleNamespace(studies=copy_studies(sample_studies_dir, root / "studies"),
                          tmpdir=root / "tmp", outside=root / "outside")
    ctx.tmpdir.mkdir()
    ctx.outside.mkdir()
    return ctx


@pytest.fixture(scope="module")
def plain(monailabel_server, sample_studies_dir, tmp_path_factory):
    """No models (an app folder without checkpoints), bodies up to 1 MB, its own TMPDIR and studies."""
    ctx = make_context(tmp_path_factory.mktemp("hardening-plain"), sample_studies_dir)
    conf = {"upload_mb": "1", "fastsam3d_checkpoint": ctx.outside / "none.pth"}  # for a model folder with checkpoints
    server = monailabel_server(conf=conf, studies=ctx.studies, env={"TMPDIR": str(ctx.tmpdir)})
    ctx.url, ctx.work_dir = server.url, server.log_path.parent
    return ctx


@pytest.fixture(scope="module")
def clicks(monailabel_server, sample_studies_dir, tmp_path_factory, click_marker_checkpoint):
    """The test-double click model (tests/marker_app: the real app plus a fast model)."""
    ctx = make_context(tmp_path_factory.mktemp("hardening-clicks"), sample_studies_dir)
    conf = {"models": "click_marker", "click_marker_checkpoint": click_marker_checkpoint}
    server = monailabel_server(conf=conf, studies=ctx.studies, app_dir=MARKER_APP, env={"TMPDIR": str(ctx.tmpdir)})
    ctx.url, ctx.work_dir = server.url, server.log_path.parent
    return ctx


def outside(folder: Path, path: Path) -> list:
    """[path] if it lies outside folder (the studies folder's own changes are caught by its snapshot)."""
    return [] if path == folder or folder in path.parents else [path]


def test_label_tags_cannot_leave_the_labels_folder(plain):
    labels = plain.studies / "labels"
    for tag in ("../../../../x", os.path.relpath(plain.outside / "rel", labels), str(plain.outside / "abs"),
                deep(Path(f"/samlabel-{uuid.uuid4().hex}")), "..", ".", "a/b", ".hidden"):
        folder = Path(os.path.normpath(labels / tag))  # where MONAI Label would write <id>.nii.gz
        with changes_nothing(plain, *outside(plain.studies, folder)):
            response = requests.put(f"{plain.url}/datastore/label", params={"image": IMAGE, "tag": tag},
                                    files={"label": ("label.nii.gz", nifti_gz(label_array(1)))}, timeout=TIMEOUT)
            assert_refused(response, 400, "label tag")


def test_image_ids_cannot_leave_the_studies_folder(plain):
    for image in ("../../x", os.path.relpath(plain.outside / "rel", plain.studies), str(plain.outside / "abs"),
                  deep(Path(f"/samlabel-{uuid.uuid4().hex}")), "..", ".hidden", "a/b"):
        target = Path(os.path.normpath(plain.studies / (image + ".nii.gz")))
        with changes_nothing(plain, *outside(plain.studies, target)):
            response = requests.put(f"{plain.url}/datastore/image", params={"image": image},
                                    files={"file": ("upload.nii.gz", nifti_gz(label_array(2)))}, timeout=TIMEOUT)
            assert_refused(response, 400, "image id")


def tar_with(*members) -> bytes:
    """members: (name, data) for files, (name, None, link target) for a symlink."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data, *link in members:
            info = tarfile.TarInfo(name)
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, link[0]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_with(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


def test_session_archives_cannot_write_outside(plain):
    sessions = plain.work_dir / "sessions"  # conftest's MONAI_LABEL_SESSION_PATH
    before = sorted(p.name for p in sessions.iterdir()) if sessions.exists() else []
    archives = {
        "dotdot.tar": tar_with((deep(plain.outside / "slip1"), b"x")),
        "absolute.tar": tar_with((str(plain.outside / "slip2"), b"x")),
        "link.tar": tar_with(("link", None, str(plain.outside)), ("link/slip3", b"x")),
        "inner.tar": tar_with(("ok/../../../../../../../../../../../../../../../..", b"x")),
        "dotdot.zip": zip_with(deep(plain.outside / "slip4"), b"x"),
    }
    for name, data in archives.items():
        with changes_nothing(plain, plain.outside / "slip1", plain.outside / "slip2", plain.outside / "slip4"):
            response = requests.put(f"{plain.url}/session/", params={"uncompress": "true"}, files={"files": (name, data)},
                                    timeout=TIMEOUT)
            assert_refused(response, 400, "unsafe archive member")
    assert (sorted(p.name for p in sessions.iterdir()) if sessions.exists() else []) == before
    with changes_nothing(plain):
        response = requests.put(f"{plain.url}/session/", params={"uncompress": "true"},
                                files={"files": ("junk.tar", b"not an archive")}, timeout=TIMEOUT)
        assert_refused(response, 400, "tar or zip")
    # a safe archive still makes a session, unpacked inside the session store
    response = requests.put(f"{plain.url}/session/", params={"uncompress": "true"},
                            files={"files": ("series.tar", tar_with(("series/a.nii.gz", nifti_gz(label_array(3)))))},
                            timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert (Path(response.json()["session_info"]["image"]) / "series" / "a.nii.gz").is_file()
    assert temp_left(plain.tmpdir) == []


def multipart_chunks(field: str, size: int, boundary: str = "samlabel"):
    """A valid multipart body sent chunked (no Content-Length): the server must count it as it arrives."""
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="big.nii.gz"\r\n'
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    for _ in range(size // 2**16):
        yield bytes(2**16)
    yield f"\r\n--{boundary}--\r\n".encode()


def test_bodies_over_upload_mb_are_refused_with_413(plain):
    port = int(plain.url.rsplit(":", 1)[1])
    for method, path, field in UPLOAD_ROUTES:
        with changes_nothing(plain, plain.studies / "big.nii.gz", plain.studies / "labels" / "big"):
            # announced 512 MB: answered at once, before any of the body is sent
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                connection.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {512 * 2**20}\r\n"
                                   "Content-Type: multipart/form-data; boundary=samlabel\r\n\r\n".encode())
                head = b"".join(iter(lambda: connection.recv(65536), b"")).decode()  # it closes the connection
            assert head.startswith("HTTP/1.1 413"), head
            assert "upload_mb" in head and "1 MB" in head
            # 3 MB chunked: cut off at 1 MB
            response = requests.request(method, plain.url + path, data=multipart_chunks(field, 3 * 2**20), timeout=TIMEOUT,
                                        headers={"Content-Type": "multipart/form-data; boundary=samlabel"})
            assert_refused(response, 413, "upload_mb")
    # under the limit, a label is saved
    response = requests.put(f"{plain.url}/datastore/label", params={"image": IMAGE, "tag": "small"},
                            files={"label": ("label.nii.gz", nifti_gz(label_array(4)))}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert (plain.studies / "labels" / "small" / f"{IMAGE}.nii.gz").is_file()


def test_uploads_refused_after_copying_leave_no_temp_files(plain):
    with changes_nothing(plain):  # MONAI Label copied the upload to TMPDIR before the model look-up
        response = requests.post(f"{plain.url}/infer/no_such_model", params={"image": IMAGE},
                                 files={"file": ("volume.nii.gz", nifti_gz(label_array(5)))}, timeout=TIMEOUT)
        assert_refused(response, 400, "no_such_model")
    with changes_nothing(plain):  # the datastore refuses the extension after MONAI Label's copy
        response = requests.put(f"{plain.url}/datastore/label", params={"image": IMAGE, "tag": "final"},
                                files={"label": ("label.nii.bad ext", b"x")}, timeout=TIMEOUT)
        assert_refused(response, 400, "extension")
    with changes_nothing(plain, plain.studies / "odd.nii.bad ext"):
        response = requests.put(f"{plain.url}/datastore/image", params={"image": "odd"},
                                files={"file": ("odd.nii.bad ext", b"x")}, timeout=TIMEOUT)
        assert_refused(response, 400, "extension")
    with changes_nothing(plain):
        response = requests.put(f"{plain.url}/datastore/label", params={"image": "no_such_image", "tag": "final"},
                                files={"label": ("label.nii.gz", nifti_gz(label_array(6)))}, timeout=TIMEOUT)
        assert_refused(response, 404, "image not found")


def click_params(**extra) -> dict:
    return {"foreground": [CLICK], "background": [], "client_id": "hardening", "result_extension": ".nrrd",
            "result_dtype": "uint8", **extra}


def infer(url: str, query: dict, params: dict):
    return requests.post(f"{url}/infer/click_marker", params=query, files={"params": (None, json.dumps(params))},
                         timeout=TIMEOUT)


def test_infer_reads_only_datastore_ids_and_sessions(clicks):
    existing = [Path("/etc/passwd"), clicks.studies / f"{IMAGE}.nii.gz", clicks.work_dir / "server.log"]
    paths = [str(p) for p in existing] + [f"/etc/samlabel-{uuid.uuid4().hex}", "server.log", "../../../../etc/passwd",
                                          os.path.relpath(clicks.studies / f"{IMAGE}.nii.gz", clicks.work_dir)]
    answers = set()
    for path in paths:
        with changes_nothing(clicks):
            for query, params in (({"image": path}, click_params()), ({"image": IMAGE}, click_params(image=path)),
                                  ({"image": ""}, click_params(image=path))):
                response = infer(clicks.url, query, params)
                answers.add((response.status_code, response.text))
    assert len(answers) == 1, answers  # existing files and others alike
    assert_refused(response, 404, "image not found")
    for session_id in ("../sessions", f"../../{clicks.studies.name}", "no-such-session"):
        assert_refused(infer(clicks.url, {"image": "", "session_id": session_id}, click_params()), 404, "session")
    # what the front ends send still works: a session's volume, and an uploaded file
    volume = (clicks.studies / f"{IMAGE}.nii.gz").read_bytes()
    session = requests.put(f"{clicks.url}/session/", files={"files": ("volume.nii.gz", volume)}, timeout=TIMEOUT)
    assert session.status_code == 200, session.text
    response = infer(clicks.url, {"image": "", "session_id": session.json()["session_id"]}, click_params())
    assert response.status_code == 200, response.text[:500]
    response = requests.post(f"{clicks.url}/infer/click_marker", files={"params": (None, json.dumps(click_params())),
                             "file": ("volume.nii.gz", volume)}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text[:500]
    assert temp_left(clicks.tmpdir) == []


def test_infer_label_tags_cannot_leave_the_labels_folder(clicks):
    labels = clicks.studies / "labels"
    for tag in ("../../../../x", deep(Path(f"/samlabel-{uuid.uuid4().hex}")), str(clicks.outside / "abs"),
                os.path.relpath(clicks.outside / "rel", labels), "..", "a/b"):
        folder = Path(os.path.normpath(labels / tag))
        with changes_nothing(clicks, *outside(clicks.studies, folder)):
            response = infer(clicks.url, {"image": IMAGE}, click_params(save_label=True, label_tag=tag))
            assert_refused(response, 400, "label_tag")
    # a plain tag is saved where it belongs
    response = infer(clicks.url, {"image": IMAGE}, click_params(save_label=True, label_tag="clicks", reset_state=True))
    assert response.status_code == 200, response.text[:500]
    assert [p.name for p in (labels / "clicks").iterdir()] == [f"{IMAGE}.nrrd"]
    assert "clicks" in datastore(clicks.url)["objects"][IMAGE]["labels"]


def test_a_failed_result_write_leaves_no_temp_file(clicks):
    for dtype in ("no-such-dtype", "int1024"):
        with changes_nothing(clicks):
            response = infer(clicks.url, {"image": IMAGE}, click_params(result_dtype=dtype))
            assert 400 <= response.status_code < 500, response.text[:500]


def test_an_unreadable_datastore_json_is_set_aside_and_rebuilt(sample_studies_dir, tmp_path):
    """What a kill during MONAI Label's own save left (an empty JSON) no longer stops the server. The start
    also leaves nothing in TMPDIR (MONAI Label wrote its logging config there as tmp*.json)."""
    ctx = make_context(tmp_path, sample_studies_dir)
    (ctx.studies / "labels" / "final").mkdir(parents=True)
    label = label_array(7)
    (ctx.studies / "labels" / "final" / f"{IMAGE}.nii.gz").write_bytes(nifti_gz(label))
    (ctx.studies / "datastore_v2.json").write_bytes(b"")
    server = start_server(APP_DIR, ctx.studies, {"fastsam3d_checkpoint": ctx.outside / "none.pth"}, tmp_path,
                          env={"TMPDIR": str(ctx.tmpdir)})
    try:
        listing = datastore(server.url)
        assert "final" in listing["objects"][IMAGE]["labels"]
        assert len(listing["objects"]) == 2
        assert len(list(ctx.studies.glob("datastore_v2.json.corrupt-*"))) == 1
        json.loads((ctx.studies / "datastore_v2.json").read_text())
        assert temp_left(ctx.tmpdir, settle_s=10) == []
    finally:
        server.stop()


def saves_until_killed(url: str, round_number: int, acknowledged: dict, refused: list, first_ack: threading.Event):
    """PUT /datastore/label in a loop, each to a new tag (so no later save overwrites an acknowledged one)."""
    for number in range(200):
        tag, array = f"r{round_number}n{number}", label_array(1000 * round_number + number)
        try:
            response = requests.put(f"{url}/datastore/label", params={"image": IMAGE, "tag": tag},
                                    files={"label": ("label.nii.gz", nifti_gz(array))}, timeout=TIMEOUT)
        except requests.RequestException:
            return  # killed
        if response.status_code == 200:
            acknowledged[tag] = array
            first_ack.set()
        else:
            refused.append((tag, response.status_code, response.text))


def assert_labels_intact(url: str, studies: Path, labels: dict) -> None:
    json.loads((studies / "datastore_v2.json").read_text())
    for tag, array in labels.items():
        response = requests.get(f"{url}/datastore/label", params={"label": IMAGE, "tag": tag}, timeout=TIMEOUT)
        assert response.status_code == 200, f"{tag}: {response.text}"
        loaded = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
        assert np.array_equal(np.asarray(loaded.dataobj), array), tag
    assert not list(studies.rglob("*.part")), "temporary files of interrupted writes are removed at start"


def test_sigkill_during_label_saves_keeps_every_acknowledged_label(sample_studies_dir, tmp_path):
    """Each round: start, check every label acknowledged so far, save labels in a loop, SIGKILL the
    server at a varied delay after its first acknowledged save (a save takes ~0.1 s: the kill lands
    in the upload, the label write, the JSON write or between), repeat."""
    studies = copy_studies(sample_studies_dir, tmp_path / "studies")
    conf = {"fastsam3d_checkpoint": tmp_path / "none.pth"}
    acknowledged, refused = {}, []
    delays_s = (0.0, 0.03, 0.06, 0.1, 0.15, 0.25, 0.4)
    for round_number, delay_s in enumerate([*delays_s, None]):
        work_dir = tmp_path / f"run{round_number}"
        work_dir.mkdir()
        server = start_server(APP_DIR, studies, conf, work_dir)  # raises if it does not start
        _running_servers.append(server)
        try:
            assert_labels_intact(server.url, studies, acknowledged)
            if delay_s is None:
                break
            first_ack = threading.Event()
            saving = threading.Thread(target=saves_until_killed,
                                      args=(server.url, round_number, acknowledged, refused, first_ack))
            saving.start()
            assert first_ack.wait(TIMEOUT), f"no label save acknowledged in {TIMEOUT} s: {refused}"
            time.sleep(delay_s)
            os.killpg(server.proc.pid, signal.SIGKILL)  # its own process group (start_new_session)
            server.proc.wait(timeout=30)
            saving.join(timeout=TIMEOUT)
            assert refused == []
        finally:
            server.stop()
            _running_servers.remove(server)
    assert len(acknowledged) >= len(delays_s)
