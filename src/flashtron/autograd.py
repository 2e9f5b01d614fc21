"""Autograd for attention, and the choice of backend.

CUDA tensors run the Triton kernels (launch.py). CPU tensors run the exact PyTorch path (cpu.py),
or, when TRITON_INTERPRET=1, the same Triton kernels through Triton's interpreter.
The low-level `attention_forward` / `attention_backward` are usable without autograd (context
parallelism merges partial results through them).

`attention` is the one autograd path, in two forms over the same forward and backward:
- eager calls apply `_AttentionFunction`, which skips the op dispatcher (it costs 150-200 us more per
  call on this repo's 2-core CPU machine; docs/perf-notes.md, 2026-12-02);
- under torch.compile the forward and backward are the `flashtron::attn_fwd` / `attn_bwd` library
  ops with a fake implementation and register_autograd, so the graph holds one opaque node per
  launch: Dynamo cannot trace the launchers or the CPU path's host reads, and Inductor must not
  rewrite the Triton kernels' buffers.
AttnOptions travels into the ops as flat arguments generated from its fields (options.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashtron import cpu
from flashtron.dropout import draw_seed
from flashtron.env import uses_triton
from flashtron.options import OPTION_FIELDS, AttnOptions, options_from_args, options_schema, options_to_args


def attention_forward(
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
    dropout_seed=0,
):
    """out, lse = attention(q, k, v) without autograd. Shapes as in flash_attn_func /
    flash_attn_varlen_func; lse is fp32 in natural-log units, (batch, nheads, seqlen_q) or
    (nheads, total_q). With dropout, `dropout_seed` picks the mask (flashtron/dropout.py)."""
    varlen = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k)
    if uses_triton(q):
        from flashtron import launch  # imports triton: only where the Triton kernels run

        return launch.attention_forward(
            q, k, v, opts, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_seed=dropout_seed, **varlen
        )
    return cpu.attention_forward(q, k, v, opts, dropout_seed=dropout_seed, **varlen)


def attention_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    opts: AttnOptions,
    *,
    dlse=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    seqused_k=None,
    dropout_seed=0,
):
    """(dq, dk, dv, dsink) given dout (and optionally dlse, the gradient on lse). dsink is None
    without a learnable sink. Pass the forward's dropout_seed to regenerate its mask."""
    varlen = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if uses_triton(q):
        from flashtron import launch  # imports triton: only where the Triton kernels run

        dq, dk, dv, delta = launch.attention_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            opts,
            dlse=dlse,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            dropout_seed=dropout_seed,
            **varlen,
        )
        dsink = None
        if opts.learnable_sink is not None:
            dsink = _sink_grad(opts.learnable_sink, lse, delta, varlen=cu_seqlens_q is not None)
        return dq, dk, dv, dsink
    return cpu.attention_backward(dout, q, k, v, out, lse, opts, dlse=dlse, dropout_seed=dropout_seed, **varlen)


def _sink_grad(sink, lse, delta, varlen):
    """dL/dsink_h = -sum over rows of exp(sink_h - lse) * delta, with delta = rowsum(dO*O) - dlse."""
    head_axis = 0 if varlen else 1
    shape = [1] * lse.dim()
    shape[head_axis] = -1
    p_sink = torch.exp(sink.float().view(shape) - lse)
    dims = [d for d in range(lse.dim()) if d != head_axis]
    return -(p_sink * delta).sum(dim=dims).to(sink.dtype)


def gather_pages(k_pages, v_pages, block_table, cu_seqlens_k, max_seqlen_k, seqused_k):
    """Paged prefill: k/v (num_pages, page_size, nheads_k, d) and block_table (batch, max_pages) become
    varlen tensors in which sequence b owns rows [b * span, (b + 1) * span), span = the pages that
    max_seqlen_k needs. Its real length (cu_seqlens_k[b+1] - cu_seqlens_k[b], capped by seqused_k)
    becomes seqused_k, and span becomes max_seqlen_k: the backward must cover (and zero) every gathered
    row, or the rows past the longest sequence would carry unwritten gradient back into the pages.
    No host sync; indexing keeps the gradient flowing to the paged tensors. The entries are clamped
    to pages of k_pages before the gather: those past a sequence's length may hold anything (-1
    padding, say), as flash_attn never reads them; the ones in use were checked where the checks run
    (checks.reads_values), and elsewhere the clamp keeps the gather in bounds."""
    batch, page_size = block_table.shape[0], k_pages.shape[1]
    pages = min(-(-max_seqlen_k // page_size), block_table.shape[1]) if k_pages.shape[0] else 0
    index = block_table[:, :pages].reshape(-1).long().clamp(0, max(k_pages.shape[0] - 1, 0))
    k = k_pages.index_select(0, index).reshape(batch * pages * page_size, *k_pages.shape[2:])
    v = v_pages.index_select(0, index).reshape(batch * pages * page_size, *v_pages.shape[2:])
    span = pages * page_size
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).clamp(0, span)
    if seqused_k is not None:
        lengths = torch.minimum(lengths, seqused_k)
    starts = torch.arange(0, (batch + 1) * span, span, dtype=torch.int32, device=cu_seqlens_k.device)
    return k, v, starts, lengths.to(torch.int32), span


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, opts, varlen_args, dropout_seed):
        # an output without a gradient (lse, usually) reaches backward as None, not as a zero tensor: the zeros
        # and folding them into delta were two GPU launches per backward for nothing
        ctx.set_materialize_grads(False)
        out, lse = attention_forward(q, k, v, opts, dropout_seed=dropout_seed, **varlen_args)
        tensors = {name: t for name, t in varlen_args.items() if isinstance(t, torch.Tensor)}
        ctx.save_for_backward(q, k, v, out, lse, *tensors.values())
        ctx.tensor_names = list(tensors)
        ctx.scalars = {name: x for name, x in varlen_args.items() if name not in tensors}
        ctx.opts, ctx.dropout_seed = opts, dropout_seed
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *saved = ctx.saved_tensors
        varlen_args = dict(zip(ctx.tensor_names, saved), **ctx.scalars)
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dsink = attention_backward(
            dout, q, k, v, out, lse, ctx.opts, dlse=dlse, dropout_seed=ctx.dropout_seed, **varlen_args
        )
        return dq, dk, dv, dsink, None, None, None


# The ops' arguments after the tensors they differentiate: the options, the dropout seed (a 1-element
# int64 tensor, so that drawing it needs no .item() in a traced graph), then the varlen metadata.
_VARLEN = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "seqused_k")
_REST_SCHEMA = (
    f"{options_schema()}, Tensor? dropout_seed, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt? max_seqlen_q, "
    "SymInt? max_seqlen_k, Tensor? seqused_k"
)
_SINK = OPTION_FIELDS.index("learnable_sink")


def _op_args(opts: AttnOptions, dropout_seed, varlen: dict) -> tuple:
    return (*options_to_args(opts), dropout_seed, *(varlen[name] for name in _VARLEN))


def _from_op_args(rest) -> tuple[AttnOptions, int, dict]:
    """(opts, dropout seed as an int, varlen keywords) from the ops' arguments after the tensors."""
    n = len(OPTION_FIELDS)
    seed = rest[n]
    return options_from_args(rest[:n]), 0 if seed is None else int(seed.item()), dict(zip(_VARLEN, rest[n + 1 :]))


def _lse_shape(q: Tensor, varlen: dict) -> tuple:
    return (q.shape[1], q.shape[0]) if varlen["cu_seqlens_q"] is not None else (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op(
    "flashtron::attn_fwd", mutates_args=(), schema=f"(Tensor q, Tensor k, Tensor v, {_REST_SCHEMA}) -> (Tensor, Tensor)"
)
def attn_fwd(q, k, v, *rest):
    """(out, lse), contiguous, as attention_forward gives them."""
    opts, seed, varlen = _from_op_args(rest)
    out, lse = attention_forward(q, k, v, opts, dropout_seed=seed, **varlen)
    return out.contiguous(), lse.contiguous()


@attn_fwd.register_fake
def _(q, k, v, *rest):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    varlen = dict(zip(_VARLEN, rest[len(OPTION_FIELDS) + 1 :]))
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(_lse_shape(q, varlen), dtype=lse_dtype)


@torch.library.custom_op(
    "flashtron::attn_bwd",
    mutates_args=(),
    schema=f"(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_REST_SCHEMA}) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
def attn_bwd(dout, dlse, q, k, v, out, lse, *rest):
    """(dq, dk, dv, dsink), contiguous; dsink is (nheads,), or (0,) without a learnable sink."""
    opts, seed, varlen = _from_op_args(rest)
    dq, dk, dv, dsink = attention_backward(dout, q, k, v, out, lse, opts, dlse=dlse, dropout_seed=seed, **varlen)
    if dsink is None:
        dsink = q.new_zeros((0,), dtype=torch.float32)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dsink.contiguous()


@attn_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, *rest):
    sink = rest[_SINK]
    dsink = q.new_empty((0,), dtype=torch.float32) if sink is None else sink.new_empty(sink.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsink


def _setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    ctx.is_tensor = [isinstance(x, Tensor) for x in rest]
    ctx.save_for_backward(q, k, v, *output, *(x for x, t in zip(rest, ctx.is_tensor) if t))
    ctx.scalars = [None if t else x for x, t in zip(rest, ctx.is_tensor)]


def _op_backward(ctx, dout, dlse):
    q, k, v, out, lse, *saved = ctx.saved_tensors
    saved = iter(saved)
    rest = [next(saved) if t else x for x, t in zip(ctx.scalars, ctx.is_tensor)]
    dq, dk, dv, dsink = attn_bwd(dout.contiguous(), dlse, q, k, v, out, lse, *rest)
    grads = [dq, dk, dv] + [None] * len(rest)
    if ctx.is_tensor[_SINK]:
        grads[3 + _SINK] = dsink
    return tuple(grads)


attn_fwd.register_autograd(_op_backward, setup_context=_setup_context)


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
    """Differentiable attention: (out, lse, S_dmask or None). Gradients reach q, k, v and
    opts.learnable_sink; lse is differentiable too. S_dmask holds the probabilities, with the
    entries that dropout removed negated."""
    if block_table is not None:
        k, v, cu_seqlens_k, seqused_k, max_seqlen_k = gather_pages(
            k, v, block_table, cu_seqlens_k, max_seqlen_k, seqused_k
        )
    varlen = dict(
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        seqused_k=seqused_k,
    )
    if torch.compiler.is_compiling():
        seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64) if opts.dropout_p > 0 else None
        out, lse = attn_fwd(q, k, v, *_op_args(opts, seed, varlen))
        dropout_seed = 0 if seed is None else int(seed.item())
    else:
        dropout_seed = draw_seed() if opts.dropout_p > 0 else 0
        out, lse = _AttentionFunction.apply(q, k, v, opts.learnable_sink, opts, varlen, dropout_seed)
    probs = None
    if return_probs:
        from flashtron.probs import attention_probs  # only for return_attn_probs=True

        probs = attention_probs(
            q.detach(),
            k.detach(),
            lse.detach(),
            opts,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            seqused_k=seqused_k,
            dropout_seed=dropout_seed,
        )
    return out, lse, probs
