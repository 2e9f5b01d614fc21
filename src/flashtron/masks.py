"""The sliding-window mask in PyTorch, written once: the reference, the CPU path, nn's padded fallback
and the benchmark's peers all build it here.

Bottom-right aligned, as flash_attn: query i (0-based) sees key j iff
    i + seqlen_k - seqlen_q - window_left <= j <= i + seqlen_k - seqlen_q + window_right,
with -1 meaning that side is unbounded (causal is window_right = 0).
"""

from __future__ import annotations

import torch


def diagonal_offsets(seqlen_q: int, seqlen_k: int, rows=None, cols=None, device=None) -> torch.Tensor:
    """rel[i, j] = j - (i + seqlen_k - seqlen_q): key j's offset from query i's diagonal, for query rows
    `rows` and key columns `cols` (1-D index tensors; default every row / column)."""
    rows = torch.arange(seqlen_q, device=device) if rows is None else rows
    cols = torch.arange(seqlen_k, device=device) if cols is None else cols
    return cols[None, :] - (rows[:, None] + (seqlen_k - seqlen_q))


def hidden_by_window(rel: torch.Tensor, window_left: int, window_right: int) -> torch.Tensor | None:
    """True where the window hides the key from the query, given diagonal_offsets; None when neither side
    is bounded (nothing hidden)."""
    hidden = None
    if window_left >= 0:
        hidden = rel < -window_left
    if window_right >= 0:
        right = rel > window_right
        hidden = right if hidden is None else hidden | right
    return hidden


def window_mask(seqlen_q: int, seqlen_k: int, window_left: int, window_right: int, device=None) -> torch.Tensor:
    """(seqlen_q, seqlen_k) bool, True where query i may attend key j (all True without a window)."""
    hidden = hidden_by_window(diagonal_offsets(seqlen_q, seqlen_k, device=device), window_left, window_right)
    if hidden is None:
        return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    return ~hidden
