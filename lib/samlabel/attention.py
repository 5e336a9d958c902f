"""The one attention function every block uses, with exchangeable backends.

Backends:
  - "math":  the reference. Logits, bias and softmax written out; padding tokens are
             materialised and sparse mode is a dense block mask. Slow and obvious.
  - "sdpa":  torch.nn.functional.scaled_dot_product_attention, the bias as its additive mask.
  - "flash": flash-attn's flash_attn_func (CUDA, fp16/bf16, when installed).
  - "auto":  flash where it can run, else sdpa. The environment variable
             SAMLABEL_ATTENTION overrides the default.

Relative positions as a factored bias. The relative-position biases of SAM-style ViTs are
sums of terms that each depend on the query and on only some axes of the key's grid
coordinate: bias[p, p'] = sum_t F_t[p, p'|axes_t]. We pass the terms F_t, each a tensor
(B, heads, Nq, *shape_t) with shape_t broadcastable to the key grid.
  - sdpa / math add the broadcast terms into one dense bias (cheap: no gathers).
  - flash-attn takes no bias, so the bias becomes an inner product: the rows F_t[p, :] are
    appended to the (pre-scaled) query and the one-hot codes of p'|axes_t to the key, and
    the kernel runs with scale 1. Exact, and within flash-attn's head-dim limit of 256 for
    the 3D models (SAM-Med3D 64 + 128 + 1, FastSAM3D 128 + 128).

Padding without padding tokens. ViTDet windows zero-pad the token grid to the window
(SAM-Med3D: 8^3 -> 14^3, 2744 keys of which 2232 are padding). Padding tokens are zeros after
the first LayerNorm, so each has key k0 = b_k and value v0 = b_v (the qkv biases); they differ
only in their bias. All of them are replaced by one extra key (k0, v0) whose bias is
Padding.log_weight = log sum_{padding p'} exp(bias[p, p']), which the model computes from the
structure of its terms. Attention runs over N + 1 keys instead of the whole window, with the
same softmax.

Sparse mode (the FastSAM3D paper's 3D sparse attention): the token raster is split into
segments of length w, and inside each segment every r-th token is attended together
(r groups of w/r tokens per segment); each output goes back to its token's position.
"""

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

try:  # optional: CUDA machines only
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

BACKENDS = ("math", "sdpa", "flash")
DENSE_CHUNK_ELEMENTS = 2 ** 20  # bias values summed at once (4 MB of float32)


@dataclass
class FactoredBias:
    """bias[..., p, p'] = sum_t terms[t][..., p, *p'] with terms[t] (B, heads, Nq, *s_t) broadcast
    over the key grid; keys are the grid's raster."""

    terms: List[torch.Tensor]
    key_grid: Tuple[int, ...]

    def dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(B, heads, Nq, prod(key_grid)) in dtype (default: the terms'). Summed in the terms'
        precision and rounded once, a block of queries at a time: a global block's whole float32
        sum (heads x 4096^2 for MedSAM) would stream through memory twice before attention reads it."""
        lead = self.terms[0].shape[:3]
        dense = torch.empty(*lead, *self.key_grid, dtype=dtype or self.terms[0].dtype, device=self.terms[0].device)
        step = max(1, DENSE_CHUNK_ELEMENTS // (lead[0] * lead[1] * math.prod(self.key_grid)))
        for start in range(0, lead[2], step):
            rows = slice(start, start + step)
            dense[:, :, rows] = sum(term[:, :, rows] for term in self.terms)
        return dense.reshape(*lead, -1)

    def features(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Query features (B, heads, Nq, K) and key codes (Nk, K) whose inner product is the bias."""
        lead = self.terms[0].shape[:3]
        query_parts, key_parts = [], []
        for term in self.terms:
            shape = term.shape[3:]
            code = torch.arange(math.prod(shape), device=term.device).reshape(shape)
            query_parts.append(term.reshape(*lead, -1))
            key_parts.append(F.one_hot(code.expand(self.key_grid).reshape(-1), code.numel()).to(term.dtype))
        return torch.cat(query_parts, -1), torch.cat(key_parts, -1)

    def corner(self, grid: Tuple[int, ...]) -> "FactoredBias":
        """The bias restricted to keys in [0, grid) of the key grid."""
        crop = [t[(...,) + tuple(slice(0, g if s > 1 else 1) for s, g in zip(t.shape[3:], grid))] for t in self.terms]
        return FactoredBias(crop, tuple(grid))


@dataclass
class Padding:
    """The keys sit in the corner [0, grid) of a window (bias.key_grid); all other window
    positions are padding tokens with key `key` and value `value` (heads, d).
    log_weight (B, heads, Nq): logsumexp over the padding positions of their bias."""

    key: torch.Tensor
    value: torch.Tensor
    grid: Tuple[int, ...]
    log_weight: torch.Tensor


def default_backend() -> str:
    return os.environ.get("SAMLABEL_ATTENTION", "auto")


def flash_available() -> bool:
    return flash_attn_func is not None and torch.cuda.is_available()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: Optional[FactoredBias] = None,
    padding: Optional[Padding] = None,
    sparse: Optional[Tuple[int, int]] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v for q, k, v of shape (B, heads, N, d).

    padding needs bias (given over the whole window); sparse=(w, r) needs as many queries as
    keys and no padding."""
    backend = backend or default_backend()
    if backend == "auto":
        half = q.dtype in (torch.float16, torch.bfloat16)
        backend = "flash" if q.is_cuda and half and flash_attn_func is not None else "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS + ('auto',)}")
    if padding is not None and bias is None:
        raise ValueError("padding needs the bias over its window")
    groups = None
    if sparse is not None:
        if padding is not None or q.shape[-2] != k.shape[-2]:
            raise ValueError("sparse attention is defined on one token grid: equal query and key counts, no padding")
        groups = sparse_groups(q.shape[-2], *sparse, device=q.device)
    if backend == "math":
        return _math_attention(q, k, v, scale, bias, padding, groups)
    if padding is not None:
        bias = bias.corner(padding.grid)
        k = torch.cat([k, padding.key.to(k.dtype)[None, :, None].expand(k.shape[0], -1, 1, -1)], -2)
        v = torch.cat([v, padding.value.to(v.dtype)[None, :, None].expand(v.shape[0], -1, 1, -1)], -2)
    extra = padding.log_weight[..., None] if padding is not None else None  # the padding key's bias
    if backend == "sdpa":
        mask = None
        if bias is not None:
            mask = bias.dense(q.dtype)
            mask = torch.cat([mask, extra.to(q.dtype)], -1) if extra is not None else mask
        return _grouped(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale),
                        q, k, v, mask, groups)
    q = q * scale
    if bias is not None:
        query_features, key_codes = bias.features()
        key_codes = key_codes.expand(k.shape[0], k.shape[1], -1, -1)
        if extra is not None:
            query_features = torch.cat([query_features, extra], -1)
            key_codes = F.pad(key_codes, (0, 1, 0, 1))
            key_codes[..., -1, -1] = 1
        q = torch.cat([q, query_features.to(q.dtype)], -1)
        k = torch.cat([k, key_codes.to(k.dtype)], -1)
    return _grouped(lambda q, k, v, m: _flash(q, k, v), q, k, v, None, groups)


def sparse_groups(tokens: int, segment: int, dilation: int, device=None) -> torch.Tensor:
    """(groups, w/r) token indices: token s*w + j*r + o is slot j of group (s, o)."""
    if tokens % segment or segment % dilation:
        raise ValueError(f"sparse attention needs tokens ({tokens}) divisible by w={segment}, and w by r={dilation}")
    index = torch.arange(tokens, device=device).reshape(tokens // segment, segment // dilation, dilation)
    return index.transpose(1, 2).reshape(-1, segment // dilation)


def _grouped(kernel, q, k, v, mask, groups):
    """Run kernel on all tokens, or on each sparse group separately and scatter back."""
    if groups is None:
        return kernel(q, k, v, mask)
    b, h, n, _ = q.shape

    def split(t):  # (B, h, N, c) -> (B * G, h, w/r, c)
        return t[:, :, groups].transpose(1, 2).reshape(-1, h, groups.shape[1], t.shape[-1])

    if mask is not None:
        mask = mask[:, :, groups[:, :, None], groups[:, None, :]].transpose(1, 2)
        mask = mask.reshape(-1, mask.shape[2], groups.shape[1], groups.shape[1])
    out = kernel(split(q), split(k), split(v), mask)
    out = out.reshape(b, -1, h, groups.shape[1], out.shape[-1]).transpose(1, 2).reshape(b, h, n, -1)
    return torch.empty_like(out).index_copy_(2, groups.reshape(-1), out)


def _flash(q, k, v):
    """softmax(q k^T) v (scale 1) with flash-attn."""
    if not flash_available():
        raise RuntimeError("attention backend 'flash' needs the flash-attn package and a CUDA device")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("attention backend 'flash' runs in float16 or bfloat16; cast the model first")
    value_dim = v.shape[-1]
    width = max(q.shape[-1], value_dim)
    width += -width % 8  # flash-attn wants equal head dims, multiples of 8
    if width > 256:
        raise RuntimeError(f"attention backend 'flash' supports head dims up to 256, this call needs {width}")
    q, k, v = (F.pad(t, (0, width - t.shape[-1])).transpose(1, 2).contiguous() for t in (q, k, v))
    return flash_attn_func(q, k, v, softmax_scale=1.0).transpose(1, 2)[..., :value_dim]


def _math_attention(q, k, v, scale, bias, padding, groups):
    """The reference: padding tokens materialised, explicit logits, dense block mask."""
    if padding is not None:
        window = bias.key_grid
        real = torch.zeros(window, dtype=torch.bool, device=k.device)
        real[tuple(slice(0, g) for g in padding.grid)] = True
        real = real.reshape(-1)

        def fill(x, pad):
            full = pad.to(x.dtype)[None, :, None].repeat(x.shape[0], 1, real.numel(), 1)
            full[:, :, real] = x
            return full

        k, v = fill(k, padding.key), fill(v, padding.value)
    logits = scale * q @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.dense()
    if groups is not None:
        group_of = torch.empty(q.shape[-2], dtype=torch.long, device=q.device)
        group_of[groups.reshape(-1)] = torch.arange(groups.shape[0], device=q.device).repeat_interleave(groups.shape[1])
        logits = logits.masked_fill(group_of[:, None] != group_of[None, :], float("-inf"))
    return logits.softmax(-1) @ v


def gather_rel_pos(table: torch.Tensor, query_size: int, key_size: int) -> torch.Tensor:
    """R[i, j] = table[i - j + key_size - 1]: the official lookup for windows of equal size."""
    if table.shape[0] != 2 * key_size - 1:
        raise ValueError(f"relative-position table has {table.shape[0]} rows, expected {2 * key_size - 1}")
    i = torch.arange(query_size, device=table.device)[:, None]
    j = torch.arange(key_size, device=table.device)[None, :]
    return table[i - j + key_size - 1]
