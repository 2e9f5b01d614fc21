"""Attention backward, without atomics, so it is deterministic.

1. `attention_bwd_preprocess_kernel`: delta = rowsum(dO * O), per query row.
2. `attention_bwd_dkdv_kernel`: grid (key blocks, nheads_k, batch). A program owns BLOCK_N keys of one
   KV head, loops over the query heads of its GQA group and the query blocks that see its keys, and
   accumulates dK and dV in registers.
3. `attention_bwd_dq_kernel`: grid (query blocks, nheads, batch). A program owns BLOCK_M query rows
   and loops over the KV blocks they see, as in the forward pass.
P is recomputed from the saved LSE: P = exp2(s - lse * log2(e)). dS = P * (dP - delta), chained through
the softcap's tanh and the softmax scale.
"""

import triton
import triton.language as tl

from flashtron.kernels.common import (
    LOG2E,
    RUNTIME_SCALARS,
    dropout_keep,
    fill_outside_sequences,
    kv_block_bounds,
    q_block_bounds,
    scores_log2,
    sequence_bounds,
    varlen_span,
    visible,
)


# seqlens and the LSE/delta strides that follow them stay runtime values (see attention_fwd_kernel)
@triton.jit(do_not_specialize=["seqlen_q", "stride_lb", "stride_lh"])
def attention_bwd_preprocess_kernel(
    Out,
    DOut,
    Delta,
    CuSeqlensQ,
    stride_ob,
    stride_om,
    stride_oh,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_lb,
    stride_lh,
    stride_lm,
    seqlen_q,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start = 0
    if IS_VARLEN:  # seqlen_q is then the row count of Out (total_q), which bounds the sequence
        q_start, seqlen_q = varlen_span(CuSeqlensQ, off_b, seqlen_q)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    offs_r = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row0 = (q_start + start_m).to(tl.int64)
    mask = (start_m + offs_r[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V)
    o = tl.load(
        Out
        + off_b.to(tl.int64) * stride_ob
        + row0 * stride_om
        + off_h.to(tl.int64) * stride_oh
        + offs_r[:, None] * stride_om
        + offs_dv[None, :],
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DOut
        + off_b.to(tl.int64) * stride_dob
        + row0 * stride_dom
        + off_h.to(tl.int64) * stride_doh
        + offs_r[:, None] * stride_dom
        + offs_dv[None, :],
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK_M]
    tl.store(
        Delta + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + (row0 + offs_r) * stride_lm,
        delta,
        mask=start_m + offs_r < seqlen_q,
    )


@triton.jit
def _dkdv_over_q_blocks(
    dk, dv, k, v, Q, DO, LSE, Delta, AlibiSlopes,
    stride_qm, stride_qh, stride_dom, stride_doh, stride_lh, stride_lm, stride_ah,
    off_h0, group_size, start, end, offs_n, offs_d, offs_dv,
    seqlen_q, seqlen_k, window_left, window_right, qk_scale, softcap_log2,
    dropout_seed, dropout_threshold, dropout_scale, philox_head0, philox_head_stride, philox_cols,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate into dK, dV of this key block the query blocks [start, end) of every query head of
    the GQA group (off_h0 .. off_h0 + group_size - 1). Q, DO, LSE, Delta point at row 0, head 0 of
    this sequence.

    One flat loop over (query block, head) pairs, heads innermost: a loop over heads around the
    block loop would let the compiler hoist every block-loop invariant above it, where they stay live
    through all three loops and spill (seen in the sm_90 register report, scripts/aot_report.py).
    Blocks are built transposed, [BLOCK_N, BLOCK_M], straight from the dots (k @ q^T, v @ dO^T):
    only loaded tensors are transposed, never a dot's result (common.visible says why)."""
    for step in range(0, tl.cdiv(end - start, BLOCK_M) * group_size):
        off_h = off_h0 + step % group_size
        start_m = start + (step // group_size) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen_q
        qt_mask = offs_d[:, None] < HEAD_DIM
        do_mask = offs_dv[None, :] < HEAD_DIM_V
        if MASK:
            qt_mask = qt_mask & row_ok[None, :]
            do_mask = do_mask & row_ok[:, None]
        Qh = Q + off_h.to(tl.int64) * stride_qh
        DOh = DO + off_h.to(tl.int64) * stride_doh
        qt = tl.load(Qh + offs_m[None, :] * stride_qm + offs_d[:, None], mask=qt_mask, other=0.0)  # [BLOCK_D, BLOCK_M]
        do = tl.load(DOh + offs_m[:, None] * stride_dom + offs_dv[None, :], mask=do_mask, other=0.0)
        LSEh = LSE + off_h.to(tl.int64) * stride_lh + offs_m * stride_lm
        Deltah = Delta + off_h.to(tl.int64) * stride_lh + offs_m * stride_lm
        if MASK:
            lse = tl.load(LSEh, mask=row_ok, other=0.0)
            delta = tl.load(Deltah, mask=row_ok, other=0.0)
        else:
            lse = tl.load(LSEh)
            delta = tl.load(Deltah)
        if DOT_FP32:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        alibi_slope_log2 = 0.0
        if HAS_ALIBI:
            alibi_slope_log2 = tl.load(AlibiSlopes + off_h * stride_ah).to(tl.float32) * LOG2E
        rows = offs_m[None, :]  # index grids of a [BLOCK_N, BLOCK_M] block
        cols = offs_n[:, None]
        qkt = tl.dot(k, qt, input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        st, tt = scores_log2(
            qkt, rows, cols, seqlen_q, seqlen_k, qk_scale, softcap_log2, alibi_slope_log2, HAS_SOFTCAP, HAS_ALIBI
        )
        pt = tl.exp2(st - lse[None, :] * LOG2E)  # [BLOCK_N, BLOCK_M]
        if MASK:
            keep = visible(rows, cols, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            pt = tl.where(keep, pt, 0.0)
        if HAS_DROPOUT:
            # the output used the dropped, rescaled P: dV sees it, and dP flows only where kept
            philox_base = philox_head0 + off_h.to(tl.int64) * philox_head_stride
            keept = dropout_keep(dropout_seed, dropout_threshold, philox_base, rows, cols, philox_cols)
            pt_dropped = tl.where(keept, pt * dropout_scale, 0.0)
            dv = tl.dot(pt_dropped.to(do.dtype), do, dv, input_precision=PRECISION)  # [BLOCK_N, BLOCK_DV]
        else:
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)  # [BLOCK_N, BLOCK_DV]
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        if HAS_DROPOUT:
            dpt = tl.where(keept, dpt * dropout_scale, 0.0)
        dst = pt * (dpt - delta[None, :])
        if HAS_SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)  # [BLOCK_N, BLOCK_D]
    return dk, dv


@triton.jit(do_not_specialize=RUNTIME_SCALARS)
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV, AlibiSlopes, CuSeqlensQ, CuSeqlensK, SequsedK,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_ab, stride_ah,
    seqlen_q, seqlen_k, group_size, window_left, window_right, qk_scale, softcap_log2,
    dropout_seed, dropout_threshold, dropout_scale, philox_rows, philox_cols, dk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_SEQUSED_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    off_hk = tl.program_id(1)
    off_b = tl.program_id(2)
    if IS_VARLEN:
        if off_b == tl.num_programs(2) - 1:  # the extra slice: key rows outside every sequence get dK = dV = 0
            batch = tl.num_programs(2) - 1
            DK += off_hk.to(tl.int64) * stride_dkh
            DV += off_hk.to(tl.int64) * stride_dvh
            fill_outside_sequences(DK, stride_dkn, CuSeqlensK, batch, seqlen_k, pid_n, tl.num_programs(0), BLOCK_N,
                                   BLOCK_D, HEAD_DIM, 0.0)  # fmt: skip
            fill_outside_sequences(DV, stride_dvn, CuSeqlensK, batch, seqlen_k, pid_n, tl.num_programs(0), BLOCK_N,
                                   BLOCK_DV, HEAD_DIM_V, 0.0)  # fmt: skip
            return
    nheads = tl.num_programs(1) * group_size
    q_start, seqlen_q, k_start, seqlen_k, seqlen_k_used = sequence_bounds(
        off_b, seqlen_q, seqlen_k, CuSeqlensQ, CuSeqlensK, SequsedK, IS_VARLEN, HAS_SEQUSED_K
    )
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    K += off_b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kn + off_hk.to(tl.int64) * stride_kh
    V += off_b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vn + off_hk.to(tl.int64) * stride_vh
    DK += off_b.to(tl.int64) * stride_dkb + k_start.to(tl.int64) * stride_dkn + off_hk.to(tl.int64) * stride_dkh
    DV += off_b.to(tl.int64) * stride_dvb + k_start.to(tl.int64) * stride_dvn + off_hk.to(tl.int64) * stride_dvh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # keys past seqused_k take part in nothing: their gradients are written as 0
    if start_n < seqlen_k_used:
        kv_row_ok = offs_n[:, None] < seqlen_k_used
        k = tl.load(
            K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_row_ok & (offs_d[None, :] < HEAD_DIM), other=0.0
        )  # [BLOCK_N, BLOCK_D]
        v = tl.load(
            V + offs_n[:, None] * stride_vn + offs_dv[None, :],
            mask=kv_row_ok & (offs_dv[None, :] < HEAD_DIM_V),
            other=0.0,
        )  # [BLOCK_N, BLOCK_DV]
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        lo, full_lo, full_hi, hi = q_block_bounds(
            start_n, seqlen_q, seqlen_k_used, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
        )
        # this sequence's row 0, head 0 (heads are picked inside the loop)
        Qb = Q + off_b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qm
        DOb = DO + off_b.to(tl.int64) * stride_dob + q_start.to(tl.int64) * stride_dom
        LSEb = LSE + off_b.to(tl.int64) * stride_lb + q_start.to(tl.int64) * stride_lm
        Deltab = Delta + off_b.to(tl.int64) * stride_lb + q_start.to(tl.int64) * stride_lm
        Alibi = AlibiSlopes
        if HAS_ALIBI:
            Alibi = AlibiSlopes + off_b * stride_ab
        # Philox offset of (row 0, key 0) of head h is philox_head0 + h * philox_head_stride
        # (flashtron/dropout.py): dense heads are numbered b * nheads + h, varlen ones h.
        philox_head_stride = philox_rows.to(tl.int64) * philox_cols
        philox_head0 = q_start.to(tl.int64) * philox_cols + k_start
        if not IS_VARLEN:
            philox_head0 += off_b.to(tl.int64) * nheads * philox_head_stride
        off_h0 = off_hk * group_size
        # unmasked middle, then the two masked edges
        for part in tl.static_range(3):
            start = full_lo if part == 0 else (lo if part == 1 else full_hi)
            end = full_hi if part == 0 else (full_lo if part == 1 else hi)
            dk, dv = _dkdv_over_q_blocks(
                dk, dv, k, v, Qb, DOb, LSEb, Deltab, Alibi,
                stride_qm, stride_qh, stride_dom, stride_doh, stride_lh, stride_lm, stride_ah,
                off_h0, group_size, start, end, offs_n, offs_d, offs_dv,
                seqlen_q, seqlen_k_used, window_left, window_right, qk_scale, softcap_log2,
                dropout_seed, dropout_threshold, dropout_scale, philox_head0, philox_head_stride, philox_cols,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, part != 0, HAS_LEFT, HAS_RIGHT,
                HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, DOT_FP32, PRECISION,
            )  # fmt: skip
    dk = dk * dk_scale
    n_ok = offs_n[:, None] < seqlen_k
    tl.store(
        DK + offs_n[:, None] * stride_dkn + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=n_ok & (offs_d[None, :] < HEAD_DIM),
    )
    tl.store(
        DV + offs_n[:, None] * stride_dvn + offs_dv[None, :],
        dv.to(DV.dtype.element_ty),
        mask=n_ok & (offs_dv[None, :] < HEAD_DIM_V),
    )


@triton.jit
def _dq_over_kv_blocks(
    dq,
    q,
    do,
    lse_log2,
    delta,
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
    dropout_scale,
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
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_mask = offs_d[None, :] < HEAD_DIM
        v_mask = offs_dv[None, :] < HEAD_DIM_V
        if MASK:
            k_mask = k_mask & (offs_n[:, None] < seqlen_k)
            v_mask = v_mask & (offs_n[:, None] < seqlen_k)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=k_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=v_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        s, t = scores_log2(
            qk,
            offs_m[:, None],
            offs_n[None, :],
            seqlen_q,
            seqlen_k,
            qk_scale,
            softcap_log2,
            alibi_slope_log2,
            HAS_SOFTCAP,
            HAS_ALIBI,
        )
        p = tl.exp2(s - lse_log2[:, None])
        if MASK:
            keep = visible(
                offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT
            )
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        if HAS_DROPOUT:
            keep = dropout_keep(
                dropout_seed, dropout_threshold, philox_base, offs_m[:, None], offs_n[None, :], philox_cols
            )
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # [BLOCK_M, BLOCK_D]
    return dq


@triton.jit(do_not_specialize=RUNTIME_SCALARS)
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ, AlibiSlopes, CuSeqlensQ, CuSeqlensK, SequsedK, stride_qb, stride_qm,
    stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_dob, stride_dom,
    stride_doh, stride_lb, stride_lh, stride_lm, stride_dqb, stride_dqm, stride_dqh, stride_ab, stride_ah,
    seqlen_q, seqlen_k, group_size, window_left, window_right, qk_scale, softcap_log2, dropout_seed,
    dropout_threshold, dropout_scale, philox_rows, philox_cols, dq_scale, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    HEAVY_FIRST: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    if IS_VARLEN:
        if off_b == tl.num_programs(2) - 1:  # the extra slice: query rows outside every sequence get dQ = 0
            DQ += off_h.to(tl.int64) * stride_dqh
            fill_outside_sequences(DQ, stride_dqm, CuSeqlensQ, tl.num_programs(2) - 1, seqlen_q, pid_m,
                                   tl.num_programs(0), BLOCK_M, BLOCK_D, HEAD_DIM, 0.0)  # fmt: skip
            return
    if HEAVY_FIRST:
        pid_m = tl.num_programs(0) - 1 - pid_m
    q_start, seqlen_q, k_start, _, seqlen_k = sequence_bounds(
        off_b, seqlen_q, seqlen_k, CuSeqlensQ, CuSeqlensK, SequsedK, IS_VARLEN, HAS_SEQUSED_K
    )
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    off_hk = off_h // group_size
    row0 = (q_start + start_m).to(tl.int64)
    Q += off_b.to(tl.int64) * stride_qb + row0 * stride_qm + off_h.to(tl.int64) * stride_qh
    DO += off_b.to(tl.int64) * stride_dob + row0 * stride_dom + off_h.to(tl.int64) * stride_doh
    DQ += off_b.to(tl.int64) * stride_dqb + row0 * stride_dqm + off_h.to(tl.int64) * stride_dqh
    LSE += off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + row0 * stride_lm
    Delta += off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + row0 * stride_lm
    K += off_b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kn + off_hk.to(tl.int64) * stride_kh
    V += off_b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vn + off_hk.to(tl.int64) * stride_vh

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seqlen_q
    q = tl.load(
        Q + offs_r[:, None] * stride_qm + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    do = tl.load(
        DO + offs_r[:, None] * stride_dom + offs_dv[None, :],
        mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
        other=0.0,
    )
    lse = tl.load(LSE + offs_r * stride_lm, mask=row_ok, other=0.0)
    delta = tl.load(Delta + offs_r * stride_lm, mask=row_ok, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    philox_base = 0
    if HAS_DROPOUT:
        off_bh = off_b.to(tl.int64) * tl.num_programs(1) + off_h
        if IS_VARLEN:
            off_bh = off_h.to(tl.int64)
        philox_base = (off_bh * philox_rows + q_start) * philox_cols + k_start
    alibi_slope_log2 = 0.0
    if HAS_ALIBI:
        alibi_slope_log2 = tl.load(AlibiSlopes + off_b * stride_ab + off_h * stride_ah).to(tl.float32) * LOG2E
    lse_log2 = lse * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = kv_block_bounds(
        start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    # unmasked middle, then the two masked edges: one loop helper, three ranges
    for part in tl.static_range(3):
        start = full_lo if part == 0 else (lo if part == 1 else full_hi)
        end = full_hi if part == 0 else (full_lo if part == 1 else hi)
        dq = _dq_over_kv_blocks(
            dq, q, do, lse_log2, delta, K, V, stride_kn, stride_vn, start, end, offs_m, offs_d, offs_dv,
            seqlen_q, seqlen_k, window_left, window_right, qk_scale, softcap_log2, alibi_slope_log2,
            dropout_seed, dropout_threshold, dropout_scale, philox_base, philox_cols,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, part != 0, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            DOT_FP32, PRECISION,
        )  # fmt: skip
    dq = dq * dq_scale
    tl.store(
        DQ + offs_r[:, None] * stride_dqm + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )
