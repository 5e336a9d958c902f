"""The user-facing 2D predictor for SAM ViT-B models (MedSAM, SAM-Med2D): a slice's official
preprocessing, its encoding, and prompt decoding (points, a box, a previous mask).

As segment-anything's SamPredictor: `predict` takes and returns numpy arrays on the host and is
the one device boundary (samlabel.device); `predict_torch` stays on the model's device.

A slice is the stored array's third axis at index k; in the model frame x is the first array
axis (i, the column) and y the second (j, the row), so the slice image is array[:, :, k].T.
"""

from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .modeling import Sam
from .device import autocast, model_device, to_device, to_host

SAM_PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53])
SAM_PIXEL_STD = torch.tensor([58.395, 57.12, 57.375])
CT_WINDOW = (-160.0, 240.0)  # level 40, width 400


def intensity_window(array: np.ndarray) -> Tuple[float, float]:
    """MedSAM's mapping of a volume to 0-255: CT (any value <= -500) window level 40 / width 400;
    other modalities the 0.5-99.5 percentiles of the non-zero voxels."""
    if array.min() <= -500:
        return CT_WINDOW
    nonzero = array[array != 0]
    if nonzero.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(nonzero, [0.5, 99.5])
    if high - low < 1e-6:  # (nearly) constant non-zero values: the full range instead
        low, high = min(0.0, float(array.min())), float(array.max())
    return float(low), float(max(high, low + 1e-6))


def to_uint8_range(slice_2d: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """The slice clipped to the window and scaled to 0-255 (float32); outside CT, background stays 0."""
    low, high = window
    scaled = (np.clip(slice_2d.astype(np.float32), low, high) - low) / (high - low) * 255.0
    if window != CT_WINDOW:  # MR: background stays 0
        scaled[slice_2d == 0] = 0
    return scaled


def preprocess_medsam(slice_255: torch.Tensor) -> torch.Tensor:
    """3 channels, bicubic resize to 1024^2 (official: skimage order-3 with anti-aliasing), uint8,
    then min-max to [0, 1]."""
    resized = F.interpolate(slice_255[None, None], size=(1024, 1024), mode="bicubic", antialias=True, align_corners=False)
    resized = resized.clamp(0, 255).round()
    resized = (resized - resized.min()) / (resized.max() - resized.min()).clamp(min=1e-8)
    return resized.expand(1, 3, -1, -1).contiguous()


def preprocess_sam_med2d(slice_255: torch.Tensor) -> torch.Tensor:
    """SAM's per-channel mean/std on the 0-255 image, then a nearest resize to 256^2."""
    normalised = (slice_255[None] - SAM_PIXEL_MEAN[:, None, None]) / SAM_PIXEL_STD[:, None, None]
    return F.interpolate(normalised[None], size=(256, 256), mode="nearest")


class SamPredictor2D:
    def __init__(self, model: Sam, preprocess: Callable[[torch.Tensor], torch.Tensor],
                 dtype: torch.dtype = torch.float32) -> None:
        self.model, self.preprocess, self.dtype = model, preprocess, dtype
        self.image_embedding: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @torch.inference_mode()
    def set_image(self, slice_255: np.ndarray) -> torch.Tensor:
        """Encode a slice (rows, columns) already mapped to 0-255 (to_uint8_range)."""
        image = self.preprocess(torch.as_tensor(np.asarray(slice_255, dtype=np.float32)))
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
