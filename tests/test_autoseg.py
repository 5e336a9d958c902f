"""SAM3D's automatic segmentation pipeline (samlabel.autoseg) with toy encoders and decoders.

Toy model: the encoder turns every slice's 16 x 16 blocks into channels (pixel_unshuffle: stride-16
features, 256 per modality, lossless), slice by slice; the decoder undoes that and thresholds the
first modality's normalised intensity. So a label comes back exactly where the resampled image is
above the threshold, and any misplaced crop, tile or flip shows.

Expectations come from first principles (hand-computed normalisations, ellipsoids written in RAS
millimetres and tested at every stored voxel, scipy's own Gaussian filter, a plain re-implementation
of nnU-Net's window loop) and from the official code itself: tests/data/reference/sam3d_preprocess.npz,
written by scripts/make_reference_sam3d_preprocess.py, which runs the official SAM3D checkout's
preprocessing, export, window steps, Gaussian and padding on volumes that script builds and these
tests rebuild (scikit-image 0.18.1, scipy 1.6.2, batchgenerators 0.21, as SAM3D's requirements pin).
"""

import copy
import hashlib
import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nibabel.affines import apply_affine
from scipy.ndimage import gaussian_filter

from conftest import load_module
from samlabel.autoseg import (FeatureCache, Plans, PlansError, gaussian_importance, labels_on_itk_grid,
                              predict_probabilities, preprocess, segment, window_starts)
from samlabel.images import load_image

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "reference" / "sam3d_preprocess.npz"
make_reference = load_module(REPO / "scripts" / "make_reference_sam3d_preprocess.py")
CASES = tuple(make_reference.CASES)
STRIDE = 16  # SAM's ViT patch: features at 1/16 of the slice


# ---- toy models -----------------------------------------------------------------------------------

class ToyModel:
    """encode: (1, M, n, H, W) -> (1, 256 M, n, H/16, W/16), each slice on its own, plus `crop_signal`
    times the slice's own mean (0: lossless); decode: back to intensities, two-class logits
    steepness * +-(x - threshold) of modality 0, plus `depth_signal` * depth index (0: none). Counts
    the slices it encodes."""

    def __init__(self, threshold=0.0, steepness=8.0, crop_signal=0.0, depth_signal=0.0):
        self.threshold, self.steepness = threshold, steepness
        self.crop_signal, self.depth_signal = crop_signal, depth_signal
        self.encoded_slices = 0

    def encode(self, x):
        b, m, d, h, w = x.shape
        self.encoded_slices += b * d
        slices = x.permute(0, 2, 1, 3, 4).reshape(b * d, m, h, w)
        features = F.pixel_unshuffle(slices, STRIDE)
        features = features + self.crop_signal * slices.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)
        return features.reshape(b, d, -1, h // STRIDE, w // STRIDE).permute(0, 2, 1, 3, 4)

    def decode(self, features):
        b, c, d, h, w = features.shape
        planes = F.pixel_shuffle(features.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w), STRIDE)
        x = planes.reshape(b, d, -1, h * STRIDE, w * STRIDE).permute(0, 2, 1, 3, 4)
        score = self.steepness * (x[:, 0] - self.threshold)
        score = score + self.depth_signal * torch.arange(d, dtype=x.dtype).reshape(1, d, 1, 1)
        return torch.stack([-score, score], dim=1)


def plans_dict(target_spacing=(1.0, 1.0, 1.0), patch_size=(8, 32, 32), schemes=("CT",), use_mask=None,
               intensity=None, transpose_forward=(0, 1, 2), classes=2) -> dict:
    use_mask = use_mask or [False] * len(schemes)
    return make_reference.plans_dict(target_spacing, patch_size, list(schemes), list(use_mask),
                                     intensity or [dict(CT) for _ in schemes], transpose_forward) | {
        "num_classes": classes - 1}


CT = {"mean": 100.0, "sd": 120.0, "percentile_00_5": -50.0, "percentile_99_5": 500.0}


# ---- plans ------------------------------------------------------------------------------------------

def test_plans_from_dict_reads_the_official_entries():
    raw = plans_dict((2.5, 0.8, 0.8), (64, 176, 176), ("CT", "nonCT"), (False, True), transpose_forward=(2, 0, 1),
                     classes=14)
    plans = Plans.from_dict(raw)
    assert plans.target_spacing == (2.5, 0.8, 0.8) and plans.patch_size == (64, 176, 176)
    assert plans.num_classes == 14 and plans.num_modalities == 2
    assert plans.normalization_schemes == ("CT", "nonCT") and plans.use_mask_for_norm == (False, True)
    assert plans.intensity_properties[0].percentile_99_5 == 500.0 and plans.intensity_properties[1] is None
    assert plans.transpose_forward == (2, 0, 1) and plans.transpose_backward == (1, 2, 0)
    # The whole .model.pkl dict works too; the last stage is the default (3d_fullres).
    two_stages = copy.deepcopy(raw)
    two_stages["plans_per_stage"] = {0: {"current_spacing": [3, 2, 2], "patch_size": [8, 32, 32]},
                                     1: raw["plans_per_stage"][0]}
    assert Plans.from_dict({"init": (), "name": "sam3d_trainer_synapse", "plans": two_stages}) == plans
    assert Plans.from_dict(two_stages, stage=0).patch_size == (8, 32, 32)
    # No transposes at all: identity both ways, as Trainer_*.process_plans assumes.
    del raw["transpose_forward"]
    assert Plans.from_dict(raw).transpose_backward == (0, 1, 2)


def _broken(change):
    raw = plans_dict(schemes=("CT", "nonCT"), use_mask=(False, False))
    change(raw)
    return raw


BAD_PLANS = {
    "not a dict": (lambda raw: None, "must be a dict"),
    "no stages": (lambda raw: raw.pop("plans_per_stage"), "missing 'plans_per_stage'"),
    "empty stages": (lambda raw: raw.update(plans_per_stage={}), "holds no stage"),
    "no spacing": (lambda raw: raw["plans_per_stage"][0].pop("current_spacing"), "'current_spacing'"),
    "2-D patch": (lambda raw: raw["plans_per_stage"][0].update(patch_size=[160, 160]), "'patch_size'] must be 3"),
    "zero spacing": (lambda raw: raw["plans_per_stage"][0].update(current_spacing=[1, 0, 1]), "3 positive numbers"),
    "no classes": (lambda raw: raw.pop("num_classes"), "missing 'num_classes'"),
    "too many classes": (lambda raw: raw.update(num_classes=300), "do not fit a uint8"),
    "no modalities": (lambda raw: raw.update(num_modalities=0), "'num_modalities' must be a positive integer"),
    "scheme missing": (lambda raw: raw["normalization_schemes"].pop(1), "no entry for modality 1"),
    "mask flag missing": (lambda raw: raw.pop("use_mask_for_norm"), "missing 'use_mask_for_norm'"),
    "CT without statistics": (lambda raw: raw.pop("dataset_properties"), "missing 'dataset_properties'"),
    "CT without sd": (lambda raw: raw["dataset_properties"]["intensityproperties"][0].pop("sd"), "lacks 'sd'"),
    "CT with sd 0": (lambda raw: raw["dataset_properties"]["intensityproperties"][0].update(sd=0.0), "sd > 0"),
    "transposes not inverse": (lambda raw: raw.update(transpose_forward=[2, 0, 1], transpose_backward=[2, 0, 1]),
                               "not inverse permutations"),
    "export order 3": (lambda raw: raw.update(segmentation_export_params={"force_separate_z": None,
                                                                          "interpolation_order": 3,
                                                                          "interpolation_order_z": 0}),
                       "not supported"),
}


@pytest.mark.parametrize("case", BAD_PLANS, ids=str)
def test_bad_plans_give_one_line_errors(case):
    change, message = BAD_PLANS[case]
    raw = None if case == "not a dict" else _broken(change)
    with pytest.raises(PlansError) as error:
        Plans.from_dict(raw)
    text = str(error.value)
    assert "\n" not in text and text.startswith("SAM3D plans") and message in text, text


# ---- normalisation, by hand --------------------------------------------------------------------------

def hollow_cube(corner_zero=True):
    """3 x 3 x 3 of 10s; the centre 0 (a hole: inside the filled nonzero mask); the corner (0, 0, 0) 0
    (touches the outside: outside the mask)."""
    volume = np.full((3, 3, 3), 10.0, np.float32)
    volume[1, 1, 1] = 0.0
    if corner_zero:
        volume[0, 0, 0] = 0.0
    return volume


def test_ct_normalisation_hand_values():
    plans = Plans.from_dict(plans_dict())
    volume = np.array([-2000.0, -50.0, 100.0, 125.0, 300.0, 500.0, 1000.0, 40.0], np.float32).reshape(2, 2, 2)
    data = preprocess(volume, np.eye(4), plans).data[0].transpose(2, 1, 0)  # back to the stored order
    expected = np.array([(-50 - 100) / 120, (-50 - 100) / 120, 0.0, 25 / 120, 200 / 120, 400 / 120, 400 / 120,
                         -60 / 120]).reshape(2, 2, 2)
    np.testing.assert_allclose(data, expected, rtol=0, atol=1e-6)
    # With use_mask_for_norm, voxels outside the filled nonzero mask become 0; the hole does not.
    masked = Plans.from_dict(plans_dict(use_mask=(True,)))
    data = preprocess(hollow_cube(), np.eye(4), masked).data[0]
    assert data[0, 0, 0] == 0.0 and data[1, 1, 1] == pytest.approx(-100 / 120) and data[2, 2, 2] == pytest.approx(-0.75)


def test_ct2_normalisation_hand_values():
    plans = Plans.from_dict(plans_dict(schemes=("CT2",)))
    volume = np.array([-80.0, 20.0, 40.0, 60.0, 700.0, 80.0, 500.0, 40.0], np.float32).reshape(2, 2, 2)
    data = preprocess(volume, np.eye(4), plans).data[0].transpose(2, 1, 0)
    within = np.array([20.0, 40.0, 60.0, 80.0, 40.0])  # strictly inside (-50, 500): the case's own statistics
    mean, sd = within.mean(), within.std()
    clipped = np.clip(volume.astype(np.float64), -50, 500)
    np.testing.assert_allclose(data, (clipped - mean) / sd, rtol=0, atol=1e-5)


def test_zscore_normalisation_hand_values():
    # Without the mask: 25 tens and 2 zeros, all voxels: zeros at -25/sqrt(50), tens at 2/sqrt(50).
    plans = Plans.from_dict(plans_dict(schemes=("nonCT",)))
    data = preprocess(hollow_cube(), np.eye(4), plans).data[0]
    np.testing.assert_allclose(data[0, 0, 0], -25 / np.sqrt(50), rtol=1e-6)
    np.testing.assert_allclose(data[1, 1, 1], -25 / np.sqrt(50), rtol=1e-6)
    np.testing.assert_allclose(data[2, 2, 2], 2 / np.sqrt(50), rtol=1e-6)
    # With it: statistics over the 26 voxels inside (25 tens and the hole): hole -5, tens 0.2; corner 0.
    masked = Plans.from_dict(plans_dict(schemes=("nonCT",), use_mask=(True,)))
    data = preprocess(hollow_cube(), np.eye(4), masked).data[0]
    assert data[0, 0, 0] == 0.0
    np.testing.assert_allclose([data[1, 1, 1], data[2, 2, 2]], [-5.0, 0.2], rtol=1e-5)
    # A hole alone: 26 tens and 1 zero over all 27: -sqrt(26) and 1/sqrt(26).
    data = preprocess(hollow_cube(corner_zero=False), np.eye(4), masked).data[0]
    np.testing.assert_allclose([data[1, 1, 1], data[0, 0, 0]], [-np.sqrt(26), 1 / np.sqrt(26)], rtol=1e-5)


def test_preprocess_crops_to_the_nonzero_box_and_transposes():
    volume = np.zeros((6, 7, 8), np.float32)
    volume[1:5, 2:7, 0:3] = 50.0
    affine = np.diag([0.5, 2.0, 3.0, 1.0])  # stored spacing (i, j, k); SimpleITK's order is (k, j, i)
    plans = Plans.from_dict(plans_dict((3.0, 0.5, 2.0), transpose_forward=(0, 2, 1)))
    pre = preprocess(volume, affine, plans)
    assert pre.itk_shape == (8, 7, 6) and pre.itk_spacing == (3.0, 2.0, 0.5)
    assert pre.crop == (slice(0, 3), slice(2, 7), slice(1, 5))
    assert pre.data.shape == (1, 3, 4, 5)  # (k, i, j): target spacing equals the image's, no resampling


# ---- the windows --------------------------------------------------------------------------------------

def test_window_starts_hand_values():
    assert window_starts((110, 176, 177), (64, 176, 176)) == [[0, 23, 46], [0], [0, 1]]
    # Halves round to even, as numpy's round does: 7 / 4 * 2 = 3.5 -> 4.
    assert window_starts((11,), (4,)) == [[0, 2, 4, 5, 7]]


@pytest.mark.parametrize("patch", [4, 8, 16, 64, 176])
def test_windows_tile_every_length(patch):
    for length in range(patch, patch + 300):
        starts = window_starts((length,), (patch,))[0]
        assert starts[0] == 0 and starts[-1] == length - patch
        assert all(0 < b - a <= patch // 2 for a, b in zip(starts, starts[1:])), (length, starts)
        assert len(starts) == int(np.ceil((length - patch) / (patch / 2))) + 1


@pytest.mark.parametrize("patch", [(5, 12, 9), (8, 16, 16), (7, 32, 17)])
def test_gaussian_is_scipys_blurred_impulse(patch):
    impulse = np.zeros(patch)
    impulse[tuple(n // 2 for n in patch)] = 1
    blurred = gaussian_filter(impulse, [n / 8 for n in patch], 0, mode="constant", cval=0)
    np.testing.assert_allclose(gaussian_importance(patch).numpy(), blurred / blurred.max(), rtol=1e-6, atol=0)


def official_window_loop(data, patch, net, mirror_axes, classes):
    """_internal_predict_3D_3Dconv_tiled written out plainly: pad_nd_image (zeros, floor(diff / 2)
    before), depth-major windows, each the softmax of net(flip(x)) flipped back, averaged over the
    flips in _internal_maybe_mirror_and_pred_3D's order, times the Gaussian, summed on the host."""
    shape = data.shape[1:]
    padded_shape = [max(n, p) for n, p in zip(shape, patch)]
    before = [(q - n) // 2 for q, n in zip(padded_shape, shape)]
    padded = np.pad(data, [(0, 0)] + [(b, q - n - b) for b, q, n in zip(before, padded_shape, shape)])
    steps = window_starts(padded_shape, patch)
    tiles = len(steps[0]) * len(steps[1]) * len(steps[2])
    gaussian = gaussian_importance(patch).numpy() if tiles > 1 else np.ones(patch, np.float32)
    flips = [(2, 3, 4)[a] for a in mirror_axes]
    combos = [[d for d, on in zip((2, 3, 4), bits) if on] for bits in itertools.product((0, 1), repeat=3)]
    combos = [c for c in combos if set(c) <= set(flips)]
    summed = np.zeros([classes] + padded_shape, np.float32)
    weights = np.zeros(padded_shape, np.float32)
    for z, y, x in itertools.product(*steps):
        box = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
        crop = torch.from_numpy(padded[(slice(None),) + box][None])
        result = torch.zeros((1, classes, *patch))
        for dims in combos:
            prediction = torch.softmax(net(crop.flip(dims) if dims else crop), 1)
            result += 1 / len(combos) * (prediction.flip(dims) if dims else prediction)
        summed[(slice(None),) + box] += (result * torch.from_numpy(gaussian))[0].numpy()
        weights[box] += gaussian
    inner = tuple(slice(b, b + n) for b, n in zip(before, shape))
    return summed[(slice(None),) + inner] / weights[inner]


@pytest.mark.parametrize("shape, mirror", [((9, 20, 40), False), ((9, 20, 40), True), ((6, 12, 45), True),
                                           ((3, 10, 20), True)], ids=["overlaps", "overlaps-mirrored",
                                                                      "padded-mirrored", "one-window"])
def test_windows_see_exactly_the_official_crops(shape, mirror):
    """Features cached per (in-plane window, slice) and flips, stacked per window: the same class
    probabilities as the plain official loop, with an encoder that sees each slice's crop (its mean)
    and a decoder that tells depth positions apart (so a wrong crop, stack or flip would show)."""
    patch = (4, 16, 32)
    plans = Plans.from_dict(plans_dict(patch_size=patch, schemes=("CT", "CT")))
    data = torch.from_numpy(np.random.default_rng(3).normal(size=(2, *shape)).astype(np.float32))
    model = ToyModel(steepness=1.5, crop_signal=0.7, depth_signal=0.3)
    axes = (0, 1, 2) if mirror else ()
    ours = predict_probabilities(data, plans, model.encode, model.decode, axes).numpy()
    # Each (in-plane window, flips, slice of the padded volume) was encoded once, whatever the overlap.
    padded = [max(n, p) for n, p in zip(shape, patch)]
    in_plane = len(window_starts(padded, patch)[1]) * len(window_starts(padded, patch)[2])
    assert model.encoded_slices == in_plane * padded[0] * (4 if mirror else 1)
    official = official_window_loop(data.numpy(), patch, lambda x: model.decode(model.encode(x)), axes, 2)
    np.testing.assert_allclose(ours, official, rtol=0, atol=2e-6)


def test_decode_of_the_wrong_shape_is_refused():
    plans = Plans.from_dict(plans_dict(patch_size=(4, 16, 16), classes=3))
    model = ToyModel()
    with pytest.raises(ValueError, match=r"decode returned logits of shape \(1, 2, 4, 16, 16\), expected"):
        predict_probabilities(torch.zeros((1, 4, 16, 16)), plans, model.encode, model.decode)


# ---- geometry: an ellipsoid comes back in place -----------------------------------------------------

rot = make_reference._rot

GEOMETRIES = {  # stored axes (before rotation), spacing, shape, rotation
    "LPS-anisotropic-odd": ("LPS", (0.9, 0.8, 3.0), (37, 45, 13), np.eye(3)),
    "SRA-permuted-anisotropic": ("SRA", (3.0, 0.9, 0.8), (13, 37, 45), np.eye(3)),
    "ASL-permuted-oblique": ("ASL", (0.9, 3.0, 0.8), (41, 13, 47), rot("x", 20) @ rot("z", -25)),
    "LAS-oblique-lefthanded": ("LAS", (0.85, 0.95, 2.6), (43, 39, 15), rot("z", 10) @ rot("y", -20)),
    "PIR-oblique-near-isotropic": ("PIR", (1.0, 1.2, 1.1), (33, 29, 31), rot("y", 15) @ rot("x", 30)),
}
CENTRE_OFFSET, SEMI_AXES = np.array([2.0, -3.0, 1.5]), np.array([9.0, 7.0, 11.0])  # mm, RAS


def ellipsoid_case(name):
    """(CT-like image, affine, the ellipsoid's voxels, plans): 300 HU inside an ellipsoid written in
    RAS mm, 20 HU around, two zero planes (cropped); the plans transpose the thickest axis first
    and resample every axis."""
    axes, spacing, shape, rotation = GEOMETRIES[name]
    affine = make_reference.make_affine(axes, spacing, shape, rotation, (10.0, -20.0, 5.0))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    ras = apply_affine(affine, ijk) - apply_affine(affine, (np.array(shape) - 1) / 2)
    label = (np.sum(((ras - CENTRE_OFFSET) / SEMI_AXES) ** 2, axis=1) <= 1).reshape(shape)
    image = np.where(label, 300, 20).astype(np.int16)
    image[:, :2] = 0
    itk_spacing = np.array(spacing[::-1])
    forward = [int(np.argmax(itk_spacing))] + [a for a in range(3) if a != np.argmax(itk_spacing)]
    target = (itk_spacing[forward[0]] * 0.9, 1.05, 0.95)
    plans = Plans.from_dict(plans_dict(target, (8, 32, 32), intensity=[CT], transpose_forward=forward))
    return image, affine, label, plans


def dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


THRESHOLD = (160 - CT["mean"]) / CT["sd"]  # half-way between 20 and 300 HU, in normalised units


@pytest.mark.parametrize("name", GEOMETRIES)
def test_ellipsoid_comes_back_on_the_original_grid(name):
    image, affine, label, plans = ellipsoid_case(name)
    model = ToyModel(threshold=THRESHOLD)
    labels = segment(image, affine, plans, model.encode, model.decode)
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}
    assert dice(labels == 1, label) > 0.95
    found, truth = (apply_affine(affine, np.argwhere(mask)).mean(0) for mask in (labels == 1, label))
    assert np.linalg.norm(found - truth) < 0.3  # mm


def test_multimodal_segment_uses_modality_zero():
    image, affine, label, plans = ellipsoid_case("ASL-permuted-oblique")
    raw = plans_dict(plans.target_spacing, plans.patch_size, ("CT", "nonCT"), (False, False), [CT, {}],
                     plans.transpose_forward)
    model = ToyModel(threshold=THRESHOLD)
    noise = np.random.default_rng(4).normal(size=image.shape).astype(np.float32)
    labels = segment(np.stack([image, noise]), affine, Plans.from_dict(raw), model.encode, model.decode)
    assert dice(labels == 1, label) > 0.95
    with pytest.raises(ValueError, match="take 2 modalities"):
        segment(image, affine, Plans.from_dict(raw), model.encode, model.decode)


# ---- the feature cache ----------------------------------------------------------------------------

def test_cache_serves_reruns_without_encoding():
    image, affine, label, plans = ellipsoid_case("LAS-oblique-lefthanded")
    model = ToyModel(threshold=THRESHOLD)
    cache = FeatureCache()
    first = segment(image, affine, plans, model.encode, model.decode, cache=cache, image_key="ct-1")
    slices = model.encoded_slices
    padded = [max(n, p) for n, p in zip(preprocess(image, affine, plans).data.shape[1:], plans.patch_size)]
    starts = window_starts(padded, plans.patch_size)
    assert len(starts[0]) > 1  # windows overlap along depth: their slices were still encoded once
    assert slices == len(starts[1]) * len(starts[2]) * padded[0] == len(cache)

    again = segment(image, affine, plans, model.encode, model.decode, cache=cache, image_key="ct-1")
    assert model.encoded_slices == slices and np.array_equal(again, first)
    # Mirroring adds the three in-plane flips; depth flips reuse the features.
    mirrored = segment(image, affine, plans, model.encode, model.decode, mirror=True, cache=cache, image_key="ct-1")
    assert model.encoded_slices == 4 * slices and dice(mirrored == 1, label) > 0.95
    segment(image, affine, plans, model.encode, model.decode, mirror=True, cache=cache, image_key="ct-1")
    assert model.encoded_slices == 4 * slices
    # Another image key, or other plans, is another image.
    segment(image, affine, plans, model.encode, model.decode, cache=cache, image_key="ct-2")
    assert model.encoded_slices == 5 * slices


def test_cache_stays_within_its_bytes():
    image, affine, label, plans = ellipsoid_case("LPS-anisotropic-odd")
    model = ToyModel(threshold=THRESHOLD)
    reference = segment(image, affine, plans, model.encode, model.decode)
    per_slice = 256 * (plans.patch_size[1] // STRIDE) * (plans.patch_size[2] // STRIDE) * 4  # float32 features
    cache = FeatureCache(max_bytes=10 * per_slice)
    labels = segment(image, affine, plans, model.encode, model.decode, cache=cache, image_key="ct")
    assert np.array_equal(labels, reference) and len(cache) == 10
    with pytest.raises(ValueError, match="needs an image_key"):
        segment(image, affine, plans, model.encode, model.decode, cache=cache)


# ---- parity with the official code ---------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def official_cases():
    return make_reference.cases()


def test_reference_was_made_with_the_pinned_versions(reference):
    assert str(reference["official_commit"]).startswith("4f54b7c")
    assert (str(reference["skimage"]), str(reference["scipy"]), str(reference["batchgenerators"])) == (
        "0.18.1", "1.6.2", "0.21")
    assert REFERENCE.stat().st_size < 2**20


@pytest.mark.parametrize("name", CASES)
def test_preprocessing_equals_official(name, reference, official_cases):
    volumes, affine, raw = official_cases[name]
    assert make_reference.volume_sha256(volumes) == str(reference[f"{name}__volume_sha256"])
    np.testing.assert_array_equal(affine, reference[f"{name}__affine"])
    plans = Plans.from_dict(raw)
    pre = preprocess(np.stack(volumes) if len(volumes) > 1 else volumes[0], affine, plans)
    official = reference[f"{name}__data"]
    assert pre.data.shape == official.shape and pre.data.dtype == np.float32
    np.testing.assert_allclose(pre.data, official, rtol=0, atol=1e-3)
    assert [[s.start, s.stop] for s in pre.crop] == reference[f"{name}__crop_bbox"].tolist()
    assert pre.cropped_shape == tuple(reference[f"{name}__size_after_cropping"])
    np.testing.assert_allclose(pre.itk_spacing, reference[f"{name}__original_spacing"], rtol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_preprocessing_of_the_files_as_the_app_loads_them(name, reference, official_cases, tmp_path):
    """Through samlabel.images.load_image (MONAI's reader: the stored (i, j, k) and a RAS affine), the
    NIfTI files the official run read with SimpleITK give the official input too."""
    volumes, affine, raw = official_cases[name]
    loaded = []
    for m, volume in enumerate(volumes):
        image = nib.Nifti1Image(volume, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, str(tmp_path / f"{name}_{m:04d}.nii.gz"))
        loaded.append(load_image(str(tmp_path / f"{name}_{m:04d}.nii.gz")))
    array = np.stack([image.array for image in loaded]) if len(loaded) > 1 else loaded[0].array
    pre = preprocess(array, loaded[0].affine, Plans.from_dict(raw))
    np.testing.assert_allclose(pre.data, reference[f"{name}__data"], rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", CASES)
def test_labels_back_on_the_stored_grid_equal_official(name, reference, official_cases):
    volumes, affine, raw = official_cases[name]
    plans = Plans.from_dict(raw)
    pre = preprocess(np.stack(volumes) if len(volumes) > 1 else volumes[0], affine, plans)
    softmax = make_reference.synthetic_softmax(pre.data.shape[1:])
    assert hashlib.sha256(softmax.tobytes()).hexdigest() == str(reference[f"{name}__softmax_sha256"])
    labels = labels_on_itk_grid(torch.from_numpy(softmax), pre, plans).numpy().transpose(2, 1, 0)
    official = reference[f"{name}__labels"]
    assert labels.shape == official.shape and len(np.unique(official)) == 3
    assert np.mean(labels != official) <= 1e-3, f"{int(np.sum(labels != official))} voxels differ"


def test_window_starts_equal_official(reference):
    ours = [start for length, patch in reference["step_pairs"] for start in window_starts((length,), (patch,))[0]]
    assert ours == reference["step_starts"].tolist()


def test_gaussian_equals_official(reference):
    for i, patch in enumerate(make_reference.GAUSSIAN_PATCHES):
        np.testing.assert_allclose(gaussian_importance(patch).numpy(), reference[f"gaussian_{i}"], rtol=1e-6, atol=0)
    synapse = gaussian_importance(make_reference.SYNAPSE_PATCH).numpy()
    centre = [n // 2 for n in make_reference.SYNAPSE_PATCH]
    lines = np.stack([synapse[:, centre[1], centre[2]][:64], synapse[centre[0], :, centre[2]][:64],
                      synapse[centre[0], centre[1], :][:64]])
    np.testing.assert_allclose(lines, reference["synapse_gaussian_lines"], rtol=1e-6)
    np.testing.assert_allclose([synapse[0, 0, 0], synapse[-1, -1, -1]],
                               [reference["synapse_gaussian_corner"], reference["synapse_gaussian_far_corner"]],
                               rtol=1e-5)


def test_padding_rule_equals_official(reference):
    """The rule official_window_loop (and so predict_probabilities, which it checks) pads by."""
    for (shape, patch), slicer, padded_shape in zip(make_reference.PAD_SHAPES, reference["pad_slicers"],
                                                    reference["padded_shapes"]):
        padded = [max(n, p) for n, p in zip(shape, patch)]
        starts = [(q - n) // 2 for q, n in zip(padded, shape)]
        assert padded == padded_shape.tolist()
        assert [[b, b + n] for b, n in zip(starts, shape)] == slicer.tolist()
