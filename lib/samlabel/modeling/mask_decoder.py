"""SAM mask decoder for 2D and 3D: two-way transformer, 4 mask tokens, low-res logits at 4x the
embedding grid (3D: 8^3 -> 32^3; MedSAM 64^2 -> 256^2; SAM-Med2D 16^2 -> 64^2)."""

from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .common import ChannelLayerNorm
from .transformer import TwoWayTransformer


UPSCALING_CHUNK_ELEMENTS = 2 ** 21  # floats of upscaled features held at once (8 MB)


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

        One image embedding (batch 1) serves a whole batch of B prompt sets, and so does one dense
        prompt embedding of batch 1 (the ensemble members' shared mask prompt): what depends only
        on them is computed once."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        hs, src = self.transformer(image_embeddings + dense_prompt_embeddings, image_pe, tokens)

        selected = range(1, self.num_mask_tokens) if multimask_output else range(1)
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in selected], 1)
        masks = self.upscaled_masks(src.expand(batch, -1, -1), image_embeddings.shape[2:], hyper_in)
        iou_pred = self.iou_prediction_head(hs[:, 0])
        return masks, iou_pred[:, 1:] if multimask_output else iou_pred[:, :1]

    def upscaled_masks(self, src: torch.Tensor, grid: Tuple[int, ...], hyper_in: torch.Tensor) -> torch.Tensor:
        """output_upscaling, then each mask token's hypernetwork weights dotted with the upscaled
        features: src (B, N, C) image tokens, hyper_in (B, M, C/8) -> (B, M, *4 x grid).

        The transposed convolutions have kernel = stride = 2, so each embedding cell becomes its
        own 2^d block: a matrix product per cell. Computed so, in channels-last order, the
        LayerNorm and GELUs run on contiguous channels and nothing of width C/4 or C/8 is ever
        transposed; only the final logits are put in grid order. The same maths as the
        nn.Sequential, in another summation order."""
        up1, norm, act1, up2, act2 = self.output_upscaling
        batch, cells, dims = src.shape[0], src.shape[1], len(grid)

        def as_linear(conv: nn.Module):  # weight (2^d * C_out, C_in) and bias of the map C_in -> (2^d, C_out)
            weight = conv.weight.flatten(2).permute(2, 1, 0)  # (2^d, C_out, C_in)
            return weight.flatten(0, 1).contiguous(), conv.bias.repeat(len(weight)), weight.shape[:2]

        linear1, linear2 = as_linear(up1), as_linear(up2)

        def masks_of(src: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:  # (b, N * 4^d, M)
            x = F.linear(src, *linear1[:2]).unflatten(-1, linear1[2])  # (b, N, 2^d, C/4)
            x = act1(F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps))
            x = act2(F.linear(x, *linear2[:2]).unflatten(-1, linear2[2]))  # (b, N, 2^d, 2^d, C/8)
            return x.reshape(len(x), -1, x.shape[-1]) @ hyper_in.transpose(1, 2)

        # In chunks of prompt sets whose widest features stay within a few MB: a batch of
        # ensemble members at once would stream hundreds of MB through memory (1.7x slower).
        per_set = cells * 4 ** dims * up2.weight.shape[1]
        step = max(1, UPSCALING_CHUNK_ELEMENTS // per_set)
        masks = torch.cat([masks_of(src[i:i + step], hyper_in[i:i + step]) for i in range(0, batch, step)])
        # (B, *grid, *first block, *second block, M) -> (B, M, g0, a0, b0, g1, a1, b1, ...)
        masks = masks.reshape(batch, *grid, *(2,) * (2 * dims), -1)
        order = [0, 3 * dims + 1] + [axis for i in range(dims) for axis in (1 + i, 1 + dims + i, 1 + 2 * dims + i)]
        return masks.permute(order).reshape(batch, -1, *(4 * n for n in grid))
