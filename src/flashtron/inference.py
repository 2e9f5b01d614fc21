"""Inference: attention over a KV cache (flash_attn_with_kvcache) and the merge of split results.

`kvcache_attention` first writes the new k/v into the cache in place (k rotated at its absolute
positions when rotary tables are given), then attends q (rotated the same way) over each batch row's
valid keys, cache positions [cache_leftpad[b], cache_seqlens[b] + seqlen_new), bottom-right aligned.

CUDA tensors, and CPU tensors under TRITON_INTERPRET=1, run three Triton kernels: the append
(kernels/decode.py), the split-KV decode with a GQA group's query heads packed into one tile
(kernels/decode.py), and the combine (kernels/combine.py), skipped when there is one split. That path
never synchronises with the host, so a decode step can be captured in a CUDA graph: the split count
comes from shapes, the cache capacity and the SM count only. Other CPU tensors take plain PyTorch:
the same append, then the exact CPU attention (cpu.py): dense caches are read in place, row slices
of the cache, and paged caches are gathered first.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import torch

from flashtron import checks, cpu
from flashtron.configs import is_hopper
from flashtron.env import uses_triton
from flashtron.options import OPTION_FIELDS, AttnOptions, options_from_args, options_schema, options_to_args
from flashtron.outputs import new_output

# triton, the kernels and launch.py are imported inside the Triton-path functions, at call time, so
# that the CPU path works where triton is not installed (it is a Linux-only dependency).

__all__ = ["kvcache_attention", "combine", "choose_num_splits"]


# ----------------------------------------------------------------------------------------------------
# Configs (data) and the split heuristic
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_m: int  # largest tile of packed rows (seqlen_q * group); smaller problems take a power of 2 >= 16
    block_n: int
    num_warps: int
    num_stages: int
    min_blocks_per_split: int  # a split shorter than this costs more in combine than it gains

    def stages(self, paged: bool) -> int:
        """Pipeline stages to launch with; `paged`: a paged call on Hopper. Triton's pipeliner runs a
        paged loop's block-table load ahead of the K/V loads that depend on it, and gives those loads
        floor((s - 1) / 2) buffers at s stages where a dense loop gets s - 1: sm_90 compiles of
        (16, 128, 4 warps) take 74 KB of shared memory paged at 3 and 4 stages, 140 KB at 5 and 6,
        against 139 KB dense at 3 (scripts/aot_report.py decode, 2026-12-01). Paged calls therefore
        launch with 2 s - 1 stages: the dense loop's buffering and shared memory, so every tile that
        fits dense fits paged. Seen on sm_90 only; other archs keep s."""
        return 2 * self.num_stages - 1 if paged else self.num_stages


# Hopper and others, by head-dim bucket, 16-bit inputs. d128 measured on one H200, 2026-12-01
# (scripts/tune.py: decode b=8, 32/8 heads, bf16, CUDA-graph replays, 5 tiles x 7 split counts):
# BLOCK_N 128 with 4 warps and 3 stages was best at 1k, 8k and 32k keys: 21.9 us at 1k with one split
# (2 splits 24.4 us: the combine costs more than the split gains), 82.4 us at 8k and 261.6 us at 32k
# with 2 splits, against 23.2 / 83.2 / 272.2 us for the old (64, 64, 4, 3). min_blocks_per_split 8
# keeps 1k (8 blocks) in one split. The other buckets keep the tile's K/V stages near the same
# shared memory (not yet measured).
GPU_DECODE = {
    64: DecodeConfig(64, 64, 4, 3, 4),
    128: DecodeConfig(64, 128, 4, 3, 8),
    256: DecodeConfig(32, 32, 4, 3, 8),
    512: DecodeConfig(16, 16, 4, 2, 16),
}
# fp32 K/V tiles take twice the shared memory: (64, 128, 4, 3) would need ~420 KB.
GPU_DECODE_FP32 = {
    64: DecodeConfig(64, 64, 4, 2, 4),
    128: DecodeConfig(64, 64, 4, 2, 4),
    256: DecodeConfig(32, 32, 4, 2, 8),
    512: DecodeConfig(16, 16, 4, 2, 16),
}
# Interpreter: tiny blocks so that small tests stream several KV blocks and several splits.
INTERPRET_DECODE = DecodeConfig(16, 16, 1, 1, 1)
# Split counts whose waves are at least this fraction as full as the best count's are good enough;
# the smallest of them wins. Measured by a helper on an H100 80GB, 2026-11-22 (docs/perf-notes.md,
# "Decode"): with 64 (batch, kv head) tiles on 132 SMs, 2 splits (one program per SM) beat 3
# (unbalanced) by 10% and 8-24 splits by 15-40% (measured before the combine loaded all splits at
# once; to re-measure).
WAVE_EFFICIENCY = 0.85
MAX_SPLITS = 64
INTERPRET_SMS = 16  # a pretend SM count, so that num_splits=0 splits in interpreter tests too


def _decode_config(device: torch.device, dtype: torch.dtype, head_dim: int) -> DecodeConfig:
    if device.type != "cuda":
        return INTERPRET_DECODE
    table = GPU_DECODE_FP32 if dtype == torch.float32 else GPU_DECODE
    for bucket in (64, 128, 256, 512):
        if head_dim <= bucket:
            return table[bucket]
    raise ValueError(f"head dim {head_dim} is above the largest supported (512)")


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_splits(num_splits: int, tiles: int, kv_blocks: int, num_sms: int, min_blocks_per_split: int) -> int:
    """The split count: num_splits itself when > 0. For 0, FlashAttention-2's rule: among the counts
    that leave each split at least min_blocks_per_split KV blocks of the cache capacity (a static
    bound on the keys, never their actual count), the smallest whose last wave of tiles * splits
    programs over num_sms is nearly as full (WAVE_EFFICIENCY) as the best count's. No split when the
    tiles alone nearly fill the machine."""
    if num_splits > 0:
        return num_splits
    if tiles >= 0.8 * num_sms:
        return 1
    most = max(1, min(kv_blocks // min_blocks_per_split, MAX_SPLITS))

    def efficiency(splits: int) -> float:
        waves = tiles * splits / num_sms
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if efficiency(s) >= WAVE_EFFICIENCY * best)


# ----------------------------------------------------------------------------------------------------
# Cache layout
# ----------------------------------------------------------------------------------------------------


class _Cache(NamedTuple):
    paged: bool
    page_size: int  # 0 when dense
    capacity: int  # positions a batch row can hold


def _cache_layout(k_cache: torch.Tensor, block_table) -> _Cache:
    if block_table is not None:
        return _Cache(True, k_cache.shape[1], block_table.shape[1] * k_cache.shape[1])
    return _Cache(False, 0, k_cache.shape[1])


def kvcache_attention(q, k_cache, v_cache, opts: AttnOptions, *, rotary_interleaved=True, num_splits=0, **cache_args):
    """flash_attn_with_kvcache below the API (arguments already checked): _kvcache_attention's contract
    (below), through the flashtron::kvcache_attn library op while torch.compile traces. Eager calls
    skip the op dispatcher (its host cost, docs/perf-notes.md, 2026-12-02)."""
    if torch.compiler.is_compiling():
        return kvcache_attn(
            q, k_cache, v_cache, *(cache_args.get(name) for name in _CACHE_ARGS), *options_to_args(opts),
            rotary_interleaved, num_splits,
        )  # fmt: skip
    return _kvcache_attention(
        q, k_cache, v_cache, opts, rotary_interleaved=rotary_interleaved, num_splits=num_splits, **cache_args
    )


def _kvcache_attention(
    q,
    k_cache,
    v_cache,
    opts: AttnOptions,
    *,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    rotary_interleaved=True,
    num_splits=0,
):
    """flash_attn_with_kvcache below the API (arguments already checked).

    q: (batch_size, seqlen_q, nheads, headdim). k_cache, v_cache: (batch_size_cache, seqlen_cache,
    nheads_k, headdim[_v]), or (num_blocks, page_block_size, nheads_k, headdim[_v]) with block_table
    (batch_size, max_num_blocks_per_seq) int32. k, v: (batch_size, seqlen_new, nheads_k, headdim[_v])
    or None, appended in place. rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2) or None.
    cache_seqlens, cache_batch_idx, cache_leftpad: (batch_size,) int32 or None (cache_seqlens None:
    the whole capacity). num_splits: 0 heuristic, n > 0 exactly n (ignored by the exact CPU path).
    Returns out: (batch_size, seqlen_q, nheads, headdim_v) in q.dtype and lse: (batch_size, nheads,
    seqlen_q) fp32, natural log; a row with nothing to attend to has out 0 and lse -inf (the sink
    logit with a learnable_sink).
    """
    if opts.dropout_p > 0:
        raise NotImplementedError("flash_attn_with_kvcache: dropout_p > 0 is not supported")
    if checks.reads_values(q, paged=block_table is not None):  # before anything is written into the caches
        checks.check_kvcache_values(
            "flash_attn_with_kvcache",
            q,
            k_cache,
            cache_seqlens=cache_seqlens,
            seqlen_new=0 if k is None else k.shape[1],
            cache_batch_idx=cache_batch_idx,
            cache_leftpad=cache_leftpad,
            block_table=block_table,
        )
    args = dict(
        k=k,
        v=v,
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens,
        cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
        block_table=block_table,
        rotary_interleaved=rotary_interleaved,
    )
    cache = _cache_layout(k_cache, block_table)
    if uses_triton(q):
        return _kvcache_triton(q, k_cache, v_cache, opts, cache, num_splits=num_splits, **args)
    return _kvcache_cpu(q, k_cache, v_cache, opts, cache, **args)


def combine(out_partial, lse_partial, out=None, out_dtype=None):
    """flash_attn_combine below the API: _combine's contract (below), through the flashtron::combine
    library op while torch.compile traces (a given `out` is copied into)."""
    if torch.compiler.is_compiling():
        out_dtype = out_dtype or (out.dtype if out is not None else out_partial.dtype)
        result, lse = combine_op(out_partial, lse_partial, out_dtype)
        return (result if out is None else out.copy_(result)), lse
    return _combine(out_partial, lse_partial, out=out, out_dtype=out_dtype)


def _combine(out_partial, lse_partial, out=None, out_dtype=None):
    """Merges split results, FlashAttention-3's flash_attn_combine.

    out_partial: (num_splits, batch_size, seqlen, nheads, headdim) fp32; lse_partial: (num_splits,
    batch_size, seqlen, nheads) fp32, natural log; out: (batch_size, seqlen, nheads, headdim) of
    out_dtype (default out_partial's dtype) or None. Returns (out, lse): lse (batch_size, seqlen,
    nheads) fp32; rows where every split has lse -inf get out 0 and lse -inf.
    """
    out_dtype = out_dtype or (out.dtype if out is not None else out_partial.dtype)
    if uses_triton(out_partial):
        if out is None:
            out = new_output(out_partial.shape[1:], out_dtype, out_partial.device)
        lse = new_output(lse_partial.shape[1:], torch.float32, out_partial.device)
        _launch_combine(out_partial, lse_partial, out, lse, None)
        return out, lse
    if out is None:
        out = torch.empty(out_partial.shape[1:], dtype=out_dtype)
    if out_partial.shape[0] == 0:
        return out.zero_(), torch.full(lse_partial.shape[1:], float("-inf"))
    total = torch.logsumexp(lse_partial, dim=0)  # -inf where every split is -inf
    weight = torch.exp(lse_partial - total.masked_fill(torch.isneginf(total), 0.0))
    terms = out_partial.masked_fill(torch.isneginf(lse_partial)[..., None], 0.0) * weight[..., None]
    out.copy_(terms.sum(dim=0))
    return out, total.float()


# ----------------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------------


def _kvcache_triton(
    q,
    k_cache,
    v_cache,
    opts,
    cache,
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
    num_splits,
):
    import triton

    # these import triton: only where the Triton kernels run
    from flashtron.kernels.decode import append_kv_kernel, decode_kernel
    from flashtron.launch import alibi_strides, score_args

    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_k, head_dim_v = k_cache.shape[2], v_cache.shape[3]
    if cache_seqlens is None:
        cache_seqlens = torch.full((batch,), cache.capacity, dtype=torch.int32, device=q.device)
    seqlen_new = 0 if k is None else k.shape[1]
    has_rotary = rotary_cos is not None
    # Dummy pointers for absent optional tensors: never read, the constexpr flags say so.
    cos = rotary_cos if has_rotary else cache_seqlens
    sin = rotary_sin if has_rotary else cache_seqlens
    rotary = dict(
        stride_cos=cos.stride(0) if has_rotary else 0,
        stride_sin=sin.stride(0) if has_rotary else 0,
        rotary_dim=2 * rotary_cos.shape[1] if has_rotary else 0,
        seqlen_ro=rotary_cos.shape[0] if has_rotary else 0,
        HAS_ROTARY=has_rotary,
        ROTARY_INTERLEAVED=bool(rotary_interleaved),
    )
    table = block_table if cache.paged else cache_seqlens
    layout = dict(
        stride_btb=block_table.stride(0) if cache.paged else 0,
        page_size=max(cache.page_size, 1),
        # the kernels' Bounds guard (kernels/decode.py) skips rows and pages outside these
        capacity=cache.capacity,
        cache_rows=k_cache.shape[0],
        PAGED=cache.paged,
        HAS_BATCH_IDX=cache_batch_idx is not None,
    )
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))

    if seqlen_new > 0 and batch > 0:
        block_t = 16 if q.device.type == "cuda" else 4
        append_kv_kernel[(triton.cdiv(seqlen_new, block_t), nheads_k, batch)](
            k,
            v,
            k_cache,
            v_cache,
            cache_seqlens,
            cache_batch_idx,
            table,
            cos,
            sin,
            *k.stride()[:3],
            *v.stride()[:3],
            *k_cache.stride()[:3],
            *v_cache.stride()[:3],
            seqlen_new=seqlen_new,
            HEAD_DIM=head_dim,
            HEAD_DIM_V=head_dim_v,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            BLOCK_DV=block_dv,
            **layout,
            **rotary,
        )

    out = new_output((batch, seqlen_q, nheads, head_dim_v), q.dtype, q.device)
    lse = new_output((batch, nheads, seqlen_q), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse

    group = nheads // nheads_k
    cfg = _decode_config(q.device, q.dtype, max(head_dim, head_dim_v))
    rows = seqlen_q * group
    block_m = min(cfg.block_m, max(16, triton.next_power_of_2(rows)))
    m_blocks = triton.cdiv(rows, block_m)
    splits = choose_num_splits(
        num_splits,
        batch * nheads_k * m_blocks,
        triton.cdiv(cache.capacity, cfg.block_n),
        _num_sms(q.device),
        cfg.min_blocks_per_split,
    )
    if splits == 1:
        out_k, lse_k = out, lse
        out_strides = (0, *out.stride()[:3])
        lse_strides = (0, *lse.stride())
    else:
        out_k = new_output((splits, batch, nheads, seqlen_q, head_dim_v), torch.float32, q.device)
        lse_k = new_output((splits, batch, nheads, seqlen_q), torch.float32, q.device)
        s = out_k.stride()
        out_strides = (s[0], s[1], s[3], s[2])  # (split, batch, token, head)
        lse_strides = lse_k.stride()  # (split, batch, head, token)
    score = score_args(q, opts)
    decode_kernel[(splits * m_blocks, nheads_k, batch)](
        q,
        k_cache,
        v_cache,
        out_k,
        lse_k,
        cache_seqlens,
        cache_batch_idx,
        cache_leftpad,
        table,
        cos,
        sin,
        opts.alibi_slopes,
        opts.learnable_sink,
        *q.stride()[:3],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        *out_strides,
        *lse_strides,
        **dict(zip(("stride_ab", "stride_ah"), alibi_strides(opts))),
        seqlen_q=seqlen_q,
        seqlen_new=seqlen_new,
        group_size=group,
        num_splits=splits,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        HAS_SINK=opts.learnable_sink is not None,
        HAS_LEFTPAD=cache_leftpad is not None,
        ROTARY_PER_TOKEN=opts.has_window,
        WRITE_FINAL=splits == 1,
        num_warps=cfg.num_warps,
        num_stages=cfg.stages(cache.paged and is_hopper(q.device)),
        **layout,
        **rotary,
        **score,
    )
    if splits > 1:
        # the kernel's partial layout (split, batch, head, token) seen as combine's (split, batch, token, head)
        _launch_combine(out_k.transpose(2, 3), lse_k.transpose(2, 3), out, lse.transpose(1, 2), opts.learnable_sink)
    return out, lse


def _launch_combine(out_partial, lse_partial, out, lse, sink):
    """out_partial: (num_splits, batch, seqlen, nheads, headdim_v), lse_partial: (num_splits, batch,
    seqlen, nheads), out: (batch, seqlen, nheads, headdim_v), lse: (batch, seqlen, nheads); any strides."""
    import triton

    from flashtron.kernels.combine import combine_kernel  # imports triton: only where the kernels run

    num_splits, batch, seqlen, nheads, head_dim_v = out_partial.shape
    if out.numel() == 0 and lse.numel() == 0:
        return
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    if out.device.type == "cuda":
        # up to 8 splits of a row per step (more loop); fixed rather than next_power_of_2(num_splits), so a
        # new split count (it follows batch and cache length) never compiles another combine kernel
        block_s = max(2, min(8, 2048 // block_dv))
        block_m = max(2, min(16, 2048 // (block_s * block_dv)))
    else:
        block_s, block_m = 2, 4  # interpreter: several split steps and row blocks in small tests
    combine_kernel[(triton.cdiv(seqlen * nheads, block_m), batch)](
        out_partial,
        lse_partial,
        out,
        lse,
        sink,
        *out_partial.stride()[:4],
        *lse_partial.stride(),
        *out.stride()[:3],
        *lse.stride(),
        num_splits,
        seqlen,
        nheads,
        HEAD_DIM_V=head_dim_v,
        BLOCK_S=block_s,
        BLOCK_M=block_m,
        BLOCK_DV=block_dv,
        HAS_SINK=sink is not None,
    )


# ----------------------------------------------------------------------------------------------------
# CPU path (plain PyTorch; host syncs are fine here)
# ----------------------------------------------------------------------------------------------------


def _rotate_cpu(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, interleaved: bool):
    """x: (batch_size, seqlen, nheads, headdim) rotated at positions pos (batch_size, seqlen), in fp32,
    rounded once to x.dtype. Features past rotary_dim = 2 * cos.shape[1] are unchanged."""
    half = cos.shape[1]
    c = cos.float()[pos].unsqueeze(2)  # (batch_size, seqlen, 1, rotary_dim / 2)
    s = sin.float()[pos].unsqueeze(2)
    xr = x[..., : 2 * half].float()
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :half], xr[..., half:])
    o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
    rotated = torch.stack([o1, o2], dim=-1).flatten(-2) if interleaved else torch.cat([o1, o2], dim=-1)
    return torch.cat([rotated.to(x.dtype), x[..., 2 * half :]], dim=-1)


_PER_ROW_BYTES = 1 << 20  # _dense_cache_cpu: keys and values per row past which rows go one at a time


def _slots(cache: _Cache, block_table, rows: torch.Tensor, pos: torch.Tensor):
    """Cache index (first, second axis) of positions pos (any shape) of batch rows rows (same shape)."""
    if cache.paged:
        return block_table.long()[rows, pos // cache.page_size], pos % cache.page_size
    return rows, pos


def _kvcache_cpu(
    q,
    k_cache,
    v_cache,
    opts,
    cache,
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
            k_new = _rotate_cpu(k, rotary_cos, rotary_sin, pos_new, rotary_interleaved)
        index = _slots(cache, block_table, cache_rows[:, None].expand_as(pos_new), pos_new)
        k_cache[index] = k_new.to(k_cache.dtype)
        v_cache[index] = v.to(v_cache.dtype)

    if rotary_cos is not None:
        # causal/windowed: token t sits at cache_seqlens + t; otherwise every token at cache_seqlens
        step = torch.arange(seqlen_q) if opts.has_window else torch.zeros(seqlen_q, dtype=torch.long)
        q = _rotate_cpu(q, rotary_cos, rotary_sin, lens[:, None] + step, rotary_interleaved)

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
    out, lse = cpu.attention_forward(
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
        out, lse = cpu.attention_forward(
            q, k_cache[r0 : r0 + batch, start:end], v_cache[r0 : r0 + batch, start:end], opts
        )
        return out, lse.float()
    outs, lses = [], []
    slopes = opts.alibi_slopes
    for b, (row, (start, end)) in enumerate(zip(rows, bounds)):
        row_opts = opts
        if slopes is not None and slopes.dim() == 2:  # (batch_size, nheads): this row's slopes
            row_opts = dataclasses.replace(opts, alibi_slopes=slopes[b : b + 1])
        out, lse = cpu.attention_forward(
            q[b : b + 1], k_cache[row : row + 1, start:end], v_cache[row : row + 1, start:end], row_opts
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses).float()


# ----------------------------------------------------------------------------------------------------
# torch.compile: each of the two as one opaque library op with a fake implementation, so that Dynamo
# neither traces the launchers nor the CPU path's host reads (autograd.py does the same for attention).
# ----------------------------------------------------------------------------------------------------
_CACHE_ARGS = ("k", "v", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx", "cache_leftpad", "block_table")


@torch.library.custom_op(
    "flashtron::kvcache_attn",
    mutates_args=("k_cache", "v_cache"),  # the in-place append
    schema="(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    + ", ".join(f"Tensor? {name}" for name in _CACHE_ARGS)
    + f", {options_schema()}, bool rotary_interleaved, SymInt num_splits) -> (Tensor, Tensor)",
)
def kvcache_attn(q, k_cache, v_cache, *rest):
    """(out, lse) of _kvcache_attention, contiguous; appends k, v into the caches in place."""
    n = len(_CACHE_ARGS)
    opts = options_from_args(rest[n:])
    rotary_interleaved, num_splits = rest[n + len(OPTION_FIELDS) :]
    out, lse = _kvcache_attention(
        q, k_cache, v_cache, opts, rotary_interleaved=rotary_interleaved, num_splits=num_splits,
        **dict(zip(_CACHE_ARGS, rest)),
    )  # fmt: skip
    return out.contiguous(), lse.contiguous()


@kvcache_attn.register_fake
def _(q, k_cache, v_cache, *rest):
    batch, seqlen_q, nheads, _ = q.shape
    out = q.new_empty((batch, seqlen_q, nheads, v_cache.shape[-1]))
    return out, q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("flashtron::combine", mutates_args=())
def combine_op(
    out_partial: torch.Tensor, lse_partial: torch.Tensor, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of _combine into a new output of out_dtype."""
    return _combine(out_partial, lse_partial, out_dtype=out_dtype)


@combine_op.register_fake
def _(out_partial, lse_partial, out_dtype):
    return out_partial.new_empty(out_partial.shape[1:], dtype=out_dtype), lse_partial.new_empty(lse_partial.shape[1:])
