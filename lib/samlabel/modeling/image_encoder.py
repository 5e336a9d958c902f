"""2D ViT image encoder of SAM (MedSAM: ViT-B at 1024^2) and SAM-Med2D (256^2, with adapters).

Windowed blocks zero-pad the token grid to whole windows (MedSAM 64 -> 70, SAM-Med2D 16 -> 28)
and attend inside each window; padding tokens take part, as in the official code. The relative
positions are the standard decomposed ones (2D has no broadcasting quirk).
"""

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import FactoredBias, attention, gather_rel_pos
from .common import MLPBlock, neck

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, rel_pos_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        grid_q = q.reshape(b, self.num_heads, h, w, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, gather_rel_pos(self.rel_pos_h, h, h))  # q(y,x).Rh[y,k_y]
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, gather_rel_pos(self.rel_pos_w, w, w))  # q(y,x).Rw[x,k_x]
        bias = FactoredBias([rel_h.reshape(b, self.num_heads, h * w, h, 1), rel_w.reshape(b, self.num_heads, h * w, 1, w)], (h, w))
        out = attention(q, k, v, self.scale, bias)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


class Adapter(nn.Module):
    """SAM-Med2D's adapter: channel gate, a stride-2 conv / transposed-conv pair added back,
    then LayerNorm (eps 1e-5: the official layer uses nn.LayerNorm's default)."""

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.norm = nn.LayerNorm(dim)
        self.channel = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False), nn.Sigmoid())
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # B H W C -> B C H W
        gated = self.channel(x.mean((2, 3)))[:, :, None, None] * x
        return self.norm((x + self.spatial(gated)).permute(0, 2, 3, 1))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid_size: int, adapter: bool = False):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, window_size or grid_size)
        self.norm2 = LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size
        if adapter:
            self.Adapter = Adapter(dim)  # official capitalised name (checkpoint keys)
        else:
            self.Adapter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attend(self.norm1(x))
        normed = self.norm2(x)
        out = x + self.mlp(normed)
        return out + self.Adapter(normed) if self.Adapter is not None else out

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        if not self.window_size:
            return self.attn(x)
        b, h, w, c = x.shape
        s = self.window_size
        x = F.pad(x, (0, 0, 0, -w % s, 0, -h % s))
        hp, wp = x.shape[1:3]
        windows = x.reshape(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
        x = self.attn(windows).reshape(b, hp // s, wp // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return x[:, :h, :w]


class ImageEncoderViT(nn.Module):
    def __init__(self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, out_chans: int = 256, window_size: int = 14,
                 global_attn_indexes: Sequence[int] = (2, 5, 8, 11), adapter: bool = False) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, 0 if i in global_attn_indexes else window_size, grid, adapter)
            for i in range(depth)
        )
        self.neck = neck(2, embed_dim, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
