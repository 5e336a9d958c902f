"""Click segmentation through a real `monailabel start_server`, with requests shaped like the
stock Slicer plugin's and OHIF's, seeded checkpoints in the official formats, and results read
back with SimpleITK and nibabel."""

import json
import time
from email.parser import BytesParser
from email.policy import default as email_policy

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests
import SimpleITK as sitk


PHANTOM_SHAPE = (61, 53, 41)
PHANTOM_SPACING = (1.2, 0.9, 2.0)
PHANTOM_CLICK = (30, 20, 22)  # voxel of the RAS copy, on the ellipsoid
TIMEOUT = 300
CT_ID = "ct_synthetic"  # datastore id of the sample CT


def phantom_copies():
    """One physical ellipsoid phantom stored three ways: RAS, LPS (two axes flipped) and with
    permuted axes. Returns {name: (array, affine, index of PHANTOM_CLICK in that storage)}."""
    ras_affine = np.diag([*PHANTOM_SPACING, 1.0])
    ras_affine[:3, 3] = [-30.0, 12.0, -40.0]
    i, j, k = np.meshgrid(*(np.arange(n) for n in PHANTOM_SHAPE), indexing="ij")
    inside = ((i - 30) / 14) ** 2 + ((j - 24) / 12) ** 2 + ((k - 20) / 9) ** 2 <= 1
    ras = np.where(inside, 300, 20).astype(np.int16) + (i % 7).astype(np.int16)  # texture breaks symmetries
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [PHANTOM_SHAPE[0] - 1, PHANTOM_SHAPE[1] - 1]
    lps_affine = ras_affine @ flip
    order = [2, 0, 1]
    permute = np.eye(4)[:, order + [3]]
    copies = {
        "phantom_ras": (ras, ras_affine),
        "phantom_lps": (ras[::-1, ::-1, :].copy(), lps_affine),
        "phantom_permuted": (ras.transpose(order).copy(), ras_affine @ permute),
    }
    click_ras = nib.affines.apply_affine(ras_affine, PHANTOM_CLICK)
    return {name: (array, affine, np.round(nib.affines.apply_affine(np.linalg.inv(affine), click_ras)).astype(int))
            for name, (array, affine) in copies.items()}


def save_nifti(array, affine, path):
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


@pytest.fixture(scope="session")
def click_studies(tmp_path_factory, sample_studies_module):
    folder = tmp_path_factory.mktemp("click-studies")
    sample_studies_module.write_ct(folder / sample_studies_module.CT_NAME)
    for name, (array, affine, _) in phantom_copies().items():
        save_nifti(array, affine, folder / f"{name}.nii.gz")
    save_nifti(np.ones((40, 40), np.int16), np.eye(4), folder / "flat_2d.nii.gz")
    save_nifti(np.ones((20, 20, 20, 3), np.int16), np.eye(4), folder / "four_d.nii.gz")
    nan_volume = np.ones((20, 20, 20), np.float32)
    nan_volume[3, 4, 5] = np.nan
    save_nifti(nan_volume, np.eye(4), folder / "has_nan.nii.gz")
    (folder / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really a gzip file" * 10)
    return folder


@pytest.fixture(scope="session")
def server(monailabel_server, click_studies, checkpoints):
    conf = {"fastsam3d_checkpoint": checkpoints["fastsam3d"], "sam_med3d_checkpoint": checkpoints["sam_med3d"]}
    return monailabel_server(conf=conf, studies=click_studies)


def slicer_infer(url, model, image, foreground, background=(), label="segment", client_id="user-xyz", extension=".nrrd",
                 **extra):
    """POST /infer as the Slicer plugin does: multipart `params` with the full click history, the
    segment name, client id, every model config key, result extension and dtype."""
    params = {"label": label, "foreground": [list(map(int, p)) for p in foreground],
              "background": [list(map(int, p)) for p in background], "reset_state": False, "device": "cpu",
              "result_extension": extension, "result_dtype": "uint8", "client_id": client_id, **extra}
    response = requests.post(f"{url}/infer/{model}", params={"image": image}, files={"params": (None, json.dumps(params))},
                             timeout=TIMEOUT)
    return response


def parse_multipart(response, tmp_path, extension=".nrrd"):
    """The Slicer plugin's reading of the answer: JSON `params` part and the label file part."""
    message = BytesParser(policy=email_policy).parsebytes(
        b"Content-Type: " + response.headers["content-type"].encode() + b"\r\n\r\n" + response.content)
    parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in message.iter_parts()}
    result = tmp_path / f"result{extension}"
    result.write_bytes(parts["image"])
    return json.loads(parts["params"]), result


def ohif_infer(url, model, image, foreground, background=(), **options):
    """POST /infer as OHIF's MonaiLabelClient does: output=image, no label, no client_id; options:
    the config keys a user changed in its Options dialog."""
    params = {**options, "foreground": [list(map(int, p)) for p in foreground],
              "background": [list(map(int, p)) for p in background],
              "result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}
    return requests.post(f"{url}/infer/{model}", params={"image": image, "output": "image"},
                         files={"params": (None, json.dumps(params))}, timeout=TIMEOUT)


def assert_same_geometry(result: sitk.Image, reference: sitk.Image):
    assert result.GetSize() == reference.GetSize()
    assert np.allclose(result.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    assert np.allclose(result.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    assert np.allclose(result.GetDirection(), reference.GetDirection(), atol=1e-6)


def mask_inside_window(mask_ijk, image_affine, window_affine, size):
    """Window coordinates of every mask voxel lie inside the window."""
    u = nib.affines.apply_affine(np.linalg.inv(np.array(window_affine)) @ image_affine, mask_ijk)
    return np.all((u >= -0.5 - 1e-6) & (u <= size - 0.5 + 1e-6))


def test_info_lists_both_models_for_slicer_and_ohif(server):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    for name in ("fastsam3d", "sam_med3d"):
        model = info["models"][name]
        assert model["type"] == "deepgrow" and model["dimension"] == 3
        assert model["labels"] == ["region 1"]  # OHIF offers a segment only for declared labels
        assert "reset_state" in model["config"] and "device" in model["config"]


@pytest.mark.parametrize("model", ["fastsam3d", "sam_med3d"])
def test_slicer_request_on_oblique_lps_ct(server, click_studies, sample_studies_module, tmp_path, model):
    image_path = click_studies / sample_studies_module.CT_NAME
    shape = nib.load(str(image_path)).shape
    click = [shape[0] // 2 + 7, shape[1] // 2 - 5, shape[2] // 2 + 3]  # off-centre in all three axes
    response = slicer_infer(server.url, model, CT_ID, [click])
    assert response.status_code == 200, response.text
    params, result_path = parse_multipart(response, tmp_path)
    result = sitk.ReadImage(str(result_path))  # Slicer reads the header geometry
    assert_same_geometry(result, sitk.ReadImage(str(image_path)))
    mask = sitk.GetArrayFromImage(result).transpose(2, 1, 0)  # back to (i, j, k)
    assert mask.sum() > 0 and set(np.unique(mask)) <= {0, 1}
    assert params["voxels"] == int(mask.sum())
    affine = nib.load(str(image_path)).affine
    assert mask_inside_window(np.argwhere(mask), affine, params["window_affine"], params["window_size"])
    window_centre = nib.affines.apply_affine(np.array(params["window_affine"]), [(params["window_size"] - 1) / 2] * 3)
    assert np.allclose(window_centre, nib.affines.apply_affine(affine, click), atol=1e-3)  # centred on the click


def test_second_click_in_the_window_reuses_the_embedding(server, sample_studies_module, tmp_path):
    name, first = CT_ID, [70, 60, 25]
    response = slicer_infer(server.url, "fastsam3d", name, [first], client_id="reuse", label="kidney")
    assert response.status_code == 200, response.text
    assert parse_multipart(response, tmp_path)[0]["window_reused"] is False
    second = slicer_infer(server.url, "fastsam3d", name, [first, [72, 63, 26]], [[60, 60, 25]], client_id="reuse",
                          label="kidney")
    params, _ = parse_multipart(second, tmp_path)
    assert params["window_reused"] and params["embedding_reused"] and params["clicks_used"] == 3
    other_label = slicer_infer(server.url, "fastsam3d", name, [[72, 63, 26]], client_id="reuse", label="spleen")
    assert parse_multipart(other_label, tmp_path)[0]["window_reused"] is False  # a new interaction


def test_ohif_request_returns_voxels_in_the_stored_order(server, click_studies, tmp_path):
    """OHIF copies the returned voxels straight into its labelmap: the NRRD's array must be in
    the image's own voxel order, with the mask around the clicked voxel."""
    name, click = "phantom_lps", phantom_copies()["phantom_lps"][2]
    response = ohif_infer(server.url, "fastsam3d", name, [click])
    assert response.status_code == 200, response.text
    path = tmp_path / "ohif.nrrd"
    path.write_bytes(response.content)
    data, header = nrrd.read(str(path))  # index order as stored: (i, j, k)
    assert data.shape == PHANTOM_SHAPE and data.sum() > 0
    assert_same_geometry(sitk.ReadImage(str(path)), sitk.ReadImage(str(click_studies / f"{name}.nii.gz")))


def test_ohif_save_label_option_keeps_the_result_as_the_final_label(server, click_studies, tmp_path):
    """OHIF's Options dialog sends a task's config keys with the click: save_label=true stores the
    result as the image's `final` label (the task's label_tag), voxel for voxel."""
    name, click = "phantom_permuted", phantom_copies()["phantom_permuted"][2]
    response = ohif_infer(server.url, "sam_med3d", name, [click], save_label=True)
    assert response.status_code == 200, response.text
    (tmp_path / "result.nrrd").write_bytes(response.content)
    saved = requests.get(f"{server.url}/datastore/label", params={"label": name, "tag": "final"}, timeout=30)
    assert saved.status_code == 200
    (tmp_path / "saved.nrrd").write_bytes(saved.content)
    result, saved = (sitk.ReadImage(str(tmp_path / f)) for f in ("result.nrrd", "saved.nrrd"))
    assert_same_geometry(saved, sitk.ReadImage(str(click_studies / f"{name}.nii.gz")))
    assert np.array_equal(sitk.GetArrayFromImage(saved), sitk.GetArrayFromImage(result))
    assert sitk.GetArrayFromImage(saved).sum() > 0


def physical_mask(mask, name):
    """Bring a copy's mask into the RAS copy's voxel order."""
    if name == "phantom_lps":
        return mask[::-1, ::-1, :]
    if name == "phantom_permuted":
        return mask.transpose(1, 2, 0)
    return mask


def test_ras_lps_and_permuted_storage_give_the_same_physical_mask(server, click_studies, tmp_path):
    masks = {}
    for name, (_, affine, click) in phantom_copies().items():
        response = slicer_infer(server.url, "fastsam3d", name, [click], client_id=f"physical-{name}", extension=".nii.gz")
        assert response.status_code == 200, response.text
        params, path = parse_multipart(response, tmp_path, ".nii.gz")
        result = nib.load(str(path))
        assert np.allclose(result.affine, affine, atol=1e-4)  # nibabel: the input's exact affine
        masks[name] = physical_mask(np.asarray(result.dataobj), name)
    reference = masks["phantom_ras"]
    assert reference.sum() > 0
    for name, mask in masks.items():
        differing = int((mask != reference).sum())
        assert differing <= max(2, reference.sum() // 10000), f"{name}: {differing} voxels differ from the RAS copy"


def test_session_upload_then_infer(server, click_studies, tmp_path):
    """Slicer's path for a volume loaded locally: PUT /session/ then infer with session_id."""
    source = click_studies / "phantom_permuted.nii.gz"
    with open(source, "rb") as f:
        session = requests.put(f"{server.url}/session/", files={"files": ("volume.nii.gz", f)}, timeout=60).json()
    deadline = time.monotonic() + 60
    while f"prefetched {session['session_id']}" not in server.log():  # read in the background once uploaded
        assert time.monotonic() < deadline, "the uploaded volume was not read after the upload"
        time.sleep(0.1)
    params = {"label": "segment", "foreground": [phantom_copies()["phantom_permuted"][2].tolist()], "background": [],
              "client_id": "session-user", "result_extension": ".nrrd", "result_dtype": "uint8"}
    response = requests.post(f"{server.url}/infer/sam_med3d", params={"image": "", "session_id": session["session_id"]},
                             files={"params": (None, json.dumps(params))}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    _, path = parse_multipart(response, tmp_path)
    assert_same_geometry(sitk.ReadImage(str(path)), sitk.ReadImage(str(source)))


@pytest.mark.parametrize("image,foreground,background,status,message", [
    ("no_such_image", [[3, 4, 5]], [], 404, "image not found"),
    ("phantom_ras", [[61, 10, 10]], [], 400, "outside the image"),
    ("phantom_ras", [[-1, 10, 10]], [], 400, "outside the image"),
    ("phantom_ras", [], [[30, 20, 22]], 400, "at least one foreground"),
    ("phantom_ras", [[30, 20]], [], 400, "three voxel indices"),
    ("flat_2d", [[3, 4, 0]], [], 400, "3D volume"),
    ("four_d", [[3, 4, 5]], [], 400, "3D volume"),
    ("has_nan", [[3, 4, 5]], [], 400, "NaN"),
    ("corrupt", [[3, 4, 5]], [], 400, "cannot read image"),
])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(server, image, foreground, background, status, message):
    response = slicer_infer(server.url, "fastsam3d", image, foreground, background, client_id="bad-input")
    assert response.status_code == status and message in response.json()["detail"], response.text
    ok = slicer_infer(server.url, "fastsam3d", "phantom_ras", [PHANTOM_CLICK], client_id="bad-input")
    assert ok.status_code == 200, ok.text


def test_unknown_model_is_refused(server):
    response = slicer_infer(server.url, "no_such_model", "phantom_ras", [PHANTOM_CLICK])
    assert response.status_code == 400 and "no model 'no_such_model'" in response.json()["detail"]


def test_missing_checkpoint_is_reported_at_start_and_on_infer(monailabel_server, click_studies, tmp_path):
    missing = tmp_path / "nowhere" / "FastSAM3D.pth"
    server = monailabel_server(conf={"models": "fastsam3d", "fastsam3d_checkpoint": missing}, studies=click_studies)
    assert f"put FastSAM3D.pth at {missing}" in server.log()
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert "UNAVAILABLE" in info["models"]["fastsam3d"]["description"]
    response = slicer_infer(server.url, "fastsam3d", "phantom_ras", [PHANTOM_CLICK])
    assert response.status_code == 503 and "FastSAM3D.pth" in response.json()["detail"]


def test_wrong_checkpoint_is_refused_with_its_mismatches(monailabel_server, click_studies, checkpoints):
    """SAM-Med3D's file given as FastSAM3D: the server starts, says why, and refuses clicks."""
    server = monailabel_server(conf={"models": "fastsam3d", "fastsam3d_checkpoint": checkpoints["sam_med3d"]},
                               studies=click_studies)
    response = slicer_infer(server.url, "fastsam3d", "phantom_ras", [PHANTOM_CLICK])
    assert response.status_code == 503
    assert "is not a FastSAM3D checkpoint" in response.json()["detail"] and "unexpected keys" in response.json()["detail"]
    assert "is not a FastSAM3D checkpoint" in server.log()


def test_uncertainty_through_the_server(server, click_studies, tmp_path):
    """A click with uncertainty on, then the companion task shows the bands, as Slicer asks them."""
    name, click = "phantom_ras", list(PHANTOM_CLICK)
    response = slicer_infer(server.url, "fastsam3d", name, [click], client_id="unsure", uncertainty=True, ensemble_size=6)
    assert response.status_code == 200, response.text
    params, _ = parse_multipart(response, tmp_path)
    assert params["uncertainty_max"] > 0 and len(params["suggested_click"]) == 3
    info = requests.get(f"{server.url}/info/", timeout=30).json()["models"]["fastsam3d_uncertainty"]
    assert info["type"] == "segmentation" and sorted(info["labels"].values()) == [1, 2, 3]
    # OHIF numbers segments by the sorted label names: that order must be the bands'
    assert sorted(info["labels"]) == sorted(info["labels"], key=info["labels"].get)
    assert [name.split(": ")[-1] for name in sorted(info["labels"])] == ["minor", "intermediate", "highest"]
    bands = requests.post(f"{server.url}/infer/fastsam3d_uncertainty", params={"image": name},
                          files={"params": (None, json.dumps({"client_id": "unsure", "ensemble_size": 6,
                                                              "result_extension": ".nrrd", "result_dtype": "uint8"}))},
                          timeout=TIMEOUT)
    assert bands.status_code == 200, bands.text
    params, path = parse_multipart(bands, tmp_path)
    image = sitk.ReadImage(str(path))
    assert_same_geometry(image, sitk.ReadImage(str(click_studies / f"{name}.nii.gz")))
    values = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    assert set(np.unique(values)) <= {0, 1, 2, 3} and (values == 3).any()
    ijk = np.argwhere(values > 0)
    affine = phantom_copies()[name][1]
    assert mask_inside_window(ijk, affine, params["window_affine"], params["window_size"])  # members agree outside
    stored = params["uncertainty_map"]  # the float std map, in the datastore next to the image
    assert stored == {"image": name, "tag": "fastsam3d_uncertainty"}
    label = requests.get(f"{server.url}/datastore/label", params={"label": name, "tag": stored["tag"]}, timeout=30)
    assert label.status_code == 200
    (tmp_path / "std.nii.gz").write_bytes(label.content)
    float_map = nib.load(str(tmp_path / "std.nii.gz"))
    assert np.allclose(float_map.affine, affine, atol=1e-4) and float_map.get_data_dtype() == np.float32
    std = np.asarray(float_map.dataobj)
    assert std.max() == pytest.approx(params["uncertainty_max"], rel=1e-5) and (std[values == 0] <= params["band_edges_std"][0] + 1e-6).all()
    nobody = requests.post(f"{server.url}/infer/fastsam3d_uncertainty", params={"image": name},
                           files={"params": (None, json.dumps({"client_id": "never-clicked"}))}, timeout=TIMEOUT)
    assert nobody.status_code == 400 and "no clicks yet" in nobody.json()["detail"]


@pytest.mark.parametrize("params,name", [
    ({"foreground": [[float("inf"), 20, 22]]}, "foreground"),
    ({"foreground": 3}, "foreground"),
    ({"background": 7}, "background"),
    ({"client_id": ["a", "b"]}, "client_id"),
    ({"label": {"name": "x"}}, "label"),
    ({"reset_state": "maybe"}, "reset_state"),
    ({"uncertainty": "maybe"}, "uncertainty"),
    ({"uncertainty": True, "ensemble_size": "abc"}, "ensemble_size"),
    ({"result_dtype": "complex64"}, "result_dtype"),
    ({"result_compress": "sometimes"}, "result_compress"),
    ({"result_extension": "/../../x.nrrd"}, "result_extension"),
])
def test_malformed_parameters_get_400_and_leave_the_interaction_as_it_was(server, tmp_path, params, name):
    """Each request as the Slicer plugin sends it, with one parameter spoiled. The interaction of
    the client stays as it was: its next click still reuses the window of the click before."""
    client = f"malformed-{name}"
    first = slicer_infer(server.url, "fastsam3d", "phantom_ras", [PHANTOM_CLICK], client_id=client)
    assert first.status_code == 200, first.text
    # were it committed, this request's clicks would not be contained in the next one's: a new interaction
    body = {"label": "segment", "foreground": [PHANTOM_CLICK, [PHANTOM_CLICK[0] + 2, *PHANTOM_CLICK[1:]]], "background": [],
            "client_id": client, "result_extension": ".nrrd", "result_dtype": "uint8", **params}
    response = requests.post(f"{server.url}/infer/fastsam3d", params={"image": "phantom_ras"},
                             files={"params": (None, json.dumps(body))}, timeout=TIMEOUT)
    assert response.status_code == 400 and name in response.json()["detail"], response.text
    again = slicer_infer(server.url, "fastsam3d", "phantom_ras", [PHANTOM_CLICK, [PHANTOM_CLICK[0] + 1, *PHANTOM_CLICK[1:]]],
                         client_id=client)
    assert again.status_code == 200, again.text
    assert parse_multipart(again, tmp_path)[0]["window_reused"]
