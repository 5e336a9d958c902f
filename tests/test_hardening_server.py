"""Server hardening on a real DICOMweb store: Orthanc on loopback holding three patients' CT
series (the phantom, the same phantom as another patient, and one with a slice missing), and a
real `monailabel start_server` on it serving the app plus two test doubles (tests/hold_app:
``click_marker``, and ``hold``, an inference that lasts until the test releases it).

- One inference does not hold up the server: /info/ and the DICOMweb proxy answer meanwhile.
- The DICOMweb proxy passes query strings: a QIDO search by PatientID finds one patient.
- A series with a missing slice is refused with a 400 saying so, for inference and for saving.
- A `final` label goes to Orthanc as a DICOM SEG with the label names, a generic code,
  SEMIAUTOMATIC and the model's name.
"""

import io
import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from pydicom.uid import generate_uid

from conftest import REPO_ROOT, _free_port, dicomweb_store
from samlabel.dicom import NonUniformSeriesError, check_uniform_slices

HOLD_APP = REPO_ROOT / "tests" / "hold_app"
CLICK = [65, 90, 18]  # inside the phantom's body (171 x 143 x 57)
OTHER_PATIENT, GAP_PATIENT = "SAMLABEL-CT-002", "SAMLABEL-CT-GAP"
MISSING_SLICE = 28

MISSING = dicomweb_store.orthanc_missing()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs Orthanc with DICOMweb: {MISSING}"
                                       " (make system-packages installs it where apt-get can)")


def as_patient(source: Path, target: Path, patient_id: str, drop_slice: int = -1) -> None:
    """Copy a series as another patient's study (new UIDs), leaving out one slice if asked."""
    target.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(sorted(source.glob("*.dcm"))):
        if k == drop_slice:
            continue
        ds = pydicom.dcmread(path)
        new_uid = lambda old: generate_uid(entropy_srcs=[patient_id, str(old)])  # noqa: E731
        ds.PatientID, ds.PatientName = patient_id, f"Phantom^{patient_id}"
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
            setattr(ds, keyword, new_uid(getattr(ds, keyword)))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(target / path.name)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, sample_studies_module):
    """Orthanc holding three CT series: (store, {name: (folder, StudyInstanceUID, SeriesInstanceUID)})."""
    work = tmp_path_factory.mktemp("orthanc-hardening")
    store = dicomweb_store.OrthancStore(work, _free_port()).start()
    try:
        sample_studies_module.write_ct_dicom(work / "phantom")
        as_patient(work / "phantom", work / "other", OTHER_PATIENT)
        as_patient(work / "phantom", work / "gap", GAP_PATIENT, drop_slice=MISSING_SLICE)
        series = {}
        for name in ("phantom", "other", "gap"):
            store.upload(work / name)
            ds = pydicom.dcmread(next((work / name).glob("*.dcm")), stop_before_pixels=True)
            series[name] = (work / name, ds.StudyInstanceUID, ds.SeriesInstanceUID)
        yield store, series
    finally:
        store.stop()


@pytest.fixture(scope="module")
def hold_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hold")


@pytest.fixture(scope="module")
def server(monailabel_server, orthanc, click_marker_checkpoint, hold_dir):
    conf = {"models": "click_marker", "click_marker_checkpoint": click_marker_checkpoint}
    return monailabel_server(conf=conf, studies=orthanc[0].url, app_dir=HOLD_APP,
                             env={"SAMLABEL_TEST_HOLD_DIR": str(hold_dir)})


def wait_for(path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout_s} s"
        time.sleep(0.05)


def test_info_and_dicomweb_proxy_answer_while_an_inference_runs(server, orthanc, hold_dir):
    store, series = orthanc
    _folder, study, series_uid = series["phantom"]
    token = uuid.uuid4().hex
    finished, lock, results = [], threading.Lock(), {}

    def done(name, response):
        with lock:
            finished.append(name)
            results[name] = response

    def infer():
        response = requests.post(f"{server.url}/infer/hold", params={"image": series_uid, "output": "json"},
                                 data={"params": json.dumps({"token": token})}, timeout=300)
        done("infer", response)

    thread = threading.Thread(target=infer)
    thread.start()
    try:
        wait_for(hold_dir / f"started-{token}")  # the inference is running (and cannot end by itself yet)
        done("info", requests.get(f"{server.url}/info/", timeout=120))
        done("qido", requests.get(f"{server.url}/proxy/dicom/qido/studies/{study}/series", timeout=120))
        done("wado", requests.get(f"{server.url}/proxy/dicom/wado/studies/{study}/series/{series_uid}/metadata",
                                  timeout=120))
    finally:
        (hold_dir / f"release-{token}").touch()
        thread.join(timeout=300)
    assert finished == ["info", "qido", "wado", "infer"]
    assert results["info"].status_code == 200 and "hold" in results["info"].json()["models"]
    assert [s["0020000E"]["Value"][0] for s in results["qido"].json()] == [series_uid]
    assert len(results["wado"].json()) == len(list(_folder.glob("*.dcm")))
    assert results["infer"].status_code == 200, results["infer"].text
    assert results["infer"].json() == {"released": True}  # it ended because the test released it


def test_qido_through_the_proxy_keeps_the_query(server, orthanc):
    store, series = orthanc
    accept = {"Accept": "application/dicom+json"}
    everyone = requests.get(f"{server.url}/proxy/dicom/qido/studies", headers=accept, timeout=60)
    assert everyone.status_code == 200
    assert len(everyone.json()) == 3
    found = requests.get(f"{server.url}/proxy/dicom/qido/studies", params={"PatientID": OTHER_PATIENT},
                         headers=accept, timeout=60)
    assert found.status_code == 200
    studies = found.json()
    assert [s["00100020"]["Value"][0] for s in studies] == [OTHER_PATIENT]
    assert studies[0]["0020000D"]["Value"][0] == series["other"][1]
    # several parameters: as Orthanc answers them itself
    query = {"limit": "2", "includefield": "00081030"}
    through_proxy = requests.get(f"{server.url}/proxy/dicom/qido/studies", params=query, headers=accept, timeout=60)
    direct = requests.get(f"{store.url}/studies", params=query, headers=accept, timeout=60)
    assert through_proxy.status_code == direct.status_code == 200
    assert through_proxy.json() == direct.json() and len(direct.json()) == 2


def test_check_uniform_slices_on_the_series_files(orthanc):
    _store, series = orthanc
    check_uniform_slices(series["phantom"][0])  # evenly spaced: no error
    with pytest.raises(NonUniformSeriesError, match="not evenly spaced") as error:
        check_uniform_slices(series["gap"][0])
    assert "7.00 mm" in str(error.value) and "3.50 mm" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_series_with_a_missing_slice_is_refused(server, orthanc):
    store, series = orthanc
    gap_series = series["gap"][2]
    response = requests.post(f"{server.url}/infer/click_marker", params={"image": gap_series, "output": "json"},
                             data={"params": json.dumps({"foreground": [CLICK], "background": []})}, timeout=300)
    assert response.status_code == 400, response.text
    message = response.json()["detail"]
    assert gap_series in message and "not evenly spaced" in message and "7.00 mm" in message

    label = np.zeros((171, 143, 56), np.uint8)
    label[60:70, 80:90, 10:20] = 1
    response = requests.put(f"{server.url}/datastore/label", params={"image": gap_series, "tag": "final"},
                            files={"label": ("label.bin", label.tobytes(order="F"))}, data={"params": "{}"},
                            timeout=300)
    assert response.status_code == 400, response.text
    assert "not evenly spaced" in response.json()["detail"]
    segs = requests.post(f"{store.base}/tools/find", json={"Level": "Series", "Query": {"Modality": "SEG",
                         "PatientID": GAP_PATIENT}}, timeout=30).json()  # fmt: skip
    assert segs == []  # nothing was stored for it


def test_final_label_becomes_a_dicom_seg_with_names_codes_and_model(server, orthanc):
    store, series = orthanc
    _folder, study, series_uid = series["phantom"]
    response = requests.post(f"{server.url}/infer/click_marker", params={"image": series_uid, "output": "image"},
                             data={"params": json.dumps({"foreground": [CLICK], "background": []})}, timeout=300)
    assert response.status_code == 200, response.text
    suffix = "".join(Path(response.headers["content-disposition"].split("filename=")[-1].strip('"')).suffixes)
    result = Path(server.log_path.parent) / f"click{suffix}"
    result.write_bytes(response.content)
    image = sitk.ReadImage(str(result))
    mask = sitk.GetArrayFromImage(image)  # (k, j, i)
    assert mask.max() == 1 and mask.sum() > 100
    mask[:, :20, :20] = 2  # a second segment, in a corner
    labelled = sitk.GetImageFromArray(mask)
    labelled.CopyInformation(image)
    label_file = result.with_name("two-segments.nii.gz")
    sitk.WriteImage(labelled, str(label_file))

    # the client's names by value, listed out of order (MONAI Label pairs by position)
    label_info = [{"name": "corner", "idx": 2}, {"name": "lesion", "idx": 1}]
    response = requests.put(f"{server.url}/datastore/label", params={"image": series_uid, "tag": "final"},
                            files={"label": (label_file.name, label_file.read_bytes())},
                            data={"params": json.dumps({"label_info": label_info})}, timeout=300)
    assert response.status_code == 200, response.text

    found = requests.post(f"{store.base}/tools/find", json={"Level": "Instance", "Query": {"Modality": "SEG",
                          "StudyInstanceUID": study}}, timeout=30).json()  # fmt: skip
    assert len(found) == 1
    seg_bytes = requests.get(f"{store.base}/instances/{found[0]}/file", timeout=30).content
    seg = pydicom.dcmread(io.BytesIO(seg_bytes))
    assert seg.Modality == "SEG"
    assert "click_marker" in seg.SeriesDescription and "AIName" not in seg.SeriesDescription
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert {n: s.SegmentLabel for n, s in segments.items()} == {1: "lesion", 2: "corner"}
    for segment in segments.values():
        assert segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
        assert segment.SegmentAlgorithmName == "click_marker"
        for sequence in ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence"):
            code = getattr(segment, sequence)[0]
            assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("85756007", "SCT", "Tissue")
    assert b"78961009" not in seg_bytes  # no spleen code anywhere
    # every labelled voxel is in the SEG's frames (one binary frame per segment and slice)
    assert int(seg.pixel_array.sum()) == int((mask > 0).sum())


def test_click_saved_with_save_label_becomes_a_dicom_seg(server, orthanc):
    """The stock OHIF panel has no save button; its Options dialog sends a task's config, here
    save_label=true, with the click. The result then goes to Orthanc as the series' `final` DICOM
    SEG, named after the task's label. A save_label that is not a boolean changes nothing."""
    store, series = orthanc
    _folder, study, series_uid = series["other"]

    def click(**extra):
        params = {"foreground": [CLICK], "background": [], "result_extension": ".nrrd", "result_dtype": "uint8",
                  "result_compress": False, "restore_label_idx": False, **extra}  # as OHIF sends it
        return requests.post(f"{server.url}/infer/click_marker", params={"image": series_uid, "output": "image"},
                             files={"params": (None, json.dumps(params))}, timeout=300)

    def seg_instances():
        return requests.post(f"{store.base}/tools/find", json={"Level": "Instance", "Query": {
            "Modality": "SEG", "StudyInstanceUID": study}}, timeout=30).json()

    refused = click(save_label="true")
    assert refused.status_code == 400 and "save_label" in refused.json()["detail"]
    assert seg_instances() == []

    response = click(save_label=True)
    assert response.status_code == 200, response.text
    result = Path(server.log_path.parent) / "saved-click.nrrd"
    result.write_bytes(response.content)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(result)))
    found = seg_instances()
    assert len(found) == 1
    seg = pydicom.dcmread(io.BytesIO(requests.get(f"{store.base}/instances/{found[0]}/file", timeout=30).content))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["region 1"]
    assert int(seg.pixel_array.sum()) == int(mask.sum()) > 100  # the result the viewer shows, every voxel


def test_a_series_opened_in_ohif_is_read_after_the_click_in_progress(server, orthanc, hold_dir):
    """OHIF loads a series through the DICOMweb proxy: the server fetches and reads it in the
    background for the first click, but only once no inference is running."""
    store, series = orthanc
    _folder, study, series_uid = series["gap"]  # refused when read: the prefetch must fail quietly
    _folder, other_study, other_uid = series["other"]
    token = uuid.uuid4().hex
    held = threading.Thread(target=lambda: requests.post(
        f"{server.url}/infer/hold", params={"image": series["phantom"][2], "output": "json"},
        data={"params": json.dumps({"token": token})}, timeout=300))
    held.start()
    try:
        wait_for(hold_dir / f"started-{token}")
        for study_uid, uid in ((study, series_uid), (other_study, other_uid)):
            opened = requests.get(f"{server.url}/proxy/dicom/wado/studies/{study_uid}/series/{uid}/metadata", timeout=120)
            assert opened.status_code == 200
        time.sleep(1.0)  # room for a prefetch that ignored the running inference to happen
        assert f"prefetched {other_uid}" not in server.log()
    finally:
        (hold_dir / f"release-{token}").touch()
        held.join(timeout=300)
    deadline = time.monotonic() + 120
    while f"prefetched {other_uid}" not in server.log():
        assert time.monotonic() < deadline, "the opened series was not read"
        time.sleep(0.2)
    log = server.log()
    assert f"prefetch: {series_uid} not read" in log  # the series with a missing slice: refused, quietly
    response = requests.post(f"{server.url}/infer/click_marker", params={"image": other_uid, "output": "image"},
                             data={"params": json.dumps({"foreground": [CLICK], "background": []})}, timeout=300)
    assert response.status_code == 200
