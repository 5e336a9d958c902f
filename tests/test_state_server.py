"""Interaction state when the image file under a datastore id changes, through a real server:
a replaced image (other size and geometry) and one rewritten with the same size and mtime are
both read again, and the interaction made on the old file is not continued on the new one."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk

from conftest import REPO_ROOT
from test_click3d_server import parse_multipart

MARKER_APP = REPO_ROOT / "tests" / "marker_app"


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("state-studies")
    save(folder / "changing.nii.gz", (60, 50, 40), np.diag([1.0, 1.0, 2.0, 1.0]))
    save(folder / "steady.nii", (40, 40, 20), np.eye(4))
    return folder


def save(path, shape, affine, value=100):
    array = np.zeros(shape, np.int16)
    array[shape[0] // 4: 3 * shape[0] // 4, shape[1] // 4: 3 * shape[1] // 4, :] = value
    nib.save(nib.Nifti1Image(array, affine), str(path))


@pytest.fixture(scope="module")
def server(monailabel_server, click_marker_checkpoint, studies):
    conf = {"models": "click_marker", "click_marker_checkpoint": click_marker_checkpoint}
    return monailabel_server(conf=conf, studies=studies, app_dir=MARKER_APP)


def click(server, foreground, tmp_path, image="changing"):
    body = {"foreground": foreground, "background": [], "client_id": "state", "label": "segment",
            "result_extension": ".nrrd"}
    response = requests.post(f"{server.url}/infer/click_marker", params={"image": image},
                             files={"params": (None, json.dumps(body))}, timeout=120)
    assert response.status_code == 200, response.text
    params, path = parse_multipart(response, tmp_path)
    return params, sitk.ReadImage(str(path))


def test_a_replaced_image_is_read_again_and_starts_a_new_interaction(server, studies, tmp_path):
    params, first = click(server, [[30, 25, 20]], tmp_path)
    assert first.GetSize() == (60, 50, 40)
    replacement = tmp_path / "replacement.nii.gz"
    save(replacement, (70, 64, 30), np.diag([-0.8, 0.9, 3.0, 1.0]))  # other size, axes flipped, anisotropic
    shutil.copy(replacement, studies / "changing.nii.gz")
    params, second = click(server, [[30, 25, 20], [31, 25, 20]], tmp_path)
    assert second.GetSize() == (70, 64, 30) and second.GetSpacing() == pytest.approx((0.8, 0.9, 3.0))
    assert not params["window_reused"]  # the old file's window is not continued on the new one


def test_a_file_rewritten_with_the_same_size_and_mtime_is_read_again(server, studies, tmp_path):
    target = studies / "steady.nii"  # uncompressed: the size depends on the shape alone
    params, _ = click(server, [[20, 20, 10]], tmp_path, image="steady")
    stat = os.stat(target)
    rewritten = tmp_path / "rewritten.nii"
    save(rewritten, (40, 40, 20), np.eye(4), value=7)
    with open(rewritten, "rb") as source, open(target, "r+b") as out:  # in place: the same inode
        out.write(source.read())
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (os.stat(target).st_size, os.stat(target).st_mtime_ns, os.stat(target).st_ino) == (
        stat.st_size, stat.st_mtime_ns, stat.st_ino)
    params, _ = click(server, [[20, 20, 10], [21, 20, 10]], tmp_path, image="steady")
    assert not params["window_reused"]  # read again (its ctime changed): a new image, a new interaction
