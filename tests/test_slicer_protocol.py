"""The stock 3D Slicer MONAI Label plugin's protocol, replayed against a real server.

Slicer cannot run here, so `SlicerPlugin` does what the plugin (plugins/slicer/MONAILabel,
MONAILabel 0.8.5) does, step by step: GET /auth/ and /info/ and sort the models into its
panels; upload the local volume with PUT /session/ (multipart `files`, form `client_id`);
turn each point of its fiducial lists from RAS into IJK with the volume's RASToIJK and round;
POST /infer with its hand-made multipart body (full click history, `label`, config values,
`slice` and only that slice's points for 2D models, `roi`, `reset_state`, result extension and
dtype, `client_id`); read the answer's file with SimpleITK, keeping the header's geometry; and
import it: value 1 into the current segment (3D), or slice k cleared and the mask added (2D).
The imported segment must land where the clicks were in RAS, for volumes stored RAS, LPS,
oblique and with permuted axes.
"""

import json
from email.parser import BytesParser
from email.policy import default as email_policy
from pathlib import Path
from urllib.parse import quote_plus

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from conftest import REPO_ROOT

MARKER_APP = REPO_ROOT / "tests" / "marker_app"

BOUNDARY = "----------lImIt_of_THE_fIle_eW_$"  # the plugin's own multipart boundary
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
TIMEOUT = 300


def rotation(axis_angles):
    matrix = np.eye(3)
    for axis, degrees in axis_angles:
        a = np.deg2rad(degrees)
        c, s = np.cos(a), np.sin(a)
        r = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        matrix = r @ matrix
    return matrix


# ITK (LPS) direction cosines of the stored axes; sizes odd, spacing anisotropic
VOLUMES = {
    "ras": (np.diag([-1.0, -1.0, 1.0]), (71, 63, 45), (1.1, 0.9, 2.5)),
    "lps": (np.eye(3), (71, 63, 45), (1.1, 0.9, 2.5)),
    "oblique": (rotation([(0, 17.0), (1, -11.0), (2, 7.0)]), (67, 75, 41), (0.8, 1.3, 3.0)),
    "permuted": (np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]]), (45, 71, 63), (2.5, 1.1, 0.9)),
}


def write_volume(path: Path, direction, size, spacing) -> sitk.Image:
    """A CT-like phantom (body cylinder, bright ball off-centre) as SimpleITK writes it."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).astype(float)
    centre = (np.array(size) - 1) / 2
    mm = (ijk - centre) * spacing
    values = np.where((mm ** 2).sum(-1) < (0.8 * min(np.array(size) * spacing) / 2) ** 2, 40, -1000)
    values = values + ((ijk[..., 0] * 7 + ijk[..., 1] * 3) % 11)  # texture: no symmetry
    image = sitk.GetImageFromArray(values.astype(np.int16).transpose(2, 1, 0))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in np.asarray(direction).ravel()])
    image.SetOrigin((12.5, -30.0, 7.25))
    sitk.WriteImage(image, str(path))
    return image


def ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """Slicer's IJKToRAS of a volume node loaded from this header."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ matrix


class SlicerPlugin:
    """The plugin's side of the protocol (see the module docstring)."""

    def __init__(self, url: str, client_id: str = "user-xyz"):
        self.url, self.client_id = url, client_id
        self.reset_label_state = False

    def fetch_info(self) -> dict:
        auth = requests.get(f"{self.url}/auth/", timeout=30)  # auth_enabled: only a 200 {"enabled": true} means on
        assert not (auth.status_code == 200 and auth.json().get("enabled"))
        response = requests.get(f"{self.url}/info/", timeout=30)
        assert response.status_code == 200
        info = response.json()
        assert not info.get("config"), "the plugin refuses an /info/ with a top-level config (old server)"
        self.info = info
        self.panels = {"Auto Segmentation": [], "SmartEdit": [], "Scribbles": []}
        for name, model in info["models"].items():
            kind = model["type"]
            assert "description" in model  # the plugin indexes both keys directly
            for panel, types in (("Auto Segmentation", ("segmentation", "detection")),
                                 ("SmartEdit", ("deepgrow", "deepedit")), ("Scribbles", ("scribbles",))):
                if kind in types:
                    self.panels[panel].append(name)
        return info

    def is_3d(self, model: str) -> bool:
        return self.info["models"][model].get("dimension", 3) != 2

    def config_params(self, model: str) -> dict:
        """getParamsFromConfig: each config value as shown, a list's first item."""
        config = self.info["models"][model].get("config") or {}
        return {k: (v[0] if isinstance(v, list) else v) for k, v in config.items()}

    def create_session(self, path: Path) -> str:
        with open(path, "rb") as f:
            response = requests.put(f"{self.url}/session/", files=[("files", (path.name, f))],
                                    data={"client_id": self.client_id}, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()["session_id"]

    @staticmethod
    def to_ijk(volume: sitk.Image, ras_points) -> list:
        """getControlPointsXYZ: RASToIJK, then Python's round."""
        ras_to_ijk = np.linalg.inv(ijk_to_ras(volume))
        return [[round(x) for x in (ras_to_ijk @ [*p, 1.0])[:3]] for p in ras_points]

    def deepgrow(self, model: str, image_id: str, volume: sitk.Image, foreground_ras, background_ras=(),
                 label: str = "segment", session_id: str = "", roi=None):
        """onClickDeepgrow for the newest point; returns (status, params sent, result JSON, result file bytes)."""
        foreground = self.to_ijk(volume, foreground_ras)
        background = self.to_ijk(volume, background_ras)
        current_point = (foreground + background)[-1]
        params = {"label": label, "foreground": foreground, "background": background}
        params.update(self.config_params(model))
        if roi:
            params["roi"] = roi
        if not self.is_3d(model):
            slice_index = current_point[2]
            if slice_index:  # the plugin's test: slice 0 sends every point and no slice
                params["foreground"] = [p for p in foreground if p[2] == slice_index]
                params["background"] = [p for p in background if p[2] == slice_index]
                params["slice"] = slice_index
        if not params.get("reset_state") and self.reset_label_state:
            params["reset_state"] = True
            self.reset_label_state = False
        params.update({"result_extension": ".nrrd", "result_dtype": "uint8", "client_id": self.client_id})
        query = f"image={quote_plus(image_id)}" + (f"&session_id={quote_plus(session_id)}" if session_id else "")
        body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{json.dumps(params)}\r\n"
                f"--{BOUNDARY}--\r\n").encode()
        response = requests.post(f"{self.url}/infer/{quote_plus(model)}?{query}", data=body, timeout=TIMEOUT,
                                 headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        if response.status_code != 200:
            return response.status_code, params, response.text, None
        message = BytesParser(policy=email_policy).parsebytes(
            b"Content-Type: " + response.headers["content-type"].encode() + b"\r\n\r\n" + response.content)
        result, file_bytes = None, None
        for part in message.iter_parts():
            if part.get_filename():
                file_bytes = part.get_payload(decode=True)
            elif part.get_param("name", header="content-disposition") == "params":
                result = json.loads(part.get_payload(decode=True))
        return 200, params, result, file_bytes


def import_labelmap(file_bytes: bytes, tmp_path: Path, reference: sitk.Image, segment=None, slice_index=None):
    """updateSegmentationMask: the labelmap node takes the file header's geometry; Slicer then
    puts it into the segmentation, whose geometry is the reference volume's (physical space).
    Returns the segment as a boolean array on the reference grid."""
    path = tmp_path / "result.nrrd"
    path.write_bytes(file_bytes)
    labelmap = sitk.ReadImage(str(path))
    values = sitk.GetArrayFromImage(labelmap).transpose(2, 1, 0)
    labelled = np.argwhere(values == 1)
    ras = (ijk_to_ras(labelmap) @ np.c_[labelled, np.ones(len(labelled))].T).T
    ijk = (np.linalg.inv(ijk_to_ras(reference)) @ ras.T).T[:, :3]
    on_grid = np.round(ijk).astype(int)
    assert np.allclose(ijk, on_grid, atol=1e-3), "the result's voxels are not on the image's grid"
    size = reference.GetSize()
    inside = np.all((on_grid >= 0) & (on_grid < size), axis=1)
    new = np.zeros(size, bool)
    new[tuple(on_grid[inside].T)] = True
    if slice_index is None:  # 3D: the segment is replaced
        return new
    merged = np.zeros(size, bool) if segment is None else segment.copy()
    merged[:, :, slice_index] = False  # the Logical operators effect clears (x, y, k) ...
    return merged | new  # ... and the whole returned mask is added


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slicer-volumes")
    return {name: (folder / f"{name}.nii.gz", write_volume(folder / f"{name}.nii.gz", *args))
            for name, args in VOLUMES.items()}


@pytest.fixture(scope="module")
def server(monailabel_server, volumes, slice_checkpoints, click_marker_checkpoint):
    studies = next(iter(volumes.values()))[0].parent
    conf = {"models": "click_marker,sam_med2d", "click_marker_checkpoint": click_marker_checkpoint,
            "sam_med2d_checkpoint": slice_checkpoints["sam_med2d"]}
    return monailabel_server(conf=conf, studies=studies, app_dir=MARKER_APP)


def voxel_centre_ras(volume: sitk.Image, ijk, offset=(0.3, -0.2, 0.1)) -> np.ndarray:
    """Where a user's click on voxel ijk lands in RAS: inside the voxel, off its centre."""
    return (ijk_to_ras(volume) @ [*(np.array(ijk) + offset), 1.0])[:3]


def test_info_panels_and_config(server):
    plugin = SlicerPlugin(server.url)
    plugin.fetch_info()
    assert sorted(plugin.panels["SmartEdit"]) == ["click_marker", "sam_med2d", "sam_med2d_3d"]
    assert sorted(plugin.panels["Auto Segmentation"]) == ["click_marker_uncertainty", "sam_med2d_uncertainty"]
    assert plugin.is_3d("click_marker") and plugin.is_3d("sam_med2d_3d") and not plugin.is_3d("sam_med2d")
    assert "region 1" in plugin.info["labels"]  # the segment the plugin creates for the user
    params = plugin.config_params("click_marker")
    assert params["reset_state"] is False and params["uncertainty"] is False and params["ensemble_size"] == 8


@pytest.mark.parametrize("name", list(VOLUMES))
def test_3d_clicks_land_where_the_user_clicked(server, volumes, name, tmp_path):
    path, volume = volumes[name]
    plugin = SlicerPlugin(server.url, client_id=f"slicer-{name}")
    plugin.fetch_info()
    session_id = plugin.create_session(path)
    size = np.array(volume.GetSize())
    target = tuple(int(v) for v in np.round(size * [0.35, 0.6, 0.7]))  # off-centre on every axis
    click_ras = voxel_centre_ras(volume, target)
    status, sent, result, file_bytes = plugin.deepgrow("click_marker", path.stem, volume, [click_ras],
                                                       session_id=session_id)
    assert status == 200, result
    assert sent["foreground"] == [list(target)] and sent["client_id"] == f"slicer-{name}"
    segment = import_labelmap(file_bytes, tmp_path, volume)
    assert segment.sum() == result["voxels"] > 0
    voxels = np.argwhere(segment)
    centroid_ras = (ijk_to_ras(volume) @ np.c_[voxels, np.ones(len(voxels))].T).T[:, :3].mean(0)
    target_ras = (ijk_to_ras(volume) @ [*target, 1.0])[:3]
    # within half a voxel of the clicked voxel's centre, measured along the volume's own axes
    error_voxels = np.linalg.solve(ijk_to_ras(volume)[:3, :3], centroid_ras - target_ras)
    assert np.all(np.abs(error_voxels) <= 0.5), (name, error_voxels)

    # a second click: the full history goes out, the state carries on, the mask follows the newest click
    second = (target[0] + 3, target[1] - 2, target[2])
    status, sent, result, file_bytes = plugin.deepgrow("click_marker", path.stem, volume,
                                                       [click_ras, voxel_centre_ras(volume, second)],
                                                       session_id=session_id)
    assert status == 200 and sent["foreground"] == [list(target), list(second)]
    assert result["window_reused"] is True
    voxels = np.argwhere(import_labelmap(file_bytes, tmp_path, volume))
    assert np.all(np.abs(voxels.mean(0) - second) <= 0.5)


def test_changing_the_segment_resets_the_state(server, volumes, tmp_path):
    path, volume = volumes["oblique"]
    plugin = SlicerPlugin(server.url, client_id="slicer-reset")
    plugin.fetch_info()
    session_id = plugin.create_session(path)
    target = (30, 40, 20)
    status, _, first, _ = plugin.deepgrow("click_marker", path.stem, volume, [voxel_centre_ras(volume, target)],
                                          session_id=session_id)
    assert status == 200
    plugin.reset_label_state = True  # the user picked another segment in the label box
    status, sent, result, _ = plugin.deepgrow("click_marker", path.stem, volume, [voxel_centre_ras(volume, target)],
                                              session_id=session_id, label="other")
    assert status == 200 and sent["reset_state"] is True and result["window_reused"] is False


def test_2d_model_replaces_only_the_clicked_slice(server, volumes, tmp_path):
    path, volume = volumes["permuted"]
    plugin = SlicerPlugin(server.url, client_id="slicer-2d")
    plugin.fetch_info()
    size = np.array(volume.GetSize())
    k = int(size[2] * 0.6)
    earlier = np.zeros(tuple(size), bool)
    earlier[5:15, 5:15, k - 1: k + 2] = True  # the segment already holds something on k and around it
    clicks = [voxel_centre_ras(volume, (int(size[0] * 0.4), int(size[1] * 0.55), k)),
              voxel_centre_ras(volume, (int(size[0] * 0.5), int(size[1] * 0.5), k - 3))]  # another slice
    clicks = clicks[::-1]  # the newest click (the one that triggers the request) is on slice k
    status, sent, result, file_bytes = plugin.deepgrow("sam_med2d", "permuted", volume, clicks)  # server-side image
    assert status == 200, result
    assert sent["slice"] == k and sent["foreground"] == [[int(size[0] * 0.4), int(size[1] * 0.55), k]]
    segment = import_labelmap(file_bytes, tmp_path, volume, segment=earlier, slice_index=k)
    assert segment[:, :, k].any()
    untouched = [s for s in range(size[2]) if s != k]
    np.testing.assert_array_equal(segment[:, :, untouched], earlier[:, :, untouched])


def test_errors_come_back_as_the_plugin_shows_them(server, volumes):
    path, volume = volumes["lps"]
    plugin = SlicerPlugin(server.url)
    plugin.fetch_info()
    outside = (ijk_to_ras(volume) @ [-5.0, 3.0, 3.0, 1.0])[:3]
    status, _, text, _ = plugin.deepgrow("click_marker", "lps", volume, [outside])
    assert status == 400 and "outside the image" in text  # shown as "Status: 400; Response: ..."
    status, _, result, _ = plugin.deepgrow("click_marker", "lps", volume, [voxel_centre_ras(volume, (30, 30, 20))])
    assert status == 200 and result["voxels"] > 0  # the server keeps serving
