"""The exact CPU path (flashtron.cpu) against the reference (flashtron.reference).

Tolerance: FlashAttention's rule from tests/tolerance.py. The high-precision reference is
attention_ref(upcast=True) on fp32 copies for fp16/bf16 inputs and on fp64 copies for fp32 inputs (an
fp32 reference of fp32 inputs would measure the reference's own rounding); the PyTorch-in-dtype
baseline is attention_ref(upcast=False, reorder_ops=True). fp64 inputs are checked against the fp64
reference to 1e-10, which catches any formula slip that fp16 noise would hide.
Shapes are tiny and awkward, and block_n is small so that several KV blocks stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from flashtron import cpu
from flashtron.options import AttnOptions
from flashtron.reference import attention_ref, attention_varlen_ref
from tolerance import assert_fa_close, assert_grads_close

SHARP_ATOL = 1e-10  # fp64 inputs against the fp64 reference
NO_WINDOW, CAUSAL = (-1, -1), (-1, 0)


@dataclass(frozen=True)
class Case:
    sq: int
    sk: int
    h: int = 2
    hk: int = 2
    d: int = 40
    dv: int = 40
    window: tuple[int, int] = NO_WINDOW
    softcap: float = 0.0
    alibi: str | None = None  # "head": (nheads,) slopes, "batch": (batch, nheads) slopes
    sink: bool = False
    block_n: int = 16
    b: int = 2


DENSE_CASES = {
    # With a single key and no sink dk is identically 0, and the tolerance's atol (which scales with
    # the reference's magnitude) would then demand better than the fp32 rounding of delta; the sink
    # keeps P < 1 so that dk is a real quantity. sq = 1 without a sink is covered by decode_mqa.
    "one_token_sink": Case(1, 1, sink=True),
    "gqa_causal_sq<sk": Case(17, 33, h=4, hk=2, window=CAUSAL),
    "mqa_causal_sq>sk_dv!=d": Case(113, 33, h=3, hk=1, d=72, dv=40, window=CAUSAL),
    "window_left_only": Case(33, 113, d=72, dv=72, window=(8, -1)),
    "window_right_only_gqa": Case(113, 113, h=4, hk=2, window=(-1, 5)),
    "window_both_sq>sk": Case(33, 17, window=(3, 2), block_n=1),
    "softcap": Case(17, 113, h=4, hk=2, dv=72, softcap=5.0),
    "alibi_head_causal": Case(33, 33, alibi="head", window=CAUSAL),
    "alibi_batch_window_softcap": Case(17, 33, alibi="batch", window=(4, 4), softcap=3.0),
    "sink_causal_sq>sk": Case(33, 17, sink=True, window=CAUSAL),
    "everything_gqa": Case(113, 113, h=4, hk=2, d=72, dv=40, window=(20, 3), softcap=4.0, alibi="batch", sink=True),
    "decode_mqa": Case(1, 113, h=4, hk=1, window=CAUSAL, block_n=256),
    "sk1_causal": Case(17, 1, window=CAUSAL, sink=True),
}
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _ref_dtype(dtype):
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _features(case: Case, batch: int, dtype):
    """Random alibi slopes (fp32) and sink logits (fp32, fp64 for fp64 inputs) for a case."""
    slopes = None
    if case.alibi == "head":
        slopes = torch.rand(case.h) * 0.5
    elif case.alibi == "batch":
        slopes = torch.rand(batch, case.h) * 0.5
    sink = torch.randn(case.h, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return slopes, (sink if case.sink else None)


def _run_ours(q, k, v, dout, opts, block_n, dlse=None, **varlen):
    out, lse = cpu.attention_forward(q, k, v, opts, block_n=block_n, **varlen)
    grads = cpu.attention_backward(dout, q, k, v, out, lse, opts, dlse=dlse, block_n=block_n, **varlen)
    return out, lse, grads


def _run_ref(fn, q, k, v, dout, dlse, sink, dtype, sink_dtype, **kwargs):
    """Output, lse and (dq, dk, dv, dsink) of fn (returning (out, lse)) on copies of q, k, v in dtype."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    s = None if sink is None else sink.detach().to(sink_dtype).requires_grad_()
    out, lse = fn(*leaves, learnable_sink=s, **kwargs)
    if dlse is None:
        out.backward(dout.to(out.dtype))
    else:
        torch.autograd.backward([out, lse], [dout.to(out.dtype), dlse.to(lse.dtype)])
    return out.detach(), lse.detach(), [x.grad for x in leaves] + [None if s is None else s.grad]


def _assert_lse_close(ours, ref, pt):
    """-inf exactly where the reference has it; the finite entries under the tolerance rule."""
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(ours), empty), "lse: -inf rows differ from the reference"
    assert not torch.isnan(ours).any(), "lse: NaN"
    assert_fa_close(ours[~empty], ref[~empty], pt[~empty].to(ref.dtype), name="lse")


def _check(fn, q, k, v, opts, block_n, ref_kwargs, sink, with_dlse=False, **varlen):
    """Forward and backward of the CPU path against the reference; with_dlse adds a random gradient on lse."""
    dtype = q.dtype
    dout = torch.randn(*q.shape[:-1], v.shape[-1]).to(dtype)
    dlse = None
    if with_dlse:
        lse_shape = (q.shape[1], q.shape[0]) if q.dim() == 3 else (q.shape[0], q.shape[2], q.shape[1])
        dlse = torch.randn(lse_shape, dtype=_ref_dtype(dtype) if dtype == torch.float64 else torch.float32)
    out, lse, grads = _run_ours(q, k, v, dout, opts, block_n, dlse, **varlen)
    ref = _run_ref(fn, q, k, v, dout, dlse, sink, _ref_dtype(dtype), _ref_dtype(dtype), upcast=True, **ref_kwargs)
    assert out.dtype == dtype and [g.dtype for g in grads[:3]] == [dtype] * 3
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (grads[3] is None) == (sink is None)
    if dtype == torch.float64:
        for name, a, r in zip(("out", "lse", "dq", "dk", "dv", "dsink"), [out, lse, *grads], [*ref[:2], *ref[2]]):
            if a is not None:
                assert torch.equal(torch.isneginf(a), torch.isneginf(r)), f"{name}: -inf positions differ"
                err = (a - r).nan_to_num(0.0).abs().max().item() if a.numel() else 0.0
                assert err <= SHARP_ATOL, f"{name}: fp64 error {err:.2e} > {SHARP_ATOL:.0e}"
        return
    pt = _run_ref(fn, q, k, v, dout, dlse, sink, dtype, sink.dtype if sink is not None else None, upcast=False,
                  reorder_ops=True, **ref_kwargs)  # fmt: skip
    assert_fa_close(out, ref[0], pt[0])
    _assert_lse_close(lse, ref[1], pt[1])
    assert_grads_close(grads[:3], ref[2][:3], pt[2][:3])
    if sink is not None:
        assert_fa_close(grads[3], ref[2][3], pt[2][3], factor=3.0, name="dsink")


def _options_and_ref_kwargs(case: Case, slopes, sink):
    scale = 1.0 / math.sqrt(case.d)
    opts = AttnOptions(scale, *case.window, case.softcap, slopes, learnable_sink=sink)
    kwargs = dict(softmax_scale=scale, window_size=case.window, softcap=case.softcap, alibi_slopes=slopes)
    return opts, kwargs


def _dense_ref(q, k, v, **kwargs):
    return attention_ref(q, k, v, **kwargs)[:2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_dense_matches_reference(name, dtype):
    _dense_case(name, dtype, with_dlse=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["mqa_causal_sq>sk_dv!=d", "alibi_batch_window_softcap", "everything_gqa"])
def test_dense_lse_gradient(name, dtype):
    """return_lse=True makes lse differentiable: the backward takes dlse as well as dout."""
    _dense_case(name, dtype, with_dlse=True)


def _dense_case(name, dtype, with_dlse):
    c = DENSE_CASES[name]
    q = torch.randn(c.b, c.sq, c.h, c.d).to(dtype)
    k = torch.randn(c.b, c.sk, c.hk, c.d).to(dtype)
    v = torch.randn(c.b, c.sk, c.hk, c.dv).to(dtype)
    slopes, sink = _features(c, c.b, dtype)
    opts, kwargs = _options_and_ref_kwargs(c, slopes, sink)
    _check(_dense_ref, q, k, v, opts, c.block_n, kwargs, sink, with_dlse)


VARLEN_CASES = {
    # Sequence 1 has no queries, sequence 2 no keys; 3 tokens after cu_seqlens_q[-1] belong to none.
    "empty_sequences": (Case(0, 0, h=4, hk=2, window=CAUSAL), [0, 17, 17, 18, 51], [0, 33, 40, 40, 153],
                        None),
    "seqused_k_alibi_batch": (Case(0, 0, h=3, hk=1, alibi="batch", window=(5, 0)), [0, 33, 34, 147],
                              [0, 40, 41, 154], [17, 0, 100]),
    "seqused_k_sink_softcap": (Case(0, 0, d=72, dv=40, softcap=5.0, sink=True), [0, 17, 17, 50],
                               [0, 113, 120, 121], [113, 3, 1]),
}  # fmt: skip


@pytest.mark.parametrize("with_dlse", [False, True], ids=["dout", "dout+dlse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_varlen_matches_reference(name, dtype, with_dlse):
    c, cu_q, cu_k, used = VARLEN_CASES[name]
    total_q = cu_q[-1] + (3 if name == "empty_sequences" else 0)
    q = torch.randn(total_q, c.h, c.d).to(dtype)
    k = torch.randn(cu_k[-1], c.hk, c.d).to(dtype)
    v = torch.randn(cu_k[-1], c.hk, c.dv).to(dtype)
    slopes, sink = _features(c, len(cu_q) - 1, dtype)
    opts, kwargs = _options_and_ref_kwargs(c, slopes, sink)
    cu_q, cu_k = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    used = None if used is None else torch.tensor(used, dtype=torch.int32)
    fn = lambda q, k, v, **kw: attention_varlen_ref(q, k, v, cu_q, cu_k, seqused_k=used, **kw)
    varlen = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=used)
    _check(fn, q, k, v, opts, c.block_n, kwargs, sink, with_dlse, **varlen)


@pytest.mark.parametrize("sink", [False, True])
def test_fully_masked_rows(sink):
    """Causal with sq > sk: the first sq - sk rows see nothing. out 0, lse -inf (or the sink), grads 0."""
    q, k, v = torch.randn(1, 33, 2, 40), torch.randn(1, 17, 2, 40), torch.randn(1, 17, 2, 24)
    sinks = torch.randn(2) if sink else None
    opts = AttnOptions(0.2, window_right=0, learnable_sink=sinks)
    out, lse, (dq, dk, dv, dsink) = _run_ours(q, k, v, torch.randn(1, 33, 2, 24), opts, 16)
    assert torch.equal(out[:, :16], torch.zeros(1, 16, 2, 24))
    assert torch.equal(dq[:, :16], torch.zeros(1, 16, 2, 40))
    expected = sinks[:, None].expand(2, 16) if sink else torch.full((2, 16), -math.inf)
    assert torch.equal(lse[0, :, :16], expected)
    assert out[:, 16:].abs().sum() > 0 and torch.isfinite(lse[:, :, 16:]).all()
    for g in (dq, dk, dv) + ((dsink,) if sink else ()):
        assert torch.isfinite(g).all()


def test_non_contiguous_layouts():
    """q transposed in memory, k and v strided differently (v sliced out of a packed kv)."""
    q = torch.randn(2, 2, 33, 40).transpose(1, 2)  # (b, sq, h, d), seqlen-major strides
    k = torch.randn(2, 2, 17, 40).permute(0, 2, 1, 3)
    v = torch.randn(2, 17, 2, 2, 40)[:, :, 1]  # the v half of a (b, sk, 2, h_k, d) kv tensor
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    opts, kwargs = _options_and_ref_kwargs(Case(33, 17, window=(6, 1)), None, None)
    _check(_dense_ref, q, k, v, opts, 16, kwargs, None)


def test_rejects_dropout_without_seed_and_bad_block_n():
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="dropout_seed"):
        cpu.attention_forward(q, q, q, AttnOptions(0.3, dropout_p=0.1))
    with pytest.raises(ValueError, match="block_n"):
        cpu.attention_forward(q, q, q, AttnOptions(0.3), block_n=0)
