"""One work tile of the Gluon Hopper forward, as a consumer partition computes it (kernels/hopper_fwd.py runs the
grids, the loader and the kernel): S = Q K^T and O += P V by async wgmma over the K/V ring, the online softmax
with the mask, softcap and the V-tail zeroing of varlen, the ping-pong turns between consumers, and the
epilogue (out and the natural-log LSE, out 0 / lse -inf for rows that saw no key). consume_tile is the entry;
the one-tile grid calls it once per program, the persistent grid once per work tile.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from flashtron.kernels.hopper_common import K_BLOCK, V_BLOCK, load_block

LN2 = gl.constexpr(0.6931471805599453)  # lse (natural log) = log2-sum-exp * ln 2


@gluon.jit
def block_done(desc, bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
               WARP_SPECIALIZE: gl.constexpr, KV: gl.constexpr):  # fmt: skip
    """The consumers are done reading K (KV = K_BLOCK) or V (V_BLOCK) block t: free its slot (warp-specialized)
    or, with no loader, start the load that will use the slot STAGES blocks from now."""
    if WARP_SPECIALIZE:
        mbarrier.arrive(bars.index((2 + KV) * STAGES + t % STAGES), count=1)
    else:
        row = lo + (t + STAGES) * BLOCK_N
        load_block(desc, bufs, bars, t + STAGES, row, off_b, off_hk, STAGES, KV, pred=t + STAGES < n_blocks)


@gluon.jit
def turn_wait(bars, c, STAGES: gl.constexpr, CID: gl.constexpr, CONSUMERS: gl.constexpr):
    """Ping-pong: wait until it is this consumer's c-th turn to issue matmuls. Consumer 0's first turn is
    free (a fresh mbarrier counts as having completed the phase before 0); consumer c's turn k completes
    with consumer c - 1's k-th pass (consumer 0's turn k with the last one's (k - 1)-th). Turns strictly
    alternate, so no barrier gets two phases ahead of its waiter and the parity is enough."""
    if CONSUMERS > 1:
        if CID == 0:
            mbarrier.wait(bars.index(4 * STAGES + 1), (c & 1) ^ 1)
        else:
            mbarrier.wait(bars.index(4 * STAGES + 1 + CID), c & 1)


@gluon.jit
def turn_pass(bars, STAGES: gl.constexpr, CID: gl.constexpr, CONSUMERS: gl.constexpr):
    """Ping-pong: this consumer's matmuls are issued; the next consumer may issue its own."""
    if CONSUMERS > 1:
        mbarrier.arrive(bars.index(4 * STAGES + 1 + (CID + 1) % CONSUMERS), count=1)


@gluon.jit
def tanh(x):
    """kernels/common.tanh's formula, op for op (ex2.approx and a full-range fp32 division: a few ulp of
    fp32), not the tanh.approx.f32 instruction (relative error about 2**-11): the Triton backward recomputes
    the capped scores with common.tanh against this forward's lse, so the two must agree to fp32 rounding,
    and 2**-11 of a softcap of 30 (in log2 units, 43) is a score error of 0.02, a 1.5% error in P, past the
    tolerance rule's 2x PyTorch-in-dtype for fp16. Saturates cleanly at +-1."""
    return 1.0 - 2.0 / (gl.exp(2.0 * x) + 1.0)


@gluon.jit
def pack_16bit(p, dtype: gl.constexpr):
    """p (fp32) rounded to dtype two elements at a time, by cvt.rn.{bf16,f16}x2.f32: each pair of a thread's
    consecutive elements lands in one 32-bit register in the order the wgmma A operand reads it. p.to(dtype)
    rounds one element at a time and packs after, and ptxas then fixes the pair order of every register with a
    PRMT (32 a block and thread at d128: 6% of the consumer loop's instructions)."""
    if dtype == gl.bfloat16:
        out = gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [p], gl.bfloat16, True, 2)
    else:
        out = gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [p], gl.float16, True, 2)
    return out


@gluon.jit
def zero_v_tail(v_tile, n_valid, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Varlen: zero rows [n_valid, BLOCK_N) of the V block v_tile [BLOCK_N, HEAD_DIM] in shared memory before
    a P V wgmma reads it; nothing when the block is whole (n_valid >= BLOCK_N). Those rows are the ones of a
    sequence's last, partial key block that lie past its end (or past seqused_k): the next sequence's, or the
    padding's after cu_seqlens_k[-1], since TMA zero-fills only past the whole packed tensor. P is 0 there,
    but 0 x NaN (or Inf) is NaN, which would reach out; the Triton forward loads those rows masked to 0. Keys
    there need nothing: their scores go through a `where` to -inf (softmax_step).
    The whole block in one load and one store (d128, 4 warps: 64 registers a thread for the moment; in 16-row
    chunks ptxas spilled 8 bytes at d64 with softcap, and Triton put two bar.syncs around each chunk). The
    fence orders these generic-proxy stores before the async proxy's (wgmma's) reads; the bar.sync that
    Triton puts between the stores and the next wgmma on the slot makes every warp of the partition see them."""
    if n_valid < BLOCK_N:
        COLS: gl.constexpr = HEAD_DIM // 8  # threads along a row, 8 elements (16 bytes) each
        gl.static_assert(COLS <= 32)
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // COLS, COLS], [gl.num_warps(), 1], [1, 0])
        rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        v = v_tile.load(layout)  # [BLOCK_N, HEAD_DIM]
        v_tile.store(gl.where(gl.expand_dims(rows < n_valid, 1), v, gl.zeros_like(v)))
        fence_async_shared()  # the generic-proxy stores, before the async proxy (wgmma) reads the slot


@gluon.jit
def softmax_step(qk, m_i, l_i, offs_m, start_n, seqlen_q, seqlen_k, window_left, window_right, qk_scale, softcap_log2,
                  s_layout: gl.constexpr, BLOCK_N: gl.constexpr, MASK: gl.constexpr, HAS_LEFT: gl.constexpr,
                  HAS_RIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr):  # fmt: skip
    """Fold raw scores qk [BLOCK_M, BLOCK_N] of keys [start_n, start_n + BLOCK_N) into the running max
    and sum (log2 units: scores times qk_scale). Returns (p, alpha, m_i, l_i): the block's unnormalised
    probabilities and the factor that rescales the old accumulator. With MASK, keys outside the window
    or past seqlen_k are excluded. HAS_SOFTCAP: the scores are softcap * tanh(qk * softmax_scale / softcap),
    in log2 units, before the mask, as kernels/common.scores_log2 (qk_scale = softmax_scale / softcap,
    softcap_log2 = softcap * log2(e)); without it softcap_log2 is not read."""
    # Without softcap the scores stay raw and qk_scale goes into exp2's argument, one FFMA an element instead of a
    # multiply and a subtract (FA3's folded scale); the row max is taken raw and scaled after, which is exact:
    # qk_scale > 0 (checks.check_options) and rounding is monotonic, so max(qk) * s == max(qk * s).
    if HAS_SOFTCAP:
        qk = tanh(qk * qk_scale) * softcap_log2
    if MASK:
        offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        rows = gl.expand_dims(offs_m, 1)
        cols = gl.expand_dims(offs_n, 0)
        keep = cols < seqlen_k
        diag = rows + (seqlen_k - seqlen_q)
        if HAS_RIGHT:
            keep = keep & (cols <= diag + window_right)
        if HAS_LEFT:
            keep = keep & (cols >= diag - window_left)
        qk = gl.where(keep, qk, float("-inf"))
    row_max = gl.max(qk, 1)
    if not HAS_SOFTCAP:
        row_max = row_max * qk_scale
    m_new = gl.maximum(m_i, row_max)
    if MASK:
        # a row that has seen no key yet keeps m = -inf: subtract 0 instead of inf - inf
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    if HAS_SOFTCAP:
        p = gl.exp2(qk - gl.expand_dims(m_sub, 1))  # [BLOCK_M, BLOCK_N]
    else:
        p = gl.exp2(qk * qk_scale - gl.expand_dims(m_sub, 1))
    alpha = gl.exp2(m_i - m_sub)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def attend(acc, m_i, l_i, p_op, t, tb, q_smem, k_desc, v_desc, k_bufs, v_bufs, bars,
            start, end, n_blocks, lo, off_b, off_hk, offs_m, seqlen_q, seqlen_k, window_left, window_right, qk_scale,
            softcap_log2,
            s_layout: gl.constexpr, o_layout: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
            STAGES: gl.constexpr, MASK: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
            HAS_SOFTCAP: gl.constexpr,
            WARP_SPECIALIZE: gl.constexpr, OVERLAP: gl.constexpr, CID: gl.constexpr,
            CONSUMERS: gl.constexpr, IS_VARLEN: gl.constexpr):  # fmt: skip
    """Fold KV blocks [start, end) into (acc, m_i, l_i); t is the ring position of the first of them, and
    t + tb a ping-pong turn count (tb: the tiles this program finished before, each one turn more than
    blocks; 0 without the persistent grid).

    Plain order, per block: S = Q K^T, wait, softmax, O += P V, wait. With OVERLAP (FA3's intra-warpgroup
    overlap) block t's P V is not issued yet on entry (p_op holds its P): each step issues S(t+1) = Q K^T
    and O += P(t) V(t) together, waits for S only, runs the softmax of t+1 while the P V matmul runs,
    then waits for it and rescales O. The caller issues the last block's P V. With ping-pong the two
    matmuls of a step are this consumer's t-th turn. IS_VARLEN: in plain order a masked block may be the
    sequence's last, partial one, whose V rows past the end are zeroed (zero_v_tail) before its P V; with
    OVERLAP no block whose P V is issued here is the tile's last."""
    dtype: gl.constexpr = k_desc.dtype
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    zero_s = gl.zeros([offs_m.shape[0], BLOCK_N], gl.float32, s_layout)
    for start_n in range(start, end, BLOCK_N):
        if OVERLAP:
            t += 1  # the block this step scores; block t - 1 has its P in p_op
        s = t % STAGES
        mbarrier.wait(bars.index(s), (t // STAGES) & 1)
        k_tile = k_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        if OVERLAP:
            turn_wait(bars, t + tb, STAGES, CID, CONSUMERS)
            qk = warpgroup_mma(q_smem, k_tile, zero_s, use_acc=False, is_async=True)
            sp = (t - 1) % STAGES
            mbarrier.wait(bars.index(STAGES + sp), ((t - 1) // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_bufs.index(sp).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            turn_pass(bars, STAGES, CID, CONSUMERS)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))  # S done; P V may still run
        else:
            qk = warpgroup_mma(q_smem, k_tile, zero_s, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))  # [BLOCK_M, BLOCK_N]
        block_done(k_desc, k_bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES, WARP_SPECIALIZE, K_BLOCK)
        p, alpha, m_i, l_i = softmax_step(qk, m_i, l_i, offs_m, start_n, seqlen_q, seqlen_k, window_left,
                                           window_right, qk_scale, softcap_log2, s_layout, BLOCK_N, MASK, HAS_LEFT,
                                           HAS_RIGHT, HAS_SOFTCAP)  # fmt: skip
        if OVERLAP:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            block_done(
                v_desc, v_bufs, bars, t - 1, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES, WARP_SPECIALIZE, V_BLOCK
            )
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_op = gl.convert_layout(pack_16bit(p, dtype), p_layout)
        if not OVERLAP:
            mbarrier.wait(bars.index(STAGES + s), (t // STAGES) & 1)
            if IS_VARLEN and MASK:
                zero_v_tail(v_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]), seqlen_k - start_n, BLOCK_N, HEAD_DIM)
            acc = warpgroup_mma(p_op, v_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))  # [BLOCK_M, HEAD_DIM]
            block_done(v_desc, v_bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES, WARP_SPECIALIZE, V_BLOCK)
            t += 1
    return acc, m_i, l_i, p_op, t


@gluon.jit
def consume_tile(q_tile, q_ready, q_phase, q_free, k_desc, v_desc, k_bufs, v_bufs, bars, Out, LSE,
                  stride_ob, stride_om, stride_oh, stride_lb, stride_lh, off_b, off_h, off_hk, start_m, seqlen_q,
                  seqlen_k, window_left, window_right, qk_scale, softcap_log2, lo, full_lo, full_hi, hi, n_blocks, t,
                  tb,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                  HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                  WARP_SPECIALIZE: gl.constexpr,
                  OVERLAP: gl.constexpr, CID: gl.constexpr, CONSUMERS: gl.constexpr,
                  RELEASE_Q: gl.constexpr, IS_VARLEN: gl.constexpr):  # fmt: skip
    """Both matmuls, the online softmax and the epilogue of one work tile, for this consumer's rows
    [CID * ROWS, (CID + 1) * ROWS) of the block (ROWS = BLOCK_M / CONSUMERS), its Q in q_tile once q_ready
    completes phase q_phase. Visits n_blocks >= 1 KV blocks from lo (the same for every consumer: the
    range is the whole block's): the first is peeled off (masked), then the masked left edge, the unmasked
    middle and the masked right edge, in ascending order as the loads were issued. t is the ring position
    of the tile's first KV block and tb the tiles this program finished before (both 0 without the
    persistent grid; ring phases and ping-pong turns count on across tiles). With RELEASE_Q, arrives on
    q_free once the tile's last S = Q K^T is done. Returns the ring position after the tile."""
    ROWS: gl.constexpr = BLOCK_M // CONSUMERS
    num_warps: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = k_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    offs_m = start_m + CID * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    mbarrier.wait(q_ready, q_phase)

    # the tile's first block: scores and softmax (with the mask: it may be an edge block, or see nothing at all)
    s0 = t % STAGES
    mbarrier.wait(bars.index(s0), (t // STAGES) & 1)
    k_tile = k_bufs.index(s0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
    turn_wait(bars, t + tb, STAGES, CID, CONSUMERS)
    qk = warpgroup_mma(q_tile, k_tile, gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
    turn_pass(bars, STAGES, CID, CONSUMERS)
    qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
    block_done(k_desc, k_bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES, WARP_SPECIALIZE, K_BLOCK)
    p, _, m_i, l_i = softmax_step(qk, m_i, l_i, offs_m, lo, seqlen_q, seqlen_k, window_left, window_right, qk_scale,
                                   softcap_log2,
                                   s_layout, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP)  # fmt: skip
    p_op = gl.convert_layout(pack_16bit(p, dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    if not OVERLAP:
        mbarrier.wait(bars.index(STAGES + s0), (t // STAGES) & 1)
        if IS_VARLEN:
            zero_v_tail(v_bufs.index(s0).reshape([BLOCK_N, HEAD_DIM]), seqlen_k - lo, BLOCK_N, HEAD_DIM)
        acc = warpgroup_mma(p_op, v_bufs.index(s0).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        block_done(v_desc, v_bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES, WARP_SPECIALIZE, V_BLOCK)
        t = t + 1

    first = lo + BLOCK_N
    for seg in gl.static_range(3):
        # (masked left edge, unmasked middle, masked right edge), each clipped to start after block 0
        if seg == 0:
            start, end = first, gl.maximum(full_lo, first)
        elif seg == 1:
            start, end = gl.maximum(full_lo, first), gl.maximum(full_hi, first)
        else:
            start, end = gl.maximum(full_hi, first), gl.maximum(hi, first)
        acc, m_i, l_i, p_op, t = attend(
            acc, m_i, l_i, p_op, t, tb, q_tile, k_desc, v_desc, k_bufs, v_bufs, bars, start, end, n_blocks, lo,
            off_b, off_hk, offs_m, seqlen_q, seqlen_k, window_left, window_right, qk_scale, softcap_log2, s_layout,
            o_layout,
            BLOCK_N, HEAD_DIM, STAGES, seg != 1, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, WARP_SPECIALIZE, OVERLAP, CID,
            CONSUMERS, IS_VARLEN,
        )  # fmt: skip
    if RELEASE_Q:
        # every S of the tile has been waited for: the loader may put a later tile's Q into this buffer
        mbarrier.arrive(q_free, count=1)
    if OVERLAP:
        # the last block's P V (the tile's turn n_blocks)
        s = t % STAGES
        mbarrier.wait(bars.index(STAGES + s), (t // STAGES) & 1)
        if IS_VARLEN and CID == 0:
            # the tile's last block may be the sequence's last, partial one. Consumer 0 zeroes the slot for all:
            # the others read it in their turn n_blocks, which begins when consumer 0 passes its own, after the
            # stores and their fence (its own previous turn read another V slot: none of them reads this one yet)
            zero_v_tail(v_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]), seqlen_k - (lo + (n_blocks - 1) * BLOCK_N),
                         BLOCK_N, HEAD_DIM)  # fmt: skip
        turn_wait(bars, t + 1 + tb, STAGES, CID, CONSUMERS)
        acc = warpgroup_mma(p_op, v_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        turn_pass(bars, STAGES, CID, CONSUMERS)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        block_done(v_desc, v_bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES, WARP_SPECIALIZE, V_BLOCK)
        t = t + 1

    # rows that saw nothing have l_i == 0: out 0, lse -inf
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
    out = acc * gl.expand_dims(gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout)), 1)

    LSE += off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh
    gl.store(LSE + offs_m, lse, mask=offs_m < seqlen_q)
    offs_om = gl.convert_layout(offs_m, gl.SliceLayout(1, o_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    Out += off_b.to(gl.int64) * stride_ob + off_h.to(gl.int64) * stride_oh
    o_ptrs = Out + gl.expand_dims(offs_om.to(gl.int64) * stride_om, 1) + gl.expand_dims(offs_d, 0)
    gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=gl.expand_dims(offs_om < seqlen_q, 1))
    return t
