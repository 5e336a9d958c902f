"""Geometry between a stored image and the model's 128^3 window of 1.5 mm voxels, and back.

Every expectation here is written from first principles (nibabel's apply_affine, explicit
affine arithmetic, scipy.ndimage.map_coordinates with SimpleITK's border rule, torch's own trilinear
upsampling, hand computation over a few voxels), never from the module's own helpers, and every
transform is exercised with non-trivial geometry: LPS storage, permuted array axes, oblique
direction cosines, anisotropic spacing, odd sizes and clicks on the image border.

Conventions (nibabel): an affine maps the voxel index (i, j, k) of an array, in the array's axis
order, to RAS millimetres; voxel centres sit at integer indices.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nibabel.affines import apply_affine
from scipy.ndimage import map_coordinates

from samlabel.geometry import Window, logits_to_image, place_window, ras_axes, sample_window, window_around

SIZE = 128  # model window, voxels per axis
SPACING = 1.5  # model window voxel size, mm
LOW = 32  # low-res logits per axis
CENTRE = (SIZE - 1) / 2  # 63.5: the window voxel coordinate of the window's centre


# ---- geometry construction -------------------------------------------------------------

AXIS_LETTERS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def rot(axis, deg):
    """Rotation matrix about world axis 'x', 'y' or 'z' (R, A, S)."""
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


class Geometry:
    """A stored image: `axes` names the world direction of array axes 0, 1, 2 before rotation
    (e.g. "SRA": axis 0 runs to S, axis 1 to R, axis 2 to A)."""

    def __init__(self, name, axes, spacing, shape, rotation=np.eye(3), origin=(0.0, 0.0, 0.0)):
        self.name, self.axes, self.shape = name, axes, tuple(shape)
        self.spacing = np.array(spacing, dtype=np.float64)
        signed = np.zeros((3, 3))
        for image_axis, letter in enumerate(axes):
            world, sign = AXIS_LETTERS[letter]
            signed[world, image_axis] = sign
        self.directions = rotation @ signed  # unit columns: image axes in RAS
        self.affine = np.eye(4)
        self.affine[:3, :3] = self.directions @ np.diag(self.spacing)
        self.affine[:3, 3] = origin

    def expected_ras_axes(self):
        """Column r: the image axis whose (unrotated) letter is along RAS axis r, signed to point
        to +r. Written from the construction, independent of nibabel's io_orientation."""
        out = np.zeros((3, 3))
        for image_axis, letter in enumerate(self.axes):
            world, sign = AXIS_LETTERS[letter]
            out[:, world] = sign * self.directions[:, image_axis]
        return out

    def ras(self, index):
        return apply_affine(self.affine, np.asarray(index, dtype=np.float64))

    def index(self, ras):
        return apply_affine(np.linalg.inv(self.affine), np.asarray(ras, dtype=np.float64))

    def __repr__(self):
        return self.name


SMALL, LARGE = (37, 51, 23), (171, 143, 57)
GEOMETRIES = [
    Geometry("RAS-iso", "RAS", (1.0, 1.0, 1.0), SMALL, origin=(-20.0, 10.0, 30.0)),
    Geometry("LPS-aniso", "LPS", (0.7, 0.9, 3.0), SMALL, origin=(12.0, 40.0, -33.0)),
    Geometry("SRA-perm-aniso", "SRA", (3.0, 0.7, 0.9), (23, 37, 51), origin=(-5.0, 3.0, 7.0)),
    Geometry("ASL-perm-oblique", "ASL", (0.9, 3.0, 0.7), (51, 23, 37),
             rotation=rot("x", 20) @ rot("z", -25), origin=(30.0, -12.0, 4.0)),
    Geometry("LPS-oblique-large", "LPS", (0.7, 0.9, 3.0), LARGE,
             rotation=rot("y", 15) @ rot("x", 30), origin=(62.0, 48.0, -75.0)),
    Geometry("LAS-oblique-lefthanded", "LAS", (0.9, 0.7, 3.0), LARGE,
             rotation=rot("z", 10) @ rot("y", -20), origin=(70.0, -60.0, -90.0)),
    Geometry("PIL-perm-oblique-large", "PIL", (0.9, 3.0, 0.7), (143, 57, 171),
             rotation=rot("y", -28) @ rot("z", 12), origin=(-8.0, 90.0, 70.0)),
]
OBLIQUE = [g for g in GEOMETRIES if "oblique" in g.name]
NON_TRIVIAL = [g for g in GEOMETRIES if g.name != "RAS-iso"]


def border_clicks(g):
    """Clicks on the image border: corners (index 0 and size-1) and mixed faces."""
    n = np.array(g.shape) - 1
    return [np.zeros(3, int), n.copy(), np.array([0, n[1], n[2] // 2]), np.array([n[0], 0, n[2]])]


def interior_click(g, fraction=(0.45, 0.55, 0.5)):
    return np.round((np.array(g.shape) - 1) * np.array(fraction)).astype(int)


def grid_points(affine, shape, step=1):
    """affine applied to the index of every `step`-th voxel of an array of `shape`:
    (*ceil(shape / step), 3). Written as a broadcast sum of the affine's columns
    (index i * column 0 + j * column 1 + k * column 2 + translation), much cheaper than a
    (N, 3) @ (3, 3) product for 128^3 grids; test_grid_points_helper checks it against nibabel."""
    affine = np.asarray(affine, dtype=np.float64)
    i, j, k = (np.arange(0, n, step, dtype=np.float64) for n in shape)
    return (affine[:3, 3] + i[:, None, None, None] * affine[:3, 0] + j[None, :, None, None] * affine[:3, 1]
            + k[None, None, :, None] * affine[:3, 2])


def to_window(window, ras):
    """Window voxel coordinates of RAS points, from the window affine alone."""
    return apply_affine(np.linalg.inv(window.affine), np.asarray(ras, dtype=np.float64))


def image_coords_of_window(window, g, step=1):
    """(S, S, S, 3) continuous image indices of every (step-th) window voxel centre."""
    return grid_points(np.linalg.inv(g.affine) @ window.affine, (window.size,) * 3, step)


def trilinear_itk_border(volume, coords):
    """Trilinear interpolation of `volume` (voxel centres at integer indices) with SimpleITK's border
    rule, which the official pipeline resamples with: within half a voxel of the image (continuous
    index in [-0.5, n - 0.5) on every axis) the nearest edge values stand in for the missing
    neighbours; farther out the value is 0."""
    flat = coords.reshape(-1, 3).T
    values = map_coordinates(volume.astype(np.float64), flat, order=1, mode="nearest")
    n = np.array(volume.shape)[:, None]
    inside = np.all((flat >= -0.5) & (flat < n - 0.5), axis=0)
    return np.where(inside, values, 0.0).reshape(coords.shape[:-1])


def embed(values, block, shape):
    """The block's values in a full image array, -inf elsewhere."""
    full = np.full(shape, -np.inf)
    if values.size:
        full[block] = values
    return full


def test_grid_points_helper():
    g = GEOMETRIES[5]
    points = grid_points(g.affine, g.shape)
    assert points.shape == g.shape + (3,)
    for idx in [(0, 0, 0), (170, 142, 56), (3, 100, 17), (170, 0, 56)]:
        np.testing.assert_allclose(points[idx], apply_affine(g.affine, idx), atol=1e-9)
    np.testing.assert_allclose(grid_points(np.eye(4), (2, 3, 4))[1, 2, 3], [1, 2, 3])
    sub = grid_points(g.affine, g.shape, 4)
    np.testing.assert_allclose(sub[10, 20, 3], apply_affine(g.affine, (40, 80, 12)), atol=1e-9)


# ---- 1. ras_axes ---------------------------------------------------------------------------

@pytest.mark.parametrize("g", GEOMETRIES, ids=repr)
def test_ras_axes_is_the_closest_signed_permutation_of_the_image_axes(g):
    axes = ras_axes(g.affine)
    assert axes.shape == (3, 3)
    np.testing.assert_allclose(np.linalg.norm(axes, axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-12)
    # Column r points to +R, +A, +S respectively, within 45 degrees.
    assert np.all(np.diag(axes) > np.cos(np.deg2rad(45))), np.diag(axes)
    # Every column is +- one of the image's own axes, each image axis used exactly once.
    cos = g.directions.T @ axes  # (image axis, ras axis)
    signed_permutation = np.round(cos)
    np.testing.assert_allclose(cos, signed_permutation, atol=1e-12)
    assert sorted(np.abs(signed_permutation).argmax(0)) == [0, 1, 2]
    # Handedness: the flips/permutation relating image axes to window axes carry the image's
    # handedness, so the window axes are always a right-handed (RAS+) set.
    assert np.sign(np.linalg.det(signed_permutation)) == np.sign(np.linalg.det(g.directions))
    assert np.linalg.det(axes) == pytest.approx(1.0, abs=1e-12)
    # And it is exactly the signed permutation written from the construction of the geometry.
    np.testing.assert_allclose(axes, g.expected_ras_axes(), atol=1e-12)


def test_ras_axes_hand_computed_permuted_lps():
    # Array axes run (S, P, L) with spacing 2, 3, 4 mm: R = -axis 2, A = -axis 1, S = +axis 0.
    affine = np.array([[0, 0, -4.0, 10], [0, -3.0, 0, 20], [2.0, 0, 0, 30], [0, 0, 0, 1]])
    np.testing.assert_allclose(ras_axes(affine), np.eye(3), atol=1e-15)
    # Rotate that image by 20 degrees about S: the window axes rotate with the image.
    r = rot("z", 20)
    oblique = affine.copy()
    oblique[:3, :3] = r @ affine[:3, :3]
    np.testing.assert_allclose(ras_axes(oblique), r, atol=1e-12)


# ---- 2. click round trip -----------------------------------------------------------------

@pytest.mark.parametrize("g", GEOMETRIES, ids=repr)
def test_click_round_trip_and_window_centre(g):
    for click in border_clicks(g) + [interior_click(g)]:
        ras = g.ras(click)
        window = place_window(g.affine, ras[None])
        # The window's centre voxel (63.5, 63.5, 63.5) is the click.
        u = to_window(window, ras)
        np.testing.assert_allclose(u, CENTRE, atol=1e-9)
        np.testing.assert_allclose(window.to_window(ras[None])[0], u, atol=1e-9)
        np.testing.assert_allclose(apply_affine(window.affine, [CENTRE] * 3), ras, atol=1e-9)
        # click -> RAS -> window -> RAS -> image index.
        back = g.index(apply_affine(window.affine, window.to_window(ras[None])[0]))
        np.testing.assert_allclose(back, click, atol=1e-6)
        assert window.contains(ras[None]).all()
        # window_around on the same point is the same window.
        np.testing.assert_allclose(window_around(g.affine, ras).affine, window.affine, atol=1e-9)


@pytest.mark.parametrize("g", NON_TRIVIAL, ids=repr)
def test_click_off_centre_round_trip(g):
    """A second click anywhere in the window round-trips to its own voxel."""
    a, b = interior_click(g, (0.3, 0.6, 0.4)), interior_click(g, (0.7, 0.2, 0.9))
    window = place_window(g.affine, np.stack([g.ras(a), g.ras(b)]))
    for click in (a, b):
        u = window.to_window(g.ras(click)[None])[0]
        np.testing.assert_allclose(u, to_window(window, g.ras(click)), atol=1e-9)
        np.testing.assert_allclose(g.index(apply_affine(window.affine, u)), click, atol=1e-6)


# ---- 3. place_window ------------------------------------------------------------------------

def assert_window_axes(window, g):
    lin = window.affine[:3, :3]
    np.testing.assert_allclose(np.linalg.norm(lin, axis=0), SPACING, atol=1e-12)
    np.testing.assert_allclose(lin / SPACING, g.expected_ras_axes(), atol=1e-12)
    np.testing.assert_allclose(window.affine[3], [0, 0, 0, 1])
    assert window.size == SIZE


@pytest.mark.parametrize("g", GEOMETRIES, ids=repr)
def test_place_window_holds_all_clicks_centred_on_their_box(g):
    extent = (np.array(g.shape) - 1) * g.spacing
    # Clicks on the border (index 0 and size-1) where the image fits in the window, otherwise
    # spread over a sub-box that fits (120 mm along each image axis).
    keep = np.minimum(1.0, 120.0 / extent)
    start = np.floor((np.array(g.shape) - 1) * (1 - keep) / 2).astype(int)
    stop = start + np.floor((np.array(g.shape) - 1) * keep).astype(int)
    clicks = np.array([start, stop, [start[0], stop[1], start[2]], [stop[0], start[1], (start[2] + stop[2]) // 2],
                       (start + stop) // 3])
    ras = g.ras(clicks)
    window = place_window(g.affine, ras)
    assert_window_axes(window, g)
    assert window.contains(ras).all()
    u = to_window(window, ras)
    assert np.all(u >= -0.5) and np.all(u <= SIZE - 0.5)
    # Centred on the clicks' bounding box along every window axis.
    np.testing.assert_allclose(u.min(0) + u.max(0), SIZE - 1, atol=1e-9)


@pytest.mark.parametrize("g", [GEOMETRIES[3], GEOMETRIES[5]], ids=repr)
def test_window_contains_faces_and_margin(g):
    """The window covers window voxel coordinates [-0.5, 127.5] (voxel faces); `margin` voxels
    shrink that from every face. Points are placed by hand along each oblique window axis."""
    window = place_window(g.affine, g.ras(interior_click(g))[None])
    for axis in range(3):
        for u, margin, expected in [(-0.5 + 1e-6, 0, True), (-0.5 - 1e-6, 0, False), (127.5 - 1e-6, 0, True),
                                    (127.5 + 1e-6, 0, False), (0.0, 0, True), (127.0, 0, True),
                                    (2.5 + 1e-6, 3, True), (2.5 - 1e-6, 3, False), (124.5 - 1e-6, 3, True),
                                    (124.5 + 1e-6, 3, False)]:
            w = np.full(3, CENTRE)
            w[axis] = u
            point = apply_affine(window.affine, w)
            assert window.contains(point[None], margin)[0] == expected, (axis, u, margin)


def test_window_key_identifies_the_grid():
    g = GEOMETRIES[3]
    window = place_window(g.affine, g.ras(interior_click(g))[None])
    same = Window(window.affine + 1e-9, SIZE)  # equal to well below a micrometre
    moved = Window(window.affine + np.pad(np.full((3, 1), 1e-3), ((0, 1), (3, 0))), SIZE)
    assert window.key() == Window(window.affine.copy(), SIZE).key()
    assert window.key() == same.key()
    assert window.key() != moved.key()
    assert window.key() != Window(window.affine, 64).key()


def test_window_key_ignores_the_sign_of_zero():
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    noisy = affine.copy()
    noisy[0, 1] = -1e-17
    assert Window(noisy, SIZE).key() == Window(affine, SIZE).key()


WIDE = Geometry("LPS-oblique-wide", "LPS", (1.5, 0.9, 4.0), (171, 143, 57),
                rotation=rot("x", 12) @ rot("y", -18), origin=(100.0, 50.0, -110.0))


@pytest.mark.parametrize("anchor_choice", ["default-last", "explicit-first"])
def test_place_window_too_wide_centres_the_anchor(anchor_choice):
    g = WIDE  # 256 mm along R (axis 0), 228 mm along S (axis 2), 128 mm along A (axis 1)
    clicks = np.array([[0, 40, 0], [170, 100, 56], [60, 70, 30]])
    ras = g.ras(clicks)
    span = to_window(window_around(g.affine, ras[0]), ras)  # window-axis coordinates, 1.5 mm units
    too_wide = span.max(0) - span.min(0) > SIZE - 1
    assert too_wide.tolist() == [True, False, True]  # the premise: R and S too wide, A fits
    if anchor_choice == "default-last":
        window, anchor = place_window(g.affine, ras), ras[-1]
    else:
        window, anchor = place_window(g.affine, ras, anchor_ras=ras[0]), ras[0]
    assert_window_axes(window, g)
    assert window.contains(anchor[None]).all()
    u = to_window(window, ras)
    ua = to_window(window, anchor)
    np.testing.assert_allclose(ua[too_wide], CENTRE, atol=1e-9)  # centred on the anchor there
    np.testing.assert_allclose(u.min(0)[~too_wide] + u.max(0)[~too_wide], SIZE - 1, atol=1e-9)  # box elsewhere
    assert not window.contains(ras).all()  # the far clicks fall out


@pytest.mark.parametrize("g", [GEOMETRIES[1], GEOMETRIES[4]], ids=repr)
@pytest.mark.parametrize("span_voxels,fits", [
    (126.9, True),
    (127.0, True),
    (128.2, False),
    (160.0, False),
])
def test_place_window_span_threshold(g, span_voxels, fits):
    """Two clicks `span_voxels` window voxels apart along window axis 1 (A)."""
    axes = g.expected_ras_axes()
    first = g.ras(interior_click(g))
    second = first + axes[:, 1] * span_voxels * SPACING + axes[:, 0] * 7.0
    window = place_window(g.affine, np.stack([first, second]))
    assert_window_axes(window, g)
    u = to_window(window, np.stack([first, second]))
    assert window.contains(second[None]).all()  # the newest click is always inside
    if fits:
        assert window.contains(np.stack([first, second])).all()
        np.testing.assert_allclose(u[:, 1].min() + u[:, 1].max(), SIZE - 1, atol=1e-9)
    else:
        np.testing.assert_allclose(u[1, 1], CENTRE, atol=1e-9)
        assert not window.contains(first[None]).any()
    np.testing.assert_allclose(u[:, 0].min() + u[:, 0].max(), SIZE - 1, atol=1e-9)  # axis 0 fits: box centre


# ---- 4. sample_window ----------------------------------------------------------------------

@pytest.mark.parametrize("g", GEOMETRIES, ids=repr)
def test_sample_window_matches_trilinear_reference_with_itk_border(g):
    rng = np.random.default_rng(1)
    volume = rng.normal(size=g.shape).astype(np.float32)
    click = border_clicks(g)[GEOMETRIES.index(g) % 4]  # the window hangs over the border
    window = place_window(g.affine, g.ras(click)[None])
    sampled = sample_window(volume, g.affine, window)
    assert isinstance(sampled, torch.Tensor) and tuple(sampled.shape) == (SIZE,) * 3
    # Every other window voxel along each axis (1/8 of the window) keeps the test fast.
    expected = trilinear_itk_border(volume, image_coords_of_window(window, g, step=2))
    np.testing.assert_allclose(sampled.numpy()[::2, ::2, ::2], expected, atol=2e-4)
    assert np.count_nonzero(expected) > 1000 and np.count_nonzero(expected == 0) > 1000  # in and out


@pytest.mark.parametrize("g", GEOMETRIES, ids=repr)
def test_sample_window_is_exact_for_linear_intensity(g):
    """f(x) = a.x + b written through the image affine: trilinear interpolation reproduces f
    at every window voxel inside the hull of image voxel centres, and gives 0 a voxel or more
    outside the image."""
    a, b = np.array([2.0, -3.0, 1.5]), 2000.0
    volume = grid_points(g.affine, g.shape) @ a + b
    n = np.array(g.shape) - 1
    click = [n, np.array([0, n[1] // 2, n[2]]), np.array([n[0] // 3, 0, 0])][GEOMETRIES.index(g) % 3]  # border
    window = place_window(g.affine, g.ras(click)[None])
    sampled = sample_window(volume, g.affine, window).numpy().astype(np.float64)
    sampled = sampled[1::2, ::2, 1::2]  # a 1/8 subset of window voxels keeps the test fast
    ras = grid_points(window.affine, (SIZE,) * 3)[1::2, ::2, 1::2]
    coords = apply_affine(np.linalg.inv(g.affine), ras.reshape(-1, 3)).reshape(ras.shape)
    inside = np.all((coords >= -1e-6) & (coords <= n + 1e-6), axis=-1)
    outside = np.any((coords <= -1.0001) | (coords >= n + 1.0001), axis=-1)
    assert inside.sum() > 1000 and outside.sum() > 1000
    f = ras @ a + b
    np.testing.assert_allclose(sampled[inside], f[inside], rtol=1e-3)
    assert np.all(sampled[outside] == 0)


@pytest.mark.parametrize("g", NON_TRIVIAL, ids=repr)
def test_sample_window_single_bright_voxel_lands_where_its_ras_point_is(g):
    """A single bright voxel appears at the window position of its RAS point: catches flipped,
    swapped or shifted axes."""
    p = interior_click(g, (0.25, 0.7, 0.35))
    q = interior_click(g, (0.6, 0.4, 0.6))  # the click: not the bright voxel
    volume = np.zeros(g.shape, np.float32)
    volume[tuple(p)] = 1.0
    w0 = place_window(g.affine, g.ras(q)[None])
    u0 = to_window(w0, g.ras(p))
    # Shift the window by less than a voxel so the bright voxel sits on a window voxel centre.
    shift = u0 - np.round(u0)
    window = window_around(g.affine, g.ras(q) + w0.affine[:3, :3] @ shift)
    up = to_window(window, g.ras(p))
    np.testing.assert_allclose(up, np.round(up), atol=1e-9)
    sampled = sample_window(volume, g.affine, window).numpy()
    peak = np.array(np.unravel_index(np.argmax(sampled), sampled.shape))
    np.testing.assert_array_equal(peak, np.round(up).astype(int))
    assert sampled[tuple(peak)] == pytest.approx(1.0, abs=1e-4)  # voxel centre at integer index


@pytest.mark.parametrize("g", NON_TRIVIAL, ids=repr)
def test_sample_window_bright_blob_peak_anywhere_in_window(g):
    """A bright, peaked blob (Gaussian over image voxels around p) peaks within a window voxel of
    p's RAS point, wherever the window is."""
    p = interior_click(g, (0.3, 0.65, 0.4))
    q = interior_click(g, (0.55, 0.45, 0.7))
    d = grid_points(np.eye(4), g.shape) - p
    volume = np.exp(-0.5 * np.sum((d * g.spacing / 2.0) ** 2, axis=-1)).astype(np.float32)  # sigma 2 mm
    window = place_window(g.affine, g.ras(q)[None])
    up = to_window(window, g.ras(p))
    sampled = sample_window(volume, g.affine, window).numpy()
    peak = np.array(np.unravel_index(np.argmax(sampled), sampled.shape))
    assert np.all(np.abs(peak - up) <= 0.5 + 1e-6), (peak, up)


def test_sample_window_half_voxel_convention():
    """Image voxel centres are at integer indices; within half a voxel outside the image the edge
    value holds, farther out it is zero (SimpleITK's linear resampling, as the official pipeline).
    Hand-computed on an image of 1.5 mm voxels stored (P, S, L): the window grid is then the image
    grid, shifted."""
    g = Geometry("PSL-1.5mm", "PSL", (1.5, 1.5, 1.5), (9, 7, 5), origin=(3.0, -4.0, 5.0))
    volume = np.arange(np.prod(g.shape), dtype=np.float32).reshape(g.shape) + 1.0
    click = np.array([4, 3, 2])
    # Window on the click: window voxels sit half an image voxel off the image voxel centres.
    window = place_window(g.affine, g.ras(click)[None])
    sampled = sample_window(volume, g.affine, window).numpy()
    checked = 0
    for w in [(63, 63, 63), (64, 64, 64), (62, 63, 64), (65, 64, 62), (64, 61, 65)]:
        i = g.index(apply_affine(window.affine, w))
        np.testing.assert_allclose(i - np.floor(i), 0.5, atol=1e-9)
        lo = np.floor(i).astype(int)
        cube = volume[lo[0]:lo[0] + 2, lo[1]:lo[1] + 2, lo[2]:lo[2] + 2]
        assert cube.shape == (2, 2, 2)
        assert sampled[w] == pytest.approx(cube.mean(), rel=1e-5)
        checked += 1
    assert checked == 5
    # Shift by half a window voxel: window voxel centres coincide with image voxel centres.
    window = window_around(g.affine, g.ras(click + 0.5))
    sampled = sample_window(volume, g.affine, window).numpy()
    w_of_voxel = lambda idx: np.round(to_window(window, g.ras(idx))).astype(int)  # noqa: E731
    for idx in [(0, 0, 0), (8, 6, 4), (4, 3, 2), (0, 6, 1), (7, 1, 4)]:
        w = w_of_voxel(idx)
        np.testing.assert_allclose(to_window(window, g.ras(idx)), w, atol=1e-9)
        assert sampled[tuple(w)] == pytest.approx(volume[idx], rel=1e-6)
    # A voxel outside the first voxel: zero.
    w0 = to_window(window, g.ras((0, 3, 2)))
    step = to_window(window, g.ras((-1, 3, 2))) - w0  # one image voxel along axis 0, in window voxels
    assert np.abs(step).max() == pytest.approx(1.0)
    w_out = np.round(w0 + step).astype(int)
    assert sampled[tuple(w_out)] == 0.0
    # Less than half a voxel outside (index -0.4): the edge value; more than half (-0.6): zero.
    for outside, expected in ((-0.4, volume[0, 3, 2]), (-0.6, 0.0)):
        shifted = window_around(g.affine, g.ras((outside, 3, 2)) + window.affine[:3, :3] @ (CENTRE - w0))
        s_shifted = sample_window(volume, g.affine, shifted).numpy()
        wh = np.round(to_window(shifted, g.ras((outside, 3, 2)))).astype(int)
        np.testing.assert_allclose(to_window(shifted, g.ras((outside, 3, 2))), wh, atol=1e-9)
        assert s_shifted[tuple(wh)] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("case", ["window-beyond-last-slice", "window-before-first-slice", "window-grazing-last-slice",
                                  "single-slice-image"])
def test_sample_window_zero_outside_thin_overlap(case):
    """Windows that see no more than one slice of the image (or a single-slice image): zeros
    outside, as the trilinear reference with SimpleITK's border rule. (A one-voxel-thick crop once went through
    grid_sample with align_corners=True, which maps every coordinate onto that one voxel and
    extruded the slice through the whole window.)"""
    g = GEOMETRIES[1]  # LPS-aniso
    shape = g.shape
    volume = np.ones(shape, np.float32)
    if case == "window-beyond-last-slice":  # 200 mm beyond the last slice along S
        centre = g.ras((18, 25, shape[2] - 1)) + np.array([0, 0, 200.0])
    elif case == "window-before-first-slice":
        centre = g.ras((18, 25, 0)) - np.array([0, 0, 200.0])
    elif case == "window-grazing-last-slice":  # first window plane 0.9 mm (0.3 voxel) past the last slice
        centre = g.ras((18, 25, shape[2] - 1)) + np.array([0, 0, 0.9 + CENTRE * SPACING])
    else:
        shape = (shape[0], shape[1], 1)
        volume = np.ones(shape, np.float32)
        centre = g.ras((18, 25, 0))
    window = window_around(g.affine, centre)
    sampled = sample_window(volume, g.affine, window).numpy()
    expected = trilinear_itk_border(volume, image_coords_of_window(window, g, step=2))
    np.testing.assert_allclose(sampled[::2, ::2, ::2], expected, atol=1e-4)
    if case == "window-grazing-last-slice":  # by hand: planes S = 0, 1 lie 0.3, 0.8 voxel past the last slice
        assert sampled[:, :, 0].max() == pytest.approx(1.0, abs=1e-4)  # within half a voxel: the edge value
        assert sampled[:, :, 1:].max() == 0


# ---- 5. logits_to_image ---------------------------------------------------------------------

def upsample(logits):
    return F.interpolate(logits, size=(SIZE,) * 3, mode="trilinear", align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize("g", [GEOMETRIES[0], GEOMETRIES[3], GEOMETRIES[5]], ids=repr)
def test_logits_to_image_on_the_window_grid_is_the_official_upsampling(g):
    logits = torch.randn(1, 1, LOW, LOW, LOW, generator=torch.Generator().manual_seed(3)) * 5
    window = place_window(g.affine, g.ras(interior_click(g))[None])
    values, block = logits_to_image(logits, window, (SIZE,) * 3, window.affine)
    assert block == (slice(0, SIZE),) * 3
    assert values.shape == (SIZE,) * 3
    np.testing.assert_allclose(values, upsample(logits), atol=1e-4)


def expected_logits_on_image(logits, window, g, step=1):
    """Reference: each image voxel's window coordinate u; the align_corners=False trilinear
    upsampling reads the low-res grid at (u + 0.5) * L / S - 0.5, clamped to the border cells.
    Returns (that value at every step-th image voxel along each axis, inside the window, on a
    window face)."""
    u = grid_points(np.linalg.inv(window.affine) @ g.affine, g.shape)
    c = np.clip((u[::step, ::step, ::step] + 0.5) * LOW / SIZE - 0.5, 0, LOW - 1)
    low = logits.reshape(LOW, LOW, LOW).double().numpy()
    values = map_coordinates(low, c.reshape(-1, 3).T, order=1, mode="nearest").reshape(c.shape[:-1])
    inside = np.all((u >= -0.5) & (u <= SIZE - 0.5), axis=-1)
    return values, inside, on_face(u)


def on_face(u, tol=1e-4):
    """Voxels lying on a window face (within rounding): inside or outside is a tie there."""
    return np.any((np.abs(u + 0.5) < tol) | (np.abs(u - (SIZE - 0.5)) < tol), axis=-1)


@pytest.mark.parametrize("g", GEOMETRIES, ids=repr)
def test_logits_to_image_matches_reference_with_border_clicks(g):
    logits = torch.randn(1, 1, LOW, LOW, LOW, generator=torch.Generator().manual_seed(5)) * 5
    large = np.prod(g.shape) > 1e5
    for click in border_clicks(g)[GEOMETRIES.index(g) % 2:][:1] if large else border_clicks(g)[:2]:
        window = place_window(g.affine, g.ras(click)[None])
        values, block = logits_to_image(logits, window, g.shape, g.affine)
        # The block stays within the image and values fill it.
        for s, n in zip(block, g.shape):
            assert 0 <= s.start <= s.stop <= n and s.step in (None, 1)
        assert values.shape == tuple(s.stop - s.start for s in block)
        step = 2 if large else 1
        expected, inside, tie = expected_logits_on_image(logits, window, g, step)
        full = embed(values, block, g.shape)
        assert inside.any()
        # Every voxel the window covers is in the block, -inf elsewhere (voxels on a window face,
        # within 1e-4 window voxel, may go either way) ...
        np.testing.assert_array_equal(np.isfinite(full)[~tie], inside[~tie])
        # ... holding the upsampled logit (checked on every voxel of a small image, every other
        # voxel along each axis of a large one).
        sub = full[::step, ::step, ::step]
        finite = np.isfinite(sub)
        assert finite.sum() > 1000
        np.testing.assert_allclose(sub[finite], expected[finite], atol=1e-4)


def blob_mask(g, window, cells, positive=10.0, negative=-10.0):
    logits = torch.full((1, 1, LOW, LOW, LOW), negative)
    logits[(0, 0) + tuple(cells)] = positive
    values, block = logits_to_image(logits, window, g.shape, g.affine)
    return embed(values, block, g.shape)


def assert_only_inside_window(full, window, g):
    u = grid_points(np.linalg.inv(window.affine) @ g.affine, g.shape)
    inside = np.all((u >= -0.5) & (u <= SIZE - 0.5), axis=-1)
    tie = on_face(u)
    assert np.all(full[~inside & ~tie] == -np.inf)
    assert np.all(np.isfinite(full[inside & ~tie]))


@pytest.mark.parametrize("g", NON_TRIVIAL, ids=repr)
def test_logits_blob_at_the_click_maps_back_onto_the_click(g):
    """Window on one click: the click is the corner shared by low-res cells 15 and 16 on each
    axis. Positive logits on those 2x2x2 cells come back as a region centred on the click."""
    click = interior_click(g)
    window = place_window(g.affine, g.ras(click)[None])
    c = (CENTRE + 0.5) * LOW / SIZE - 0.5  # low-res coordinate of the window centre: 15.5
    assert c == 15.5
    full = blob_mask(g, window, (slice(15, 17),) * 3)
    assert_only_inside_window(full, window, g)
    positive = np.argwhere(full > 0)
    assert len(positive) > 8
    assert full[tuple(click)] > 0
    centroid = g.ras(positive).mean(0)
    tolerance = 0.5 * max(SPACING, g.spacing.max())
    assert np.linalg.norm(centroid - g.ras(click)) <= tolerance, (centroid, g.ras(click))
    # Its extent is the 4 window voxels (6 mm) either side of the click, not more than a voxel off.
    extent = np.abs(to_window(window, g.ras(positive)) - CENTRE).max(0)
    assert np.all(extent <= 4 + g.spacing.max() / SPACING) and np.all(extent >= 4 - g.spacing.max() / SPACING)


@pytest.mark.parametrize("g", NON_TRIVIAL, ids=repr)
def test_logits_blob_at_an_off_centre_click_cell(g):
    """Two clicks; a blob on the low-res cell containing the second click comes back over that
    click's voxel, centred on the cell (window voxels 4c-0.5 .. 4c+3.5 along each axis)."""
    a, b = interior_click(g, (0.4, 0.55, 0.45)), interior_click(g, (0.6, 0.4, 0.6))
    window = place_window(g.affine, g.ras(np.stack([a, b])))
    ub = to_window(window, g.ras(b))
    cell = np.floor((ub + 0.5) * LOW / SIZE).astype(int)
    assert np.all((cell > 0) & (cell < LOW - 1))
    full = blob_mask(g, window, tuple(int(x) for x in cell), positive=80.0)
    assert_only_inside_window(full, window, g)
    assert full[tuple(b)] > 0  # the click's own voxel
    positive = np.argwhere(full > 0)
    cell_centre = apply_affine(window.affine, 4.0 * cell + 1.5)
    tolerance = 0.5 * max(SPACING, g.spacing.max())
    assert np.linalg.norm(g.ras(positive).mean(0) - cell_centre) <= tolerance


def cell_of(window, ras):
    """Low-res cell (4 x 4 x 4 window voxels) holding a RAS point."""
    return tuple(int(c) for c in np.clip(np.floor((to_window(window, ras) + 0.5) * LOW / SIZE), 0, LOW - 1))


@pytest.mark.parametrize("g", [GEOMETRIES[1], GEOMETRIES[3], GEOMETRIES[5], GEOMETRIES[6]], ids=repr)
def test_logits_to_image_positive_only_keeps_every_positive_voxel(g):
    """positive_only may shrink the block, but every voxel > 0 of the full result is in it with
    the same value; no positive logit at all gives an empty block."""
    inner, corner = interior_click(g), border_clicks(g)[1]
    two = place_window(g.affine, g.ras(np.stack([inner, corner])))
    on_corner = place_window(g.affine, g.ras(corner)[None])
    # The window's outermost cell on the image side of a window centred on the image's corner.
    towards_image = to_window(on_corner, g.ras((np.array(g.shape) - 1) / 2)) < CENTRE
    edge = tuple(np.where(towards_image, 0, LOW - 1))
    cases = [("click-cell", two, [cell_of(two, g.ras(inner))], True),
             ("both-click-cells", two, [cell_of(two, g.ras(inner)), cell_of(two, g.ras(corner))], True),
             ("edge-cell", on_corner, [edge], g.shape == LARGE or g.shape == (143, 57, 171)),
             ("random-few", two, None, False)]
    for name, window, cells, must_hit in cases:
        if cells is None:
            logits = torch.randn(1, 1, LOW, LOW, LOW, generator=torch.Generator().manual_seed(9)) - 3.0
        else:
            logits = torch.full((1, 1, LOW, LOW, LOW), -5.0)
            for cell in cells:
                logits[(0, 0) + cell] = 5.0
        full_values, full_block = logits_to_image(logits, window, g.shape, g.affine)
        values, block = logits_to_image(logits, window, g.shape, g.affine, positive_only=True)
        full, only = embed(full_values, full_block, g.shape), embed(values, block, g.shape)
        assert not must_hit or (full > 0).any(), name
        if values.size:
            assert values.shape == tuple(s.stop - s.start for s in block), name
            for s, f in zip(block, full_block):
                assert f.start <= s.start <= s.stop <= f.stop, name
        clear = ~(np.abs(full) < 1e-4)  # float32 rounding may flip the sign of a logit ~0
        np.testing.assert_array_equal((only > 0)[clear], (full > 0)[clear], err_msg=name)
        finite = np.isfinite(only)
        np.testing.assert_allclose(only[finite], full[finite], atol=1e-4, err_msg=name)
        if cells is not None and len(cells) == 1 and (full > 0).any():  # the block is small
            assert np.prod(values.shape) < np.prod(full_values.shape) / 8, name
    values, block = logits_to_image(torch.full((1, 1, LOW, LOW, LOW), -1.0), two, g.shape, g.affine,
                                    positive_only=True)
    assert values.size == 0 and any(s.stop <= s.start for s in block)


@pytest.mark.parametrize("g", GEOMETRIES, ids=repr)
def test_logits_to_image_block_within_image_and_empty_outside(g):
    logits = torch.zeros(1, 1, LOW, LOW, LOW)
    for click in border_clicks(g):
        window = place_window(g.affine, g.ras(click)[None])
        values, block = logits_to_image(logits, window, g.shape, g.affine)
        for s, n in zip(block, g.shape):
            assert 0 <= s.start < s.stop <= n
        assert values.shape == tuple(s.stop - s.start for s in block)
        assert values[tuple(np.asarray(click) - [s.start for s in block])] == 0.0  # the click is covered
    # Windows entirely outside the image (beyond every face, along one axis or all three).
    far = 400.0
    centre = g.ras((np.array(g.shape) - 1) / 2)
    for offset in [(far, 0, 0), (-far, 0, 0), (0, far, 0), (0, 0, -far), (far, -far, far)]:
        window = window_around(g.affine, centre + np.array(offset))
        assert not window.contains(grid_points(g.affine, g.shape).reshape(-1, 3)[::97]).any()
        values, block = logits_to_image(logits, window, g.shape, g.affine)
        assert values.size == 0
        assert len(block) == 3 and all(isinstance(s, slice) for s in block)
        assert np.zeros(g.shape)[block].size == 0  # the block selects nothing


# ---- 6. the same anatomy stored several ways ------------------------------------------------

def store(array, flips, perm):
    """Storage of an array: flip `flips` axes, then transpose to `perm`; with its index map
    T (4x4): stored index -> original index."""
    stored = np.flip(array, axis=flips).transpose(perm) if flips else array.transpose(perm)
    n = np.array(array.shape)
    flip = np.eye(4)
    for a in flips:
        flip[a, a], flip[a, 3] = -1.0, n[a] - 1
    p = np.zeros((4, 4))
    p[3, 3] = 1.0
    for m, axis in enumerate(perm):
        p[axis, m] = 1.0  # stored axis m is flipped-array axis perm[m]
    return np.ascontiguousarray(stored), flip @ p


def unstore(stored, flips, perm):
    array = stored.transpose(np.argsort(perm))
    return np.flip(array, axis=flips) if flips else array


STORAGES = {
    "RAS": ((), (0, 1, 2)),
    "LPS": ((0, 1), (0, 1, 2)),
    "permuted": ((), (2, 0, 1)),
    "LPS-permuted": ((0, 1), (1, 2, 0)),
    "flip-one-lefthanded-permuted": ((2,), (2, 1, 0)),
}
BASES = [
    Geometry("base-RAS-aniso", "RAS", (0.7, 0.9, 3.0), SMALL, origin=(-13.0, 7.0, -20.0)),
    Geometry("base-RAS-oblique", "RAS", (0.9, 0.7, 3.0), (61, 73, 29),
             rotation=rot("x", -22) @ rot("y", 14), origin=(5.0, -9.0, 11.0)),
]


@pytest.mark.parametrize("base", BASES, ids=repr)
def test_same_anatomy_stored_differently_gives_the_same_window_and_mask(base):
    rng = np.random.default_rng(11)
    ras = grid_points(base.affine, base.shape)
    centre = ras.reshape(-1, 3).mean(0)
    r = np.sum(((ras - centre - [3.0, -2.0, 4.0]) / [9.0, 7.0, 20.0]) ** 2, axis=-1)
    anatomy = (np.clip(1.5 - r, 0, None) + 0.05 * rng.normal(size=base.shape)).astype(np.float32)  # an ellipsoid
    logits = torch.randn(1, 1, LOW, LOW, LOW, generator=torch.Generator().manual_seed(7)) * 4
    clicks = [interior_click(base, (0.4, 0.6, 0.5)), np.array([0, base.shape[1] - 1, 3])]

    reference = None
    for name, (flips, perm) in STORAGES.items():
        stored, t = store(anatomy, flips, perm)
        affine = base.affine @ t
        # The index map is right: a few stored voxels hold the anatomy's voxel T(index) ...
        for idx in [(0, 0, 0), tuple(np.array(stored.shape) - 1), (1, 2, 3)]:
            orig = tuple(np.round(apply_affine(t, idx)).astype(int))
            assert stored[idx] == anatomy[orig]
            # ... at the same RAS point.
            np.testing.assert_allclose(apply_affine(affine, idx), apply_affine(base.affine, orig), atol=1e-9)
        inv_t = np.linalg.inv(t)
        stored_clicks = [np.round(apply_affine(inv_t, c)).astype(int) for c in clicks]
        clicks_ras = apply_affine(affine, np.array(stored_clicks, dtype=np.float64))
        np.testing.assert_allclose(clicks_ras, apply_affine(base.affine, np.array(clicks, float)), atol=1e-9)
        window = place_window(affine, clicks_ras)
        sampled = sample_window(stored, affine, window).numpy()
        values, block = logits_to_image(logits, window, stored.shape, affine)
        mask_in_base = unstore(embed(values, block, stored.shape), flips, perm)
        assert mask_in_base.shape == base.shape
        # The server's path (positive_only) keeps the same positive voxels, in every storage.
        values, block = logits_to_image(logits, window, stored.shape, affine, positive_only=True)
        positive_in_base = unstore(embed(values, block, stored.shape), flips, perm) > 0
        clear = ~(np.abs(mask_in_base) < 1e-4)
        np.testing.assert_array_equal(positive_in_base[clear], (mask_in_base > 0)[clear], err_msg=name)
        if reference is None:
            reference = (window, sampled, mask_in_base)
            assert np.isfinite(mask_in_base).sum() > 1000 and (mask_in_base > 0).sum() > 100
            continue
        ref_window, ref_sampled, ref_mask = reference
        np.testing.assert_allclose(window.affine, ref_window.affine, atol=1e-9, err_msg=name)
        # SimpleITK's border, which sample_window follows, is half-open ([-0.5, n - 0.5) in stored
        # indices), so a window voxel exactly half a voxel outside the image is in for one storage
        # and out for its mirror image: those voxels are left out of the comparison.
        coords = grid_points(np.linalg.inv(base.affine) @ window.affine, (SIZE,) * 3)
        edge = np.any((np.abs(coords + 0.5) < 1e-6) | (np.abs(coords - (np.array(base.shape) - 0.5)) < 1e-6), axis=-1)
        np.testing.assert_allclose(sampled[~edge], ref_sampled[~edge], atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(np.isfinite(mask_in_base), np.isfinite(ref_mask), err_msg=name)
        finite = np.isfinite(ref_mask)
        np.testing.assert_allclose(mask_in_base[finite], ref_mask[finite], atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(mask_in_base > 0, ref_mask > 0, err_msg=name)
