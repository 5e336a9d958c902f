"""OHIF end to end: the viewer shipped in the monailabel wheel, in headless Chromium, on our app
whose datastore is a real Orthanc DICOMweb server holding an oblique, anisotropic CT series.

A user's path: open the study in OHIF's MONAI Label mode, connect, pick a model and a segment,
click a voxel off-centre in all three axes, press Run; then read the labelmap OHIF holds. The
`click_marker` test double (tests/marker_app) marks a ball around the click through our real
window/resampling code, so its labelmap must be centred on the clicked voxel. Screenshots,
the console and the measured times go to test-artifacts/ohif/.
"""

import io
import json
import re

import numpy as np
import pydicom
import pytest
import requests

from conftest import REPO_ROOT, click_marker, dicomweb_store
from ohif import OhifSession, browser_missing

MARKER_APP = REPO_ROOT / "tests" / "marker_app"

ARTIFACTS = REPO_ROOT / "test-artifacts" / "ohif"
POINT_PROMPTS, AUTO_SEGMENTATION = "Point Prompts", "Auto-Segmentation"
POINT_DONE = "Running Inference for Point Prompts - Successful"
AUTO_DONE = "Running Segmentation - Successful"
CLICK = (65, 90, 18)  # off-centre in i, j and k (the series is 171 x 143 x 57), inside the body
WINDOW_HALF_MM = 64 * 1.5  # the 3D models see 128^3 voxels of 1.5 mm centred on the click
SEGMENT = "region 1"  # the click tasks' label (/info/)
SAM3D = "sam3d_synapse"  # automatic; seeded random weights in the official formats
ORGANS = ("spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta", "pancreas")
BANDS = ("uncertainty band 1: minor", "uncertainty band 2: intermediate", "uncertainty band 3: highest")

MISSING = browser_missing() or dicomweb_store.orthanc_missing()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"OHIF end-to-end needs Chromium and Orthanc: {MISSING}"
                                       " (make test installs them where apt-get can)")


@pytest.fixture(scope="module")
def server(monailabel_server, orthanc_ct, checkpoints, slice_checkpoints, click_marker_checkpoint, sam3d_checkpoints):
    conf = {**sam3d_checkpoints, "models": f"click_marker,fastsam3d,sam_med3d,sam_med2d,{SAM3D}",
            "click_marker_checkpoint": click_marker_checkpoint, "fastsam3d_checkpoint": checkpoints["fastsam3d"],
            "sam_med3d_checkpoint": checkpoints["sam_med3d"], "sam_med2d_checkpoint": slice_checkpoints["sam_med2d"]}
    return monailabel_server(conf=conf, studies=orthanc_ct[0].url, app_dir=MARKER_APP)


@pytest.fixture(scope="module")
def ohif(server, orthanc_ct):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with OhifSession(server.url, ARTIFACTS) as session:
        session.open_study(orthanc_ct[1])
        session.screenshot("00-study-open")
        yield session
        (ARTIFACTS / "console.json").write_text(json.dumps(session.console, indent=1))


@pytest.fixture(scope="module")
def timings():
    measured = {}
    yield measured
    (ARTIFACTS / "timings.json").write_text(json.dumps(measured, indent=1))


def sent_clicks(session: OhifSession) -> dict:
    """The params of the newest infer request the page sent."""
    body = session.infer_requests[-1]["body"]
    return json.loads(re.search(r"\r\n\r\n(\{.*\})\r\n", body, re.S).group(1))


@pytest.fixture(scope="module")
def spacing(orthanc_ct) -> np.ndarray:
    """Voxel spacing (mm) of the series along i, j, k, as Orthanc serves it."""
    store, study, series = orthanc_ct
    instance = requests.get(f"{store.url}/studies/{study}/series/{series}/metadata",
                            headers={"Accept": "application/dicom+json"}, timeout=30).json()[0]
    rows_spacing, columns_spacing = instance["00280030"]["Value"]
    return np.array([columns_spacing, rows_spacing, instance["00180050"]["Value"][0]], dtype=float)


def assert_inside_window(labelmap: dict, click, spacing: np.ndarray):
    """Every labelled voxel lies within the 3D model's window, which is centred on the click."""
    for low, high, centre, mm in zip(labelmap["min"], labelmap["max"], click, spacing):
        assert (centre - low) * mm <= WINDOW_HALF_MM + mm and (high - centre) * mm <= WINDOW_HALF_MM + mm, labelmap


def test_study_opens_in_monai_label_mode_from_dicomweb(ohif, server, orthanc_ct):
    _store, study, series = orthanc_ct
    assert f"/ohif/monai-label?StudyInstanceUIDs={study}" in ohif.page.url
    assert ohif.image_dimensions() == [171, 143, 57]
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["datastore"]["total"] == 1
    assert requests.post(f"{server.url}/activelearning/random", timeout=60).json()["id"] == series


def test_click_marker_is_centred_on_the_clicked_voxel(ohif, server, orthanc_ct, spacing):
    ohif.choose(POINT_PROMPTS, "click_marker", SEGMENT)
    clicked = np.array(ohif.click_voxel(CLICK))
    ohif.screenshot("01-click-marker-point")
    ohif.run("click_marker", POINT_DONE)
    ohif.screenshot("02-click-marker-result")

    sent = sent_clicks(ohif)
    assert "label" not in sent and "client_id" not in sent  # OHIF's request, as the app must take it
    assert sent["foreground"] == [np.round(clicked).astype(int).tolist()]
    assert np.all(np.abs(clicked - CLICK) <= 1.0)  # the click landed on (or next to) the voxel aimed at
    labelmap = ohif.labelmap()
    assert labelmap["values"].keys() == {str(ohif.segments()[SEGMENT][0])} and labelmap["count"] > 100
    centroid = np.array(labelmap["centroid"])
    assert np.all(np.abs(centroid - clicked) <= 0.5), (centroid, clicked)  # centred on the click
    assert np.all(np.abs(centroid - sent["foreground"][0]) < 0.05), (centroid, sent)
    # a ball of RADIUS model voxels (1.5 mm): its extent in voxels along each axis
    half_extent = (np.array(labelmap["max"]) - np.array(labelmap["min"])) / 2
    np.testing.assert_allclose(half_extent * spacing, click_marker.RADIUS * 1.5, atol=spacing.max())
    assert f"'model': 'click_marker', 'image': '{orthanc_ct[2]}'" in server.log()


def test_saving_from_the_options_dialog_stores_a_dicom_seg(ohif, orthanc_ct):
    """The stock panel has no save button: its Options dialog sends a task's config, and ticking
    the click task's save_label stores each result as the series' `final` label, on Orthanc a
    DICOM SEG. It holds exactly the voxels OHIF shows."""
    store, study, series = orthanc_ct

    def seg_instances() -> set:
        return set(requests.post(f"{store.base}/tools/find", json={"Level": "Instance", "Query": {
            "Modality": "SEG", "StudyInstanceUID": study}}, timeout=30).json())

    before = seg_instances()
    ohif.choose(POINT_PROMPTS, "click_marker", SEGMENT)
    ohif.tick_option("click_marker", "save_label")
    ohif.screenshot("03-options-save-label")
    ohif.confirm_options()
    ohif.clear_points()
    ohif.click_voxel(CLICK)
    ohif.run("click_marker", POINT_DONE)
    assert sent_clicks(ohif)["save_label"] is True
    shown = ohif.labelmap()["values"].get(str(ohif.segments()[SEGMENT][0]), 0)

    saved = seg_instances() - before
    assert len(saved) == 1
    seg = pydicom.dcmread(io.BytesIO(requests.get(f"{store.base}/instances/{saved.pop()}/file", timeout=30).content))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [SEGMENT]
    assert int(seg.pixel_array.sum()) == shown > 100


def luminance(rgb) -> float:
    return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]


def test_segments_are_drawn_in_visible_colours_and_bands_in_order(ohif):
    """OHIF colours a segment by its label's name and numbers segments by the sorted names: the
    click segment and the uncertainty bands must stand out on grey CT, the bands in their order."""
    segments = ohif.segments()
    assert SEGMENT in segments and set(BANDS) <= set(segments)
    colours = {name: segments[name][1] for name in (SEGMENT, *BANDS)}
    for name, rgb in colours.items():
        # bright, and coloured rather than grey (CT is grey)
        assert luminance(rgb) >= 100 and max(rgb) - min(rgb) >= 60, (name, rgb)
    for a, b in [(a, b) for a in colours for b in colours if a < b]:
        assert np.linalg.norm(np.subtract(colours[a], colours[b])) >= 60, (a, b, colours)
    assert [segments[band][0] for band in BANDS] == sorted(segments[band][0] for band in BANDS)


def test_fastsam3d_and_its_second_click(ohif, spacing, timings):
    ohif.choose(POINT_PROMPTS, "fastsam3d", SEGMENT)
    ohif.clear_points()
    clicked = ohif.click_voxel(CLICK)
    timings["fastsam3d_first_click_s"] = ohif.run("fastsam3d", POINT_DONE)
    first = ohif.labelmap()
    assert first["count"] > 0 and first["values"].keys() == {str(ohif.segments()[SEGMENT][0])}
    assert_inside_window(first, np.round(clicked), spacing)

    second = (CLICK[0] + 4, CLICK[1] - 3, CLICK[2] + 1)
    ohif.click_voxel(second)
    timings["fastsam3d_second_click_s"] = ohif.run("fastsam3d", POINT_DONE)
    ohif.screenshot("04-fastsam3d-two-clicks")
    assert len(sent_clicks(ohif)["foreground"]) == 2  # the full click history
    labelmap = ohif.labelmap()
    assert labelmap["count"] > 0
    assert_inside_window(labelmap, np.round(clicked), spacing)


def test_sam_med3d(ohif, spacing, timings):
    ohif.choose(POINT_PROMPTS, "sam_med3d", SEGMENT)
    ohif.clear_points()
    clicked = ohif.click_voxel(CLICK)
    timings["sam_med3d_first_click_s"] = ohif.run("sam_med3d", POINT_DONE)
    ohif.screenshot("05-sam-med3d")
    labelmap = ohif.labelmap()
    assert labelmap["count"] > 0 and labelmap["values"].keys() == {str(ohif.segments()[SEGMENT][0])}
    assert len(labelmap["slices"]) > 1  # a 3D result
    assert_inside_window(labelmap, np.round(clicked), spacing)


def test_sam_med2d_fills_the_clicked_slice(ohif, timings):
    """OHIF sends no `slice`: the app takes it from the clicks; OHIF replaces that k plane only."""
    ohif.choose(POINT_PROMPTS, "sam_med2d", SEGMENT)
    ohif.clear_points()
    before = ohif.labelmap()
    ohif.click_voxel(CLICK)
    timings["sam_med2d_first_click_s"] = ohif.run("sam_med2d", POINT_DONE)
    ohif.screenshot("06-sam-med2d")
    k = str(sent_clicks(ohif)["foreground"][-1][2])
    assert "slice" not in sent_clicks(ohif)
    after = ohif.labelmap()
    assert after["slices"].get(k, 0) > 0
    assert {s: n for s, n in after["slices"].items() if s != k} == {s: n for s, n in before["slices"].items() if s != k}


def test_uncertainty_bands_are_shown(ohif, spacing):
    """The companion segmentation task for the click_marker interaction above: the ensemble's
    disagreement as labelled bands, a shell around the marked ball. (OHIF replaces the whole
    labelmap with a segmentation model's result, and keeps those voxels from later point prompts.)"""
    ohif.choose(AUTO_SEGMENTATION, "click_marker_uncertainty")
    ohif.run("click_marker_uncertainty", AUTO_DONE)
    ohif.page.wait_for_timeout(500)
    ohif.screenshot("07-uncertainty-bands")
    labelmap = ohif.labelmap()
    band_index = {band: str(ohif.segments()[band][0]) for band in BANDS}  # OHIF's segment of each band
    assert labelmap["count"] > 0 and set(labelmap["values"]) <= set(band_index.values())
    assert band_index[BANDS[-1]] in labelmap["values"]  # the high band holds at least the largest std
    assert_inside_window(labelmap, CLICK, spacing)
    # around the ball: members' balls are centred within the first ball, so they reach < 3 radii
    reach_mm = (np.maximum(np.abs(np.array(labelmap["min"]) - CLICK), np.abs(np.array(labelmap["max"]) - CLICK)) * spacing)
    assert np.all(reach_mm < 3 * click_marker.RADIUS * 1.5), reach_mm


def test_sam3d_automatic_segmentation(ohif, timings):
    """SAM3D in the Auto-Segmentation tab: its organs become OHIF segments (by name); with random
    weights the labels are noise, but every labelled voxel holds one of the organs' segments."""
    ohif.choose(AUTO_SEGMENTATION, SAM3D)
    timings["sam3d_synapse_s"] = ohif.run(SAM3D, AUTO_DONE)
    ohif.page.wait_for_timeout(500)
    ohif.screenshot("09-sam3d-synapse")
    segments = ohif.segments()
    assert set(ORGANS) <= set(segments)
    labelmap = ohif.labelmap()
    assert labelmap["count"] > 0 and set(labelmap["values"]) <= {str(segments[organ][0]) for organ in ORGANS}
    assert labelmap["dimensions"] == [171, 143, 57] and len(labelmap["slices"]) > 1


def test_uncertainty_float_map_is_kept_beside_the_dicom_series(server, orthanc_ct, tmp_path):
    """With a DICOMweb datastore the float std map of the run above is kept in the server's
    cache of the series (only `final` labels go to the DICOM server, as DICOM SEG)."""
    import nibabel as nib

    label = requests.get(f"{server.url}/datastore/label", timeout=30,
                         params={"label": orthanc_ct[2], "tag": "click_marker_uncertainty"})
    assert label.status_code == 200
    (tmp_path / "std.nii.gz").write_bytes(label.content)
    std = nib.load(tmp_path / "std.nii.gz")
    assert std.shape == (171, 143, 57) and std.get_data_dtype() == np.float32 and np.asarray(std.dataobj).max() > 0


def test_page_had_no_errors(ohif):
    """Uncaught page errors fail; console errors may only be the refused web fonts and the
    training-status poll (the app has no trainers)."""
    assert ohif.page_errors == []
    for message in ohif.console:
        if message["type"] == "error":
            assert ("ERR_FAILED" in message["text"] or "404" in message["text"]), message


def test_a_label_is_saved_back_as_dicom_seg(server, orthanc_ct, tmp_path):
    """MONAI Label stores a submitted label in a DICOMweb datastore as DICOM SEG (dcmqi)."""
    import nibabel as nib

    store, _study, series = orthanc_ct
    segs_before = [s["00080060"]["Value"][0] for s in store.series()].count("SEG")
    image = requests.get(f"{server.url}/datastore/image", params={"image": series}, timeout=120)
    assert image.status_code == 200
    (tmp_path / "image.nii.gz").write_bytes(image.content)
    reference = nib.load(tmp_path / "image.nii.gz")
    label = np.zeros(reference.shape, np.uint8)
    label[60:70, 85:95, 15:20] = 1
    nib.save(nib.Nifti1Image(label, reference.affine), tmp_path / "label.nii.gz")
    with open(tmp_path / "label.nii.gz", "rb") as f:
        response = requests.put(f"{server.url}/datastore/label", params={"image": series, "tag": "final"},
                                files={"label": ("label.nii.gz", f)}, timeout=300)
    assert response.status_code == 200, response.text
    modalities = [s["00080060"]["Value"][0] for s in store.series()]
    assert modalities.count("CT") == 1 and modalities.count("SEG") == segs_before + 1

