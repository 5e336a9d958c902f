"""Self-ensembling: statistics against hand-computed values with a test-double decoder, the prompt
sampling, and the encoder running once."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from samlabel.prompts import PointPrompt
from samlabel.results import uncertainty_summary
from samlabel.transforms import EnsembleStatisticsd, UncertaintyBandsd
from samlabel.uncertainty import EnsembleConfig, ensemble_statistics, sample_prompt_sets
from test_engine import request, segmenter, volume_path  # noqa: F401 - fixture


def test_statistics_are_the_mean_and_population_std():
    logits = np.array([[[1.0, -2.0, 0.0, 4.0]], [[3.0, -2.0, 0.0, -4.0]]])  # two members, four voxels
    mean, std = ensemble_statistics(logits)
    assert mean.tolist() == [[[2.0, -2.0, 0.0, 0.0]]]
    assert std.tolist() == [[[1.0, 0.0, 0.0, 4.0]]]  # sqrt(((1-2)^2 + (3-2)^2) / 2) = 1; members agreeing: 0
    assert ((mean > 0).tolist()) == [[[True, False, False, False]]]  # Eq. 1: a tie (mean 0) is background


def first_mask():
    mask = np.zeros((8, 8, 8), bool)
    mask[2:6, 3:6, 1:5] = True
    return mask


def test_sampling_keeps_the_user_clicks_and_draws_inside_and_around_m0():
    user_points, user_labels = np.array([[14.0, 17.0, 9.0], [2.0, 2.0, 2.0]]), np.array([1, 0])
    config = EnsembleConfig(size=20, positives=4, negatives=5, ring=2, seed=3)
    points, labels = sample_prompt_sets(first_mask(), user_points, user_labels, cell=4.0, config=config)
    assert points.shape == (20, 2 + 4 + 5, 3) and labels.shape == (20, 11)
    assert np.array_equal(points[:, :2], np.broadcast_to(user_points, (20, 2, 3)))
    cells = np.round((points[:, 2:] + 0.5) / 4 - 0.5).astype(int)  # back to low-res cells
    inside = first_mask()[cells[..., 0], cells[..., 1], cells[..., 2]]
    assert inside[:, :4].all() and not inside[:, 4:].any()  # positives in M0, negatives outside it
    assert (labels[:, 2:6] == 1).all() and (labels[:, 6:] == 0).all()
    assert (points >= -0.5).all() and (points <= 31.5).all()  # none outside the 32-cell (128 px) frame
    again, _ = sample_prompt_sets(first_mask(), user_points, user_labels, cell=4.0, config=config)
    assert np.array_equal(points, again)  # seeded
    other, _ = sample_prompt_sets(first_mask(), user_points, user_labels, cell=4.0, config=EnsembleConfig(size=20, seed=4))
    assert not np.array_equal(points[:, :5], other[:, :5])


class CountingPredictor:
    """Test double: member m of a batch returns m everywhere; records the batch sizes."""

    def __init__(self):
        self.calls = []

    def predict(self, points, labels, mask_input=None, multimask_output=False):
        self.calls.append(len(points))
        logits = np.arange(len(points), dtype=np.float32).reshape(-1, 1, 1, 1, 1) * np.ones((1, 1, 8, 8, 8), np.float32)
        return logits, np.ones((len(points), 1), np.float32)


def test_members_are_decoded_in_one_call_and_the_transform_gives_mean_and_std():
    prompt, predictor = PointPrompt(), CountingPredictor()
    first = np.where(first_mask(), 1.0, -1.0)[None, None].astype(np.float32)
    members = prompt.members({"points": np.zeros((1, 1, 3)), "labels": np.ones((1, 1))}, first, EnsembleConfig(size=4), 32)
    logits, _ = prompt.decode(predictor, members, first)
    assert predictor.calls == [4] and members["points"].shape == (4, 1 + 3 + 3, 3)
    data = EnsembleStatisticsd("logits")({"logits": logits})
    assert np.allclose(data["logits"], np.full((1, 1, 8, 8, 8), 1.5))
    assert np.allclose(data["logits_std"], np.full((1, 1, 8, 8, 8), np.std([0, 1, 2, 3])))
    single = EnsembleStatisticsd("logits")({"logits": logits[:1]})
    assert single["logits_std"] is None and np.array_equal(single["logits"], logits[:1])


def test_bands_split_the_std_at_fractions_of_its_peak():
    std = np.array([0.0, 0.05, 0.2, 0.5, 0.9, 1.0], np.float32).reshape(1, 1, 6)
    data = UncertaintyBandsd("uncertainty")({"uncertainty": std})
    assert data["pred"].ravel().tolist() == [0, 0, 1, 2, 3, 3]  # edges at 0.1, 1/3, 2/3 of 1.0
    assert data["result"]["band_edges_std"] == pytest.approx([0.1, 1 / 3, 2 / 3])


def test_engine_ensemble_runs_the_encoder_once_and_maps_the_std(volume_path):  # noqa: F811
    engine = segmenter()
    plain = engine.segment(volume_path, request([[150, 130, 20]], client="plain"))
    ensembled = engine.segment(volume_path, request([[150, 130, 20]], client="ensembled", ensemble_size=8))
    assert engine.encoder_runs == 1  # the same window: the ensemble reuses the embedding
    assert ensembled.uncertainty.shape == ensembled.mask.shape and ensembled.uncertainty.dtype == np.float32
    assert plain.uncertainty is None and ensembled.uncertainty.max() > 0
    suggested = tuple(ensembled.info["suggested_click"])
    assert ensembled.uncertainty[suggested] == pytest.approx(ensembled.info["suggested_click_uncertainty"])
    assert ensembled.info["uncertainty_max"] == pytest.approx(float(ensembled.uncertainty.max()))
    outside = ensembled.uncertainty[:5, :5, :5]  # far outside the window: no ensemble there
    assert outside.max() == 0


def test_ensemble_of_identical_members_has_zero_std(volume_path):  # noqa: F811
    """No sampled points: every member gets the user's clicks only, so all agree exactly."""
    engine = segmenter(ensemble=EnsembleConfig(positives=0, negatives=0))
    result = engine.segment(volume_path, request([[150, 130, 20]], ensemble_size=5))
    assert result.uncertainty.max() == pytest.approx(0.0, abs=1e-5)


def test_a_batch_of_members_decodes_as_each_member_alone(volume_path):  # noqa: F811
    """The members share the image embedding and the previous mask: the decoder computes what
    depends only on them once for the batch. Each member's logits are still its own."""
    engine = segmenter()
    engine.segment(volume_path, request([[150, 130, 20]]))
    predictor = engine.predictor()
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 127, (5, 4, 3)).astype(np.float32)
    labels = np.array([[1, 1, 0, 1]] * 5)
    previous = rng.normal(0, 3, (1, 1, 32, 32, 32)).astype(np.float32)
    batch, iou = predictor.predict(points, labels, previous)
    for m in range(5):
        alone, alone_iou = predictor.predict(points[m:m + 1], labels[m:m + 1], previous)
        np.testing.assert_allclose(batch[m], alone[0], atol=1e-4)
        np.testing.assert_allclose(iou[m], alone_iou[0], atol=1e-5)
    assert not np.allclose(batch[0], batch[1], atol=1e-2)  # the members differ


def test_bfloat16_members_agree_with_float32_and_leave_the_first_decode_alone(volume_path):  # noqa: F811
    click = [[150, 130, 20]]
    results = {}
    for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
        engine = segmenter(ensemble_dtype=dtype)
        plain = engine.segment(volume_path, request(click, client="plain"))
        ensembled = engine.segment(volume_path, request(click, client="ensembled", ensemble_size=16))
        assert engine.predictor().dtype == torch.float32  # restored after the members
        results[name] = plain, ensembled
    (plain32, ensemble32), (plain16, ensemble16) = results["float32"], results["bfloat16"]
    assert np.array_equal(plain32.mask, plain16.mask)  # a normal click never runs in the members' dtype
    assert not np.array_equal(ensemble32.uncertainty, ensemble16.uncertainty)  # the members did run in bfloat16
    peak = float(ensemble32.uncertainty.max())
    assert np.abs(ensemble32.uncertainty - ensemble16.uncertainty).max() <= 0.1 * peak
    dice = 2 * (ensemble32.mask & ensemble16.mask).sum() / (ensemble32.mask.sum() + ensemble16.mask.sum())
    assert dice >= 0.97, dice


def whole_image_summary(uncertainty, mask):
    """The summary computed on the whole image, as its definition reads."""
    mask = mask.astype(bool)
    boundary = mask ^ ndimage.binary_erosion(mask)
    band = ndimage.binary_dilation(boundary) if boundary.any() else np.ones_like(boundary)
    suggestion = np.unravel_index(int(np.argmax(np.where(band, uncertainty, -1.0))), uncertainty.shape)
    return {"uncertainty_max": float(uncertainty.max()),
            "uncertainty_mean_on_boundary": float(uncertainty[boundary].mean()) if boundary.any() else 0.0,
            "suggested_click": [int(c) for c in suggestion], "suggested_click_uncertainty": float(uncertainty[suggestion])}


@pytest.mark.parametrize("case", ["interior", "touching the border", "one voxel", "empty", "ties"])
def test_the_summary_on_the_masks_box_is_the_whole_images(case):
    rng = np.random.default_rng(7)
    uncertainty = rng.random((23, 31, 17)).astype(np.float32)
    mask = np.zeros(uncertainty.shape, np.uint8)
    if case == "interior":
        mask[5:12, 8:20, 4:9] = rng.random((7, 12, 5)) > 0.3
    elif case == "touching the border":
        mask[:6, 25:, 12:] = 1
    elif case == "one voxel":
        mask[1, 30, 0] = 1
    elif case == "ties":
        mask[5:12, 8:20, 4:9] = 1
        uncertainty[:] = 0.5  # every candidate ties: the first in C order wins, as on the whole image
    assert uncertainty_summary(uncertainty, mask) == whole_image_summary(uncertainty, mask)
