"""Code written for flash_attn runs unchanged: what flash_attn 2.8 accepts gives the same numbers as the
canonical form of the same call, through the real backends (test_validation.py checks the
normalisation itself against stubs).

The variants: a window_size given as a tensor (flash_attn's own tests pass torch.randint(0, seqlen,
(2,))), a numpy array or with a side below -1; a negative softcap; numpy and tensor ints; tensors
whose last dimension is not contiguous (copied, with gradients reaching the caller's tensor).
Default tier: the CPU path. `-m interpret`: the Triton kernels. `-m gpu`: the same on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashtron


def strided(t):
    """Same values, stride(-1) != 1."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(t.requires_grad)


def _inputs(device, b=2, sq=17, sk=33, h=4, hk=2, d=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    make = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).to(device).requires_grad_()
    return make(b, sq, h, d), make(b, sk, hk, d), make(b, sk, hk, d)


# (variant kwargs, canonical kwargs): flash_attn_func must give identical results for both
EQUIVALENT = {
    "window-tensor": (dict(window_size=torch.tensor([5, 0])), dict(window_size=(5, 0))),
    "window-randint": (dict(window_size=torch.randint(0, 17, (2,), generator=torch.Generator().manual_seed(3))), None),
    "window-numpy": (dict(window_size=np.array([4, 2])), dict(window_size=(4, 2))),
    "window-below-minus-one": (dict(window_size=(-2, 3)), dict(window_size=(-1, 3))),
    "window-both-negative": (dict(window_size=(-5, -9), causal=True), dict(causal=True)),
    "softcap-negative": (dict(softcap=-3.0), dict(softcap=0.0)),
    "scale-tensor": (dict(softmax_scale=torch.tensor(0.3)), dict(softmax_scale=0.3)),
    "causal-numpy": (dict(causal=np.True_), dict(causal=True)),
}


def _canonical(name):
    variant, canonical = EQUIVALENT[name]
    if canonical is None:  # the window tensor from torch.randint: its values as a tuple
        canonical = dict(window_size=tuple(variant["window_size"].tolist()))
    return variant, canonical


def _check_equivalent(device, name):
    variant, canonical = _canonical(name)
    q, k, v = _inputs(device)
    out = flashtron.flash_attn_func(q, k, v, **variant)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = flashtron.flash_attn_func(q, k, v, **canonical)
    ref.sum().backward()
    assert torch.equal(out, ref)
    for g, t in zip(grads, (q, k, v)):
        assert torch.equal(g, t.grad)


@pytest.mark.parametrize("name", list(EQUIVALENT))
def test_equivalent_arguments_cpu(name):
    _check_equivalent("cpu", name)


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["window-tensor", "window-below-minus-one", "softcap-negative"])
def test_equivalent_arguments_interpret(kernel_device, name):
    _check_equivalent(kernel_device, name)


def _check_strided(device):
    """q, k, v with stride(-1) != 1: the same output as contiguous copies, and the gradients reach the
    strided tensors the caller holds."""
    q, k, v = _inputs(device)
    qs, ks, vs = strided(q.detach()).requires_grad_(), strided(k.detach()).requires_grad_(), strided(v.detach())
    vs.requires_grad_()
    assert all(t.stride(-1) != 1 for t in (qs, ks, vs))
    out = flashtron.flash_attn_func(qs, ks, vs, causal=True)
    ref = flashtron.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    for got, want in ((qs, q), (ks, k), (vs, v)):
        assert got.grad is not None and torch.equal(got.grad, want.grad)

    # packed and varlen forms
    qkv = torch.stack([q.detach(), q.detach() * 0.5, q.detach() * 2], dim=2)
    packed = flashtron.flash_attn_qkvpacked_func(strided(qkv))
    assert torch.equal(packed, flashtron.flash_attn_qkvpacked_func(qkv))
    cu = torch.tensor([0, 9, 5, 9, 17, 9], dtype=torch.int32, device=device)[::2]  # (0, 5, 17), stride 2
    qv, kv_ = q.detach()[0], k.detach()[0, :17]
    out = flashtron.flash_attn_varlen_func(strided(qv), kv_, strided(kv_), cu, cu, 12, 12)
    assert torch.equal(out, flashtron.flash_attn_varlen_func(qv, kv_, kv_, cu.contiguous(), cu.contiguous(), 12, 12))


def test_strided_inputs_cpu():
    _check_strided("cpu")


@pytest.mark.interpret
def test_strided_inputs_interpret(kernel_device):
    _check_strided(kernel_device)


def _check_kvcache_variants(device):
    """flash_attn_with_kvcache with strided new keys, a transposed block table, numpy ints, a negative softcap,
    a 0-d tensor cache_seqlens (an int-like, API.md), window sides at least the capacity (unbounded, as
    flash_attn resets them) and return_lse instead of return_softmax_lse: the same output, lse and caches as
    the canonical call."""
    gen = torch.Generator().manual_seed(11)
    rn = lambda *s: torch.randn(*s, generator=gen).to(device)
    q, k_new, v_new = rn(2, 1, 4, 16), rn(2, 2, 2, 16), rn(2, 2, 2, 16)
    k_cache, v_cache = rn(6, 4, 2, 16), rn(6, 4, 2, 16)
    table = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32, device=device)
    canonical = dict(cache_seqlens=5, block_table=table, window_size=(-1, -1), softcap=0.0, num_splits=1,
                     return_softmax_lse=True)  # fmt: skip
    variant = dict(
        cache_seqlens=np.int64(5), block_table=table.t().contiguous().t(), window_size=torch.tensor([-3, -2]),
        softcap=-1.0, num_splits=torch.tensor(1), return_softmax_lse=True,
    )  # fmt: skip
    int_like = dict(cache_seqlens=torch.tensor(5, device=device), block_table=table, window_size=[12, 100],
                    num_splits=1, return_lse=True)  # fmt: skip
    caches = []
    outs = []
    for kw, kn, vn in ((canonical, k_new, v_new), (variant, strided(k_new), strided(v_new)), (int_like, k_new, v_new)):
        kc, vc = k_cache.clone(), v_cache.clone()
        outs.append(flashtron.flash_attn_with_kvcache(q, kc, vc, kn, vn, **kw))
        caches.append((kc, vc))
    for (out, lse), (kc, vc) in zip(outs[1:], caches[1:]):
        assert torch.equal(outs[0][0], out) and torch.equal(outs[0][1], lse)
        assert torch.equal(caches[0][0], kc) and torch.equal(caches[0][1], vc)


def _check_kvcache_window_past_capacity_rotary(device):
    """flash_attn resets a window side >= the cache capacity to -1 before choosing how q is rotated: with
    (capacity, capacity) every new query is rotated at cache_seqlens as without a window, while a window
    inside the capacity rotates each at its own position (seqlen_q 3, so the two differ)."""
    gen = torch.Generator().manual_seed(5)
    rn = lambda *s: torch.randn(*s, generator=gen).to(device)
    q, k_new, v_new = rn(2, 3, 4, 16), rn(2, 3, 2, 16), rn(2, 3, 2, 16)
    k_cache, v_cache = rn(2, 10, 2, 16), rn(2, 10, 2, 16)
    angles = torch.rand(10, 8, generator=gen).to(device) * 3
    cos, sin = angles.cos(), angles.sin()
    outs = {}
    for window in ((-1, -1), (10, 10), (9, 9)):
        kc, vc = k_cache.clone(), v_cache.clone()
        outs[window] = flashtron.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cos, sin, cache_seqlens=4,
                                                         window_size=window)  # fmt: skip
    assert torch.equal(outs[(10, 10)], outs[(-1, -1)])
    assert not torch.allclose(outs[(9, 9)], outs[(-1, -1)])  # per-token rotation of q: another result


def test_kvcache_window_past_capacity_rotary_cpu():
    _check_kvcache_window_past_capacity_rotary("cpu")


@pytest.mark.interpret
def test_kvcache_window_past_capacity_rotary_interpret(kernel_device):
    _check_kvcache_window_past_capacity_rotary(kernel_device)


def _check_kvcache_records_no_autograd(device):
    """flash_attn_with_kvcache has no backward: the output carries no grad_fn even when q requires grad, and
    appending new keys that require grad leaves the caller's caches out of any graph."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 4, 16, generator=gen).to(device).requires_grad_()
    k_new, v_new = (torch.randn(2, 1, 2, 16, generator=gen).to(device).requires_grad_() for _ in "kv")
    k_cache, v_cache = (torch.randn(2, 10, 2, 16, generator=gen).to(device) for _ in "kv")
    out = flashtron.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=4)
    assert out.grad_fn is None and not out.requires_grad
    assert not k_cache.requires_grad and not v_cache.requires_grad
    assert torch.equal(k_cache[:, 4], k_new.detach()[:, 0])  # the append still happened


def test_kvcache_records_no_autograd_cpu():
    _check_kvcache_records_no_autograd("cpu")


@pytest.mark.interpret
def test_kvcache_records_no_autograd_interpret(kernel_device):
    _check_kvcache_records_no_autograd(kernel_device)


def test_kvcache_variants_cpu():
    _check_kvcache_variants("cpu")


@pytest.mark.interpret
def test_kvcache_variants_interpret(kernel_device):
    _check_kvcache_variants(kernel_device)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["window-randint", "softcap-negative"])
def test_equivalent_arguments_gpu(name):
    _check_equivalent("cuda", name)


@pytest.mark.gpu
def test_strided_and_kvcache_variants_gpu():
    _check_strided("cuda")
    _check_kvcache_variants("cuda")
    _check_kvcache_window_past_capacity_rotary("cuda")
    _check_kvcache_records_no_autograd("cuda")
