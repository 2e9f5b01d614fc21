"""Split-KV decode over a KV cache, and the cache append (with rotary) that precedes it.

decode_kernel, grid (num_splits * m_blocks, nheads_k, batch): one program owns BLOCK_M packed rows
of one KV head. Row r is query token r // group of query head off_hk * group + r % group, so a GQA
group shares each K/V block it reads and the dots run on tensor cores even for a single token. The
program streams split `pid % num_splits` of the keys its rows can see, one contiguous BLOCK_N-aligned
share, reading K/V through block_table (one page lookup per key, so any page size works) or from a
dense cache row (cache_batch_idx). Key n of batch row b is cache position n + cache_leftpad[b], and
seqlen_k = cache_seqlens[b] + seqlen_new - cache_leftpad[b]: the masks, scores and block ranges of
common.py then apply unchanged, with each row's own token index as its query position.
Each split writes its normalised output and lse in fp32 for combine.py; with WRITE_FINAL (one split)
the program adds the sink and writes the final output and lse itself.

append_kv_kernel, grid (cdiv(seqlen_new, BLOCK_T), nheads_k, batch): writes the new k (rotated) and v
at cache positions cache_seqlens[b] + t.

Bounds (the guard for metadata the host did not check, checks.reads_values): a batch row whose
cache_seqlens is negative or leaves no room for seqlen_new within `capacity`, or whose
cache_batch_idx is not a row of the cache (`cache_rows`), is skipped: nothing is written, its output
is 0 and its lse -inf. A cache_leftpad outside [0, cache_seqlens + seqlen_new] leaves the row with
no keys. A block_table entry outside [0, cache_rows) is never dereferenced: the append does not
write through it and the attention reads the cache's last page in its place, so that row's output is meaningless
but every access stays inside the caches.

Rotary: feature i < rotary_dim pairs with feature i ^ 1 (interleaved, GPT-J) or i +- rotary_dim / 2
(GPT-NeoX) and turns by the angle in column i // 2 or i % (rotary_dim / 2) of cos/sin: the first of
a pair becomes x cos - x_pair sin, the second x cos + x_pair sin. Computed in fp32, rounded once.
"""

import triton
import triton.language as tl

from flashtron.kernels.common import LN2, LOG2E, fold_sink, kv_block_bounds, online_softmax_step


@triton.jit
def rotate(
    x, X_rows, row_mask, pos, Cos, Sin, stride_cos, stride_sin, offs_d, rotary_dim, seqlen_ro, INTERLEAVED: tl.constexpr
):
    """x: [R, BLOCK_D] as loaded from X_rows + offs_d (X_rows: [R, 1] row pointers), rotated at
    positions pos [R]. Returns fp32; features past rotary_dim come back unchanged."""
    half = rotary_dim // 2
    if INTERLEAVED:
        first = (offs_d % 2) == 0
        pair = offs_d ^ 1
        col = offs_d // 2
    else:
        first = offs_d < half
        pair = tl.where(first, offs_d + half, offs_d - half)
        col = tl.where(first, offs_d, offs_d - half)
    mask = row_mask[:, None] & (offs_d < rotary_dim)[None, :]
    x_pair = tl.load(X_rows + pair[None, :], mask=mask, other=0.0).to(tl.float32)  # [R, BLOCK_D]
    cs_mask = mask & (pos < seqlen_ro)[:, None]
    pos = pos.to(tl.int64)[:, None]
    cos = tl.load(Cos + pos * stride_cos + col[None, :], mask=cs_mask, other=1.0).to(tl.float32)
    sin = tl.load(Sin + pos * stride_sin + col[None, :], mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.where(first[None, :], -sin, sin)
    return x.to(tl.float32) * cos + x_pair * sin


@triton.jit
def _cache_slots(BlockTable, pos, valid, page_size, num_pages, PAGED: tl.constexpr):
    """(page, slot, exists) of cache positions pos [N] of one cache row: the page through the row's
    block table (int64) and the slot within it, or (0, pos) in a dense row; `exists` is valid where
    the entry is a page of the cache, [0, num_pages). Any other entry reads as the last page (the
    Bounds guard in the module docstring). K and V share one lookup."""
    if PAGED:
        page = tl.load(BlockTable + pos // page_size, mask=valid, other=0)
        as_unsigned = page.to(tl.uint32, bitcast=True)  # a negative entry becomes one past every page
        exists = valid & (as_unsigned < num_pages.to(tl.uint32))
        # an unsigned min, not where(exists, page, 0): the compiler recomputes this for every row copy of
        # the K and V address tiles, and the compare + select cost the paged sm_90 loop 19% more
        # instructions than no guard, the min 5% (docs/perf-notes.md, 2026-12-02, paged decode)
        page = tl.minimum(as_unsigned, (num_pages - 1).to(tl.uint32)).to(tl.int32, bitcast=True)
        return page.to(tl.int64), (pos % page_size).to(tl.int64), exists
    return pos.to(tl.int64) * 0, pos.to(tl.int64), valid


@triton.jit
def _kv_offsets(page, slot, stride_b, stride_n, PAGED: tl.constexpr):
    """Element offsets of (page, slot) in a cache whose pages (or rows) are stride_b apart."""
    if PAGED:
        return page * stride_b + slot * stride_n
    return slot * stride_n


@triton.jit(do_not_specialize=["seqlen_new", "page_size", "rotary_dim", "seqlen_ro", "capacity", "cache_rows"])
def append_kv_kernel(
    KNew, VNew, KCache, VCache, CacheSeqlens, CacheBatchIdx, BlockTable, Cos, Sin,
    stride_knb, stride_knn, stride_knh,
    stride_vnb, stride_vnn, stride_vnh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_btb, stride_cos, stride_sin,
    seqlen_new, page_size, rotary_dim, seqlen_ro, capacity, cache_rows,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_ROTARY: tl.constexpr,
    ROTARY_INTERLEAVED: tl.constexpr,
):  # fmt: skip
    """KNew, VNew: (batch_size, seqlen_new, nheads_k, headdim[_v]); KCache, VCache: (batch_size_cache,
    seqlen_cache, nheads_k, headdim[_v]) or paged (num_blocks, page_block_size, nheads_k, headdim[_v]).
    capacity: positions per cache row; cache_rows: KCache.shape[0] (the Bounds guard)."""
    pid_t = tl.program_id(0)
    off_hk = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    seqlen_cache = tl.load(CacheSeqlens + off_b)
    row_ok = (seqlen_cache >= 0) & (seqlen_cache <= capacity - seqlen_new)  # Bounds: the new keys fit

    if PAGED:
        KCache += off_hk * stride_kh
        VCache += off_hk * stride_vh
        BlockTable += off_b * stride_btb
    else:
        row = off_b
        if HAS_BATCH_IDX:
            row = tl.load(CacheBatchIdx + off_b).to(tl.int64)
            row_ok = row_ok & (row >= 0) & (row < cache_rows)
            row = tl.where(row_ok, row, 0)
        KCache += row * stride_kb + off_hk * stride_kh
        VCache += row * stride_vb + off_hk * stride_vh
    t_mask = (offs_t < seqlen_new) & row_ok
    pos = tl.where(row_ok, seqlen_cache, 0) + offs_t  # [BLOCK_T] cache positions
    page, slot, exists = _cache_slots(BlockTable, pos, t_mask, page_size, cache_rows, PAGED)
    k_dst = _kv_offsets(page, slot, stride_kb, stride_kn, PAGED)
    v_dst = _kv_offsets(page, slot, stride_vb, stride_vn, PAGED)

    k_rows = KNew + off_b * stride_knb + offs_t.to(tl.int64)[:, None] * stride_knn + off_hk * stride_knh
    k_mask = t_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_rows + offs_d[None, :], mask=k_mask, other=0.0)  # [BLOCK_T, BLOCK_D]
    if HAS_ROTARY:
        k = rotate(k, k_rows, t_mask, pos, Cos, Sin, stride_cos, stride_sin, offs_d, rotary_dim, seqlen_ro,
                   ROTARY_INTERLEAVED)  # fmt: skip
    tl.store(KCache + k_dst[:, None] + offs_d[None, :], k.to(KCache.dtype.element_ty), mask=k_mask & exists[:, None])

    v_rows = VNew + off_b * stride_vnb + offs_t.to(tl.int64)[:, None] * stride_vnn + off_hk * stride_vnh
    v_mask = t_mask[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    v = tl.load(v_rows + offs_dv[None, :], mask=v_mask, other=0.0)  # [BLOCK_T, BLOCK_DV]
    tl.store(VCache + v_dst[:, None] + offs_dv[None, :], v.to(VCache.dtype.element_ty), mask=v_mask & exists[:, None])


@triton.jit
def _attend_cache_blocks(
    acc, l_i, m_i, q, K, V, BlockTable, stride_kb, stride_kn, stride_vb, stride_vn, k_start, page_size,
    num_pages, start, end, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, window_left, window_right, qk_scale,
    softcap_log2, alibi_slope_log2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    PAGED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold keys [start, end) into the running (acc, l_i, m_i), as fwd.py's loop, with K/V found
    through the cache layout. offs_m: [BLOCK_M] query token of each packed row. With MASK, keys
    outside a row's window or past seqlen_k are excluded."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = offs_n < seqlen_k
        k_mask = offs_d[None, :] < HEAD_DIM
        v_mask = offs_dv[None, :] < HEAD_DIM_V
        if MASK:
            k_mask = k_mask & in_range[:, None]
            v_mask = v_mask & in_range[:, None]
        page, slot, _ = _cache_slots(BlockTable, offs_n + k_start, in_range, page_size, num_pages, PAGED)
        k_off = _kv_offsets(page, slot, stride_kb, stride_kn, PAGED)
        k = tl.load(K + k_off[:, None] + offs_d[None, :], mask=k_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
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
        acc = acc * alpha[:, None]
        v_off = _kv_offsets(page, slot, stride_vb, stride_vn, PAGED)
        v = tl.load(V + v_off[:, None] + offs_dv[None, :], mask=v_mask, other=0.0)  # [BLOCK_N, BLOCK_DV]
        if DOT_FP32:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)  # [BLOCK_M, BLOCK_DV]
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(
    do_not_specialize=[
        "seqlen_q", "seqlen_new", "page_size", "rotary_dim", "seqlen_ro", "num_splits", "window_left", "window_right",
        "stride_ls", "stride_lb", "stride_lh",  # follow batch and seqlen_q: no recompile per shape
        "capacity", "cache_rows",
    ]
)  # fmt: skip
def decode_kernel(
    Q, KCache, VCache, Out, LSE, CacheSeqlens, CacheBatchIdx, CacheLeftpad, BlockTable, Cos, Sin,
    AlibiSlopes, Sink,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_os, stride_ob, stride_om, stride_oh,
    stride_ls, stride_lb, stride_lh, stride_lm,
    stride_btb, stride_cos, stride_sin, stride_ab, stride_ah,
    seqlen_q, seqlen_new, group_size, page_size, rotary_dim, seqlen_ro, num_splits, capacity, cache_rows,
    window_left, window_right, qk_scale, softcap_log2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SINK: tl.constexpr, PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    HAS_ROTARY: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr, ROTARY_PER_TOKEN: tl.constexpr,
    WRITE_FINAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Q: (batch_size, seqlen_q, nheads, headdim). KCache, VCache: dense (batch_size_cache,
    seqlen_cache, nheads_k, headdim[_v]) or paged (num_blocks, page_block_size, nheads_k, headdim[_v]).
    Out, LSE: partials (num_splits, batch_size, nheads, seqlen_q, headdim_v) and (num_splits,
    batch_size, nheads, seqlen_q), fp32; with WRITE_FINAL the output (batch_size, seqlen_q, nheads,
    headdim_v) and lse (batch_size, nheads, seqlen_q), stride_os = stride_ls = 0. capacity: positions
    per cache row; cache_rows: KCache.shape[0] (the Bounds guard)."""
    pid = tl.program_id(0)
    off_hk = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    split = pid % num_splits
    start_r = (pid // num_splits) * BLOCK_M

    seqlen_cache = tl.load(CacheSeqlens + off_b)
    row_ok = (seqlen_cache >= 0) & (seqlen_cache <= capacity - seqlen_new)  # Bounds (module docstring)
    row = off_b
    if HAS_BATCH_IDX:
        row = tl.load(CacheBatchIdx + off_b).to(tl.int64)
        row_ok = row_ok & (row >= 0) & (row < cache_rows)
        row = tl.where(row_ok, row, 0)
    seqlen_cache = tl.where(row_ok, seqlen_cache, 0)
    k_start = 0
    if HAS_LEFTPAD:
        k_start = tl.load(CacheLeftpad + off_b)
    seqlen_k = seqlen_cache + seqlen_new - k_start
    keys_ok = row_ok & (k_start >= 0) & (seqlen_k >= 0)
    seqlen_k = tl.where(keys_ok, seqlen_k, 0)
    k_start = tl.where(keys_ok, k_start, 0)

    offs_r = start_r + tl.arange(0, BLOCK_M)  # packed row
    offs_m = offs_r // group_size  # query token of each row
    offs_h = off_hk * group_size + offs_r % group_size  # query head of each row
    row_mask = offs_m < seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_rows = Q + off_b * stride_qb + offs_m.to(tl.int64)[:, None] * stride_qm + offs_h.to(tl.int64)[:, None] * stride_qh
    q = tl.load(q_rows + offs_d[None, :], mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if HAS_ROTARY:
        # causal/windowed: token t sits at cache_seqlens + t; otherwise every token at cache_seqlens
        if ROTARY_PER_TOKEN:
            q_pos = seqlen_cache + offs_m
        else:
            q_pos = seqlen_cache + 0 * offs_m
        q = rotate(q, q_rows, row_mask, q_pos, Cos, Sin, stride_cos, stride_sin, offs_d, rotary_dim, seqlen_ro,
                   ROTARY_INTERLEAVED).to(Q.dtype.element_ty)  # fmt: skip
    if DOT_FP32:
        q = q.to(tl.float32)  # [BLOCK_M, BLOCK_D]

    alibi_slope_log2 = 0.0
    if HAS_ALIBI:
        slope = tl.load(AlibiSlopes + off_b * stride_ab + offs_h * stride_ah, mask=row_mask, other=0.0)
        alibi_slope_log2 = (slope.to(tl.float32) * LOG2E)[:, None]  # [BLOCK_M, 1]: one head per row

    if PAGED:
        K = KCache + off_hk.to(tl.int64) * stride_kh
        V = VCache + off_hk.to(tl.int64) * stride_vh
        BlockTable += off_b * stride_btb
    else:
        K = KCache + row * stride_kb + off_hk.to(tl.int64) * stride_kh
        V = VCache + row * stride_vb + off_hk.to(tl.int64) * stride_vh

    # The tile's tokens lie within [start_r // group, + BLOCK_M): bounds for that span are a superset
    # of what the rows see, and their unmasked middle is unmasked for every real row.
    lo, full_lo, full_hi, hi = kv_block_bounds(
        start_r // group_size, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    per_split = ((hi - lo + BLOCK_N - 1) // BLOCK_N + num_splits - 1) // num_splits * BLOCK_N
    split_lo = tl.minimum(lo + split * per_split, hi)
    split_hi = tl.minimum(split_lo + per_split, hi)
    mid_lo = tl.minimum(tl.maximum(full_lo, split_lo), split_hi)
    mid_hi = tl.minimum(tl.maximum(full_hi, mid_lo), split_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # unmasked middle first (the bulk), then the two masked edges of this split: one helper, three ranges
    for part in tl.static_range(3):
        start = mid_lo if part == 0 else (split_lo if part == 1 else mid_hi)
        end = mid_hi if part == 0 else (mid_lo if part == 1 else split_hi)
        acc, l_i, m_i = _attend_cache_blocks(
            acc, l_i, m_i, q, K, V, BlockTable, stride_kb, stride_kn, stride_vb, stride_vn, k_start, page_size,
            cache_rows, start, end, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, window_left, window_right, qk_scale,
            softcap_log2, alibi_slope_log2, HEAD_DIM, HEAD_DIM_V, BLOCK_N, part != 0, PAGED, HAS_LEFT, HAS_RIGHT,
            HAS_SOFTCAP, HAS_ALIBI, DOT_FP32, PRECISION,
        )  # fmt: skip

    if WRITE_FINAL and HAS_SINK:
        # the sink is one more logit in the denominator, with no value row (split results get it in combine)
        sink_log2 = tl.load(Sink + offs_h, mask=row_mask, other=0.0).to(tl.float32) * LOG2E
        acc, l_i, m_i = fold_sink(acc, l_i, m_i, sink_log2)

    # rows (or splits) that saw nothing have l_i == 0: out 0, lse -inf
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    Out += split.to(tl.int64) * stride_os + off_b * stride_ob
    LSE += split.to(tl.int64) * stride_ls + off_b * stride_lb
    o_rows = offs_m.to(tl.int64)[:, None] * stride_om + offs_h.to(tl.int64)[:, None] * stride_oh
    o_mask = row_mask[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    tl.store(Out + o_rows + offs_dv[None, :], out.to(Out.dtype.element_ty), mask=o_mask)
    tl.store(LSE + offs_h.to(tl.int64) * stride_lh + offs_m.to(tl.int64) * stride_lm, lse, mask=row_mask)
