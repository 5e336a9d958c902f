"""/train/fastsam3d_finetune through a real `monailabel start_server` and MONAI Label's own training
process, on a seeded full-size FastSAM3D in the official layout (a copy: the run writes next to it)."""

import shutil
from pathlib import Path

import nibabel as nib
import requests

from samlabel.checkpoint import sha256
from conftest import finished_training, start_training
from test_click3d_server import parse_multipart, slicer_infer

TASK = "fastsam3d_finetune"
TIMEOUT = 600


def train(server, **params):
    return start_training(server, TASK, **params)


def test_fine_tuning_on_a_saved_label_is_served_at_the_next_click(monailabel_server, checkpoints, sample_studies_module,
                                                                 tmp_path_factory, tmp_path):
    studies, model = tmp_path_factory.mktemp("finetune-studies"), tmp_path_factory.mktemp("finetune-model")
    sample_studies_module.write_ct(studies / sample_studies_module.CT_NAME)
    checkpoint = model / Path(checkpoints["fastsam3d"]).name
    shutil.copy(checkpoints["fastsam3d"], checkpoint)
    digest = sha256(checkpoint)
    server = monailabel_server(conf={"models": "fastsam3d", "fastsam3d_checkpoint": str(checkpoint)}, studies=studies)
    image = sample_studies_module.CT_NAME.split(".")[0]
    click = [[113, 56, 31]]  # inside the bright ellipsoid (label 1)

    before = slicer_infer(server.url, "fastsam3d", image, click)
    assert before.status_code == 200, before.text
    assert parse_multipart(before, tmp_path)[0]["weights"] == checkpoint.name
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert TASK in info["trainers"] and info["trainers"][TASK]["config"]["learning_rate"] == 8e-5

    refused = train(server, max_epochs=1)
    assert refused.status_code == 400 and "no labels" in refused.json()["detail"]
    assert train(server, max_epochs=0).status_code == 400
    gpu_only = train(server, mixed_precision=True)
    assert gpu_only.status_code == 400 and "CUDA" in gpu_only.json()["detail"]

    ct = nib.load(studies / sample_studies_module.CT_NAME)
    label = sample_studies_module.ct_label_array(sample_studies_module.NIFTI_CT)  # 1 bright, 2 dark
    nib.save(nib.Nifti1Image(label, ct.affine), tmp_path / "label.nii.gz")
    with open(tmp_path / "label.nii.gz", "rb") as f:
        saved = requests.put(f"{server.url}/datastore/label", params={"image": image, "tag": "final"},
                             files={"label": ("label.nii.gz", f)}, timeout=60)
    assert saved.status_code == 200, saved.text

    started = train(server, max_epochs=1, iterations_per_epoch=2)
    assert started.status_code == 200, started.text
    assert train(server, max_epochs=1).status_code in (400, 409, 429)  # one run at a time
    task = finished_training(server, TIMEOUT)
    assert task["status"] == "DONE", task.get("details")
    stats = requests.get(f"{server.url}/info/", timeout=30).json()["train_stats"][TASK]
    assert stats["status"] == "done" and stats["epoch"] == stats["total_epochs"] == 1 and stats["iteration"] == 2
    assert stats["structures"] == [f"{image}: 1", f"{image}: 2"] and stats["started_from"] == checkpoint.name
    assert (model / "trained" / "fastsam3d" / stats["written"]).is_file()

    after = slicer_infer(server.url, "fastsam3d", image, click, client_id="after-training")
    assert after.status_code == 200, after.text
    params = parse_multipart(after, tmp_path)[0]
    assert params["weights"] == stats["written"]
    assert params["embedding_reused"]  # the encoder is unchanged: its cached embedding still serves
    assert sha256(checkpoint) == digest  # the official file is never written
