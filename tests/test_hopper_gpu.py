"""GPU tier for the Gluon Hopper kernels: a handful of calls through flash_attn_func with
FLASHTRON_BACKEND=gluon (forward on the Gluon kernel; backward with dK/dV on the Gluon kernel and delta
and dQ on the Triton kernels), on sm_90 only. Few cases on purpose: each Gluon variant is a fresh compile."""

from __future__ import annotations

import pytest
import torch

from attention_cases import check_attention

pytest.importorskip("triton.experimental.gluon", reason="needs triton with Gluon (3.6+)")


@pytest.fixture
def gluon_forward(monkeypatch):
    """Routes covered forwards to the Gluon kernel and counts the calls that took it."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon forward is sm_90 only")
    from flashtron import launch_hopper

    calls = []
    original = launch_hopper.attention_forward
    monkeypatch.setattr(launch_hopper, "attention_forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    monkeypatch.setenv("FLASHTRON_BACKEND", "gluon")
    return calls


CASES = [
    # (batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, causal, window, layouts)
    (2, 257, 257, 4, 4, 128, torch.bfloat16, False, (-1, -1), ("contiguous",) * 3),
    (2, 129, 1000, 8, 2, 64, torch.float16, True, (-1, -1), ("contiguous",) * 3),
    (1, 1000, 127, 4, 1, 128, torch.bfloat16, True, (-1, -1), ("bhsd", "contiguous", "bhsd")),
    (1, 513, 513, 2, 2, 64, torch.bfloat16, False, (100, 8), ("contiguous",) * 3),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_gluon_forward_through_api(gluon_forward, case):
    batch, sq, sk, h, hk, d, dtype, causal, window, layouts = case
    check_attention(batch, sq, sk, h, hk, d, d, dtype, "cuda", causal=causal, window=window, layouts=layouts)
    assert gluon_forward, "the forward did not take the Gluon kernel"


@pytest.mark.gpu
def test_uncovered_calls_stay_on_triton(gluon_forward):
    # head dim 96 and the sliced layout (unaligned base) are not covered: the Triton forward runs
    check_attention(1, 65, 65, 2, 2, 96, 96, torch.bfloat16, "cuda", causal=True)
    check_attention(1, 65, 65, 2, 2, 64, 64, torch.bfloat16, "cuda", layouts=("sliced",) * 3, backward=False)
    assert not gluon_forward


@pytest.fixture
def gluon_backward(monkeypatch):
    """Routes covered backwards' dK/dV to the Gluon kernel and counts the calls that took it."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are sm_90 only")
    from flashtron import launch_hopper

    calls = []
    original = launch_hopper.attention_backward_dkdv
    monkeypatch.setattr(
        launch_hopper, "attention_backward_dkdv", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    monkeypatch.setenv("FLASHTRON_BACKEND", "gluon")
    return calls


BWD_CASES = [
    # (batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, causal, window, layouts)
    (1, 300, 300, 8, 2, 128, torch.bfloat16, True, (-1, -1), ("contiguous",) * 3),  # GQA 4:1
    (2, 129, 1000, 4, 2, 64, torch.float16, False, (-1, -1), ("bhsd", "contiguous", "bhsd")),  # sq < sk
    (1, 1000, 127, 2, 2, 128, torch.float16, True, (-1, -1), ("contiguous",) * 3),  # sq > sk: empty rows
    (1, 513, 700, 4, 1, 64, torch.bfloat16, False, (100, 8), ("contiguous",) * 3),  # window, MQA
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", BWD_CASES)
def test_gluon_backward_through_api(gluon_backward, case):
    batch, sq, sk, h, hk, d, dtype, causal, window, layouts = case
    check_attention(batch, sq, sk, h, hk, d, d, dtype, "cuda", causal=causal, window=window, layouts=layouts)
    assert gluon_backward, "the backward did not take the Gluon dK/dV kernel"


@pytest.mark.gpu
def test_gluon_backward_is_deterministic(gluon_backward):
    import flashtron

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 300, 8, 128, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    k, v = (torch.randn(1, 300, 2, 128, device="cuda", generator=g).to(torch.bfloat16).requires_grad_() for _ in "kv")
    out = flashtron.flash_attn_func(q, k, v, causal=True, deterministic=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    assert len(gluon_backward) == 2
    for name, a, b in zip("qkv", first, second):
        assert torch.equal(a, b), f"d{name} differs between two runs"


@pytest.fixture
def gluon_dq(monkeypatch):
    """Routes covered backwards' dK/dV and dQ to the Gluon kernels and counts the dQ calls."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are sm_90 only")
    from flashtron import launch_hopper

    calls = []
    original = launch_hopper.attention_backward_dq
    monkeypatch.setattr(launch_hopper, "attention_backward_dq", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    monkeypatch.setenv("FLASHTRON_BACKEND", "gluon")
    monkeypatch.setenv("FLASHTRON_GLUON_DQ", "1")
    return calls


@pytest.mark.gluon_unverified
@pytest.mark.parametrize("case", BWD_CASES)
def test_gluon_dq_through_api(gluon_dq, case):
    """The Gluon dQ kernel (FLASHTRON_GLUON_DQ=1) inside the public backward, against the reference.

    Marked gluon_unverified, not gpu: the kernel has only been compiled for sm_90 on a CPU, so the GPU tier
    (`-m gpu`) does not run it. Once a GPU run (`pytest -m gluon_unverified tests/test_hopper_gpu.py`, and
    scripts/gluon_check.py --backward) has passed it, its marker becomes gpu."""
    batch, sq, sk, h, hk, d, dtype, causal, window, layouts = case
    check_attention(batch, sq, sk, h, hk, d, d, dtype, "cuda", causal=causal, window=window, layouts=layouts)
    assert gluon_dq, "the backward did not take the Gluon dQ kernel"


@pytest.mark.gluon_unverified
def test_gluon_dq_is_deterministic(gluon_dq):
    """Two backwards with the Gluon dQ agree bit for bit (no atomics). gluon_unverified until a GPU run has
    passed it (see test_gluon_dq_through_api)."""
    import flashtron

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 300, 8, 128, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    k, v = (torch.randn(1, 300, 2, 128, device="cuda", generator=g).to(torch.bfloat16).requires_grad_() for _ in "kv")
    out = flashtron.flash_attn_func(q, k, v, causal=True, deterministic=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, q, dout, retain_graph=True)[0]
    second = torch.autograd.grad(out, q, dout)[0]
    assert len(gluon_dq) == 2
    assert torch.equal(first, second), "dq differs between two runs"


@pytest.mark.gpu
def test_gluon_dq_needs_the_switch(gluon_backward, monkeypatch):
    # without FLASHTRON_GLUON_DQ the Gluon dK/dV runs and dQ stays on the Triton kernel (the default)
    from flashtron import launch_hopper

    monkeypatch.delenv("FLASHTRON_GLUON_DQ", raising=False)
    dq_calls = []
    monkeypatch.setattr(launch_hopper, "attention_backward_dq", lambda *a, **kw: dq_calls.append(1))
    check_attention(1, 129, 129, 2, 2, 128, 128, torch.bfloat16, "cuda", causal=True)
    assert gluon_backward and not dq_calls


@pytest.fixture
def gluon_fused(monkeypatch):
    """Routes covered backwards with deterministic=False to the FUSED_DQ dK/dV kernel and counts its calls."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are sm_90 only")
    from flashtron import launch_hopper

    calls = []
    original = launch_hopper.attention_backward_fused
    monkeypatch.setattr(
        launch_hopper, "attention_backward_fused", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    monkeypatch.setenv("FLASHTRON_BACKEND", "gluon")
    monkeypatch.setenv("FLASHTRON_GLUON_FUSED_DQ", "1")
    return calls


@pytest.mark.gluon_unverified
@pytest.mark.parametrize("case", BWD_CASES)
def test_gluon_fused_dq_through_api(gluon_fused, case):
    """dQ added inside the Gluon dK/dV kernel (FLASHTRON_GLUON_FUSED_DQ=1, deterministic=False, flash_attn's
    default) through the public backward, against the reference by the tests' rule. gluon_unverified: compiled
    for sm_90 on a CPU only; its marker becomes gpu once `pytest -m gluon_unverified tests/test_hopper_gpu.py`
    and scripts/gluon_check.py --backward have passed it on a GPU."""
    batch, sq, sk, h, hk, d, dtype, causal, window, layouts = case
    check_attention(batch, sq, sk, h, hk, d, d, dtype, "cuda", causal=causal, window=window, layouts=layouts)
    assert gluon_fused, "the backward did not take the fused dQ"


@pytest.mark.gluon_unverified
def test_gluon_fused_dq_never_deterministic(gluon_fused, monkeypatch):
    """deterministic=True keeps the deterministic kernels even with the switch set: two runs bit for bit."""
    import flashtron
    from flashtron import launch_hopper

    def refuse(*a, **kw):
        raise AssertionError("deterministic=True took the fused dQ")

    monkeypatch.setattr(launch_hopper, "attention_backward_fused", refuse)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 300, 8, 128, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    k, v = (torch.randn(1, 300, 2, 128, device="cuda", generator=g).to(torch.bfloat16).requires_grad_() for _ in "kv")
    out = flashtron.flash_attn_func(q, k, v, causal=True, deterministic=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
