"""The public edge: bad inputs raise InputTypeError/InputValueError naming the argument, before any
dispatch, and each is catchable both as the TypeError/ValueError it is and as the RuntimeError that
flash_attn raises; what flash_attn 2.8 accepts (tensor windows, negative sides, softcap <= 0, numpy and
tensor ints, non-contiguous last dimensions) is accepted and normalised into AttnOptions and handed
over as API.md says; the signatures are flash_attn 2.8's (and FlashAttention-3's for flash_attn_combine).

The backends are replaced by a recording stub where a call must get through, so this file needs
neither autograd nor inference to exist or to work.
"""

from __future__ import annotations

import inspect
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import flashtron
from flashtron import api

B, SQ, SK, H, HK, D = 2, 3, 5, 4, 2, 8
CAP = 8  # seqlen_cache of the dense KV cache below
PAGES, PAGE, MAXP = 6, 4, 3  # paged KV cache: num_blocks, page_block_size, max_num_blocks_per_seq
DROP = object()  # marks an argument to leave out


def rn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def strided(t):
    """Same shape and values, but stride(-1) != 1."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def meta(t):
    return t.to("meta")


def dense(**over):
    args = dict(q=rn(B, SQ, H, D), k=rn(B, SK, HK, D), v=rn(B, SK, HK, D))
    return _apply(args, over)


def varlen(**over):
    args = dict(
        q=rn(7, H, D),
        k=rn(9, HK, D),
        v=rn(9, HK, D),
        cu_seqlens_q=i32(0, 3, 7),
        cu_seqlens_k=i32(0, 4, 9),
        max_seqlen_q=4,
        max_seqlen_k=5,
    )
    return _apply(args, over)


def paged_varlen(**over):
    args = varlen(k=rn(PAGES, PAGE, HK, D), v=rn(PAGES, PAGE, HK, D), block_table=i32(0, 1, 2, 3, 4, 5).view(B, MAXP))
    return _apply(args, over)


def kvcache(**over):
    args = dict(q=rn(B, 1, H, D), k_cache=rn(B, CAP, HK, D), v_cache=rn(B, CAP, HK, D), cache_seqlens=3)
    return _apply(args, over)


def kvcache_new(**over):
    """With new k/v and rotary tables covering the cache."""
    args = kvcache(k=rn(B, 2, HK, D), v=rn(B, 2, HK, D), rotary_cos=rn(CAP, D // 4), rotary_sin=rn(CAP, D // 4))
    return _apply(args, over)


def kvcache_paged(**over):
    args = kvcache(
        k_cache=rn(PAGES, PAGE, HK, D), v_cache=rn(PAGES, PAGE, HK, D), block_table=i32(0, 1, 2, 3, 4, 5).view(B, MAXP)
    )
    return _apply(args, over)


def combine(**over):
    args = dict(out_partial=rn(3, B, SQ, H, D), lse_partial=rn(3, B, SQ, H))
    return _apply(args, over)


def _apply(args, over):
    args.update(over)
    return {k: v for k, v in args.items() if v is not DROP}


F, V, KV, CB = api.flash_attn_func, api.flash_attn_varlen_func, api.flash_attn_with_kvcache, api.flash_attn_combine

# (function, kwargs builder, exception, regex that names the argument)
BAD = {
    # --- tensors, dtypes, ranks, shapes (flash_attn_func) ---
    "q-none": (F, lambda: dense(q=None), TypeError, r"flash_attn_func: q must be a torch\.Tensor, got NoneType"),
    "k-list": (F, lambda: dense(k=[1.0]), TypeError, r"k must be a torch\.Tensor, got list"),
    "q-fp64": (F, lambda: dense(q=rn(B, SQ, H, D, dtype=torch.float64)), TypeError, r"q must have dtype .*float64"),
    "q-int": (F, lambda: dense(q=torch.ones(B, SQ, H, D, dtype=torch.int32)), TypeError, r"q must have dtype"),
    "k-dtype": (
        F,
        lambda: dense(k=rn(B, SK, HK, D, dtype=torch.float16)),
        TypeError,
        r"k must have the same dtype as q \(torch\.float32\), got torch\.float16",
    ),
    "v-dtype": (F, lambda: dense(v=rn(B, SK, HK, D, dtype=torch.bfloat16)), TypeError, r"v must have the same dtype"),
    "q-rank": (F, lambda: dense(q=rn(SQ, H, D)), ValueError, r"q must be 4-D .*got shape \(3, 4, 8\)"),
    "k-rank": (F, lambda: dense(k=rn(1, B, SK, HK, D)), ValueError, r"k must be 4-D"),
    "k-batch": (F, lambda: dense(k=rn(B + 1, SK, HK, D)), ValueError, r"k must have batch size 2 like q, got 3"),
    "v-batch": (F, lambda: dense(v=rn(1, SK, HK, D)), ValueError, r"v must have batch size 2"),
    "v-seqlen": (F, lambda: dense(v=rn(B, SK + 1, HK, D)), ValueError, r"v must have the same .*seqlen_k.* as k"),
    "v-nheads": (F, lambda: dense(v=rn(B, SK, HK + 1, D)), ValueError, r"v must have the same nheads as k \(2\)"),
    "nheads-div": (
        F,
        lambda: dense(k=rn(B, SK, 3, D), v=rn(B, SK, 3, D)),
        ValueError,
        r"nheads of q \(4\) must be a positive multiple of nheads_k of k \(3\)",
    ),
    "k-headdim": (F, lambda: dense(k=rn(B, SK, HK, D + 1)), ValueError, r"k must have the same headdim as q \(8\)"),
    "q-headdim-513": (
        F,
        lambda: dense(q=rn(B, SQ, H, 513), k=rn(B, SK, HK, 513)),
        ValueError,
        r"headdim of q must be between 1 and 512, got 513",
    ),
    "q-headdim-0": (F, lambda: dense(q=rn(B, SQ, H, 0), k=rn(B, SK, HK, 0)), ValueError, r"headdim of q .* got 0"),
    "v-headdim": (F, lambda: dense(v=rn(B, SK, HK, 520)), ValueError, r"headdim of v must be between 1 and 512"),
    "k-device": (F, lambda: dense(k=meta(rn(B, SK, HK, D))), ValueError, r"k must be on the same device as q"),
    "v-device": (F, lambda: dense(v=meta(rn(B, SK, HK, D))), ValueError, r"v must be on the same device as q"),
    # --- scalar options ---
    "dropout-neg": (F, lambda: dense(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\), got -0\.1"),
    "dropout-one": (F, lambda: dense(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    "dropout-nan": (F, lambda: dense(dropout_p=math.nan), ValueError, r"dropout_p"),
    "dropout-str": (F, lambda: dense(dropout_p="0.1"), TypeError, r"dropout_p must be a float, got str"),
    "softcap-ninf": (F, lambda: dense(softcap=-math.inf), ValueError, r"softcap must be a finite float"),
    "softcap-inf": (F, lambda: dense(softcap=math.inf), ValueError, r"softcap must be a finite float"),
    "softcap-nan": (F, lambda: dense(softcap=math.nan), ValueError, r"softcap"),
    "softcap-none": (F, lambda: dense(softcap=None), TypeError, r"softcap must be a float"),
    "scale-zero": (F, lambda: dense(softmax_scale=0.0), ValueError, r"softmax_scale must be a finite positive"),
    "scale-neg": (F, lambda: dense(softmax_scale=-0.5), ValueError, r"softmax_scale"),
    "scale-inf": (F, lambda: dense(softmax_scale=math.inf), ValueError, r"softmax_scale"),
    "scale-nan": (F, lambda: dense(softmax_scale=math.nan), ValueError, r"softmax_scale"),
    "scale-str": (F, lambda: dense(softmax_scale="x"), TypeError, r"softmax_scale must be a float"),
    "scale-tensor-2": (F, lambda: dense(softmax_scale=torch.tensor([0.1, 0.2])), TypeError, r"softmax_scale must"),
    "scale-bool-tensor": (F, lambda: dense(softmax_scale=torch.tensor(True)), TypeError, r"softmax_scale must be a"),
    "window-short": (F, lambda: dense(window_size=(1,)), ValueError, r"window_size must be a \(left, right\) pair"),
    "window-long": (F, lambda: dense(window_size=(1, 2, 3)), ValueError, r"window_size"),
    "window-float-tensor": (F, lambda: dense(window_size=torch.tensor([1.0, 0.0])), TypeError, r"window_size"),
    "window-bool-tensor": (F, lambda: dense(window_size=torch.tensor([True, False])), TypeError, r"window_size"),
    "window-tensor-3": (F, lambda: dense(window_size=torch.tensor([1, 2, 3])), ValueError, r"got 3 values"),
    "window-tensor-0d": (F, lambda: dense(window_size=torch.tensor(4)), TypeError, r"window_size .* got a int64"),
    "window-bool": (F, lambda: dense(window_size=(True, 0)), TypeError, r"window_size"),
    "window-none": (F, lambda: dense(window_size=None), TypeError, r"window_size .* got NoneType"),
    # --- flags: bools only, as flash_attn's bool parameters ---
    "causal-str": (F, lambda: dense(causal="yes"), TypeError, r"flash_attn_func: causal must be a bool, got str"),
    "causal-int": (F, lambda: dense(causal=1), TypeError, r"causal must be a bool, got int 1"),
    "causal-none": (F, lambda: dense(causal=None), TypeError, r"causal must be a bool"),
    "deterministic-str": (F, lambda: dense(deterministic="no"), TypeError, r"deterministic must be a bool"),
    "probs-int": (F, lambda: dense(return_attn_probs=1), TypeError, r"return_attn_probs must be a bool"),
    "lse-str": (F, lambda: dense(return_lse="yes"), TypeError, r"return_lse must be a bool"),
    "window-float": (F, lambda: dense(window_size=(1.5, 0)), TypeError, r"window_size"),
    "window-int": (F, lambda: dense(window_size=4), TypeError, r"window_size .* got int"),
    "window-str": (F, lambda: dense(window_size="ab"), TypeError, r"window_size"),
    "alibi-nheads": (F, lambda: dense(alibi_slopes=rn(H + 1)), ValueError, r"alibi_slopes must have shape .* \(5,\)"),
    "alibi-batch": (F, lambda: dense(alibi_slopes=rn(B + 1, H)), ValueError, r"alibi_slopes must have shape"),
    "alibi-3d": (F, lambda: dense(alibi_slopes=rn(B, H, 1)), ValueError, r"alibi_slopes must have shape"),
    "alibi-dtype": (
        F,
        lambda: dense(alibi_slopes=rn(H, dtype=torch.float16)),
        TypeError,
        r"alibi_slopes must have dtype float32, got torch\.float16",
    ),
    "alibi-list": (F, lambda: dense(alibi_slopes=[0.5] * H), TypeError, r"alibi_slopes must be a torch\.Tensor"),
    "alibi-device": (F, lambda: dense(alibi_slopes=meta(rn(H))), ValueError, r"alibi_slopes must be on the same"),
    "sink-shape": (F, lambda: dense(learnable_sink=rn(H + 1)), ValueError, r"learnable_sink must have shape"),
    "sink-2d": (F, lambda: dense(learnable_sink=rn(1, H)), ValueError, r"learnable_sink must have shape"),
    "sink-int": (
        F,
        lambda: dense(learnable_sink=torch.zeros(H, dtype=torch.int64)),
        TypeError,
        r"learnable_sink must have a floating dtype",
    ),
    "sink-device": (F, lambda: dense(learnable_sink=meta(rn(H))), ValueError, r"learnable_sink must be on the same"),
    # --- packed variants ---
    "qkv-count": (
        api.flash_attn_qkvpacked_func,
        lambda: dict(qkv=rn(B, SQ, 2, H, D)),
        ValueError,
        r"flash_attn_qkvpacked_func: qkv must have size 3",
    ),
    "qkv-rank": (api.flash_attn_qkvpacked_func, lambda: dict(qkv=rn(SQ, 3, H, D)), ValueError, r"qkv must be 5-D"),
    "qkv-fp64": (
        api.flash_attn_qkvpacked_func,
        lambda: dict(qkv=rn(B, SQ, 3, H, D, dtype=torch.float64)),
        TypeError,
        r"qkv must have dtype",
    ),
    "qkv-headdim": (
        api.flash_attn_qkvpacked_func,
        lambda: dict(qkv=rn(B, SQ, 3, H, 600)),
        ValueError,
        r"headdim of qkv must be between 1 and 512",
    ),
    "kv-count": (
        api.flash_attn_kvpacked_func,
        lambda: dict(q=rn(B, SQ, H, D), kv=rn(B, SK, 3, HK, D)),
        ValueError,
        r"kv must have size 2",
    ),
    "kv-dtype": (
        api.flash_attn_kvpacked_func,
        lambda: dict(q=rn(B, SQ, H, D), kv=rn(B, SK, 2, HK, D, dtype=torch.float16)),
        TypeError,
        r"kv must have the same dtype as q",
    ),
    "kv-headdim": (
        api.flash_attn_kvpacked_func,
        lambda: dict(q=rn(B, SQ, H, D), kv=rn(B, SK, 2, HK, D + 2)),
        ValueError,
        r"kv must have the same headdim as q",
    ),
    "varlen-qkv-rank": (
        api.flash_attn_varlen_qkvpacked_func,
        lambda: dict(qkv=rn(B, 7, 3, H, D), cu_seqlens=i32(0, 3, 7), max_seqlen=4),
        ValueError,
        r"qkv must be 4-D",
    ),
    "varlen-qkv-cu-dtype": (
        api.flash_attn_varlen_qkvpacked_func,
        lambda: dict(qkv=rn(7, 3, H, D), cu_seqlens=torch.tensor([0, 3, 7]), max_seqlen=4),
        TypeError,
        r"cu_seqlens must have dtype int32, got torch\.int64",
    ),
    "varlen-qkv-max": (
        api.flash_attn_varlen_qkvpacked_func,
        lambda: dict(qkv=rn(7, 3, H, D), cu_seqlens=i32(0, 3, 7), max_seqlen=-1),
        ValueError,
        r"max_seqlen must be >= 0, got -1",
    ),
    "varlen-kv-count": (
        api.flash_attn_varlen_kvpacked_func,
        lambda: dict(varlen(k=DROP, v=DROP), kv=rn(9, 3, HK, D)),
        ValueError,
        r"kv must have size 2",
    ),
    # --- varlen ---
    "varlen-q-rank": (V, lambda: varlen(q=rn(1, 7, H, D)), ValueError, r"q must be 3-D \(total_q, nheads, headdim\)"),
    "varlen-k-rank": (V, lambda: varlen(k=rn(1, 9, HK, D)), ValueError, r"k must be 3-D \(total_k"),
    "varlen-v-total": (V, lambda: varlen(v=rn(8, HK, D)), ValueError, r"v must have the same \(total_k,\) as k"),
    "cu-q-int64": (V, lambda: varlen(cu_seqlens_q=torch.tensor([0, 3, 7])), TypeError, r"cu_seqlens_q must have dtype"),
    "cu-k-float": (V, lambda: varlen(cu_seqlens_k=torch.tensor([0.0, 4, 9])), TypeError, r"cu_seqlens_k must have"),
    "cu-q-list": (V, lambda: varlen(cu_seqlens_q=[0, 3, 7]), TypeError, r"cu_seqlens_q must be a torch\.Tensor"),
    "cu-q-2d": (V, lambda: varlen(cu_seqlens_q=i32(0, 3, 7).view(1, 3)), ValueError, r"cu_seqlens_q must be 1-D"),
    "cu-q-empty": (V, lambda: varlen(cu_seqlens_q=i32()), ValueError, r"cu_seqlens_q must have batch_size \+ 1 >= 1"),
    "cu-len": (
        V,
        lambda: varlen(cu_seqlens_k=i32(0, 4, 6, 9)),
        ValueError,
        r"cu_seqlens_k must have the same length \(batch_size \+ 1\) as cu_seqlens_q \(3\), got 4",
    ),
    "cu-device": (V, lambda: varlen(cu_seqlens_k=meta(i32(0, 4, 9))), ValueError, r"cu_seqlens_k must be on the same"),
    "max-q-neg": (V, lambda: varlen(max_seqlen_q=-1), ValueError, r"max_seqlen_q must be >= 0"),
    "max-q-float": (V, lambda: varlen(max_seqlen_q=4.0), TypeError, r"max_seqlen_q must be an int, got float"),
    "max-k-float-tensor": (
        V,
        lambda: varlen(max_seqlen_k=torch.tensor(5.0)),
        TypeError,
        r"max_seqlen_k must be an int",
    ),
    "max-k-tensor-2": (V, lambda: varlen(max_seqlen_k=i32(5, 5)), TypeError, r"max_seqlen_k must be an int, got a"),
    "max-k-bool": (V, lambda: varlen(max_seqlen_k=True), TypeError, r"max_seqlen_k must be an int"),
    "seqused-dtype": (V, lambda: varlen(seqused_k=torch.tensor([4, 5])), TypeError, r"seqused_k must have dtype int32"),
    "seqused-shape": (V, lambda: varlen(seqused_k=i32(4, 5, 6)), ValueError, r"seqused_k must have shape \(2,\)"),
    "seqused-2d": (V, lambda: varlen(seqused_k=i32(4, 5).view(2, 1)), ValueError, r"seqused_k must have shape"),
    "varlen-alibi": (V, lambda: varlen(alibi_slopes=rn(B + 1, H)), ValueError, r"alibi_slopes must have shape"),
    "varlen-window": (V, lambda: varlen(window_size=(0, -3, 1)), ValueError, r"window_size"),
    "bt-dtype": (
        V,
        lambda: paged_varlen(block_table=torch.arange(6).view(B, MAXP)),
        TypeError,
        r"block_table must have dtype int32",
    ),
    "bt-1d": (V, lambda: paged_varlen(block_table=i32(0, 1, 2)), ValueError, r"block_table must be 2-D"),
    "bt-rows": (
        V,
        lambda: paged_varlen(block_table=i32(0, 1, 2).view(1, 3)),
        ValueError,
        r"block_table must have batch_size = 2 rows",
    ),
    "paged-k-rank": (V, lambda: paged_varlen(k=rn(9, HK, D)), ValueError, r"k must be 4-D \(num_blocks"),
    "paged-v-pages": (
        V,
        lambda: paged_varlen(v=rn(PAGES, PAGE + 1, HK, D)),
        ValueError,
        r"v must have the same \(num_blocks, page_block_size\) as k",
    ),
    # --- flash_attn_with_kvcache ---
    "kvc-q-rank": (KV, lambda: kvcache(q=rn(B, H, D)), ValueError, r"flash_attn_with_kvcache: q must be 4-D"),
    "kvc-q-fp64": (KV, lambda: kvcache(q=rn(B, 1, H, D, dtype=torch.float64)), TypeError, r"q must have dtype"),
    "kvc-kcache-dtype": (
        KV,
        lambda: kvcache(k_cache=rn(B, CAP, HK, D, dtype=torch.float16)),
        TypeError,
        r"k_cache must have the same dtype as q",
    ),
    "kvc-kcache-rank": (KV, lambda: kvcache(k_cache=rn(CAP, HK, D)), ValueError, r"k_cache must be 4-D"),
    "kvc-vcache-seqlen": (
        KV,
        lambda: kvcache(v_cache=rn(B, CAP - 1, HK, D)),
        ValueError,
        r"v_cache must have the same .* as k_cache",
    ),
    "kvc-kcache-headdim": (
        KV,
        lambda: kvcache(k_cache=rn(B, CAP, HK, D * 2)),
        ValueError,
        r"k_cache must have the same headdim as q",
    ),
    "kvc-nheads": (
        KV,
        lambda: kvcache(k_cache=rn(B, CAP, 3, D), v_cache=rn(B, CAP, 3, D)),
        ValueError,
        r"nheads of q \(4\) must be a positive multiple of nheads_k of k_cache \(3\)",
    ),
    "kvc-kcache-batch": (
        KV,
        lambda: kvcache(k_cache=rn(1, CAP, HK, D), v_cache=rn(1, CAP, HK, D)),
        ValueError,
        r"k_cache must have at least batch_size = 2 rows, got 1",
    ),
    "kvc-kcache-stride": (
        KV,
        lambda: kvcache(k_cache=strided(rn(B, CAP, HK, D))),
        ValueError,
        r"k_cache must have contiguous last dimension .* updated in place, so it cannot be copied",
    ),
    "kvc-k-without-v": (
        KV,
        lambda: kvcache_new(v=DROP, rotary_cos=DROP, rotary_sin=DROP),
        ValueError,
        r"k was given without v",
    ),
    "kvc-v-without-k": (
        KV,
        lambda: kvcache_new(k=DROP, rotary_cos=DROP, rotary_sin=DROP),
        ValueError,
        r"v was given without k",
    ),
    "kvc-k-batch": (KV, lambda: kvcache_new(k=rn(1, 2, HK, D)), ValueError, r"k must have shape \(2, 2, 2, 8\)"),
    "kvc-k-nheads": (KV, lambda: kvcache_new(k=rn(B, 2, H, D)), ValueError, r"k must have shape"),
    "kvc-v-seqlen": (KV, lambda: kvcache_new(v=rn(B, 3, HK, D)), ValueError, r"v must have shape \(2, 2, 2, 8\)"),
    "kvc-v-headdim": (KV, lambda: kvcache_new(v=rn(B, 2, HK, D + 1)), ValueError, r"v must have shape"),
    "kvc-k-dtype": (
        KV,
        lambda: kvcache_new(k=rn(B, 2, HK, D, dtype=torch.bfloat16)),
        TypeError,
        r"k must have the same dtype as q",
    ),
    "kvc-k-needs-seqlens": (KV, lambda: kvcache_new(cache_seqlens=None), ValueError, r"cache_seqlens is required"),
    "kvc-cos-without-sin": (KV, lambda: kvcache_new(rotary_sin=DROP), ValueError, r"rotary_cos was given without"),
    "kvc-sin-without-cos": (KV, lambda: kvcache_new(rotary_cos=DROP), ValueError, r"rotary_sin was given without"),
    "kvc-rotary-without-k": (
        KV,
        lambda: kvcache_new(k=DROP, v=DROP),
        ValueError,
        r"rotary_cos/rotary_sin need the new k and v",
    ),
    "kvc-rotary-dim": (
        KV,
        lambda: kvcache_new(rotary_cos=rn(CAP, D), rotary_sin=rn(CAP, D)),
        ValueError,
        r"rotary_dim = 2 \* rotary_cos\.shape\[1\] must be in \[2, headdim = 8\], got 16",
    ),
    "kvc-rotary-rank": (
        KV,
        lambda: kvcache_new(rotary_cos=rn(CAP * 2), rotary_sin=rn(CAP * 2)),
        ValueError,
        r"rotary_cos must be 2-D",
    ),
    "kvc-rotary-sin-shape": (
        KV,
        lambda: kvcache_new(rotary_sin=rn(CAP, D // 4 + 1)),
        ValueError,
        r"rotary_sin must have shape \(8, 2\)",
    ),
    "kvc-rotary-dtype": (
        KV,
        lambda: kvcache_new(rotary_cos=rn(CAP, D // 4, dtype=torch.float16)),
        TypeError,
        r"rotary_cos must have the same dtype as q",
    ),
    "kvc-rotary-short": (
        KV,
        lambda: kvcache_new(rotary_cos=rn(CAP - 1, D // 4), rotary_sin=rn(CAP - 1, D // 4)),
        ValueError,
        r"rotary_cos/rotary_sin must cover the whole cache: seqlen_ro >= 8, got 7",
    ),
    "kvc-seqlens-float": (KV, lambda: kvcache(cache_seqlens=2.0), TypeError, r"cache_seqlens must be an int"),
    "kvc-seqlens-neg": (KV, lambda: kvcache(cache_seqlens=-1), ValueError, r"cache_seqlens must be >= 0"),
    "kvc-seqlens-dtype": (
        KV,
        lambda: kvcache(cache_seqlens=torch.tensor([1, 2])),
        TypeError,
        r"cache_seqlens must have dtype int32",
    ),
    "kvc-seqlens-shape": (
        KV,
        lambda: kvcache(cache_seqlens=i32(1, 2, 3)),
        ValueError,
        r"cache_seqlens must have shape",
    ),
    "kvc-seqlens-device": (
        KV,
        lambda: kvcache(cache_seqlens=meta(i32(1, 2))),
        ValueError,
        r"cache_seqlens must be on the same device",
    ),
    "kvc-overflow": (
        KV,
        lambda: kvcache_new(cache_seqlens=CAP - 1),
        ValueError,
        r"cache_seqlens \+ seqlen_new must be <= the cache capacity 8, got 7 \+ 2",
    ),
    "kvc-overflow-no-new": (KV, lambda: kvcache(cache_seqlens=CAP + 1), ValueError, r"cache_seqlens .* capacity 8"),
    "kvc-batch-idx-dtype": (
        KV,
        lambda: kvcache(cache_batch_idx=torch.tensor([1, 0])),
        TypeError,
        r"cache_batch_idx must have dtype int32",
    ),
    "kvc-batch-idx-shape": (
        KV,
        lambda: kvcache(cache_batch_idx=i32(1)),
        ValueError,
        r"cache_batch_idx must have shape",
    ),
    "kvc-leftpad-dtype": (
        KV,
        lambda: kvcache(cache_leftpad=torch.tensor([0.0, 1.0])),
        TypeError,
        r"cache_leftpad must have dtype int32",
    ),
    "kvc-leftpad-shape": (
        KV,
        lambda: kvcache(cache_leftpad=i32(0, 0, 0)),
        ValueError,
        r"cache_leftpad must have shape",
    ),
    "kvc-bt-dtype": (
        KV,
        lambda: kvcache_paged(block_table=torch.arange(6).view(B, MAXP)),
        TypeError,
        r"block_table must have dtype int32",
    ),
    "kvc-bt-1d": (KV, lambda: kvcache_paged(block_table=i32(0, 1, 2)), ValueError, r"block_table must be 2-D"),
    "kvc-bt-rows": (
        KV,
        lambda: kvcache_paged(block_table=i32(0, 1, 2, 3, 4, 5).view(3, 2)),
        ValueError,
        r"block_table must have batch_size = 2 rows",
    ),
    "kvc-paged-rank": (
        KV,
        lambda: kvcache_paged(k_cache=rn(1, PAGES, PAGE, HK, D)),
        ValueError,
        r"k_cache must be 4-D \(num_blocks, page_block_size",
    ),
    "kvc-paged-v-pages": (
        KV,
        lambda: kvcache_paged(v_cache=rn(PAGES - 1, PAGE, HK, D)),
        ValueError,
        r"v_cache must have the same \(num_blocks, page_block_size\) as k_cache",
    ),
    "kvc-paged-batch-idx": (
        KV,
        lambda: kvcache_paged(cache_batch_idx=i32(0, 1)),
        ValueError,
        r"cache_batch_idx must be None with a paged cache",
    ),
    "kvc-paged-overflow": (
        KV,
        lambda: kvcache_paged(cache_seqlens=MAXP * PAGE + 1),
        ValueError,
        r"cache capacity 12",
    ),
    "kvc-splits-neg": (KV, lambda: kvcache(num_splits=-1), ValueError, r"num_splits must be >= 0"),
    "kvc-splits-float": (KV, lambda: kvcache(num_splits=1.5), TypeError, r"num_splits must be an int"),
    "kvc-softcap": (KV, lambda: kvcache(softcap=math.nan), ValueError, r"softcap"),
    "kvc-causal": (KV, lambda: kvcache(causal="yes"), TypeError, r"flash_attn_with_kvcache: causal must be a bool"),
    "kvc-interleaved": (KV, lambda: kvcache_new(rotary_interleaved=0), TypeError, r"rotary_interleaved must be a b"),
    "kvc-return-lse": (KV, lambda: kvcache(return_softmax_lse="yes"), TypeError, r"return_softmax_lse must be a b"),
    "kvc-seqlens-bool": (KV, lambda: kvcache(cache_seqlens=True), TypeError, r"cache_seqlens must be an int"),
    "kvc-window": (KV, lambda: kvcache(window_size=(1, 2, 3)), ValueError, r"window_size"),
    "kvc-scale": (KV, lambda: kvcache(softmax_scale=0), ValueError, r"softmax_scale"),
    "kvc-alibi": (KV, lambda: kvcache(alibi_slopes=rn(B, H + 1)), ValueError, r"alibi_slopes must have shape"),
    "kvc-sink": (KV, lambda: kvcache(learnable_sink=rn(HK)), ValueError, r"learnable_sink must have shape \(nheads,\)"),
    # --- flash_attn_combine ---
    "comb-dtype": (
        CB,
        lambda: combine(out_partial=rn(3, B, SQ, H, D, dtype=torch.float16)),
        TypeError,
        r"flash_attn_combine: out_partial must have dtype float32, got torch\.float16",
    ),
    "comb-rank": (CB, lambda: combine(out_partial=rn(3, SQ, H, D)), ValueError, r"out_partial must be 5-D"),
    "comb-lse-shape": (CB, lambda: combine(lse_partial=rn(3, B, H, SQ)), ValueError, r"lse_partial must have shape"),
    "comb-lse-dtype": (
        CB,
        lambda: combine(lse_partial=rn(3, B, SQ, H, dtype=torch.bfloat16)),
        TypeError,
        r"lse_partial must have",
    ),
    "comb-lse-device": (
        CB,
        lambda: combine(lse_partial=meta(rn(3, B, SQ, H))),
        ValueError,
        r"lse_partial must be on the same device as out_partial",
    ),
    "comb-out-dtype-arg": (CB, lambda: combine(out_dtype=torch.int32), TypeError, r"out_dtype must be"),
    "comb-out-shape": (CB, lambda: combine(out=rn(B, SQ, H, D + 1)), ValueError, r"out must have shape \(2, 3, 4, 8\)"),
    "comb-out-dtype": (
        CB,
        lambda: combine(out=rn(B, SQ, H, D), out_dtype=torch.bfloat16),
        TypeError,
        r"out must have dtype out_dtype \(torch\.bfloat16\), got torch\.float32",
    ),
}


@pytest.fixture
def backends(monkeypatch):
    """Replaces autograd and inference by stubs that record their calls."""
    calls = []

    def attention(q, k, v, opts, **kw):
        calls.append(SimpleNamespace(q=q, k=k, v=v, opts=opts, kw=kw))
        return torch.full((*q.shape[:-1], v.shape[-1]), 1.0), "lse", "probs"

    def kvcache_attention(q, k_cache, v_cache, opts, **kw):
        calls.append(SimpleNamespace(q=q, opts=opts, kw=kw))
        return torch.full((*q.shape[:-1], v_cache.shape[-1]), 2.0, device=q.device), "lse"

    def combine_(out_partial, lse_partial, **kw):
        calls.append(SimpleNamespace(kw=kw))
        return "out", "lse"

    monkeypatch.setattr(flashtron.api, "autograd", SimpleNamespace(attention=attention))
    inference = SimpleNamespace(kvcache_attention=kvcache_attention, combine=combine_)
    monkeypatch.setattr(flashtron.api, "inference", inference)
    return calls


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises_naming_the_argument(case, backends):
    fn, build, exc, match = BAD[case]
    with pytest.raises(exc, match=match) as info:
        fn(**build())
    assert not backends, "validation must fail before any dispatch"
    expected = flashtron.InputTypeError if exc is TypeError else flashtron.InputValueError
    assert type(info.value) is expected


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_a_runtime_error(case, backends):
    """Code written for flash_attn falls back to SDPA on RuntimeError (what flash_attn's checks raise):
    the same `except RuntimeError` catches every flashtron input error."""
    fn, build, _, match = BAD[case]
    try:
        fn(**build())
    except RuntimeError as exc:
        assert isinstance(exc, flashtron.InputError)
        assert re.search(match, str(exc)), str(exc)
    else:
        pytest.fail("no error raised")
    assert not backends


def test_error_classes():
    assert issubclass(flashtron.InputTypeError, TypeError) and issubclass(flashtron.InputTypeError, RuntimeError)
    assert issubclass(flashtron.InputValueError, ValueError) and issubclass(flashtron.InputValueError, RuntimeError)
    assert not issubclass(flashtron.InputTypeError, ValueError)
    assert not issubclass(flashtron.InputValueError, TypeError)


def test_helper_errors_are_runtime_errors():
    """The helpers and ops check their inputs with the same classes."""
    from flashtron.ops import apply_rotary_emb, rms_norm

    cases = [
        (
            lambda: flashtron.unpad_input(rn(2, 3, 4), rn(2, 3)),
            TypeError,
            r"unpad_input: attention_mask must be a bool",
        ),
        (lambda: flashtron.pad_input(rn(3, 4), i32(0, 1), 1, 3), ValueError, r"pad_input: indices must have one"),
        (lambda: apply_rotary_emb(rn(1, 2, 1, 4), rn(2, 3), rn(2, 3)), ValueError, r"rotary_dim"),
        (lambda: rms_norm(rn(2, 4), rn(4), eps=-1.0), ValueError, r"eps must be >= 0"),
    ]
    for call, kind, match in cases:
        with pytest.raises(kind, match=match) as info:
            call()
        assert isinstance(info.value, RuntimeError) and isinstance(info.value, flashtron.InputError)


def test_builders_are_valid(backends):
    """The unmodified builders pass validation, so each BAD case fails for its one change."""
    F(**dense())
    V(**varlen())
    V(**paged_varlen())
    KV(**kvcache())
    KV(**kvcache_new())
    KV(**kvcache_paged())
    KV(**kvcache(k_cache=rn(3, CAP, HK, D), v_cache=rn(3, CAP, HK, D), cache_batch_idx=i32(2, 0)))
    CB(**combine())
    api.flash_attn_qkvpacked_func(rn(B, SQ, 3, H, D))
    api.flash_attn_kvpacked_func(rn(B, SQ, H, D), rn(B, SK, 2, HK, D))
    api.flash_attn_varlen_qkvpacked_func(rn(7, 3, H, D), i32(0, 3, 7), 4)
    api.flash_attn_varlen_kvpacked_func(rn(7, H, D), rn(9, 2, HK, D), i32(0, 3, 7), i32(0, 4, 9), 4, 5)
    assert len(backends) == 12


# ---------------------------------------------------------------------------------------------
# Normalisation and dispatch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, left, right",
    [
        ({}, -1, -1),
        ({"causal": True}, -1, 0),
        ({"window_size": (3, 2)}, 3, 2),
        ({"window_size": [3, 2], "causal": True}, 3, 0),
        ({"window_size": (0, 0)}, 0, 0),
    ],
)
def test_window_and_causal_normalised(backends, kwargs, left, right):
    F(**dense(**kwargs))
    opts = backends[0].opts
    assert (opts.window_left, opts.window_right) == (left, right)


def test_options_passed_through(backends):
    alibi, sink = rn(B, H).abs(), rn(H)
    F(**dense(dropout_p=0.25, softcap=30, alibi_slopes=alibi, deterministic=True, learnable_sink=sink))
    opts = backends[0].opts
    assert opts.softmax_scale == pytest.approx(1 / math.sqrt(D), rel=1e-15)
    assert (opts.dropout_p, opts.softcap, opts.deterministic) == (0.25, 30.0, True)
    assert isinstance(opts.softcap, float)
    assert opts.alibi_slopes is alibi and opts.learnable_sink is sink
    F(**dense(softmax_scale=0.3))
    assert backends[1].opts.softmax_scale == 0.3


def test_default_scale_uses_qk_headdim(backends):
    F(**dense(v=rn(B, SK, HK, 24)))  # headdim_v differs: the scale still follows q
    assert backends[0].opts.softmax_scale == pytest.approx(D**-0.5)


def test_return_forms(backends):
    out = F(**dense())
    assert isinstance(out, torch.Tensor) and out.shape == (B, SQ, H, D)
    assert backends[0].kw["return_probs"] is False
    out, lse, probs = F(**dense(return_attn_probs=True))
    assert (lse, probs) == ("lse", "probs") and backends[1].kw["return_probs"] is True
    out, lse = F(**dense(return_lse=True))
    assert lse == "lse"
    assert len(F(**dense(return_lse=True, return_attn_probs=True))) == 3


def test_packed_variants_pass_views(backends):
    qkv = rn(B, SQ, 3, H, D)
    api.flash_attn_qkvpacked_func(qkv, causal=True)
    call = backends[0]
    for i, t in enumerate((call.q, call.k, call.v)):
        assert t._base is qkv and torch.equal(t, qkv[:, :, i])
    assert call.opts.window_right == 0
    q, kv = rn(B, SQ, H, D), rn(B, SK, 2, HK, D)
    api.flash_attn_kvpacked_func(q, kv)
    assert backends[1].q is q and backends[1].k._base is kv and torch.equal(backends[1].v, kv[:, :, 1])


def test_varlen_dispatch_arguments(backends):
    args = varlen(seqused_k=i32(3, 4))
    V(**args, return_lse=True)
    kw = backends[0].kw
    assert kw["cu_seqlens_q"] is args["cu_seqlens_q"] and kw["cu_seqlens_k"] is args["cu_seqlens_k"]
    assert (kw["max_seqlen_q"], kw["max_seqlen_k"]) == (4, 5)
    assert kw["seqused_k"] is args["seqused_k"] and kw["block_table"] is None
    assert backends[0].opts.alibi_slopes is None

    cu = i32(0, 3, 7)
    api.flash_attn_varlen_qkvpacked_func(rn(7, 3, H, D), cu, 4)
    kw = backends[1].kw
    assert kw["cu_seqlens_q"] is cu and kw["cu_seqlens_k"] is cu and kw["max_seqlen_k"] == 4

    paged = paged_varlen(alibi_slopes=rn(B, H))  # (batch, nheads) with batch from cu_seqlens
    V(**paged)
    assert backends[2].kw["block_table"] is paged["block_table"]


def test_kvcache_int_seqlens_become_int32_tensor(backends):
    out = KV(**kvcache_new(cache_seqlens=5, causal=True))
    kw = backends[0].kw
    seqlens = kw["cache_seqlens"]
    assert seqlens.dtype == torch.int32 and seqlens.shape == (B,) and seqlens.tolist() == [5, 5]
    assert backends[0].opts.window_right == 0 and backends[0].opts.dropout_p == 0.0
    assert isinstance(out, torch.Tensor)
    out, lse = KV(**kvcache(return_softmax_lse=True))
    assert lse == "lse"


def test_kvcache_tensor_args_never_synced(backends):
    """All-meta inputs: any .item()/.tolist() on cache_seqlens or block_table would raise."""
    m = {k: meta(v) if isinstance(v, torch.Tensor) else v for k, v in kvcache_paged().items()}
    m["cache_seqlens"] = meta(i32(100, 100))  # past the capacity: not checkable without a sync
    out = KV(**m)
    assert out.device.type == "meta"
    assert backends[0].kw["cache_seqlens"] is m["cache_seqlens"]
    assert backends[0].kw["block_table"] is m["block_table"]


def test_combine_returns_backend_result(backends):
    assert CB(**combine(out_dtype=torch.bfloat16)) == ("out", "lse")
    assert backends[0].kw == {"out": None, "out_dtype": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Accepted as flash_attn 2.8 accepts it (its wrapper, its C++ checks and its own tests)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "window, left, right",
    [
        (torch.tensor([3, 2]), 3, 2),  # flash_attn's tests pass torch.randint(0, seqlen, (2,))
        (torch.tensor([3, 2], dtype=torch.int32), 3, 2),
        ((torch.tensor(3), torch.tensor([2])), 3, 2),
        ([np.int64(3), np.int32(2)], 3, 2),
        (np.array([3, 2]), 3, 2),
        ((-2, 0), -1, 0),  # any negative side is unbounded
        ((-100, -7), -1, -1),
        (torch.tensor([-5, 4]), -1, 4),
    ],
    ids=["tensor", "int32-tensor", "0d-tensors", "numpy-ints", "numpy-array", "neg2", "neg-both", "tensor-neg"],
)
def test_window_size_as_flash_attn_takes_it(backends, window, left, right):
    F(**dense(window_size=window))
    opts = backends[0].opts
    assert (opts.window_left, opts.window_right) == (left, right)
    assert type(opts.window_left) is int and type(opts.window_right) is int
    F(**dense(window_size=window, causal=True))
    assert (backends[1].opts.window_left, backends[1].opts.window_right) == (left, 0)


@pytest.mark.parametrize("softcap", [-1.0, -30, -1e-9, torch.tensor(-2.0)], ids=str)
def test_negative_softcap_is_off(backends, softcap):
    F(**dense(softcap=softcap))
    assert backends[0].opts.softcap == 0.0
    KV(**kvcache(softcap=softcap))
    assert backends[1].opts.softcap == 0.0


def test_int_and_float_likes(backends):
    V(**varlen(max_seqlen_q=np.int64(4), max_seqlen_k=torch.tensor(5)))
    kw = backends[0].kw
    assert (kw["max_seqlen_q"], kw["max_seqlen_k"]) == (4, 5)
    assert type(kw["max_seqlen_q"]) is int and type(kw["max_seqlen_k"]) is int
    F(**dense(dropout_p=torch.tensor(0.25), softmax_scale=np.float32(0.5), softcap=torch.tensor(3)))
    opts = backends[1].opts
    assert (opts.dropout_p, opts.softmax_scale, opts.softcap) == (0.25, 0.5, 3.0)
    assert all(type(x) is float for x in (opts.dropout_p, opts.softmax_scale, opts.softcap))
    KV(**kvcache_new(cache_seqlens=np.int32(3), num_splits=torch.tensor(2)))
    kw = backends[2].kw
    assert kw["cache_seqlens"].tolist() == [3, 3] and kw["cache_seqlens"].dtype == torch.int32
    assert kw["num_splits"] == 2 and type(kw["num_splits"]) is int
    F(**dense(causal=np.True_, deterministic=np.False_))
    assert backends[3].opts.window_right == 0 and backends[3].opts.deterministic is False


def _assert_copied(got, given):
    assert got.stride(-1) == 1 and torch.equal(got, given) and got.data_ptr() != given.data_ptr()


def test_noncontiguous_last_dim_is_copied(backends):
    """As flash_attn's maybe_contiguous: any tensor with stride(-1) != 1 is copied, except the KV caches,
    which are written in place (their refusal is in BAD)."""
    q, k, v = strided(rn(B, SQ, H, D)), strided(rn(B, SK, HK, D)), strided(rn(B, SK, HK, D))
    sink = rn(H, 2)[:, 0]  # 1-D with stride 2
    F(q, k, v, learnable_sink=sink)
    call = backends[0]
    for got, given in ((call.q, q), (call.k, k), (call.v, v), (call.opts.learnable_sink, sink)):
        _assert_copied(got, given)

    qkv = strided(rn(B, SQ, 3, H, D))
    api.flash_attn_qkvpacked_func(qkv)
    assert all(t.stride(-1) == 1 for t in (backends[1].q, backends[1].k, backends[1].v))
    assert torch.equal(backends[1].v, qkv[:, :, 2])

    cu_q = i32(0, 9, 3, 9, 7, 9)[::2]  # (0, 3, 7) with stride 2
    args = varlen(q=strided(rn(7, H, D)), cu_seqlens_q=cu_q, seqused_k=i32(3, 9, 4, 9)[::2])
    V(**args)
    kw = backends[2].kw
    _assert_copied(kw["cu_seqlens_q"], cu_q)
    _assert_copied(kw["seqused_k"], args["seqused_k"])
    _assert_copied(backends[2].q, args["q"])

    bt = i32(0, 1, 2, 3, 4, 5).view(MAXP, B).t()  # (B, MAXP), stride(-1) == 2
    args = kvcache_new(
        k_cache=rn(PAGES, PAGE, HK, D), v_cache=rn(PAGES, PAGE, HK, D), block_table=bt, q=strided(rn(B, 1, H, D)),
        k=strided(rn(B, 2, HK, D)), rotary_cos=strided(rn(CAP + 4, D // 4)), rotary_sin=strided(rn(CAP + 4, D // 4)),
        cache_seqlens=i32(1, 9, 2, 9)[::2],
    )  # fmt: skip
    KV(**args)
    kw = backends[3].kw
    _assert_copied(kw["block_table"], bt)
    _assert_copied(kw["cache_seqlens"], args["cache_seqlens"])
    _assert_copied(kw["rotary_cos"], args["rotary_cos"])
    _assert_copied(kw["k"], args["k"])
    _assert_copied(backends[3].q, args["q"])


# ---------------------------------------------------------------------------------------------
# Signatures: flash_attn 2.8 (flash_attn/flash_attn_interface.py) and FA3's flash_attn_combine
# ---------------------------------------------------------------------------------------------

REQ = inspect.Parameter.empty
_TAIL = [
    ("dropout_p", 0.0),
    ("softmax_scale", None),
    ("causal", False),
    ("window_size", (-1, -1)),
    ("softcap", 0.0),
    ("alibi_slopes", None),
    ("deterministic", False),
    ("return_attn_probs", False),
]
_VARLEN_HEAD = [("cu_seqlens_q", REQ), ("cu_seqlens_k", REQ), ("max_seqlen_q", REQ), ("max_seqlen_k", REQ)]
FA2 = {
    "flash_attn_func": [("q", REQ), ("k", REQ), ("v", REQ)] + _TAIL,
    "flash_attn_qkvpacked_func": [("qkv", REQ)] + _TAIL,
    "flash_attn_kvpacked_func": [("q", REQ), ("kv", REQ)] + _TAIL,
    "flash_attn_varlen_func": [("q", REQ), ("k", REQ), ("v", REQ)] + _VARLEN_HEAD + _TAIL + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [("qkv", REQ), ("cu_seqlens", REQ), ("max_seqlen", REQ)] + _TAIL,
    "flash_attn_varlen_kvpacked_func": [("q", REQ), ("kv", REQ)] + _VARLEN_HEAD + _TAIL,
    "flash_attn_with_kvcache": [
        ("q", REQ),
        ("k_cache", REQ),
        ("v_cache", REQ),
        ("k", None),
        ("v", None),
        ("rotary_cos", None),
        ("rotary_sin", None),
        ("cache_seqlens", None),
        ("cache_batch_idx", None),
        ("cache_leftpad", None),
        ("block_table", None),
        ("softmax_scale", None),
        ("causal", False),
        ("window_size", (-1, -1)),
        ("softcap", 0.0),
        ("rotary_interleaved", True),
        ("alibi_slopes", None),
        ("num_splits", 0),
        ("return_softmax_lse", False),
    ],
    "flash_attn_combine": [("out_partial", REQ), ("lse_partial", REQ), ("out", None), ("out_dtype", None)],
}
_TRAIN_EXTRAS = [("learnable_sink", None), ("return_lse", False)]
EXTRAS = {
    "flash_attn_func": _TRAIN_EXTRAS,
    "flash_attn_qkvpacked_func": _TRAIN_EXTRAS,
    "flash_attn_kvpacked_func": _TRAIN_EXTRAS,
    "flash_attn_varlen_func": [("seqused_k", None)] + _TRAIN_EXTRAS,
    "flash_attn_varlen_qkvpacked_func": [("seqused_k", None)] + _TRAIN_EXTRAS,
    "flash_attn_varlen_kvpacked_func": [("seqused_k", None)] + _TRAIN_EXTRAS,
    "flash_attn_with_kvcache": [("learnable_sink", None), ("return_lse", False)],
    "flash_attn_combine": [],
}


@pytest.mark.parametrize("name", list(FA2))
def test_signature_matches_flash_attn(name):
    params = list(inspect.signature(getattr(api, name)).parameters.values())
    positional = [(p.name, p.default) for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keyword = [(p.name, p.default) for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert positional == FA2[name]
    assert keyword == EXTRAS[name]
    assert len(params) == len(positional) + len(keyword), "no *args / **kwargs"
    assert [p.name for p in params] == [n for n, _ in FA2[name] + EXTRAS[name]]


def test_all_lists_the_public_functions():
    assert sorted(api.__all__) == sorted(FA2)
