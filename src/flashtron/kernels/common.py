"""Pieces every attention kernel shares: which KV blocks a query block visits, the mask, the scores.

Vocabulary: `shift = seqlen_k - seqlen_q` aligns query i with key i + shift (bottom-right). Query i
sees key j iff  i + shift - window_left <= j <= i + shift + window_right  and  j < seqlen_k, where a
side is unbounded unless HAS_LEFT / HAS_RIGHT (causal is HAS_RIGHT with window_right = 0).
Scores are kept in log2 units so the softmax can use exp2.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# The forward's and backward's scalar arguments that change from call to call. Seqlens, and the LSE strides
# that follow them ((b, h, sq) or (h, total_q)), would compile again for every new sequence length if
# specialized (== 1, % 16); windows and dropout seeds likewise for every new value.
RUNTIME_SCALARS = [
    "seqlen_q", "seqlen_k", "stride_lb", "stride_lh", "window_left", "window_right",
    "dropout_seed", "dropout_threshold", "philox_rows", "philox_cols",
]  # fmt: skip


@triton.jit
def kv_block_bounds(
    start_m,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
):
    """KV range [lo, hi) that rows [start_m, start_m + BLOCK_M) visit, and its unmasked middle
    [full_lo, full_hi): blocks there are inside the window for every row and inside seqlen_k.
    Operands are clamped to >= 0 before division, since Triton and the interpreter round negative
    integer division differently."""
    shift = seqlen_k - seqlen_q
    lo = 0
    full_lo = 0
    hi = seqlen_k
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        lo = (tl.maximum(start_m + shift - window_left, 0) // BLOCK_N) * BLOCK_N
        first_all = tl.maximum(start_m + BLOCK_M - 1 + shift - window_left, 0)
        full_lo = ((first_all + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(hi, tl.maximum(start_m + BLOCK_M + shift + window_right, 0))
        full_hi = tl.minimum(full_hi, (tl.maximum(start_m + shift + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def q_block_bounds(
    start_n,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
):
    """Query range [lo, hi) whose rows see some key of [start_n, start_n + BLOCK_N), and its unmasked
    middle [full_lo, full_hi): rows there see every key of the block and are < seqlen_q. A key block
    that runs past seqlen_k has no unmasked middle."""
    shift = seqlen_k - seqlen_q
    lo = 0
    full_lo = 0
    hi = seqlen_q
    full_hi = (seqlen_q // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        # row i sees key j only if j <= i + shift + right, i.e. i >= j - shift - right
        lo = (tl.maximum(start_n - shift - window_right, 0) // BLOCK_M) * BLOCK_M
        first_all = tl.maximum(start_n + BLOCK_N - 1 - shift - window_right, 0)
        full_lo = ((first_all + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(hi, tl.maximum(start_n + BLOCK_N - shift + window_left, 0))
        full_hi = tl.minimum(full_hi, (tl.maximum(start_n - shift + window_left + 1, 0) // BLOCK_M) * BLOCK_M)
    if start_n + BLOCK_N > seqlen_k:
        full_hi = full_lo
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def visible(rows, cols, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """True where query `rows` may attend to key `cols` (rows >= seqlen_q never).

    rows and cols are broadcastable index grids: offs_m[:, None] and offs_n[None, :] give a
    [BLOCK_M, BLOCK_N] mask, offs_m[None, :] and offs_n[:, None] its transpose. The backward builds
    transposed blocks directly rather than tl.trans() a dot's result, which Triton 3.4+ miscompiles on
    Hopper when the transposed tensor feeds another dot (wrong dK seen here; fla-org PR 826)."""
    keep = (rows < seqlen_q) & (cols < seqlen_k)
    diag = rows + (seqlen_k - seqlen_q)
    if HAS_RIGHT:
        keep = keep & (cols <= diag + window_right)
    if HAS_LEFT:
        keep = keep & (cols >= diag - window_left)
    return keep


@triton.jit
def tanh(x):
    # exp-based so that it runs on every backend and in the interpreter; saturates cleanly at +-1
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def scores_log2(
    qk,
    rows,
    cols,
    seqlen_q,
    seqlen_k,
    qk_scale,
    softcap_log2,
    alibi_slope_log2,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    """Scaled scores in log2 units, from raw q.k (rows/cols: index grids shaped like qk, see
    `visible`). Returns (scores, tanh) where tanh is the softcap's
    tanh (needed by the backward) or a dummy when there is no softcap.
    Without softcap qk_scale = softmax_scale * log2(e); with it qk_scale = softmax_scale / softcap and
    softcap_log2 = softcap * log2(e)."""
    if HAS_SOFTCAP:
        t = tanh(qk * qk_scale)
        s = t * softcap_log2
    else:
        t = qk
        s = qk * qk_scale
    if HAS_ALIBI:
        dist = (rows + (seqlen_k - seqlen_q)) - cols
        s = s - alibi_slope_log2 * tl.abs(dist).to(tl.float32)
    return s, t


@triton.jit
def dropout_keep(seed, threshold, philox_base, rows, cols, philox_cols):
    """Keep-mask over the index grids rows x cols (see `visible`): Philox draw of element (row, key)
    >= threshold (= p * 2**32). philox_base is the offset of (row 0, key 0) of this head; rows are
    philox_cols apart. The same draw is made in plain PyTorch by flashtron.dropout."""
    offs = philox_base + rows.to(tl.int64) * philox_cols + cols
    return tl.randint(seed, offs).to(tl.int64) >= threshold


@triton.jit
def online_softmax_step(
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
    MASK: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    """Fold one [BLOCK_M, BLOCK_N] block of raw q.k into the running softmax state.

    Returns (p, alpha, l_i, m_i): p the block's unnormalised probabilities (exp2 against the new
    running max), alpha the factor that rescales the old accumulator, and the updated sum and max.
    With MASK, keys outside the window or past seqlen_k are excluded."""
    s, _ = scores_log2(
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
    if MASK:
        keep = visible(
            offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT
        )
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet keeps m = -inf: subtract 0 instead of inf - inf
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new
    p = tl.exp2(s - m_sub[:, None])  # [BLOCK_M, BLOCK_N]
    alpha = tl.exp2(m_i - m_sub)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def fold_sink(acc, l_i, m_i, sink_log2):
    """Add an attention-sink logit (log2 units; a scalar or one per row) to each row's softmax
    denominator. It has no value row, so the accumulator is only rescaled to the new max."""
    m_fin = tl.maximum(m_i, sink_log2)
    alpha = tl.exp2(m_i - m_fin)
    return acc * alpha[:, None], l_i * alpha + tl.exp2(sink_log2 - m_fin), m_fin


@triton.jit
def varlen_span(CuSeqlens, off_b, rows):
    """(start, length) of sequence off_b of a cu_seqlens, clamped into the tensor's `rows` rows:
    start into [0, rows], end into [start, rows]. Valid metadata passes unchanged; bad metadata (out
    of order, past the tensor: values the host could not check, checks.reads_values) can only empty
    or shorten a sequence, never point outside the tensor."""
    start = tl.minimum(tl.maximum(tl.load(CuSeqlens + off_b), 0), rows)
    end = tl.minimum(tl.maximum(tl.load(CuSeqlens + off_b + 1), start), rows)
    return start, end - start


@triton.jit
def fill_outside_sequences(Ptr, stride_m, CuSeqlens, batch, rows, pid, n_programs, BLOCK_M: tl.constexpr,
                           BLOCK_D: tl.constexpr, WIDTH: tl.constexpr, FILL: tl.constexpr):  # fmt: skip
    """Writes FILL into columns [0, WIDTH) of the rows of a packed varlen tensor before the first and after
    the last sequence, the sequences as varlen_span clamps them: for valid cu_seqlens, rows before
    cu_seqlens[0] and from cu_seqlens[batch] on. Programs pid of n_programs share the rows. The attention
    kernels run it in one extra batch slice of a varlen launch, so rows outside every sequence read out 0,
    lse -inf and gradient 0, as the CPU path gives, not whatever the allocator left there. WIDTH 0: Ptr is
    one value per row (lse)."""
    # the clamped spans' extent, not cu_seqlens[0] and [batch]: metadata out of order (which the host may
    # not have checked) must never make this overwrite a row that some sequence covers
    # not entry by entry: a scalar load per sequence would put thousands of dependent loads in front of
    # a large batch's fill
    first = rows
    last = rows * 0
    for b0 in range(0, batch, 256):
        b = b0 + tl.arange(0, 256)
        ok = b < batch
        start = tl.minimum(tl.maximum(tl.load(CuSeqlens + b, mask=ok, other=0), 0), rows)
        end = tl.minimum(tl.maximum(tl.load(CuSeqlens + b + 1, mask=ok, other=0), start), rows)
        first = tl.minimum(first, tl.min(tl.where(ok, start, rows), axis=0))
        last = tl.maximum(last, tl.max(tl.where(ok, end, 0), axis=0))
    last = tl.maximum(last, first)
    outside = first + rows - last
    for start in range(pid * BLOCK_M, outside, n_programs * BLOCK_M):
        r = start + tl.arange(0, BLOCK_M)
        row = tl.where(r < first, r, last + r - first).to(tl.int64)
        if WIDTH == 0:
            tl.store(Ptr + row * stride_m, tl.full([BLOCK_M], FILL, tl.float32), mask=r < outside)
        else:
            cols = tl.arange(0, BLOCK_D)
            value = tl.full([BLOCK_M, BLOCK_D], FILL, tl.float32).to(Ptr.dtype.element_ty)
            mask = (r < outside)[:, None] & (cols[None, :] < WIDTH)
            tl.store(Ptr + row[:, None] * stride_m + cols[None, :], value, mask=mask)


@triton.jit
def fill_forward_outside(Out, LSE, CuSeqlensQ, stride_om, stride_oh, stride_lh, stride_lm, batch, rows, off_h, pid,
                         n_programs, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                         HEAD_DIM_V: tl.constexpr):  # fmt: skip
    """A varlen forward's rows outside every sequence, head off_h: out 0 and lse -inf (fill_outside_sequences)."""
    Out += off_h.to(tl.int64) * stride_oh
    LSE += off_h.to(tl.int64) * stride_lh
    fill_outside_sequences(Out, stride_om, CuSeqlensQ, batch, rows, pid, n_programs, BLOCK_M, BLOCK_DV, HEAD_DIM_V, 0.0)
    fill_outside_sequences(LSE, stride_lm, CuSeqlensQ, batch, rows, pid, n_programs, BLOCK_M, BLOCK_DV, 0,
                           float("-inf"))  # fmt: skip


@triton.jit
def sequence_bounds(
    off_b, seqlen_q, seqlen_k, CuSeqlensQ, CuSeqlensK, SequsedK, IS_VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr
):
    """Where batch entry off_b lives: (q_start, seqlen_q, k_start, seqlen_k, seqlen_k_used).
    Dense batches start at 0 with the launch's seqlens. Varlen launches pass the row counts of q and
    k (total_q, total_k) as seqlen_q and seqlen_k, and the sequence is read from cu_seqlens clamped
    into them (varlen_span), seqused_k into [0, seqlen_k]: whatever the metadata holds, every row a
    program touches exists. Keys at or past seqlen_k_used (seqused_k) take part in nothing but still
    have rows in K/V (and dK/dV)."""
    q_start = 0
    k_start = 0
    if IS_VARLEN:
        q_start, seqlen_q = varlen_span(CuSeqlensQ, off_b, seqlen_q)
        k_start, seqlen_k = varlen_span(CuSeqlensK, off_b, seqlen_k)
    seqlen_k_used = seqlen_k
    if HAS_SEQUSED_K:
        seqlen_k_used = tl.minimum(tl.maximum(tl.load(SequsedK + off_b), 0), seqlen_k)
    return q_start, seqlen_q, k_start, seqlen_k, seqlen_k_used
