"""Merge of partial attention results (split-KV) by their log-sum-exp weights, in fp32.

Grid: (cdiv(seqlen * nheads, BLOCK_M), batch). Each program owns BLOCK_M rows (token, head) of one
batch row and folds the splits BLOCK_S at a time (one step for the usual split counts, so all loads
are in flight together) with a running max: out = sum_s exp(lse_s - lse) out_s, lse = log sum_s
exp(lse_s). A split with lse_s = -inf contributes nothing and its out_s is not read. The sink, when
given, is one more split with lse = sink[head] and out = 0. Rows where every split is -inf (and no
sink) get out 0 and lse -inf.
"""

import triton
import triton.language as tl

from flashtron.kernels.common import LOG2E


# every LSE stride may follow batch or seqlen (the decode kernel's LSE is (splits, batch, nheads, seqlen)
# seen as (splits, batch, seqlen, nheads)): runtime values, so seqlen 1 is no new specialization
@triton.jit(
    do_not_specialize=[
        "num_splits",
        "seqlen",
        "nheads",
        "stride_lps",
        "stride_lpb",
        "stride_lpm",
        "stride_lph",
        "stride_lb",
        "stride_lm",
        "stride_lh",
    ]
)
def combine_kernel(
    OutPartial, LsePartial, Out, LSE, Sink,
    stride_ps, stride_pb, stride_pm, stride_ph,
    stride_lps, stride_lpb, stride_lpm, stride_lph,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lm, stride_lh,
    num_splits, seqlen, nheads,
    HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SINK: tl.constexpr,
):  # fmt: skip
    """OutPartial: (num_splits, batch_size, seqlen, nheads, headdim_v) fp32; LsePartial: (num_splits,
    batch_size, seqlen, nheads) fp32 natural log; Out: (batch_size, seqlen, nheads, headdim_v);
    LSE: (batch_size, seqlen, nheads) fp32. Any strides (the last axis of OutPartial/Out unit)."""
    off_b = tl.program_id(1).to(tl.int64)
    offs_r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_r < seqlen * nheads
    offs_m = (offs_r // nheads).to(tl.int64)
    offs_h = (offs_r % nheads).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = row_mask[:, None] & (offs_dv[None, :] < HEAD_DIM_V)

    OutPartial += off_b * stride_pb
    LsePartial += off_b * stride_lpb
    p_rows = offs_m[:, None] * stride_pm + offs_h[:, None] * stride_ph
    l_rows = offs_m * stride_lpm + offs_h * stride_lph

    # running max m (log2 units), sum l and accumulator; the sink starts them at (sink, 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINK:
        m_i = tl.load(Sink + offs_h, mask=row_mask, other=0.0).to(tl.float32) * LOG2E
        l_i += 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for first in range(0, num_splits, BLOCK_S):
        offs_s = first + tl.arange(0, BLOCK_S)
        lse_mask = (offs_s < num_splits)[:, None] & row_mask[None, :]
        lse_ptrs = LsePartial + offs_s.to(tl.int64)[:, None] * stride_lps + l_rows[None, :]
        lse_s = tl.load(lse_ptrs, mask=lse_mask, other=float("-inf")) * LOG2E  # [BLOCK_S, BLOCK_M]
        m_new = tl.maximum(m_i, tl.max(lse_s, 0))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        w = tl.exp2(lse_s - m_sub[None, :])  # [BLOCK_S, BLOCK_M], 0 for empty splits
        o_ptrs = OutPartial + offs_s.to(tl.int64)[:, None, None] * stride_ps + p_rows[None, :, :]
        o_mask = (lse_s > float("-inf"))[:, :, None] & mask[None, :, :]
        out_s = tl.load(o_ptrs + offs_dv[None, None, :], mask=o_mask, other=0.0)  # [BLOCK_S, BLOCK_M, BLOCK_DV]
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * out_s, 0)
        l_i = l_i * alpha + tl.sum(w, 0)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / LOG2E)
    o_rows = off_b * stride_ob + offs_m[:, None] * stride_om + offs_h[:, None] * stride_oh
    tl.store(Out + o_rows + offs_dv[None, :], out.to(Out.dtype.element_ty), mask=mask)
    tl.store(LSE + off_b * stride_lb + offs_m * stride_lm + offs_h * stride_lh, lse, mask=row_mask)
