"""The public attention functions, with flash_attn 2.8's names, parameter order and defaults.

Each function checks its inputs (checks.py), turns the loose flash_attn arguments into one
`AttnOptions`, and hands over to `autograd.attention` (training functions) or to `inference`
(KV cache, combine). Features from later FlashAttention versions are keyword-only arguments after
the FA2 ones, so FA2's positional calls keep working.

Arguments are taken as flash_attn 2.8 takes them (checks.py): int-likes as ints, numpy ints or
one-element tensors; window_size as a tuple, list, numpy array or 2-element integer tensor, any
negative side unbounded; softcap <= 0 off; flags as bools only. A tensor whose last dimension is not
contiguous is copied, as flash_attn's maybe_contiguous does (the KV caches, updated in place, must
be contiguous there). Bad arguments raise InputTypeError / InputValueError, which are RuntimeErrors
as flash_attn's own errors are.

dtypes: fp16, bf16 and fp32. fp32 inputs use IEEE fp32 dot products unless TF32 is on for CUDA
matmuls (`torch.backends.cuda.matmul.fp32_precision = "tf32"`, or the older `allow_tf32 = True`).
softmax_lse is fp32, natural log.
"""

from __future__ import annotations

import dataclasses

import torch

from flashtron import autograd, checks, inference
from flashtron.options import AttnOptions

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
    "flash_attn_combine",
]

_QKV = ("q", "k", "v")
_VARLEN_META = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def _options(
    fn, q, nheads, batch, *, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
    learnable_sink, deterministic,
) -> AttnOptions:  # fmt: skip
    """Checks the scalar options and per-head tensors and normalises them into one AttnOptions."""
    dropout_p, scale, left, right, softcap = checks.check_options(
        fn, dropout_p=dropout_p, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap
    )
    causal = checks.check_bool(fn, "causal", causal)
    deterministic = checks.check_bool(fn, "deterministic", deterministic)
    alibi_slopes, learnable_sink = checks.contiguous_last(alibi_slopes), checks.contiguous_last(learnable_sink)
    checks.check_alibi(fn, alibi_slopes, nheads=nheads, batch=batch, device=q.device)
    checks.check_sink(fn, learnable_sink, nheads=nheads, device=q.device)
    if causal:  # bottom-right causal is a window with no right side; a left window is kept
        right = 0
    return AttnOptions(
        softmax_scale=scale if scale is not None else q.shape[-1] ** -0.5,
        window_left=left,
        window_right=right,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        learnable_sink=learnable_sink,
        deterministic=deterministic,
    )


def _run(fn, q, k, v, opts, return_attn_probs, return_lse, **varlen):
    probs = checks.check_bool(fn, "return_attn_probs", return_attn_probs)
    return_lse = checks.check_bool(fn, "return_lse", return_lse)
    out, lse, s_dmask = autograd.attention(q, k, v, opts, return_probs=probs, **varlen)
    if probs:
        return out, lse, s_dmask
    return (out, lse) if return_lse else out


def _dense(fn, names, q, k, v, *, return_attn_probs, return_lse, **options):
    q, k, v = (checks.contiguous_last(t) for t in (q, k, v))
    nheads = checks.check_qkv(fn, q, k, v, names=names)[0]
    opts = _options(fn, q, nheads, q.shape[0], **options)
    return _run(fn, q, k, v, opts, return_attn_probs, return_lse)


def _varlen(
    fn, names, meta_names, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, block_table,
    seqused_k, return_attn_probs, return_lse, **options,
):  # fmt: skip
    q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table = (
        checks.contiguous_last(t) for t in (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table)
    )
    paged = block_table is not None
    nheads = checks.check_qkv(fn, q, k, v, varlen=True, paged=paged, names=names)[0]
    batch = checks.check_cu_seqlens(fn, cu_seqlens_q, cu_seqlens_k, device=q.device, names=meta_names[:2])
    max_seqlen_q = checks.check_int(fn, meta_names[2], max_seqlen_q, minimum=0)
    max_seqlen_k = checks.check_int(fn, meta_names[3], max_seqlen_k, minimum=0)
    checks.check_batch_vector(fn, "seqused_k", seqused_k, batch=batch, device=q.device)
    if paged:
        checks.check_block_table(fn, block_table, batch=batch, device=q.device)
    opts = _options(fn, q, nheads, batch, **options)
    if checks.reads_values(q, paged=paged):
        checks.check_varlen_values(
            fn, names[:2] + meta_names, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            seqused_k=seqused_k, block_table=block_table,
        )  # fmt: skip
    return _run(
        fn,
        q,
        k,
        v,
        opts,
        return_attn_probs,
        return_lse,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        seqused_k=seqused_k,
        block_table=block_table,
    )


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    learnable_sink=None,
    return_lse=False,
):
    """Attention softmax(q k^T * softmax_scale) v, differentiable w.r.t. q, k, v and learnable_sink.

    q: (batch_size, seqlen_q, nheads, headdim); k: (batch_size, seqlen_k, nheads_k, headdim);
    v: (batch_size, seqlen_k, nheads_k, headdim_v). nheads_k must divide nheads (MQA/GQA): query
    head i reads KV head i // (nheads // nheads_k). Any strides; a last dimension whose stride is not 1
    is copied first, as in flash_attn.
    dropout_p: probability of dropping a probability. softmax_scale: default 1 / sqrt(headdim).
    causal: bottom-right aligned. window_size (left, right): query i sees keys
    [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; a negative side is unbounded.
    softcap > 0: scores become softcap * tanh(scores / softcap); <= 0 is off. alibi_slopes: (nheads,) or
    (batch_size, nheads), fp32. deterministic: bitwise reproducible backward.
    learnable_sink (keyword): (nheads,) sink logit added to each row's softmax denominator.
    fp32 inputs use IEEE fp32 dot products unless TF32 is on for CUDA matmuls
    (torch.backends.cuda.matmul.fp32_precision = "tf32", or the older allow_tf32 = True).

    Returns out: (batch_size, seqlen_q, nheads, headdim_v); with return_attn_probs=True
    (out, softmax_lse, S_dmask), softmax_lse (batch_size, nheads, seqlen_q) fp32 and S_dmask the
    probabilities (dropped entries negative); with return_lse=True (out, softmax_lse), where
    softmax_lse is differentiable.
    """
    return _dense(
        "flash_attn_func", _QKV, q, k, v,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic, learnable_sink=learnable_sink,
        return_attn_probs=return_attn_probs, return_lse=return_lse,
    )  # fmt: skip


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    learnable_sink=None,
    return_lse=False,
):
    """flash_attn_func on qkv: (batch_size, seqlen, 3, nheads, headdim); q, k, v are views of it.

    Other arguments and the return value as flash_attn_func. fp32 inputs use IEEE fp32 dot products
    unless TF32 is on for CUDA matmuls (matmul.fp32_precision = "tf32" or allow_tf32).
    """
    fn = "flash_attn_qkvpacked_func"
    qkv = checks.contiguous_last(qkv)
    checks.check_packed(fn, "qkv", qkv, ndim=5, count=3, layout="(batch_size, seqlen, 3, nheads, headdim)")
    return _dense(
        fn, ("qkv",) * 3, *qkv.unbind(2),
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic, learnable_sink=learnable_sink,
        return_attn_probs=return_attn_probs, return_lse=return_lse,
    )  # fmt: skip


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    learnable_sink=None,
    return_lse=False,
):
    """flash_attn_func with q: (batch_size, seqlen_q, nheads, headdim) and
    kv: (batch_size, seqlen_k, 2, nheads_k, headdim); k and v are views of kv.

    Other arguments and the return value as flash_attn_func. fp32 inputs use IEEE fp32 dot products
    unless TF32 is on for CUDA matmuls (matmul.fp32_precision = "tf32" or allow_tf32).
    """
    fn = "flash_attn_kvpacked_func"
    kv = checks.contiguous_last(kv)
    checks.check_packed(fn, "kv", kv, ndim=5, count=2, layout="(batch_size, seqlen_k, 2, nheads_k, headdim)")
    return _dense(
        fn, ("q", "kv", "kv"), q, *kv.unbind(2),
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic, learnable_sink=learnable_sink,
        return_attn_probs=return_attn_probs, return_lse=return_lse,
    )  # fmt: skip


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
    *,
    seqused_k=None,
    learnable_sink=None,
    return_lse=False,
):
    """Attention over a batch of variable-length sequences packed along the token dimension.

    q: (total_q, nheads, headdim); k: (total_k, nheads_k, headdim); v: (total_k, nheads_k,
    headdim_v). cu_seqlens_q, cu_seqlens_k: (batch_size + 1,), int32, cumulative sequence lengths
    starting at 0. max_seqlen_q, max_seqlen_k: int. block_table: (batch_size,
    max_num_blocks_per_seq), int32, selects a paged KV cache, k and v then being
    (num_blocks, page_block_size, nheads_k, headdim). seqused_k (keyword): (batch_size,), int32,
    the number of keys actually used in each sequence. Causal and window positions are relative
    to each sequence. Other arguments as flash_attn_func. fp32 inputs use IEEE fp32 dot products
    unless TF32 is on for CUDA matmuls (matmul.fp32_precision = "tf32" or allow_tf32).
    The metadata's values are checked (cu_seqlens non-decreasing and inside q and k, max_seqlen_*
    at least the longest sequence, seqused_k within its sequence, each sequence within what its
    block_table row addresses through pages of k): always for CPU tensors; for CUDA tensors only with
    a block_table (one device sync); never while capturing a CUDA graph or tracing torch.compile.
    Where they are not checked, the kernels clamp them so nothing outside q, k and v is touched
    (README, "Bounds").

    Returns out: (total_q, nheads, headdim_v); softmax_lse (when asked for) is (nheads, total_q).
    """
    return _varlen(
        "flash_attn_varlen_func", _QKV, _VARLEN_META, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, block_table=block_table,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic, learnable_sink=learnable_sink,
        return_attn_probs=return_attn_probs, return_lse=return_lse,
        seqused_k=seqused_k,
    )  # fmt: skip


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    seqused_k=None,
    learnable_sink=None,
    return_lse=False,
):
    """flash_attn_varlen_func on qkv: (total, 3, nheads, headdim), with cu_seqlens: (batch_size + 1,),
    int32, and max_seqlen: int shared by queries and keys.

    Other arguments and the return value as flash_attn_varlen_func. fp32 inputs use IEEE fp32 dot
    products unless TF32 is on for CUDA matmuls (matmul.fp32_precision = "tf32" or allow_tf32).
    """
    fn = "flash_attn_varlen_qkvpacked_func"
    qkv = checks.contiguous_last(qkv)
    checks.check_packed(fn, "qkv", qkv, ndim=4, count=3, layout="(total, 3, nheads, headdim)")
    meta = ("cu_seqlens", "cu_seqlens", "max_seqlen", "max_seqlen")
    q, k, v = qkv.unbind(1)
    return _varlen(
        fn, ("qkv",) * 3, meta, q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, block_table=None,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic, learnable_sink=learnable_sink,
        return_attn_probs=return_attn_probs, return_lse=return_lse,
        seqused_k=seqused_k,
    )  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    seqused_k=None,
    learnable_sink=None,
    return_lse=False,
):
    """flash_attn_varlen_func with q: (total_q, nheads, headdim) and kv: (total_k, 2, nheads_k,
    headdim); k and v are views of kv.

    Other arguments and the return value as flash_attn_varlen_func. fp32 inputs use IEEE fp32 dot
    products unless TF32 is on for CUDA matmuls (matmul.fp32_precision = "tf32" or allow_tf32).
    """
    fn = "flash_attn_varlen_kvpacked_func"
    kv = checks.contiguous_last(kv)
    checks.check_packed(fn, "kv", kv, ndim=4, count=2, layout="(total_k, 2, nheads_k, headdim)")
    k, v = kv.unbind(1)
    return _varlen(
        fn, ("q", "kv", "kv"), _VARLEN_META, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        block_table=None,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic, learnable_sink=learnable_sink,
        return_attn_probs=return_attn_probs, return_lse=return_lse,
        seqused_k=seqused_k,
    )  # fmt: skip


def flash_attn_with_kvcache(
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
    num_splits=0,
    return_softmax_lse=False,
    *,
    learnable_sink=None,
    return_lse=False,
):
    """Attention of q over a KV cache, optionally appending new keys/values to it first. No backward.

    q: (batch_size, seqlen, nheads, headdim). k_cache, v_cache: (batch_size_cache, seqlen_cache,
    nheads_k, headdim), or with block_table (num_blocks, page_block_size, nheads_k, headdim), any
    page size. k, v: (batch_size, seqlen_new, nheads_k, headdim) or None; when given they are
    written *in place* into the cache at positions cache_seqlens[b]... and attention covers the
    updated cache. rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2), seqlen_ro >= the cache
    capacity, dtype of q; they rotate the new k (and q) at their absolute positions, and need k/v.
    rotary_interleaved: GPT-J pairs (True) or GPT-NeoX halves (False).
    cache_seqlens: int, or (batch_size,) int32: the filled length of each cache row (None: the
    whole cache). cache_batch_idx: (batch_size,) int32, the cache row of each batch row.
    cache_leftpad: (batch_size,) int32, where the valid keys start in each row.
    block_table: (batch_size, max_num_blocks_per_seq) int32. Their values are checked before
    anything is written (cache_seqlens + seqlen_new within the capacity, which with a block_table is
    block_table.shape[1] * page_block_size; cache_batch_idx a row of the cache; cache_leftpad within
    the row; the block_table entries in use pages of the cache): always for CPU tensors, and for CUDA
    tensors with a block_table at the cost of one device sync per call, as flash_attn does; never
    while capturing a CUDA graph or tracing torch.compile, and never for dense CUDA caches. Where
    they are not checked, the kernels keep every access inside the tensors (README, "Bounds").
    num_splits: 0 = heuristic, 1 = no
    split, n = n splits. learnable_sink (keyword): (nheads,). Other arguments as flash_attn_func.
    fp32 inputs use IEEE fp32 dot products unless TF32 is on for CUDA matmuls
    (torch.backends.cuda.matmul.fp32_precision = "tf32", or the older allow_tf32 = True).

    Returns out: (batch_size, seqlen, nheads, headdim_v), or (out, softmax_lse) with
    return_softmax_lse=True or return_lse=True (keyword, as on the other functions), softmax_lse
    (batch_size, nheads, seqlen) fp32. As in flash_attn, a window side at least the cache capacity is
    unbounded (-1): it masks nothing there, and it decides whether q is rotated per token.
    """
    fn = "flash_attn_with_kvcache"
    q, k, v, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, block_table = (
        checks.contiguous_last(t)
        for t in (q, k, v, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, block_table)
    )
    if isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = checks.contiguous_last(cache_seqlens)
    nheads, cache_seqlens = checks.check_kvcache(
        fn,
        q,
        k_cache,
        v_cache,
        k=k,
        v=v,
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens,
        cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
        block_table=block_table,
    )
    num_splits = checks.check_int(fn, "num_splits", num_splits, minimum=0)
    opts = _options(
        fn, q, nheads, q.shape[0], dropout_p=0.0, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, learnable_sink=learnable_sink, deterministic=False,
    )  # fmt: skip
    # flash_attn (mha_fwd_kvcache) resets a window side >= the cache capacity to -1 before anything else: the
    # same mask over at most that many keys, but no longer a window, so q is rotated at cache_seqlens, not per
    # token (rotary), as without one
    capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    if max(opts.window_left, opts.window_right) >= capacity:  # rare: no new options on the decode path otherwise
        opts = dataclasses.replace(
            opts,
            window_left=-1 if opts.window_left >= capacity else opts.window_left,
            window_right=-1 if opts.window_right >= capacity else opts.window_right,
        )
    rotary_interleaved = checks.check_bool(fn, "rotary_interleaved", rotary_interleaved)
    return_softmax_lse = checks.check_bool(fn, "return_softmax_lse", return_softmax_lse)
    return_lse = checks.check_bool(fn, "return_lse", return_lse)
    if cache_seqlens is not None and not isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    out, lse = inference.kvcache_attention(
        q,
        k_cache,
        v_cache,
        opts,
        k=k,
        v=v,
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens,
        cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
        block_table=block_table,
        rotary_interleaved=rotary_interleaved,
        num_splits=num_splits,
    )
    return (out, lse) if return_softmax_lse or return_lse else out


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None):
    """Merges partial attention results (e.g. over splits of the keys) in fp32, as FlashAttention-3.

    out_partial: (num_splits, batch_size, seqlen, nheads, headdim), fp32.
    lse_partial: (num_splits, batch_size, seqlen, nheads), fp32, natural log.
    out: optional (batch_size, seqlen, nheads, headdim) tensor to write into, of dtype out_dtype.
    out_dtype: fp16, bf16 or fp32; default out_partial's dtype.

    Returns (out, softmax_lse): out (batch_size, seqlen, nheads, headdim), softmax_lse
    (batch_size, seqlen, nheads) fp32.
    """
    out_partial, lse_partial = checks.contiguous_last(out_partial), checks.contiguous_last(lse_partial)
    checks.check_combine("flash_attn_combine", out_partial, lse_partial, out, out_dtype)
    return inference.combine(out_partial, lse_partial, out=out, out_dtype=out_dtype)
