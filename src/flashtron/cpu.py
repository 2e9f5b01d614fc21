"""Exact attention for CPU tensors: a blockwise online softmax in plain PyTorch.

The forward pass streams over KV blocks of `block_n` keys with a running max `m_i`, a running sum
`l_i` and a rescaled accumulator `acc`, so it never holds more than a (seqlen_q, block_n) block of
scores. The backward pass recomputes each block's probabilities from the saved lse. Memory is O(N).
With a window (causal included) the queries are taken in blocks of `block_n` rows too, and each
query block visits only the KV blocks its rows can see, so masked-out blocks cost nothing.
Everything is computed in fp32 (fp64 for fp64 inputs). There is no autograd in here: the caller
wraps these functions in an autograd Function.

Inside, grouped-query heads are laid out as (batch, nheads_k, group * seqlen, headdim) so that one
batched matmul serves all query heads of a KV head without repeating K and V.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from flashtron.checks import InputValueError
from flashtron.dropout import block_keep
from flashtron.masks import diagonal_offsets, hidden_by_window
from flashtron.options import AttnOptions, CacheLayout

_NEG_INF = float("-inf")


class _Problem(NamedTuple):
    """Constants of one attention problem whose sequences all have the same lengths."""

    seqlen_q: int
    seqlen_k: int
    scale: float
    softcap: float
    window_left: int
    window_right: int
    slopes: torch.Tensor | None  # (batch or 1, nheads_k, group, 1, 1) in the compute dtype
    block_n: int


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


class _Dropout(NamedTuple):
    """Where one sequence sits in the Philox offset space (flashtron/dropout.py)."""

    seed: int
    rate: float  # dropout_p
    bh: torch.Tensor  # (batch_size, nheads_k, group): batch * nheads + head (dense) or head (varlen)
    rows_total: int
    row0: int
    cols_total: int
    col0: int

    def keep(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """(batch_size, nheads_k, group, i1 - i0, j1 - j0) bool: rows i0..i1-1, keys j0..j1-1."""
        return block_keep(
            self.seed, self.rate, self.bh, self.rows_total, self.row0 + i0, i1 - i0, self.cols_total, self.col0, j0, j1
        )


def dense_dropout(opts, seed, q, k):
    if opts.dropout_p == 0:
        return None
    b, sq, h, _ = q.shape
    hk = k.shape[2]
    bh = (torch.arange(b)[:, None] * h + torch.arange(h)[None, :]).view(b, hk, h // hk)
    return _Dropout(seed, opts.dropout_p, bh, sq, 0, k.shape[1], 0)


def varlen_dropout(opts, seed, q, k, q0, k0):
    if opts.dropout_p == 0:
        return None
    h, hk = q.shape[1], k.shape[1]
    return _Dropout(seed, opts.dropout_p, torch.arange(h).view(1, hk, h // hk), q.shape[0], q0, k.shape[0], k0)


def _check(opts: AttnOptions, block_n: int, dropout_seed) -> None:
    if opts.dropout_p > 0 and not isinstance(dropout_seed, int):
        raise InputValueError(f"dropout_seed must be an int when dropout_p > 0, got {dropout_seed!r}")
    if not isinstance(block_n, int) or block_n < 1:
        raise InputValueError(f"block_n must be a positive int, got {block_n!r}")


def make_problem(opts, sq, sk, nheads_k, group, slopes, dtype, block_n) -> _Problem:
    if slopes is not None:
        # (nheads,) or (batch, nheads) -> (batch or 1, nheads_k, group, 1, 1)
        slopes = slopes.to(dtype).reshape(-1, nheads_k, group, 1, 1)
    return _Problem(sq, sk, opts.softmax_scale, opts.softcap, opts.window_left, opts.window_right, slopes, block_n)


def _query_blocks(problem: _Problem) -> list[tuple[int, int]]:
    """Query rows in blocks of block_n when a window bounds what they see, else all rows at once."""
    if problem.window_left < 0 and problem.window_right < 0:
        return [(0, problem.seqlen_q)] if problem.seqlen_q > 0 else []
    return [(i0, min(i0 + problem.block_n, problem.seqlen_q)) for i0 in range(0, problem.seqlen_q, problem.block_n)]


def _key_blocks(problem: _Problem, i0: int, i1: int) -> list[tuple[int, int]]:
    """KV blocks (j0, j1) that some row of [i0, i1) can see; fully masked blocks are skipped.

    Row i sees [i + sk - sq - left, i + sk - sq + right]; over the rows that is one contiguous range.
    """
    lo, hi = 0, problem.seqlen_k
    shift = problem.seqlen_k - problem.seqlen_q
    if problem.window_left >= 0:
        lo = max(lo, i0 + shift - problem.window_left)
    if problem.window_right >= 0:
        hi = min(hi, i1 - 1 + shift + problem.window_right + 1)
    return [(j0, min(j0 + problem.block_n, hi)) for j0 in range(lo, hi, problem.block_n)]


def block_logits(problem: _Problem, q: torch.Tensor, k_blk: torch.Tensor, i0: int, i1: int, j0: int):
    """Scores of query rows i0 .. i1 - 1 against the keys j0 .. j0 + n - 1, shared by forward and
    backward.

    q: (batch_size, nheads_k, group * (i1 - i0), headdim); k_blk: (batch_size, nheads_k, n, headdim).
    Returns the logits (batch_size, nheads_k, group, i1 - i0, n), -inf where masked, and
    tanh(scaled scores / softcap) of the same shape (None without softcap) for the backward.
    """
    b, hk, _, _ = q.shape
    n = k_blk.shape[2]
    s = torch.matmul(q, k_blk.transpose(-1, -2)).view(b, hk, -1, i1 - i0, n).mul_(problem.scale)
    t = None
    if problem.softcap > 0:
        t = torch.tanh(s.div_(problem.softcap))
        s = t * problem.softcap
    # rel = j - (i + sk - sq): the key's offset from the query's bottom-right-aligned diagonal.
    rows, cols = torch.arange(i0, i1, device=q.device), torch.arange(j0, j0 + n, device=q.device)
    rel = diagonal_offsets(problem.seqlen_q, problem.seqlen_k, rows, cols)  # [i1 - i0, n]
    if problem.slopes is not None:
        s.addcmul_(problem.slopes, rel.abs().to(s.dtype), value=-1.0)
    masked = hidden_by_window(rel, problem.window_left, problem.window_right)
    if masked is not None:
        s.masked_fill_(masked, _NEG_INF)
    return s, t


def heads_first(x: torch.Tensor, nheads_k: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch_size, seqlen, nheads, d) -> (batch_size, nheads_k, group * seqlen, d) in dtype."""
    b, s, h, d = x.shape
    x = x.to(dtype).reshape(b, s, nheads_k, h // nheads_k, d).permute(0, 2, 3, 1, 4)
    return x.reshape(b, nheads_k, -1, d)


def _heads_last(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(batch_size, nheads_k, group * seqlen, d) -> like's (batch_size, seqlen, nheads, d), like's dtype."""
    b, s, h, _ = like.shape
    hk, d = x.shape[1], x.shape[3]
    x = x.view(b, hk, h // hk, s, d).permute(0, 3, 1, 2, 4)
    return x.reshape(b, s, h, d).to(like.dtype)


def _sink(opts: AttnOptions, nheads_k: int, dtype: torch.dtype) -> torch.Tensor | None:
    """learnable_sink (nheads,) -> (1, nheads_k, group, 1) in the compute dtype, or None."""
    if opts.learnable_sink is None:
        return None
    return opts.learnable_sink.to(dtype).reshape(1, nheads_k, -1, 1)


def _forward_dense(q, k, v, opts, slopes, block_n, drop=None):
    """q: (batch_size, seqlen_q, nheads, headdim), k: (batch_size, seqlen_k, nheads_k, headdim),
    v: (batch_size, seqlen_k, nheads_k, headdim_v) -> out (batch_size, seqlen_q, nheads, headdim_v),
    lse (batch_size, nheads, seqlen_q) in the compute dtype."""
    dt = _compute_dtype(q)
    b, sq, h, _ = q.shape
    sk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hk
    if b * sq == 0:  # no query rows: nothing to attend (the reshapes below cannot infer a size then)
        return torch.zeros((b, sq, h, dv), dtype=q.dtype), torch.full((b, h, sq), _NEG_INF, dtype=dt)
    problem = make_problem(opts, sq, sk, hk, g, slopes, dt, block_n)
    qh, kh, vh = heads_first(q, hk, dt), heads_first(k, hk, dt), heads_first(v, hk, dt)
    qh5 = qh.view(b, hk, g, sq, -1)

    out = torch.zeros((b, hk, g, sq, dv), dtype=dt)
    lse = torch.full((b, hk, g, sq), _NEG_INF, dtype=dt)
    sink = _sink(opts, hk, dt)
    for i0, i1 in _query_blocks(problem):
        nr = i1 - i0
        q_blk = qh5[:, :, :, i0:i1].reshape(b, hk, g * nr, -1)
        m_i = torch.full((b, hk, g, nr), _NEG_INF, dtype=dt)
        l_i = torch.zeros((b, hk, g, nr), dtype=dt)
        acc = torch.zeros((b, hk, g * nr, dv), dtype=dt)
        for j0, j1 in _key_blocks(problem, i0, i1):
            s, _ = block_logits(problem, q_blk, kh[:, :, j0:j1], i0, i1, j0)  # [b, hk, g, nr, n]
            m_new = torch.maximum(m_i, s.amax(dim=-1))
            # Rows that have seen no visible key yet keep m = -inf; subtract 0 there, never -inf - -inf.
            m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0)
            pr = s.sub_(m_safe[..., None]).exp_()  # in place: blocks are the only O(sq * n) memory
            alpha = torch.exp(m_i - m_safe)
            l_i = l_i * alpha + pr.sum(dim=-1)
            if drop is not None:  # the denominator counts every probability, the output only the kept
                pr = pr * drop.keep(i0, i1, j0, j1)
            acc = acc * alpha.view(b, hk, g * nr, 1) + pr.view(b, hk, g * nr, -1) @ vh[:, :, j0:j1]
            m_i = m_new

        lse_blk = m_i + torch.log(l_i)  # -inf + -inf = -inf for rows with nothing to attend to
        inv_l = torch.where(l_i > 0, 1.0 / l_i, 0.0)
        if sink is not None:
            lse_keys = lse_blk
            lse_blk = torch.logaddexp(lse_keys, sink)
            # The sink only enlarges the denominator: scale by sum_keys / (sum_keys + e^sink).
            inv_l = inv_l * torch.exp(lse_keys - lse_blk)
        if drop is not None:
            inv_l = inv_l / (1.0 - drop.rate)
        out[:, :, :, i0:i1] = (acc * inv_l.view(b, hk, g * nr, 1)).view(b, hk, g, nr, dv)
        lse[..., i0:i1] = lse_blk
    return _heads_last(out.view(b, hk, g * sq, dv), q), lse.reshape(b, h, sq)


def _backward_dense(dout, q, k, v, out, lse, dlse, opts, slopes, block_n, drop=None):
    """Shapes as in _forward_dense, dout like out, dlse like lse or None. Returns dq, dk, dv, dsink or None."""
    dt = _compute_dtype(q)
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    if b * sq == 0:  # no query rows: every gradient is zero
        dsink = None if opts.learnable_sink is None else torch.zeros_like(opts.learnable_sink)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dsink
    problem = make_problem(opts, sq, sk, hk, g, slopes, dt, block_n)
    qh, kh, vh = heads_first(q, hk, dt), heads_first(k, hk, dt), heads_first(v, hk, dt)
    doh = heads_first(dout, hk, dt)
    delta = heads_first((dout.to(dt) * out.to(dt)).sum(-1, keepdim=True), hk, dt).view(b, hk, g, sq)
    lse = lse.to(dt).reshape(b, hk, g, sq)
    if dlse is not None:
        # d lse / d s = P, so a gradient on lse enters exactly like -dlse added to delta.
        delta = delta - dlse.to(dt).reshape(b, hk, g, sq)
    # A row with lse = -inf has only -inf logits, so P = exp(-inf - 0) = 0 there.
    lse_safe = lse.masked_fill(lse == _NEG_INF, 0.0)

    qh5, doh5 = qh.view(b, hk, g, sq, -1), doh.view(b, hk, g, sq, -1)
    dq, dk, dv = torch.zeros_like(qh5), torch.zeros_like(kh), torch.zeros_like(vh)
    for i0, i1 in _query_blocks(problem):
        nr = i1 - i0
        q_blk = qh5[:, :, :, i0:i1].reshape(b, hk, g * nr, -1)
        do_blk = doh5[:, :, :, i0:i1].reshape(b, hk, g * nr, -1)
        lse_blk, delta_blk = lse_safe[..., i0:i1, None], delta[..., i0:i1, None]
        dq_blk = torch.zeros_like(q_blk)
        for j0, j1 in _key_blocks(problem, i0, i1):
            k_blk, v_blk = kh[:, :, j0:j1], vh[:, :, j0:j1]
            s, t = block_logits(problem, q_blk, k_blk, i0, i1, j0)  # [b, hk, g, nr, n]
            pr = s.sub_(lse_blk).exp_()
            dp = (do_blk @ v_blk.transpose(-1, -2)).view_as(pr)
            if drop is not None:
                # out used the kept probabilities scaled by 1/(1-p): so do dV and the flow into P
                kept = drop.keep(i0, i1, j0, j1).to(dt) / (1.0 - drop.rate)
                dv[:, :, j0:j1] += (pr * kept).view(b, hk, g * nr, -1).transpose(-1, -2) @ do_blk
                dp.mul_(kept)
            else:
                dv[:, :, j0:j1] += pr.view(b, hk, g * nr, -1).transpose(-1, -2) @ do_blk
            ds = dp.sub_(delta_blk).mul_(pr)  # gradient of the logits (alibi's bias has slope 1)
            if t is not None:
                ds.mul_(t.square_().neg_().add_(1.0))  # d/ds of c * tanh(s / c) = 1 - tanh^2
            ds = ds.view(b, hk, g * nr, -1).mul_(problem.scale)
            dq_blk += ds @ k_blk
            dk[:, :, j0:j1] += ds.transpose(-1, -2) @ q_blk
        dq[:, :, :, i0:i1] = dq_blk.view(b, hk, g, nr, -1)
    dq = dq.view(b, hk, g * sq, -1)

    dsink = None
    sink = _sink(opts, hk, dt)
    if sink is not None:
        # d lse / d sink = exp(sink - lse), and d loss / d lse (through out and dlse) is -delta.
        dsink = -(torch.exp(sink - lse) * delta).sum(dim=(0, 3)).reshape(h)
        dsink = dsink.to(opts.learnable_sink.dtype)
    return _heads_last(dq, q), _heads_last(dk, k), _heads_last(dv, v), dsink


def sequences(cu_seqlens_q, cu_seqlens_k, seqused_k, total_q, total_k):
    """Yield (index, q_start, q_end, k_start, k_end) per sequence of a varlen batch.

    The API has checked the values wherever it reads them (checks.reads_values); when it has not (a
    call under torch.compile), they are clamped as the kernels clamp them (kernels/common.py,
    sequence_bounds), so every sequence stays inside q and k: start into [0, total], end into
    [start, total], seqused_k into [0, the sequence's length]."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    used = seqused_k.tolist() if seqused_k is not None else None
    for i in range(len(cu_q) - 1):
        q0 = min(max(cu_q[i], 0), total_q)
        q1 = min(max(cu_q[i + 1], q0), total_q)
        k0 = min(max(cu_k[i], 0), total_k)
        k1 = min(max(cu_k[i + 1], k0), total_k)
        if used is not None:
            k1 = k0 + min(max(used[i], 0), k1 - k0)
        yield i, q0, q1, k0, k1


def slopes_of(opts: AttnOptions, i: int):
    s = opts.alibi_slopes
    return s[i : i + 1] if s is not None and s.dim() == 2 else s


def attention_forward(
    q,
    k,
    v,
    opts: AttnOptions,
    *,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    seqused_k=None,
    dropout_seed: int | None = None,
    block_n: int = 256,
):
    """Exact attention forward on CPU tensors.

    Dense: q: (batch_size, seqlen_q, nheads, headdim), k: (batch_size, seqlen_k, nheads_k, headdim),
    v: (batch_size, seqlen_k, nheads_k, headdim_v) -> out: (batch_size, seqlen_q, nheads, headdim_v)
    in q.dtype, lse: (batch_size, nheads, seqlen_q).
    Varlen (cu_seqlens_q given): q: (total_q, nheads, headdim), k: (total_k, nheads_k, headdim),
    v: (total_k, nheads_k, headdim_v), cu_seqlens_q/k: (batch_size + 1,) int32, seqused_k:
    (batch_size,) int32 or None -> out: (total_q, nheads, headdim_v), lse: (nheads, total_q).
    lse is fp32, or fp64 for fp64 inputs so that the fp64 backward is not limited by fp32 rounding.
    dropout_seed picks the dropout mask (flashtron/dropout.py), the same one the kernels draw.
    """
    _check(opts, block_n, dropout_seed)
    if cu_seqlens_q is None:
        return _forward_dense(q, k, v, opts, opts.alibi_slopes, block_n, dense_dropout(opts, dropout_seed, q, k))
    total_q, h, _ = q.shape
    out = torch.zeros((total_q, h, v.shape[-1]), dtype=q.dtype)
    lse = torch.full((h, total_q), _NEG_INF, dtype=_compute_dtype(q))
    for i, q0, q1, k0, k1 in sequences(cu_seqlens_q, cu_seqlens_k, seqused_k, q.shape[0], k.shape[0]):
        if q1 == q0:
            continue
        drop = varlen_dropout(opts, dropout_seed, q, k, q0, k0)
        o, l_ = _forward_dense(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], opts, slopes_of(opts, i), block_n, drop)
        out[q0:q1], lse[:, q0:q1] = o[0], l_[0]
    return out, lse


def attention_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    opts: AttnOptions,
    *,
    dlse=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    seqused_k=None,
    dropout_seed: int | None = None,
    block_n: int = 256,
):
    """Gradients of attention_forward, recomputing the probabilities per KV block from lse.

    Shapes as in attention_forward; dout is like out; dlse (the gradient on lse, for return_lse) is
    like lse, or None. Returns (dq, dk, dv, dsink): each gradient in
    its input's dtype, dsink (nheads,) in learnable_sink's dtype (fp32), or None without a sink.
    Keys past seqused_k get zero gradients.
    """
    _check(opts, block_n, dropout_seed)
    if cu_seqlens_q is None:
        drop = dense_dropout(opts, dropout_seed, q, k)
        return _backward_dense(dout, q, k, v, out, lse, dlse, opts, opts.alibi_slopes, block_n, drop)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dsink = None
    if opts.learnable_sink is not None:
        dsink = torch.zeros(q.shape[1], dtype=opts.learnable_sink.dtype)
    for i, q0, q1, k0, k1 in sequences(cu_seqlens_q, cu_seqlens_k, seqused_k, q.shape[0], k.shape[0]):
        if q1 == q0:
            continue
        grads = _backward_dense(
            dout[None, q0:q1],
            q[None, q0:q1],
            k[None, k0:k1],
            v[None, k0:k1],
            out[None, q0:q1],
            lse[None, :, q0:q1],
            None if dlse is None else dlse[None, :, q0:q1],
            opts,
            slopes_of(opts, i),
            block_n,
            varlen_dropout(opts, dropout_seed, q, k, q0, k0),
        )
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = grads[0][0], grads[1][0], grads[2][0]
        if dsink is not None:
            dsink += grads[3]
    return dq, dk, dv, dsink


# ----------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache on CPU tensors (plain PyTorch; host syncs are fine here)
# ----------------------------------------------------------------------------------------------------


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, interleaved: bool,
           conjugate: bool = False) -> torch.Tensor:  # fmt: skip
    """Rotary embedding in PyTorch, the one implementation behind every CPU path (ops.apply_rotary_emb and
    flash_attn_with_kvcache): x (..., nheads, headdim) rotated at positions pos (x's shape without its
    last two axes, or broadcastable to it), GPT-J pairs (interleaved) or GPT-NeoX halves. cos, sin:
    (seqlen_ro, rotary_dim / 2); positions outside [0, seqlen_ro) are left unrotated; features past
    rotary_dim pass through. Computed in fp32 (fp64 for fp64 x) and rounded once to x.dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    half, seqlen_ro = cos.shape[1], cos.shape[0]
    inside = ((pos >= 0) & (pos < seqlen_ro))[..., None]
    idx = pos.clamp(0, max(seqlen_ro - 1, 0))
    c = torch.where(inside, cos.to(acc)[idx], 1.0).unsqueeze(-2)  # (..., 1, rotary_dim / 2)
    s = torch.where(inside, sin.to(acc)[idx], 0.0).unsqueeze(-2)
    if conjugate:
        s = -s
    xr = x[..., : 2 * half].to(acc)
    x0, x1 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :half], xr[..., half:])
    o0, o1 = x0 * c - x1 * s, x0 * s + x1 * c
    rotated = torch.stack((o0, o1), dim=-1).flatten(-2) if interleaved else torch.cat((o0, o1), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half :]), dim=-1)


_PER_ROW_BYTES = 1 << 20  # _dense_cache_cpu: keys and values per row past which rows go one at a time


def _slots(cache: CacheLayout, block_table, rows: torch.Tensor, pos: torch.Tensor):
    """Cache index (first, second axis) of positions pos (any shape) of batch rows rows (same shape)."""
    if cache.paged:
        return block_table.long()[rows, pos // cache.page_size], pos % cache.page_size
    return rows, pos


def kvcache_forward(
    q,
    k_cache,
    v_cache,
    opts: AttnOptions,
    cache: CacheLayout,
    *,
    k,
    v,
    rotary_cos,
    rotary_sin,
    cache_seqlens,
    cache_batch_idx,
    cache_leftpad,
    block_table,
    rotary_interleaved,
):
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_new = 0 if k is None else k.shape[1]
    lens = cache_seqlens.long() if cache_seqlens is not None else torch.full((batch,), cache.capacity)
    pads = cache_leftpad.long() if cache_leftpad is not None else torch.zeros(batch, dtype=torch.long)
    cache_rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(batch)
    pos_new = lens[:, None] + torch.arange(seqlen_new)  # (batch_size, seqlen_new)
    if seqlen_new > 0 and batch > 0:
        k_new = k
        if rotary_cos is not None:
            k_new = rotate(k, rotary_cos, rotary_sin, pos_new, rotary_interleaved)
        index = _slots(cache, block_table, cache_rows[:, None].expand_as(pos_new), pos_new)
        k_cache[index] = k_new.to(k_cache.dtype)
        v_cache[index] = v.to(v_cache.dtype)

    if rotary_cos is not None:
        # causal/windowed: token t sits at cache_seqlens + t; otherwise every token at cache_seqlens
        step = torch.arange(seqlen_q) if opts.has_window else torch.zeros(seqlen_q, dtype=torch.long)
        q = rotate(q, rotary_cos, rotary_sin, lens[:, None] + step, rotary_interleaved)

    if batch * seqlen_q == 0:
        return q.new_zeros(batch, seqlen_q, nheads, v_cache.shape[3]), torch.empty(batch, nheads, seqlen_q)
    opts = dataclasses.replace(opts, dropout_p=0.0)
    bounds = list(zip(pads.tolist(), (lens + seqlen_new).tolist()))
    if not cache.paged:
        return _dense_cache_cpu(q, k_cache, v_cache, opts, cache_rows.tolist(), bounds)
    # paged: gather each row's valid keys [pad, len + seqlen_new) and run the exact varlen CPU attention
    pos = torch.cat([torch.arange(start, end) for start, end in bounds])
    counts = torch.tensor([end - start for start, end in bounds])
    index = _slots(cache, block_table, cache_rows.repeat_interleave(counts), pos)
    cu_k = torch.zeros(batch + 1, dtype=torch.int32)
    cu_k[1:] = counts.cumsum(0)
    cu_q = torch.arange(batch + 1, dtype=torch.int32) * seqlen_q
    out, lse = attention_forward(
        q.reshape(batch * seqlen_q, nheads, -1),
        k_cache[index],
        v_cache[index],
        opts,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
    )
    out = out.view(batch, seqlen_q, nheads, -1)
    lse = lse.view(nheads, batch, seqlen_q).transpose(0, 1).float().contiguous()
    return out, lse


def _dense_cache_cpu(q, k_cache, v_cache, opts, rows: list[int], bounds: list[tuple[int, int]]):
    """Attention of each batch row over its cache row's keys [start, end), read in place (copying the
    keys out first, as the paged path must, cost more than the attention itself on long caches).

    One call covers the batch when the rows are consecutive cache rows with the same bounds and little
    data; otherwise one call per row. A slice of several cache rows cannot fold its (batch, head) axes
    into one batch stride, so each matmul copies its block; one row at a time reads in place. An A/B of
    the two branches on this project's 2-core CPU machine (2026-12-01, an ad-hoc switch, at
    scripts/cpu_time.py --decode's shapes, one run), fp32, h 32/8, d 128: batch 4 x 1k keys 9.1 ms in
    one call against 5.6 ms per row; batch 2 x 256 keys at h 8/2, d 64: 0.48 against 0.66 ms. Past
    about 1 MiB of keys and values per row the per-row calls win."""
    batch = q.shape[0]
    (start, end), r0 = bounds[0], rows[0]
    row_bytes = (end - start) * k_cache.shape[2] * (k_cache.shape[3] + v_cache.shape[3]) * k_cache.element_size()
    same = len(set(bounds)) == 1 and rows == list(range(r0, r0 + batch))
    if same and (batch == 1 or row_bytes < _PER_ROW_BYTES):
        out, lse = attention_forward(q, k_cache[r0 : r0 + batch, start:end], v_cache[r0 : r0 + batch, start:end], opts)
        return out, lse.float()
    outs, lses = [], []
    slopes = opts.alibi_slopes
    for b, (row, (start, end)) in enumerate(zip(rows, bounds)):
        row_opts = opts
        if slopes is not None and slopes.dim() == 2:  # (batch_size, nheads): this row's slopes
            row_opts = dataclasses.replace(opts, alibi_slopes=slopes[b : b + 1])
        out, lse = attention_forward(
            q[b : b + 1], k_cache[row : row + 1, start:end], v_cache[row : row + 1, start:end], row_opts
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses).float()
