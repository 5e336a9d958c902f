"""The user-facing 3D predictor: encode a 128^3 volume once, then decode clicks many times.

As segment-anything's SamPredictor: `predict` takes and returns numpy arrays on the host and is
the one device boundary (samlabel.device); `predict_torch` stays on the model's device.
"""

from typing import Optional, Tuple

import numpy as np
import torch

from .device import autocast, model_device, to_device, to_host
from .modeling import Sam


def normalise_intensity(window_volume: torch.Tensor) -> torch.Tensor:
    """The official ZNormalization(masking_method=x > 0) on the window: mean and (unbiased) std
    of voxels > 0 applied to every voxel. Windows without such voxels use all voxels."""
    foreground = window_volume[window_volume > 0]
    values = foreground if foreground.numel() > 1 else window_volume.reshape(-1)
    std = values.std()
    return (window_volume - values.mean()) / (std if std > 0 else 1.0)


class SamPredictor3D:
    def __init__(self, model: Sam, dtype: torch.dtype = torch.float32) -> None:
        self.model, self.dtype = model, dtype
        self.image_embedding: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def input_size(self) -> int:
        return self.model.image_encoder.img_size

    @torch.inference_mode()
    def set_volume(self, volume) -> torch.Tensor:
        """Encode a normalised volume of the model's input size, (D, H, W) or (1, 1, D, H, W)."""
        size = (self.input_size,) * 3
        volume = torch.as_tensor(volume)
        volume = volume.reshape(1, 1, *volume.shape[-3:])
        if tuple(volume.shape[-3:]) != size:
            raise ValueError(f"the model takes a {size} volume, got {tuple(volume.shape[-3:])}")
        with autocast(self.device, self.dtype):
            self.image_embedding = self.model.image_encoder(volume.to(self.device, torch.float32))
        return self.image_embedding

    def set_embedding(self, embedding: torch.Tensor) -> None:
        """Reuse an embedding computed earlier for the same volume (e.g. from a cache)."""
        self.image_embedding = embedding

    def predict(self, points: np.ndarray, labels: np.ndarray, mask_input: Optional[np.ndarray] = None,
                multimask_output: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """predict_torch on host arrays: (low-res logits (B, M, 32, 32, 32), IoU (B, M)), float32 numpy."""
        mask_input = None if mask_input is None else to_device(mask_input, self.device)
        return to_host(*self.predict_torch(to_device(points, self.device), to_device(labels, self.device, np.int64),
                                           mask_input, multimask_output))

    @torch.inference_mode()
    def predict_torch(self, points: torch.Tensor, labels: torch.Tensor, mask_input: Optional[torch.Tensor] = None,
                      multimask_output: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Clicks -> (low-res logits (B, M, 32, 32, 32), IoU predictions (B, M)), on the device.

        points: (N, 3) or (B, N, 3) voxel indices in the axis order of the volume given to
        set_volume; labels: (N,) or (B, N), 1 positive, 0 negative; mask_input: previous
        low-res logits (B, 1, 32, 32, 32). A batch B of prompt sets shares the one embedding."""
        if self.image_embedding is None:
            raise RuntimeError("set_volume (or set_embedding) must come before predict")
        if points.ndim == 2:
            points, labels = points[None], labels[None]
        if points.shape[-1] != 3 or points.shape[:2] != labels.shape:
            raise ValueError(f"points must be (B, N, 3) with labels (B, N), got {tuple(points.shape)} and {tuple(labels.shape)}")
        with autocast(self.device, self.dtype):
            sparse, dense = self.model.prompt_encoder((points.float(), labels), mask_input)
            return self.model.mask_decoder(self.image_embedding, self.model.prompt_encoder.get_dense_pe(),
                                           sparse, dense, multimask_output)
