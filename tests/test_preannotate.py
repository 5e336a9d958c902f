"""samlabel-preannotate (samlabel.preannotate): a whole datastore pre-annotated by a pool of Ray actors.

The command runs as users run it, a process of its own, on a local Ray instance (loopback only) or
joining a Ray head that the test starts on loopback. Shown: SAM3D over five volumes with two
actors, the command killed with SIGKILL after some are done, then run again: it finishes the
rest, redoes none, and every label has its image's exact grid; a click model prompted structure
by structure from coarse labels, an image it refuses reported while the others go on; arguments
that cannot run are refused before Ray starts; on Orthanc, through a Ray head that the command
joins, each result is a DICOM SEG of its series whose frames are the label's slices.

The seeded SAM3D decoder's plans have a smaller patch (32 x 96 x 96, 2 mm in-plane) than the
official Synapse one, so that a volume takes seconds on a CPU; the weights are random, so what is
checked is where the results lie and what was done when, not what they look like.
"""

import io
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pydicom
import pytest
import requests
import torch
from scipy import ndimage

from conftest import APP_DIR, _free_port, dicomweb_store
from samlabel.modeling.sam3d_decoder import Sam3DDecoder
from samlabel.preannotate import RAY_LOOPBACK_ONLY, main, prompt_request, structures_2d, structures_3d
from samlabel.registry import get_spec
from samlabel.seeded import save_sam3d_decoder_files, seeded_state_dict

SAM3D = "sam3d_synapse"
SAM3D_VALUES = set(get_spec(SAM3D).labels.values())
# Oblique (the sample CT's axes), anisotropic, odd sizes; at most 32 slices of 4 mm: one SAM3D window deep
GRIDS = {"ct_a": ((64, 56, 37), (2.1, 2.3, 3.3)), "ct_b": ((59, 63, 41), (2.4, 1.9, 3.0)),
         "ct_c": ((61, 52, 39), (2.2, 2.5, 3.1)), "ct_d": ((57, 60, 35), (2.3, 2.2, 3.5)),
         "ct_e": ((63, 55, 43), (2.0, 2.4, 2.9))}
RUN_TIMEOUT = 300


def write_volume(sample, folder: Path, name: str, coarse_tag: str = None) -> None:
    """The synthetic CT phantom on its own grid; with coarse_tag, its two structures as that label."""
    grid = sample.Grid(*GRIDS[name])
    image = nib.Nifti1Image(sample.ct_volume(grid), sample.ct_affine(grid))
    image.set_qform(sample.ct_affine(grid), code=1)
    nib.save(image, folder / f"{name}.nii.gz")
    if coarse_tag:
        (folder / "labels" / coarse_tag).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(sample.ct_label_array(grid), sample.ct_affine(grid)), folder / "labels" / coarse_tag / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def sam3d_conf(tmp_path_factory, slice_checkpoints) -> list:
    path = tmp_path_factory.mktemp("sam3d-small") / SAM3D / "model_final_checkpoint.model"
    path.parent.mkdir()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Sam3DDecoder(num_classes=14).state_dict().items()}
    save_sam3d_decoder_files(path, seeded_state_dict(shapes, 31), patch_size=(32, 96, 96), spacing=(4.0, 2.0, 2.0))
    # MedSAM's seeded file has Meta's SAM ViT-B layout: it stands in for sam_vit_b_01ec64.pth
    return ["--conf", f"{SAM3D}_checkpoint", str(path), "--conf", "sam_vit_b_checkpoint", str(slice_checkpoints["medsam"])]


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    """The commands' environment: Ray's sessions in a short folder of their own (its socket paths
    must stay short), MONAI Label's DICOMweb cache under the test's."""
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    try:
        yield {**os.environ, "RAY_TMPDIR": ray_dir, "PYTHONUNBUFFERED": "1",
               "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path_factory.mktemp("dicomweb-cache"))}
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def command(studies, model: str, state: Path, *extra: str) -> list:
    return [sys.executable, "-m", "samlabel.preannotate", "--app", str(APP_DIR), "--studies", str(studies),
            "--model", model, "--state", str(state), *extra]


def run(args: list, env: dict, status: int = 0) -> dict:
    """Run the command to its end; its summary (the last line on stdout)."""
    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert finished.returncode == status, finished.stderr[-6000:]
    return json.loads(finished.stdout.splitlines()[-1])


def done_in(state: Path) -> dict:
    return json.loads(state.read_text())["done"] if state.is_file() else {}


def label_of(studies: Path, image: str, tag: str) -> nib.Nifti1Image:
    """The label saved under tag, as the datastore records it."""
    labels = json.loads((studies / "datastore_v2.json").read_text())["objects"][image]["labels"]
    return nib.load(studies / "labels" / tag / (image + labels[tag]["ext"]))


def check_geometry(studies: Path, image: str, tag: str) -> np.ndarray:
    """The label has its image's exact grid: shape and voxel-to-world affine. Its array."""
    label, original = label_of(studies, image, tag), nib.load(studies / f"{image}.nii.gz")
    assert label.shape == original.shape
    np.testing.assert_allclose(label.affine, original.affine, atol=1e-5)
    assert label.get_data_dtype() == np.uint8
    return np.asarray(label.dataobj)


# ---- SAM3D over a folder, killed and resumed ---------------------------------------------------------
@pytest.fixture(scope="module")
def studies(tmp_path_factory, sample_studies_module) -> Path:
    folder = tmp_path_factory.mktemp("preannotate-studies")
    for name in GRIDS:
        write_volume(sample_studies_module, folder, name)
    return folder


def family(pid: int) -> list:
    """A process and all its descendants (Ray's raylet, GCS, workers...)."""
    try:
        process = psutil.Process(pid)
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 too


def listening_beyond_loopback(processes) -> list:
    found = []
    for process in processes:
        try:
            found += [(process.name(), c.laddr) for c in process.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN and not loopback(c.laddr.ip)]
        except psutil.NoSuchProcess:
            pass
    return found


def test_killed_midway_then_resumed_without_redoing_any_image(studies, sam3d_conf, environment, tmp_path):
    state = tmp_path / "state.json"
    args = command(studies, SAM3D, state, "--actors", "2", *sam3d_conf)
    log_path = tmp_path / "first-run.log"
    with open(log_path, "wb") as log:
        first = subprocess.Popen(args, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ray_processes, deadline = {}, time.monotonic() + RUN_TIMEOUT
    try:
        while not done_in(state):  # until the first image is saved
            assert first.poll() is None, f"it ended before any image was done:\n{log_path.read_text()[-6000:]}"
            assert time.monotonic() < deadline, log_path.read_text()[-6000:]
            ray_processes.update({p.pid: p for p in family(first.pid)})
            time.sleep(0.2)
        assert listening_beyond_loopback(ray_processes.values()) == []  # the local Ray instance is on loopback only
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        dicomweb_store.stop_process_group(first)
    _, alive = psutil.wait_procs(list(ray_processes.values()), timeout=30)
    assert alive == [], f"Ray processes outlived the killed command: {alive}"
    first_done = set(done_in(state))
    assert 1 <= len(first_done) < len(GRIDS), log_path.read_text()[-6000:]

    second = run(args, environment)
    annotated = set(second["annotated"])
    assert set(second["already_done"]) >= first_done and not annotated & first_done  # nothing redone
    assert annotated | set(second["already_done"]) == set(GRIDS) and annotated and second["failed"] == {}
    assert len({done_in(state)[image]["actor"] for image in annotated}) == min(2, len(annotated))  # both actors worked
    for image in GRIDS:
        assert set(np.unique(check_geometry(studies, image, "preannotation")).tolist()) <= SAM3D_VALUES | {0}

    third = run(args, environment)  # nothing left: Ray is not even started
    assert third["annotated"] == [] and third["already_done"] == sorted(GRIDS) and third["seconds"] < 20


# ---- a click model prompted by coarse labels -----------------------------------------------------------
@pytest.fixture(scope="module")
def coarse_studies(tmp_path_factory, sample_studies_module) -> Path:
    folder = tmp_path_factory.mktemp("preannotate-coarse")
    for name in ("ct_a", "ct_b"):
        write_volume(sample_studies_module, folder, name, coarse_tag="original")
    write_volume(sample_studies_module, folder, "ct_c")  # no coarse label: nothing to prompt with
    flat = nib.Nifti1Image(np.ones((40, 40), np.int16), np.eye(4))  # a 2D image, which the 3D model refuses
    nib.save(flat, folder / "flat_2d.nii.gz")
    nib.save(flat, folder / "labels" / "original" / "flat_2d.nii.gz")
    return folder


def test_a_click_model_is_prompted_structure_by_structure_from_coarse_labels(coarse_studies, checkpoints, environment,
                                                                           tmp_path):
    state = tmp_path / "state.json"
    summary = run(command(coarse_studies, "fastsam3d", state, "--prompt-tag", "original", "--label-tag", "clicks",
                          "--actors", "2", "--cpus-per-actor", "0.5", "--conf", "fastsam3d_checkpoint",
                          str(checkpoints["fastsam3d"])), environment, status=1)  # 1: an image failed
    assert sorted(summary["annotated"]) == ["ct_a", "ct_b"] and summary["without_prompt"] == ["ct_c"]
    assert "3D volume" in summary["failed"]["flat_2d"] and "3D volume" in json.loads(state.read_text())["failed"]["flat_2d"]
    for image in ("ct_a", "ct_b"):
        coarse_image = nib.load(coarse_studies / "labels" / "original" / f"{image}.nii.gz")
        coarse = np.asarray(coarse_image.dataobj)
        spacing = np.linalg.norm(coarse_image.affine[:3, :3], axis=0)
        prompts = done_in(state)[image]["prompts"]
        assert sorted(p["value"] for p in prompts) == [1, 2]  # one structure per value: one click each
        for prompt in prompts:
            structure = coarse == prompt["value"]
            depth = ndimage.distance_transform_edt(structure, sampling=spacing)
            assert prompt["voxels"] == structure.sum() and depth[tuple(prompt["click"])] == depth.max()  # its deepest voxel
        result = check_geometry(coarse_studies, image, "clicks")
        assert set(np.unique(result).tolist()) <= {0, 1, 2}
        for value in (1, 2):
            assert ((result == value) & (coarse == value)).any()  # each structure's mask overlaps it


def test_2d_prompts_are_each_parts_box_or_deepest_pixel_slice_by_slice():
    label = np.zeros((40, 30, 4), np.uint8)
    label[5:15, 4:9, 1:3] = 1  # one structure on slices 1 and 2
    label[20:32, 10:13, 2] = 1  # a second part of value 1 on slice 2
    label[30:38, 20:28, 2] = 2
    label[0, 0, 3] = 2  # a speck: no prompt
    found = structures_2d(label, (1.0, 1.0, 2.0))
    assert [(s.value, s.click[2], s.box) for s in found] == [  # larger parts first
        (1, 1, (5, 14, 4, 8)), (1, 2, (5, 14, 4, 8)), (1, 2, (20, 31, 10, 12)), (2, 2, (30, 37, 20, 27))]
    assert all(label[s.click] == s.value for s in found)
    box = prompt_request(get_spec("medsam"), found[0])
    assert box.roi == (5, 14, 4, 8, 1, 1) and box.slice_index == 1 and box.foreground == ()
    point = prompt_request(get_spec("sam_med2d"), found[0])
    assert point.foreground == (found[0].click,) and found[0].click[1] == 6 and point.roi is None  # its deepest pixel
    hollow = np.zeros((21, 21, 21), bool)
    hollow[2:19, 2:19, 2:19] = True
    hollow[5:16, 5:16, 5:16] = False  # a hollow cube: the centroid lies outside it
    [shell] = structures_3d(hollow.astype(np.uint8), (1.0, 1.0, 1.0))
    assert hollow[shell.click] and shell.voxels == hollow.sum()


# ---- arguments -------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--model", "fastsam3d"], "--prompt-tag names the coarse labels"),
    (["--model", SAM3D, "--prompt-tag", "original"], "takes no prompts"),
    (["--model", SAM3D, "--label-tag", "../elsewhere"], "invalid tag '../elsewhere'"),
    (["--model", "fastsam3d", "--prompt-tag", "same", "--label-tag", "same"], "would replace their prompts"),
    (["--model", SAM3D, "--actors", "0"], "--actors must be at least 1"),
    (["--model", SAM3D, "--conf", "no_such_key", "1"], "unknown key 'no_such_key'"),
    (["--model", "sam_med3d", "--prompt-tag", "original", "--conf", "sam_med3d_checkpoint", "/nowhere/sam_med3d.pth"],
     "checkpoint not found"),
])
def test_arguments_that_cannot_run_are_refused_before_ray_starts(extra, message, studies, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", os.environ["PATH"])  # main() puts its Python's folder first
    with pytest.raises(SystemExit) as exit:
        main(["--app", str(APP_DIR), "--studies", str(studies), "--state", str(tmp_path / "state.json"), *extra])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_an_unreachable_or_absent_store_is_refused(sam3d_conf, tmp_path, capsys, monkeypatch):
    from monailabel.config import settings

    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / "cache"))
    nowhere = f"http://127.0.0.1:{_free_port()}/dicom-web"
    for studies, tag, message in ((nowhere, [], "the DICOMweb store cannot be reached"), (nowhere, ["--label-tag", "mine"],
                                  "DICOM SEGs under the tag 'final'"), (str(tmp_path / "absent"), [], "no such folder")):
        with pytest.raises(SystemExit) as exit:
            main(["--app", str(APP_DIR), "--studies", studies, "--model", SAM3D, "--state", str(tmp_path / "s.json"),
                  *sam3d_conf, *tag])
        assert exit.value.code == 2 and message in capsys.readouterr().err


# ---- Orthanc, through a running Ray cluster -------------------------------------------------------------
@pytest.fixture
def ray_head(environment, tmp_path):
    """A Ray head on loopback, as `ray start --head` makes one; its GCS address."""
    port = _free_port()
    ray = Path(sys.executable).with_name("ray")
    with open(tmp_path / "ray-head.log", "wb") as log:
        head = subprocess.Popen([str(ray), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                                 "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                                env={**environment, **RAY_LOOPBACK_ONLY}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "ray-head.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:  # the whole group at once: after a SIGTERM, `ray start` takes seconds and its GCS server can outlive it
        processes = family(head.pid)  # its workers too: they have groups of their own and end with their raylet
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        psutil.wait_procs(processes, timeout=30)


@pytest.mark.skipif(bool(dicomweb_store.orthanc_missing()), reason=f"needs Orthanc: {dicomweb_store.orthanc_missing()}")
def test_on_orthanc_each_result_is_a_dicom_seg_of_its_series(sample_studies_module, sam3d_conf, environment, ray_head,
                                                             tmp_path):
    store = dicomweb_store.OrthancStore(tmp_path / "orthanc", _free_port()).start()
    try:
        grid = sample_studies_module.Grid(*GRIDS["ct_a"])
        _study, series = sample_studies_module.write_ct_dicom(tmp_path / "series", grid)
        store.upload(tmp_path / "series")
        args = command(store.url, SAM3D, tmp_path / "state.json", "--actors", "1", "--address", ray_head, *sam3d_conf)
        summary = run(args, {**environment, "RAY_AUTH_MODE": "token"})  # the head's token (Ray's default auth)
        assert summary["annotated"] == [series] and summary["failed"] == {}

        [found] = requests.post(f"{store.base}/tools/find", json={"Level": "Instance", "Query": {"Modality": "SEG"}},
                                timeout=30).json()
        seg = pydicom.dcmread(io.BytesIO(requests.get(f"{store.base}/instances/{found}/file", timeout=30).content))
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
        [label_path] = Path(environment["MONAI_LABEL_DICOMWEB_CACHE_PATH"]).glob("*/labels/final/*.nii.gz")
        label = nib.load(label_path)
        np.testing.assert_allclose(label.affine, sample_studies_module.ct_affine(grid), atol=1e-3)  # the series' grid
        array = np.asarray(label.dataobj)
        slices = {}  # source SOP instance UID -> (slice index, its position)
        for path in sorted((tmp_path / "series").glob("*.dcm")):
            source = pydicom.dcmread(path, stop_before_pixels=True)
            slices[source.SOPInstanceUID] = (int(source.InstanceNumber) - 1, [float(v) for v in source.ImagePositionPatient])
        values = {int(s.SegmentNumber): get_spec(SAM3D).labels[s.SegmentLabel] for s in seg.SegmentSequence}
        frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
        covered = set()
        for frame, pixels in zip(seg.PerFrameFunctionalGroupsSequence, frames):
            k, position = slices[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
            value = values[int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
            np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient], position, atol=1e-3)
            assert np.array_equal(pixels.astype(bool), (array[:, :, k] == value).T)  # rows run along j, columns along i
            covered.add((value, k))
        assert {(v, k) for v in values.values() for k in range(array.shape[2]) if (array[:, :, k] == v).any()} <= covered

        again = run(args, environment)  # the SEG in the store marks the series done: Ray is not needed
        assert again["already_done"] == [series] and again["annotated"] == []
    finally:
        store.stop()
