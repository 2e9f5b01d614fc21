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

import torch

from flashtron import checks, cpu
from flashtron.env import uses_triton
from flashtron.options import (
    OPTION_FIELDS,
    AttnOptions,
    cache_layout,
    options_from_args,
    options_schema,
    options_to_args,
)
from flashtron.outputs import new_output

__all__ = ["kvcache_attention", "combine"]


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
    cache = cache_layout(k_cache, block_table)
    # no backward here (flash_attn's has none): autograd must not record the PyTorch ops (the CPU path, rotary
    # and bookkeeping on the Triton one), or the output would carry a grad_fn and the in-place append would
    # make the caller's cache part of a graph
    with torch.no_grad():
        if uses_triton(q):
            from flashtron import launch  # imports triton: only where the Triton kernels run

            return launch.kvcache_forward(q, k_cache, v_cache, opts, cache, num_splits=num_splits, **args)
        return cpu.kvcache_forward(q, k_cache, v_cache, opts, cache, **args)


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
        from flashtron import launch  # imports triton: only where the Triton kernels run

        if out is None:
            out = new_output(out_partial.shape[1:], out_dtype, out_partial.device)
        lse = new_output(lse_partial.shape[1:], torch.float32, out_partial.device)
        launch.launch_combine(out_partial, lse_partial, out, lse, None)
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
