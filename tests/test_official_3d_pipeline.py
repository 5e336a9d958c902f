"""Our 3D model input against the official SAM-Med3D pipeline's, voxel by voxel.

The reference data (tests/data/reference/official3d_*.npz) was written by
scripts/make_reference_3d.py, which runs the official preprocessing of a SAM-Med3D checkout
(TorchIO Resample to 1.5 mm, ToCanonical, CropOrPad around the target, ZNormalization over x > 0)
and its postprocessing (threshold at 128^3, nearest-neighbour Resample back) on volumes that
script builds and these tests rebuild: an oblique, left-handed CT-like int16 volume of
0.6 x 0.9 x 3.0 mm, 301 x 257 x 61 (target inside; target at a corner, the window ~80 % outside the
image) and the MNI152 T1 (uint8) stored with permuted and flipped axes. See tests/data/README.md.

For the official crop's window, our encoder input (geometry.sample_window, then
predictor.normalise_intensity) must equal the official one within 1e-3 after normalisation on the
stored voxels (six faces, three interior planes, 4096 random voxels), the rim included.
Integer images are resampled by SimpleITK in their own type (truncated toward zero); where the
exact interpolated value is a whole number, the truncation depends on the last bits of the
positions (SimpleITK reads the header's float32 quaternion, we its float32 matrix) and of the
floating-point sums, so a few such ties (0.005-0.34 % of the voxels here) come out one intensity
unit (1/std after normalisation) apart: they are counted, checked to be ties (the exact value
within 0.01 of a whole number) and bounded.

SimpleITK is in the project's environment, so the border and cast rules are also checked
directly against its ResampleImageFilter, on any geometry, without the reference files.
"""

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import distance_transform_edt

from conftest import load_module
from samlabel.geometry import Window, WindowGeometry, official_grid, place_window, ras_axes, sample_window
from samlabel.predictor import normalise_intensity

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "reference"
CASES = ("ct_oblique", "ct_oblique_border", "mni_permuted")
SIZE = 128
TOLERANCE = 1e-3  # after normalisation
MAX_TIE_FRACTION = 5e-3  # of the compared voxels (measured: 0.005-0.34 %)
TIE_HU = 1e-2  # a tie: the exact interpolated value is this close to a whole number


make_reference = load_module(REPO / "scripts" / "make_reference_3d.py")


@pytest.fixture(scope="module")
def volumes():
    return {name: (volume, affine) for name, (volume, affine, _t, _r) in make_reference.cases().items()}


def reference(name):
    with np.load(REFERENCE / f"official3d_{name}.npz") as data:
        return {key: data[key] for key in data.files}


def unpack_mask(ref):
    block_shape = tuple(ref["mask_block_shape"])
    block = np.unpackbits(ref["mask_bits"])[:int(np.prod(block_shape))].reshape(block_shape).astype(bool)
    mask = np.zeros(tuple(ref["volume_shape"]), bool)
    start = ref["mask_block_start"]
    mask[tuple(slice(a, a + n) for a, n in zip(start, block_shape))] = block
    return mask


def official_values(ref, raw):
    """The official normalisation of raw values: float32 (x - mean) / std, as torchio's znorm."""
    return (torch.from_numpy(np.asarray(raw)).float() - torch.tensor(ref["mean"])) / torch.tensor(ref["std"])


# ---- the reference files themselves ---------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_reference_volumes_rebuild_identically(name, volumes):
    ref = reference(name)
    volume, affine = volumes[name]
    assert make_reference.volume_sha256(volume) == str(ref["volume_sha256"]), "the test volume is not the one used"
    np.testing.assert_allclose(affine, ref["affine"], atol=1e-9)
    assert str(ref["torchio"]) == "0.20.10"
    logits = make_reference.low_res_logits()
    assert hashlib.sha256(logits.tobytes()).hexdigest() == str(ref["logits_sha256"])


def test_reference_data_stays_small():
    total = sum(path.stat().st_size for path in REFERENCE.glob("official3d_*.npz"))
    assert 0 < total <= 2 * 2**20


# ---- D2: where the crop lies ----------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_official_grid_is_the_official_resampled_canonical_grid(name, volumes):
    """Same axes and spacing, and the lattice points coincide (the index labels may differ)."""
    ref = reference(name)
    _, affine = volumes[name]
    ours = official_grid(affine)
    np.testing.assert_allclose(ours[:3, :3], ref["canonical_affine"][:3, :3], atol=1e-6)
    offset = np.linalg.solve(ours, ref["canonical_affine"])[:3, 3]  # official voxel 0 in our grid indices
    np.testing.assert_allclose(offset, np.round(offset), atol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_place_window_official_is_the_official_crop(name, volumes):
    """Clicks at the centres of the two corner voxels of the official target's bounding box (on
    the canonical grid): our window is the official crop, to 1e-4 mm."""
    ref = reference(name)
    _, affine = volumes[name]
    corners = nib.affines.apply_affine(ref["canonical_affine"], ref["label_bbox"].astype(np.float64))
    window = place_window(affine, corners, grid="official")
    np.testing.assert_allclose(window.affine, ref["roi_affine"], atol=1e-4)
    # More clicks inside the box change nothing; the order of the clicks neither.
    centre = nib.affines.apply_affine(ref["canonical_affine"], ref["label_bbox"].mean(0))
    again = place_window(affine, np.stack([corners[1], centre, corners[0]]), grid="official")
    np.testing.assert_allclose(again.affine, ref["roi_affine"], atol=1e-4)


def test_label_boxes_cover_both_roundings():
    """The cases exercise CropOrPad's half-voxel move (odd extents) and its absence (even ones)."""
    extents = np.concatenate([np.diff(reference(name)["label_bbox"], axis=0)[0] + 1 for name in CASES])
    assert (extents % 2 == 0).any() and (extents % 2 == 1).any()


# ---- D1: what the encoder sees ----------------------------------------------------------------

@pytest.fixture(scope="module")
def ours(volumes):
    """Our sampled window (before and after normalisation) on each official crop."""
    out = {}
    for name in CASES:
        ref = reference(name)
        volume, affine = volumes[name]
        window = Window(ref["roi_affine"], SIZE)
        raw = sample_window(volume, affine, window)
        exact = sample_window(volume.astype(np.float64), affine, window)  # before the integer cast
        out[name] = (raw, normalise_intensity(raw), exact)
    return out


@pytest.mark.parametrize("name", CASES)
def test_encoder_input_equals_official_on_rim_and_planes(name, ours):
    ref = reference(name)
    raw, norm, exact = (t.numpy() for t in ours[name])
    integer = np.issubdtype(np.dtype(str(ref["volume_dtype"])), np.integer)
    compared = ties = 0
    for key in [k for k in ref if k.startswith(("face_", "plane_"))]:
        axis, index = (int(v) for v in key.split("_")[1:])
        official_raw = ref[key].astype(np.float64)
        official_norm = official_values(ref, ref[key]).numpy()
        our_raw = np.take(raw, index, axis=axis).astype(np.float64)
        our_norm = np.take(norm, index, axis=axis)
        our_exact = np.take(exact, index, axis=axis).astype(np.float64)
        differ = our_raw != official_raw
        if integer:  # only ties of the integer cast may differ, by one unit
            assert np.all(np.abs(our_raw - official_raw)[differ] == 1), key
            assert np.all(np.abs(our_exact - np.round(our_exact))[differ] < TIE_HU), key
        else:
            assert not differ.any(), key
        np.testing.assert_allclose(our_norm[~differ], official_norm[~differ], atol=TOLERANCE, rtol=0, err_msg=key)
        np.testing.assert_allclose(our_norm[differ], official_norm[differ], atol=1.0 / float(ref["std"]) + TOLERANCE,
                                   rtol=0, err_msg=key)
        compared, ties = compared + differ.size, ties + int(differ.sum())
    assert compared == 9 * SIZE * SIZE
    assert ties <= MAX_TIE_FRACTION * compared, f"{ties} of {compared} voxels differ"


@pytest.mark.parametrize("name", CASES)
def test_normalisation_statistics_equal_official(name, ours):
    ref = reference(name)
    raw = ours[name][0]
    positive = raw[raw > 0]
    assert abs(int(positive.numel()) - int(ref["positive_voxels"])) <= MAX_TIE_FRACTION * SIZE**3
    # The ties (one unit, either way) move the mean by < 1e-3 units: 2e-5 z-units at most here.
    assert float(positive.mean()) == pytest.approx(float(ref["mean"]), abs=1e-3)
    assert float(positive.std()) == pytest.approx(float(ref["std"]), rel=2e-5)


@pytest.mark.parametrize("name", CASES)
def test_encoder_input_equals_official_at_random_voxels(name, ours):
    """The official normalised input itself (not rebuilt from its raw values) at 4096 voxels."""
    ref = reference(name)
    norm = ours[name][1].numpy()
    index = tuple(ref["sample_index"].T.astype(int))
    diff = np.abs(norm[index] - ref["sample_value"])
    unit = 1.0 / float(ref["std"])
    assert np.all((diff <= TOLERANCE) | (np.abs(diff - unit) <= TOLERANCE))
    assert (diff > TOLERANCE).sum() <= max(2, MAX_TIE_FRACTION * diff.size)


def test_border_case_window_is_mostly_outside(volumes):
    ref = reference("ct_oblique_border")
    volume, affine = volumes["ct_oblique_border"]
    u = np.stack(np.meshgrid(*[np.arange(0, SIZE, 4.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    idx = nib.affines.apply_affine(np.linalg.solve(affine, ref["roi_affine"]), u)
    inside = np.all((idx >= -0.5) & (idx < np.array(volume.shape) - 0.5), axis=1)
    assert inside.mean() < 0.3


# ---- SimpleITK directly: the border and the integer cast on other geometries ----------------

def sitk_resample_onto(volume, affine, window):
    """SimpleITK's linear ResampleImageFilter of the stored volume onto the window grid, output in
    the volume's own pixel type (SimpleITK's default, as in the official pipeline)."""
    lps = np.diag([-1.0, -1.0, 1.0])
    def meta(a):  # noqa: E306 - RAS affine -> SimpleITK origin, spacing, direction (LPS)
        zooms = np.linalg.norm(a[:3, :3], axis=0)
        return tuple(lps @ a[:3, 3]), tuple(zooms), tuple((lps @ a[:3, :3] / zooms).reshape(-1))
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.transpose(2, 1, 0)))
    origin, spacing, direction = meta(affine)
    image.SetOrigin(origin), image.SetSpacing(spacing), image.SetDirection(direction)
    resampler = sitk.ResampleImageFilter()
    origin, spacing, direction = meta(window.affine)
    resampler.SetOutputOrigin(origin), resampler.SetOutputSpacing(spacing), resampler.SetOutputDirection(direction)
    resampler.SetSize((window.size,) * 3)
    resampler.SetInterpolator(sitk.sitkLinear)
    return sitk.GetArrayFromImage(resampler.Execute(image)).transpose(2, 1, 0)


def _geometry(axes_perm, flips, spacing, shape, degrees):
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    signed = np.zeros((3, 3))
    for image_axis, (world, flip) in enumerate(zip(axes_perm, flips)):
        signed[world, image_axis] = -1.0 if flip else 1.0
    affine = np.eye(4)
    affine[:3, :3] = rot @ signed @ np.diag(spacing)
    affine[:3, 3] = (11.0, -23.0, 7.0)
    return affine, shape


GEOMETRIES = {
    "LAS-oblique": _geometry((0, 1, 2), (True, False, False), (0.7, 0.95, 2.7), (61, 47, 23), 14.0),
    "SRA-permuted": _geometry((2, 0, 1), (False, True, False), (2.2, 0.8, 1.1), (19, 71, 53), -9.0),
}


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("grid", ["clicks", "official"])
def test_sample_window_is_simpleitk_linear_resampling(geometry, dtype, grid):
    affine, shape = GEOMETRIES[geometry]
    rng = np.random.default_rng(3)
    if dtype == np.float32:
        volume = rng.normal(50, 30, shape).astype(np.float32)
    else:
        volume = rng.integers(0 if dtype == np.uint8 else -300, 250, shape).astype(dtype)
    click = nib.affines.apply_affine(affine, (np.array(shape) - 1) * [0.9, 0.15, 0.8])  # the window hangs over
    window = place_window(affine, click[None], grid=grid)
    ours = sample_window(volume, affine, window).numpy().astype(np.float64)
    theirs = sitk_resample_onto(volume, affine, window).astype(np.float64)
    assert (theirs == 0).mean() > 0.3 and (theirs != 0).sum() > 10000  # inside, outside and the rim
    if dtype == np.float32:
        np.testing.assert_allclose(ours, theirs, atol=1e-3)
    else:  # ties of the cast may differ by one unit
        differ = ours != theirs
        assert np.all(np.abs(ours - theirs)[differ] == 1)
        assert differ.mean() < MAX_TIE_FRACTION


def test_official_grid_single_click_at_window_index_64():
    """One click: its grid voxel is window voxel 64 along +R, +A, +S (CropOrPad with a one-voxel
    mask and an even size moves the centre half a voxel down), whatever the stored orientation."""
    for affine, _shape in GEOMETRIES.values():
        lattice = official_grid(affine)
        click = nib.affines.apply_affine(lattice, (10.3, -4.2, 7.45))  # in grid voxel (10, -4, 7)
        window = place_window(affine, click[None], grid="official")
        u = nib.affines.apply_affine(np.linalg.inv(window.affine), click)
        np.testing.assert_allclose(u, (64.3, 63.8, 64.45), atol=1e-6)
        np.testing.assert_allclose(window.affine[:3, :3], ras_axes(affine) * 1.5, atol=1e-9)


# ---- D3: back to the image --------------------------------------------------------------------

def official_way_back(logits, window, shape, affine):
    """The official way back, from first principles: threshold the trilinear 128^3 upsampling at
    0.5 after the sigmoid, then nearest neighbour at every stored voxel (ITK: inside [-0.5, 127.5),
    halves rounded up). Returns (mask, ties): ties are the stored voxels whose window position is
    a half along some axis, where the floating-point error of the positions decides."""
    high = torch.nn.functional.interpolate(torch.from_numpy(logits), size=(SIZE,) * 3, mode="trilinear",
                                           align_corners=False)
    positive = (torch.sigmoid(high) > 0.5).numpy()[0, 0]
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    u = nib.affines.apply_affine(np.linalg.solve(window.affine, affine), ijk)
    inside = np.all((u >= -0.5) & (u < SIZE - 0.5), axis=1)
    nearest = np.clip(np.floor(u + 0.5).astype(int), 0, SIZE - 1)
    ties = np.any(np.abs(u - np.floor(u) - 0.5) < 1e-4, axis=1)  # 1e-4: the header's float32 precision
    return (inside & positive[tuple(nearest.T)]).reshape(shape), ties.reshape(shape)


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def mean_boundary_shift_mm(a, b, zooms):
    """The volume where the masks disagree over the area of b's surface: how far, on average,
    one boundary lies from the other."""
    area = 0.0
    for axis in range(3):
        faces = np.count_nonzero(np.diff(b.astype(np.int8), axis=axis))
        area += faces * np.prod(np.delete(zooms, axis))
    return float(np.count_nonzero(a != b) * np.prod(zooms) / area)


def largest_disagreement_mm(a, b, zooms):
    """How far (mm) the farthest voxel of one mask lies from the other mask."""
    far = 0.0
    for x, y in ((a, b), (b, a)):
        only = x & ~y
        if only.any():
            far = max(far, float(distance_transform_edt(~y, sampling=zooms)[only].max()))
    return far


@pytest.mark.parametrize("name", CASES)
def test_way_back_official_versus_ours(name, volumes):
    """The official mask is reproduced by official_way_back; ours (trilinear read at each stored
    voxel) is compared with it: the measured Dice and distance are in README "Faithful to the
    checkpoints"."""
    ref = reference(name)
    volume, affine = volumes[name]
    window = Window(ref["roi_affine"], SIZE)
    logits = make_reference.low_res_logits()
    official = unpack_mask(ref)
    assert official.sum() == int(ref["mask_voxels"]) > 1000
    rebuilt, ties = official_way_back(logits, window, volume.shape, affine)
    assert np.array_equal(rebuilt[~ties], official[~ties])  # reproduced, up to the halves
    ours = WindowGeometry(window, volume.shape, affine).mask(logits).astype(bool)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    d, far = dice(ours, official), largest_disagreement_mm(ours, official, zooms)
    shift = mean_boundary_shift_mm(ours, official, zooms)
    print(f"{name}: Dice {d:.4f}, {int((ours != official).sum())} voxels differ, farthest {far:.2f} mm, "
          f"mean boundary shift {shift:.2f} mm")
    assert d > 0.98
    # The official way moves each position by up to half a window voxel per axis before thresholding
    # (0.75 mm * sqrt(3)); one stored voxel more for the discrete masks.
    assert far <= 0.75 * np.sqrt(3) + zooms.max()


@pytest.mark.parametrize("span, expected", [(3, (62, 65)), (2, (63, 65))])
def test_official_grid_two_clicks_follow_crop_or_pad_rounding(span, expected):
    """Clicks in grid voxels v and v + span: the box [v, v + span + 1) has centre v + (span + 1) / 2;
    CropOrPad moves a centre that is not a whole index half a voxel down (even size), and the crop
    starts 64 voxels below it."""
    affine, _shape = GEOMETRIES["LAS-oblique"]
    lattice = official_grid(affine)
    clicks = nib.affines.apply_affine(lattice, np.array([[5.0, -2.0, 9.0], [5.0 + span, -2.0 + span, 9.0 + span]]))
    window = place_window(affine, clicks, grid="official")
    u = nib.affines.apply_affine(np.linalg.inv(window.affine), clicks)
    np.testing.assert_allclose(u, [[expected[0]] * 3, [expected[1]] * 3], atol=1e-6)
