"""Two annotators on one image through a real server, OHIF-shaped (no client id) and Slicer-shaped
(the plugin's default client id, the same for everyone): each keeps an interaction of their own,
told apart by the connection's address (127.0.0.1 and 127.0.0.2, both loopback)."""

import json

import numpy as np
import pytest
import requests
from requests_toolbelt.adapters.source import SourceAddressAdapter

from conftest import REPO_ROOT
from test_click3d_server import parse_multipart

MARKER_APP = REPO_ROOT / "tests" / "marker_app"
IMAGE = "ct_synthetic"
CLICK_A, CLICK_B = (40, 40, 15), (130, 100, 45)  # far apart on the sample CT (171 x 143 x 57)


@pytest.fixture(scope="module")
def server(monailabel_server, click_marker_checkpoint):
    conf = {"models": "click_marker", "click_marker_checkpoint": click_marker_checkpoint}
    return monailabel_server(conf=conf, app_dir=MARKER_APP)


def session_from(address: str) -> requests.Session:
    session = requests.Session()
    session.mount("http://", SourceAddressAdapter(address))
    return session


def infer(session, url, model, params):
    response = session.post(f"{url}/infer/{model}", params={"image": IMAGE},
                            files={"params": (None, json.dumps({"result_extension": ".nrrd", **params}))}, timeout=120)
    assert response.status_code == 200, response.text
    return response


def centroid(response, tmp_path):
    import SimpleITK as sitk

    params, path = parse_multipart(response, tmp_path)
    voxels = np.argwhere(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0) > 0)
    return params, voxels.mean(0)


@pytest.mark.parametrize("client_params", [{}, {"client_id": "user-xyz", "label": "segment"}], ids=["ohif", "slicer-default"])
def test_two_annotators_on_one_image_keep_their_own_interactions(server, tmp_path, client_params):
    alice, bob = session_from("127.0.0.1"), session_from("127.0.0.2")
    infer(alice, server.url, "click_marker", {"foreground": [list(CLICK_A)], "background": [], **client_params})
    infer(bob, server.url, "click_marker", {"foreground": [list(CLICK_B)], "background": [], **client_params})
    # Alice's companion shows the uncertainty of her own interaction, around her click
    _, bands = centroid(infer(alice, server.url, "click_marker_uncertainty", dict(client_params)), tmp_path)
    assert np.linalg.norm(bands - CLICK_A) < 5 < np.linalg.norm(bands - CLICK_B), bands
    # and her next click still continues her interaction (Bob's click in between did not replace it)
    second = infer(alice, server.url, "click_marker", {"foreground": [list(CLICK_A), [CLICK_A[0] + 2, *CLICK_A[1:]]],
                                                       "background": [], **client_params})
    params, mask = centroid(second, tmp_path)
    assert params["window_reused"] and np.linalg.norm(mask - CLICK_A) < 5
    assert "host 127.0.0.2" in server.log() and "host 127.0.0.1" in server.log()
