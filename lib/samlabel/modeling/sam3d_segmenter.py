"""SAM3D (Bui et al., ISBI 2024): automatic multi-class 3D segmentation from a frozen 2D SAM encoder.

Every axial slice of every modality goes through SAM's ViT image encoder on its own (repeated to
3 channels, no pixel normalisation: the encoder sees the nnU-Net-normalised values); the features
are stacked along depth, concatenated over modalities, and a 3D decoder (sam3d_decoder) turns them
into logits. encode and decode are separate so that callers can cache features: the encoder costs
about 15x the decoder.

Unlike the official forward, which rebuilds SAM and reloads its checkpoint on every call, the
encoder is built and loaded once.
"""

from typing import List, Union

import torch
from torch import nn

from .image_encoder import ImageEncoderViT
from .sam3d_decoder import Sam3DDecoder

PATCH = 16  # SAM's ViT patch size: features are at 1/16 of the slice size


class SAM3DSegmenter(nn.Module):
    def __init__(self, image_encoder: ImageEncoderViT, decoder: Sam3DDecoder, slices_per_batch: int = 32) -> None:
        super().__init__()
        self.image_encoder = image_encoder.requires_grad_(False)  # frozen, as in the official training
        self.decoder = decoder
        self.slices_per_batch = slices_per_batch  # slices encoded at once: bounds the encoder's memory

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, M, D, H, W), H = W = the encoder's img_size -> features (B, 256*M, D, H/16, W/16),
        modality-major along channels (modality m's features are channels 256m .. 256m+255)."""
        b, m, d, h, w = x.shape
        size = self.image_encoder.img_size
        if (h, w) != (size, size):
            raise ValueError(f"SAM3D's encoder takes {size}x{size} slices, got {h}x{w}")
        slices = x.reshape(b * m * d, 1, h, w).expand(-1, 3, -1, -1)  # each slice as a 3-channel picture
        features = torch.cat([self.image_encoder(batch) for batch in slices.split(self.slices_per_batch)])
        features = features.reshape(b, m, d, *features.shape[1:])  # (B, M, D, 256, h', w')
        return features.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, d, *features.shape[-2:])

    def decode(self, features: torch.Tensor, deep_supervision: bool = False) -> Union[torch.Tensor, List[torch.Tensor]]:
        """features (B, 256*M, D, h, w) -> logits (B, C, D, 16h, 16w), or with deep_supervision the list
        [full, 1/2, 1/4 in-plane resolution] (training)."""
        return self.decoder(features, deep_supervision)

    def forward(self, x: torch.Tensor, deep_supervision: bool = False) -> Union[torch.Tensor, List[torch.Tensor]]:
        return self.decode(self.encode(x), deep_supervision)
