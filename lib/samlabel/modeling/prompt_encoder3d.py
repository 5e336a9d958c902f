"""3D prompt encoder: clicks (and a previous low-res mask) to sparse and dense embeddings.

Official quirks kept: the Fourier features are [sin, cos, sin]; the dense PE's channel 0 runs
along grid axis 1 and channel 1 along axis 0 (points use plain axis order); there are only
two point embeddings (negative, positive), so box prompts do not exist.
"""

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .common import mask_downscaling


class PositionEmbeddingRandom3D(nn.Module):
    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        # Random at training time, so it is stored in (and must be loaded from) the checkpoint.
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Coordinates in [0, 1] to Fourier features."""
        projected = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([projected.sin(), projected.cos(), projected.sin()], dim=-1)

    def forward(self, size: Tuple[int, int, int]) -> torch.Tensor:
        """Dense encoding of a grid, (C, X, Y, Z)."""
        device = self.positional_encoding_gaussian_matrix.device
        centres = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) for n in size]
        a0, a1, a2 = torch.meshgrid(*centres, indexing="ij")
        # Official channel order: (axis-1 index / size[0], axis-0 index / size[1], axis 2 / size[2]).
        coords = torch.stack([a1 / size[0], a0 / size[1], a2 / size[2]], dim=-1)
        return self._encode(coords).permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Tuple[int, int, int]) -> torch.Tensor:
        """Points in voxel units of the model input, (B, N, 3) -> (B, N, C)."""
        return self._encode(coords.float() / torch.tensor(image_size, device=coords.device, dtype=torch.float32))


class PromptEncoder3D(nn.Module):
    def __init__(self, embed_dim: int, image_embedding_size: Tuple[int, int, int],
                 input_image_size: Tuple[int, int, int], mask_in_chans: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))  # negative, positive
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = mask_downscaling(3, mask_in_chans, embed_dim)
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Points (B, N, 3) with labels (B, N): 1 positive, 0 negative, -1 padding.
        One padding point is appended, as in the official encoder when there is no box."""
        points = torch.cat([points.float() + 0.5, torch.zeros_like(points[:, :1], dtype=torch.float32)], dim=1)
        labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        is_pad = (labels == -1)[..., None]
        embedding = torch.where(is_pad, self.not_a_point_embed.weight, embedding)
        embedding = embedding + (labels == 0)[..., None] * self.point_embeddings[0].weight
        return embedding + (labels == 1)[..., None] * self.point_embeddings[1].weight

    def forward(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]], masks: Optional[torch.Tensor]):
        """Returns (sparse (B, N+1, C), dense (B, C, X, Y, Z)). masks: (B, 1, 32, 32, 32) logits."""
        if points is not None:
            batch = points[0].shape[0]
            sparse = self.embed_points(*points)
        else:
            batch = masks.shape[0] if masks is not None else 1
            sparse = self.no_mask_embed.weight.new_empty((batch, 0, self.embed_dim))
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        return sparse, dense
