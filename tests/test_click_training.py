"""Click fine-tuning of the 3D click models (samlabel.click_training, tasks/train_clicks.py) on a
small FastSAM3D (bench/gpu_check.py's configuration at a 64^3 window) with seeded weights in the
official layout, on a LocalDatastore holding a synthetic labelled volume; no server."""

from dataclasses import replace
from functools import partial

import nibabel as nib
import numpy as np
import pytest
import torch
from monailabel.datastore.local import LocalDatastore

from samlabel.checkpoint import load_model, read_checkpoint, sha256
from samlabel.click_simulation import evaluate
from samlabel.click_training import mask_only_steps, random_error_click
from samlabel.errors import InputError
from samlabel.registry import get_spec
from samlabel.seeded import save_in_official_layout, seeded_state_dict
from samlabel.settings import AppSettings, ConfError
from samlabel.tasks.train_clicks import ClickTraining
from samlabel.tasks.train_base import RunLock

from conftest import REPO_ROOT, load_module

SMALL = load_module(REPO_ROOT / "bench" / "gpu_check.py").SMALL
WINDOW = 64  # voxels of 1.5 mm: 8x fewer than the released 128^3, same structure
AFFINE = np.diag([1.2, 1.2, 2.0, 1.0])


def small_spec():
    spec = get_spec("fastsam3d")
    return replace(spec, builder=partial(spec.builder, img_size=WINDOW, **SMALL["fastsam3d"]), input_size=(WINDOW,) * 3)


def ball_label(shape=(60, 60, 30), centre=(30, 30, 15), radius_mm=20.0) -> np.ndarray:
    grid = np.indices(shape)
    return (sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, np.diag(AFFINE))) <= radius_mm**2).astype(np.uint8)


@pytest.fixture
def setup(tmp_path):
    """(engine, datastore, official checkpoint, label path) with one labelled image."""
    spec = small_spec()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in spec.builder().state_dict().items()}
    (tmp_path / "model").mkdir()
    checkpoint = tmp_path / "model" / spec.checkpoint_file
    save_in_official_layout(spec, seeded_state_dict(shapes, 3), checkpoint)
    studies = tmp_path / "studies"
    studies.mkdir()
    label = ball_label()
    image = (np.random.default_rng(0).normal(0, 10, label.shape) + 200 * label).astype(np.int16)
    nib.save(nib.Nifti1Image(image, AFFINE), studies / "ball.nii.gz")
    nib.save(nib.Nifti1Image(label, AFFINE), tmp_path / "label.nii.gz")
    datastore = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    engine = spec.engine(spec, checkpoint)
    return engine, datastore, checkpoint, tmp_path / "label.nii.gz"


def save_final(datastore, label_path):
    datastore.save_label("ball", str(label_path), "final", {})
    return [(datastore.get_image_uri("ball"), datastore.get_label_uri("ball", "final"))]


def test_fine_tuning_raises_dice_after_three_clicks_and_is_served(setup):
    engine, datastore, checkpoint, label_path = setup
    pairs = save_final(datastore, label_path)
    digest = sha256(checkpoint)
    before = evaluate(engine, pairs, max_clicks=5)
    task = ClickTraining(engine)
    # random weights need a higher learning rate than upstream's 8e-5 to leave the all-background start
    stats = task({"max_epochs": 1, "iterations_per_epoch": 100, "clicks": 3, "learning_rate": 1e-3}, datastore)
    assert stats["status"] == "done" and stats["epoch"] == 1 and stats["iteration"] == 100 and len(stats["loss"]) == 1
    assert task.stats()["written"] == stats["written"] and stats["structures"] == ["ball: 1"]
    after = evaluate(engine, pairs, max_clicks=5)  # the same engine: it reloads the newest weights
    assert engine.weights_name() == stats["written"]
    assert after["mean"]["dice@3"] > before["mean"]["dice@3"] + 0.1, (before["mean"], after["mean"])

    written = checkpoint.parent / "trained" / "fastsam3d" / stats["written"]
    saved = read_checkpoint(written)  # weights_only: plain data next to the weights
    assert set(saved) >= {"model_state_dict", "epoch", "optimizer_state_dict", "losses"} and saved["epoch"] == 1
    model = load_model(engine.spec, written)  # strict, with the official layout's key
    official = load_model(engine.spec, checkpoint)
    for name, value in model.image_encoder.state_dict().items():  # the encoder stayed frozen
        assert torch.equal(value, official.image_encoder.state_dict()[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(model.mask_decoder.parameters(), official.mask_decoder.parameters()))
    assert sha256(checkpoint) == digest  # the official file is never written

    official_engine = engine.spec.engine(engine.spec, checkpoint, weights="official")
    assert official_engine.weights_file() == checkpoint
    chosen = engine.spec.engine(engine.spec, checkpoint, weights=stats["written"])
    assert chosen.weights_file() == written


def test_bad_requests_are_refused_with_a_message(setup, tmp_path):
    engine, datastore, checkpoint, label_path = setup
    task = ClickTraining(engine)
    with pytest.raises(InputError, match="no labels"):
        task.check({}, datastore)
    for options, message in (({"max_epochs": 0}, "max_epochs"), ({"clicks": 1}, "clicks"),
                             ({"start": "fresh"}, "start"), ({"learning_rate": -1}, "learning_rate"),
                             ({"mixed_precision": "maybe"}, "mixed_precision"),
                             ({"mixed_precision": True}, "needs a CUDA device"),
                             ({"device": "tpu"}, "device")):
        with pytest.raises(InputError, match=message):
            task.check(options, datastore)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            task.check({"device": "cuda"}, datastore)

    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((60, 60, 30), np.uint8), AFFINE), empty)
    datastore.save_label("ball", str(empty), "final", {})
    with pytest.raises(InputError, match="empty"):
        task({"max_epochs": 1}, datastore)
    assert task.stats()["status"] == "error" and "empty" in task.stats()["error"]

    save_final(datastore, label_path)
    assert_refused_while_a_run_is_going(task, datastore)

    missing = ClickTraining(engine.spec.engine(engine.spec, tmp_path / "absent" / "FastSAM3D.pth"))
    with pytest.raises(InputError, match="missing"):
        missing.check({}, datastore)


def test_mask_only_steps_and_error_clicks():
    rng = np.random.default_rng(0)
    drawn = [mask_only_steps(11, rng) for _ in range(200)]
    assert all(10 in steps and len(steps) == 2 and min(steps) in range(2, 9) for steps in drawn)
    assert {min(steps) for steps in drawn} == set(range(2, 9))
    assert mask_only_steps(3, rng) == {2}  # no room for a random one before the last
    target = torch.zeros(8, 8, 8, dtype=torch.bool)
    target[2:4, 2:4, 2:4] = True
    prediction = target.clone()
    prediction[6, 6, 6] = True  # one spill: the only error
    assert random_error_click(prediction, target, rng) == ((6, 6, 6), 0)
    assert random_error_click(torch.zeros_like(target), target, rng)[1] == 1  # a miss: positive
    assert random_error_click(target, target, rng) is None


def test_weights_conf_keys_of_the_click_models():
    assert AppSettings.from_conf({"fastsam3d_weights": "20250101T000000.000000Z.pth", "sam_med3d_weights": "official"})
    for value in ("decoder.model", "../x.pth"):
        with pytest.raises(ConfError, match="fastsam3d_weights"):
            AppSettings.from_conf({"fastsam3d_weights": value})
    with pytest.raises(ConfError, match="unknown key 'medsam_weights'"):  # no fine-tuning for the 2D models
        AppSettings.from_conf({"medsam_weights": "latest"})


def test_the_3d_click_models_get_a_finetune_task(tmp_path):
    from samlabel.configs import config_families
    from samlabel.images import ImageCache

    settings, families = AppSettings.from_conf({"device": "cpu"}), config_families()
    tasks = {}
    for name in ("fastsam3d", "sam_med3d", "medsam", "sam3d_synapse"):
        config = families[get_spec(name).family]()
        config.init(name, str(tmp_path), {}, None, settings=settings, images=ImageCache())
        tasks.update(config.trainers())
    assert set(tasks) == {"fastsam3d_finetune", "fastsam3d_distill", "sam_med3d_finetune", "sam3d_synapse"}
    assert isinstance(tasks["fastsam3d_finetune"], ClickTraining)
    assert tasks["fastsam3d_finetune"].config()["learning_rate"] == 8e-5


def assert_refused_while_a_run_is_going(task, datastore):
    """A run holding the task's lock makes check() refuse; once released, nothing is refused."""
    task.folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(task.folder / ".train.lock")
    assert lock.take()
    try:
        with pytest.raises(InputError, match="already going"):
            task.check({}, datastore)
    finally:
        lock.release()
    task.check({}, datastore)
