"""The 2D models' input and mask against what the official code makes of the same slices and logits.

tests/data/reference/official2d.npz was written by scripts/make_reference_2d.py, which ran MedSAM's
pre_CT_MR.py and MedSAM_Inference.py and SAM-Med2D's SammedPredictor (commits in the file's
`source`; tests/data/README.md) on slices of the sample studies: the uint8 slices, the encoder
inputs, and the masks of seeded low-res logits (`designed_logits`, rebuilt here and checked by hash).
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import load_module
from samlabel.engine2d import SliceSegmenter, medsam_masks, sam_med2d_masks
from samlabel.images import load_image
from samlabel.predictor2d import SamPredictor2D, intensity_window, to_uint8_range
from samlabel.registry import get_spec
from samlabel.request import ClickRequest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = np.load(REPO / "tests" / "data" / "reference" / "official2d.npz")
SOURCE = json.loads(str(REFERENCE["source"]))
CASES = [case["name"] for case in SOURCE["cases"]]
CASE = {case["name"]: case for case in SOURCE["cases"]}
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


GENERATOR = load_module(REPO / "scripts" / "make_reference_2d.py")


def ref(case: str, key: str) -> np.ndarray:
    return REFERENCE[f"{case}/{key}"]


def official_mask(case: str, model: str) -> np.ndarray:
    rows, columns = ref(case, "slice_u8").shape
    return np.unpackbits(ref(case, f"{model}_mask_bits"), count=rows * columns).reshape(rows, columns).astype(bool)


def medsam_samples(case: str, image: np.ndarray) -> tuple:
    """(ours, official) at the stored pixels of MedSAM's (1, 3, 1024, 1024) input, as float32."""
    ours = image.reshape(3, -1)[:, ::SOURCE["medsam_sample_stride"]]
    samples = ref(case, "medsam_input_u8_samples")
    low, high = ref(case, "medsam_input_u8_range")
    official = (samples - low) / np.clip(high - low, a_min=1e-8, a_max=None)  # MedSAM_Inference.py's min-max
    return ours, official.astype(np.float32)


def is_official_medsam_input(case: str, image: np.ndarray) -> bool:
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest() == \
        str(ref(case, "medsam_input_sha256"))


def official_sam_med2d_input(case: str) -> np.ndarray:
    """SAM-Med2D's encoder input (1, 3, 256, 256) float32, from the uint8 pixels its resize picked."""
    image = np.repeat(ref(case, "sam_med2d_input_u8")[:, :, None], 3, axis=-1)
    return ((image - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1)[None]


def logits(case: str, model: str) -> torch.Tensor:
    channels, size = (1, GENERATOR.MEDSAM_LOW_RES) if model == "medsam" else (3, GENERATOR.SAM_MED2D_LOW_RES)
    maps = GENERATOR.designed_logits(CASE[case]["logits_seed"], channels, size)
    assert hashlib.sha256(maps.numpy().tobytes()).hexdigest() == str(ref(case, f"{model}_logits_sha256")), \
        "designed_logits no longer rebuilds the logits the reference was made with"
    return maps


def test_reference_names_the_official_commits():
    assert SOURCE["MedSAM"]["commit"].startswith("d71e8a1")
    assert SOURCE["SAM-Med2D"]["commit"].startswith("bfd2b93")
    shapes = {ref(case, "slice_u8").shape for case in CASES}
    assert all(rows != columns for rows, columns in shapes)  # non-square slices


@pytest.mark.parametrize("case", CASES)
def test_slice_to_uint8_is_pre_ct_mr(sample_studies_dir, case):
    """CT window / MR percentiles, min-max of the clipped volume, truncation: every pixel equal."""
    array = load_image(str(sample_studies_dir / CASE[case]["study"])).array
    ours = to_uint8_range(array[:, :, CASE[case]["slice"]].T, intensity_window(array))
    assert ours.dtype == np.uint8 and np.array_equal(ours, ref(case, "slice_u8"))


@pytest.mark.parametrize("name", ["medsam", "medsam_point"])
@pytest.mark.parametrize("case", CASES)
def test_medsam_encoder_input_is_the_official_one(case, name):
    """skimage's cubic resize (as MedSAM_Inference.py calls it), uint8, min-max: within 1/255 at the
    stored pixels, and the whole float32 tensor equal to the official one byte for byte."""
    ours = get_spec(name).preprocess(ref(case, "slice_u8")).numpy()
    assert ours.shape == (1, 3, 1024, 1024) and ours.dtype == np.float32
    sampled, official = medsam_samples(case, ours)
    difference = np.abs(sampled - official)
    assert difference.max() <= 1 / 255 + 1e-7, difference.max()
    assert np.array_equal(sampled, official), f"{(difference > 0).sum()} of {difference.size} stored values differ"
    assert is_official_medsam_input(case, ours)


@pytest.mark.parametrize("case", CASES)
def test_sam_med2d_encoder_input_is_the_official_one(case):
    ours = get_spec("sam_med2d").preprocess(ref(case, "slice_u8")).numpy()
    official = official_sam_med2d_input(case)
    assert ours.shape == official.shape == (1, 3, 256, 256) and ours.dtype == np.float32
    difference = np.abs(ours - official) * PIXEL_STD[None, :, None, None] / 255  # in the grey range's units
    assert difference.max() <= 1 / 255 + 1e-7, difference.max()
    assert np.array_equal(ours, official), f"{(difference > 0).sum()} values differ"


@pytest.mark.parametrize("name", ["medsam", "medsam_point"])
@pytest.mark.parametrize("case", CASES)
def test_medsam_mask_is_the_official_one(case, name):
    spec = get_spec(name)
    rows, columns = ref(case, "slice_u8").shape
    ours = spec.mask_postprocess(logits(case, "medsam")[0].numpy(), columns, rows, input_size=spec.input_size[0])
    assert ours.shape == (1, columns, rows) and np.array_equal(ours[0].T, official_mask(case, "medsam"))


@pytest.mark.parametrize("case", CASES)
def test_sam_med2d_mask_is_the_official_one(case):
    spec = get_spec("sam_med2d")
    rows, columns = ref(case, "slice_u8").shape
    maps = logits(case, "sam_med2d")
    chosen, _ = spec.prompt.decode(FixedDecoder(maps, ref(case, "sam_med2d_iou")), {"points": np.zeros((1, 1, 2)),
                                                                                    "labels": np.ones((1, 1))}, None)
    assert np.array_equal(chosen[0, 0], maps[0, int(ref(case, "sam_med2d_best"))].numpy())  # the best-IoU map
    ours = spec.mask_postprocess(chosen[:, 0], columns, rows, input_size=spec.input_size[0])
    assert np.array_equal(ours[0].T, official_mask(case, "sam_med2d"))


def test_the_two_mask_paths_differ_where_it_shows():
    """The reference tells the paths apart: SAM-Med2D's two resizes of the logits before the sigmoid
    are not MedSAM's one resize of the sigmoid (else the tests above could not see a swap)."""
    differing = 0
    for case in CASES:
        rows, columns = ref(case, "slice_u8").shape
        chosen = logits(case, "sam_med2d")[0, int(ref(case, "sam_med2d_best"))][None].numpy()
        differing += (medsam_masks(chosen, columns, rows, 256)[0].T != official_mask(case, "sam_med2d")).sum()
        assert np.array_equal(sam_med2d_masks(chosen, columns, rows, 256)[0].T, official_mask(case, "sam_med2d"))
    assert differing > 0


class FixedDecoder:
    """A predictor whose decoder answers fixed multimask logits and IoU scores."""

    def __init__(self, maps: torch.Tensor, iou: np.ndarray):
        self.maps, self.iou = maps.numpy(), np.asarray(iou, dtype=np.float32)[None]

    def predict(self, points=None, labels=None, boxes=None, mask_input=None, multimask_output=False):
        assert multimask_output
        return self.maps, self.iou


class RecordingModel(nn.Module):
    """The network as a test double: the encoder records its input, the decoder answers the
    reference's logits. It tests the engine's path from the stored volume to the mask."""

    def __init__(self, maps: torch.Tensor, iou):
        super().__init__()
        self.inputs, self.maps, self.iou = [], maps, torch.as_tensor(np.asarray(iou, dtype=np.float32))[None]
        self.prompt_encoder = PassPromptEncoder()

    def image_encoder(self, image):
        self.inputs.append(image.clone())
        return torch.zeros(1)

    def mask_decoder(self, embedding, pe, sparse, dense, multimask):
        return (self.maps, self.iou) if multimask else (self.maps[:, :1], self.iou[:, :1])


class PassPromptEncoder(nn.Module):
    def forward(self, points, boxes, masks):
        return None, None

    def get_dense_pe(self):
        return None


@pytest.mark.parametrize("name", ["medsam", "sam_med2d"])
@pytest.mark.parametrize("case", CASES)
def test_engine_click_gives_the_official_input_and_mask(sample_studies_dir, case, name):
    """A click on the stored volume: the encoder sees the official input, the slice gets the official mask."""
    spec = get_spec(name)
    model_key = "medsam" if name == "medsam" else "sam_med2d"
    maps = logits(case, model_key)
    model = RecordingModel(maps, ref(case, "sam_med2d_iou") if name == "sam_med2d" else [1.0])
    engine = SliceSegmenter(spec, predictor=SamPredictor2D(model, spec.preprocess))
    k, (x, y) = CASE[case]["slice"], CASE[case]["sam_med2d_point"]
    result = engine.segment(str(sample_studies_dir / CASE[case]["study"]),
                            ClickRequest(foreground=((x, y, k), (x + 10, y + 10, k)), client="official"))
    assert len(model.inputs) == 1
    recorded = model.inputs[0].numpy()
    if name == "medsam":
        assert is_official_medsam_input(case, recorded)
    else:
        assert np.array_equal(recorded, official_sam_med2d_input(case))
    assert np.array_equal(result.mask[:, :, k].T.astype(bool), official_mask(case, model_key))
    assert not np.delete(result.mask, k, axis=2).any()
