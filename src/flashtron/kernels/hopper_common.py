"""Gluon pieces the Hopper kernels share (kernels/hopper_fwd.py, kernels/hopper_bwd.py): the KV range of a
query block, the TMA K/V ring's loads and its loader partition, and the persistent forward's static tile
schedule. Names are public because two kernel files use them; the kernels' own steps stay in their files.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma


@gluon.jit
def kv_range(start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):  # fmt: skip
    """KV range [lo, hi) that rows [start_m, start_m + BLOCK_M) visit and its unmasked middle
    [full_lo, full_hi), as kernels/common.py's kv_block_bounds (bottom-right aligned window)."""
    shift = seqlen_k - seqlen_q
    lo = 0
    full_lo = 0
    hi = seqlen_k
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        lo = (gl.maximum(start_m + shift - window_left, 0) // BLOCK_N) * BLOCK_N
        first_all = gl.maximum(start_m + BLOCK_M - 1 + shift - window_left, 0)
        full_lo = ((first_all + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = gl.minimum(hi, gl.maximum(start_m + BLOCK_M + shift + window_right, 0))
        full_hi = gl.minimum(full_hi, (gl.maximum(start_m + shift + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    hi = gl.maximum(hi, lo)
    full_lo = gl.minimum(gl.maximum(full_lo, lo), hi)
    full_hi = gl.minimum(gl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@gluon.jit
def box_coords(desc, off_b, row, off_h):
    """The TMA coordinates of the box at `row` of head off_h: [off_b, row, off_h, 0] for a 4-D descriptor
    (batch, seqlen, nheads, d); [off_b + row, off_h, 0] for a 3-D one over varlen's packed (total, nheads, d),
    where off_b is the sequence's first row. TMA zero-fills only past the whole tensor, so in the 3-D case
    rows past the sequence's end read the next sequence (or the padding): the caller masks those keys, zeroes
    those V rows in the slot (hopper_fwd_tile.zero_v_tail) and stores no such query rows."""
    if len(desc.block_type.shape) == 3:
        return [off_b + row, off_h, 0]
    else:
        return [off_b, row, off_h, 0]


# Barriers live in one [4 * STAGES + 1 + CONSUMERS, 1] array: per slot s, K ready (s), V ready (STAGES + s),
# K free (2 STAGES + s), V free (3 STAGES + s); then Q ready (4 STAGES); then, with ping-pong, consumer c's
# turn (4 STAGES + 1 + c). Ready barriers complete when TMA has written the bytes; free barriers when every
# consumer is done reading the slot (warp-specialized only: count CONSUMERS, one arrive per consumer).
# Which half of the K/V ring a helper acts on: its ready barriers start at KV * STAGES, its free ones at
# (2 + KV) * STAGES (the layout above)
K_BLOCK = gl.constexpr(0)
V_BLOCK = gl.constexpr(1)


@gluon.jit
def load_block(desc, bufs, bars, t, row, off_b, off_hk, STAGES: gl.constexpr, KV: gl.constexpr, pred=True):
    """Start the TMA load of the K (KV = K_BLOCK) or V (V_BLOCK) block at key row `row` into ring position t
    (slot t % STAGES). off_b: the batch entry of a 4-D descriptor over (batch, seqlen, nheads, d), or, for a 3-D
    one over varlen's packed (total, nheads, d), the sequence's first row (cu_seqlens[b]), added to row."""
    s = t % STAGES
    bar = bars.index(KV * STAGES + s)
    mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, box_coords(desc, off_b, row, off_hk), bar, bufs.index(s), pred=pred)


@gluon.jit
def load_kv(k_desc, v_desc, k_bufs, v_bufs, bars, t0, n_blocks, lo, off_b, off_hk,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """Load one work tile's n_blocks K and V blocks from key row lo into ring positions t0, t0 + 1, ...,
    each as soon as the consumers release its slot. t0 counts the blocks of the program's earlier tiles
    (persistent kernel), so the phases carry on from one tile to the next."""
    for j in range(n_blocks):
        t = t0 + j
        s = t % STAGES
        # a fresh mbarrier counts as having completed the phase before 0, so the first lap passes
        phase = ((t // STAGES) & 1) ^ 1
        mbarrier.wait(bars.index(2 * STAGES + s), phase)
        load_block(k_desc, k_bufs, bars, t, lo + j * BLOCK_N, off_b, off_hk, STAGES, K_BLOCK)
        mbarrier.wait(bars.index(3 * STAGES + s), phase)
        load_block(v_desc, v_bufs, bars, t, lo + j * BLOCK_N, off_b, off_hk, STAGES, V_BLOCK)


@gluon.jit
def kv_loader(k_desc, v_desc, k_bufs, v_bufs, bars, n_blocks, lo, off_b, off_hk,
            BLOCK_N: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """The load partition: refill each K and V slot as soon as the consumers release it."""
    load_kv(k_desc, v_desc, k_bufs, v_bufs, bars, 0, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES)


# The persistent grid (PERSISTENT): num_programs = min(work tiles, SMs) programs, program p doing linear work
# tiles p, p + num_programs, p + 2 num_programs, ... (a static schedule: no atomics, no tile counter). A work
# tile is (query block, head, batch entry). The linear order: (batch, head) pairs, heads of one batch entry
# adjacent (a GQA group's heads share their K/V), cut into L2 sections of heads_per_section pairs (the
# launcher sizes a section so that its K and V fit in part of the L2); within a section the query block is
# the outer index and the pair the inner one. So the programs running at one time read the K/V of a few
# heads, as the 3-D grid's launch order gives the one-tile kernel. With a right bound (causal) the last
# query blocks see the most keys: REVERSE hands them out first (longest processing time first), so within
# a section the work per tile never grows along the linear order, each program's tiles of a section come
# heaviest first, and the short tiles fill the tail; with a left bound only, or none, the first blocks
# see the most (or all the same), and the order stays ascending.
@gluon.jit
def program_query_block(group_size, BLOCK_M: gl.constexpr, HAS_RIGHT: gl.constexpr):
    """(start_m, off_h, off_b, off_hk) of this program of a (query blocks, nheads, batch) grid; with a right
    bound the last query blocks see the most keys, so the grid's first programs take them."""
    pid_m = gl.program_id(0)
    if HAS_RIGHT:
        pid_m = gl.num_programs(0) - 1 - pid_m
    off_h = gl.program_id(1)
    return pid_m * BLOCK_M, off_h, gl.program_id(2), off_h // group_size


@gluon.jit
def tile_coords(tile, n_m, n_pairs, nheads, heads_per_section, REVERSE: gl.constexpr):
    """(query block, head, batch entry) of linear work tile `tile` in [0, n_m * n_pairs); n_pairs = batch
    * nheads. Integer arithmetic on non-negative values only, so it means the same in the kernel (i32) as
    called on Python ints: tests/test_hopper_schedule.py calls this very function (its .fn) to check that
    the order visits every tile once and heaviest first."""
    section_tiles = heads_per_section * n_m
    section = tile // section_tiles
    inner = tile % section_tiles
    first_pair = section * heads_per_section
    width = heads_per_section  # the last section may hold fewer pairs
    if n_pairs - first_pair < heads_per_section:
        width = n_pairs - first_pair
    pid_m = inner // width
    if REVERSE:
        pid_m = n_m - 1 - pid_m
    pair = first_pair + inner % width
    return pid_m, pair % nheads, pair // nheads


# A round of the grid is the tiles [r P, r P + P) the P programs take at the same step. In the heaviest-first
# order program p draws the p-th heaviest tile of every round, so the first programs collect the most work:
# with sections of a few heads (d128 causal) the busiest program did 17-21% more than the mean
# (scripts/persistent_balance.py). snake_order reverses every other round (the last, partial one within its
# own length), so that a program heavy in one round is light in the next.
@gluon.jit
def snake_order(tile, n_tiles, n_programs):
    """The linear tile that step `tile // n_programs` of program `tile % n_programs` takes when odd rounds run
    backwards: a permutation of [0, n_tiles) that keeps each round's tiles in their round. Integer arithmetic on
    non-negative values only (tests call .fn on Python ints)."""
    start = (tile // n_programs) * n_programs
    size = n_tiles - start  # the last round may be partial
    if size > n_programs:
        size = n_programs
    pos = tile - start
    if (tile // n_programs) % 2 == 1:
        pos = size - 1 - pos
    return start + pos


@gluon.jit
def tile_work(tile, seqlen_q, seqlen_k, group_size, window_left, window_right, nheads, batch, heads_per_section,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HAS_LEFT: gl.constexpr,
               HAS_RIGHT: gl.constexpr, SNAKE: gl.constexpr):  # fmt: skip
    """Everything a partition needs of linear work tile `tile`: its rows, head, batch entry and KV range."""
    n_m = gl.cdiv(seqlen_q, BLOCK_M)
    if SNAKE:
        tile = snake_order(tile, n_m * nheads * batch, gl.num_programs(0))
    pid_m, off_h, off_b = tile_coords(tile, n_m, batch * nheads, nheads, heads_per_section, HAS_RIGHT)
    start_m = pid_m * BLOCK_M
    lo, full_lo, full_hi, hi = kv_range(
        start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    n_blocks = gl.maximum(gl.cdiv(hi - lo, BLOCK_N), 1)  # at least one, as in the kernel body
    return start_m, off_h, off_b, off_h // group_size, lo, full_lo, full_hi, hi, n_blocks


@gluon.jit
def persistent_tiles(seqlen_q, nheads, batch, BLOCK_M: gl.constexpr):
    """(first tile, stride, tile count) of this program's work tiles in the persistent grid."""
    pid = gl.program_id(0)
    n_programs = gl.num_programs(0)
    n_tiles = gl.cdiv(seqlen_q, BLOCK_M) * nheads * batch
    return pid, n_programs, gl.cdiv(n_tiles - pid, n_programs)  # the grid has at most n_tiles programs


@gluon.jit
def sequence_bounds(off_b, seqlen_q, seqlen_k, CuSeqlensQ, CuSeqlensK, SequsedK, IS_VARLEN: gl.constexpr,
                    HAS_SEQUSED_K: gl.constexpr):  # fmt: skip
    """(q_start, seqlen_q, k_start, seqlen_k) of batch entry off_b, as kernels/common.sequence_bounds and the
    Triton forward use it: dense entries start at 0 with the launch's seqlens; varlen launches pass the row
    counts of q and k (total_q, total_k), and the sequence is read from cu_seqlens clamped into them, so
    whatever the metadata holds every row read lies in the tensors. With seqused_k the returned seqlen_k is
    the used length (clamped into [0, seqlen_k]): keys past it are masked, and the causal/window diagonal
    aligns to it, as in the Triton forward."""
    q_start = 0
    k_start = 0
    if IS_VARLEN:
        q_start = gl.minimum(gl.maximum(gl.load(CuSeqlensQ + off_b), 0), seqlen_q)
        q_end = gl.minimum(gl.maximum(gl.load(CuSeqlensQ + off_b + 1), q_start), seqlen_q)
        k_start = gl.minimum(gl.maximum(gl.load(CuSeqlensK + off_b), 0), seqlen_k)
        k_end = gl.minimum(gl.maximum(gl.load(CuSeqlensK + off_b + 1), k_start), seqlen_k)
        seqlen_q = q_end - q_start
        seqlen_k = k_end - k_start
    if HAS_SEQUSED_K:
        seqlen_k = gl.minimum(gl.maximum(gl.load(SequsedK + off_b), 0), seqlen_k)
    return q_start, seqlen_q, k_start, seqlen_k
