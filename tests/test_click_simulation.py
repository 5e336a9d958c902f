"""Simulated clicks and clicks-to-Dice metrics (samlabel.click_simulation), and bench/eval_clicks.py
end to end on bench/gpu_check.py's small FastSAM3D configuration with seeded weights."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samlabel.click_simulation import (ClickCurve, central_point, clicks_to_reach, dice, first_click, next_click,
                                       spacing_of)
from samlabel.seeded import save_in_official_layout, seeded_state_dict

from conftest import REPO_ROOT, load_module

eval_clicks = load_module(REPO_ROOT / "bench" / "eval_clicks.py")


def ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_first_click_is_the_centre_of_a_ball():
    truth = ball((30, 30, 30), (12, 17, 9), 6)
    assert first_click(truth, (1.0, 1.0, 1.0)) == ((12, 17, 9), 1)


def test_first_click_goes_into_the_thicker_of_two_blobs_and_the_next_into_the_other():
    truth = ball((40, 30, 30), (10, 15, 15), 4) | ball((40, 30, 30), (28, 15, 15), 7)
    click = first_click(truth, (1.0, 1.0, 1.0))
    assert click == ((28, 15, 15), 1)
    found = ball((40, 30, 30), (28, 15, 15), 7)  # the model found the clicked blob only
    assert next_click(found, truth, (1.0, 1.0, 1.0)) == ((10, 15, 15), 1)


def test_the_click_of_an_l_shape_lies_inside_it_where_its_centroid_does_not():
    truth = np.zeros((40, 40, 9), bool)
    truth[5:35, 5:13] = True  # the long arm
    truth[27:35, 5:35] = True  # the foot
    centroid = tuple(np.round(np.argwhere(truth).mean(0)).astype(int))
    assert not truth[centroid]
    point, label = first_click(truth, (1.0, 1.0, 1.0))
    assert truth[point] and label == 1
    # every voxel of the shape is within 4.5 voxels of its boundary (the arms are 8 wide, 9 deep)
    assert point[2] == 4 and 27 <= point[0] <= 34 or 5 <= point[1] <= 12


def test_distances_are_in_mm():
    """A cube of 9^3 voxels and a slab of 13 x 13 x 5: in voxels the cube's centre lies deeper (5 > 3),
    in mm with 3 mm slices the slab's (7 > 5)."""
    region = np.zeros((40, 20, 12), bool)
    region[2:11, 2:11, 2:11] = True
    region[20:33, 4:17, 4:9] = True
    assert central_point(region, (1.0, 1.0, 1.0)) == (6, 6, 6)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    assert np.allclose(spacing_of(affine), (1.0, 1.0, 3.0))
    assert central_point(region, spacing_of(affine)) == (26, 10, 6)


def test_the_next_click_is_negative_in_the_largest_false_positive():
    truth = ball((30, 30, 30), (15, 15, 15), 5)
    prediction = truth | ball((30, 30, 30), (15, 15, 26), 3)  # a spill above, larger than the miss below
    prediction[15, 15, 10] = False  # one missed voxel
    assert next_click(prediction, truth, (1.0, 1.0, 1.0)) == ((15, 15, 26), 0)
    assert next_click(truth, truth, (1.0, 1.0, 1.0)) is None


def test_metric_arithmetic():
    truth = np.zeros((4, 4, 4), bool)
    truth[:2] = True  # 32 voxels
    half = np.zeros_like(truth)
    half[:1] = True  # 16, all inside
    assert dice(half, truth) == pytest.approx(2 * 16 / 48)
    assert dice(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    curve = [0.5, 0.7, 0.85, 0.88, 0.91]
    assert clicks_to_reach(curve, 0.8) == 3 and clicks_to_reach(curve, 0.9) == 5
    assert clicks_to_reach([0.5] * 20, 0.8) == 20  # never reached: the cap
    assert clicks_to_reach([0.5] * 30 + [0.95], 0.9, cap=20) == 20  # reached only after the cap
    stopped = ClickCurve("image", 1, dice=[0.95, 0.97], clicks=[((0, 0, 0), 1)] * 2)  # exact: no third click
    assert stopped.summary() == {"image": "image", "structure": 1, "clicks": 2, "dice@1": 0.95, "dice@3": 0.97,
                                 "dice@5": 0.97, "noc@80": 1, "noc@90": 1}


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """A datastore-like folder: two images with final labels (a bright ball, two structures), one without."""
    folder = tmp_path_factory.mktemp("eval")
    (folder / "labels" / "final").mkdir(parents=True)
    affine = np.diag([1.2, 1.2, 2.0, 1.0])
    rng = np.random.default_rng(0)
    for name, centres in (("one", [(30, 30, 15)]), ("two", [(20, 24, 12), (42, 36, 18)])):
        label = np.zeros((60, 60, 30), np.uint8)
        for value, centre in enumerate(centres, start=1):
            label[ball(label.shape, centre, 7)] = value
        image = (rng.normal(0, 10, label.shape) + 200 * (label > 0)).astype(np.int16)
        nib.save(nib.Nifti1Image(image, affine), folder / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labels" / "final" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.int16), affine), folder / "unlabelled.nii.gz")
    return folder


def test_eval_command_on_a_small_model(labelled_folder, tmp_path):
    spec = eval_clicks.model_spec("fastsam3d", small=True)
    import torch

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in spec.builder().state_dict().items()}
    checkpoint = tmp_path / "FastSAM3D.pth"
    save_in_official_layout(spec, seeded_state_dict(shapes, 3), checkpoint)
    out = tmp_path / "result.json"
    result = eval_clicks.main(["--images", str(labelled_folder), "--checkpoint", str(checkpoint), "--small",
                               "--max-clicks", "6", "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["weights"] == "FastSAM3D.pth" and result["max_clicks"] == 6
    rows = result["structures"]
    assert [(Path(r["image"]).name, r["structure"]) for r in rows] == [("one.nii.gz", 1), ("two.nii.gz", 1),
                                                                      ("two.nii.gz", 2)]
    for row in rows:
        assert 0 <= row["dice@1"] <= 1 and 1 <= row["noc@80"] <= row["noc@90"] <= 6 and 1 <= row["clicks"] <= 6
        assert row["clicks"] >= 5 or row["dice@5"] == 1.0  # 5 clicks unless exact earlier
    assert result["mean"]["dice@3"] == pytest.approx(np.mean([r["dice@3"] for r in rows]), abs=1e-4)
