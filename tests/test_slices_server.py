"""MedSAM and SAM-Med2D through a real `monailabel start_server`: seeded full-size checkpoints in
the official formats (MedSAM a bare SAM state dict, SAM-Med2D under 'model'), Slicer requests with
`slice` and OHIF requests without, the mask on the clicked slice only."""

import json

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from test_click3d_server import assert_same_geometry, click_studies, ohif_infer, parse_multipart, slicer_infer  # noqa: F401 - fixture

SLICE = 5


@pytest.fixture(scope="session")
def slice_server(monailabel_server, click_studies, slice_checkpoints):
    conf = {"models": "medsam,sam_med2d", "medsam_checkpoint": slice_checkpoints["medsam"],
            "sam_med2d_checkpoint": slice_checkpoints["sam_med2d"]}
    return monailabel_server(conf=conf, studies=click_studies)


def test_info_shows_2d_models_to_the_plugins(slice_server):
    models = requests.get(f"{slice_server.url}/info/", timeout=30).json()["models"]
    assert {name: (m["type"], m["dimension"]) for name, m in models.items()} == {
        "medsam": ("deepgrow", 2), "sam_med2d": ("deepgrow", 2), "medsam_3d": ("deepgrow", 3), "sam_med2d_3d": ("deepgrow", 3),
        "medsam_uncertainty": ("segmentation", 2), "sam_med2d_uncertainty": ("segmentation", 2)}


@pytest.mark.parametrize("model,extra", [("sam_med2d", {}), ("medsam", {"roi": [10, 40, 12, 30, SLICE, SLICE]})])
def test_slicer_request_with_slice(slice_server, click_studies, tmp_path, model, extra):
    clicks = [[30, 20, SLICE]]
    response = slicer_infer(slice_server.url, model, "phantom_lps", clicks, slice=SLICE, **extra)
    assert response.status_code == 200, response.text
    params, path = parse_multipart(response, tmp_path)
    result = sitk.ReadImage(str(path))
    assert_same_geometry(result, sitk.ReadImage(str(click_studies / "phantom_lps.nii.gz")))
    mask = sitk.GetArrayFromImage(result).transpose(2, 1, 0)
    others = np.delete(mask, SLICE, axis=2)
    assert params["slice"] == SLICE and others.sum() == 0 and params["voxels"] == mask[:, :, SLICE].sum()


def test_ohif_request_without_slice(slice_server, tmp_path):
    response = ohif_infer(slice_server.url, "sam_med2d", "phantom_ras", [[30, 20, SLICE]], [[10, 10, SLICE]])
    assert response.status_code == 200, response.text
    path = tmp_path / "ohif.nrrd"
    path.write_bytes(response.content)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)
    assert mask.shape == (61, 53, 41)  # the phantom's own grid
    assert np.delete(mask, SLICE, axis=2).sum() == 0


@pytest.mark.parametrize("model,foreground,extra,message", [
    ("sam_med2d", [[30, 20, SLICE], [30, 20, SLICE + 1]], {}, "one slice"),
    ("sam_med2d", [[30, 20, SLICE]], {"slice": SLICE + 2}, "do not all lie on slice"),
    ("medsam", [], {"slice": SLICE, "roi": [10, 10, 12, 30, SLICE, SLICE]}, "empty"),
    ("sam_med2d", [[30, 20, SLICE]], {"slice": "abc"}, "`slice`"),
    ("sam_med2d", [[30, 20, SLICE]], {"slice": "5.0"}, "`slice`"),
    ("sam_med2d", [[30, 20, SLICE]], {"slice": [SLICE]}, "`slice`"),
    ("medsam", [], {"slice": SLICE, "roi": [10, 40, 12]}, "`roi`"),
    ("medsam", [], {"slice": SLICE, "roi": [10, 40, 12, float("nan"), SLICE, SLICE]}, "`roi`"),
    ("sam_med2d_3d", [[30, 20]], {}, "three voxel indices"),
    ("sam_med2d", [[30, 20, SLICE]], {"uncertainty": True, "ensemble_size": "abc"}, "ensemble_size"),
])
def test_bad_2d_requests(slice_server, model, foreground, extra, message):
    response = slicer_infer(slice_server.url, model, "phantom_ras", foreground, **extra)
    assert response.status_code == 400 and message in response.json()["detail"], response.text


def test_propagation_task_answers_a_3d_request(slice_server, click_studies, tmp_path):
    """As Slicer asks a 3D model: all clicks of the segment, no slice; the last positive click's slice starts."""
    response = slicer_infer(slice_server.url, "sam_med2d_3d", "phantom_ras", [[30, 20, 3], [30, 22, SLICE]], [[5, 5, SLICE]])
    assert response.status_code == 200, response.text
    params, path = parse_multipart(response, tmp_path)
    assert params["slice"] == SLICE and "stopped" in params
    assert_same_geometry(sitk.ReadImage(str(path)), sitk.ReadImage(str(click_studies / "phantom_ras.nii.gz")))


@pytest.mark.parametrize("model,extra", [("sam_med2d", {}), ("medsam", {"roi": [10, 40, 12, 30, SLICE, SLICE]})])
def test_uncertainty_for_a_2d_model(slice_server, click_studies, tmp_path, model, extra):
    clicks = [[30, 20, SLICE]]
    response = slicer_infer(slice_server.url, model, "phantom_ras", clicks, client_id=f"unsure-{model}", slice=SLICE,
                            uncertainty=True, ensemble_size=5, **extra)
    assert response.status_code == 200, response.text
    params, _ = parse_multipart(response, tmp_path)
    assert "uncertainty_max" in params and params["suggested_click"][2] == SLICE
    bands = requests.post(f"{slice_server.url}/infer/{model}_uncertainty", params={"image": "phantom_ras"},
                          files={"params": (None, json.dumps({"client_id": f"unsure-{model}", "ensemble_size": 5}))},
                          timeout=300)
    assert bands.status_code == 200, bands.text
    _, path = parse_multipart(bands, tmp_path, ".nii.gz")
    image = sitk.ReadImage(str(path))
    assert_same_geometry(image, sitk.ReadImage(str(click_studies / "phantom_ras.nii.gz")))
    values = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    assert np.delete(values, SLICE, axis=2).max() == 0  # only the clicked slice has members that can disagree
