"""SAM mask decoder for 2D and 3D: two-way transformer, 4 mask tokens, low-res logits at 4x the
embedding grid (3D: 8^3 -> 32^3; MedSAM 64^2 -> 256^2; SAM-Med2D 16^2 -> 64^2)."""

from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .common import ChannelLayerNorm
from .transformer import TwoWayTransformer


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class MaskDecoder(nn.Module):
    def __init__(self, transformer_dim: int, spatial_dims: int = 3, num_multimask_outputs: int = 3, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256, transformer_depth: int = 2, transformer_heads: int = 8,
                 transformer_mlp_dim: int = 2048) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(transformer_depth, transformer_dim, transformer_heads, transformer_mlp_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        transposed_conv = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        self.output_upscaling = nn.Sequential(
            transposed_conv(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            ChannelLayerNorm(transformer_dim // 4),
            nn.GELU(),
            transposed_conv(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (low-res logits (B, M, *grid), IoU predictions (B, M)); M = 1 (token 0) or 3 (tokens 1-3).

        One image embedding serves a whole batch of prompts: it is repeated to the prompt batch."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        keep = (-1,) * (image_embeddings.ndim - 1)
        src = image_embeddings.expand(batch, *keep) if image_embeddings.shape[0] == 1 else image_embeddings
        src = src + dense_prompt_embeddings
        pos_src = image_pe.expand(batch, *keep)
        hs, src = self.transformer(src, pos_src, tokens)

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(batch, -1, *image_embeddings.shape[2:]))
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        masks = (hyper_in @ upscaled.flatten(2)).reshape(batch, -1, *upscaled.shape[2:])
        iou_pred = self.iou_prediction_head(hs[:, 0])
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]
