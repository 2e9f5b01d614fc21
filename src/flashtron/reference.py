"""The specification of flashtron's semantics, in plain PyTorch.

Everything here materialises the full score matrix, so it is slow and memory-hungry on purpose: it is
the thing the kernels and the CPU path are tested against, and it is written to be read. It imports
neither triton nor any other flashtron module.

Conventions (see /work/shared/API.md):
- Masks are aligned bottom-right: query i of a sequence sees key j iff
  i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right, where (left, right) is the
  window and -1 means unbounded on that side. causal=True sets right = 0.
- A row with nothing to attend to gives output 0, lse -inf (or the sink logit) and probabilities 0,
  with finite (zero) gradients.
- upcast=True computes in float32 (float64 for float64 inputs) and returns results in that compute
  dtype; upcast=False computes everything in the input dtype, which is the "PyTorch in the input dtype"
  baseline of the tolerance rule.
"""

from __future__ import annotations

import math

import torch

from flashtron.masks import window_mask

__all__ = ["attention_ref", "attention_varlen_ref", "apply_rotary_ref", "kvcache_ref"]


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if not upcast:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalise_window(causal: bool, window_size) -> tuple[int, int]:
    """(left, right) with -1 for an unbounded side; causal forces right = 0 and keeps left."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size: expected a pair (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    left = -1 if left < 0 else left
    right = -1 if right < 0 else right
    if causal:
        right = 0
    return left, right


def _alibi_bias(slopes: torch.Tensor, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, dtype):
    """-slope * |i + sk - sq - j| as (batch or 1, nheads, seqlen_q, seqlen_k) in `dtype`."""
    if slopes.shape == (nheads,):
        slopes = slopes.view(1, nheads, 1, 1)
    elif slopes.shape == (batch, nheads):
        slopes = slopes.view(batch, nheads, 1, 1)
    else:
        raise ValueError(f"alibi_slopes: expected shape ({nheads},) or ({batch}, {nheads}), got {tuple(slopes.shape)}")
    # Distances are exact integers; form the bias in at least fp32 and round once to `dtype`.
    wide = torch.promote_types(dtype, torch.float32)
    i = torch.arange(seqlen_q, device=slopes.device, dtype=wide).unsqueeze(1)
    j = torch.arange(seqlen_k, device=slopes.device, dtype=wide).unsqueeze(0)
    distance = (i + (seqlen_k - seqlen_q) - j).abs()
    return (-slopes.to(wide) * distance).to(dtype)


def _check_attention_inputs(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name}: expected 4 dims (batch_size, seqlen, nheads, headdim), got shape {tuple(t.shape)}"
            )
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v: expected one floating dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    batch, _, nheads, d = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"k, v: expected batch_size {batch} like q, got {k.shape[0]} and {v.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"k: expected headdim {d} like q, got {k.shape[3]}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"v: expected (seqlen_k, nheads_k) = {tuple(k.shape[1:3])} like k, got {tuple(v.shape[1:3])}")
    nheads_k = k.shape[2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"k: nheads_k must divide nheads={nheads}, got nheads_k={nheads_k}")


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


def attention_ref(
    q,
    k,
    v,
    *,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    dropout_p=0.0,
    dropout_mask=None,
    learnable_sink=None,
    upcast=True,
    reorder_ops=False,
):
    """Materialised attention with every flashtron feature; differentiable through autograd.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim)
        k: (batch_size, seqlen_k, nheads_k, headdim); query head i reads kv head i // (nheads // nheads_k)
        v: (batch_size, seqlen_k, nheads_k, headdim_v)
        softmax_scale: multiplies q.k; default 1 / sqrt(headdim).
        causal, window_size: the bottom-right aligned mask (see the module docstring).
        softcap: > 0 turns the scaled scores s into softcap * tanh(s / softcap), before mask and alibi.
        alibi_slopes: (nheads,) or (batch_size, nheads); adds -slope * |i + seqlen_k - seqlen_q - j|.
        dropout_p: drop probability; needs dropout_mask when > 0.
        dropout_mask: bool (batch_size, nheads, seqlen_q, seqlen_k), True = keep. Applied whenever given:
            out = (probs * dropout_mask / (1 - dropout_p)) @ v.
        learnable_sink: (nheads,) one extra logit per head, in the softmax denominator only.
        upcast: compute in float32 (float64 for float64 inputs) instead of the input dtype.
        reorder_ops: scale q before the matmul instead of scaling the scores (mimics the kernels'
            rounding when upcast=False).
    Returns:
        out: (batch_size, seqlen_q, nheads, headdim_v), in the compute dtype.
        lse: (batch_size, nheads, seqlen_q), natural-log logsumexp of the row's logits (sink included),
            in the compute dtype; -inf for a row with no visible key and no sink.
        probs: (batch_size, nheads, seqlen_q, seqlen_k), normalised probabilities before dropout,
            0 at masked positions.
    """
    _check_attention_inputs(q, k, v)
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    left, right = _normalise_window(causal, window_size)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    softcap = float(softcap)
    if softcap < 0:
        raise ValueError(f"softcap: expected >= 0 (0 disables it), got {softcap}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= dropout_p < 1, got {dropout_p}")
    if dropout_p > 0.0 and dropout_mask is None:
        raise ValueError("dropout_mask: required when dropout_p > 0 (the reference draws no random numbers)")

    cdtype = _compute_dtype(q.dtype, upcast)
    group = nheads // nheads_k
    qc = q.to(cdtype)
    kc = k.to(cdtype).repeat_interleave(group, dim=2)
    vc = v.to(cdtype).repeat_interleave(group, dim=2)

    if reorder_ops:
        scores = torch.einsum("bthd,bshd->bhts", qc * scale, kc)
    else:
        scores = torch.einsum("bthd,bshd->bhts", qc, kc) * scale  # (batch, nheads, seqlen_q, seqlen_k)
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        scores = scores + _alibi_bias(alibi_slopes, batch, nheads, seqlen_q, seqlen_k, cdtype)

    visible = window_mask(seqlen_q, seqlen_k, left, right, q.device)
    # masked_fill (not where) so masked positions get exactly zero gradient and exp(-inf) = 0.
    scores = scores.masked_fill(~visible, float("-inf"))

    if learnable_sink is not None:
        if learnable_sink.shape != (nheads,):
            raise ValueError(f"learnable_sink: expected shape ({nheads},), got {tuple(learnable_sink.shape)}")
        # The sink is one more logit per row with no value row; it keeps every row non-empty.
        sink = learnable_sink.to(cdtype).view(1, nheads, 1, 1).expand(batch, nheads, seqlen_q, 1)
        logits = torch.cat([scores, sink], dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        probs = torch.softmax(logits, dim=-1)[..., :seqlen_k]
    else:
        # Rows with no visible key would be softmax over all -inf (NaN). Give them finite logits,
        # then zero their results; masked_fill passes zero gradient back, so grads stay finite.
        empty = ~visible.any(dim=-1, keepdim=True)  # (seqlen_q, 1)
        logits = scores.masked_fill(empty, 0.0)
        probs = torch.softmax(logits, dim=-1).masked_fill(empty, 0.0)
        lse = torch.logsumexp(logits, dim=-1).masked_fill(empty.squeeze(-1), float("-inf"))

    weights = probs
    if dropout_mask is not None:
        if dropout_mask.dtype != torch.bool or dropout_mask.shape != probs.shape:
            raise ValueError(
                f"dropout_mask: expected bool of shape {tuple(probs.shape)}, "
                f"got {dropout_mask.dtype} of shape {tuple(dropout_mask.shape)}"
            )
        weights = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    out = torch.einsum("bhts,bshd->bthd", weights, vc)
    return out, lse, probs


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, *, seqused_k=None, dropout_mask=None, **kwargs):
    """Variable-length attention: attention_ref on each sequence of the packed batch.

    Arguments:
        q: (total_q, nheads, headdim)
        k: (total_k, nheads_k, headdim)
        v: (total_k, nheads_k, headdim_v)
        cu_seqlens_q, cu_seqlens_k: (batch_size + 1,) int32, starting at 0, non-decreasing.
        seqused_k: (batch_size,) int32 or None; sequence b uses only its first seqused_k[b] keys, and
            the bottom-right alignment uses that length.
        dropout_mask: None or a list of bool (nheads, seqlen_q_b, seqlen_k_b), one per sequence, where
            seqlen_k_b is the number of keys used.
        kwargs: the keyword options of attention_ref. alibi_slopes may be (batch_size, nheads).
    Returns:
        out: (total_q, nheads, headdim_v), in the compute dtype; rows past cu_seqlens_q[-1] are 0.
        lse: (nheads, total_q); -inf past cu_seqlens_q[-1].
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 3-dim tensor (total, nheads, headdim), got {got}")
    if "probs" in kwargs:
        raise TypeError("attention_varlen_ref: unexpected keyword argument 'probs'")
    cu_q = [int(x) for x in cu_seqlens_q.tolist()]
    cu_k = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cu_q) != len(cu_k) or len(cu_q) < 1:
        raise ValueError(
            f"cu_seqlens_q, cu_seqlens_k: expected equal lengths batch_size + 1 >= 1, got {len(cu_q)} and {len(cu_k)}"
        )
    for name, cu, total in (("cu_seqlens_q", cu_q, q.shape[0]), ("cu_seqlens_k", cu_k, k.shape[0])):
        if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])) or cu[-1] > total:
            raise ValueError(f"{name}: expected 0 = c0 <= c1 <= ... <= {total}, got {cu}")
    batch = len(cu_q) - 1
    if seqused_k is not None and tuple(seqused_k.shape) != (batch,):
        raise ValueError(f"seqused_k: expected shape ({batch},), got {tuple(seqused_k.shape)}")
    if dropout_mask is not None and len(dropout_mask) != batch:
        raise ValueError(f"dropout_mask: expected a list of {batch} masks, got {len(dropout_mask)}")
    alibi_slopes = kwargs.pop("alibi_slopes", None)

    outs, lses = [], []
    for b in range(batch):
        k_b = k[cu_k[b] : cu_k[b + 1]]
        v_b = v[cu_k[b] : cu_k[b + 1]]
        if seqused_k is not None:
            used = int(seqused_k[b])
            if not 0 <= used <= k_b.shape[0]:
                raise ValueError(f"seqused_k: expected 0 <= seqused_k[{b}] <= {k_b.shape[0]}, got {used}")
            k_b, v_b = k_b[:used], v_b[:used]
        slopes_b = alibi_slopes
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            slopes_b = alibi_slopes[b]
        mask_b = None if dropout_mask is None else dropout_mask[b].unsqueeze(0)
        out_b, lse_b, _ = attention_ref(
            q[cu_q[b] : cu_q[b + 1]].unsqueeze(0),
            k_b.unsqueeze(0),
            v_b.unsqueeze(0),
            alibi_slopes=slopes_b,
            dropout_mask=mask_b,
            **kwargs,
        )
        outs.append(out_b[0])
        lses.append(lse_b[0])

    # Tokens after the last sequence belong to no sequence: treat them as empty rows.
    cdtype = _compute_dtype(q.dtype, kwargs.get("upcast", True))
    tail = q.shape[0] - cu_q[-1]
    outs.append(q.new_zeros(tail, q.shape[1], v.shape[2], dtype=cdtype))
    lses.append(q.new_full((q.shape[1], tail), float("-inf"), dtype=cdtype))
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


# ----------------------------------------------------------------------------------------------------
# Rotary embedding
# ----------------------------------------------------------------------------------------------------


def apply_rotary_ref(x, cos, sin, seqlen_offsets=0, interleaved=False):
    """Rotary position embedding on the first rotary_dim features of x; the rest pass through.

    Arguments:
        x: (batch_size, seqlen, nheads, headdim)
        cos, sin: (seqlen_ro, rotary_dim / 2), rotary_dim <= headdim.
        seqlen_offsets: int or (batch_size,) int tensor; token t of row b uses row seqlen_offsets[b] + t.
        interleaved: GPT-J pairs (x0, x1), (x2, x3), ... if True, else GPT-NeoX halves
            (x[:rotary_dim/2], x[rotary_dim/2:rotary_dim]).
    Returns:
        (batch_size, seqlen, nheads, headdim) in x.dtype, computed in float32 (float64 for float64 x).
    """
    if x.dim() != 4:
        raise ValueError(f"x: expected (batch_size, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(
            f"cos, sin: expected equal shapes (seqlen_ro, rotary_dim / 2), "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    batch, seqlen, _, headdim = x.shape
    seqlen_ro, half = cos.shape
    rotary_dim = 2 * half
    if rotary_dim > headdim:
        raise ValueError(f"cos: rotary_dim = 2 * {half} exceeds headdim {headdim}")
    wdtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    if isinstance(seqlen_offsets, torch.Tensor):
        if tuple(seqlen_offsets.shape) != (batch,):
            raise ValueError(f"seqlen_offsets: expected an int or shape ({batch},), got {tuple(seqlen_offsets.shape)}")
        offsets = seqlen_offsets.to(device=x.device, dtype=torch.long).view(batch, 1)
    else:
        offsets = torch.full((batch, 1), int(seqlen_offsets), dtype=torch.long, device=x.device)
    pos = offsets + torch.arange(seqlen, device=x.device).view(1, seqlen)  # (batch, seqlen)
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= seqlen_ro):
        raise ValueError(
            f"seqlen_offsets: positions {int(pos.min())}..{int(pos.max())} fall outside the {seqlen_ro} rows of cos/sin"
        )
    c = cos.to(device=x.device, dtype=wdtype)[pos].unsqueeze(2)  # (batch, seqlen, 1, rotary_dim / 2)
    s = sin.to(device=x.device, dtype=wdtype)[pos].unsqueeze(2)

    xr = x[..., :rotary_dim].to(wdtype)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
    o1 = x1 * c - x2 * s
    o2 = x1 * s + x2 * c
    if interleaved:
        rotated = torch.stack([o1, o2], dim=-1).flatten(-2)
    else:
        rotated = torch.cat([o1, o2], dim=-1)
    return torch.cat([rotated.to(x.dtype), x[..., rotary_dim:]], dim=-1)


# ----------------------------------------------------------------------------------------------------
# KV cache (flash_attn_with_kvcache)
# ----------------------------------------------------------------------------------------------------


def _per_row(value, batch: int, default: int, name: str) -> list[int]:
    """None, an int or a (batch,) tensor, as one Python int per batch row."""
    if value is None:
        return [default] * batch
    if isinstance(value, torch.Tensor):
        if tuple(value.shape) != (batch,):
            raise ValueError(f"{name}: expected an int or shape ({batch},), got {tuple(value.shape)}")
        return [int(x) for x in value.tolist()]
    return [int(value)] * batch


def kvcache_ref(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    learnable_sink=None,
    upcast=True,
):
    """flash_attn_with_kvcache, plainly: append k/v to a copy of the cache, then attend.

    The inputs are not modified; the updated caches are returned as new tensors.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim)
        k_cache: (batch_size_cache, seqlen_cache, nheads_k, headdim), or paged
            (num_blocks, page_block_size, nheads_k, headdim) when block_table is given.
        v_cache: like k_cache with headdim_v.
        k, v: (batch_size, seqlen_new, nheads_k, headdim[_v]) or None; written at positions
            cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 (k rotated there first, if rotary).
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2) or None. q token t is rotated at position
            cache_seqlens[b] + t when causal or windowed, else every q token at cache_seqlens[b].
        cache_seqlens: None (the full cache length), int, or (batch_size,) int32: tokens already in
            the cache, counted from position 0 (left padding included).
        cache_batch_idx: (batch_size,) int or None; row b uses cache row cache_batch_idx[b] (dense only).
        cache_leftpad: (batch_size,) int or None; row b's valid keys start at cache_leftpad[b].
        block_table: (batch_size, max_num_blocks_per_seq) int32 or None; logical position p of row b
            lives in block block_table[b, p // page_block_size], slot p % page_block_size.
        softmax_scale, causal, window_size, softcap, alibi_slopes, learnable_sink, upcast: as in
            attention_ref; the keys of row b are positions [cache_leftpad[b], cache_seqlens[b] + seqlen_new).
    Returns:
        out: (batch_size, seqlen_q, nheads, headdim_v), in the compute dtype.
        lse: (batch_size, nheads, seqlen_q).
        k_cache_new, v_cache_new: copies of the caches with k, v written in.
    """
    if q.dim() != 4:
        raise ValueError(f"q: expected (batch_size, seqlen_q, nheads, headdim), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.dim() != 4 or k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(
            f"k_cache, v_cache: expected 4-dim caches agreeing on the first 3 dims, "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if (k is None) != (v is None):
        raise ValueError("k, v: expected both or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: expected both or neither")
    batch, seqlen_q, nheads, d = q.shape
    left, right = _normalise_window(causal, window_size)

    paged = block_table is not None
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx: not supported together with block_table (paged KV)")
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(
                f"block_table: expected shape ({batch}, max_num_blocks_per_seq), got {tuple(block_table.shape)}"
            )
        page_size = k_cache.shape[1]
        capacity = block_table.shape[1] * page_size
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None and k_cache.shape[0] < batch:
            raise ValueError(f"k_cache: expected at least {batch} rows (batch_size), got {k_cache.shape[0]}")
    rows = _per_row(cache_batch_idx, batch, 0, "cache_batch_idx") if cache_batch_idx is not None else None
    lens = _per_row(cache_seqlens, batch, capacity, "cache_seqlens")
    pads = _per_row(cache_leftpad, batch, 0, "cache_leftpad")
    seqlen_new = 0 if k is None else k.shape[1]

    def slots(b: int, start: int, stop: int):
        """Index into the cache for logical positions start..stop-1 of batch row b."""
        pos = torch.arange(start, stop, device=k_cache.device)
        if paged:
            return block_table[b].to(device=k_cache.device, dtype=torch.long)[pos // page_size], pos % page_size
        row = b if rows is None else rows[b]
        return torch.full_like(pos, row), pos

    for b in range(batch):
        if not 0 <= pads[b] <= lens[b] or lens[b] + seqlen_new > capacity:
            raise ValueError(
                f"cache_seqlens, cache_leftpad: row {b} needs 0 <= leftpad ({pads[b]}) <= cache_seqlens "
                f"({lens[b]}) and cache_seqlens + seqlen_new ({seqlen_new}) <= cache capacity ({capacity})"
            )

    offsets = torch.tensor(lens, dtype=torch.long, device=q.device)
    k_cache_new, v_cache_new = k_cache.clone(), v_cache.clone()
    if k is not None:
        k_new = k
        if rotary_cos is not None:
            k_new = apply_rotary_ref(k, rotary_cos, rotary_sin, offsets, interleaved=rotary_interleaved)
        for b in range(batch):
            index = slots(b, lens[b], lens[b] + seqlen_new)
            k_cache_new[index] = k_new[b].to(k_cache.dtype)
            v_cache_new[index] = v[b].to(v_cache.dtype)

    q_rot = q
    if rotary_cos is not None:
        if causal or left >= 0 or right >= 0:
            q_rot = apply_rotary_ref(q, rotary_cos, rotary_sin, offsets, interleaved=rotary_interleaved)
        else:
            # Every query token sits at the position of the first new token: fold seqlen_q into heads.
            flat = q.reshape(batch, 1, seqlen_q * nheads, d)
            q_rot = apply_rotary_ref(flat, rotary_cos, rotary_sin, offsets, interleaved=rotary_interleaved)
            q_rot = q_rot.reshape(q.shape)

    outs, lses = [], []
    for b in range(batch):
        index = slots(b, pads[b], lens[b] + seqlen_new)
        slopes_b = alibi_slopes
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            slopes_b = alibi_slopes[b]
        out_b, lse_b, _ = attention_ref(
            q_rot[b : b + 1],
            k_cache_new[index].unsqueeze(0),
            v_cache_new[index].unsqueeze(0),
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            alibi_slopes=slopes_b,
            learnable_sink=learnable_sink,
            upcast=upcast,
        )
        outs.append(out_b)
        lses.append(lse_b)
    if batch == 0:
        cdtype = _compute_dtype(q.dtype, upcast)
        return (
            q.new_zeros(0, seqlen_q, nheads, v_cache.shape[3], dtype=cdtype),
            q.new_zeros(0, nheads, seqlen_q, dtype=cdtype),
            k_cache_new,
            v_cache_new,
        )
    return torch.cat(outs, dim=0), torch.cat(lses, dim=0), k_cache_new, v_cache_new
