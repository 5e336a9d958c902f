"""/train/fastsam3d_distill through a real `monailabel start_server` and MONAI Label's own training process,
on seeded full-size FastSAM3D (a copy: runs write next to it) and SAM-Med3D-turbo (the teacher, named by
--conf sam_med3d_checkpoint) in the official layout: refused up front with bad options, run to the
end and served at the next click with new embeddings, then started again and stopped with DELETE /train/."""

import shutil
import time
from pathlib import Path

import requests

from samlabel.checkpoint import sha256
from conftest import finished_training, start_training
from test_click3d_server import parse_multipart, slicer_infer

TASK = "fastsam3d_distill"
TIMEOUT = 600


def train(server, **params):
    return start_training(server, TASK, **params)


def train_stats(server):
    return requests.get(f"{server.url}/info/", timeout=30).json()["train_stats"].get(TASK, {})


def wait(condition, what):
    deadline = time.monotonic() + TIMEOUT
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {TIMEOUT} s"
        time.sleep(1)
    return result


def test_distillation_starts_stops_and_its_encoder_is_served_at_the_next_click(monailabel_server, checkpoints,
                                                                               sample_studies_module,
                                                                               tmp_path_factory, tmp_path):
    studies, model = tmp_path_factory.mktemp("distill-studies"), tmp_path_factory.mktemp("distill-model")
    sample_studies_module.write_ct(studies / sample_studies_module.CT_NAME)  # no label: windows at random points
    checkpoint = model / Path(checkpoints["fastsam3d"]).name
    shutil.copy(checkpoints["fastsam3d"], checkpoint)
    digests = sha256(checkpoint), sha256(checkpoints["sam_med3d"])
    server = monailabel_server(conf={"models": "fastsam3d", "fastsam3d_checkpoint": str(checkpoint),
                                     "sam_med3d_checkpoint": str(checkpoints["sam_med3d"])}, studies=studies)
    image = sample_studies_module.CT_NAME.split(".")[0]
    click = [[113, 56, 31]]

    before = slicer_infer(server.url, "fastsam3d", image, click)
    assert before.status_code == 200, before.text
    assert parse_multipart(before, tmp_path)[0]["weights"] == checkpoint.name
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert TASK in info["trainers"] and info["trainers"][TASK]["config"]["learning_rate"] == 8e-4

    for params, message in (({"max_epochs": 0}, "max_epochs"), ({"progressive_epochs": "x"}, "progressive_epochs"),
                            ({"start": "fresh"}, "start"), ({"mixed_precision": True}, "CUDA"),
                            ({"device": "cuda"}, "device")):
        refused = train(server, **params)
        assert refused.status_code == 400 and message in refused.json()["detail"], (params, refused.text)

    started = train(server, max_epochs=1)
    assert started.status_code == 200, started.text
    again = train(server, max_epochs=1)  # at once: the first run's process may not have started yet
    assert again.status_code == 409 and "already going" in again.json()["detail"]
    task = finished_training(server, TIMEOUT)
    assert task["status"] == "DONE", task.get("details")
    stats = train_stats(server)
    assert stats["status"] == "done" and stats["epoch"] == stats["total_epochs"] == 1
    assert stats["crops"] == [f"{image}: sample 1"] and stats["teacher_targets"] == [{"crop": stats["crops"][0], "reused": False}]
    assert stats["neck_mse_after"] < stats["neck_mse_before"] and stats["started_from"] == checkpoint.name
    assert [p.name for p in (model / "trained" / "fastsam3d").glob("*.pth")] == [stats["written"]]

    after = slicer_infer(server.url, "fastsam3d", image, click, client_id="after-distillation")
    assert after.status_code == 200, after.text
    params = parse_multipart(after, tmp_path)[0]
    assert params["weights"] == stats["written"]
    assert not params["embedding_reused"]  # a new encoder: the cached embedding is not served

    assert train(server, max_epochs=10_000).status_code == 200
    wait(lambda: train_stats(server)["status"] != "done", "the second run's start")
    assert requests.delete(f"{server.url}/train/", timeout=30).status_code == 200
    assert finished_training(server, TIMEOUT)["status"] == "STOPPED"
    assert wait(lambda: train_stats(server)["status"] == "stopped", "stopped in the stats")
    assert [p.name for p in (model / "trained" / "fastsam3d").glob("*.pth")] == [stats["written"]]  # nothing new
    assert (sha256(checkpoint), sha256(checkpoints["sam_med3d"])) == digests  # the official files are never written
