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

from flashtron.options import OPTION_FIELDS, AttnOptions, options_from_args, options_schema, options_to_args

__all__ = ["kvcache_attention", "kvcache_attn", "combine", "combine_op"]


# ----------------------------------------------------------------------------------------------------
# Inference: flash_attn_with_kvcache and flash_attn_combine
# ----------------------------------------------------------------------------------------------------


_CACHE_ARGS = ("k", "v", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx", "cache_leftpad", "block_table")


@torch.library.custom_op(
    "flashtron::kvcache_attn",
    mutates_args=("k_cache", "v_cache"),
    schema="(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    + ", ".join(f"Tensor? {name}" for name in _CACHE_ARGS)
    + f", {options_schema()}, bool rotary_interleaved, SymInt num_splits) -> (Tensor, Tensor)",
)
def kvcache_attn(q, k_cache, v_cache, *rest):
    """(out, lse) of flashtron.inference.kvcache_attention; appends k, v into the caches in place."""
    from flashtron import inference

    cache_args = dict(zip(_CACHE_ARGS, rest))
    n = len(_CACHE_ARGS)
    opts = options_from_args(rest[n:])
    rotary_interleaved, num_splits = rest[n + len(OPTION_FIELDS) :]
    out, lse = inference.kvcache_attention(
        q, k_cache, v_cache, opts, rotary_interleaved=rotary_interleaved, num_splits=num_splits, **cache_args
    )
    return out.contiguous(), lse.contiguous()


@kvcache_attn.register_fake
def _(q, k_cache, v_cache, *rest):
    batch, seqlen_q, nheads, _ = q.shape
    out = q.new_empty((batch, seqlen_q, nheads, v_cache.shape[-1]))
    return out, q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)


def kvcache_attention(q, k_cache, v_cache, opts: AttnOptions, *, rotary_interleaved=True, num_splits=0, **cache_args):
    """flashtron.inference.kvcache_attention's contract, through the kvcache_attn op."""
    return kvcache_attn(
        q, k_cache, v_cache, *(cache_args.get(name) for name in _CACHE_ARGS), *options_to_args(opts),
        rotary_interleaved, num_splits,
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
