"""Empty inputs: batch 0, seqlen_q 0, seqlen_k 0 and empty varlen sequences give correctly shaped
results and gradients on every path (flash_attn itself refuses batch 0).

What "correct" means for an empty problem: outputs and lse have the shapes the API promises; a query
row with no key to attend to has output 0 and lse -inf (the sink logit with a learnable_sink), as
API.md says; every gradient has its input's shape, is finite, and is 0 wherever no query and key
met. Default tier: the CPU path; `-m interpret`: the Triton kernels; `-m gpu`: CUDA.
"""

from __future__ import annotations

import pytest
import torch

import flashtron

H, HK, D, DV = 4, 2, 16, 8
DENSE = [(0, 3, 5), (2, 0, 5), (2, 3, 0), (0, 0, 0), (1, 0, 0)]  # (batch, seqlen_q, seqlen_k)
VARLEN = {
    "batch-0": ([0], [0]),
    "empty-sequences": ([0, 0, 3, 3, 5], [0, 2, 2, 5, 5]),  # q empty; k empty; both empty; both present
    "no-keys": ([0, 2, 5], [0, 0, 0]),
    "no-queries": ([0, 0, 0], [0, 3, 7]),
}


def _leaf(*shape, device):
    return torch.randn(*shape).to(device).requires_grad_()


def _check_grads(*tensors):
    for t in tensors:
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype
        assert torch.isfinite(t.grad).all()


def check_dense(device, b, sq, sk, causal, sink):
    q, k, v = _leaf(b, sq, H, D, device=device), _leaf(b, sk, HK, D, device=device), _leaf(b, sk, HK, DV, device=device)
    s = _leaf(H, device=device) if sink else None
    out, lse = flashtron.flash_attn_func(q, k, v, causal=causal, learnable_sink=s, return_lse=True)
    assert out.shape == (b, sq, H, DV) and out.dtype == q.dtype
    assert lse.shape == (b, H, sq) and lse.dtype == torch.float32
    if sk == 0:  # nothing to attend to: out 0, lse -inf (the sink's logit with a sink)
        assert torch.equal(out, torch.zeros_like(out))
        if sink:  # the kernels fold the sink in log2 units: equal up to fp32 rounding
            torch.testing.assert_close(lse.detach(), s.detach()[None, :, None].expand_as(lse))
        else:
            assert torch.isneginf(lse).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    _check_grads(q, k, v, *([s] if sink else []))
    if sq * b == 0 or sk == 0:  # no (query, key) pair met: no gradient anywhere but the sink's
        for t in (q, k, v):
            assert torch.equal(t.grad, torch.zeros_like(t))


def check_varlen(device, name, causal):
    cu_q, cu_k = VARLEN[name]
    q, k = _leaf(cu_q[-1], H, D, device=device), _leaf(cu_k[-1], HK, D, device=device)
    v = _leaf(cu_k[-1], HK, DV, device=device)
    to = lambda c: torch.tensor(c, dtype=torch.int32, device=device)
    longest = lambda c: max([b - a for a, b in zip(c, c[1:])], default=0)
    out, lse = flashtron.flash_attn_varlen_func(
        q, k, v, to(cu_q), to(cu_k), longest(cu_q), longest(cu_k), causal=causal, return_lse=True
    )
    assert out.shape == (cu_q[-1], H, DV) and lse.shape == (H, cu_q[-1])
    for i in range(len(cu_q) - 1):
        if cu_k[i + 1] == cu_k[i]:  # this sequence's queries have no keys
            rows = slice(cu_q[i], cu_q[i + 1])
            assert torch.equal(out[rows], torch.zeros_like(out[rows]))
            assert torch.isneginf(lse[:, rows]).all()
    assert torch.isfinite(out).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    _check_grads(q, k, v)
    for i in range(len(cu_q) - 1):
        if cu_q[i + 1] == cu_q[i]:  # keys no query saw
            keys = slice(cu_k[i], cu_k[i + 1])
            assert torch.equal(k.grad[keys], torch.zeros_like(k.grad[keys]))
            assert torch.equal(v.grad[keys], torch.zeros_like(v.grad[keys]))


def check_rows_outside_sequences(device):
    """cu_seqlens that start after row 0 and end before the last row (padding around the packed tokens, which
    flash_attn accepts): those rows belong to no sequence, so out 0, lse -inf and every gradient 0 there,
    never the poisoned (NaN) allocation; the covered rows as the CPU path computes them."""
    cu_q, cu_k, total_q, total_k = [3, 10, 25], [2, 12, 30], 40, 36
    gen = torch.Generator().manual_seed(11)
    leaves = [torch.randn(n, h, d, generator=gen) for n, h, d in ((total_q, H, D), (total_k, HK, D), (total_k, HK, DV))]
    dout = torch.randn(total_q, H, DV, generator=gen)
    results = {}
    for dev in dict.fromkeys(["cpu", device]):
        q, k, v = (t.to(dev).detach().requires_grad_() for t in leaves)  # fresh leaves per device
        i32 = lambda c, dev=dev: torch.tensor(c, dtype=torch.int32, device=dev)
        out, lse = flashtron.flash_attn_varlen_func(q, k, v, i32(cu_q), i32(cu_k), 15, 18, causal=True, return_lse=True)
        out.backward(dout.to(dev))
        results[dev] = [t.detach().cpu() for t in (out, lse, q.grad, k.grad, v.grad)]
    out, lse, dq, dk, dv = results[device]
    outside_q = torch.ones(total_q, dtype=torch.bool)
    outside_q[cu_q[0] : cu_q[-1]] = False
    outside_k = torch.ones(total_k, dtype=torch.bool)
    outside_k[cu_k[0] : cu_k[-1]] = False
    assert torch.equal(out[outside_q], torch.zeros_like(out[outside_q]))
    assert torch.isneginf(lse[:, outside_q]).all()
    assert torch.equal(dq[outside_q], torch.zeros_like(dq[outside_q]))
    assert torch.equal(dk[outside_k], torch.zeros_like(dk[outside_k]))
    assert torch.equal(dv[outside_k], torch.zeros_like(dv[outside_k]))
    for ours, cpu in zip(results[device], results["cpu"]):
        assert torch.allclose(ours, cpu, atol=1e-4, rtol=1e-4)


def check_packed(device):
    qkv = _leaf(0, 5, 3, H, D, device=device)
    out = flashtron.flash_attn_qkvpacked_func(qkv, causal=True)
    assert out.shape == (0, 5, H, D)
    out.sum().backward()
    _check_grads(qkv)
    out, lse, probs = flashtron.flash_attn_func(
        *(_leaf(2, 0, H, D, device=device) for _ in range(3)), return_attn_probs=True
    )
    assert out.shape == (2, 0, H, D) and lse.shape == (2, H, 0) and probs.shape[:3] == (2, H, 0)


def check_kvcache(device, paged):
    """batch 0, seqlen_q 0 with an append (the caches still get the new keys), and rows with no keys."""
    gen = torch.Generator().manual_seed(5)
    rn = lambda *s: torch.randn(*s, generator=gen).to(device)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32, device=device)
    if paged:
        k_cache, v_cache = rn(6, 4, HK, D), rn(6, 4, HK, DV)
        table = lambda b: torch.arange(3 * b, dtype=torch.int32, device=device).view(b, 3)  # 12 positions per row
    else:
        k_cache, v_cache = rn(2, 12, HK, D), rn(2, 12, HK, DV)
        table = lambda b: None
    # batch 0, with and without new keys
    for new in (0, 1):
        kn = rn(0, new, HK, D) if new else None
        vn = rn(0, new, HK, DV) if new else None
        before = k_cache.clone()
        out, lse = flashtron.flash_attn_with_kvcache(
            rn(0, 1, H, D), k_cache, v_cache, kn, vn, cache_seqlens=i32(), block_table=table(0), return_softmax_lse=True
        )
        assert out.shape == (0, 1, H, DV) and lse.shape == (0, H, 1) and torch.equal(k_cache, before)
    # seqlen_q 0 with an append: the keys still land
    kn, vn = rn(2, 2, HK, D), rn(2, 2, HK, DV)
    out, lse = flashtron.flash_attn_with_kvcache(
        rn(2, 0, H, D),
        k_cache,
        v_cache,
        kn,
        vn,
        cache_seqlens=i32(3, 10),
        block_table=table(2),
        return_softmax_lse=True,
    )
    assert out.shape == (2, 0, H, DV) and lse.shape == (2, H, 0)
    for b, start in ((0, 3), (1, 10)):
        for t in range(2):
            pos = start + t
            if paged:
                page, slot = int(table(2)[b, pos // 4]), pos % 4
                assert torch.equal(k_cache[page, slot], kn[b, t]) and torch.equal(v_cache[page, slot], vn[b, t])
            else:
                assert torch.equal(k_cache[b, pos], kn[b, t]) and torch.equal(v_cache[b, pos], vn[b, t])
    # rows with no keys: out 0, lse -inf
    out, lse = flashtron.flash_attn_with_kvcache(
        rn(2, 3, H, D), k_cache, v_cache, cache_seqlens=i32(0, 0), block_table=table(2), return_softmax_lse=True
    )
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# ------------------------------------------------------------------------------------------------
# tiers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,sq,sk", DENSE)
def test_dense_empty_cpu(b, sq, sk, causal, sink):
    check_dense("cpu", b, sq, sk, causal, sink)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(VARLEN))
def test_varlen_empty_cpu(name, causal):
    check_varlen("cpu", name, causal)


def test_rows_outside_sequences_cpu():
    check_rows_outside_sequences("cpu")


def test_packed_empty_cpu():
    check_packed("cpu")


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_empty_cpu(paged):
    check_kvcache("cpu", paged)


@pytest.mark.interpret
@pytest.mark.parametrize("b,sq,sk", DENSE)
def test_dense_empty_interpret(kernel_device, b, sq, sk):
    check_dense(kernel_device, b, sq, sk, causal=sq == 3, sink=sk == 0)


@pytest.mark.interpret
@pytest.mark.parametrize("name", list(VARLEN))
def test_varlen_empty_interpret(kernel_device, name):
    check_varlen(kernel_device, name, causal=True)


@pytest.mark.interpret
def test_rows_outside_sequences_interpret(kernel_device):
    check_rows_outside_sequences(kernel_device)


@pytest.mark.interpret
def test_rows_outside_many_sequences_interpret(kernel_device):
    """More sequences than the fill reads cu_seqlens entries at a time (256): the extent still spans all."""
    gen = torch.Generator().manual_seed(12)
    lens = torch.randint(1, 3, (260,), generator=gen)
    cu = torch.cat([torch.tensor([5]), 5 + lens.cumsum(0)]).to(torch.int32)
    total = int(cu[-1]) + 7
    q, k, v = (torch.randn(total, 1, 16, generator=gen).to(kernel_device).requires_grad_() for _ in range(3))
    cu = cu.to(kernel_device)
    out, lse = flashtron.flash_attn_varlen_func(q, k, v, cu, cu, 2, 2, causal=True, return_lse=True)
    out.backward(torch.randn(out.shape, generator=gen).to(kernel_device))
    outside = torch.ones(total, dtype=torch.bool, device=kernel_device)
    outside[int(cu[0]) : int(cu[-1])] = False
    assert torch.isfinite(out).all() and (out[outside] == 0).all() and torch.isneginf(lse[:, outside]).all()
    assert all((t.grad[outside] == 0).all() for t in (q, k, v))
    assert (out[~outside].abs().sum(-1) > 0).all()  # every covered row was computed


@pytest.mark.interpret
def test_packed_empty_interpret(kernel_device):
    check_packed(kernel_device)


@pytest.mark.interpret
@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_empty_interpret(kernel_device, paged):
    check_kvcache(kernel_device, paged)


@pytest.mark.gpu
@pytest.mark.parametrize("b,sq,sk", DENSE)
def test_dense_empty_gpu(b, sq, sk):
    check_dense("cuda", b, sq, sk, causal=True, sink=sk == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(VARLEN))
def test_varlen_empty_gpu(name):
    check_varlen("cuda", name, causal=True)


@pytest.mark.gpu
def test_rows_outside_sequences_gpu():
    check_rows_outside_sequences("cuda")


@pytest.mark.gpu
def test_packed_and_kvcache_empty_gpu():
    check_packed("cuda")
    check_kvcache("cuda", paged=False)
    check_kvcache("cuda", paged=True)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "cu, total",
    [
        ([3, 10, 25], 40),  # padding before and after the packed tokens
        ([0, 5, 5, 9], 9),  # none outside
        ([0], 6),  # no sequence: every row outside
        ([7, 2, 30, 12], 20),  # out of order and past the rows: the spans as the kernels clamp them
        ([5] + [5 + 2 * i for i in range(1, 262)], 530),  # more than 256 sequences (the fill reads 256 at a time)
    ],
)
def test_fill_outside_rows_interpret(kernel_device, cu, total):
    """launch_hopper.fill_outside_rows (the Gluon varlen forward's fill, a Triton kernel): out 0 and lse -inf in
    exactly the rows outside every sequence's clamped span, every other row untouched (NaN poison kept)."""
    from flashtron import launch_hopper

    nheads, d = 3, 40
    out = torch.full((total, nheads, d), float("nan"), device=kernel_device)
    lse = torch.full((nheads, total), float("nan"), device=kernel_device)
    launch_hopper.fill_outside_rows(out, lse, torch.tensor(cu, dtype=torch.int32, device=kernel_device))
    starts = [min(max(c, 0), total) for c in cu[:-1]]
    ends = [min(max(e, s), total) for s, e in zip(starts, cu[1:])]
    first = min(starts, default=total)
    last = max(max(ends, default=0), first)
    outside = torch.tensor([r < first or r >= last for r in range(total)])
    out, lse = out.cpu(), lse.cpu()
    assert (out[outside] == 0).all() and torch.isneginf(lse[:, outside]).all()
    assert torch.isnan(out[~outside]).all() and torch.isnan(lse[:, ~outside]).all()
