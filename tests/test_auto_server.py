"""SAM3D's automatic segmentation through a real `monailabel start_server`: the registry entry
`sam3d_synapse` with seeded weights in the official formats (Meta's SAM ViT-B layout, an nnU-Net v1
`.model` and its `.model.pkl` plans), on the oblique synthetic CT and an LPS-stored copy.

The weights are random, so the labels are noise; what is checked is what the front ends rely on:
the answer lies on the image's own grid with its exact geometry, holds only the named labels'
upstream values, the encoder features are reused by a second run, and bad requests get 4xx.
"""

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk

from samlabel.checkpoint import sha256
from conftest import finished_training, start_training

MODEL = "sam3d_synapse"
TIMEOUT = 600


@pytest.fixture(scope="module")
def studies(tmp_path_factory, sample_studies_module):
    folder = tmp_path_factory.mktemp("auto-studies")
    sample_studies_module.write_ct(folder / sample_studies_module.CT_NAME)
    ct = nib.load(folder / sample_studies_module.CT_NAME)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # stored LPS: i and j reversed, the same physical image
    flip[:2, 3] = np.array(ct.shape[:2]) - 1
    lps = nib.Nifti1Image(np.asarray(ct.dataobj)[::-1, ::-1].copy(), ct.affine @ flip)
    nib.save(lps, folder / "ct_lps.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((40, 40), np.int16), np.eye(4)), folder / "flat_2d.nii.gz")
    return folder


@pytest.fixture(scope="module")
def server(monailabel_server, studies, sam3d_checkpoints):
    return monailabel_server(conf=sam3d_checkpoints, studies=studies)


@pytest.fixture(scope="module")
def sam3d_checkpoint(sam3d_checkpoints) -> str:
    return sam3d_checkpoints[f"{MODEL}_checkpoint"]


def infer(server, image, **params):
    """As Slicer's auto-segmentation and OHIF's Auto-Segmentation send it: the image, result options."""
    body = {"result_extension": ".nrrd", "result_dtype": "uint8", **params}
    return requests.post(f"{server.url}/infer/{MODEL}", params={"image": image, "output": "all"},
                         files={"params": (None, json.dumps(body))}, timeout=TIMEOUT)


def split(response, tmp_path):
    from email import message_from_bytes

    message = message_from_bytes(b"Content-Type: " + response.headers["content-type"].encode() + b"\r\n\r\n"
                                 + response.content)
    parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
             for part in message.get_payload()}
    (tmp_path / "result.nrrd").write_bytes(parts["image"])
    return json.loads(parts["params"]), sitk.ReadImage(str(tmp_path / "result.nrrd"))


def test_info_lists_a_segmentation_model_with_upstream_label_ids(server):
    model = requests.get(f"{server.url}/info/", timeout=30).json()["models"][MODEL]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == {"spleen": 1, "right kidney": 2, "left kidney": 3, "gallbladder": 4, "liver": 6,
                               "stomach": 7, "aorta": 8, "pancreas": 11}
    assert model["config"]["mirroring"] is False


def test_slicer_lists_it_in_its_auto_segmentation_panel(server):
    from test_slicer_protocol import SlicerPlugin  # the stock plugin's reading of /info/

    plugin = SlicerPlugin(server.url)
    plugin.fetch_info()
    assert plugin.panels["Auto Segmentation"] == [MODEL] and plugin.panels["SmartEdit"] == []
    assert plugin.is_3d(MODEL) and plugin.config_params(MODEL)["mirroring"] is False


@pytest.mark.parametrize("image", ["ct_synthetic", "ct_lps"])
def test_result_on_the_image_grid_with_named_values_and_cached_features(server, studies, image, tmp_path):
    first = infer(server, image)
    assert first.status_code == 200, first.text
    params, result = split(first, tmp_path)
    reference = sitk.ReadImage(str(studies / f"{image}.nii.gz"))
    assert result.GetSize() == reference.GetSize()
    assert np.allclose(result.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    assert np.allclose(result.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    assert np.allclose(result.GetDirection(), reference.GetDirection(), atol=1e-6)
    values = set(np.unique(sitk.GetArrayFromImage(result)).tolist())
    assert values <= {0, 1, 2, 3, 4, 6, 7, 8, 11} and len(values) > 1  # random weights: some organs somewhere
    assert params["encoded_slices"] == 64  # one window: 36 slices of 4 mm, zero-padded to the patch's 64
    again = infer(server, image)
    assert again.status_code == 200
    params_again, result_again = split(again, tmp_path)
    assert params_again["encoded_slices"] == 0  # every slice's features from the cache
    assert np.array_equal(sitk.GetArrayFromImage(result_again), sitk.GetArrayFromImage(result))


def test_bad_requests_are_refused(server, sam3d_checkpoint):
    digest = sha256(sam3d_checkpoint)
    assert infer(server, "ct_synthetic", mirroring="perhaps").status_code == 400
    assert infer(server, "flat_2d").status_code == 400
    assert infer(server, "no_such_image").status_code == 404
    assert infer(server, "ct_synthetic", result_extension=".exe").status_code == 400
    assert sha256(sam3d_checkpoint) == digest  # serving never writes the official file
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


def test_batch_inference_labels_every_volume_of_the_datastore(server, studies, tmp_path):
    """MONAI Label's /batch/infer/<model> (a background process of its own): every 3D image gets the
    result saved under the tag `original`, on its own grid; the 2D image is refused and skipped."""
    started = requests.post(f"{server.url}/batch/infer/{MODEL}", params={"images": "all"},
                            json={"label_tag": "original", "max_workers": 1}, timeout=60)  # the rest: MONAI Label's defaults
    assert started.status_code == 200, started.text
    deadline = time.monotonic() + TIMEOUT
    while (status := requests.get(f"{server.url}/batch/infer", timeout=30).json()["status"]) not in ("DONE", "ERROR"):
        assert time.monotonic() < deadline, "batch inference did not finish"
        time.sleep(2)
    assert status == "DONE"
    for image in ("ct_synthetic", "ct_lps"):
        label = requests.get(f"{server.url}/datastore/label", params={"label": image, "tag": "original"}, timeout=30)
        assert label.status_code == 200, image
        path = tmp_path / f"{image}-label.nii.gz"  # the image's own format: batch requests name none
        path.write_bytes(label.content)
        result, reference = sitk.ReadImage(str(path)), sitk.ReadImage(str(studies / f"{image}.nii.gz"))
        assert result.GetSize() == reference.GetSize()
        assert np.allclose(result.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        assert np.allclose(result.GetDirection(), reference.GetDirection(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(result)).tolist()) <= {0, 1, 2, 3, 4, 6, 7, 8, 11}
    assert requests.get(f"{server.url}/datastore/label", params={"label": "flat_2d", "tag": "original"},
                        timeout=30).status_code != 200


def train(server, **params):
    return start_training(server, MODEL, **params)


def test_training_on_a_saved_label_is_served_without_a_restart(server, studies, sam3d_checkpoint,
                                                              sample_studies_module, tmp_path):
    """/train/<model> through MONAI Label's own training process: refused up front without labels
    or with bad options; with a Slicer-style final label (values named by label_info) it writes a
    new decoder next to the official one, which the next inference serves."""
    digest = sha256(sam3d_checkpoint)
    before = infer(server, "ct_synthetic")  # with the official decoder (and the features cached)
    assert before.status_code == 200 and split(before, tmp_path)[0]["weights"] == Path(sam3d_checkpoint).name
    refused = train(server, max_epochs=1)
    assert refused.status_code == 400 and "no labels" in refused.json()["detail"]
    assert train(server, max_epochs=0).status_code == 400

    ct = nib.load(studies / sample_studies_module.CT_NAME)
    label = sample_studies_module.ct_label_array(sample_studies_module.NIFTI_CT)  # 1 bright, 2 dark
    nib.save(nib.Nifti1Image(label, ct.affine), tmp_path / "label.nii.gz")
    label_info = [{"name": "Liver", "idx": 1}, {"name": "spleen", "idx": 2}]  # Slicer's segment names
    with open(tmp_path / "label.nii.gz", "rb") as f:
        saved = requests.put(f"{server.url}/datastore/label", params={"image": "ct_synthetic", "tag": "final"},
                             files={"label": ("label.nii.gz", f)}, data={"params": json.dumps({"label_info": label_info})},
                             timeout=60)
    assert saved.status_code == 200, saved.text

    started = train(server, max_epochs=1, iterations_per_epoch=2, batch_size=1)
    assert started.status_code == 200, started.text
    again = train(server, max_epochs=1)  # at once: the first run's process may not have started yet
    assert again.status_code == 409 and "already going" in again.json()["detail"]  # one run at a time
    task = finished_training(server, TIMEOUT)
    assert task["status"] == "DONE", task.get("details")
    stats = requests.get(f"{server.url}/info/", timeout=30).json()["train_stats"][MODEL]
    assert stats["status"] == "done" and stats["epoch"] == stats["total_epochs"] == 1 and len(stats["loss"]) == 1
    written = Path(stats["written"]).name
    assert written.endswith(".model") and (Path(sam3d_checkpoint).parent / "trained" / written).is_file()

    served = infer(server, "ct_synthetic")
    assert served.status_code == 200, served.text
    params, _ = split(served, tmp_path)
    assert params["weights"] == written and params["encoded_slices"] == 0  # new decoder, same cached features
    assert sha256(sam3d_checkpoint) == digest  # the official file is never written


def test_four_sequences_as_one_4d_image(tmp_path):
    """SAM3D's BraTS-style plans take 4 co-registered sequences: served from one 4D image (i, j, k, 4),
    each sequence normalised and encoded on its own; the labels on the image's grid. A 3D image is
    refused with a message saying what the model takes."""
    from samlabel.errors import InputError
    from samlabel.sam3d_training_seeded import seeded_sam3d_engine

    engine = seeded_sam3d_engine(tmp_path / "model", "sam3d_four", {"edema": 1, "non-enhancing tumor": 2, "enhancing tumor": 3},
                                 patch_size=(8, 32, 32), spacing=(2.0, 2.0, 2.0), scheme="nonCT", modalities=4)
    affine = np.array([[0.0, 1.9, 0.1, -20.0], [-2.1, 0.0, 0.0, 30.0], [0.0, 0.1, 2.0, 5.0], [0, 0, 0, 1]])
    sequences = np.random.default_rng(0).normal(100, 20, (37, 29, 11, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(sequences, affine), tmp_path / "brats_like.nii.gz")
    nib.save(nib.Nifti1Image(sequences[..., 0], affine), tmp_path / "one_sequence.nii.gz")
    data = engine.segment(str(tmp_path / "brats_like.nii.gz"))
    assert data["pred"].shape == (37, 29, 11)
    assert np.allclose(data["affine"], nib.load(tmp_path / "brats_like.nii.gz").affine, atol=1e-6)  # the image's own
    assert set(np.unique(data["pred"])) <= {0, 1, 2, 3} and data["result"]["encoded_slices"] > 0
    with pytest.raises(InputError, match=r"4 co-registered sequences as one 4D image"):
        engine.segment(str(tmp_path / "one_sequence.nii.gz"))
