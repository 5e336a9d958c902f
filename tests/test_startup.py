"""Start-up of a real `monailabel start_server`: the app loads every model's checkpoint in its own
thread at once, and each must load; the first clicks, sent to all models at once, are answered.
A checkpoint that cannot be read answers its clicks with 503 and a message naming the file."""

import os
import threading
import time

import pytest

from conftest import APP_DIR, start_server
from test_click3d_server import PHANTOM_CLICK, phantom_copies, save_nifti, slicer_infer

# Fresh server starts in one test (the race showed in 6 of 6 starts); each loads four full-size
# models, about 35 s on 2 CPU cores. Fewer for a quick local run: SAMLABEL_TEST_STARTUP_STARTS=1.
STARTS = int(os.environ.get("SAMLABEL_TEST_STARTUP_STARTS", "5"))
SLICE = int(PHANTOM_CLICK[2])
FIRST_CLICKS = {  # model -> (clicks, extra params), shaped as the Slicer plugin sends them
    "fastsam3d": ([PHANTOM_CLICK], {}),
    "sam_med3d": ([PHANTOM_CLICK], {}),
    "medsam": ([PHANTOM_CLICK], {"slice": SLICE, "roi": [20, 40, 12, 30, SLICE, SLICE]}),
    "sam_med2d": ([PHANTOM_CLICK], {"slice": SLICE}),
}
LOAD_ERRORS = ("refused to unpickle", "not a readable PyTorch checkpoint", "Traceback")


@pytest.fixture(scope="module")
def phantom_studies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("startup-studies")
    array, affine, _ = phantom_copies()["phantom_ras"]
    save_nifti(array, affine, folder / "phantom_ras.nii.gz")
    return folder


def all_models_conf(checkpoints, slice_checkpoints):
    paths = {**checkpoints, **slice_checkpoints}
    return {"models": ",".join(FIRST_CLICKS), **{f"{name}_checkpoint": paths[name] for name in FIRST_CLICKS}}


def first_clicks_at_once(url) -> dict:
    """{model: (status, body)}: one click per model, all sent together from threads."""
    answers = {}
    barrier = threading.Barrier(len(FIRST_CLICKS))

    def click(model):
        clicks, extra = FIRST_CLICKS[model]
        barrier.wait()
        response = slicer_infer(url, model, "phantom_ras", clicks, client_id=f"first-{model}", **extra)
        answers[model] = response.status_code, response.text[:300] if response.status_code != 200 else ""

    threads = [threading.Thread(target=click, args=(model,)) for model in FIRST_CLICKS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_every_model_loads_at_start_up(tmp_path, phantom_studies, checkpoints, slice_checkpoints, monailabel_server):
    """Each fresh start: no model's load fails (the parallel loads once stripped each other's
    allow-list and SAM-Med3D-turbo was refused), and the first clicks to all four models are 200."""
    monailabel_server.stop_all()  # four full-size models of its own: the earlier tests' servers make room
    conf = all_models_conf(checkpoints, slice_checkpoints)
    for start in range(STARTS):
        began, work_dir = time.monotonic(), tmp_path / f"start-{start}"
        work_dir.mkdir()
        server = start_server(APP_DIR, phantom_studies, conf, work_dir)
        try:
            answers = first_clicks_at_once(server.url)  # at once, while the preloads may still run
            log = server.log()
        finally:
            server.stop()
        context = f"start {start + 1} of {STARTS} ({time.monotonic() - began:.0f} s); server log:\n{log[-6000:]}"
        assert {model: status for model, (status, _) in answers.items()} == dict.fromkeys(FIRST_CLICKS, 200), \
            f"{answers}\n{context}"
        assert not [error for error in LOAD_ERRORS if error in log], context


def test_empty_checkpoint_answers_503_naming_the_file(tmp_path_factory, monailabel_server, phantom_studies):
    empty = tmp_path_factory.mktemp("empty-checkpoint") / "FastSAM3D.pth"
    empty.write_bytes(b"")
    server = monailabel_server(conf={"models": "fastsam3d", "fastsam3d_checkpoint": empty}, studies=phantom_studies)
    for _ in range(2):  # the start-up preload failed; each click tries the file again and says why
        response = slicer_infer(server.url, "fastsam3d", "phantom_ras", [PHANTOM_CLICK])
        assert response.status_code == 503, response.text
        detail = response.json()["detail"]
        assert str(empty) in detail and "empty file" in detail and "weights_only" not in detail, detail
    log = server.log()
    assert f"{empty}: empty file" in log and "IndexError" not in log  # the preload's error, logged at start-up
