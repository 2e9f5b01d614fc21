"""Attention forward: online softmax over KV blocks, exp2, fp32 accumulation.

Grid: (query blocks, nheads, batch). Each program owns BLOCK_M query rows of one head and streams
the KV blocks they can see: edge blocks with a mask, the middle without (one helper, MASK flag).
Features are constexpr flags: window/causal (HAS_LEFT/HAS_RIGHT), softcap, ALiBi, sinks, varlen.
"""

import triton
import triton.language as tl

from flashtron.kernels.common import (
    LN2,
    LOG2E,
    RUNTIME_SCALARS,
    dropout_keep,
    fill_forward_outside,
    fold_sink,
    kv_block_bounds,
    online_softmax_step,
    sequence_bounds,
)


@triton.jit
def _attend_kv_blocks(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    stride_kn,
    stride_vn,
    start,
    end,
    offs_m,
    offs_d,
    offs_dv,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    qk_scale,
    softcap_log2,
    alibi_slope_log2,
    dropout_seed,
    dropout_threshold,
    philox_base,
    philox_cols,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Fold KV blocks [start, end) into the running (acc, l_i, m_i). K, V point at key 0 of this
    sequence and kv head. With MASK, out-of-window and out-of-range keys are excluded."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_mask = offs_d[None, :] < HEAD_DIM
        v_mask = offs_dv[None, :] < HEAD_DIM_V
        if MASK:
            k_mask = k_mask & (offs_n[:, None] < seqlen_k)
            v_mask = v_mask & (offs_n[:, None] < seqlen_k)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=k_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        p, alpha, l_i, m_new = online_softmax_step(
            qk,
            m_i,
            l_i,
            offs_m,
            offs_n,
            seqlen_q,
            seqlen_k,
            window_left,
            window_right,
            qk_scale,
            softcap_log2,
            alibi_slope_log2,
            MASK,
            HAS_LEFT,
            HAS_RIGHT,
            HAS_SOFTCAP,
            HAS_ALIBI,
        )  # p: [BLOCK_M, BLOCK_N]
        if HAS_DROPOUT:
            # the denominator counts every probability; only the kept ones reach the output
            keep = dropout_keep(
                dropout_seed, dropout_threshold, philox_base, offs_m[:, None], offs_n[None, :], philox_cols
            )
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None]
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=v_mask, other=0.0)
        if DOT_FP32:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)  # [BLOCK_M, BLOCK_DV]
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=RUNTIME_SCALARS)
def attention_fwd_kernel(
    Q, K, V, Out, LSE, AlibiSlopes, Sink, CuSeqlensQ, CuSeqlensK, SequsedK, stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh, stride_lm, stride_ab, stride_ah, seqlen_q, seqlen_k, group_size, window_left,
    window_right, qk_scale, softcap_log2, dropout_seed, dropout_threshold, dropout_scale, philox_rows,
    philox_cols, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr, HEAVY_FIRST: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    if IS_VARLEN:
        if off_b == tl.num_programs(2) - 1:  # the extra slice: rows outside every sequence (common.py)
            fill_forward_outside(Out, LSE, CuSeqlensQ, stride_om, stride_oh, stride_lh, stride_lm, off_b, seqlen_q,
                                 off_h, pid_m, tl.num_programs(0), BLOCK_M, BLOCK_DV, HEAD_DIM_V)  # fmt: skip
            return
    if HEAVY_FIRST:
        # with a right bound the last query blocks see the most keys: launch them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    q_start, seqlen_q, k_start, _, seqlen_k = sequence_bounds(
        off_b, seqlen_q, seqlen_k, CuSeqlensQ, CuSeqlensK, SequsedK, IS_VARLEN, HAS_SEQUSED_K
    )
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    off_hk = off_h // group_size
    # scalar offsets in int64: batch * stride and token * stride can pass 2**31
    Q += off_b.to(tl.int64) * stride_qb + (q_start + start_m).to(tl.int64) * stride_qm + off_h.to(tl.int64) * stride_qh
    K += off_b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kn + off_hk.to(tl.int64) * stride_kh
    V += off_b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vn + off_hk.to(tl.int64) * stride_vh
    Out += (
        off_b.to(tl.int64) * stride_ob + (q_start + start_m).to(tl.int64) * stride_om + off_h.to(tl.int64) * stride_oh
    )
    LSE += (
        off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + (q_start + start_m).to(tl.int64) * stride_lm
    )

    offs_r = tl.arange(0, BLOCK_M)  # row within this block
    offs_m = start_m + offs_r  # row within the sequence
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + offs_r[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    if DOT_FP32:
        q = q.to(tl.float32)

    philox_base = 0
    if HAS_DROPOUT:
        # offset of (row 0, key 0) of this sequence and head; see flashtron/dropout.py
        off_bh = off_b.to(tl.int64) * tl.num_programs(1) + off_h
        if IS_VARLEN:
            off_bh = off_h.to(tl.int64)
        philox_base = (off_bh * philox_rows + q_start) * philox_cols + k_start
    alibi_slope_log2 = 0.0
    if HAS_ALIBI:
        alibi_slope_log2 = tl.load(AlibiSlopes + off_b * stride_ab + off_h * stride_ah).to(tl.float32) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    lo, full_lo, full_hi, hi = kv_block_bounds(
        start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    # unmasked middle first (the bulk), then the two masked edges: one loop helper, three ranges
    for part in tl.static_range(3):
        start = full_lo if part == 0 else (lo if part == 1 else full_hi)
        end = full_hi if part == 0 else (full_lo if part == 1 else hi)
        acc, l_i, m_i = _attend_kv_blocks(
            acc, l_i, m_i, q, K, V, stride_kn, stride_vn, start, end, offs_m, offs_d, offs_dv,
            seqlen_q, seqlen_k, window_left, window_right, qk_scale, softcap_log2, alibi_slope_log2,
            dropout_seed, dropout_threshold, philox_base, philox_cols,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, part != 0, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            DOT_FP32, PRECISION,
        )  # fmt: skip

    if HAS_SINK:
        # the sink is one more logit in the denominator, with no value row
        sink_log2 = tl.load(Sink + off_h).to(tl.float32) * LOG2E
        acc, l_i, m_i = fold_sink(acc, l_i, m_i, sink_log2)

    # rows that saw nothing have l_i == 0: out 0, lse -inf
    empty = l_i == 0.0
    out = acc * (dropout_scale / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_mask = (offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V)
    tl.store(Out + offs_r[:, None] * stride_om + offs_dv[None, :], out.to(Out.dtype.element_ty), mask=o_mask)
    tl.store(LSE + offs_r * stride_lm, lse, mask=offs_m < seqlen_q)


@triton.jit(do_not_specialize=["batch", "rows"])  # no recompile per batch size or row count
def fill_outside_rows_kernel(Out, LSE, CuSeqlensQ, stride_om, stride_oh, stride_lh, stride_lm, batch, rows,
                             BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DIM_V: tl.constexpr):  # fmt: skip
    """The attention_fwd_kernel's extra varlen batch slice on its own, for a varlen forward that another kernel
    computed (the Gluon one): out 0 and lse -inf in the rows outside every sequence. Grid (programs, nheads)."""
    fill_forward_outside(Out, LSE, CuSeqlensQ, stride_om, stride_oh, stride_lh, stride_lm, batch, rows,
                         tl.program_id(1), tl.program_id(0), tl.num_programs(0), BLOCK_M, BLOCK_DV,
                         HEAD_DIM_V)  # fmt: skip
