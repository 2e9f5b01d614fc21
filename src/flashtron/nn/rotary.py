"""Rotary position embedding as a module: cached cos/sin tables and `flashtron.ops.apply_rotary_emb`.

The tables are computed in fp32 (positions times inverse frequencies), grown when a longer sequence
comes, and cast once per dtype. They are plain attributes, not buffers, so `module.to(bfloat16)`
never rounds the frequencies; they follow the device of the tensors they are asked for.
"""

from __future__ import annotations

import torch

from flashtron.ops import apply_rotary_emb


class RotaryEmbedding(torch.nn.Module):
    """RoPE over the first `dim` features of each head.

    dim: the rotary dim (even, <= headdim). base: theta of the inverse frequencies
    base ** (-2i / dim). interleaved: rotate GPT-J pairs (x0, x1), (x2, x3)... instead of GPT-NeoX
    halves (x_i, x_{i + dim/2}).
    """

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False, device=None):
        super().__init__()
        if not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be an even int >= 2, got {dim!r}")
        if not base > 0:
            raise ValueError(f"RotaryEmbedding: base must be > 0, got {base!r}")
        self.dim, self.base, self.interleaved = dim, float(base), bool(interleaved)
        self._tables = None  # fp32 (cos, sin), each (seqlen_cached, dim / 2)
        self._cast = {}  # dtype -> (cos, sin) cast from self._tables

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}"

    def cos_sin(self, seqlen: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin): (seqlen_ro, dim / 2) with seqlen_ro >= seqlen, in dtype, on device.

        Grows the tables to the next power of two, so decoding does not recompute them each step.
        Under torch.compile the tables are computed for exactly seqlen and not cached: rounding a
        symbolic seqlen up would pin it to one value, and one graph must serve every seqlen.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        if torch.compiler.is_compiling():
            cos, sin = self._compute(seqlen, device)
            return cos.to(dtype), sin.to(dtype)
        tables = self._tables
        if tables is None or tables[0].shape[0] < seqlen or tables[0].device != device:
            self._tables, self._cast = self._compute(max(16, 1 << max(int(seqlen) - 1, 0).bit_length()), device), {}
        if dtype not in self._cast:
            cos, sin = self._tables
            self._cast[dtype] = (cos.to(dtype), sin.to(dtype))
        return self._cast[dtype]

    def _compute(self, n, device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (cos, sin) of positions 0 .. n - 1, each (n, dim / 2)."""
        inv_freq = self.base ** -(torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim)
        freqs = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv_freq)
        return freqs.cos(), freqs.sin()

    def forward(self, q, k, seqlen_offset: int = 0, cu_seqlens=None, max_seqlen=None, positions=None):
        """Rotates q and k at their positions; returns (q, k), new tensors.

        q: (batch_size, seqlen, nheads, headdim), k: (batch_size, seqlen, nheads_k, headdim); or
        (total_seqlen, nheads, headdim) with cu_seqlens (batch_size + 1,) int32 and max_seqlen (int),
        positions restarting at 0 in each sequence. seqlen_offset: int, the position of the first
        token. (Decoding at per-row positions goes through flash_attn_with_kvcache and cos_sin.)
        positions: (seqlen,) int64, the position of each token of dense q and k, all below
        max_seqlen (a context-parallel shard's, flashtron.distributed.shard_positions).
        """
        if isinstance(seqlen_offset, bool) or not isinstance(seqlen_offset, int):
            raise TypeError(f"RotaryEmbedding: seqlen_offset must be an int, got {type(seqlen_offset).__name__}")
        if positions is not None:
            if cu_seqlens is not None or max_seqlen is None:
                raise ValueError("RotaryEmbedding: positions needs max_seqlen (their bound) and no cu_seqlens")
            cos, sin = self.cos_sin(max_seqlen, q.device)
            cos, sin = cos[positions], sin[positions]  # one row per token, in order: offset 0
            return tuple(apply_rotary_emb(t, cos, sin, interleaved=self.interleaved) for t in (q, k))
        seqlen = max_seqlen if cu_seqlens is not None else q.shape[1]
        cos, sin = self.cos_sin(seqlen_offset + seqlen, q.device)
        kw = dict(
            interleaved=self.interleaved, seqlen_offsets=seqlen_offset, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
        )
        return apply_rotary_emb(q, cos, sin, **kw), apply_rotary_emb(k, cos, sin, **kw)
