"""The user-facing 2D predictor for SAM ViT-B models (MedSAM, SAM-Med2D): a slice's official
preprocessing, its encoding, and prompt decoding (points, a box, a previous mask).

As segment-anything's SamPredictor: `predict` takes and returns numpy arrays on the host and is
the one device boundary (samlabel.device); `predict_torch` stays on the model's device.

A slice is the stored array's third axis at index k; in the model frame x is the first array
axis (i, the column) and y the second (j, the row), so the slice image is array[:, :, k].T.

The input side follows the official code to the grey level (tests/test_official_2d_pipeline.py
compares it with outputs of the official code, tests/data/README.md):

* the volume to uint8 as MedSAM's pre_CT_MR.py: clip to the CT window or the MR percentiles,
  min-max of the clipped volume to 0-255 in the dtype numpy gives that arithmetic, truncation
  (np.uint8); SAM-Med2D reads such uint8 images (its predictor starts from a uint8 picture);
* MedSAM (MedSAM_Inference.py, gui.py): skimage.transform.resize of the 3-channel uint8 slice to
  1024^2 (order 3, preserve_range, anti_aliasing), truncated to uint8, min-max to [0, 1];
* SAM-Med2D (SammedPredictor.set_image): SAM's pixel mean/std on the uint8 slice, then a
  nearest resize to 256^2 (OpenCV's INTER_NEAREST picks the same pixels as torch's "nearest").
"""

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .modeling import Sam
from .device import autocast, model_device, to_device, to_host

SAM_PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53])
SAM_PIXEL_STD = torch.tensor([58.395, 57.12, 57.375])
CT_WINDOW = (-160.0, 240.0)  # level 40, width 400


@dataclass(frozen=True)
class IntensityWindow:
    """How a volume maps to 0-255: clipped to [lower, upper], then (x - minimum) / (maximum -
    minimum) * 255, where minimum and maximum are those of the clipped volume (numpy scalars of
    the clipped volume's dtype, so that the arithmetic runs in the dtype the official code's
    does). keep_zero: voxels that are 0 stay 0 (MR)."""

    lower: float
    upper: float
    minimum: np.generic
    maximum: np.generic
    keep_zero: bool


def intensity_window(array: np.ndarray) -> IntensityWindow:
    """MedSAM's mapping of a volume to 0-255 (pre_CT_MR.py): CT (any value <= -500) the window
    level 40 / width 400; other modalities the 0.5 and 99.5 percentiles of the voxels > 0, with
    background (0) kept at 0. Degenerate volumes (no voxel > 0, a constant one) use their full
    range instead, where the official code would divide by zero."""
    if array.min() <= -500:
        lower, upper, keep_zero = CT_WINDOW[0], CT_WINDOW[1], False
    else:
        positive = array[array > 0]
        if positive.size == 0:
            return _full_range(array)
        lower, upper = np.percentile(positive, 0.5), np.percentile(positive, 99.5)
        keep_zero = True
    # The clipped volume's extremes, in the dtype np.clip gives the whole volume.
    minimum, maximum = np.clip(np.array([array.min(), array.max()]), lower, upper)
    if not maximum > minimum:
        return _full_range(array)
    return IntensityWindow(lower, upper, minimum, maximum, keep_zero)


def _full_range(array: np.ndarray) -> IntensityWindow:
    low, high = np.array([min(0, array.min()), array.max()], dtype=np.float64)
    return IntensityWindow(float(low), float(max(high, low + 1.0)), low, max(high, low + 1.0), keep_zero=False)


def to_uint8_range(slice_2d: np.ndarray, window: IntensityWindow) -> np.ndarray:
    """The slice mapped to 0-255 through the window and truncated to uint8, as np.uint8 does in
    the official code (127.9 -> 127)."""
    clipped = np.clip(slice_2d, window.lower, window.upper)
    scaled = (clipped - window.minimum) / (window.maximum - window.minimum) * 255.0
    if window.keep_zero:  # MR: background stays 0
        scaled[slice_2d == 0] = 0
    return scaled.astype(np.uint8)


def skimage_resize(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """skimage.transform.resize(image, size, order=3, preserve_range=True, anti_aliasing=True)
    (mode "reflect", clip=True) as scikit-image (0.19 and later) computes it, on scipy.ndimage:
    integers to float64, a Gaussian of sigma max(0, (factor - 1) / 2) per axis (only where it
    shrinks), a cubic spline zoom on the pixel grid ("mirror" edges), clipped to the input's range.
    Trailing axes (channels) are kept, and take part in the spline as they do there."""
    if image.dtype.char not in "fd":
        image = image.astype(np.float64)
    output_shape = tuple(size) + image.shape[len(size):]
    factors = np.divide(image.shape, output_shape)
    filtered = ndimage.gaussian_filter(image, np.maximum(0, (factors - 1) / 2), cval=0, mode="mirror")
    resized = ndimage.zoom(filtered, [1 / f for f in factors], order=3, mode="mirror", cval=0, grid_mode=True)
    return np.clip(resized, image.min(), image.max(), out=resized)


def preprocess_medsam(slice_u8: np.ndarray) -> torch.Tensor:
    """MedSAM's inference preprocessing of a uint8 slice (rows, columns): the grey slice as 3
    channels, skimage's order-3 resize to 1024^2 (skimage_resize), truncated to uint8, then
    min-max to [0, 1] in float64; a float32 (1, 3, 1024, 1024) tensor."""
    image_3c = np.repeat(np.asarray(slice_u8, dtype=np.uint8)[:, :, None], 3, axis=-1)
    resized = skimage_resize(image_3c, (1024, 1024)).astype(np.uint8)
    normalised = (resized - resized.min()) / np.clip(resized.max() - resized.min(), a_min=1e-8, a_max=None)
    return torch.from_numpy(normalised.astype(np.float32)).permute(2, 0, 1)[None].contiguous()


def preprocess_sam_med2d(slice_u8: np.ndarray) -> torch.Tensor:
    """SAM-Med2D's SammedPredictor.set_image on a uint8 slice (rows, columns): SAM's per-channel
    mean/std in float32, then a nearest resize to 256^2; a float32 (1, 3, 256, 256) tensor."""
    image = torch.from_numpy(np.ascontiguousarray(slice_u8, dtype=np.uint8)).float()
    normalised = (image[None] - SAM_PIXEL_MEAN[:, None, None]) / SAM_PIXEL_STD[:, None, None]
    return F.interpolate(normalised[None], size=(256, 256), mode="nearest")


def as_uint8_slice(slice_255: np.ndarray) -> np.ndarray:
    """A 0-255 slice as uint8: uint8 stays as it is, other values are clipped and truncated."""
    slice_255 = np.asarray(slice_255)
    return slice_255 if slice_255.dtype == np.uint8 else np.clip(slice_255, 0, 255).astype(np.uint8)


class SamPredictor2D:
    def __init__(self, model: Sam, preprocess: Callable[[np.ndarray], torch.Tensor],
                 dtype: torch.dtype = torch.float32) -> None:
        self.model, self.preprocess, self.dtype = model, preprocess, dtype
        self.image_embedding: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @torch.inference_mode()
    def set_image(self, slice_255: np.ndarray) -> torch.Tensor:
        """Encode a slice (rows, columns) already mapped to 0-255 (to_uint8_range: uint8; other
        dtypes are clipped to 0-255 and truncated)."""
        image = self.preprocess(as_uint8_slice(slice_255))
        with autocast(self.device, self.dtype):
            self.image_embedding = self.model.image_encoder(image.to(self.device))
        return self.image_embedding

    def set_embedding(self, embedding: torch.Tensor) -> None:
        self.image_embedding = embedding

    def predict(self, points: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
                boxes: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None,
                multimask_output: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """predict_torch on host arrays: (low-res logits (B, M, L, L), IoU (B, M)), float32 numpy."""
        def device_tensor(array, dtype):
            return None if array is None else to_device(array, self.device, dtype)

        return to_host(*self.predict_torch(device_tensor(points, np.float32), device_tensor(labels, np.int64),
                                           device_tensor(boxes, np.float32), device_tensor(mask_input, np.float32),
                                           multimask_output))

    @torch.inference_mode()
    def predict_torch(self, points: Optional[torch.Tensor], labels: Optional[torch.Tensor], boxes: Optional[torch.Tensor],
                      mask_input: Optional[torch.Tensor], multimask_output: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the model frame -> (low-res logits (B, M, L, L), IoU (B, M)). points (B, P, 2)
        as (x, y) with labels (B, P); boxes (B, 4) as x0, y0, x1, y1; mask_input (B, 1, L, L)."""
        if self.image_embedding is None:
            raise RuntimeError("set_image (or set_embedding) must come before predict")
        with autocast(self.device, self.dtype):
            sparse, dense = self.model.prompt_encoder(None if points is None else (points, labels), boxes, mask_input)
            return self.model.mask_decoder(self.image_embedding, self.model.prompt_encoder.get_dense_pe(),
                                           sparse, dense, multimask_output)
