"""3D ViT image encoder (ViTDet-style) shared by SAM-Med3D and FastSAM3D.

The two released encoders differ in three ways, all parameters of this one module:
  - window_sizes: SAM-Med3D uses window 14 in all blocks but the global ones, so its 8^3 grid
    is zero-padded to 14^3 and the padding takes part in the softmax; FastSAM3D is all global.
  - ffn_only_blocks: FastSAM3D's first two blocks have no attention (no norm1/attn weights).
  - norm2_replaces_residual: in FastSAM3D the second LayerNorm's output becomes the residual
    stream (out = z + MLP(z), z = LN2(x)); SAM-Med3D is the usual pre-norm out = x + MLP(LN2(x)).
"""

from functools import partial
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import FactoredBias, Padding, attention, gather_rel_pos
from .common import MLPBlock, neck

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def rel_pos_bias(q: torch.Tensor, q_padding: torch.Tensor, tables, extent: int):
    """The official 3D decomposed relative positions as a FactoredBias, and the padding's log-weight.

    The official code adds rel_d[:, :, :, :, None, None], rel_h[:, :, :, None, :, None] and
    rel_w[:, :, :, None, None, :] (each (B, d, h, w, k)) to the (B, qd, qh, qw, kd, kh, kw)
    logits. Broadcasting puts rel_d's k on the keys' w axis, rel_h's (w, k) on the keys' (d, w)
    axes and rel_w's (w, k) on the keys' (h, w) axes, so for a query (i, j, l) and a key (a, b, c)
    the bias is
        q(i,j,l).Rd[i,c] + q(i,j,a).Rh[j,c] + q(i,j,b).Rw[b,c],
    where q(i,j,x) is the query of another token in the query's row (a padding token's,
    q_padding, beyond the grid). The checkpoints were trained with this; we reproduce it.

    q: (B, heads, n^3, c) for a cubic n^3 grid in the corner of a cubic window of `extent`
    (extent == n: no padding); q_padding: (heads, c); tables: rel_pos_d/h/w, 2 * extent - 1 rows.
    Returns the bias over the window's keys and, with padding, its log-weight (B, heads, n^3).
    """
    b, heads, tokens, c = q.shape
    n = round(tokens ** (1 / 3))
    rd, rh, rw = (gather_rel_pos(t, size, extent) for t, size in zip(tables, (n, n, extent)))
    grid_q = q.reshape(b, heads, n, n, n, c)
    row_q = torch.cat([grid_q, q_padding[None, :, None, None, None].expand(b, -1, n, n, extent - n, -1)], dim=4)
    d_term = torch.einsum("bhijlx,ikx->bhijlk", grid_q, rd)  # [i,j,l,c] = q(i,j,l).Rd[i,c]
    h_term = torch.einsum("bhijax,jkx->bhijak", row_q, rh)  # [i,j,a,c] = q(i,j,a).Rh[j,c]
    w_term = torch.einsum("bhijax,akx->bhijak", row_q, rw)  # [i,j,b,c] = q(i,j,b).Rw[b,c]
    over_ac = (d_term[..., None, :] + h_term[:, :, :, :, None]).reshape(b, heads, tokens, extent, 1, extent)
    over_bc = w_term[:, :, :, :, None].expand(-1, -1, -1, -1, n, -1, -1).reshape(b, heads, tokens, 1, extent, extent)
    bias = FactoredBias([over_ac, over_bc], (extent,) * 3)
    if extent == n:
        return bias, None

    def log_total(size):  # log of the summed exp(bias) over the keys in [0, size)^3, factored per c
        precise = torch.promote_types(q.dtype, torch.float32)
        per_c = (d_term[..., :size].to(precise)
                 + torch.logsumexp(h_term[..., :size, :size].to(precise), -2)[:, :, :, :, None]
                 + torch.logsumexp(w_term[..., :size, :size].to(precise), -2)[:, :, :, :, None])
        return torch.logsumexp(per_c, -1).reshape(b, heads, tokens)

    in_window, in_grid = log_total(extent), log_total(n)
    return bias, in_window + torch.log(-torch.expm1(in_grid - in_window))


class Attention(nn.Module):
    """Multi-head attention over a (B, D, H, W, C) token grid with the official 3D rel-pos."""

    def __init__(self, dim: int, num_heads: int, rel_pos_size: Tuple[int, int, int], window_size: int = 0,
                 sparse: Optional[Tuple[int, int]] = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.window_size = window_size
        self.sparse = sparse
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[2] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = tuple(x.shape[1:4])
        if len(set(grid)) != 1:
            raise ValueError(f"the official 3D relative positions need a cubic token grid, got {grid}")
        if self.window_size and grid[0] > self.window_size:
            return self._forward_partitioned(x)
        return self._attend(x, self.window_size or grid[0])

    def _attend(self, x: torch.Tensor, extent: int) -> torch.Tensor:
        """Attention over the grid, which sits zero-padded in one cubic window of `extent`."""
        b, d, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, d * h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q_pad, k_pad, v_pad = self.qkv.bias.reshape(3, self.num_heads, -1)  # a zero token's q, k, v
        tables = (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w)
        bias, log_weight = rel_pos_bias(q, q_pad, tables, extent)
        padding = Padding(k_pad, v_pad, (d, h, w), log_weight) if log_weight is not None else None
        sparse = self.sparse if padding is None else None
        out = attention(q, k, v, self.scale, bias, padding, sparse)
        return self.proj(out.transpose(1, 2).reshape(b, d, h, w, -1))

    def _forward_partitioned(self, x: torch.Tensor) -> torch.Tensor:
        """Grids larger than one window: official zero-padding and window partition."""
        b, d, h, w, c = x.shape
        s = self.window_size
        x = F.pad(x, (0, 0, 0, -w % s, 0, -h % s, 0, -d % s))
        dp, hp, wp = x.shape[1:4]
        x = x.reshape(b, dp // s, s, hp // s, s, wp // s, s, c).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, s, s, s, c)
        x = self._attend(x, s)
        x = x.reshape(b, dp // s, hp // s, wp // s, s, s, s, c).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, c)
        return x[:, :d, :h, :w]


class Block3D(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, grid_size: Tuple[int, int, int], window_size: int,
                 has_attention: bool = True, norm2_replaces_residual: bool = False,
                 sparse: Optional[Tuple[int, int]] = None) -> None:
        super().__init__()
        if has_attention:
            rel_pos_size = (window_size,) * 3 if window_size else grid_size
            self.norm1 = LayerNorm(dim)
            self.attn = Attention(dim, num_heads, rel_pos_size, window_size, sparse)
        else:
            self.attn = None
        self.norm2 = LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.norm2_replaces_residual = norm2_replaces_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.attn(self.norm1(x))
        if self.norm2_replaces_residual:
            x = self.norm2(x)
            return x + self.mlp(x)
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)  # B C D H W -> B D H W C


class ImageEncoderViT3D(nn.Module):
    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        window_sizes: Optional[Sequence[int]] = None,
        ffn_only_blocks: int = 0,
        norm2_replaces_residual: bool = False,
        sparse_attention: Optional[Tuple[int, int]] = None,
    ) -> None:
        """window_sizes[i] is block i's window (0 = global attention); sparse_attention=(w, r)
        switches global blocks to the paper's sparse attention (changes the model's numbers)."""
        super().__init__()
        self.img_size = img_size
        grid = (img_size // patch_size,) * 3
        window_sizes = list(window_sizes) if window_sizes is not None else [0] * depth
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(embed_dim, num_heads, mlp_ratio, grid, window_sizes[i], has_attention=i >= ffn_only_blocks,
                    norm2_replaces_residual=norm2_replaces_residual, sparse=sparse_attention)
            for i in range(depth)
        )
        self.neck = neck(3, embed_dim, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
