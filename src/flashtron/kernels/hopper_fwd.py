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
the P V wgmma of the tile's last block (hopper_fwd_tile.zero_v_tail: 0 x NaN would reach out), and query rows
there are not stored. HAS_SOFTCAP: scores capped by tanh before the mask, as the Triton forward
(hopper_fwd_tile.softmax_step and .tanh). The work tile's math is in kernels/hopper_fwd_tile.py.

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
    mbarrier,
    tma,
)

from flashtron.kernels.hopper_common import (
    K_BLOCK,
    V_BLOCK,
    box_coords,
    kv_loader,
    kv_range,
    load_block,
    load_kv,
    persistent_tiles,
    program_query_block,
    sequence_bounds,
    tile_work,
)
from flashtron.kernels.hopper_fwd_tile import consume_tile


@gluon.jit
def _consumer(q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, Out, LSE, stride_ob, stride_om, stride_oh,
              stride_lb, stride_lh, off_b, off_h, off_hk, start_m, seqlen_q, seqlen_k, window_left, window_right,
              qk_scale, softcap_log2, lo, full_lo, full_hi, hi, n_blocks,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, WARP_SPECIALIZE: gl.constexpr,
              OVERLAP: gl.constexpr, CID: gl.constexpr, CONSUMERS: gl.constexpr,
              IS_VARLEN: gl.constexpr):  # fmt: skip
    """A math partition of the one-tile-per-program kernel: rows [CID * ROWS, (CID + 1) * ROWS) of the
    block (ROWS = BLOCK_M / CONSUMERS), see consume_tile. Without the loader partition it also issues
    the first STAGES K/V loads."""
    gl.static_assert(CONSUMERS == 1 or (WARP_SPECIALIZE and OVERLAP), "ping-pong needs the loader and overlap")
    if not WARP_SPECIALIZE:
        for i in gl.static_range(STAGES):
            load_block(k_desc, k_bufs, bars, i, lo + i * BLOCK_N, off_b, off_hk, STAGES, K_BLOCK, pred=i < n_blocks)
            load_block(v_desc, v_bufs, bars, i, lo + i * BLOCK_N, off_b, off_hk, STAGES, V_BLOCK, pred=i < n_blocks)
    q_tile = q_smem.index(CID).reshape([BLOCK_M // CONSUMERS, HEAD_DIM])
    t = 0  # assigned, so a value (a constexpr argument could not be carried through hopper_fwd_tile.attend's loop)
    tb = 0
    consume_tile(
        q_tile, bars.index(4 * STAGES), 0, bars.index(4 * STAGES), k_desc, v_desc, k_bufs, v_bufs, bars, Out, LSE,
        stride_ob, stride_om, stride_oh, stride_lb, stride_lh, off_b, off_h, off_hk, start_m, seqlen_q, seqlen_k,
        window_left, window_right, qk_scale, softcap_log2, lo, full_lo, full_hi, hi, n_blocks, t, tb,
        BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, WARP_SPECIALIZE, OVERLAP, CID,
        CONSUMERS, False, IS_VARLEN,
    )  # fmt: skip


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
            t = _load_work_tile(
                q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, q_bars, slots, tile, i, t, seqlen_q, seqlen_k,
                group_size, window_left, window_right, nheads, batch, heads_per_section,
                BLOCK_M, BLOCK_N, STAGES, HAS_LEFT, HAS_RIGHT, SNAKE, CONSUMERS, DYNAMIC,
            )  # fmt: skip
            i += 1
            # claimed once the tile's last K/V load is out, when the consumers are about STAGES blocks from its
            # end (claimed before its loads, a program would hold two tiles ahead: 1.097 max/mean against 1.049
            # at d128 causal 16k in persistent_balance's model); relaxed: the slot's barrier publishes the tile
            tile = n_programs + gl.atomic_add(TileCounter, 1, sem="relaxed")
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
    first K/V block at ring position t: consume_tile. Returns the ring position after the tile."""
    start_m, off_h, off_b, off_hk, lo, full_lo, full_hi, hi, n_blocks = tile_work(
        tile, seqlen_q, seqlen_k, group_size, window_left, window_right, nheads, batch, heads_per_section,
        BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, SNAKE,
    )  # fmt: skip
    qb = i % 2
    q_tile = q_smem.index(qb * CONSUMERS + CID).reshape([BLOCK_M // CONSUMERS, HEAD_DIM])
    return consume_tile(
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
    # ping-pong turns count n_blocks + 1 per tile, which only the overlapped step takes (consume_tile)
    gl.static_assert(CONSUMERS == 1 or OVERLAP, "persistent ping-pong needs the overlap")
    gl.static_assert(not (DYNAMIC and SNAKE), "snake order is a static schedule")
    # Q buffer b: ready (b), free (2 + b), completing when every consumer has released it; the Q ready
    # barrier of `bars` is not used
    q_bars = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(q_bars.index(2 + i), count=CONSUMERS)
    # argument tuples inline, as in _one_tile_grid: a tuple assigned to a name (to share it) turns its constexprs
    # into tensors
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
    start_m, off_h, off_b, off_hk = program_query_block(group_size, BLOCK_M, HAS_RIGHT)
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
    (hopper_fwd_tile.zero_v_tail). Otherwise the Cu*/Seqused pointers are None."""
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[-1]
    gl.static_assert(q_desc.block_type.shape[-3] * CONSUMERS == BLOCK_M)
    gl.static_assert(k_desc.block_type.shape[-3] == BLOCK_N)
    gl.static_assert(CONSUMERS == 1 or gl.num_warps() == 4, "ping-pong: one warpgroup per consumer")
    # three 64-row consumers (FA3's d64 tile) spilled at their 160 registers and were dropped (perf-notes)
    gl.static_assert(CONSUMERS <= 2, "one or two consumers")
    gl.static_assert(len(q_desc.block_type.shape) == (3 if IS_VARLEN else 4), "varlen: 3-D descriptors")
    # V rows past seqused_k are zeroed under IS_VARLEN only (hopper_fwd_tile.zero_v_tail)
    gl.static_assert(IS_VARLEN or not HAS_SEQUSED_K, "seqused_k needs varlen")
    gl.static_assert(PERSISTENT or not SNAKE, "snake order is a persistent-grid schedule")
    q_start = 0  # the sequence's first rows (varlen), passed to _one_tile_grid
    k_start = 0
    if IS_VARLEN:
        gl.static_assert(not PERSISTENT, "varlen runs on the one-tile grid only")
        q_start, seqlen_q, k_start, seqlen_k = sequence_bounds(
            gl.program_id(2), seqlen_q, seqlen_k, CuSeqlensQ, CuSeqlensK, SequsedK, IS_VARLEN, HAS_SEQUSED_K
        )
        if program_query_block(group_size, BLOCK_M, HAS_RIGHT)[0] >= seqlen_q:
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
