"""The user-facing 3D predictor: encode a 128^3 volume once, then decode clicks many times."""

from typing import Optional, Tuple

import torch

from .modeling import Sam


class SamPredictor3D:
    def __init__(self, model: Sam) -> None:
        self.model = model
        self.image_embedding: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def set_volume(self, volume: torch.Tensor) -> torch.Tensor:
        """Encode a normalised volume of the model's input size, (D, H, W) or (1, 1, D, H, W)."""
        size = (self.model.image_encoder.img_size,) * 3
        volume = volume.reshape(1, 1, *volume.shape[-3:])
        if tuple(volume.shape[-3:]) != size:
            raise ValueError(f"the model takes a {size} volume, got {tuple(volume.shape[-3:])}")
        dtype = next(self.model.parameters()).dtype
        self.image_embedding = self.model.image_encoder(volume.to(self.device, dtype))
        return self.image_embedding

    def set_embedding(self, embedding: torch.Tensor) -> None:
        """Reuse an embedding computed earlier for the same volume (e.g. from a cache)."""
        self.image_embedding = embedding

    @torch.inference_mode()
    def predict(
        self,
        points: torch.Tensor,
        labels: torch.Tensor,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Clicks -> (low-res logits (B, M, 32, 32, 32), IoU predictions (B, M)).

        points: (N, 3) or (B, N, 3) voxel indices in the axis order of the volume given to
        set_volume; labels: (N,) or (B, N), 1 positive, 0 negative; mask_input: previous
        low-res logits (B, 1, 32, 32, 32). A batch B of prompt sets shares the one embedding."""
        if self.image_embedding is None:
            raise RuntimeError("set_volume (or set_embedding) must come before predict")
        points = torch.as_tensor(points, dtype=torch.float32, device=self.device)
        labels = torch.as_tensor(labels, dtype=torch.int64, device=self.device)
        if points.ndim == 2:
            points, labels = points[None], labels[None]
        if points.shape[-1] != 3 or points.shape[:2] != labels.shape:
            raise ValueError(f"points must be (B, N, 3) with labels (B, N), got {tuple(points.shape)} and {tuple(labels.shape)}")
        if mask_input is not None:
            mask_input = mask_input.to(self.device, self.image_embedding.dtype)
        prompt_encoder = self.model.prompt_encoder
        sparse, dense = prompt_encoder((points, labels), mask_input)
        return self.model.mask_decoder(
            self.image_embedding,
            prompt_encoder.get_dense_pe().to(self.image_embedding.dtype),
            sparse.to(self.image_embedding.dtype),
            dense.to(self.image_embedding.dtype),
            multimask_output,
        )
