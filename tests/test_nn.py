"""flashtron.nn against plain PyTorch: MHA (GQA, rotary, causal, window, cross-attention, padding,
varlen, KV-cache decoding), the SDPA/standard backends, RotaryEmbedding, MLP, GatedMLP and Block.

The reference recomputes each layer from the module's own weights with F.linear, a rotary written
here and torch's scaled_dot_product_attention with an explicit mask, in fp64; "PyTorch in dtype" is
the same computation in the input dtype (the tolerance rule of tests/tolerance.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashtron.nn import MHA, MLP, Block, GatedMLP, KVCache, LayerNorm, RMSNorm, RotaryEmbedding, set_attention_backend
from tolerance import assert_fa_close, assert_grads_close

# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def ref_rotary(x, rotary_dim, base, interleaved, positions):
    """x: (batch, seqlen, nheads, headdim); positions: (seqlen,) or (batch, seqlen)."""
    inv_freq = base ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=x.device) / rotary_dim)
    angles = positions.to(x.device, torch.float64)[..., None] * inv_freq  # (..., seqlen, rotary_dim / 2)
    cos, sin = angles.cos().to(x.dtype).unsqueeze(-2), angles.sin().to(x.dtype).unsqueeze(-2)
    xr, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    else:
        x0, x1 = xr.chunk(2, dim=-1)
        rotated = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return torch.cat((rotated, rest), dim=-1)


def ref_allowed(seqlen_q, seqlen_k, causal, window, device="cpu"):
    """(seqlen_q, seqlen_k) bool: flash_attn's bottom-right aligned causal / window."""
    left, right = window
    right = 0 if causal else right
    i, j = torch.arange(seqlen_q, device=device)[:, None], torch.arange(seqlen_k, device=device)[None, :]
    diff = j - i - (seqlen_k - seqlen_q)  # key minus the query's aligned position
    ok = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= diff >= -left
    if right >= 0:
        ok &= diff <= right
    return ok


def ref_mha(m: MHA, x, x_kv=None, key_padding_mask=None, dtype=torch.float64):
    """MHA recomputed from m's weights in `dtype`. x: (batch, seqlen, embed_dim)."""

    def lin(layer, t):
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return F.linear(t.to(dtype), layer.weight.to(dtype), bias)

    h, hk, d = m.num_heads, m.num_heads_kv, m.head_dim
    if m.cross_attn:
        q = lin(m.Wq, x).unflatten(-1, (h, d))
        k, v = lin(m.Wkv, x_kv).unflatten(-1, (2 * hk, d)).split([hk, hk], dim=-2)
    else:
        q, k, v = lin(m.Wqkv, x).unflatten(-1, (h + 2 * hk, d)).split([h, hk, hk], dim=-2)
    if m.rotary_emb is not None:
        r = m.rotary_emb
        q = ref_rotary(q, r.dim, r.base, r.interleaved, torch.arange(q.shape[1]))
        k = ref_rotary(k, r.dim, r.base, r.interleaved, torch.arange(k.shape[1]))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    allowed = ref_allowed(q.shape[2], k.shape[2], m.causal, m.window_size, q.device)[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scale = m.softmax_scale if m.softmax_scale is not None else d**-0.5
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return lin(m.out_proj, out.transpose(1, 2).flatten(-2))


def check_mha(ours, m, x, **kw):
    assert_fa_close(ours, ref_mha(m, x, **kw), ref_mha(m, x, dtype=x.dtype, **kw))


# ---------------------------------------------------------------------------------------------
# MHA
# ---------------------------------------------------------------------------------------------

MHA_CASES = {
    "mha": dict(num_heads=4),
    "gqa-causal": dict(num_heads=4, num_heads_kv=2, causal=True),
    "mqa-window": dict(num_heads=4, num_heads_kv=1, window_size=(3, 2)),
    "rotary-neox-causal-window": dict(num_heads=4, num_heads_kv=2, causal=True, window_size=(5, -1), rotary_emb_dim=8),
    "rotary-gptj-partial": dict(num_heads=2, rotary_emb_dim=6, rotary_emb_interleaved=True, rotary_emb_base=500.0),
    "scale-nobias": dict(num_heads=4, softmax_scale=0.3, qkv_proj_bias=False, out_proj_bias=False, causal=True),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
@pytest.mark.parametrize("seqlen", [1, 17])
def test_mha_matches_reference(case, seqlen):
    m = MHA(32, **MHA_CASES[case])
    x = torch.randn(2, seqlen, 32)
    check_mha(m(x), m, x)


def test_mha_gradients():
    m = MHA(32, 4, num_heads_kv=2, causal=True, rotary_emb_dim=8)
    x = torch.randn(2, 13, 32, requires_grad=True)
    dout = torch.randn(2, 13, 32)
    params = [x, m.Wqkv.weight, m.out_proj.weight]
    ours = torch.autograd.grad(m(x), params, dout)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        with torch.enable_grad():
            grads[dtype] = torch.autograd.grad(ref_mha(m, x, dtype=dtype), params, dout.to(dtype))
    assert_grads_close(ours, grads[torch.float64], grads[torch.float32], names=("dx", "dWqkv", "dWout"))


def test_mha_cross_attention_with_padding():
    m = MHA(32, 4, num_heads_kv=2, cross_attn=True)
    x, x_kv = torch.randn(3, 7, 32), torch.randn(3, 13, 32)
    check_mha(m(x, x_kv), m, x, x_kv=x_kv)
    mask = torch.arange(13)[None, :] < torch.tensor([[13], [4], [9]])
    mask[2, 0] = False  # a hole, not only right padding
    check_mha(m(x, x_kv, key_padding_mask=mask), m, x, x_kv=x_kv, key_padding_mask=mask)


@pytest.mark.parametrize("causal", [False, True])
def test_mha_key_padding_mask(causal):
    m = MHA(32, 4, num_heads_kv=2, causal=causal, rotary_emb_dim=8)
    x = torch.randn(3, 11, 32)
    mask = torch.arange(11)[None, :] < torch.tensor([[11], [3], [8]])
    ours = m(x, key_padding_mask=mask)
    ref = ref_mha(m, x, key_padding_mask=mask)
    pt = ref_mha(m, x, key_padding_mask=mask, dtype=torch.float32)
    assert_fa_close(ours[mask], ref[mask], pt[mask])
    # padded queries are dropped: their attention output is 0, so only the projection bias remains
    torch.testing.assert_close(ours[~mask], m.out_proj.bias.detach().expand_as(ours[~mask]), rtol=0, atol=0)


def test_mha_varlen_equals_separate_sequences():
    m = MHA(32, 4, num_heads_kv=2, causal=True, rotary_emb_dim=8, window_size=(4, -1))
    lens = [5, 1, 12]
    xs = [torch.randn(1, n, 32) for n in lens]
    cu = torch.tensor([0, 5, 6, 18], dtype=torch.int32)
    ours = m(torch.cat(xs, dim=1)[0], cu_seqlens=cu, max_seqlen=max(lens))
    for i, x in enumerate(xs):
        check_mha(ours[cu[i] : cu[i + 1]][None], m, x)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_heads=4, causal=True),
        dict(num_heads=4, num_heads_kv=2, causal=True, rotary_emb_dim=8),
        dict(
            num_heads=4, num_heads_kv=1, causal=True, rotary_emb_dim=4, rotary_emb_interleaved=True, window_size=(3, 0)
        ),
    ],
)
def test_mha_kvcache_decode_equals_full_forward(kw):
    m = MHA(32, layer_idx=1, **kw)
    x = torch.randn(2, 11, 32)
    cache = KVCache(2, 2, 16, m.num_heads_kv, m.head_dim)
    pieces = []
    for start, end in ((0, 5), (5, 6), (6, 7), (7, 10), (10, 11)):  # prefill, then steps of 1 and 3
        pieces.append(m(x[:, start:end], kv_cache=cache))
        cache.advance(end - start)
    assert cache.cache_seqlens.tolist() == [11, 11]
    assert cache.k_cache[0].abs().sum() == 0  # layer 0's slot is untouched
    check_mha(torch.cat(pieces, dim=1), m, x)


def test_kvcache_rows_at_different_lengths():
    m = MHA(32, 4, num_heads_kv=2, causal=True, rotary_emb_dim=8, layer_idx=0)
    a, b = torch.randn(1, 9, 32), torch.randn(1, 4, 32)
    cache = KVCache(1, 2, 12, 2, 8)
    # fill row 0 with 8 tokens and row 1 with 3, in one batch: write both, then set the lengths
    m(torch.cat([a[:, :8], torch.cat([b[:, :3], torch.zeros(1, 5, 32)], dim=1)]), kv_cache=cache)
    cache.cache_seqlens.copy_(torch.tensor([8, 3], dtype=torch.int32))
    step = m(torch.cat([a[:, 8:9], b[:, 3:4]]), kv_cache=cache)
    ref_a, ref_b = ref_mha(m, a)[:, -1:], ref_mha(m, b)[:, -1:]
    pt_a, pt_b = ref_mha(m, a, dtype=torch.float32)[:, -1:], ref_mha(m, b, dtype=torch.float32)[:, -1:]
    assert_fa_close(step, torch.cat([ref_a, ref_b]), torch.cat([pt_a, pt_b]))


@pytest.mark.parametrize("backend", ["sdpa", "standard"])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(num_heads_kv=2, window_size=(2, 3)), dict(num_heads_kv=1)])
def test_backends_match_reference(backend, kw):
    m = MHA(32, 4, rotary_emb_dim=8, **kw)
    set_attention_backend(m, backend)
    assert m.backend == backend
    x = torch.randn(2, 9, 32)
    check_mha(m(x), m, x)


def test_mha_bad_arguments():
    with pytest.raises(ValueError, match="num_heads_kv"):
        MHA(32, 4, num_heads_kv=3)
    with pytest.raises(ValueError, match="embed_dim"):
        MHA(30, 4)
    with pytest.raises(ValueError, match="rotary_emb_dim"):
        MHA(32, 4, rotary_emb_dim=10)
    with pytest.raises(ValueError, match="cross_attn"):
        MHA(32, 4, cross_attn=True, rotary_emb_dim=4)
    with pytest.raises(ValueError, match="x_kv"):
        MHA(32, 4, cross_attn=True)(torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="layer_idx"):
        MHA(32, 4, causal=True)(torch.randn(1, 3, 32), kv_cache=KVCache(1, 1, 8, 4, 8))
    with pytest.raises(ValueError, match="backend"):
        set_attention_backend(MHA(32, 4), "flash")


# ---------------------------------------------------------------------------------------------
# RotaryEmbedding
# ---------------------------------------------------------------------------------------------


def test_rotary_tables_and_offset():
    r = RotaryEmbedding(8, base=100.0)
    cos, sin = r.cos_sin(20)
    assert cos.shape[0] >= 20 and cos.shape[1] == 4 and cos.dtype == torch.float32
    angles = torch.arange(20, dtype=torch.float64)[:, None] * 100.0 ** -(torch.arange(0, 8, 2) / 8).double()
    torch.testing.assert_close(cos[:20].double(), angles.cos(), rtol=0, atol=2e-6)
    torch.testing.assert_close(sin[:20].double(), angles.sin(), rtol=0, atol=2e-6)
    assert r.cos_sin(20, dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    q, k = torch.randn(2, 5, 3, 12), torch.randn(2, 5, 1, 12)
    q_rot, k_rot = r(q, k, seqlen_offset=7)
    pos = torch.arange(7, 12)
    torch.testing.assert_close(q_rot, ref_rotary(q.double(), 8, 100.0, False, pos).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_rot, ref_rotary(k.double(), 8, 100.0, False, pos).float(), rtol=1e-5, atol=1e-5)
    # the module's dtype never rounds the frequencies: there are no float buffers to cast
    assert list(r.to(torch.bfloat16).buffers()) == []


def test_rotary_bad_arguments():
    with pytest.raises(ValueError, match="dim"):
        RotaryEmbedding(7)
    with pytest.raises(TypeError, match="seqlen_offset"):
        RotaryEmbedding(4)(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), seqlen_offset=torch.tensor([1]))


# ---------------------------------------------------------------------------------------------
# MLP, GatedMLP, Block
# ---------------------------------------------------------------------------------------------


def test_mlp_and_gated_mlp():
    x = torch.randn(2, 5, 24, requires_grad=True)
    mlp = MLP(24, out_features=16)
    assert mlp.fc1.out_features == 96
    y = mlp(x)
    expected = F.linear(F.gelu(mlp.fc1(x), approximate="tanh"), mlp.fc2.weight, mlp.fc2.bias)
    torch.testing.assert_close(y, expected)
    assert y.shape == (2, 5, 16)

    gated = GatedMLP(24, bias1=False, bias2=False, multiple_of=16)
    assert gated.fc1.out_features == 2 * 64  # 8/3 * 24 = 64, already a multiple of 16
    w_up, w_gate = gated.fc1.weight.chunk(2, dim=0)
    y = gated(x)
    torch.testing.assert_close(y, F.linear(F.linear(x, w_up) * F.silu(F.linear(x, w_gate)), gated.fc2.weight))
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in gated.parameters())
    with pytest.raises(ValueError, match="hidden_features"):
        MLP(8, hidden_features=0)


@pytest.mark.parametrize("norm_cls", [LayerNorm, RMSNorm, torch.nn.LayerNorm])
def test_block_fused_residual(norm_cls):
    dim = 32
    block = Block(dim, lambda d: MHA(d, 4, causal=True), lambda d: GatedMLP(d, 40), norm_cls)
    with torch.no_grad():  # non-trivial norm weights
        for p in (block.norm1.weight, block.norm2.weight):
            p.uniform_(0.5, 1.5)
    x, res = torch.randn(2, 6, dim, requires_grad=True), torch.randn(2, 6, dim)
    out, residual = block(x, res)
    # the same block written out: residual adds, then the layers
    r1 = x + res
    r2 = block.mixer(norm_ref(block.norm1, r1)) + r1
    torch.testing.assert_close(residual, r2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, block.mlp(norm_ref(block.norm2, r2)), rtol=1e-5, atol=1e-5)
    (out.square().sum() + residual.sum()).backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())
    # the first block of a stack has no residual yet: the input itself starts the residual stream
    _, residual0 = block(x)
    torch.testing.assert_close(residual0, block.mixer(norm_ref(block.norm1, x)) + x, rtol=1e-5, atol=1e-5)


def norm_ref(norm, x):
    if isinstance(norm, RMSNorm):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm.eps) * norm.weight
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


# ---------------------------------------------------------------------------------------------
# GPU tier: the Triton path against the CPU reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mha_gpu_matches_reference(dtype):
    m = MHA(256, 4, num_heads_kv=2, causal=True, rotary_emb_dim=64, window_size=(100, -1), layer_idx=0)
    m_gpu = m.to("cuda", dtype)
    xg = torch.randn(2, 300, 256, device="cuda", dtype=dtype)
    pt = ref_mha(m_gpu, xg, dtype=dtype).cpu()
    ref = ref_mha(m_gpu, xg).cpu()
    assert_fa_close(m_gpu(xg).cpu(), ref, pt)
    cache = KVCache(1, 2, 320, 2, 64, device="cuda", dtype=dtype)
    prefill = m_gpu(xg[:, :290], kv_cache=cache)
    cache.advance(290)
    steps = [prefill]
    for t in range(290, 300):
        steps.append(m_gpu(xg[:, t : t + 1], kv_cache=cache))
        cache.advance(1)
    assert_fa_close(torch.cat(steps, dim=1).cpu(), ref, pt)


@pytest.mark.gpu
def test_mha_gpu_cross_attention_with_padding():
    """Cross-attention on the Triton path, then with a key padding mask (the varlen path), holes too."""
    m = MHA(256, 4, num_heads_kv=2, cross_attn=True).to("cuda", torch.bfloat16)
    x = torch.randn(3, 70, 256, device="cuda", dtype=torch.bfloat16)
    x_kv = torch.randn(3, 130, 256, device="cuda", dtype=torch.bfloat16)
    mask = torch.arange(130, device="cuda")[None, :] < torch.tensor([[130], [40], [90]], device="cuda")
    mask[2, 0] = False
    for kw in (dict(x_kv=x_kv), dict(x_kv=x_kv, key_padding_mask=mask)):
        ours = m(x, kw["x_kv"], key_padding_mask=kw.get("key_padding_mask")).cpu()
        assert_fa_close(ours, ref_mha(m, x, **kw).cpu(), ref_mha(m, x, dtype=x.dtype, **kw).cpu())
