"""The one attention function every block uses, with exchangeable backends.

Backends:
  - "math":  the reference. Logits, bias and softmax written out; padding keys are
             materialised and sparse mode is a dense block mask. Slow and obvious.
  - "sdpa":  torch.nn.functional.scaled_dot_product_attention.
  - "flash": flash-attn's flash_attn_func (CUDA, fp16/bf16, when installed).
  - "auto":  flash where it can run, else sdpa. The environment variable
             SAMLABEL_ATTENTION overrides the default.

Exact relative positions in the fast kernels. Relative-position biases of SAM-style ViTs are
sums of terms that each depend on the query and on one small index of the key (a key
coordinate, or a pair of coordinates):  bias[p, p'] = sum_t F_t[p, idx_t(p')].  That is an
inner product: append the rows F_t[p, :] to the (pre-scaled) query and the one-hot vectors
of idx_t(p') to the key, and run the kernel with scale 1. No bias tensor is needed, so kernels
without bias support (flash-attn) stay exact; only the columns real keys use are appended.

Padding keys without padding tokens. ViTDet windows zero-pad the token grid to the window
(SAM-Med3D: 8^3 -> 14^3, 2744 keys of which 2232 are padding). Padding tokens are zeros after
the first LayerNorm, so each has key k0 = b_k and value v0 = b_v (the qkv biases); they differ
only in their bias. They are replaced by one extra key (k0, v0) whose logit carries
log sum_{padding p'} exp(bias[p, p']) (Padding.log_weight, computed by the model from the
structure of its bias). Attention then runs over N+1 keys instead of the whole window, with
the same softmax.

Sparse mode (the FastSAM3D paper's 3D sparse attention): the token raster is split into
segments of length w, and inside each segment every r-th token is attended together
(r groups of w/r tokens per segment); outputs go back to their original positions.
"""

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


@dataclass
class FactoredBias:
    """bias[..., p, p'] = sum_t query_terms[t][..., p, key_index[t][p']].

    query_terms[t]: (B, heads, Nq, K_t); key_index[t]: (Nk,) integers in [0, K_t)."""

    query_terms: List[torch.Tensor]
    key_index: List[torch.Tensor]


@dataclass
class Padding:
    """Extra keys that all share one key and value vector (heads, d) and differ only in bias.

    key_index[t]: (Np,) the padding keys' indices into the bias terms (used by the reference);
    log_weight: (B, heads, Nq) = logsumexp over padding keys of their bias (used by the fast path).
    """

    key: torch.Tensor
    value: torch.Tensor
    key_index: List[torch.Tensor]
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

    padding needs bias; sparse=(w, r) needs as many queries as keys and no padding."""
    backend = backend or default_backend()
    if backend == "auto":
        backend = "flash" if q.is_cuda and flash_attn_func is not None and q.dtype in (torch.float16, torch.bfloat16) else "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS + ('auto',)}")
    if padding is not None and bias is None:
        raise ValueError("padding keys need a bias")
    if sparse is not None:
        segment, dilation = sparse
        if padding is not None or q.shape[-2] != k.shape[-2]:
            raise ValueError("sparse attention is defined on one token grid: equal query and key counts, no padding")
        if q.shape[-2] % segment or segment % dilation:
            raise ValueError(f"sparse attention needs tokens ({q.shape[-2]}) divisible by w={segment}, and w by r={dilation}")
    if backend == "math":
        return _math_attention(q, k, v, scale, bias, padding, sparse)
    q, k, v = _augment(q, k, v, scale, bias, padding)
    if sparse is not None:
        grouped = _kernel(*(_group(t, *sparse) for t in (q, k, v)), backend)
        return _ungroup(grouped, q.shape[0], *sparse)
    return _kernel(q, k, v, backend)


def _kernel(q, k, v, backend):
    """softmax(q k^T) v (scale 1) on a fast backend."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)
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


def _augment(q, k, v, scale, bias, padding):
    """Fold scale, bias and padding into q, k, v (see the module docstring)."""
    q = q * scale
    if bias is None:
        return q, k, v
    q_parts, k_parts = [q], [k]
    for terms, index in zip(bias.query_terms, bias.key_index):
        used, compact = torch.unique(index, return_inverse=True)
        q_parts.append(terms[..., used].to(q.dtype))
        k_parts.append(F.one_hot(compact, used.numel()).to(k.dtype).expand(*k.shape[:2], -1, -1))
    if padding is None:
        return torch.cat(q_parts, -1), torch.cat(k_parts, -1), v
    q_parts.append(padding.log_weight.to(q.dtype)[..., None])
    k_parts.append(torch.zeros_like(k[..., :1]))
    k = torch.cat(k_parts, -1)
    pad_key = torch.zeros_like(k[:1, :, :1])
    pad_key[..., : padding.key.shape[-1]] = padding.key[:, None]
    pad_key[..., -1] = 1
    pad_value = padding.value.to(v.dtype)[None, :, None].expand(v.shape[0], -1, 1, -1)
    return torch.cat(q_parts, -1), torch.cat([k, pad_key.expand(k.shape[0], -1, -1, -1)], -2), torch.cat([v, pad_value], -2)


def _group(t: torch.Tensor, segment: int, dilation: int) -> torch.Tensor:
    """(B, h, N, c) -> (B * N/w * r, h, w/r, c): token s*w + j*r + o goes to group (s, o), slot j."""
    b, h, n, c = t.shape
    t = t.reshape(b, h, n // segment, segment // dilation, dilation, c)
    return t.permute(0, 2, 4, 1, 3, 5).reshape(-1, h, segment // dilation, c)


def _ungroup(t: torch.Tensor, batch: int, segment: int, dilation: int) -> torch.Tensor:
    """Inverse of _group: every output back at its token's original position."""
    _, h, per_group, c = t.shape
    t = t.reshape(batch, -1, dilation, h, per_group, c).permute(0, 3, 1, 4, 2, 5)
    return t.reshape(batch, h, -1, c)


def _math_attention(q, k, v, scale, bias, padding, sparse):
    """The reference: explicit logits over all keys, padding keys materialised, dense block mask."""
    key_index = bias.key_index if bias is not None else []
    if padding is not None:
        n_pad = padding.key_index[0].numel()
        k = torch.cat([k, padding.key[None, :, None].to(k.dtype).expand(k.shape[0], -1, n_pad, -1)], -2)
        v = torch.cat([v, padding.value[None, :, None].to(v.dtype).expand(v.shape[0], -1, n_pad, -1)], -2)
        key_index = [torch.cat([real, pad]) for real, pad in zip(key_index, padding.key_index)]
    logits = scale * q @ k.transpose(-2, -1)
    if bias is not None:
        for terms, index in zip(bias.query_terms, key_index):
            logits = logits + terms[..., index]
    if sparse is not None:
        segment, dilation = sparse
        token = torch.arange(q.shape[-2], device=q.device)
        group = (token // segment) * dilation + token % dilation
        logits = logits.masked_fill(group[:, None] != group[None, :], float("-inf"))
    return logits.softmax(-1) @ v


def gather_rel_pos(table: torch.Tensor, query_size: int, key_size: int) -> torch.Tensor:
    """R[i, j] = table[i - j + key_size - 1]: the official lookup for windows of equal size."""
    if table.shape[0] != 2 * key_size - 1:
        raise ValueError(f"relative-position table has {table.shape[0]} rows, expected {2 * key_size - 1}")
    i = torch.arange(query_size, device=table.device)[:, None]
    j = torch.arange(key_size, device=table.device)[None, :]
    return table[i - j + key_size - 1]
