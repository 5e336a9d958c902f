"""Two real app replicas behind real nginx (deploy/nginx-replicas.conf via scripts/replicas.py), both
serving one Orthanc DICOMweb store, with the `click_marker` test-double model.

Annotators are told apart as nginx sees them, by address: each client here binds its own loopback
source address (127.0.0.x). Shown: an annotator's requests all reach one replica, proven by the
cache hits of its second click (the interaction and the window's embedding were there); a session
upload and the clicks on it meet; a label saved through nginx lands in Orthanc as DICOM SEG; and
when an annotator's replica is killed, its next click is served by the other replica without an
error, as a new interaction that says so.
"""

import io
import json
from email.policy import default as email_policy
from email.parser import BytesParser
from pathlib import Path

import pydicom
import pytest
import requests
from requests_toolbelt.adapters.source import SourceAddressAdapter

from conftest import REPO_ROOT, _free_port, dicomweb_store, load_module, start_server

replicas = load_module(REPO_ROOT / "scripts" / "replicas.py")
MARKER_APP = REPO_ROOT / "tests" / "marker_app"
CLICK = [65, 90, 18]  # inside the phantom's body (171 x 143 x 57)
MISSING = replicas.nginx_missing() or dicomweb_store.orthanc_missing()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs nginx and Orthanc: {MISSING}"
                                       " (make system-packages installs them where apt-get can)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, orthanc_ct, click_marker_checkpoint):
    """{replica address: Server}, and nginx's URL in front of them."""
    conf = {"models": "click_marker", "click_marker_checkpoint": click_marker_checkpoint}
    servers = [start_server(MARKER_APP, orthanc_ct[0].url, conf, tmp_path_factory.mktemp(f"replica{n}")) for n in range(2)]
    port = _free_port()
    nginx = replicas.start_nginx(port, [s.url for s in servers], tmp_path_factory.mktemp("nginx"))
    try:
        yield {s.url.split("://", 1)[1]: s for s in servers}, f"http://127.0.0.1:{port}"
    finally:
        dicomweb_store.stop_process_group(nginx)
        for server in servers:
            server.stop()


def client(address: str) -> requests.Session:
    """An annotator at its own address."""
    session = requests.Session()
    session.mount("http://", SourceAddressAdapter(address))
    return session


@pytest.fixture(scope="module")
def annotators(cluster):
    """One client address per replica: {replica address: Session}."""
    servers, url = cluster
    found = {}
    for n in range(2, 60):
        session = client(f"127.0.0.{n}")
        replica = session.get(f"{url}/info/", timeout=60).headers["X-Samlabel-Replica"]
        found.setdefault(replica, session)
        if len(found) == len(servers):
            return found
    pytest.fail(f"58 addresses all hashed onto {list(found)}")


def click(session, url, series, foreground, **extra):
    """A Slicer-shaped click (the label file and the JSON result in one multipart answer): (replica, JSON)."""
    params = {"foreground": foreground, "background": [], "client_id": "annotator", "result_extension": ".nrrd", **extra}
    response = session.post(f"{url}/infer/click_marker", params={"image": series, "output": "all"},
                            files={"params": (None, json.dumps(params))}, timeout=300)
    assert response.status_code == 200, response.text
    message = BytesParser(policy=email_policy).parsebytes(
        b"Content-Type: " + response.headers["content-type"].encode() + b"\r\n\r\n" + response.content)
    parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
             for part in message.iter_parts()}
    return response.headers["X-Samlabel-Replica"], json.loads(parts["params"])


def test_each_annotator_stays_on_one_replica_with_its_caches(cluster, annotators, orthanc_ct):
    _servers, url = cluster
    for replica, session in annotators.items():
        first_replica, first = click(session, url, orthanc_ct[2], [CLICK])
        second_replica, second = click(session, url, orthanc_ct[2], [CLICK, [CLICK[0] + 3, *CLICK[1:]]])
        assert first_replica == second_replica == replica
        assert second["interaction_continued"] and second["window_reused"] and second["embedding_reused"]
        assert all(session.get(f"{url}/info/", timeout=30).headers["X-Samlabel-Replica"] == replica for _ in range(5))


def test_a_session_upload_and_its_clicks_meet(cluster, annotators, sample_studies_dir, tmp_path):
    """Slicer's path for a local volume: PUT /session/ then clicks with its session_id."""
    _servers, url = cluster
    session = next(iter(annotators.values()))
    with open(Path(sample_studies_dir) / "ct_synthetic.nii.gz", "rb") as f:
        created = session.put(f"{url}/session/", files={"files": ("ct.nii.gz", f)}, timeout=120)
    assert created.status_code == 200, created.text
    params = {"foreground": [[80, 70, 28]], "background": [], "client_id": "annotator"}
    response = session.post(f"{url}/infer/click_marker", params={"image": "", "session_id": created.json()["session_id"],
                                                                "output": "json"},
                            files={"params": (None, json.dumps(params))}, timeout=300)
    assert response.status_code == 200, response.text


def test_a_label_saved_through_any_replica_lands_in_orthanc(cluster, annotators, orthanc_ct, tmp_path):
    _servers, url = cluster
    store, study, series = orthanc_ct
    for session in annotators.values():  # each through its own replica
        click(session, url, series, [CLICK], client_id="saver", save_label=True)
    found = requests.post(f"{store.base}/tools/find", json={"Level": "Instance", "Query": {
        "Modality": "SEG", "StudyInstanceUID": study}}, timeout=30).json()
    assert len(found) == 2
    for instance in found:
        seg = pydicom.dcmread(io.BytesIO(requests.get(f"{store.base}/instances/{instance}/file", timeout=30).content))
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series


def test_a_killed_replicas_annotator_goes_on_elsewhere(cluster, annotators, orthanc_ct):
    servers, url = cluster
    replica, session = next(iter(annotators.items()))
    click(session, url, orthanc_ct[2], [CLICK])
    servers[replica].stop()  # killed mid-session
    tried, result = click(session, url, orthanc_ct[2], [CLICK, [CLICK[0] + 3, *CLICK[1:]]])
    assert tried.split(", ") == [replica, next(r for r in servers if r != replica)]  # the dead one, then the other
    assert result["interaction_continued"] is False  # a new interaction on the other replica, and it says so
