"""GPU tier: what changes from call to call in real training and inference.

- New sequence lengths and batch sizes must not compile new kernels: varlen training and decoding see
  a new shape at every step, and a compile costs seconds. After one warm-up call per feature set, 30
  random shapes through forward and backward (dense and varlen) and through decode compile nothing.
- Tensors past 2**31 elements: every offset that can pass int32 is computed in int64. Checked on the
  batch entries (and varlen sequences) that sit past 2**31 elements, against a reference on just those.
"""

from __future__ import annotations

import random

import pytest
import torch

import flashtron
from compile_count import count_compiles
from flashtron.reference import attention_ref
from tolerance import assert_fa_close, assert_grads_close

H, HK, D = 8, 2, 64


def _qkv(shape_q, shape_k, dtype=torch.bfloat16):
    q = torch.randn(*shape_q, H, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(*shape_k, HK, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(*shape_k, HK, D, device="cuda", dtype=dtype, requires_grad=True)
    return q, k, v


def _dense_step(batch, seqlen_q, seqlen_k, causal):
    q, k, v = _qkv((batch, seqlen_q), (batch, seqlen_k))
    out = flashtron.flash_attn_func(q, k, v, causal=causal)
    out.backward(torch.randn_like(out))


def _varlen_step(lengths_q, lengths_k, causal):
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = _qkv((sum(lengths_q),), (sum(lengths_k),))
    out = flashtron.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal)
    out.backward(torch.randn_like(out))


def _random_triples(n, rng):
    # seqlen 1 and odd lengths on purpose: they are where == 1 / % 16 specialization would show
    return [(rng.randint(1, 4), rng.choice([1, rng.randint(2, 2500)]), rng.randint(1, 2500)) for _ in range(n)]


@pytest.mark.gpu
def test_gpu_new_seqlens_do_not_recompile():
    rng = random.Random(0)
    for causal in (False, True):  # warm-up: each kernel of each feature set compiles once
        _dense_step(2, 100, 200, causal)
        _varlen_step([5, 100], [7, 120], causal)
    with count_compiles() as compiles:
        for batch, seqlen_q, seqlen_k in _random_triples(30, rng):
            for causal in (False, True):
                _dense_step(batch, seqlen_q, seqlen_k, causal)
                lengths_q = [rng.randint(0, seqlen_q) for _ in range(batch)] + [seqlen_q]
                lengths_k = [rng.randint(1, seqlen_k) for _ in range(batch)] + [seqlen_k]
                _varlen_step(lengths_q, lengths_k, causal)
        torch.cuda.synchronize()
    assert not compiles, f"compiled again for new shapes: {dict(compiles)}"


@pytest.mark.gpu
def test_gpu_decode_new_batches_and_lengths_do_not_recompile():
    """Decode with a fixed-capacity cache: new batch sizes, cache lengths and prefill chunk lengths
    reuse the kernels. The split count is a runtime argument; splitting or not (combine kernel or
    none) are the two variants, both warmed up first."""
    rng = random.Random(1)
    capacity = 8192
    k_cache = torch.randn(8, capacity, HK, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)

    def step(batch, seqlen_new, filled):
        q = torch.randn(batch, seqlen_new, H, D, device="cuda", dtype=torch.bfloat16)
        k_new, v_new = (torch.randn(batch, seqlen_new, HK, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cache_seqlens = torch.tensor(filled, dtype=torch.int32, device="cuda")
        flashtron.flash_attn_with_kvcache(
            q, k_cache[:batch], v_cache[:batch], k_new, v_new, cache_seqlens=cache_seqlens, causal=True
        )

    for batch, filled in ((1, 8000), (8, 10)):  # warm-up: long single row (splits) and short batch (none)
        for seqlen_new in (1, 37):
            step(batch, seqlen_new, [filled] * batch)
    with count_compiles() as compiles:
        for _ in range(30):
            batch, seqlen_new = rng.randint(1, 8), rng.choice([1, 1, rng.randint(2, 64)])
            step(batch, seqlen_new, [rng.randint(0, capacity - seqlen_new) for _ in range(batch)])
        torch.cuda.synchronize()
    assert not compiles, f"compiled again for new shapes: {dict(compiles)}"


# ---------------------------------------------------------------- tensors past 2**31 elements
# gpu_big, not gpu: about 40 GB each, which beside a dozen test workers runs the GPU out of memory;
# scripts/gpu.sh runs them on their own after the tier (about 5 s each on an H200).
def _check_slices(q, k, v, out, dout, grads, index_q, index_k, causal):
    """Out and gradients of the batch entries / tokens picked by the index functions, against the
    reference run on those alone (attention never mixes batch entries or sequences)."""
    sub = [index_q(q), index_k(k), index_k(v)]
    ins_ref = [t.detach().float().requires_grad_() for t in sub]
    ins_pt = [t.detach().clone().requires_grad_() for t in sub]
    out_ref = attention_ref(*ins_ref, causal=causal)[0]
    out_pt = attention_ref(*ins_pt, causal=causal, upcast=False, reorder_ops=True)[0]
    assert_fa_close(index_q(out), out_ref, out_pt)
    d = index_q(dout)
    grads_ref = torch.autograd.grad(out_ref, ins_ref, d.float())
    grads_pt = torch.autograd.grad(out_pt, ins_pt, d)
    assert_grads_close([index_q(grads[0]), index_k(grads[1]), index_k(grads[2])], grads_ref, grads_pt)


@pytest.mark.gpu_big
def test_gpu_dense_past_2_pow_31_elements():
    batch, seqlen, nheads, d = 2050, 1024, 8, 128  # q, k, v, out: 2050 * 2**20 elements each (4.3 GB in bf16)
    assert batch * seqlen * nheads * d > 2**31
    q, k, v = (torch.randn(batch, seqlen, nheads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = flashtron.flash_attn_func(*leaves, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    for b in (0, 2047, batch - 1):  # entry 2047 straddles element 2**31 of each tensor; 2049 lies past it
        pick = lambda t, b=b: t[b : b + 1]  # noqa: E731
        _check_slices(q, k, v, out, dout, grads, pick, pick, causal=True)


@pytest.mark.gpu_big
def test_gpu_varlen_past_2_pow_31_elements():
    nheads, d, length = 8, 128, 1000
    count = 2**31 // (nheads * d * length) + 3  # 2100 sequences: the last ones start past element 2**31
    total = count * length
    q, k, v = (torch.randn(total, nheads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.arange(0, total + 1, length, dtype=torch.int32, device="cuda")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = flashtron.flash_attn_varlen_func(*leaves, cu, cu, length, length, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    for s in (0, count - 1):
        pick = lambda t, s=s: t[s * length : (s + 1) * length].unsqueeze(0)  # noqa: E731
        _check_slices(q, k, v, out, dout, grads, pick, pick, causal=True)
