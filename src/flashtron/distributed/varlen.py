"""Context parallelism for packed (varlen) batches: all-gather K/V, then attend locally (Llama 3's way).

Each rank holds a contiguous 1/world slice [t0, t1) of the packed query tokens (and of the keys).
K and V are all-gathered (differentiable: their gradient is a reduce-scatter), and each rank runs
flash_attn_varlen_func for its own queries against the keys their sequences need. Sequences of
different lengths break the ring's block arithmetic (one window per call, one offset per sequence);
here every sequence of the slice keeps the whole of its keys and only the positions need care.

A query slice covers the tail [qs, Lq) of the sequence it starts in, whole sequences, and the head
[qs, qe) of the one it ends in (any of these may be missing). With bottom-right alignment, a call
whose queries are rows [qs, qe) of a sequence and whose keys are rows [0, k_hi) of it reproduces the
global window (left, right) with the window

    left' = left + k_hi - qe - shift,   right' = right + qe + shift - k_hi      (shift = Lk - Lq).

For every sequence that ends inside the slice (qe = Lq, k_hi = Lk) that is the window itself, so
they share one call. Only the last sequence may continue past t1; it gets its own call with keys cut
at k_hi = min(Lk, qe + shift + right) (the keys it can see), which keeps right' >= 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from flashtron.api import flash_attn_varlen_func


class VarlenCall(NamedTuple):
    """One flash_attn_varlen_func call: local query rows [q0, q1), gathered key rows [k0, k1), the
    sequences' cu_seqlens inside those ranges, and the window."""

    q0: int
    q1: int
    k0: int
    k1: int
    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    window_left: int
    window_right: int


def _window(left, right, qe, k_hi, shift):
    new_left = -1 if left < 0 else left + k_hi - qe - shift
    # right' < 0 only when no key is visible (k_hi = 0), where any window gives the same
    new_right = -1 if right < 0 else max(0, right + qe + shift - k_hi)
    return new_left, new_right


def plan(cu_q, cu_k, t0, t1, window_left, window_right) -> list[VarlenCall]:
    """The calls for query tokens [t0, t1) of a packed batch with global cu_seqlens cu_q, cu_k (lists)."""
    whole, tail = [], None  # (b, qs, qe, k_hi) per sequence with queries in the slice
    for b in range(len(cu_q) - 1):
        lo, hi = max(cu_q[b], t0), min(cu_q[b + 1], t1)
        if lo >= hi:
            continue
        qs, qe, len_q, len_k = lo - cu_q[b], hi - cu_q[b], cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        shift = len_k - len_q
        if qe == len_q:
            whole.append((b, qs, qe, len_k))
        else:
            k_hi = len_k if window_right < 0 else min(len_k, max(0, qe + shift + window_right))
            tail = (b, qs, qe, k_hi)
    calls = []
    if whole:
        first, last = whole[0][0], whole[-1][0]
        q0, q1 = max(cu_q[first], t0) - t0, cu_q[last + 1] - t0
        # the sequences in between with no queries (empty ones) come along: they add no rows
        cu_call_q = tuple(max(cu_q[b], t0) - t0 - q0 for b in range(first, last + 2))
        cu_call_k = tuple(cu_k[b] - cu_k[first] for b in range(first, last + 2))
        calls.append(VarlenCall(q0, q1, cu_k[first], cu_k[last + 1], cu_call_q, cu_call_k, window_left, window_right))
    if tail is not None:
        b, qs, qe, k_hi = tail
        left, right = _window(window_left, window_right, qe, k_hi, (cu_k[b + 1] - cu_k[b]) - (cu_q[b + 1] - cu_q[b]))
        q0 = max(cu_q[b], t0) - t0
        calls.append(VarlenCall(q0, t1 - t0, cu_k[b], cu_k[b] + k_hi, (0, qe - qs), (0, k_hi), left, right))
    return calls


def attention(q, k_all, v_all, cu_q, cu_k, t0, t1, window, **kwargs):
    """Differentiable attention of local queries q: (t1 - t0, nheads, headdim) against the gathered
    k_all, v_all: (total_k, nheads_k, headdim[_v]). Returns (out, lse) for the local rows:
    out (t1 - t0, nheads, headdim_v), lse (nheads, t1 - t0)."""
    outs, lses = [], []
    for c in plan(cu_q, cu_k, t0, t1, *window):
        device = q.device
        cu_call_q = torch.tensor(c.cu_q, dtype=torch.int32, device=device)
        cu_call_k = torch.tensor(c.cu_k, dtype=torch.int32, device=device)
        max_q = max(b - a for a, b in zip(c.cu_q, c.cu_q[1:]))
        max_k = max(b - a for a, b in zip(c.cu_k, c.cu_k[1:]))
        out, lse = flash_attn_varlen_func(
            q[c.q0 : c.q1], k_all[c.k0 : c.k1], v_all[c.k0 : c.k1], cu_call_q, cu_call_k, max_q, max_k,
            window_size=(c.window_left, c.window_right), return_lse=True, **kwargs,
        )  # fmt: skip
        outs.append(out)
        lses.append(lse)
    if not outs:  # no local tokens
        out = q.new_zeros((0, q.shape[1], v_all.shape[-1]))
        return out, torch.zeros((q.shape[1], 0), dtype=torch.float32, device=q.device)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)
