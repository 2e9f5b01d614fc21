"""Multi-head attention (MHA / GQA / MQA) on flashtron's public functions, and its KV cache.

Training and prefill without a cache go through `flash_attn_func` (dense), `flash_attn_varlen_func`
(packed sequences, or padded batches unpadded with `unpad_input`); inference with a `KVCache` goes
through `flash_attn_with_kvcache`, which appends the new keys and values in place and applies the
rotary embedding itself, without host syncs (so a decode step can be captured in a CUDA graph).

For comparisons, the dense path can run two other backends inside the same module
(`MHA.backend`): "sdpa" (torch's scaled_dot_product_attention) and "standard" (the scores
materialised in fp32). Both follow flash_attn's bottom-right aligned causal and window masks.

With `MHA.context_parallel` set to a `ContextParallel(group, layout)`, x is this rank's shard of the
sequence (flashtron.distributed.shard_sequence); rotary uses the shard's global positions and
attention runs as ring_flash_attn_func over the group.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from flashtron import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, pad_input, unpad_input
from flashtron.masks import window_mask
from flashtron.nn.rotary import RotaryEmbedding

ATTENTION_BACKENDS = ("flashtron", "sdpa", "standard")


class ContextParallel(NamedTuple):
    """Where a sequence-sharded layer's tokens live: a torch.distributed group (None: the default
    group) and the shard layout ("zigzag" or "contiguous", flashtron.distributed.shard_sequence)."""

    group: object = None
    layout: str = "zigzag"

    def world(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size(self.group)

    def positions(self, seqlen_local: int, device):
        """(seqlen_local,) int64 global positions of this rank's tokens."""
        from flashtron.distributed import shard_positions

        return shard_positions(seqlen_local * self.world(), self.group, self.layout, device=device)


class KVCache(torch.nn.Module):
    """Preallocated keys and values of a stack of attention layers (gpt-fast style).

    k_cache: (num_layers, batch_size, max_seqlen, nheads_k, headdim); v_cache likewise with
    headdim_v. The MHA with layer_idx=i appends to and reads k_cache[i], v_cache[i].
    cache_seqlens: (batch_size,) int32, the filled length of every row, shared by all layers: the
    model calls `advance(seqlen)` once per step, after every layer has appended (an in-place add on
    the device, no host sync).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_seqlen: int,
        num_heads_kv: int,
        head_dim: int,
        head_dim_v: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("max_seqlen", max_seqlen)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        shape = (num_layers, batch_size, max_seqlen, num_heads_kv)
        self.register_buffer("k_cache", torch.zeros(*shape, head_dim, device=device, dtype=dtype), persistent=False)
        self.register_buffer(
            "v_cache", torch.zeros(*shape, head_dim_v or head_dim, device=device, dtype=dtype), persistent=False
        )
        self.register_buffer(
            "cache_seqlens", torch.zeros(batch_size, dtype=torch.int32, device=device), persistent=False
        )

    @property
    def max_seqlen(self) -> int:
        return self.k_cache.shape[2]

    def advance(self, seqlen: int) -> None:
        """Marks `seqlen` more tokens of every row as filled."""
        self.cache_seqlens.add_(seqlen)

    def reset(self) -> None:
        self.cache_seqlens.zero_()


def _window_mask(seqlen_q, seqlen_k, causal, window_size, device):
    """(seqlen_q, seqlen_k) bool, True where query i may see key j (bottom-right aligned), or None."""
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    return window_mask(seqlen_q, seqlen_k, left, right, device)


def attention(q, k, v, backend="flashtron", dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
    """Dense attention by `backend`. q: (batch_size, seqlen_q, nheads, headdim); k, v:
    (batch_size, seqlen_k, nheads_k, headdim). Returns (batch_size, seqlen_q, nheads, headdim_v)."""
    if backend == "flashtron":
        return flash_attn_func(
            q, k, v, dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size)
        )
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention: backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    group = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch_size, nheads, seqlen, headdim)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    sq, sk = q.shape[2], k.shape[2]
    keep = _window_mask(sq, sk, causal, window_size, q.device)
    if backend == "sdpa":
        # SDPA's is_causal is top-left aligned: use it only where that is the same thing (sq == sk)
        plain_causal = causal and sq == sk and window_size[0] < 0
        out = F.scaled_dot_product_attention(
            q, k, v, None if plain_causal else keep, dropout_p, is_causal=plain_causal, scale=scale
        )
    else:
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (b, h, sq, sk), materialised
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see nothing give 0, as flash_attn
        out = torch.matmul(F.dropout(probs, dropout_p), v.float()).to(q.dtype)
    return out.transpose(1, 2)


class MHA(torch.nn.Module):
    """Multi-head self- or cross-attention with GQA/MQA, rotary, causal and sliding-window masks.

    embed_dim = num_heads * headdim. num_heads_kv: key/value heads (default num_heads), dividing
    num_heads. cross_attn: queries from x, keys/values from x_kv (separate Wq and Wkv projections;
    self-attention uses one Wqkv). softmax_scale: default 1 / sqrt(headdim). causal and
    window_size=(left, right): as flash_attn_func (bottom-right aligned). rotary_emb_dim > 0 rotates
    the first rotary_emb_dim features of q and k (self-attention only). layer_idx: this layer's slot
    in a KVCache.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_heads_kv: int | None = None,
        cross_attn: bool = False,
        qkv_proj_bias: bool = True,
        out_proj_bias: bool = True,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        causal: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        rotary_emb_dim: int = 0,
        rotary_emb_base: float = 10000.0,
        rotary_emb_interleaved: bool = False,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"MHA: embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        if num_heads_kv < 1 or num_heads % num_heads_kv:
            raise ValueError(f"MHA: num_heads_kv must divide num_heads = {num_heads}, got {num_heads_kv}")
        self.head_dim = embed_dim // num_heads
        if rotary_emb_dim and cross_attn:
            raise ValueError(f"MHA: rotary_emb_dim must be 0 with cross_attn=True, got {rotary_emb_dim}")
        if not 0 <= rotary_emb_dim <= self.head_dim:
            raise ValueError(f"MHA: rotary_emb_dim must be in [0, headdim = {self.head_dim}], got {rotary_emb_dim}")
        self.embed_dim, self.num_heads, self.num_heads_kv = embed_dim, num_heads, num_heads_kv
        self.cross_attn, self.causal, self.window_size = cross_attn, causal, tuple(window_size)
        self.dropout, self.softmax_scale, self.layer_idx = dropout, softmax_scale, layer_idx
        self.backend = "flashtron"
        self.context_parallel: ContextParallel | None = None
        kv_dim = num_heads_kv * self.head_dim
        factory = dict(device=device, dtype=dtype)
        if cross_attn:
            self.Wq = torch.nn.Linear(embed_dim, embed_dim, bias=qkv_proj_bias, **factory)
            self.Wkv = torch.nn.Linear(embed_dim, 2 * kv_dim, bias=qkv_proj_bias, **factory)
        else:
            self.Wqkv = torch.nn.Linear(embed_dim, embed_dim + 2 * kv_dim, bias=qkv_proj_bias, **factory)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=out_proj_bias, **factory)
        self.rotary_emb = None
        if rotary_emb_dim > 0:
            self.rotary_emb = RotaryEmbedding(rotary_emb_dim, rotary_emb_base, rotary_emb_interleaved, device=device)

    def _qkv(self, x, x_kv):
        """Projections as views (..., nheads, headdim); stride(-1) == 1 is all flashtron needs."""
        h, hk, d = self.num_heads, self.num_heads_kv, self.head_dim
        if self.cross_attn:
            if x_kv is None:
                raise ValueError("MHA: cross_attn=True needs x_kv (batch_size, seqlen_k, embed_dim), got None")
            q = self.Wq(x).unflatten(-1, (h, d))
            k, v = self.Wkv(x_kv).unflatten(-1, (2 * hk, d)).split([hk, hk], dim=-2)
            return q, k, v
        if x_kv is not None:
            raise ValueError("MHA: x_kv is only for cross_attn=True")
        return self.Wqkv(x).unflatten(-1, (h + 2 * hk, d)).split([h, hk, hk], dim=-2)

    def forward(self, x, x_kv=None, key_padding_mask=None, cu_seqlens=None, max_seqlen=None, kv_cache=None):
        """x: (batch_size, seqlen, embed_dim), or (total_seqlen, embed_dim) with cu_seqlens
        (batch_size + 1,) int32 and max_seqlen (int). x_kv: (batch_size, seqlen_k, embed_dim) for
        cross-attention. key_padding_mask: (batch_size, seqlen_k) bool, True for real tokens (rotary
        positions count the padding). kv_cache: a KVCache to append to and attend over (causal
        self-attention, inference). Returns like x."""
        if kv_cache is not None:
            return self._forward_cached(x, kv_cache)
        if self.context_parallel is not None:
            return self._forward_sharded(x, x_kv, key_padding_mask, cu_seqlens)
        q, k, v = self._qkv(x, x_kv)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(q, k, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        kw = self._attention_kwargs()
        if cu_seqlens is not None:
            if self.cross_attn:
                raise ValueError("MHA: cu_seqlens is for self-attention; cross_attn takes key_padding_mask")
            out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)
        elif key_padding_mask is not None:
            out = self._padded(q, k, v, key_padding_mask, kw)
        else:
            out = attention(q, k, v, self.backend, **kw)
        return self.out_proj(out.flatten(-2))

    def _attention_kwargs(self):
        return dict(
            dropout_p=self.dropout if self.training else 0.0,
            softmax_scale=self.softmax_scale,
            causal=self.causal,
            window_size=self.window_size,
        )

    def _forward_sharded(self, x, x_kv, key_padding_mask, cu_seqlens):
        """x: (batch_size, seqlen / world, embed_dim), this rank's shard: ring attention over the group."""
        from flashtron.distributed import ring_flash_attn_func

        cp = self.context_parallel
        if x_kv is not None or key_padding_mask is not None or cu_seqlens is not None:
            raise ValueError("MHA: context_parallel takes dense self-attention only (no x_kv, mask or cu_seqlens)")
        q, k, v = self._qkv(x, None)
        if self.rotary_emb is not None:
            seqlen = x.shape[1] * cp.world()
            q, k = self.rotary_emb(q, k, max_seqlen=seqlen, positions=cp.positions(x.shape[1], x.device))
        out = ring_flash_attn_func(q, k, v, **self._attention_kwargs(), group=cp.group, layout=cp.layout)
        return self.out_proj(out.flatten(-2))

    def _padded(self, q, k, v, key_padding_mask, kw):
        """Unpad, run varlen attention, pad back. Self-attention drops padded queries too."""
        batch, seqlen_q = q.shape[:2]
        k_unpad, indices_k, cu_k, max_k, _ = unpad_input(k, key_padding_mask)
        v_unpad = v.flatten(0, 1)[indices_k]
        if self.cross_attn:
            cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * seqlen_q
            out = flash_attn_varlen_func(q.flatten(0, 1), k_unpad, v_unpad, cu_q, cu_k, seqlen_q, max_k, **kw)
            return out.unflatten(0, (batch, seqlen_q))
        out = flash_attn_varlen_func(q.flatten(0, 1)[indices_k], k_unpad, v_unpad, cu_k, cu_k, max_k, max_k, **kw)
        return pad_input(out, indices_k, batch, seqlen_q)

    def _forward_cached(self, x, kv_cache: KVCache):
        """x: (batch_size, seqlen_new, embed_dim): appended at kv_cache.cache_seqlens, rotated there."""
        if self.cross_attn:
            raise ValueError("MHA: kv_cache is for self-attention, got cross_attn=True")
        if self.layer_idx is None:
            raise ValueError("MHA: layer_idx must be set to use a kv_cache, got None")
        q, k, v = self._qkv(x, None)
        rotary = {}
        if self.rotary_emb is not None:
            cos, sin = self.rotary_emb.cos_sin(kv_cache.max_seqlen, q.device, q.dtype)
            rotary = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=self.rotary_emb.interleaved)
        out = flash_attn_with_kvcache(
            q,
            kv_cache.k_cache[self.layer_idx],
            kv_cache.v_cache[self.layer_idx],
            k=k,
            v=v,
            cache_seqlens=kv_cache.cache_seqlens,
            softmax_scale=self.softmax_scale,
            causal=self.causal,
            window_size=self.window_size,
            **rotary,
        )
        return self.out_proj(out.flatten(-2))
