"""GPU tier for the Gluon Hopper kernels: a handful of calls through flash_attn_func with
FLASHTRON_BACKEND=gluon (forward on the Gluon kernel; backward with dK/dV on the Gluon kernel and delta
and dQ on the Triton kernels), on sm_90 only. Few cases on purpose: each Gluon variant is a fresh compile."""

from __future__ import annotations

import pytest
import torch

from attention_cases import check_attention

pytest.importorskip("triton.experimental.gluon", reason="needs triton with Gluon (3.6+)")


def _count_launches(monkeypatch, launcher: str, **env) -> list:
    """Skips off sm_90; sets FLASHTRON_BACKEND=gluon and env (a None value unsets the variable); wraps
    launch_hopper.<launcher> so that each call that takes it appends to the returned list."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are sm_90 only")
    from flashtron import launch_hopper

    calls = []
    original = getattr(launch_hopper, launcher)
    monkeypatch.setattr(launch_hopper, launcher, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    for name, value in {"FLASHTRON_BACKEND": "gluon", **env}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return calls


@pytest.fixture
def gluon_forward(monkeypatch):
    """Routes covered forwards to the Gluon kernel and counts the calls that took it."""
    return _count_launches(monkeypatch, "attention_forward")


CASES = [
    # (batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, causal, window, layouts)
    (2, 257, 257, 4, 4, 128, torch.bfloat16, False, (-1, -1), ("contiguous",) * 3),
    (2, 129, 1000, 8, 2, 64, torch.float16, True, (-1, -1), ("contiguous",) * 3),
    (1, 1000, 127, 4, 1, 128, torch.bfloat16, True, (-1, -1), ("bhsd", "contiguous", "bhsd")),
    (1, 513, 513, 2, 2, 64, torch.bfloat16, False, (100, 8), ("contiguous",) * 3),
    # head dim 256: the Gluon forward by default since the fifth session of 2026-12-02, its backward on Triton
    (2, 300, 257, 4, 2, 256, torch.bfloat16, True, (-1, -1), ("contiguous",) * 3),
    (1, 129, 1000, 2, 1, 256, torch.float16, False, (100, 8), ("bhsd", "contiguous", "bhsd")),
    (1, 1000, 1000, 2, 2, 256, torch.bfloat16, False, (-1, -1), ("contiguous",) * 3),
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
    return _count_launches(monkeypatch, "attention_backward_dkdv")


BWD_CASES = [
    # (batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, causal, window, layouts)
    (1, 300, 300, 8, 2, 128, torch.bfloat16, True, (-1, -1), ("contiguous",) * 3),  # GQA 4:1
    (2, 129, 1000, 4, 2, 64, torch.float16, False, (-1, -1), ("bhsd", "contiguous", "bhsd")),  # sq < sk
    (1, 1000, 127, 2, 2, 128, torch.float16, True, (-1, -1), ("contiguous",) * 3),  # sq > sk: empty rows
    (1, 513, 700, 4, 1, 64, torch.bfloat16, False, (100, 8), ("contiguous",) * 3),  # window, MQA
]


# Each Gluon backward route (fixture: what its calls are counted as), through the public backward against the
# reference: the dK/dV kernel with the Triton dQ (the default at d128); the Gluon dQ (FLASHTRON_GLUON_DQ=1);
# dQ added inside the dK/dV kernel (FLASHTRON_GLUON_FUSED_DQ=1, deterministic=False, flash_attn's default). The
# last two first passed on an H200 on 2026-12-02 (with gluon_check.py --backward's check-dq / check-fused, 84/84).
BWD_ROUTES = {
    "gluon_backward": "the Gluon dK/dV kernel",
    "gluon_dq": "the Gluon dQ kernel",
    "gluon_fused": "the fused dQ",
    "gluon_lean_mask": "the dK/dV kernel with LEAN_MASK",  # not run on a GPU yet
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", BWD_CASES)
@pytest.mark.parametrize("route", list(BWD_ROUTES))
def test_gluon_backward_routes_through_api(request, route, case):
    calls = request.getfixturevalue(route)
    batch, sq, sk, h, hk, d, dtype, causal, window, layouts = case
    check_attention(batch, sq, sk, h, hk, d, d, dtype, "cuda", causal=causal, window=window, layouts=layouts)
    assert calls, f"the backward did not take {BWD_ROUTES[route]}"


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
    return _count_launches(monkeypatch, "attention_backward_dq", FLASHTRON_GLUON_DQ="1")


@pytest.mark.gpu
def test_gluon_dq_is_deterministic(gluon_dq):
    """Two backwards with the Gluon dQ agree bit for bit (no atomics)."""
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
    return _count_launches(monkeypatch, "attention_backward_fused", FLASHTRON_GLUON_FUSED_DQ="1")


@pytest.fixture
def gluon_lean_mask(monkeypatch):
    """As gluon_backward, the dK/dV kernel on the LEAN_MASK candidate's tiles (launch_hopper.CANDIDATE_BWD_TILES
    ["lean-mask"], not dispatched: launch.attention_backward passes no tile, so it goes in here)."""
    from flashtron import launch_hopper

    tiles = launch_hopper.CANDIDATE_BWD_TILES["lean-mask"]
    original = launch_hopper.attention_backward_dkdv
    monkeypatch.setattr(
        launch_hopper, "attention_backward_dkdv", lambda q, *a, **kw: original(q, *a, tile=tiles[q.shape[-1]], **kw)
    )
    return _count_launches(monkeypatch, "attention_backward_dkdv")


@pytest.mark.gpu
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


# Softcap and varlen in the Gluon forward (issue 15), forced with FLASHTRON_BACKEND=gluon: they passed on an H200 on
# 2026-12-02 (these tests and gluon_check.py's check-features, 100/100 cases); the default dispatch sends only
# varlen at head dim 128 there, where it timed faster than the Triton forward (launch_hopper.GLUON_GATED_FEATURES).
SOFTCAP_CASES = [
    # (batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, causal, window, softcap)
    (2, 257, 257, 4, 2, 128, torch.bfloat16, False, (-1, -1), 30.0),
    (1, 1000, 127, 4, 1, 128, torch.float16, True, (-1, -1), 5.0),  # sq > sk: empty rows
    (2, 129, 1000, 8, 2, 64, torch.bfloat16, False, (100, 8), 50.0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", SOFTCAP_CASES)
def test_gluon_forward_softcap_through_api(gluon_forward, case):
    """softcap on the Gluon forward, the backward on the Triton kernels (covers_backward refuses softcap)."""
    batch, sq, sk, h, hk, d, dtype, causal, window, softcap = case
    check_attention(batch, sq, sk, h, hk, d, d, dtype, "cuda", causal=causal, window=window, softcap=softcap)
    assert gluon_forward, "the forward did not take the Gluon kernel"


VARLEN_CASES = [
    # (lengths_q, lengths_k, seqused_k or None, nheads, nheads_k, d, dtype, causal, window, softcap)
    ([300, 0, 1, 129, 257], [257, 5, 0, 1000, 129], None, 4, 2, 128, torch.bfloat16, True, (-1, -1), 0.0),
    ([17, 128, 1000], [129, 128, 1], [100, 0, 1], 4, 1, 64, torch.float16, False, (-1, -1), 0.0),
    ([513, 1, 200], [700, 300, 200], None, 2, 2, 128, torch.float16, False, (100, 8), 20.0),
    ([0, 129, 64], [1, 127, 1000], [1, 50, 999], 8, 2, 64, torch.bfloat16, True, (-1, -1), 10.0),
    ([300, 77, 1], [257, 1000, 0], None, 2, 1, 256, torch.bfloat16, False, (-1, -1), 0.0),  # head dim 256
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", VARLEN_CASES)
def test_gluon_forward_varlen_through_api(gluon_forward, case):
    """flash_attn_varlen_func on the Gluon forward (out and lse against the reference, NaN-poisoned outputs,
    empty rows and sequences), the backward on the Triton kernels (covers_backward refuses varlen)."""
    import flashtron
    from flashtron.reference import attention_varlen_ref
    from tolerance import assert_fa_close

    lens_q, lens_k, used, h, hk, d, dtype, causal, window, softcap = case
    cu_q, cu_k = (torch.tensor([0, *lens], device="cuda").cumsum(0).to(torch.int32) for lens in (lens_q, lens_k))
    seqused_k = None if used is None else torch.tensor(used, dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(sum(lens_q))
    q = torch.randn(sum(lens_q), h, d, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(sum(lens_k), hk, d, device="cuda", generator=g).to(dtype) for _ in "kv")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    kw = dict(causal=causal, window_size=window, softcap=softcap, seqused_k=seqused_k)
    out, lse = flashtron.flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True, **kw)
    assert gluon_forward, "the forward did not take the Gluon kernel"
    ins_ref, ins_pt = ([t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2))
    out_ref, lse_ref = attention_varlen_ref(*ins_ref, cu_q, cu_k, upcast=True, **kw)
    out_pt, lse_pt = attention_varlen_ref(*ins_pt, cu_q, cu_k, upcast=False, reorder_ops=True, **kw)
    assert_fa_close(out, out_ref, out_pt, name="out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)), "lse: -inf pattern differs"
    finite = torch.isfinite(lse_ref)
    assert_fa_close(lse[finite], lse_ref[finite], lse_pt.float()[finite], name="lse")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    grads_ref = torch.autograd.grad(out_ref, ins_ref, dout.float())
    grads_pt = torch.autograd.grad(out_pt, ins_pt, dout)
    for a, r, p, n in zip(grads, grads_ref, grads_pt, "qkv"):
        assert_fa_close(a, r, p, factor=3.0, name="d" + n)


@pytest.mark.gpu
def test_gluon_varlen_rows_outside_sequences(gluon_forward):
    """Padding rows before cu_seqlens_q[0] and from cu_seqlens_q[-1] on: out 0 and lse -inf there (the Triton fill
    kernel after the Gluon varlen forward, launch_hopper.fill_outside_rows), never the poisoned allocation; the
    rows inside against the reference."""
    import flashtron
    from flashtron.reference import attention_varlen_ref
    from tolerance import assert_fa_close

    cu_q, cu_k, total_q, total_k = [3, 100, 250], [2, 120, 300], 400, 360
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(total_q, 4, 128, device="cuda", generator=g).to(torch.bfloat16)
    k, v = (torch.randn(total_k, 2, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in "kv")
    i32 = lambda c: torch.tensor(c, dtype=torch.int32, device="cuda")  # noqa: E731
    out, lse = flashtron.flash_attn_varlen_func(q, k, v, i32(cu_q), i32(cu_k), 150, 180, causal=True, return_lse=True)
    assert gluon_forward, "the forward did not take the Gluon kernel"
    outside = torch.ones(total_q, dtype=torch.bool, device="cuda")
    outside[cu_q[0] : cu_q[-1]] = False
    assert (out[outside] == 0).all() and torch.isneginf(lse[:, outside]).all()
    rows_q, rows_k = slice(cu_q[0], cu_q[-1]), slice(cu_k[0], cu_k[-1])
    shifted = [i32([c - cu[0] for c in cu]) for cu in (cu_q, cu_k)]
    ref = [attention_varlen_ref(q[rows_q], k[rows_k], v[rows_k], *shifted, causal=True, upcast=upcast,
                                reorder_ops=not upcast) for upcast in (True, False)]  # fmt: skip
    assert_fa_close(out[rows_q], ref[0][0], ref[1][0], name="out")
    assert_fa_close(lse[:, rows_q], ref[0][1], ref[1][1].float(), name="lse")


# Keys outside their sequence (review, 2026-12-02): a sequence's last, partial key block reads the next sequence's
# rows or the padding's into the K/V slot. Here the rows no query may read hold K NaN and V Inf (rows past
# seqused_k, sequences without queries, NaN padding after cu_seqlens_k[-1]: attention_cases.poison_unread_keys), so
# a V row that reaches the P V wgmma unzeroed (0 x Inf) or a key score added to the mask instead of replaced by it
# makes out NaN. And a last sequence with queries but no key, whose K/V box lies wholly past the tensor (TMA
# zero-fills it, and must still complete the byte count, or the consumers hang) or on the padding: out 0 and lse
# -inf there, as the reference and the Triton forward give.
VARLEN_POISON_CASES = [
    # (lengths_q, lengths_k, seqused_k or None, padding rows, nheads, nheads_k, d, dtype, causal, softcap)
    ([300, 0, 129, 1], [257, 50, 200, 1], None, 37, 4, 2, 128, torch.bfloat16, False, 0.0),  # 257: 1 row of a block
    ([129, 40, 513], [200, 300, 700], [100, 0, 650], 64, 4, 1, 64, torch.float16, True, 0.0),
    ([200, 77], [131, 0], None, 0, 2, 2, 128, torch.bfloat16, True, 0.0),  # no key: box past the tensor
    ([200, 77], [131, 0], None, 20, 2, 1, 64, torch.bfloat16, False, 10.0),  # no key: box on the padding
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", VARLEN_POISON_CASES)
def test_gluon_forward_varlen_keys_outside_sequences(gluon_forward, case):
    """flash_attn_varlen_func's forward on the Gluon kernel with NaN / Inf in every K/V row outside the
    sequences' used keys: out and lse against the reference, which slices the sequences (NaN-poisoned outputs)."""
    import flashtron
    from attention_cases import poison_unread_keys
    from flashtron.reference import attention_varlen_ref
    from tolerance import assert_fa_close

    lens_q, lens_k, used, pad, h, hk, d, dtype, causal, softcap = case
    cu_q, cu_k = (torch.tensor([0, *lens], device="cuda").cumsum(0).to(torch.int32) for lens in (lens_q, lens_k))
    seqused_k = None if used is None else torch.tensor(used, dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(sum(lens_k) + pad)
    q = torch.randn(sum(lens_q), h, d, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(sum(lens_k), hk, d, device="cuda", generator=g).to(dtype) for _ in "kv")
    k, v = poison_unread_keys(k, v, cu_q, cu_k, seqused_k, pad)
    kw = dict(causal=causal, softcap=softcap, seqused_k=seqused_k)
    out, lse = flashtron.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True, **kw)
    assert gluon_forward, "the forward did not take the Gluon kernel"
    assert not out.isnan().any(), "NaN in out: a key outside its sequence reached the kernel's sums"
    out_ref, lse_ref = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=True, **kw)
    out_pt, lse_pt = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False, reorder_ops=True, **kw)
    assert_fa_close(out, out_ref, out_pt, name="out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)), "lse: -inf pattern differs"
    finite = torch.isfinite(lse_ref)
    assert_fa_close(lse[finite], lse_ref[finite], lse_pt.float()[finite], name="lse")


@pytest.mark.gpu
def test_gated_features_stay_on_triton_by_default(monkeypatch):
    """With FLASHTRON_BACKEND unset, softcap calls, and varlen calls at head dim 64, run on the Triton forward
    (GLUON_GATED_FEATURES: timed slower there); varlen calls at head dim 128 and dense calls take the Gluon one."""
    import flashtron

    calls = _count_launches(monkeypatch, "attention_forward", FLASHTRON_BACKEND=None)
    check_attention(1, 129, 129, 2, 2, 128, 128, torch.bfloat16, "cuda", causal=True, softcap=30.0)
    assert not calls, "softcap took the Gluon forward by default"
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")
    for d, expected in ((64, 0), (128, 1)):
        q, k, v = (torch.randn(300, 2, d, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
        flashtron.flash_attn_varlen_func(q, k, v, cu, cu, 200, 200, causal=True)
        assert len(calls) == expected, f"varlen d{d}: {len(calls)} Gluon forwards, expected {expected}"
    check_attention(1, 129, 129, 2, 2, 64, 64, torch.bfloat16, "cuda", causal=True, backward=False)
    assert len(calls) == 2, "the dense call did not take the Gluon forward"


@pytest.mark.gpu
def test_default_dispatch_tiles(monkeypatch):
    """With FLASHTRON_BACKEND unset, covered dense forwards at head dims 64 and 128 take the Gluon kernel on the
    persistent grid (dynamic schedule at d128), except causal d128 calls without a left window past
    PERSISTENT_CAUSAL_MAX_SEQLEN, which take the one-tile grid, as d256 always does
    (launch_hopper.dispatched_tile); each result against the reference by the tests' rule."""
    from flashtron import launch_hopper

    calls = _count_launches(monkeypatch, "attention_forward", FLASHTRON_BACKEND=None)
    tiles = []
    original = launch_hopper.dispatched_tile
    monkeypatch.setattr(
        launch_hopper, "dispatched_tile", lambda *a, **kw: tiles.append(original(*a, **kw)) or tiles[-1]
    )
    long_q = launch_hopper.PERSISTENT_CAUSAL_MAX_SEQLEN[128] + 100
    # (head dim, rows, causal, window, persistent, dynamic schedule)
    for d, sq, causal, window, persistent, dynamic in (
        (64, 1000, True, (-1, -1), True, False), (128, 700, False, (-1, -1), True, True),
        (128, 700, True, (-1, -1), True, True), (128, long_q, True, (-1, -1), False, False),
        (128, long_q, False, (-1, -1), True, True), (128, long_q, True, (300, 0), True, True),
        (64, 3000, True, (-1, -1), True, True), (256, 700, True, (-1, -1), False, False),
    ):  # fmt: skip
        before = len(calls)
        check_attention(1, sq, sq, 2, 2, d, d, torch.bfloat16, "cuda", causal=causal, window=window, backward=False)
        assert len(calls) == before + 1, f"d{d} sq={sq} causal={causal}: not the Gluon forward"
        assert tiles[-1].persistent == persistent, f"d{d} sq={sq} causal={causal}: {tiles[-1]}"
        assert tiles[-1].dynamic == dynamic, f"d{d} sq={sq} causal={causal}: {tiles[-1]}"
