"""The dropout mask, defined once: Philox-4x32-10 on (seed, offset), as Triton's `tl.randint` draws it.

Element (b, h, i, j) of the attention matrix draws the 32-bit integer r = philox(seed, offset) with
    dense:  offset = ((b * nheads + h) * seqlen_q + i) * seqlen_k + j
    varlen: offset = (h * total_q + q_start + i) * total_k + k_start + j
and is kept iff r >= round(p * 2**32). The Triton kernels draw r with `tl.randint`; this module draws
the same r in plain PyTorch (int64 arithmetic), so the CPU path, S_dmask and tests rebuild the exact
mask the GPU used. The seed comes from PyTorch's default CPU generator, so `torch.manual_seed`
reproduces it, and the backward pass regenerates the mask from the saved seed.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def draw_seed() -> int:
    """A fresh 63-bit seed from PyTorch's default generator (a host op: no device sync)."""
    return int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64).item())


def keep_threshold(p: float) -> int:
    return min(int(round(p * 2**32)), 2**32 - 1)


def _mul_hi_lo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * x for a constant a < 2**32 and x in [0, 2**32), in int64
    without overflow: split both into 16-bit limbs."""
    a1, a0 = a >> 16, a & 0xFFFF
    x1, x0 = x >> 16, x & 0xFFFF
    low_part = a0 * x0 + ((a1 * x0 + a0 * x1) << 16)  # < 2**50
    hi = a1 * x1 + (low_part >> 32)
    return hi & _M32, low_part & _M32


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """uint32 values (held in int64) equal to triton.language.randint(seed, offsets)."""
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def keep_mask(seed: int, p: float, offsets: torch.Tensor) -> torch.Tensor:
    """Bool keep-mask for the given Philox offsets."""
    return philox_randint(seed, offsets) >= keep_threshold(p)


def block_keep(
    seed: int,
    p: float,
    bh: torch.Tensor,
    rows_total: int,
    row0: int,
    nrows: int,
    cols_total: int,
    col0: int,
    j0: int,
    j1: int,
) -> torch.Tensor:
    """Keep-mask (*bh.shape, nrows, j1 - j0) for rows 0..nrows-1 and keys j0..j1-1 of one sequence.
    bh holds each head's (batch * nheads + head) index (dense) or head index (varlen)."""
    rows = torch.arange(nrows, dtype=torch.int64) + row0
    cols = torch.arange(j0, j1, dtype=torch.int64) + col0
    offsets = (bh[..., None, None] * rows_total + rows[:, None]) * cols_total + cols
    return keep_mask(seed, p, offsets)
