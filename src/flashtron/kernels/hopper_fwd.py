"""Attention forward for Hopper (sm_90) in Gluon: TMA loads into a K/V shared-memory ring, async wgmma.

Grid: (query blocks, nheads, batch), like kernels/fwd.py, and the same results: out, and the LSE in
natural log with out 0 / lse -inf for rows that see no key. One program owns BLOCK_M query rows of one
head; its num_warps (8: two warpgroups of 64 rows) run the two matmuls and the online softmax.

Q, K and V arrive as 4-D TMA descriptors over (batch, seqlen, nheads, headdim) with a box of
[1, BLOCK, 1, HEAD_DIM]: rows past seqlen are zero-filled per batch entry, so no block reads into the
next sequence. Keys past seqlen_k still have to be masked to -inf in the scores. IS_VARLEN (one-tile grid
only): 3-D descriptors over the packed (total, nheads, headdim) with [BLOCK, 1, HEAD_DIM] boxes placed at the
sequence's first row (hopper_common.box_coords); rows past the sequence's end belong to the next one (or to
the padding), so keys there are masked (kv_range's masked edges), their V rows are zeroed in the slot before
the P V wgmma of the tile's last block (_zero_v_tail: 0 x NaN would reach out), and query rows there are not
stored. HAS_SOFTCAP: scores capped by tanh before the mask, as the Triton forward (_softmax_step, _tanh).

K/V ring: STAGES slots, each with a ready barrier for K and one for V (TMA arrives with the byte count)
and, with WARP_SPECIALIZE, an empty barrier the consumers arrive on when both matmuls on the slot are
done. WARP_SPECIALIZE puts the loads in a 1-warp partition with few registers; without it the consumer
warps issue the next load into a slot themselves once they are done with it.

CONSUMERS > 1 (ping-pong, FA3's inter-warpgroup overlap; needs WARP_SPECIALIZE and OVERLAP): the math
runs in CONSUMERS partitions of one warpgroup each (num_warps = 4), consumer c owning query rows
[c * BLOCK_M / CONSUMERS, (c + 1) * BLOCK_M / CONSUMERS) of the block with its own Q tile, accumulator
and softmax state. All of them visit the same KV blocks from the one ring (each slot is freed when all
CONSUMERS have arrived). They take turns issuing their matmuls: consumer c waits on its turn barrier,
issues the step's wgmmas, and passes the turn to consumer c + 1 (round robin), so one warpgroup's
softmax runs while the next one's matmuls occupy the tensor cores.

PERSISTENT (dispatched for dense calls: launch_hopper.dispatched_tile; needs WARP_SPECIALIZE, CONSUMERS <= 2): a 1-D
grid of min(work tiles, SMs) programs, each looping over its (query block, head, batch) tiles in the
static order of tile_coords (heaviest first under a right bound), or with DYNAMIC the next free tile of a
per-launch atomic counter after each program's first. The loader also loads each tile's Q,
into one of two Q buffers, so the next tile's Q and K/V are in flight while the consumers finish the
current one; ring positions and ping-pong turns count over all of a program's tiles.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from flashtron.kernels.hopper_common import (
    box_coords,
    kv_loader,
    kv_range,
    load_k,
    load_kv,
    load_v,
    persistent_tiles,
    sequence_bounds,
    tile_work,
)

LN2 = gl.constexpr(0.6931471805599453)  # lse (natural log) = log2-sum-exp * ln 2


@gluon.jit
def _k_done(k_desc, k_bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
            WARP_SPECIALIZE: gl.constexpr):  # fmt: skip
    """The consumers are done reading K block t: free its slot (warp-specialized) or, with no loader,
    start the K load that will use the slot STAGES blocks from now."""
    if WARP_SPECIALIZE:
        mbarrier.arrive(bars.index(2 * STAGES + t % STAGES), count=1)
    else:
        row = lo + (t + STAGES) * BLOCK_N
        load_k(k_desc, k_bufs, bars, t + STAGES, row, off_b, off_hk, STAGES, pred=t + STAGES < n_blocks)


@gluon.jit
def _v_done(v_desc, v_bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
            WARP_SPECIALIZE: gl.constexpr):  # fmt: skip
    if WARP_SPECIALIZE:
        mbarrier.arrive(bars.index(3 * STAGES + t % STAGES), count=1)
    else:
        row = lo + (t + STAGES) * BLOCK_N
        load_v(v_desc, v_bufs, bars, t + STAGES, row, off_b, off_hk, STAGES, pred=t + STAGES < n_blocks)


@gluon.jit
def _turn_wait(bars, c, STAGES: gl.constexpr, CID: gl.constexpr, CONSUMERS: gl.constexpr):
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
def _turn_pass(bars, STAGES: gl.constexpr, CID: gl.constexpr, CONSUMERS: gl.constexpr):
    """Ping-pong: this consumer's matmuls are issued; the next consumer may issue its own."""
    if CONSUMERS > 1:
        mbarrier.arrive(bars.index(4 * STAGES + 1 + (CID + 1) % CONSUMERS), count=1)


@gluon.jit
def _tanh(x):
    """kernels/common.tanh's formula, op for op (ex2.approx and a full-range fp32 division: a few ulp of
    fp32), not the tanh.approx.f32 instruction (relative error about 2**-11): the Triton backward recomputes
    the capped scores with common.tanh against this forward's lse, so the two must agree to fp32 rounding,
    and 2**-11 of a softcap of 30 (in log2 units, 43) is a score error of 0.02, a 1.5% error in P, past the
    tolerance rule's 2x PyTorch-in-dtype for fp16. Saturates cleanly at +-1."""
    return 1.0 - 2.0 / (gl.exp(2.0 * x) + 1.0)


@gluon.jit
def _zero_v_tail(v_tile, n_valid, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Varlen: zero rows [n_valid, BLOCK_N) of the V block v_tile [BLOCK_N, HEAD_DIM] in shared memory before
    a P V wgmma reads it; nothing when the block is whole (n_valid >= BLOCK_N). Those rows are the ones of a
    sequence's last, partial key block that lie past its end (or past seqused_k): the next sequence's, or the
    padding's after cu_seqlens_k[-1], since TMA zero-fills only past the whole packed tensor. P is 0 there,
    but 0 x NaN (or Inf) is NaN, which would reach out; the Triton forward loads those rows masked to 0. Keys
    there need nothing: their scores go through a `where` to -inf (_softmax_step).
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
def _softmax_step(qk, m_i, l_i, offs_m, start_n, seqlen_q, seqlen_k, window_left, window_right, qk_scale, softcap_log2,
                  s_layout: gl.constexpr, BLOCK_N: gl.constexpr, MASK: gl.constexpr, HAS_LEFT: gl.constexpr,
                  HAS_RIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr):  # fmt: skip
    """Fold raw scores qk [BLOCK_M, BLOCK_N] of keys [start_n, start_n + BLOCK_N) into the running max
    and sum (log2 units: scores times qk_scale). Returns (p, alpha, m_i, l_i): the block's unnormalised
    probabilities and the factor that rescales the old accumulator. With MASK, keys outside the window
    or past seqlen_k are excluded. HAS_SOFTCAP: the scores are softcap * tanh(qk * softmax_scale / softcap),
    in log2 units, before the mask, as kernels/common.scores_log2 (qk_scale = softmax_scale / softcap,
    softcap_log2 = softcap * log2(e)); without it softcap_log2 is not read."""
    if HAS_SOFTCAP:
        qk = _tanh(qk * qk_scale) * softcap_log2
    else:
        qk = qk * qk_scale
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
        m_new = gl.maximum(m_i, gl.max(qk, 1))
        # a row that has seen no key yet keeps m = -inf: subtract 0 instead of inf - inf
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = gl.maximum(m_i, gl.max(qk, 1))
        m_sub = m_new
    p = gl.exp2(qk - gl.expand_dims(m_sub, 1))  # [BLOCK_M, BLOCK_N]
    alpha = gl.exp2(m_i - m_sub)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _attend(acc, m_i, l_i, p_op, t, tb, q_smem, k_desc, v_desc, k_bufs, v_bufs, bars,
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
    sequence's last, partial one, whose V rows past the end are zeroed (_zero_v_tail) before its P V; with
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
            _turn_wait(bars, t + tb, STAGES, CID, CONSUMERS)
            qk = warpgroup_mma(q_smem, k_tile, zero_s, use_acc=False, is_async=True)
            sp = (t - 1) % STAGES
            mbarrier.wait(bars.index(STAGES + sp), ((t - 1) // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_bufs.index(sp).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            _turn_pass(bars, STAGES, CID, CONSUMERS)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))  # S done; P V may still run
        else:
            qk = warpgroup_mma(q_smem, k_tile, zero_s, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))  # [BLOCK_M, BLOCK_N]
        _k_done(k_desc, k_bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES, WARP_SPECIALIZE)
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, offs_m, start_n, seqlen_q, seqlen_k, window_left,
                                           window_right, qk_scale, softcap_log2, s_layout, BLOCK_N, MASK, HAS_LEFT,
                                           HAS_RIGHT, HAS_SOFTCAP)  # fmt: skip
        if OVERLAP:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            _v_done(v_desc, v_bufs, bars, t - 1, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES, WARP_SPECIALIZE)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        if not OVERLAP:
            mbarrier.wait(bars.index(STAGES + s), (t // STAGES) & 1)
            if IS_VARLEN and MASK:
                _zero_v_tail(v_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]), seqlen_k - start_n, BLOCK_N, HEAD_DIM)
            acc = warpgroup_mma(p_op, v_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))  # [BLOCK_M, HEAD_DIM]
            _v_done(v_desc, v_bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES, WARP_SPECIALIZE)
            t += 1
    return acc, m_i, l_i, p_op, t


@gluon.jit
def _consumer(q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, Out, LSE, stride_ob, stride_om, stride_oh,
              stride_lb, stride_lh, off_b, off_h, off_hk, start_m, seqlen_q, seqlen_k, window_left, window_right,
              qk_scale, softcap_log2, lo, full_lo, full_hi, hi, n_blocks,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, WARP_SPECIALIZE: gl.constexpr,
              OVERLAP: gl.constexpr, CID: gl.constexpr, CONSUMERS: gl.constexpr,
              IS_VARLEN: gl.constexpr):  # fmt: skip
    """A math partition of the one-tile-per-program kernel: rows [CID * ROWS, (CID + 1) * ROWS) of the
    block (ROWS = BLOCK_M / CONSUMERS), see _consume_tile. Without the loader partition it also issues
    the first STAGES K/V loads."""
    gl.static_assert(CONSUMERS == 1 or (WARP_SPECIALIZE and OVERLAP), "ping-pong needs the loader and overlap")
    if not WARP_SPECIALIZE:
        for i in gl.static_range(STAGES):
            load_k(k_desc, k_bufs, bars, i, lo + i * BLOCK_N, off_b, off_hk, STAGES, pred=i < n_blocks)
            load_v(v_desc, v_bufs, bars, i, lo + i * BLOCK_N, off_b, off_hk, STAGES, pred=i < n_blocks)
    q_tile = q_smem.index(CID).reshape([BLOCK_M // CONSUMERS, HEAD_DIM])
    t = 0  # assigned, so a value (a constexpr argument could not be carried through _attend's loop)
    tb = 0
    _consume_tile(
        q_tile, bars.index(4 * STAGES), 0, bars.index(4 * STAGES), k_desc, v_desc, k_bufs, v_bufs, bars, Out, LSE,
        stride_ob, stride_om, stride_oh, stride_lb, stride_lh, off_b, off_h, off_hk, start_m, seqlen_q, seqlen_k,
        window_left, window_right, qk_scale, softcap_log2, lo, full_lo, full_hi, hi, n_blocks, t, tb,
        BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, WARP_SPECIALIZE, OVERLAP, CID,
        CONSUMERS, False, IS_VARLEN,
    )  # fmt: skip


@gluon.jit
def _consume_tile(q_tile, q_ready, q_phase, q_free, k_desc, v_desc, k_bufs, v_bufs, bars, Out, LSE,
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
    _turn_wait(bars, t + tb, STAGES, CID, CONSUMERS)
    qk = warpgroup_mma(q_tile, k_tile, gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
    _turn_pass(bars, STAGES, CID, CONSUMERS)
    qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
    _k_done(k_desc, k_bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES, WARP_SPECIALIZE)
    p, _, m_i, l_i = _softmax_step(qk, m_i, l_i, offs_m, lo, seqlen_q, seqlen_k, window_left, window_right, qk_scale,
                                   softcap_log2,
                                   s_layout, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP)  # fmt: skip
    p_op = gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    if not OVERLAP:
        mbarrier.wait(bars.index(STAGES + s0), (t // STAGES) & 1)
        if IS_VARLEN:
            _zero_v_tail(v_bufs.index(s0).reshape([BLOCK_N, HEAD_DIM]), seqlen_k - lo, BLOCK_N, HEAD_DIM)
        acc = warpgroup_mma(p_op, v_bufs.index(s0).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _v_done(v_desc, v_bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES, WARP_SPECIALIZE)
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
        acc, m_i, l_i, p_op, t = _attend(
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
            _zero_v_tail(v_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]), seqlen_k - (lo + (n_blocks - 1) * BLOCK_N),
                         BLOCK_N, HEAD_DIM)  # fmt: skip
        _turn_wait(bars, t + 1 + tb, STAGES, CID, CONSUMERS)
        acc = warpgroup_mma(p_op, v_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        _turn_pass(bars, STAGES, CID, CONSUMERS)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _v_done(v_desc, v_bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES, WARP_SPECIALIZE)
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


@gluon.jit
def _load_q(q_desc, q_smem, bar, first, start_m, off_b, off_h, seqlen_q, BLOCK_M: gl.constexpr,
            CONSUMERS: gl.constexpr):  # fmt: skip
    """TMA the block's Q, one box per consumer, into q_smem[first + c]; bar completes when all have landed."""
    mbarrier.expect(bar, CONSUMERS * q_desc.block_type.nbytes)
    for c in gl.static_range(CONSUMERS):
        row = start_m + c * (BLOCK_M // CONSUMERS)
        if c > 0:
            # a consumer whose rows all lie past seqlen_q reads the last row's box instead of one wholly out
            # of bounds (its results are not stored); the expected byte count stays the full box
            row = gl.minimum(row, seqlen_q - 1)
        # off_b: the batch entry, or with varlen's 3-D descriptor the sequence's first row (box_coords)
        tma.async_copy_global_to_shared(q_desc, box_coords(q_desc, off_b, row, off_h), bar, q_smem.index(first + c))


@gluon.jit
def _load_work_tile(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, q_bars, TileSlots, tile, i, t, seqlen_q,
                    seqlen_k, group_size, window_left, window_right, nheads, batch, heads_per_section,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_LEFT: gl.constexpr,
                    HAS_RIGHT: gl.constexpr, SNAKE: gl.constexpr, CONSUMERS: gl.constexpr,
                    DYNAMIC: gl.constexpr):  # fmt: skip
    """The loader's work for the program's i-th tile, linear work tile `tile`: its Q into Q buffer i % 2 (once
    the consumers have released that buffer, two tiles back), then its K/V blocks into the ring from position
    t. DYNAMIC: first publishes `tile` in the buffer's slot, TileSlots[i % 2], which the consumers read once
    the buffer's Q-ready barrier completes (the expect's arrive releases the store, their wait acquires it).
    Returns the ring position after the tile."""
    start_m, off_h, off_b, off_hk, lo, _, _, hi, n_blocks = tile_work(
        tile, seqlen_q, seqlen_k, group_size, window_left, window_right, nheads, batch, heads_per_section,
        BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, SNAKE,
    )  # fmt: skip
    qb = i % 2
    mbarrier.wait(q_bars.index(2 + qb), ((i // 2) & 1) ^ 1)  # free: the first lap passes (fresh barrier)
    if DYNAMIC:
        gl.store(TileSlots + qb, tile)
        gl.thread_barrier()  # every lane's store before the arrive, whichever lane issues it
    _load_q(q_desc, q_smem, q_bars.index(qb), qb * CONSUMERS, start_m, off_b, off_h, seqlen_q, BLOCK_M, CONSUMERS)
    load_kv(k_desc, v_desc, k_bufs, v_bufs, bars, t, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES)
    return t + n_blocks


@gluon.jit
def _persistent_loader(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, q_bars, TileCounter, seqlen_q, seqlen_k,
                       group_size, window_left, window_right, nheads, batch, heads_per_section,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                       HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, SNAKE: gl.constexpr,
                       CONSUMERS: gl.constexpr, DYNAMIC: gl.constexpr):  # fmt: skip
    """The load partition of the persistent grid: _load_work_tile over the program's tiles, the ring position
    counting on across tiles. The next tile's Q and first K/V blocks go out while the consumers still work on
    the current tile: no drain between tiles. Static order: tiles pid, pid + P, ... (P programs). DYNAMIC: the
    first tile is pid, every later one the next free tile of the launch's counter (TileCounter[0], zeroed by
    the launcher), so a program that drew light tiles takes more of them (the causal heaviest-first order then
    balances like the hardware's own block scheduling); a last slot holding the tile count tells the consumers
    to stop."""
    n_programs = gl.num_programs(0)
    if DYNAMIC:
        n_tiles = gl.cdiv(seqlen_q, BLOCK_M) * nheads * batch
        slots = TileCounter + 1 + 2 * gl.program_id(0)
        tile = gl.program_id(0)
        t = 0
        i = 0
        while tile < n_tiles:
            nxt = n_programs + gl.atomic_add(TileCounter, 1)  # issued early: its latency hides behind the loads
            t = _load_work_tile(
                q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, q_bars, slots, tile, i, t, seqlen_q, seqlen_k,
                group_size, window_left, window_right, nheads, batch, heads_per_section,
                BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, SNAKE, CONSUMERS, DYNAMIC,
            )  # fmt: skip
            i += 1
            tile = nxt
        qb = i % 2
        mbarrier.wait(q_bars.index(2 + qb), ((i // 2) & 1) ^ 1)
        gl.store(slots + qb, n_tiles)
        gl.thread_barrier()
        mbarrier.arrive(q_bars.index(qb), count=1)  # no Q this time: the arrive alone completes the phase
    else:
        first, stride, n_work = persistent_tiles(seqlen_q, nheads, batch, BLOCK_M)
        t = 0
        for i in range(n_work):
            t = _load_work_tile(
                q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, q_bars, TileCounter, first + i * stride, i, t,
                seqlen_q, seqlen_k, group_size, window_left, window_right, nheads, batch, heads_per_section,
                BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, SNAKE, CONSUMERS, DYNAMIC,
            )  # fmt: skip


@gluon.jit
def _consume_work_tile(q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, q_bars, Out, LSE, stride_ob, stride_om, stride_oh,
                       stride_lb, stride_lh, tile, i, t, seqlen_q, seqlen_k, group_size, window_left, window_right,
                       qk_scale, softcap_log2, nheads, batch, heads_per_section,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                       HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, SNAKE: gl.constexpr,
                       HAS_SOFTCAP: gl.constexpr, OVERLAP: gl.constexpr, CID: gl.constexpr,
                       CONSUMERS: gl.constexpr):  # fmt: skip
    """A consumer's work for the program's i-th tile, linear work tile `tile`, its Q in Q buffer i % 2 and its
    first K/V block at ring position t: _consume_tile. Returns the ring position after the tile."""
    start_m, off_h, off_b, off_hk, lo, full_lo, full_hi, hi, n_blocks = tile_work(
        tile, seqlen_q, seqlen_k, group_size, window_left, window_right, nheads, batch, heads_per_section,
        BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, SNAKE,
    )  # fmt: skip
    qb = i % 2
    q_tile = q_smem.index(qb * CONSUMERS + CID).reshape([BLOCK_M // CONSUMERS, HEAD_DIM])
    return _consume_tile(
        q_tile, q_bars.index(qb), (i // 2) & 1, q_bars.index(2 + qb), k_desc, v_desc, k_bufs, v_bufs, bars,
        Out, LSE, stride_ob, stride_om, stride_oh, stride_lb, stride_lh, off_b, off_h, off_hk, start_m,
        seqlen_q, seqlen_k, window_left, window_right, qk_scale, softcap_log2, lo, full_lo, full_hi, hi,
        n_blocks, t, i,
        BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, True, OVERLAP, CID, CONSUMERS, True,
        False,
    )  # fmt: skip


@gluon.jit
def _persistent_consumer(q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, q_bars, TileCounter, Out, LSE, stride_ob,
                         stride_om, stride_oh, stride_lb, stride_lh, seqlen_q, seqlen_k, group_size, window_left,
                         window_right, qk_scale, softcap_log2, nheads, batch, heads_per_section,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                         HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, SNAKE: gl.constexpr,
                         HAS_SOFTCAP: gl.constexpr, OVERLAP: gl.constexpr, CID: gl.constexpr,
                         CONSUMERS: gl.constexpr, DYNAMIC: gl.constexpr):  # fmt: skip
    """A math partition of the persistent grid: _consume_work_tile over this program's work tiles, in the
    loader's order, with the K/V ring position t and the tile count i (ping-pong turns: each tile takes
    n_blocks + 1 of them) carried from one tile to the next. DYNAMIC: each tile is read from its Q buffer's
    slot once that buffer's Q has landed; the tile count there means no more tiles."""
    if DYNAMIC:
        n_tiles = gl.cdiv(seqlen_q, BLOCK_M) * nheads * batch
        slots = TileCounter + 1 + 2 * gl.program_id(0)
        t = 0
        i = 0
        mbarrier.wait(q_bars.index(0), 0)
        tile = gl.load(slots, volatile=True)  # volatile: past L1, which an earlier lap's value could still be in
        while tile < n_tiles:
            t = _consume_work_tile(
                q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, q_bars, Out, LSE, stride_ob, stride_om, stride_oh,
                stride_lb, stride_lh, tile, i, t, seqlen_q, seqlen_k, group_size, window_left, window_right,
                qk_scale, softcap_log2, nheads, batch, heads_per_section,
                BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, SNAKE, HAS_SOFTCAP, OVERLAP, CID, CONSUMERS,
            )  # fmt: skip
            i += 1
            mbarrier.wait(q_bars.index(i % 2), (i // 2) & 1)
            tile = gl.load(slots + i % 2, volatile=True)
    else:
        first, stride, n_work = persistent_tiles(seqlen_q, nheads, batch, BLOCK_M)
        t = 0
        for i in range(n_work):
            t = _consume_work_tile(
                q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, q_bars, Out, LSE, stride_ob, stride_om, stride_oh,
                stride_lb, stride_lh, first + i * stride, i, t, seqlen_q, seqlen_k, group_size, window_left,
                window_right, qk_scale, softcap_log2, nheads, batch, heads_per_section,
                BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, SNAKE, HAS_SOFTCAP, OVERLAP, CID, CONSUMERS,
            )  # fmt: skip


@gluon.jit
def _persistent_grid(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, TileCounter, Out, LSE, stride_ob, stride_om,
                     stride_oh, stride_lb, stride_lh, seqlen_q, seqlen_k, group_size, window_left, window_right,
                     qk_scale, softcap_log2, nheads, batch, heads_per_section,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                     HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, SNAKE: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                     WARP_SPECIALIZE: gl.constexpr, OVERLAP: gl.constexpr, CONSUMERS: gl.constexpr,
                     DYNAMIC: gl.constexpr):  # fmt: skip
    """The PERSISTENT kernel body: the Q buffers' barriers, then the loader and the consumers over this
    program's work tiles."""
    gl.static_assert(WARP_SPECIALIZE and CONSUMERS <= 2, "persistent: the loader partition, 1 or 2 consumers")
    # ping-pong turns count n_blocks + 1 per tile, which only the overlapped step takes (_consume_tile)
    gl.static_assert(CONSUMERS == 1 or OVERLAP, "persistent ping-pong needs the overlap")
    gl.static_assert(not (DYNAMIC and SNAKE), "snake order is a static schedule")
    # Q buffer b: ready (b), free (2 + b), completing when every consumer has released it; the Q ready
    # barrier of `bars` is not used
    q_bars = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(q_bars.index(2 + i), count=CONSUMERS)
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_persistent_consumer, (
                q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, q_bars, TileCounter, Out, LSE, stride_ob, stride_om,
                stride_oh, stride_lb, stride_lh, seqlen_q, seqlen_k, group_size, window_left, window_right,
                qk_scale, softcap_log2, nheads, batch, heads_per_section,
                BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, SNAKE, HAS_SOFTCAP, OVERLAP, 0, CONSUMERS,
                DYNAMIC,
            )),
            (_persistent_consumer, (
                q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, q_bars, TileCounter, Out, LSE, stride_ob, stride_om,
                stride_oh, stride_lb, stride_lh, seqlen_q, seqlen_k, group_size, window_left, window_right,
                qk_scale, softcap_log2, nheads, batch, heads_per_section,
                BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, SNAKE, HAS_SOFTCAP, OVERLAP, 1, CONSUMERS,
                DYNAMIC,
            )),
            (_persistent_loader, (
                q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, q_bars, TileCounter, seqlen_q, seqlen_k,
                group_size, window_left, window_right, nheads, batch, heads_per_section,
                BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, SNAKE, CONSUMERS, DYNAMIC,
            )),
        ], [4, 1], [240, 24])  # fmt: skip
    else:
        gl.warp_specialize([
            (_persistent_consumer, (
                q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, q_bars, TileCounter, Out, LSE, stride_ob, stride_om,
                stride_oh, stride_lb, stride_lh, seqlen_q, seqlen_k, group_size, window_left, window_right,
                qk_scale, softcap_log2, nheads, batch, heads_per_section,
                BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, SNAKE, HAS_SOFTCAP, OVERLAP, 0, 1, DYNAMIC,
            )),
            (_persistent_loader, (
                q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, q_bars, TileCounter, seqlen_q, seqlen_k,
                group_size, window_left, window_right, nheads, batch, heads_per_section,
                BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, SNAKE, 1, DYNAMIC,
            )),
        ], [1], [24])  # fmt: skip


@gluon.jit
def _one_tile_grid(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, Out, LSE, stride_ob, stride_om, stride_oh,
                   stride_lb, stride_lh, seqlen_q, seqlen_k, group_size, window_left, window_right, qk_scale,
                   softcap_log2, q_start, k_start,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                   HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                   WARP_SPECIALIZE: gl.constexpr, OVERLAP: gl.constexpr, CONSUMERS: gl.constexpr,
                   IS_VARLEN: gl.constexpr):  # fmt: skip
    """The kernel body of the (query blocks, nheads, batch) grid: this program's query block, its KV range,
    its Q, then the consumers (with WARP_SPECIALIZE, and the KV loader partition) over the blocks; q_start and
    k_start: the sequence's first rows with IS_VARLEN (else unused)."""
    pid_m = gl.program_id(0)
    off_h = gl.program_id(1)
    off_b = gl.program_id(2)
    if HAS_RIGHT:
        # with a right bound the last query blocks see the most keys: launch them first
        pid_m = gl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    off_hk = off_h // group_size
    # the boxes' batch coordinates (box_coords): the batch entry, or with varlen the sequence's first row
    q_b = off_b
    kv_b = off_b
    if IS_VARLEN:
        q_b = q_start
        kv_b = k_start
        # Out and LSE at the sequence's first row; their batch strides are 0
        Out += q_start.to(gl.int64) * stride_om
        LSE += q_start.to(gl.int64)
    lo, full_lo, full_hi, hi = kv_range(
        start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    # at least one block, also for rows that see no key: block lo is in range (lo < seqlen_k) and fully
    # masked, so they come out as out 0 / lse -inf without a separate path
    n_blocks = gl.maximum(gl.cdiv(hi - lo, BLOCK_N), 1)

    _load_q(q_desc, q_smem, bars.index(4 * STAGES), 0, start_m, q_b, off_h, seqlen_q, BLOCK_M, CONSUMERS)

    # argument tuples inline: a tuple assigned to a name turns its constexprs into tensors
    if CONSUMERS == 2:
        # consumer 0 is the default partition (4 warps), consumer 1 a 4-warp worker
        gl.warp_specialize([
            (_consumer, (
                q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, Out, LSE, stride_ob, stride_om, stride_oh,
                stride_lb, stride_lh, kv_b, off_h, off_hk, start_m, seqlen_q, seqlen_k, window_left, window_right,
                qk_scale, softcap_log2, lo, full_lo, full_hi, hi, n_blocks,
                BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, WARP_SPECIALIZE, OVERLAP,
                0, CONSUMERS, IS_VARLEN,
            )),
            (_consumer, (
                q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, Out, LSE, stride_ob, stride_om, stride_oh,
                stride_lb, stride_lh, kv_b, off_h, off_hk, start_m, seqlen_q, seqlen_k, window_left, window_right,
                qk_scale, softcap_log2, lo, full_lo, full_hi, hi, n_blocks,
                BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, WARP_SPECIALIZE, OVERLAP,
                1, CONSUMERS, IS_VARLEN,
            )),
            (kv_loader, (k_desc, v_desc, k_bufs, v_bufs, bars, n_blocks, lo, kv_b, off_hk, BLOCK_N, STAGES)),
        ], [4, 1], [240, 24])  # fmt: skip
    elif WARP_SPECIALIZE:
        gl.warp_specialize([
            (_consumer, (
                q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, Out, LSE, stride_ob, stride_om, stride_oh,
                stride_lb, stride_lh, kv_b, off_h, off_hk, start_m, seqlen_q, seqlen_k, window_left, window_right,
                qk_scale, softcap_log2, lo, full_lo, full_hi, hi, n_blocks,
                BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, WARP_SPECIALIZE, OVERLAP,
                0, 1, IS_VARLEN,
            )),
            (kv_loader, (k_desc, v_desc, k_bufs, v_bufs, bars, n_blocks, lo, kv_b, off_hk, BLOCK_N, STAGES)),
        ], [1], [24])  # fmt: skip
    else:
        _consumer(
            q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, Out, LSE, stride_ob, stride_om, stride_oh,
            stride_lb, stride_lh, kv_b, off_h, off_hk, start_m, seqlen_q, seqlen_k, window_left, window_right,
            qk_scale, softcap_log2, lo, full_lo, full_hi, hi, n_blocks,
            BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, WARP_SPECIALIZE, OVERLAP, 0, 1,
            IS_VARLEN,
        )  # fmt: skip


# seqlens and the LSE strides that follow them are runtime values: no recompile per sequence length; nor
# per GQA group size (1 would be a specialization of its own, for one integer division per program)
# nheads, batch and heads_per_section (read by the persistent grid only) likewise
@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "group_size", "window_left", "window_right", "nheads",
                              "batch", "heads_per_section", "stride_lb", "stride_lh"])  # fmt: skip
def attention_fwd_hopper_kernel(
    q_desc, k_desc, v_desc, Out, LSE, CuSeqlensQ, CuSeqlensK, SequsedK, TileCounter,
    stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, group_size, window_left, window_right, qk_scale, softcap_log2, nheads, batch, heads_per_section,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, WARP_SPECIALIZE: gl.constexpr, OVERLAP: gl.constexpr,
    CONSUMERS: gl.constexpr = 1, PERSISTENT: gl.constexpr = False, HAS_SOFTCAP: gl.constexpr = False,
    IS_VARLEN: gl.constexpr = False, HAS_SEQUSED_K: gl.constexpr = False, SNAKE: gl.constexpr = False,
    DYNAMIC: gl.constexpr = False,
):  # fmt: skip
    """q_desc, k_desc, v_desc: TMA descriptors over (batch, seqlen, nheads, headdim), boxes
    [1, BLOCK_M / CONSUMERS or BLOCK_N, 1, HEAD_DIM]. Out: like q (last stride 1); LSE: (batch, nheads,
    seqlen_q), rows contiguous. qk_scale = softmax_scale * log2(e), or with HAS_SOFTCAP softmax_scale /
    softcap, and softcap_log2 = softcap * log2(e) (None without: no kernel parameter). group_size = nheads //
    nheads_k. seqlen_k > 0. CONSUMERS 1: one math partition of num_warps warps; 2 or 3: ping-pong, one
    warpgroup each (launch with num_warps = 4). PERSISTENT (warp-specialized, 1 or 2 consumers, not varlen):
    a 1-D grid of at most cdiv(seqlen_q, BLOCK_M) * nheads * batch programs, each looping over its work tiles
    (tile_coords; with SNAKE, every other round of the grid in reverse: snake_order; with DYNAMIC, each
    program's next tile from the int32 counter TileCounter[0], zeroed, followed by two tile slots per program,
    TileCounter[1 + 2 * pid + b]: _persistent_loader); otherwise the grid is (query blocks, nheads, batch) and
    those three arguments are not read. TileCounter is None unless DYNAMIC.

    IS_VARLEN: the descriptors are 3-D over the packed (total, nheads, headdim) with boxes [BLOCK, 1,
    HEAD_DIM]; CuSeqlensQ / CuSeqlensK (batch + 1, int32) and, with HAS_SEQUSED_K, SequsedK (batch, int32)
    give each sequence; seqlen_q / seqlen_k are total_q / total_k (sequence_bounds clamps into them); the
    grid's first axis covers max_seqlen_q, and a program past its sequence's end returns at once. Out is
    (total_q, nheads, headdim) with stride_ob 0, LSE (nheads, total_q) with stride_lb 0. Rows past the
    sequence's end read the next sequence's queries and are not stored; keys past it (or past seqused_k) are
    masked (the last, partial key block is in kv_range's masked right edge) and their V rows zeroed in the slot
    (_zero_v_tail). Otherwise the Cu*/Seqused pointers are None."""
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[-1]
    gl.static_assert(q_desc.block_type.shape[-3] * CONSUMERS == BLOCK_M)
    gl.static_assert(k_desc.block_type.shape[-3] == BLOCK_N)
    gl.static_assert(CONSUMERS == 1 or gl.num_warps() == 4, "ping-pong: one warpgroup per consumer")
    # three 64-row consumers (FA3's d64 tile) spilled at their 160 registers and were dropped (perf-notes)
    gl.static_assert(CONSUMERS <= 2, "one or two consumers")
    gl.static_assert(len(q_desc.block_type.shape) == (3 if IS_VARLEN else 4), "varlen: 3-D descriptors")
    # V rows past seqused_k are zeroed under IS_VARLEN only (_zero_v_tail)
    gl.static_assert(IS_VARLEN or not HAS_SEQUSED_K, "seqused_k needs varlen")
    gl.static_assert(PERSISTENT or not SNAKE, "snake order is a persistent-grid schedule")
    q_start = 0  # the sequence's first rows (varlen), passed to _one_tile_grid
    k_start = 0
    if IS_VARLEN:
        gl.static_assert(not PERSISTENT, "varlen runs on the one-tile grid only")
        q_start, seqlen_q, k_start, seqlen_k = sequence_bounds(
            gl.program_id(2), seqlen_q, seqlen_k, CuSeqlensQ, CuSeqlensK, SequsedK, IS_VARLEN, HAS_SEQUSED_K
        )
        pid_m0 = gl.program_id(0)
        if HAS_RIGHT:
            pid_m0 = gl.num_programs(0) - 1 - pid_m0
        if pid_m0 * BLOCK_M >= seqlen_q:
            return  # the grid covers max_seqlen_q; this sequence has no rows here
    # one Q tile per consumer; the persistent grid double-buffers them (the next tile's Q lands early)
    Q_BUFS: gl.constexpr = 2 if PERSISTENT else 1
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [Q_BUFS * CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    N_BARS: gl.constexpr = 4 * STAGES + 1 + (CONSUMERS if CONSUMERS > 1 else 0)
    bars = gl.allocate_shared_memory(gl.int64, [N_BARS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2 * STAGES):  # ready
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(2 * STAGES, 4 * STAGES):  # free: complete when every consumer has arrived
        mbarrier.init(bars.index(i), count=CONSUMERS)
    for i in gl.static_range(4 * STAGES, N_BARS):  # Q ready, turns
        mbarrier.init(bars.index(i), count=1)

    if PERSISTENT:
        _persistent_grid(
            q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, TileCounter, Out, LSE, stride_ob, stride_om,
            stride_oh, stride_lb, stride_lh, seqlen_q, seqlen_k, group_size, window_left, window_right, qk_scale,
            softcap_log2, nheads, batch, heads_per_section, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT,
            SNAKE, HAS_SOFTCAP, WARP_SPECIALIZE, OVERLAP, CONSUMERS, DYNAMIC,
        )  # fmt: skip
    else:
        _one_tile_grid(
            q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, Out, LSE, stride_ob, stride_om, stride_oh, stride_lb,
            stride_lh, seqlen_q, seqlen_k, group_size, window_left, window_right, qk_scale, softcap_log2, q_start,
            k_start, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, WARP_SPECIALIZE, OVERLAP,
            CONSUMERS, IS_VARLEN,
        )  # fmt: skip
