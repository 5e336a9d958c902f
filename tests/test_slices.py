"""The 2D slice adapter: each model's preprocessing against independently written expectations,
prompt mapping on non-square slices, mask on the clicked slice only, at the right pixels."""

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samlabel.engine2d import SliceSegmenter, box_from_clicks
from samlabel.errors import InputError
from samlabel.predictor2d import SamPredictor2D, intensity_window, preprocess_medsam, preprocess_sam_med2d, to_uint8_range
from samlabel.registry import get_spec
from samlabel.request import ClickRequest
from samlabel.results import ClickResult

COLUMNS, ROWS, SLICES = 97, 61, 9  # non-square slices: i is the column (x), j the row (y)


def test_ct_window_is_level_40_width_400():
    array = np.array([[[-1000, -160, 40]], [[240, 1000, 0]]], dtype=np.int16)
    window = intensity_window(array)
    assert (window.lower, window.upper, window.minimum, window.maximum) == (-160.0, 240.0, -160.0, 240.0)
    scaled = to_uint8_range(array[:, :, 0], window)
    assert scaled.dtype == np.uint8 and scaled.tolist() == [[0], [255]]  # -1000 clipped to -160 -> 0; 240 -> 255
    assert to_uint8_range(np.array([[40]], dtype=np.int16), window).item() == 127  # 127.5, truncated as np.uint8 does
    assert to_uint8_range(np.array([[0]], dtype=np.int16), window).item() == 102  # CT: 0 HU is not background


def test_ct_min_max_runs_over_the_clipped_volume():
    """pre_CT_MR.py scales by the clipped volume's own min and max: a CT that never reaches 240 HU
    gets its brightest voxel at 255."""
    array = np.array([[[-1000, 40, 140]]], dtype=np.int16)
    window = intensity_window(array)
    assert (window.minimum, window.maximum) == (-160.0, 140.0)
    assert to_uint8_range(array[0], window).tolist() == [[0, 170, 255]]


def test_mr_uses_percentiles_of_positive_voxels_and_keeps_zero():
    values = np.concatenate([np.zeros(500), np.arange(1, 1001)]).reshape(10, 150, 1)
    window = intensity_window(values)
    positive = np.arange(1, 1001)
    assert (window.lower, window.upper) == pytest.approx((np.percentile(positive, 0.5), np.percentile(positive, 99.5)))
    scaled = to_uint8_range(values[:, :, 0], window)
    assert scaled[values[:, :, 0] == 0].max() == 0 and scaled.max() == 255 and scaled.dtype == np.uint8


def test_medsam_preprocessing_is_three_channels_in_unit_range():
    slice_u8 = np.linspace(0, 255, 61 * 97).reshape(61, 97).astype(np.uint8)
    image = preprocess_medsam(slice_u8)
    assert image.shape == (1, 3, 1024, 1024) and image.dtype == torch.float32
    assert image.min() == 0 and image.max() == 1
    assert image[0, 0, 0, 0] < image[0, 0, -1, -1]  # no flips: top-left stays dark
    assert len(torch.unique(image)) <= 256  # a uint8 picture, min-max normalised


def test_sam_med2d_preprocessing_is_sam_normalisation_then_nearest_resize():
    slice_u8 = np.zeros((61, 97), dtype=np.uint8)
    slice_u8[0, 0] = 255
    image = preprocess_sam_med2d(slice_u8)
    assert image.shape == (1, 3, 256, 256)
    background = (torch.tensor([0.0, 0.0, 0.0]) - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    assert torch.allclose(image[0, :, -1, -1], background)
    bright = (255 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    assert torch.allclose(image[0, :, 0, 0], bright)  # nearest: the corner pixel is copied, not blurred


def test_box_from_clicks_grows_by_the_margin_and_excludes_negatives():
    positives = np.array([[20.0, 30.0], [40.0, 50.0]])
    box = box_from_clicks(positives, np.zeros((0, 2)), np.array([2.0, 2.0]))
    assert box.tolist() == [30.0, 50.0, 90.0, 110.0]  # (40..80, 60..100) grown by 10 px in the model frame
    pulled = box_from_clicks(positives, np.array([[44.0, 40.0]]), np.array([2.0, 2.0]))
    assert pulled[2] < 88 and pulled[:2].tolist() == [30.0, 50.0]  # the right side moved in past the negative


class StubPromptEncoder(nn.Module):
    def forward(self, points, boxes, masks):
        return (points[0] if points is not None else boxes), None

    def get_dense_pe(self):
        return None


class StubDecoder(nn.Module):
    """Positive inside the box, or within size/32 model pixels (8 at 256) of the first positive point."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, embedding, pe, sparse, dense, multimask):
        cells = self.size // 4
        y, x = torch.meshgrid((torch.arange(cells) + 0.5) * 4, (torch.arange(cells) + 0.5) * 4, indexing="ij")
        if sparse.shape[-1] == 4:
            x0, y0, x1, y1 = sparse[0]
            inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        else:
            px, py = sparse[0, 0]
            inside = (x - px) ** 2 + (y - py) ** 2 <= (self.size / 32) ** 2
        logits = torch.where(inside, 10.0, -10.0)[None, None]
        if multimask:  # the best (middle) mask is the real one
            return torch.cat([-logits, logits, -logits], 1), torch.tensor([[0.1, 0.9, 0.2]])
        return logits, torch.tensor([[0.9]])


def stub_model(spec):
    model = nn.Module()
    model.image_encoder = lambda image: torch.zeros(1)
    model.prompt_encoder = StubPromptEncoder()
    model.mask_decoder = StubDecoder(spec.input_size[0])
    return model


def stub_segmenter(name, model=None):
    spec = get_spec(name)
    return SliceSegmenter(spec, predictor=SamPredictor2D(model or stub_model(spec), spec.preprocess))


def request(foreground=(), background=(), client="user", **options) -> ClickRequest:
    return ClickRequest(foreground=tuple(map(tuple, foreground)), background=tuple(map(tuple, background)), client=client,
                        **options)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    path = tmp_path_factory.mktemp("slices") / "volume.nii.gz"
    affine = np.diag([-0.8, -0.8, 3.0, 1.0])
    array = np.random.default_rng(0).integers(-200, 300, (COLUMNS, ROWS, SLICES)).astype(np.int16)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


@pytest.mark.parametrize("name", ["sam_med2d", "medsam", "medsam_point"])
def test_mask_lands_on_the_clicked_slice_at_the_clicked_pixels(volume, name):
    engine = stub_segmenter(name)
    click = (70, 20, 4)
    # MedSAM is driven by a box: two positive clicks span it (one click gives a box of ~2 pixels here)
    clicks = [(62, 14, 4), (78, 26, 4)] if name == "medsam" else [click]
    result = engine.segment(volume, request(clicks, slice_index=4))
    assert result.mask.shape == (COLUMNS, ROWS, SLICES)
    assert result.mask[:, :, :4].sum() == 0 and result.mask[:, :, 5:].sum() == 0
    columns, rows = np.nonzero(result.mask[:, :, 4])
    assert result.mask[click] == 1
    assert abs(columns.mean() - click[0]) <= 1.0 and abs(rows.mean() - click[1]) <= 1.0  # centred on the click


def test_ohif_clicks_without_slice_use_their_slice(volume):
    engine = stub_segmenter("sam_med2d")
    result = engine.segment(volume, request([(30, 40, 7)], [(10, 10, 7)], "ohif"))
    assert result.info["slice"] == 7 and result.mask[30, 40, 7] == 1 and result.mask[:, :, :7].sum() == 0


def test_medsam_box_from_slicer_roi(volume):
    engine = stub_segmenter("medsam")
    result = engine.segment(volume, request(slice_index=2, roi=(60, 20, 10, 50, 2, 2)))  # corners not sorted
    columns, rows = np.nonzero(result.mask[:, :, 2])
    assert columns.min() >= 19 and columns.max() <= 61 and rows.min() >= 9 and rows.max() <= 51
    assert result.mask[40, 30, 2] == 1


def test_second_click_on_a_slice_reuses_its_embedding(volume):
    engine = stub_segmenter("sam_med2d")
    engine.segment(volume, request([(30, 40, 7)]))
    again = engine.segment(volume, request([(30, 40, 7), (35, 41, 7)]))
    assert again.info["embedding_reused"] and engine.encoder_runs == 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(foreground=[(30, 40, 7), (30, 40, 6)], background=[]), "one slice"),
    (dict(foreground=[], background=[]), "at least one foreground"),
    (dict(foreground=[(30, 40, 7)], background=[], slice_index=3), "do not all lie on slice 3"),
    (dict(foreground=[(30, 40, 7)], background=[], slice_index=99), "outside the image"),
])
def test_bad_slice_requests(volume, kwargs, message):
    with pytest.raises(InputError, match=message):
        stub_segmenter("sam_med2d").segment(volume, request(**kwargs))


def test_empty_box_is_refused(volume):
    with pytest.raises(InputError, match="empty"):
        stub_segmenter("medsam").segment(volume, request(slice_index=2, roi=(20, 20, 10, 50, 2, 2)))


class BrightRegionDouble(nn.Module):
    """A test double for the whole network: the 'embedding' is the preprocessed slice pooled to the
    low-res grid, and the decoder marks its bright region. It tests propagation, not the model."""

    def __init__(self):
        super().__init__()
        self.image_encoder = lambda image: F.avg_pool2d(image[:, :1], 4)
        self.prompt_encoder = StubPromptEncoder()
        self.mask_decoder = lambda embedding, pe, sparse, dense, multimask: (
            torch.where(embedding > 0, 10.0, -10.0).repeat(1, 3 if multimask else 1, 1, 1),
            torch.tensor([[0.1, 0.9, 0.2]])[:, :3 if multimask else 1])


def ellipsoid_volume(path):
    i, j, k = np.meshgrid(np.arange(64), np.arange(56), np.arange(40), indexing="ij")
    truth = ((i - 32) / 20.0) ** 2 + ((j - 28) / 15.0) ** 2 + ((k - 20) / 10.0) ** 2 <= 1
    other = ((i - 8) ** 2 + (j - 8) ** 2 + (k - 36) ** 2) <= 9  # a separate structure further along
    nib.save(nib.Nifti1Image(np.where(truth | other, 200, 0).astype(np.int16), np.diag([0.9, 0.9, 2.0, 1.0])), str(path))
    return truth


def propagate(engine, path, click_request, seconds=60.0):
    return ClickResult.from_data(engine.post(engine.propagate(path, click_request, seconds)))


def test_propagation_recovers_the_structure_from_one_slice(tmp_path):
    from scipy import ndimage

    truth = ellipsoid_volume(tmp_path / "ellipsoid.nii.gz")
    engine = stub_segmenter("sam_med2d", BrightRegionDouble())
    result = propagate(engine, str(tmp_path / "ellipsoid.nii.gz"), request([(32, 28, 20)]))
    mask = result.mask.astype(bool)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice >= 0.9, dice
    assert ndimage.label(mask)[1] == 1  # one connected structure: the other blob is not reached
    assert result.info["stopped"] == "structure ended" and result.info["slices"][0] >= 10 and result.info["slices"][1] <= 30


def test_propagation_is_bounded_in_time(tmp_path):
    ellipsoid_volume(tmp_path / "ellipsoid.nii.gz")
    engine = stub_segmenter("medsam", BrightRegionDouble())
    result = propagate(engine, str(tmp_path / "ellipsoid.nii.gz"), request([(20, 20, 20), (44, 36, 20)]), seconds=0)
    assert result.info["stopped"] == "time limit of 0 s"
    assert result.mask[:, :, 20].any() and not np.delete(result.mask, 20, axis=2).any()


def test_opening_an_image_encodes_its_middle_slice_only_where_that_is_cheap(volume, tmp_path):
    engine = stub_segmenter("sam_med2d")
    assert engine.prefetch_slice(volume) is None  # no encoding measured yet on the CPU: not known to be cheap
    engine.segment(volume, request([(30, 40, 1)]))  # measures one (the stub encoder: instant)
    assert engine.prefetch_slice(volume) == f"sam_med2d slice {SLICES // 2} encoded" and engine.encoder_runs == 2
    first = engine.segment(volume, request([(30, 40, SLICES // 2)], client="opened"))
    assert first.info["embedding_reused"] and engine.encoder_runs == 2  # the first click there finds it encoded
    assert engine.prefetch_slice(volume) is None  # already encoded: nothing to do
    engine.encode_seconds = 8.0  # MedSAM's 1024^2 encoder on a CPU: a click arriving meanwhile would wait
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((COLUMNS, ROWS, SLICES), np.int16), np.eye(4)), str(other))
    assert engine.prefetch_slice(str(other)) is None and engine.encoder_runs == 2
