from typing import Type

import torch
from torch import nn


class MLPBlock(nn.Module):
    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis (dim 1) of a (B, C, *spatial) tensor: SAM's LayerNorm2d/3d."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        shape = (-1,) + (1,) * (x.ndim - 2)
        return self.weight.reshape(shape) * x + self.bias.reshape(shape)


def _conv(spatial_dims: int):
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def mask_downscaling(spatial_dims: int, mask_in_chans: int, embed_dim: int) -> nn.Sequential:
    """The prompt encoder's mask path: two stride-2 convs (x4 smaller), then to the embedding width."""
    conv = _conv(spatial_dims)
    return nn.Sequential(
        conv(1, mask_in_chans // 4, kernel_size=2, stride=2),
        ChannelLayerNorm(mask_in_chans // 4),
        nn.GELU(),
        conv(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
        ChannelLayerNorm(mask_in_chans),
        nn.GELU(),
        conv(mask_in_chans, embed_dim, kernel_size=1),
    )


def neck(spatial_dims: int, embed_dim: int, out_chans: int) -> nn.Sequential:
    """The image encoder's neck: 1x1 conv to the prompt width, 3x3 conv, channel LayerNorms."""
    conv = _conv(spatial_dims)
    return nn.Sequential(
        conv(embed_dim, out_chans, kernel_size=1, bias=False),
        ChannelLayerNorm(out_chans),
        conv(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        ChannelLayerNorm(out_chans),
    )
