"""torch.library custom ops around attention's forward and backward, for torch.compile.

`torch.compile` cannot trace into the Triton launchers or the CPU path's data-dependent loops, so
it would break the graph there. These ops make attention one opaque node with a known output shape:

    flashtron::attn_fwd(q, k, v, <options>, <varlen>) -> (out, lse)
    flashtron::attn_bwd(dout, dlse, q, k, v, out, lse, <options>, <varlen>) -> (dq, dk, dv, dsink)

Custom ops take tensors and scalars only, so `AttnOptions` travels flattened. `register_fake` gives
the output shapes (symbolic shapes included), `register_autograd` ties the backward to the forward.
The dropout seed is a 1-element int64 CPU tensor drawn with torch.randint, so that drawing it
needs no `.item()` in the traced graph; the op reads it inside.

`attention(q, k, v, opts, ...)` has the contract of `flashtron.autograd.attention` and calls the
ops. The public functions route through it while compiling, from the top of
`flashtron.autograd.attention` (after paged K/V has been gathered):

    if torch.compiler.is_compiling():
        from flashtron import compile as compiled
        return compiled.attention(q, k, v, opts, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                  seqused_k=seqused_k, return_probs=return_probs)

flash_attn_with_kvcache and flash_attn_combine become `flashtron::kvcache_attn` (it mutates the
caches: the in-place append) and `flashtron::combine` the same way, from the API functions. The ops
beside attention (rotary, the norms, cross entropy) register their launchers as library ops in their
own modules (`flashtron::rotary`, `norm_fwd` / `norm_bwd`, `cross_entropy_fwd` / `_bwd`), which
their autograd Functions call while compiling. In every case Inductor sees one opaque node per
launch, with shapes from a fake implementation, instead of tracing into the launchers (the CPU
paths read tensor values on the host, which cannot be traced) or rewriting the Triton kernels'
buffers through its own analysis of them: compiled and eager run the same kernels on the same
inputs. Eager calls skip the op dispatch.

Importing this module registers the attention and inference ops (no device work).
"""

import torch
from torch import Tensor

from flashtron import attention_backward, attention_forward
from flashtron.options import AttnOptions

__all__ = ["attention", "attn_fwd", "attn_bwd", "kvcache_attention", "kvcache_attn", "combine", "combine_op"]


def _options(softmax_scale, window_left, window_right, softcap, alibi_slopes, learnable_sink, dropout_p, deterministic):
    return AttnOptions(
        softmax_scale=softmax_scale,
        window_left=window_left,
        window_right=window_right,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        learnable_sink=learnable_sink,
        deterministic=deterministic,
    )


def _seed(dropout_seed: Tensor | None) -> int:
    return 0 if dropout_seed is None else int(dropout_seed.item())


@torch.library.custom_op("flashtron::attn_fwd", mutates_args=())
def attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    learnable_sink: Tensor | None,
    dropout_p: float,
    deterministic: bool,
    dropout_seed: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    seqused_k: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(out, lse), contiguous: out (batch_size, seqlen_q, nheads, headdim_v) or (total_q, nheads,
    headdim_v); lse (batch_size, nheads, seqlen_q) or (nheads, total_q), fp32 (fp64 for fp64)."""
    opts = _options(
        softmax_scale, window_left, window_right, softcap, alibi_slopes, learnable_sink, dropout_p, deterministic
    )
    out, lse = attention_forward(
        q,
        k,
        v,
        opts,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        seqused_k=seqused_k,
        dropout_seed=_seed(dropout_seed),
    )
    return out.contiguous(), lse.contiguous()


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@attn_fwd.register_fake
def _(q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes, learnable_sink, dropout_p,
      deterministic, dropout_seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k):  # fmt: skip
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    if cu_seqlens_q is None:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_lse_dtype(q))
    else:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))
    return out, lse


@torch.library.custom_op("flashtron::attn_bwd", mutates_args=())
def attn_bwd(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    learnable_sink: Tensor | None,
    dropout_p: float,
    deterministic: bool,
    dropout_seed: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    seqused_k: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dsink), contiguous; dsink is (nheads,), or (0,) without a learnable sink."""
    opts = _options(
        softmax_scale, window_left, window_right, softcap, alibi_slopes, learnable_sink, dropout_p, deterministic
    )
    dq, dk, dv, dsink = attention_backward(
        dout,
        q,
        k,
        v,
        out,
        lse,
        opts,
        dlse=dlse,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        seqused_k=seqused_k,
        dropout_seed=_seed(dropout_seed),
    )
    if dsink is None:
        dsink = q.new_zeros((0,), dtype=torch.float32)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dsink.contiguous()


@attn_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, softmax_scale, window_left, window_right, softcap, alibi_slopes,
      learnable_sink, dropout_p, deterministic, dropout_seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, seqused_k):  # fmt: skip
    if learnable_sink is None:
        dsink = q.new_empty((0,), dtype=torch.float32)
    else:
        dsink = learnable_sink.new_empty(learnable_sink.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsink


# attn_fwd's arguments after (q, k, v), passed on to attn_bwd as they are.
_EXTRA = ("softmax_scale", "window_left", "window_right", "softcap", "alibi_slopes", "learnable_sink", "dropout_p",
          "deterministic", "dropout_seed", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
          "seqused_k")  # fmt: skip
_SINK = _EXTRA.index("learnable_sink")


def _setup_context(ctx, inputs, output):
    q, k, v, *extra = inputs
    ctx.is_tensor = [isinstance(x, Tensor) for x in extra]
    ctx.save_for_backward(q, k, v, *output, *(x for x, t in zip(extra, ctx.is_tensor) if t))
    ctx.scalars = [None if t else x for x, t in zip(extra, ctx.is_tensor)]


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *saved = ctx.saved_tensors
    saved = iter(saved)
    extra = [next(saved) if t else x for x, t in zip(ctx.scalars, ctx.is_tensor)]
    dq, dk, dv, dsink = attn_bwd(dout.contiguous(), dlse, q, k, v, out, lse, *extra)
    grads = [dq, dk, dv] + [None] * len(extra)
    if ctx.is_tensor[_SINK]:
        grads[3 + _SINK] = dsink
    return tuple(grads)


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q,
    k,
    v,
    opts: AttnOptions,
    *,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    seqused_k=None,
    block_table=None,
    return_probs=False,
):
    """flashtron.autograd.attention through the custom ops: (out, lse, S_dmask or None).

    Shapes as flash_attn_func / flash_attn_varlen_func; gradients reach q, k, v,
    opts.learnable_sink, and lse is differentiable.
    """
    if block_table is not None:  # paged prefill: the pages gathered first, as flashtron.autograd does
        from flashtron.autograd import gather_pages

        k, v, cu_seqlens_k, seqused_k, max_seqlen_k = gather_pages(
            k, v, block_table, cu_seqlens_k, max_seqlen_k, seqused_k
        )
    seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64) if opts.dropout_p > 0 else None
    out, lse = attn_fwd(
        q,
        k,
        v,
        opts.softmax_scale,
        opts.window_left,
        opts.window_right,
        opts.softcap,
        opts.alibi_slopes,
        opts.learnable_sink,
        opts.dropout_p,
        opts.deterministic,
        seed,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        seqused_k,
    )
    probs = None
    if return_probs:
        from flashtron.probs import attention_probs

        probs = attention_probs(
            q.detach(),
            k.detach(),
            lse.detach(),
            opts,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            seqused_k=seqused_k,
            dropout_seed=_seed(seed),
        )
    return out, lse, probs


# ----------------------------------------------------------------------------------------------------
# Inference: flash_attn_with_kvcache and flash_attn_combine
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("flashtron::kvcache_attn", mutates_args=("k_cache", "v_cache"))
def kvcache_attn(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    rotary_cos: Tensor | None,
    rotary_sin: Tensor | None,
    cache_seqlens: Tensor | None,
    cache_batch_idx: Tensor | None,
    cache_leftpad: Tensor | None,
    block_table: Tensor | None,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Tensor | None,
    learnable_sink: Tensor | None,
    rotary_interleaved: bool,
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of flashtron.inference.kvcache_attention; appends k, v into the caches in place."""
    from flashtron import inference

    opts = _options(softmax_scale, window_left, window_right, softcap, alibi_slopes, learnable_sink, 0.0, False)
    out, lse = inference.kvcache_attention(
        q, k_cache, v_cache, opts, k=k, v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
        block_table=block_table, rotary_interleaved=rotary_interleaved, num_splits=num_splits,
    )  # fmt: skip
    return out.contiguous(), lse.contiguous()


@kvcache_attn.register_fake
def _(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
      block_table, softmax_scale, window_left, window_right, softcap, alibi_slopes, learnable_sink,
      rotary_interleaved, num_splits):  # fmt: skip
    batch, seqlen_q, nheads, _ = q.shape
    out = q.new_empty((batch, seqlen_q, nheads, v_cache.shape[-1]))
    return out, q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)


def kvcache_attention(q, k_cache, v_cache, opts: AttnOptions, **kwargs):
    """flashtron.inference.kvcache_attention's contract, through the kvcache_attn op."""
    names = ("k", "v", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx", "cache_leftpad", "block_table")
    return kvcache_attn(
        q, k_cache, v_cache, *(kwargs.get(n) for n in names), opts.softmax_scale, opts.window_left,
        opts.window_right, opts.softcap, opts.alibi_slopes, opts.learnable_sink,
        kwargs.get("rotary_interleaved", True), kwargs.get("num_splits", 0),
    )  # fmt: skip


@torch.library.custom_op("flashtron::combine", mutates_args=())
def combine_op(out_partial: Tensor, lse_partial: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(out, lse) of flashtron.inference.combine into a new output of out_dtype."""
    from flashtron import inference

    return inference.combine(out_partial, lse_partial, out_dtype=out_dtype)


@combine_op.register_fake
def _(out_partial, lse_partial, out_dtype):
    return out_partial.new_empty(out_partial.shape[1:], dtype=out_dtype), lse_partial.new_empty(lse_partial.shape[1:])


def combine(out_partial, lse_partial, out=None, out_dtype=None):
    """flashtron.inference.combine's contract, through the combine op (a given `out` is copied into)."""
    out_dtype = out_dtype or (out.dtype if out is not None else out_partial.dtype)
    result, lse = combine_op(out_partial, lse_partial, out_dtype)
    return (result if out is None else out.copy_(result)), lse
