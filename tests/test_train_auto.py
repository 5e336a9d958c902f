"""SAM3D's train task without a server: a tiny encoder, seeded official-format files, a LocalDatastore
with two synthetic CTs and their final labels named by label_info."""

import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monailabel.datastore.local import LocalDatastore

from samlabel import autoseg
from samlabel.checkpoint import read_checkpoint, sha256
from samlabel.cli import check_checkpoint
from samlabel.engine_auto import AutoSegmentationEngine
from samlabel.errors import InputError
from samlabel.modeling.sam3d_segmenter import SAM3DSegmenter
from samlabel.sam3d_checkpoint import load_sam3d
from samlabel.sam3d_training import (DEEP_SUPERVISION_WEIGHTS, dice_ce_loss, downsampled_target, labels_on_network_grid,
                                     resize_segmentation, VolumeGrid)
from samlabel.sam3d_training_seeded import seeded_sam3d_engine
from samlabel.seeded import nnunet_plans_info
from samlabel.tasks.train_auto import Sam3DTraining

PATCH = (8, 32, 32)
TARGET_SPACING = (3.0, 1.5, 1.5)  # network order (z, y, x): the images' 1.2 mm in-plane is resampled
LABELS = {"liver": 1, "spleen": 2}  # names -> the test model's class ids (3 classes with background)
SHAPE, SPACING = (48, 44, 14), (1.2, 1.2, 3.0)  # stored (i, j, k)
FAST = {"max_epochs": 3, "iterations_per_epoch": 8, "batch_size": 2, "device": "cpu", "start": "official"}


def write_model_folder(root: Path) -> AutoSegmentationEngine:
    return seeded_sam3d_engine(root, "sam3d_test", LABELS, PATCH, TARGET_SPACING)


def affine() -> np.ndarray:
    """Oblique, LPS-like axes: the training must not care."""
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([-1, -1, 1]) @ np.diag(SPACING)
    matrix[:3, 3] = (30.0, -12.0, 40.0)
    return matrix


def phantom(seed: int):
    """(CT in HU, labels 1 and 2 as the file stores them): two ellipsoid organs in a body."""
    rng = np.random.default_rng(seed)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1) * SPACING  # mm
    centre = np.array(SHAPE) * SPACING / 2
    hu = np.full(SHAPE, -1000.0)
    hu[(((ijk - centre) / (25, 22, 60)) ** 2).sum(-1) <= 1] = 40
    labels = np.zeros(SHAPE, np.uint8)
    for value, offset in ((1, (-9, 4, 0)), (2, (10, -6, 2))):
        labels[(((ijk - centre - offset - rng.uniform(-2, 2, 3)) / (8, 7, 12)) ** 2).sum(-1) <= 1] = value
    hu[labels == 1], hu[labels == 2] = 180, -80
    return (hu + rng.normal(0, 10, SHAPE)).astype(np.int16), labels


def save_nifti(array: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, affine()), path)
    return path


def datastore(root: Path, label_info=({"name": "Liver", "idx": 1}, {"name": "spleen", "idx": 2}), cases=2,
              label_transform=lambda labels: labels) -> LocalDatastore:
    """Two phantoms with their final labels, saved as Slicer's Submit Label does (label_info)."""
    studies = root / "studies"
    studies.mkdir()
    scratch = root / "scratch"
    scratch.mkdir()
    for case in range(cases):
        hu, labels = phantom(case)
        save_nifti(hu, studies / f"ct{case}.nii.gz")
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",))
    for case in range(cases):
        _, labels = phantom(case)
        label = save_nifti(label_transform(labels), scratch / f"ct{case}.nii.gz")
        store.save_label(f"ct{case}", str(label), "final", {"label_info": list(label_info)} if label_info else {})
    return store


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run on the two phantoms: (engine, task, datastore, result, official file's sha256 before)."""
    root = tmp_path_factory.mktemp("train")
    engine = write_model_folder(root)
    official = sha256(engine.checkpoint), sha256(f"{engine.checkpoint}.pkl")
    store = datastore(root)
    task = Sam3DTraining(engine)
    result = task({**FAST, "max_epochs": 4}, store)
    return engine, task, store, result, official


def test_training_lowers_the_loss_and_reports_through_stats(trained):
    engine, task, _, result, _ = trained
    losses = result["loss"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    stats = task.stats()
    assert stats["status"] == "done" and stats["epoch"] == stats["total_epochs"] == 4
    assert stats["best_metric"] == max(stats["dice"]) and 0 <= stats["best_metric"] <= 1
    assert stats["images"] == 2 and stats["started_from"] == "model_final_checkpoint.model"
    assert [entry["reused"] for entry in stats["feature_cache"]] == [False, False]
    assert all(entry["bytes"] > 0 and entry["seconds"] > 0 for entry in stats["feature_cache"])
    assert json.loads(task.stats_path.read_text()) == stats


def test_written_decoder_is_official_format_and_served_next(trained, tmp_path):
    engine, _, _, result, official = trained
    written = engine.checkpoint.parent / "trained" / result["written"]
    assert written.is_file() and Path(f"{written}.pkl").read_bytes() == Path(f"{engine.checkpoint}.pkl").read_bytes()
    checkpoint = read_checkpoint(written)
    assert set(checkpoint) == {"epoch", "state_dict", "optimizer_state_dict", "lr_scheduler_state_dict", "plot_stuff",
                               "best_stuff"}
    assert checkpoint["epoch"] == 4 and list(checkpoint["plot_stuff"][0]) == result["loss"]
    model, _ = load_sam3d(engine.encoder_checkpoint, written, builder=engine.spec.builder)  # strict
    assert not torch.equal(model.decoder.out1.segmentation_head.weight,
                           read_checkpoint(engine.checkpoint)["state_dict"]["out1.segmentation_head.weight"])
    out = io.StringIO()
    assert check_checkpoint(written, out=out), out.getvalue()
    assert (sha256(engine.checkpoint), sha256(f"{engine.checkpoint}.pkl")) == official
    assert engine.decoder_file() == written
    assert engine.model()[0].decoder.state_dict()["out1.segmentation_head.bias"].equal(
        model.decoder.state_dict()["out1.segmentation_head.bias"])


def test_cached_features_are_the_tiles_inference_encodes(trained):
    engine, _, store, _, _ = trained
    folders = sorted((engine.checkpoint.parent / "feature_cache").iterdir())
    assert len(folders) == 2
    image = engine.images.get(store.get_image_uri("ct0"))
    plans = autoseg.Plans.from_dict(nnunet_plans_info(3, patch_size=PATCH, spacing=TARGET_SPACING)["plans"])
    data = autoseg.preprocess(image.array, image.affine, plans).data
    starts = autoseg.window_starts(data.shape[1:], PATCH)
    model, _ = load_sam3d(engine.encoder_checkpoint, engine.checkpoint, builder=engine.spec.builder)
    y, x = starts[1][-1], starts[2][-1]  # the last tile
    with torch.no_grad():
        expected = model.encode(torch.as_tensor(data[None, :, :, y:y + PATCH[1], x:x + PATCH[2]]))[0].transpose(0, 1)
    cached = [np.load(f / "features.npy", mmap_mode="r") for f in folders]
    match = [c for c in cached if c.shape[1] == data.shape[1]]
    assert any(np.allclose(c[-1].astype(np.float32), expected.numpy(), atol=2e-2, rtol=1e-2) for c in match)


def test_second_run_reuses_the_cache_and_is_deterministic(trained, monkeypatch):
    engine, task, store, first, _ = trained
    calls = []
    encode = SAM3DSegmenter.encode
    monkeypatch.setattr(SAM3DSegmenter, "encode", lambda self, x: calls.append(x.shape) or encode(self, x))
    second = task({**FAST, "max_epochs": 4}, store)
    assert calls == [] and [entry["reused"] for entry in second["feature_cache"]] == [True, True]
    assert second["loss"] == first["loss"] and second["written"] != first["written"]


def test_labels_without_names_are_class_ids(tmp_path):
    engine = write_model_folder(tmp_path)
    result = Sam3DTraining(engine)({**FAST, "max_epochs": 1, "iterations_per_epoch": 2}, datastore(tmp_path, label_info=None))
    assert result["status"] == "done"


def test_fresh_decoder_from_the_labels_alone(tmp_path):
    """No official decoder nor plans: the plans are derived from the labelled images, nnU-Net-style."""
    engine = write_model_folder(tmp_path)
    engine.checkpoint.unlink()
    Path(f"{engine.checkpoint}.pkl").unlink()
    store = datastore(tmp_path)
    result = Sam3DTraining(engine)({**FAST, "max_epochs": 1, "iterations_per_epoch": 2, "start": "fresh"}, store)
    assert result["started_from"] == "fresh" and result["plans"] == "derived"
    written = engine.checkpoint.parent / "trained" / result["written"]
    model, plans = load_sam3d(engine.encoder_checkpoint, written, builder=engine.spec.builder)
    stage = plans["plans_per_stage"][0]
    assert list(stage["patch_size"]) == list(PATCH) and list(stage["current_spacing"]) == pytest.approx(SPACING[::-1])
    assert plans["normalization_schemes"] == {0: "CT"} and plans["num_classes"] == len(LABELS)
    organs = np.concatenate([phantom(case)[0][phantom(case)[1] > 0] for case in range(2)])
    assert plans["dataset_properties"]["intensityproperties"][0]["mean"] == pytest.approx(organs.mean(), abs=5)
    assert engine.decoder_file() == written


@pytest.mark.parametrize("case,expected", [
    ("no labels", "no labels to train sam3d_test on"),
    ("unknown name", "unknown label name 'kidney' (value 2); sam3d_test segments 'liver', 'spleen'"),
    ("unnamed value", "holds value 2, which its label_info does not name (it names [1])"),
    ("values beyond the classes", "holds values [7] that are not classes of sam3d_test (1 to 2)"),
    ("shape mismatch", "has shape (48, 44, 13), its image (48, 44, 14): save the label on the image's grid"),
    ("2D image", "the models need a 3D volume; this image has shape (48, 44)"),
    ("run already going", "a training run of sam3d_test is already going"),
    ("bad option", "`max_epochs` must be an integer >= 1, got 0"),
    ("empty labels", "the final labels of ct0, ct1 are empty: nothing to learn"),
    ("no decoder", "no decoder to fine-tune"),
])
def test_bad_inputs_get_clear_errors(tmp_path, case, expected):
    engine = write_model_folder(tmp_path)
    request = dict(FAST)
    if case == "no labels":
        store = datastore(tmp_path, cases=0)
    elif case == "unknown name":
        store = datastore(tmp_path, label_info=({"name": "liver", "idx": 1}, {"name": "kidney", "idx": 2}))
    elif case == "unnamed value":
        store = datastore(tmp_path, label_info=({"name": "liver", "idx": 1},))
    elif case == "values beyond the classes":
        store = datastore(tmp_path, label_info=None, label_transform=lambda labels: labels * 7 // 2 * (labels == 2))
    elif case == "empty labels":
        store = datastore(tmp_path, label_transform=np.zeros_like)
    elif case == "shape mismatch":
        store = datastore(tmp_path, label_transform=lambda labels: labels[:, :, :-1])
    elif case == "2D image":
        store = datastore(tmp_path, cases=0)
        save_nifti(np.zeros(SHAPE[:2], np.int16), tmp_path / "flat.nii.gz")
        store.add_image("flat", str(tmp_path / "flat.nii.gz"), {})
        store.save_label("flat", str(save_nifti(np.ones(SHAPE[:2], np.uint8), tmp_path / "flat_label.nii.gz")), "final",
                         {})
    else:
        store = datastore(tmp_path, cases=1)
        request["max_epochs"] = 0 if case == "bad option" else 1
        if case == "no decoder":
            engine.checkpoint.unlink()
            request["start"] = "latest"
    task = Sam3DTraining(engine)
    if case == "run already going":
        from filelock import FileLock

        (engine.checkpoint.parent / "trained").mkdir()
        with FileLock(str(engine.checkpoint.parent / "trained" / ".train.lock")):
            with pytest.raises(InputError) as error:
                task(request, store)
    else:
        with pytest.raises(InputError) as error:
            task(request, store)
    assert expected in str(error.value)
    assert not list(engine.checkpoint.parent.glob("trained/*.model"))


# ---- official facts, in small ----------------------------------------------------------------------

def test_deep_supervision_targets_and_weights_are_the_official_ones():
    assert sum(DEEP_SUPERVISION_WEIGHTS) == pytest.approx(1) and DEEP_SUPERVISION_WEIGHTS[0] == pytest.approx(4 / 7)
    target = torch.arange(4 * 16 * 16).view(1, 4, 16, 16)
    half, quarter = downsampled_target(target, (4, 8, 8)), downsampled_target(target, (4, 4, 4))
    assert torch.equal(half, target[:, :, 1::2, 1::2])  # skimage order 0: floor((o + 0.5) 2 - 0.5 + 0.5)
    assert torch.equal(quarter, target[:, :, 2::4, 2::4])


def test_label_resampling_is_resize_segmentation_per_label():
    seg = np.zeros((6, 6), np.uint8)
    seg[1:3, 1:3], seg[3:5, 2:5] = 1, 2
    up = resize_segmentation(seg, (12, 12))
    assert set(np.unique(up)) == {0, 1, 2} and (up == 2).sum() == 4 * (seg == 2).sum()
    assert np.array_equal(resize_segmentation(seg, (6, 6)), seg)
    # an anisotropic grid: in-plane per slice, nearest along the separate (thick) axis
    plans = autoseg.Plans.from_dict(nnunet_plans_info(3, patch_size=PATCH, spacing=(1.5, 1.0, 1.0))["plans"])
    label = np.repeat(seg[:, :, None], 3, axis=2)  # (i, j, k), k thick
    grid = VolumeGrid((slice(0, 3), slice(0, 6), slice(0, 6)), (4.5, 1.0, 1.0), (9, 6, 6))
    resampled = labels_on_network_grid(label, grid, plans)
    assert resampled.shape == (9, 6, 6) and all(np.array_equal(s, seg.T) for s in resampled)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_loss_is_dice_plus_cross_entropy_as_nnunet(batch_dice):
    """nnU-Net's -soft Dice (foreground, smooth 1e-5) + CE is MONAI's DiceCELoss with the same smoothing, minus 1."""
    from monai.losses import DiceCELoss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 4, 3, 8, 8), generator=generator)
    target = torch.randint(0, 4, (2, 3, 8, 8), generator=generator)
    monai = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5,
                       batch=batch_dice)(logits, target[:, None])
    assert dice_ce_loss(logits, target, batch_dice).item() == pytest.approx(monai.item() - 1, abs=1e-6)


def test_stats_of_a_run_whose_process_ended_say_stopped(tmp_path):
    from filelock import FileLock

    task = Sam3DTraining(write_model_folder(tmp_path))
    assert task.stats() == {}
    task.stats_path.parent.mkdir()
    task.stats_path.write_text(json.dumps({"status": "training", "epoch": 3, "total_epochs": 50}))
    with FileLock(str(task.stats_path.parent / ".train.lock")):  # the run's process, alive
        assert task.stats()["status"] == "training"
    assert task.stats() == {"status": "stopped", "epoch": 3, "total_epochs": 50}
