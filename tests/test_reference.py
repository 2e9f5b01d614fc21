"""Tests of the reference (the specification) against SDPA and against hand computations.

Everything here runs on the CPU in float64 unless a test is about dtypes. Expected values come from
torch.nn.functional.scaled_dot_product_attention, from explicit Python loops, or from complex
arithmetic, never from the reference itself (except where the test is a consistency check between
two entry points of the reference, e.g. varlen vs dense, paged vs dense).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flashtron.reference import apply_rotary_ref, attention_ref, attention_varlen_ref, kvcache_ref

F64 = torch.float64
NEG_INF = float("-inf")


def randn(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# Masks written out by hand
# ----------------------------------------------------------------------------------------------------

MASK_CASES = {
    # (seqlen_q, seqlen_k, causal, window): visible pattern, rows = queries
    "causal_sq<sk": (3, 5, True, (-1, -1), [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
    "causal_sq>sk": (4, 2, True, (-1, -1), [[0, 0], [0, 0], [1, 0], [1, 1]]),
    "window_1_0": (3, 5, False, (1, 0), [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]),
    "window_0_1": (3, 3, False, (0, 1), [[1, 1, 0], [0, 1, 1], [0, 0, 1]]),
    "window_left_only": (3, 4, False, (1, -1), [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]),
    "causal_keeps_left": (3, 4, True, (1, 5), [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_mask_pattern_by_hand(case):
    sq, sk, causal, window, pattern = MASK_CASES[case]
    q, k, v = randn(1, sq, 1, 4), randn(1, sk, 1, 4), randn(1, sk, 1, 4)
    _, lse, probs = attention_ref(q, k, v, causal=causal, window_size=window)
    expected = torch.tensor(pattern, dtype=torch.bool)
    assert torch.equal(probs[0, 0] > 0, expected)
    empty_rows = ~expected.any(-1)
    assert torch.equal(torch.isneginf(lse[0, 0]), empty_rows)


# ----------------------------------------------------------------------------------------------------
# Against SDPA (float64)
# ----------------------------------------------------------------------------------------------------


def sdpa_attention(q, k, v, *, scale, causal, window, slopes):
    """SDPA with an explicit bottom-right mask; GQA by repeating kv heads. Returns out, lse, empty rows."""
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    kr = k.repeat_interleave(h // hk, dim=2)
    vr = v.repeat_interleave(h // hk, dim=2)
    i = torch.arange(sq).view(sq, 1)
    j = torch.arange(sk).view(1, sk)
    left, right = window
    if causal:
        right = 0
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        allowed &= j >= i + sk - sq - left
    if right >= 0:
        allowed &= j <= i + sk - sq + right
    if slopes is None:
        attn_mask = allowed
        bias = torch.zeros(1, 1, sq, sk, dtype=F64)
    else:
        s = slopes.double().view(-1, h, 1, 1)  # (1 or b, h, 1, 1)
        bias = -s * (i + sk - sq - j).abs().double()
        attn_mask = bias.masked_fill(~allowed, NEG_INF)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, kr, vr))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, scale=scale).transpose(1, 2)
    empty = ~allowed.any(-1)  # (sq,)
    out = torch.where(empty.view(1, sq, 1, 1), 0.0, out)  # SDPA gives NaN on rows with no key
    scores = (qt @ kt.transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(scores.masked_fill(~allowed, NEG_INF), dim=-1)
    return out, lse, allowed, empty


SDPA_SHAPES = [(1, 1), (1, 17), (17, 33), (33, 17), (17, 17), (5, 113)]
SDPA_HEADS = [(4, 4, 40, 40), (4, 2, 72, 72), (8, 1, 40, 24), (6, 3, 72, 40)]  # h, h_k, d, dv
SDPA_MODES = {
    "plain": dict(),
    "scale": dict(softmax_scale=0.37),
    "causal": dict(causal=True),
    "window": dict(window_size=(3, 2)),
    "window_left": dict(window_size=(5, -1)),
    "causal_window": dict(causal=True, window_size=(4, -1)),
    "alibi": dict(alibi="head"),
    "alibi_batch_causal": dict(alibi="batch", causal=True),
    "alibi_window": dict(alibi="head", window_size=(2, 6)),
}


@pytest.mark.parametrize("mode", list(SDPA_MODES))
@pytest.mark.parametrize("heads", SDPA_HEADS, ids=lambda t: "h{}_hk{}_d{}_dv{}".format(*t))
@pytest.mark.parametrize("shape", SDPA_SHAPES, ids=lambda t: "sq{}_sk{}".format(*t))
def test_matches_sdpa(shape, heads, mode):
    sq, sk = shape
    h, hk, d, dv = heads
    batch = 2
    opts = dict(SDPA_MODES[mode])
    alibi = opts.pop("alibi", None)
    slopes = None
    if alibi == "head":
        slopes = torch.rand(h, dtype=torch.float32) * 0.5
    elif alibi == "batch":
        slopes = torch.rand(batch, h, dtype=torch.float32) * 0.5
    q, k, v = randn(batch, sq, h, d), randn(batch, sk, hk, d), randn(batch, sk, hk, dv)

    out, lse, probs = attention_ref(q, k, v, alibi_slopes=slopes, **opts)

    scale = opts.get("softmax_scale", 1.0 / math.sqrt(d))
    exp_out, exp_lse, allowed, empty = sdpa_attention(
        q,
        k,
        v,
        scale=scale,
        causal=opts.get("causal", False),
        window=opts.get("window_size", (-1, -1)),
        slopes=slopes,
    )
    assert out.dtype == F64 and lse.dtype == F64 and probs.dtype == F64
    assert out.shape == (batch, sq, h, dv) and lse.shape == (batch, h, sq) and probs.shape == (batch, h, sq, sk)
    torch.testing.assert_close(out, exp_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, exp_lse, atol=1e-12, rtol=1e-10)  # -inf on empty rows on both sides
    assert torch.all(probs.masked_select(~allowed.expand_as(probs)) == 0)
    row_sums = probs.sum(-1)
    torch.testing.assert_close(row_sums, torch.where(empty, 0.0, 1.0).double().expand_as(row_sums))
    vr = v.repeat_interleave(h // hk, dim=2)
    torch.testing.assert_close(torch.einsum("bhts,bshd->bthd", probs, vr), exp_out, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------
# Hand computations: softcap, sink, dropout
# ----------------------------------------------------------------------------------------------------


def hand_attention(q, k, v, *, scale, visible, softcap=0.0, sink=None, keep=None, dropout_p=0.0):
    """Python-float loops over one batch row. q (sq, h, d), k (sk, hk, d), v (sk, hk, dv).

    Returns out [sq][h][dv], lse [h][sq], probs [h][sq][sk] as nested lists.
    """
    ql, kl, vl = q.tolist(), k.tolist(), v.tolist()
    sq, h, _ = q.shape
    sk, hk, dv = v.shape
    out = [[[0.0] * dv for _ in range(h)] for _ in range(sq)]
    lse = [[0.0] * sq for _ in range(h)]
    probs = [[[0.0] * sk for _ in range(sq)] for _ in range(h)]
    for hh in range(h):
        kvh = hh // (h // hk)
        for i in range(sq):
            logits = {}
            for j in range(sk):
                if visible(i, j):
                    s = scale * sum(a * b for a, b in zip(ql[i][hh], kl[j][kvh]))
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    logits[j] = s
            denom = sum(math.exp(s) for s in logits.values())
            if sink is not None:
                denom += math.exp(sink[hh])
            lse[hh][i] = math.log(denom) if denom > 0 else NEG_INF
            for j, s in logits.items():
                p = math.exp(s - lse[hh][i])
                probs[hh][i][j] = p
                w = p
                if keep is not None:
                    w = p * (1.0 if keep[hh][i][j] else 0.0) / (1.0 - dropout_p)
                for e in range(dv):
                    out[i][hh][e] += w * vl[j][kvh][e]
    return out, lse, probs


def causal_visible(sq, sk):
    return lambda i, j: j <= i + sk - sq


def test_softcap_by_hand():
    sq, sk, h, hk, d, dv = 3, 5, 2, 1, 4, 3
    q, k, v = randn(1, sq, h, d) * 2, randn(1, sk, hk, d) * 2, randn(1, sk, hk, dv)
    scale, cap = 0.7, 1.5
    out, lse, probs = attention_ref(q, k, v, softmax_scale=scale, softcap=cap, causal=True)
    e_out, e_lse, e_probs = hand_attention(q[0], k[0], v[0], scale=scale, softcap=cap, visible=causal_visible(sq, sk))
    torch.testing.assert_close(out[0], torch.tensor(e_out, dtype=F64))
    torch.testing.assert_close(lse[0], torch.tensor(e_lse, dtype=F64))
    torch.testing.assert_close(probs[0], torch.tensor(e_probs, dtype=F64))
    # The cap really bounds the logits (logit = lse + log p), while some raw scores exceed it.
    assert (scale * torch.einsum("thd,shd->hts", q[0], k[0].expand(sk, h, d))).abs().max() > 2 * cap
    logits = lse[0].unsqueeze(-1) + torch.log(probs[0])
    assert (logits[probs[0] > 0].abs() < cap).all()


def test_softcap_composes_with_alibi_before_mask():
    # softcap applies to scale * q.k only; alibi is added afterwards (checked by hand).
    sq, sk, d = 2, 3, 4
    q, k, v = randn(1, sq, 1, d), randn(1, sk, 1, d), randn(1, sk, 1, 2)
    slopes = torch.tensor([0.3])  # fp32, as the API takes them
    slope, cap, scale = slopes.item(), 0.9, 0.5
    out, lse, _ = attention_ref(q, k, v, softmax_scale=scale, softcap=cap, alibi_slopes=slopes, causal=True)
    for i in range(sq):
        logits = []
        for j in range(i + sk - sq + 1):
            s = scale * float(q[0, i, 0] @ k[0, j, 0])
            logits.append(cap * math.tanh(s / cap) - slope * abs(i + sk - sq - j))
        m = math.log(sum(math.exp(x) for x in logits))
        assert lse[0, 0, i].item() == pytest.approx(m, abs=1e-12)
        o = sum(math.exp(x - m) * v[0, j, 0] for j, x in enumerate(logits))
        torch.testing.assert_close(out[0, i, 0], o)


def test_sink_by_hand():
    sq, sk, h, hk, d, dv = 4, 2, 3, 3, 5, 2
    q, k, v = randn(1, sq, h, d), randn(1, sk, hk, d), randn(1, sk, hk, dv)
    sink = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    out, lse, probs = attention_ref(q, k, v, causal=True, learnable_sink=sink)
    e_out, e_lse, e_probs = hand_attention(
        q[0], k[0], v[0], scale=d**-0.5, sink=sink.tolist(), visible=causal_visible(sq, sk)
    )
    torch.testing.assert_close(out[0], torch.tensor(e_out, dtype=F64))
    torch.testing.assert_close(lse[0], torch.tensor(e_lse, dtype=F64))
    torch.testing.assert_close(probs[0], torch.tensor(e_probs, dtype=F64))
    # Rows 0 and 1 see no key (sq > sk causal): out 0, lse = the sink logit, probs 0.
    assert torch.equal(out[0, :2], torch.zeros(2, h, dv, dtype=F64))
    assert torch.equal(lse[0, :, :2], sink.view(h, 1).expand(h, 2))
    assert torch.equal(probs[0, :, :2], torch.zeros(h, 2, sk, dtype=F64))
    # Non-empty rows: the sink takes mass, so the probabilities sum to less than one.
    assert (probs[0, :, 2:].sum(-1) < 1).all()


def test_dropout_by_hand():
    sq, sk, h, hk, d, dv, p = 3, 4, 2, 1, 4, 3, 0.3
    q, k, v = randn(1, sq, h, d), randn(1, sk, hk, d), randn(1, sk, hk, dv)
    keep = torch.rand(1, h, sq, sk) > p
    out, lse, probs = attention_ref(q, k, v, dropout_p=p, dropout_mask=keep, window_size=(2, 0))
    vis = lambda i, j: i + 1 - 2 <= j <= i + 1
    e_out, e_lse, e_probs = hand_attention(
        q[0], k[0], v[0], scale=d**-0.5, visible=vis, keep=keep[0].tolist(), dropout_p=p
    )
    torch.testing.assert_close(out[0], torch.tensor(e_out, dtype=F64))
    torch.testing.assert_close(lse[0], torch.tensor(e_lse, dtype=F64))  # lse ignores dropout
    torch.testing.assert_close(probs[0], torch.tensor(e_probs, dtype=F64))  # probs are pre-dropout
    out_nodrop, _, _ = attention_ref(q, k, v, window_size=(2, 0))
    assert not torch.allclose(out, out_nodrop)


def test_dropout_needs_a_mask():
    q, k, v = randn(1, 2, 1, 4), randn(1, 3, 1, 4), randn(1, 3, 1, 4)
    with pytest.raises(ValueError, match="dropout_mask"):
        attention_ref(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_mask"):
        attention_ref(q, k, v, dropout_p=0.1, dropout_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window_size=(1, 2, 3)), "window_size"),
        (dict(softcap=-1.0), "softcap"),
        (dict(dropout_p=1.0, dropout_mask=torch.ones(1, 4, 2, 3, dtype=torch.bool)), "dropout_p"),
        (dict(alibi_slopes=torch.ones(3)), "alibi_slopes"),
        (dict(learnable_sink=torch.ones(2)), "learnable_sink"),
    ],
)
def test_bad_options_raise(kwargs, match):
    q, k, v = randn(1, 2, 4, 8), randn(1, 3, 2, 8), randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match=match):
        attention_ref(q, k, v, **kwargs)


def test_bad_shapes_raise():
    q = randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="nheads_k"):
        attention_ref(q, randn(1, 3, 3, 8), randn(1, 3, 3, 8))
    with pytest.raises(ValueError, match="headdim"):
        attention_ref(q, randn(1, 3, 2, 6), randn(1, 3, 2, 8))
    with pytest.raises(TypeError, match="dtype"):
        attention_ref(q, randn(1, 3, 2, 8, dtype=torch.float32), randn(1, 3, 2, 8))


# ----------------------------------------------------------------------------------------------------
# Rows with nothing to attend to
# ----------------------------------------------------------------------------------------------------

EMPTY_CASES = {
    # name: (seqlen_q, seqlen_k, options, indices of empty query rows, worked out by hand)
    "causal_sq>sk": (7, 3, dict(causal=True), [0, 1, 2, 3]),
    "window_0_0_sq>sk": (5, 3, dict(window_size=(0, 0)), [0, 1]),
    "window_no_empty_row": (4, 6, dict(window_size=(1, 0)), []),
    "no_keys": (3, 0, dict(), [0, 1, 2]),
    "alibi_softcap_causal": (6, 2, dict(causal=True, softcap=2.0, alibi_slopes=torch.tensor([0.2, 0.4])), [0, 1, 2, 3]),
}


@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_empty_rows(case, with_sink):
    sq, sk, opts, empty_rows = EMPTY_CASES[case]
    h, d, dv = 2, 8, 5
    q = randn(2, sq, h, d).requires_grad_()
    k = randn(2, sk, 1, d).requires_grad_()
    v = randn(2, sk, 1, dv).requires_grad_()
    sink = torch.tensor([0.3, -0.7], dtype=F64, requires_grad=True) if with_sink else None
    out, lse, probs = attention_ref(q, k, v, learnable_sink=sink, **opts)
    for t in (out, probs):
        assert torch.isfinite(t).all()
    assert not torch.isnan(lse).any()
    rows = torch.zeros(sq, dtype=torch.bool)
    rows[empty_rows] = True
    assert torch.equal(out[:, rows], torch.zeros_like(out[:, rows]))
    assert torch.equal(probs[:, :, rows], torch.zeros_like(probs[:, :, rows]))
    expected_lse = sink.detach().view(1, h, 1) if with_sink else torch.tensor(NEG_INF, dtype=F64)
    assert torch.equal(lse[:, :, rows], expected_lse.expand_as(lse[:, :, rows]))
    assert torch.isfinite(lse[:, :, ~rows]).all()

    # Backward with nonzero upstream gradients everywhere, the -inf lse entries included.
    inputs = [q, k, v] + ([sink] if with_sink else [])
    grads = torch.autograd.grad((out, lse), inputs, grad_outputs=(torch.randn_like(out), torch.randn_like(lse)))
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.equal(grads[0][:, rows], torch.zeros_like(grads[0][:, rows]))
    if sk > 0 and len(empty_rows) < sq:
        assert grads[1].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------

GRAD_MODES = {
    "plain": dict(),
    "causal_sq<sk": dict(causal=True),
    "causal_sq>sk_empty_row": dict(causal=True, sq=5),
    "softcap": dict(softcap=0.8, causal=True),
    "alibi": dict(alibi_slopes=torch.tensor([0.3, 0.6], dtype=torch.float32)),
    "alibi_batch": dict(alibi_slopes=torch.tensor([[0.3, 0.6], [0.1, 0.9]], dtype=torch.float32)),
    "window": dict(window_size=(1, 1)),
    "sink": dict(sink=True),
    "sink_empty_row": dict(sink=True, causal=True, sq=5),
    "dropout": dict(dropout_p=0.25),
    "no_upcast": dict(upcast=False, reorder_ops=True, softcap=1.2),
}


@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_gradcheck(mode):
    opts = dict(GRAD_MODES[mode])
    sq = opts.pop("sq", 3)
    sk, h, hk, d, dv, batch = 4, 2, 1, 3, 2, 2
    q = randn(batch, sq, h, d).requires_grad_()
    k = randn(batch, sk, hk, d).requires_grad_()
    v = randn(batch, sk, hk, dv).requires_grad_()
    inputs = [q, k, v]
    if opts.pop("sink", False):
        inputs.append(randn(h).requires_grad_())
    if opts.get("dropout_p", 0) > 0:
        opts["dropout_mask"] = torch.rand(batch, h, sq, sk) > opts["dropout_p"]

    def fn(q, k, v, sink=None):
        out, lse, _ = attention_ref(q, k, v, learnable_sink=sink, **opts)
        # -inf lse of empty rows is constant; replace it so finite differences are defined.
        return out, torch.where(torch.isinf(lse), 0.0, lse)

    assert torch.autograd.gradcheck(fn, inputs)


# ----------------------------------------------------------------------------------------------------
# Dtypes and upcast
# ----------------------------------------------------------------------------------------------------


def test_upcast_dtypes():
    q, k, v = randn(1, 3, 2, 8), randn(1, 5, 2, 8), randn(1, 5, 2, 8)
    for dtype, upcast, expected in [
        (torch.float64, True, torch.float64),
        (torch.float32, True, torch.float32),
        (torch.float16, True, torch.float32),
        (torch.bfloat16, True, torch.float32),
        (torch.bfloat16, False, torch.bfloat16),
        (torch.float16, False, torch.float16),
        (torch.float32, False, torch.float32),
    ]:
        out, lse, probs = attention_ref(q.to(dtype), k.to(dtype), v.to(dtype), upcast=upcast, causal=True)
        assert (out.dtype, lse.dtype, probs.dtype) == (expected,) * 3, (dtype, upcast)


@pytest.mark.parametrize("reorder_ops", [False, True])
def test_no_upcast_bf16_error_is_small_but_real(reorder_ops):
    sq, sk, h, hk, d = 33, 17, 4, 2, 40
    q, k, v = randn(2, sq, h, d), randn(2, sk, hk, d), randn(2, sk, hk, d)
    opts = dict(causal=True, softcap=3.0, alibi_slopes=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    ref, ref_lse, _ = attention_ref(q, k, v, **opts)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    out_bf, lse_bf, _ = attention_ref(qb, kb, vb, upcast=False, reorder_ops=reorder_ops, **opts)
    out_up, _, _ = attention_ref(qb, kb, vb, **opts)
    assert out_bf.dtype == torch.bfloat16
    finite = torch.isfinite(ref_lse)
    err_bf = (out_bf.double() - ref).abs().max().item()
    err_lse = (lse_bf.double() - ref_lse)[finite].abs().max().item()
    # Same rounded inputs, upcast: only fp32 rounding on top of the bf16 input rounding.
    refb, _, _ = attention_ref(qb.double(), kb.double(), vb.double(), **opts)
    err_up = (out_up.double() - refb).abs().max().item()
    assert 1e-4 < err_bf < 5e-2
    assert 1e-4 < err_lse < 1e-1
    assert err_up < 1e-5


# ----------------------------------------------------------------------------------------------------
# Varlen
# ----------------------------------------------------------------------------------------------------

VARLEN_MODES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(2, 1)),
    "alibi_batch": dict(alibi="batch", causal=True),
    "alibi_head_softcap": dict(alibi="head", softcap=1.5),
    "sink": dict(sink=True, causal=True),
    "dropout": dict(dropout_p=0.2),
}


@pytest.mark.parametrize("use_seqused", [False, True])
@pytest.mark.parametrize("mode", list(VARLEN_MODES))
def test_varlen_matches_dense_per_sequence(mode, use_seqused):
    seqlens_q = [3, 0, 5, 2, 1]
    seqlens_k = [4, 2, 0, 6, 3]
    seqused = [3, 1, 0, 6, 0]
    h, hk, d, dv, tail = 4, 2, 8, 6, 2
    batch = len(seqlens_q)
    opts = dict(VARLEN_MODES[mode])
    alibi = opts.pop("alibi", None)
    if alibi == "batch":
        opts["alibi_slopes"] = torch.rand(batch, h)
    elif alibi == "head":
        opts["alibi_slopes"] = torch.rand(h)
    if opts.pop("sink", False):
        opts["learnable_sink"] = randn(h)
    used = seqused if use_seqused else seqlens_k
    masks = None
    if opts.get("dropout_p", 0) > 0:
        masks = [torch.rand(h, sq, sk) > opts["dropout_p"] for sq, sk in zip(seqlens_q, used)]

    q = randn(sum(seqlens_q) + tail, h, d)
    k, v = randn(sum(seqlens_k), hk, d), randn(sum(seqlens_k), hk, dv)
    cu_q = torch.tensor([0] + seqlens_q, dtype=torch.int32).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + seqlens_k, dtype=torch.int32).cumsum(0).to(torch.int32)
    out, lse = attention_varlen_ref(
        q,
        k,
        v,
        cu_q,
        cu_k,
        seqused_k=torch.tensor(seqused, dtype=torch.int32) if use_seqused else None,
        dropout_mask=masks,
        **opts,
    )
    assert out.shape == (q.shape[0], h, dv) and lse.shape == (h, q.shape[0])

    qs, ks = 0, 0
    for b in range(batch):
        sq, sk = seqlens_q[b], used[b]
        kw = dict(opts)
        if alibi == "batch":
            kw["alibi_slopes"] = opts["alibi_slopes"][b]
        exp_out, exp_lse, _ = attention_ref(
            q[qs : qs + sq][None],
            k[ks : ks + sk][None],
            v[ks : ks + sk][None],
            dropout_mask=None if masks is None else masks[b][None],
            **kw,
        )
        assert torch.equal(out[qs : qs + sq], exp_out[0])
        assert torch.equal(lse[:, qs : qs + sq], exp_lse[0])
        if sk == 0 and sq > 0 and "learnable_sink" not in opts:
            assert torch.equal(out[qs : qs + sq], torch.zeros(sq, h, dv, dtype=F64))
            assert torch.isneginf(lse[:, qs : qs + sq]).all()
        qs += sq
        ks += seqlens_k[b]
    # Padding tokens after the last sequence: empty rows.
    assert torch.equal(out[qs:], torch.zeros(tail, h, dv, dtype=F64))
    assert torch.isneginf(lse[:, qs:]).all()


def test_varlen_gradients_flow():
    q = randn(5, 2, 4).requires_grad_()
    k = randn(6, 1, 4).requires_grad_()
    v = randn(6, 1, 3).requires_grad_()
    cu_q = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    fn = lambda q, k, v: attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


# ----------------------------------------------------------------------------------------------------
# Rotary
# ----------------------------------------------------------------------------------------------------


def rotary_by_complex(x, theta, positions, interleaved):
    """x (b, s, h, d) float64, theta (seqlen_ro, r/2), positions (b, s): rotate by complex multiply."""
    half = theta.shape[1]
    r = 2 * half
    phase = torch.polar(torch.ones_like(theta), theta)[positions].unsqueeze(2)  # (b, s, 1, r/2)
    if interleaved:
        xc = torch.view_as_complex(x[..., :r].reshape(*x.shape[:3], half, 2).contiguous())
        rotated = torch.view_as_real(xc * phase).flatten(-2)
    else:
        xc = torch.complex(x[..., :half], x[..., half:r])
        prod = xc * phase
        rotated = torch.cat([prod.real, prod.imag], dim=-1)
    return torch.cat([rotated, x[..., r:]], dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offsets", [0, 3, "tensor"])
@pytest.mark.parametrize("rotary_dim", [6, 10])
def test_rotary_against_complex(rotary_dim, offsets, interleaved):
    b, s, h, d, seqlen_ro = 2, 5, 3, 10, 12
    x = randn(b, s, h, d)
    theta = torch.rand(seqlen_ro, rotary_dim // 2, dtype=F64) * 6.0
    if offsets == "tensor":
        offsets = torch.tensor([0, 6], dtype=torch.int32)
        positions = offsets.long().view(b, 1) + torch.arange(s).view(1, s)
    else:
        positions = (offsets + torch.arange(s)).view(1, s).expand(b, s)
    out = apply_rotary_ref(x, theta.cos(), theta.sin(), seqlen_offsets=offsets, interleaved=interleaved)
    expected = rotary_by_complex(x, theta, positions, interleaved)
    assert out.dtype == F64
    torch.testing.assert_close(out, expected, atol=1e-13, rtol=1e-13)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rotary_keeps_dtype(dtype):
    x = randn(1, 4, 2, 8)
    theta = torch.rand(4, 3, dtype=F64) * 6.0
    out = apply_rotary_ref(x.to(dtype), theta.cos().float(), theta.sin().float(), interleaved=True)
    assert out.dtype == dtype
    expected = rotary_by_complex(x.to(dtype).double(), theta, torch.arange(4).view(1, 4), True)
    # One rounding to dtype on top of fp32 arithmetic.
    tol = 2 * torch.finfo(dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=0)
    assert torch.equal(out[..., 6:], x.to(dtype)[..., 6:])


def test_rotary_out_of_range_raises():
    x = randn(1, 4, 1, 4)
    cos = sin = torch.ones(5, 2, dtype=F64)
    with pytest.raises(ValueError, match="seqlen_offsets"):
        apply_rotary_ref(x, cos, sin, seqlen_offsets=2)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary_ref(x, torch.ones(5, 3), torch.ones(5, 3))


# ----------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------

B, H, HK, D, DV, CACHE_LEN, SQ, SNEW = 3, 4, 2, 8, 6, 12, 3, 2
LENS = [4, 0, 9]
PADS = [1, 0, 3]


def kv_problem(seqlen_q=SQ, batch_cache=B):
    q = randn(B, seqlen_q, H, D)
    k_cache, v_cache = randn(batch_cache, CACHE_LEN, HK, D), randn(batch_cache, CACHE_LEN, HK, DV)
    k_new, v_new = randn(B, SNEW, HK, D), randn(B, SNEW, HK, DV)
    theta = torch.rand(CACHE_LEN + SNEW, D // 4, dtype=F64) * 3.0  # rotary_dim = D / 2
    return q, k_cache, v_cache, k_new, v_new, theta.cos(), theta.sin()


def to_paged(cache, page_size, perm):
    """(batch, seqlen, hk, d) -> pages (num_pages, page_size, hk, d) scattered by perm, and block_table."""
    b, s, hk, d = cache.shape
    pages_per_seq = s // page_size
    block_table = perm.view(b, pages_per_seq).to(torch.int32)
    paged = torch.empty(b * pages_per_seq, page_size, hk, d, dtype=cache.dtype)
    paged[perm] = cache.reshape(b * pages_per_seq, page_size, hk, d)
    return paged, block_table


def from_paged(paged, block_table):
    b, pages_per_seq = block_table.shape
    return paged[block_table.long().flatten()].reshape(b, pages_per_seq * paged.shape[1], *paged.shape[2:])


KV_MODES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(3, 0)),
    "rotary_interleaved_causal": dict(rotary=True, rotary_interleaved=True, causal=True),
    "rotary_neox": dict(rotary=True, rotary_interleaved=False),
    "rotary_window": dict(rotary=True, rotary_interleaved=False, window_size=(4, 1)),
    "alibi_softcap_sink": dict(
        causal=True, softcap=2.0, alibi_slopes=torch.rand(B, H), learnable_sink=torch.randn(H, dtype=F64)
    ),
}


@pytest.mark.parametrize("leftpad", [False, True])
@pytest.mark.parametrize("mode", list(KV_MODES))
def test_kvcache_by_assembly(mode, leftpad):
    """Dense cache: out equals attention_ref over keys assembled by hand; caches updated by hand."""
    q, k_cache, v_cache, k_new, v_new, cos, sin = kv_problem()
    opts = dict(KV_MODES[mode])
    rotary = opts.pop("rotary", False)
    interleaved = opts.get("rotary_interleaved", True)
    lens = torch.tensor(LENS, dtype=torch.int32)
    pads = torch.tensor(PADS, dtype=torch.int32) if leftpad else None
    inputs = [q, k_cache, v_cache, k_new, v_new, cos, sin]
    copies = [t.clone() for t in inputs]

    out, lse, k_cache_new, v_cache_new = kvcache_ref(
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        rotary_cos=cos if rotary else None,
        rotary_sin=sin if rotary else None,
        cache_seqlens=lens,
        cache_leftpad=pads,
        **opts,
    )
    for t, c in zip(inputs, copies):
        assert torch.equal(t, c)  # inputs untouched

    causal_like = opts.get("causal", False) or opts.get("window_size", (-1, -1)) != (-1, -1)
    attn_opts = {kk: vv for kk, vv in opts.items() if kk != "rotary_interleaved"}
    for b in range(B):
        L, start = LENS[b], PADS[b] if leftpad else 0
        kb_new, qb = k_new[b : b + 1], q[b : b + 1]
        if rotary:
            kb_new = apply_rotary_ref(kb_new, cos, sin, seqlen_offsets=L, interleaved=interleaved)
            if causal_like:
                qb = apply_rotary_ref(qb, cos, sin, seqlen_offsets=L, interleaved=interleaved)
            else:  # every query token at position L: rotate one token at a time
                qb = torch.cat([apply_rotary_ref(qb[:, t : t + 1], cos, sin, L, interleaved) for t in range(SQ)], dim=1)
        keys = torch.cat([k_cache[b : b + 1, start:L], kb_new], dim=1)
        values = torch.cat([v_cache[b : b + 1, start:L], v_new[b : b + 1]], dim=1)
        kw = dict(attn_opts)
        if "alibi_slopes" in kw:
            kw["alibi_slopes"] = kw["alibi_slopes"][b]
        exp_out, exp_lse, _ = attention_ref(qb, keys, values, **kw)
        torch.testing.assert_close(out[b : b + 1], exp_out, atol=1e-13, rtol=1e-13)
        torch.testing.assert_close(lse[b : b + 1], exp_lse, atol=1e-13, rtol=1e-13)

        exp_k = k_cache[b].clone()
        exp_k[L : L + SNEW] = kb_new[0]
        exp_v = v_cache[b].clone()
        exp_v[L : L + SNEW] = v_new[b]
        assert torch.equal(k_cache_new[b], exp_k)
        assert torch.equal(v_cache_new[b], exp_v)


@pytest.mark.parametrize("page_size", [1, 3])
@pytest.mark.parametrize("mode", ["causal", "rotary_interleaved_causal", "rotary_neox", "alibi_softcap_sink"])
def test_kvcache_paged_equals_dense(mode, page_size):
    q, k_cache, v_cache, k_new, v_new, cos, sin = kv_problem()
    opts = dict(KV_MODES[mode])
    if opts.pop("rotary", False):
        opts.update(rotary_cos=cos, rotary_sin=sin)
    opts.update(cache_seqlens=torch.tensor(LENS, dtype=torch.int32), cache_leftpad=torch.tensor(PADS))
    perm = torch.randperm(B * CACHE_LEN // page_size)
    k_paged, block_table = to_paged(k_cache, page_size, perm)
    v_paged, _ = to_paged(v_cache, page_size, perm)
    assert not torch.equal(block_table.flatten(), torch.arange(block_table.numel(), dtype=torch.int32))

    dense = kvcache_ref(q, k_cache, v_cache, k_new, v_new, **opts)
    paged = kvcache_ref(q, k_paged, v_paged, k_new, v_new, block_table=block_table, **opts)
    assert torch.equal(paged[0], dense[0])
    assert torch.equal(paged[1], dense[1])
    assert torch.equal(from_paged(paged[2], block_table), dense[2])
    assert torch.equal(from_paged(paged[3], block_table), dense[3])


def test_kvcache_batch_idx():
    q, _, _, k_new, v_new, cos, sin = kv_problem()
    k_cache, v_cache = randn(5, CACHE_LEN, HK, D), randn(5, CACHE_LEN, HK, DV)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    opts = dict(cache_seqlens=torch.tensor(LENS, dtype=torch.int32), causal=True, rotary_cos=cos, rotary_sin=sin)
    out, lse, kc, vc = kvcache_ref(q, k_cache, v_cache, k_new, v_new, cache_batch_idx=idx, **opts)
    exp_out, exp_lse, exp_kc, exp_vc = kvcache_ref(q, k_cache[idx.long()], v_cache[idx.long()], k_new, v_new, **opts)
    assert torch.equal(out, exp_out) and torch.equal(lse, exp_lse)
    assert torch.equal(kc[idx.long()], exp_kc) and torch.equal(vc[idx.long()], exp_vc)
    for row in (1, 3):  # rows no batch entry maps to stay as they were
        assert torch.equal(kc[row], k_cache[row]) and torch.equal(vc[row], v_cache[row])


def test_kvcache_seqlens_forms():
    q, k_cache, v_cache, *_ = kv_problem()
    # None = the whole cache; no new tokens: plain attention over the cache rows.
    out, lse, kc, vc = kvcache_ref(q, k_cache, v_cache, causal=True)
    exp_out, exp_lse, _ = attention_ref(q, k_cache, v_cache, causal=True)
    assert torch.equal(out, exp_out) and torch.equal(lse, exp_lse)
    assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache)
    # An int is the same as a constant tensor.
    a = kvcache_ref(q, k_cache, v_cache, cache_seqlens=7)
    b = kvcache_ref(q, k_cache, v_cache, cache_seqlens=torch.full((B,), 7, dtype=torch.int32))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.testing.assert_close(a[0], attention_ref(q, k_cache[:, :7], v_cache[:, :7])[0], atol=0, rtol=0)


def test_kvcache_bad_inputs_raise():
    q, k_cache, v_cache, k_new, v_new, *_ = kv_problem()
    with pytest.raises(ValueError, match="cache_seqlens"):
        kvcache_ref(q, k_cache, v_cache, k_new, v_new, cache_seqlens=CACHE_LEN - 1)
    with pytest.raises(ValueError, match="k, v"):
        kvcache_ref(q, k_cache, v_cache, k_new, None, cache_seqlens=0)
    with pytest.raises(ValueError, match="cache_leftpad"):
        kvcache_ref(q, k_cache, v_cache, cache_seqlens=2, cache_leftpad=torch.tensor([3, 0, 0]))
