"""Every attention backend against the math reference, relative positions and padding included;
sparse mode against dense attention with the equivalent block mask."""

import pytest
import torch

from samlabel.attention import FactoredBias, Padding, attention, flash_available, sparse_groups
from samlabel.modeling.image_encoder3d import Attention, rel_pos_bias

FAST_BACKENDS = ["sdpa"] + (["flash"] if flash_available() else [])


def random_case(seed, grid=(4, 4, 4), window=None, heads=3, dim=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(grid).prod())
    q, k, v = (torch.randn(2, heads, n, dim, generator=g, dtype=dtype) for _ in range(3))
    keys = window or grid
    terms = [torch.randn(2, heads, n, keys[0], 1, keys[2], generator=g, dtype=dtype),
             torch.randn(2, heads, n, 1, keys[1], keys[2], generator=g, dtype=dtype)]
    return q, k, v, FactoredBias(terms, tuple(keys))


def run(backend, *args, **kwargs):
    if backend == "flash":  # flash runs in half precision on the GPU
        args = [a.cuda().half() if isinstance(a, torch.Tensor) else a for a in args]
        return attention(*args, backend=backend, **kwargs).double().cpu()
    return attention(*args, backend=backend, **kwargs)


def tolerance(backend):
    return 2e-2 if backend == "flash" else 1e-10


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backends_match_math_without_bias(backend):
    q, k, v, _ = random_case(0)
    expected = attention(q, k, v, 0.3, backend="math")
    manual = torch.softmax(0.3 * q @ k.transpose(-1, -2), -1) @ v
    assert torch.allclose(expected, manual)
    assert (run(backend, q, k, v, 0.3) - expected).abs().max() < tolerance(backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backends_match_math_with_factored_bias(backend):
    q, k, v, bias = random_case(1)
    expected = attention(q, k, v, 0.3, bias, backend="math")
    dense = bias.terms[0] + bias.terms[1]  # (B, h, N, 4, 4, 4)
    manual = torch.softmax(0.3 * q @ k.transpose(-1, -2) + dense.flatten(3), -1) @ v
    assert torch.allclose(expected, manual)
    assert (run(backend, q, k, v, 0.3, bias) - expected).abs().max() < tolerance(backend)


def padded_case(seed, grid=(3, 3, 3), window=(5, 5, 5)):
    q, k, v, bias = random_case(seed, grid, window)
    g = torch.Generator().manual_seed(seed + 100)
    key, value = (torch.randn(q.shape[1], q.shape[-1], generator=g, dtype=q.dtype) for _ in range(2))
    dense = bias.dense()
    real = torch.zeros(window, dtype=torch.bool)
    real[: grid[0], : grid[1], : grid[2]] = True
    log_weight = torch.logsumexp(dense[..., ~real.flatten()], -1)
    return q, k, v, bias, Padding(key, value, grid, log_weight)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_padding_key_equals_materialised_padding_tokens(backend):
    q, k, v, bias, padding = padded_case(2)
    expected = attention(q, k, v, 0.3, bias, padding, backend="math")
    # Independent: the window written out token by token, padding tokens carrying (key, value).
    window = bias.key_grid
    k_full = padding.key[None, :, None].repeat(2, 1, 125, 1).reshape(2, 3, *window, -1)
    v_full = padding.value[None, :, None].repeat(2, 1, 125, 1).reshape(2, 3, *window, -1)
    k_full[:, :, :3, :3, :3] = k.reshape(2, 3, 3, 3, 3, -1)
    v_full[:, :, :3, :3, :3] = v.reshape(2, 3, 3, 3, 3, -1)
    logits = 0.3 * q @ k_full.flatten(2, 4).transpose(-1, -2) + bias.dense()
    manual = torch.softmax(logits, -1) @ v_full.flatten(2, 4)
    assert torch.allclose(expected, manual)
    assert (run(backend, q, k, v, 0.3, bias, padding) - expected).abs().max() < tolerance(backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_sparse_mode_matches_dense_attention_with_block_mask(backend):
    q, k, v, bias = random_case(3)
    segment, dilation = 16, 4
    groups = sparse_groups(64, segment, dilation)
    token = torch.arange(64)
    same_group = (token[:, None] // segment == token[None, :] // segment) & (token[:, None] % dilation == token[None, :] % dilation)
    logits = 0.3 * q @ k.transpose(-1, -2) + bias.dense()
    masked = torch.softmax(logits.masked_fill(~same_group, float("-inf")), -1) @ v
    assert torch.allclose(attention(q, k, v, 0.3, bias, sparse=(segment, dilation), backend="math"), masked)
    assert (run(backend, q, k, v, 0.3, bias, sparse=(segment, dilation)) - masked).abs().max() < tolerance(backend)
    assert groups.shape == (16, 4) and sorted(groups.flatten().tolist()) == list(range(64))
    assert groups[1].tolist() == [1, 5, 9, 13]  # segment 0, offset 1: every 4th token


@pytest.mark.parametrize("backend", ["math"] + FAST_BACKENDS)
def test_sparse_outputs_stay_at_their_tokens(backend):
    """A token attended only by itself returns its own value at its own position (no axis
    rotation, unlike the official side file)."""
    q, k, v, _ = random_case(4)
    outputs = run(backend, q, k, v, 0.3, sparse=(64, 64))  # groups of one token
    assert (outputs - v).abs().max() < tolerance(backend)


def test_sparse_mode_rejects_what_it_cannot_split():
    q, k, v, _ = random_case(5)
    with pytest.raises(ValueError, match="divisible"):
        attention(q, k, v, 0.3, sparse=(48, 4))
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, 0.3, backend="cuda-magic")


def official_3d_bias(q, tables, extent):
    """The official broadcasting, written as in SAM-Med3D's add_decomposed_rel_pos, over a
    zero-padded window: rel terms of shape (B, d, h, w, k) added with [..., None, None],
    [:, :, :, None, :, None] and [:, :, :, None, None, :]."""
    from samlabel.attention import gather_rel_pos

    b, d, h, w, c = q.shape
    rd, rh, rw = (gather_rel_pos(t, extent, extent) for t in tables)
    rel_d = torch.einsum("bdhwc,dkc->bdhwk", q, rd)
    rel_h = torch.einsum("bdhwc,hkc->bdhwk", q, rh)
    rel_w = torch.einsum("bdhwc,wkc->bdhwk", q, rw)
    zeros = torch.zeros(b, d, h, w, extent, extent, extent, dtype=q.dtype)
    bias = zeros + rel_d[:, :, :, :, None, None] + rel_h[:, :, :, None, :, None] + rel_w[:, :, :, None, None, :]
    return bias.reshape(b, d * h * w, -1)


@pytest.mark.parametrize("backend", ["math"] + FAST_BACKENDS)
@pytest.mark.parametrize("window", [0, 7])
def test_encoder_attention_equals_literal_padded_window(backend, window, monkeypatch):
    """The encoder's attention (rel-pos quirk, padding key) against the official computation
    written out: zero-pad the 4^3 grid to the window, attend over every window token."""
    monkeypatch.setenv("SAMLABEL_ATTENTION", backend)
    torch.manual_seed(6)
    grid, dim, heads = 4, 12, 3
    extent = window or grid
    layer = Attention(dim, heads, (extent,) * 3, window_size=window).double()
    for parameter in layer.parameters():
        parameter.data.normal_(0, 0.5)
    x = torch.randn(2, grid, grid, grid, dim, dtype=torch.double)
    padded = torch.nn.functional.pad(x, (0, 0, 0, extent - grid, 0, extent - grid, 0, extent - grid))
    q, k, v = layer.qkv(padded).reshape(2, extent**3, 3, heads, -1).permute(2, 0, 3, 1, 4)
    tables = (layer.rel_pos_d, layer.rel_pos_h, layer.rel_pos_w)
    bias = official_3d_bias(q.reshape(2 * heads, extent, extent, extent, -1), tables, extent)
    logits = layer.scale * q @ k.transpose(-1, -2) + bias.reshape(2, heads, extent**3, -1)
    out = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(2, extent, extent, extent, dim)
    expected = layer.proj(out)[:, :grid, :grid, :grid]
    if backend == "flash":
        layer, x, expected = layer.cuda().half(), x.cuda().half(), expected.cuda().half()
    with torch.no_grad():
        got = layer(x)
    assert (got - expected).abs().max() < tolerance(backend) * 10


def test_rel_pos_padding_weight_equals_brute_force():
    torch.manual_seed(7)
    q, q_pad = torch.randn(1, 2, 27, 5, dtype=torch.double), torch.randn(2, 5, dtype=torch.double)
    tables = [torch.randn(9, 5, dtype=torch.double) for _ in range(3)]
    bias, log_weight = rel_pos_bias(q, q_pad, tables, 5)
    real = torch.zeros(5, 5, 5, dtype=torch.bool)
    real[:3, :3, :3] = True
    assert torch.allclose(log_weight, torch.logsumexp(bias.dense()[..., ~real.flatten()], -1))
