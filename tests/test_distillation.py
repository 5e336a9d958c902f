"""FastSAM3D's encoder distillation (samlabel.distillation, tasks/train_distill.py) on small FastSAM3D and
SAM-Med3D configurations (bench/gpu_check.py's, at a 64^3 window) with seeded weights in the official
layout, on a LocalDatastore holding a labelled and an unlabelled volume and a 2D image; no server."""

import io
import json
from dataclasses import replace
from functools import partial

import nibabel as nib
import numpy as np
import pytest
import torch
from monailabel.datastore.local import LocalDatastore

from samlabel.checkpoint import expected_shapes, find_checkpoint, load_model, read_checkpoint, sha256
from samlabel.cli import check_checkpoint
from samlabel.distillation import (DistillationHistory, active_pairs, depth_pairs, distilled_checkpoint,
                                   image_crops)
from samlabel.errors import InputError
from samlabel.registry import get_spec
from samlabel.request import ClickRequest
from samlabel.seeded import save_in_official_layout, seeded_state_dict
from samlabel.tasks.train_distill import EncoderDistillation

from conftest import REPO_ROOT, load_module
from test_click_training import assert_refused_while_a_run_is_going

SMALL = load_module(REPO_ROOT / "bench" / "gpu_check.py").SMALL
DATA = REPO_ROOT / "tests" / "data"
WINDOW = 64  # voxels of 1.5 mm: 8x fewer than the released 128^3, same structure
AFFINE = np.diag([1.2, 1.2, 2.0, 1.0])
SHAPE = (60, 60, 30)


def small_spec(name):
    spec = get_spec(name)
    return replace(spec, builder=partial(spec.builder, img_size=WINDOW, **SMALL[name]), input_size=(WINDOW,) * 3)


def write_checkpoint(spec, path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_in_official_layout(spec, seeded_state_dict(expected_shapes(spec), seed), path)
    return path


def ball(shape=SHAPE, centre=(30, 30, 15), radius_mm=20.0) -> np.ndarray:
    grid = np.indices(shape)
    return (sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, np.diag(AFFINE))) <= radius_mm**2).astype(np.uint8)


@pytest.fixture
def setup(tmp_path):
    """(task, datastore, student checkpoint, teacher checkpoint): a labelled ball, an unlabelled
    noise volume and a 2D image in the datastore."""
    student, teacher = small_spec("fastsam3d"), small_spec("sam_med3d")
    student_file = write_checkpoint(student, tmp_path / "model" / student.checkpoint_file, 3)
    teacher_file = write_checkpoint(teacher, tmp_path / "model" / teacher.checkpoint_file, 4)
    studies = tmp_path / "studies"
    studies.mkdir()
    rng = np.random.default_rng(0)
    label = ball()
    nib.save(nib.Nifti1Image((rng.normal(0, 10, SHAPE) + 200 * label).astype(np.int16), AFFINE), studies / "ball.nii.gz")
    nib.save(nib.Nifti1Image(rng.normal(100, 30, SHAPE).astype(np.float32), AFFINE), studies / "noise.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((40, 40), np.int16), AFFINE), studies / "flat.nii.gz")
    nib.save(nib.Nifti1Image(label, AFFINE), tmp_path / "label.nii.gz")
    datastore = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    datastore.save_label("ball", str(tmp_path / "label.nii.gz"), "final", {})
    task = EncoderDistillation(student.engine(student, student_file), teacher, teacher_file)
    return task, datastore, student_file, teacher_file


def click(engine, datastore):
    return engine.segment(datastore.get_image_uri("ball"), ClickRequest(foreground=((30, 30, 15),), client="test"))


def test_distillation_lowers_the_neck_mse_and_is_served_with_new_embeddings(setup):
    task, datastore, student_file, teacher_file = setup
    engine, digest = task.engine, sha256(student_file)
    assert click(engine, datastore).info["weights"] == student_file.name and engine.encoder_runs == 1

    stats = task({"max_epochs": 8}, datastore)
    assert stats["status"] == "done" and stats["epoch"] == 8 and stats["iteration"] == 16
    assert stats["crops"] == ["ball: label", "noise: sample 1"] and len(stats["skipped"]) == 1
    assert stats["skipped"][0].startswith("flat: ") and stats["started_from"] == student_file.name
    assert stats["teacher"] == teacher_file.name and [t["reused"] for t in stats["teacher_targets"]] == [False, False]
    assert stats["neck_mse_after"] < 0.8 * stats["neck_mse_before"], stats
    assert stats["neck_mse"][-1] < stats["neck_mse"][0] and stats["depth_levels"] == [0] * 8
    assert task.stats()["written"] == stats["written"]

    written = student_file.parent / "trained" / "fastsam3d" / stats["written"]
    saved = read_checkpoint(written)  # weights_only: plain data next to the weights
    assert set(saved) >= {"model_state_dict", "epoch", "optimizer_state_dict", "losses", "used_datas"}
    assert saved["epoch"] == 8 and saved["teacher"] == teacher_file.name
    model, official = load_model(engine.spec, written), load_model(engine.spec, student_file)  # strict
    for part in ("prompt_encoder", "mask_decoder"):  # from the weights it started from
        for name, value in getattr(model, part).state_dict().items():
            assert torch.equal(value, getattr(official, part).state_dict()[name]), name
    assert not torch.equal(model.image_encoder.neck[0].weight, official.image_encoder.neck[0].weight)
    assert sha256(student_file) == digest  # the official file is never written

    result = click(engine, datastore)  # the same engine: it reloads the newest weights
    assert result.info["weights"] == stats["written"]
    assert not result.info["embedding_reused"] and engine.encoder_runs == 2  # a new encoder: new embeddings

    again = task({"max_epochs": 1, "start": "official"}, datastore)
    assert [t["reused"] for t in again["teacher_targets"]] == [True, True]  # the teacher did not run
    assert again["neck_mse_before"] == pytest.approx(stats["neck_mse_before"], rel=1e-5)  # same crops, same start


def test_from_scratch_with_the_layerwise_schedule(setup):
    task, datastore, _, teacher_file = setup
    stats = task({"max_epochs": 3, "progressive_epochs": 1, "start": "scratch", "crops_per_image": 2}, datastore)
    assert stats["depth_pairs"] == [[1, 1], [2, 2], [3, 4]] and stats["depth_levels"] == [1, 2, 3]
    assert stats["crops"] == ["ball: label", "ball: sample 1", "noise: sample 1", "noise: sample 2"]
    assert stats["started_from"] == "scratch" and stats["loss"][0] > stats["neck_mse"][0]
    folders = [f for f in (task.folder / "teacher_targets").iterdir()]
    assert len(folders) == 4 and all(sorted(p.name for p in f.iterdir()) == [
        "block_1.npy", "block_2.npy", "block_4.npy", "crop.json", "input.npy", "neck.npy"] for f in folders)
    assert np.load(folders[0] / "block_4.npy").shape == (4, 4, 4, 48)  # (grid, grid, grid, embed)

    model = load_model(task.engine.spec, teacher_file.parent / "trained" / "fastsam3d" / stats["written"])
    teacher = load_model(task.teacher, teacher_file)
    for part in ("prompt_encoder", "mask_decoder"):  # a fresh encoder reads the teacher's embeddings
        for name, value in getattr(model, part).state_dict().items():
            assert torch.equal(value, getattr(teacher, part).state_dict()[name]), name


def test_depth_pairing_and_progressive_schedule():
    pairs = depth_pairs(6, 12)
    assert pairs == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)]  # the last student block meets the last teacher block
    assert active_pairs(pairs, 0, 0) == [] and active_pairs(pairs, 100, 0) == []  # neck only
    assert [len(active_pairs(pairs, epoch, 3)) for epoch in range(0, 30, 3)] == [1, 2, 3, 4, 5, 6, 6, 6, 6, 6]  # capped
    assert active_pairs(pairs, 4, 3) == pairs[:2]


def test_crops_are_label_centred_else_sampled_and_reproducible():
    spec = small_spec("fastsam3d")
    image = type("Image", (), {"array": np.zeros(SHAPE), "affine": AFFINE})()
    label = ball(centre=(20, 40, 10), radius_mm=6)
    first, second = image_crops("ct", "ct.nii.gz", image, label, 2, spec, 7)
    centre = first.window.affine[:3, :3] @ np.full(3, (WINDOW - 1) / 2) + first.window.affine[:3, 3]
    assert np.allclose(centre, AFFINE[:3, :3] @ (20, 40, 10), atol=1.5)  # the label's box centre, to a voxel
    assert second.name == "ct: sample 1"
    assert image_crops("ct", "ct.nii.gz", image, label, 2, spec, 7)[1].window.key() == second.window.key()
    assert image_crops("ct", "ct.nii.gz", image, label, 2, spec, 8)[1].window.key() != second.window.key()
    unlabelled = image_crops("ct", "ct.nii.gz", image, np.zeros(SHAPE), 1, spec, 7)  # an empty label: sampled
    assert [c.name for c in unlabelled] == ["ct: sample 1"]


def test_full_size_distilled_file_matches_the_official_fastsam3d_manifest(tmp_path):
    spec = get_spec("fastsam3d")
    model = spec.builder()
    optimizer = torch.optim.AdamW(model.image_encoder.parameters())
    path = tmp_path / "distilled.pth"
    torch.save(distilled_checkpoint(spec, model, optimizer, DistillationHistory(), ["a: label"], "scratch", "t.pth"), path)
    manifest = json.loads((DATA / "manifests" / "fastsam3d.json").read_text())
    state = read_checkpoint(path)["model_state_dict"]
    assert [[k, list(v.shape)] for k, v in state.items()] == [[k, list(s)] for k, s, *_ in manifest["keys"]]
    load_model(spec, path)  # strict
    report = io.StringIO()
    assert check_checkpoint(path, out=report) and "FastSAM3D (fastsam3d): every key and shape matches" in report.getvalue()


def test_bad_requests_are_refused_with_a_message(setup, tmp_path):
    task, datastore, _, _ = setup
    for options, message in (({"max_epochs": 0}, "max_epochs"), ({"crops_per_image": 0}, "crops_per_image"),
                             ({"progressive_epochs": -1}, "progressive_epochs"), ({"start": "fresh"}, "start"),
                             ({"learning_rate": "fast"}, "learning_rate"), ({"gradient_accumulation": 0}, "gradient"),
                             ({"mixed_precision": "maybe"}, "mixed_precision"),
                             ({"mixed_precision": True}, "needs a CUDA device"), ({"device": "tpu"}, "device")):
        with pytest.raises(InputError, match=message):
            task.check(options, datastore)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            task.check({"device": "cuda"}, datastore)

    assert_refused_while_a_run_is_going(task, datastore)

    empty = tmp_path / "empty-studies"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        task.check({}, LocalDatastore(str(empty), extensions=("*.nii.gz",), auto_reload=False))
    flat_only = tmp_path / "flat-studies"
    flat_only.mkdir()
    nib.save(nib.Nifti1Image(np.ones((40, 40), np.int16), AFFINE), flat_only / "flat.nii.gz")
    with pytest.raises(InputError, match="no 3D image"):
        task({}, LocalDatastore(str(flat_only), extensions=("*.nii.gz",), auto_reload=False))
    assert task.stats()["status"] == "error"

    no_teacher = EncoderDistillation(task.engine, task.teacher, tmp_path / "absent" / "sam_med3d_turbo.pth")
    with pytest.raises(InputError, match="no teacher"):
        no_teacher.check({}, datastore)
    spec = task.engine.spec
    no_student = EncoderDistillation(spec.engine(spec, tmp_path / "absent" / "FastSAM3D.pth"), task.teacher,
                                     task.teacher_checkpoint)
    with pytest.raises(InputError, match="missing"):
        no_student.check({}, datastore)
    no_student.check({"start": "scratch"}, datastore)  # a fresh student needs no file


def test_only_fastsam3d_gets_a_distill_task_with_the_sam_med3d_checkpoint_as_teacher(tmp_path):
    from samlabel.configs import config_families
    from samlabel.images import ImageCache
    from samlabel.settings import AppSettings

    settings, families, tasks = AppSettings.from_conf({"device": "cpu"}), config_families(), {}
    conf = {"sam_med3d_checkpoint": str(tmp_path / "teacher.pth")}
    for name in ("fastsam3d", "sam_med3d"):
        config = families[get_spec(name).family]()
        config.init(name, str(tmp_path), conf, None, settings=settings, images=ImageCache())
        tasks.update(config.trainers())
    assert set(tasks) == {"fastsam3d_finetune", "fastsam3d_distill", "sam_med3d_finetune"}
    distill = tasks["fastsam3d_distill"]
    assert isinstance(distill, EncoderDistillation) and distill.config()["learning_rate"] == 8e-4
    assert distill.teacher_checkpoint == find_checkpoint(get_spec("sam_med3d"), tmp_path, conf) == tmp_path / "teacher.pth"
    assert distill.pairs == depth_pairs(6, 12)
