"""Ring attention: each rank keeps its queries, and the key/value shards travel round the ring.

Forward, at step s rank r holds the keys and values of rank src = r - s (mod world). While it
computes with them (the calls that `plan.ring_blocks` lists), the batched P2P transfer of the next
shard is already in flight. Each call gives a partial (out, lse) over some of the keys; partials
merge exactly through their lse:

    lse = logaddexp(lse_a, lse_b),  out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

in fp32, with a row that has seen nothing yet keeping lse = -inf and out = 0 (no NaN).

Backward, every call recomputes its probabilities from the final lse, so attention_backward on a
block gives that block's exact share of dq, dk and dv (delta = rowsum(dout * out) uses the final
out, minus dlse). dq stays local. dk and dv travel with their keys, in fp32: rank r adds its share
to the sum it receives from r - 1 and passes it to r + 1; after world steps each sum is complete and
one last hop hands it to the shard's owner. Nothing of size seqlen^2 is ever formed.

The communicator is any object with `rank`, `world`, `exchange`, `send_next` and `recv_prev`
(comm.P2PRing, or the tests' in-process one).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from flashtron import attention_backward, attention_forward
from flashtron.distributed import comm
from flashtron.distributed.plan import ring_blocks
from flashtron.options import AttnOptions

_NEG_INF = float("-inf")


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _steps(ring, layout, seqlen_q, seqlen_k, opts):
    """(src, blocks) for each ring step of this rank."""
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world
        args = (layout, ring.world, ring.rank, src, seqlen_q, seqlen_k, opts.window_left, opts.window_right)
        yield step, ring_blocks(*args)


def _block_opts(opts: AttnOptions, blk) -> AttnOptions:
    return dataclasses.replace(opts, window_left=blk.window_left, window_right=blk.window_right)


def merge_(out: Tensor, lse: Tensor, out_blk: Tensor, lse_blk: Tensor) -> None:
    """Folds a partial result into the running one, in place. out: (batch, rows, nheads, headdim_v)
    in the accumulator dtype; lse: (batch, nheads, rows); out_blk, lse_blk: the block's, same shapes."""
    lse_new = torch.logaddexp(lse, lse_blk)
    # where both are -inf the row has seen nothing: weigh by exp(-inf - 0) = 0 instead of NaN
    ref = lse_new.masked_fill(lse_new == _NEG_INF, 0.0)
    w_old = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)
    w_blk = torch.exp(lse_blk - ref).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_old).add_(out_blk.to(out.dtype) * w_blk)
    lse.copy_(lse_new)


def forward(q, k, v, opts: AttnOptions, ring, layout: str):
    """q: (batch_size, seqlen_q_local, nheads, headdim), k: (batch_size, seqlen_k_local, nheads_k,
    headdim), v likewise with headdim_v: this rank's shards in `layout`. Returns this rank's out
    (batch_size, seqlen_q_local, nheads, headdim_v), q's dtype, and lse (batch_size, nheads,
    seqlen_q_local) fp32, exactly as attention over the whole sequence would give them."""
    b, sq_local, h, _ = q.shape
    acc = _acc_dtype(q)
    out = torch.zeros((b, sq_local, h, v.shape[-1]), dtype=acc, device=q.device)
    lse = torch.full((b, h, sq_local), _NEG_INF, dtype=acc, device=q.device)
    if q.shape[1] == 0 or k.shape[1] == 0:  # the same on every rank: nothing to send or compute
        return out.to(q.dtype), lse
    kv = (k.contiguous(), v.contiguous())  # P2P sends need contiguous tensors
    for step, blocks in _steps(ring, layout, sq_local * ring.world, k.shape[1] * ring.world, opts):
        pending = ring.exchange(kv) if step + 1 < ring.world else None
        k_cur, v_cur = kv
        for blk in blocks:
            rows, cols = slice(blk.q0, blk.q1), slice(blk.k0, blk.k1)
            o, l_ = attention_forward(q[:, rows], k_cur[:, cols], v_cur[:, cols], _block_opts(opts, blk))
            merge_(out[:, rows], lse[:, :, rows], o, l_)
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype), lse


def backward(dout, dlse, q, k, v, out, lse, opts: AttnOptions, ring, layout: str):
    """Gradients of `forward`: (dq, dk, dv) in the inputs' dtypes. dout like out; dlse like lse or
    None; out and lse are forward's results."""
    acc = _acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    if q.shape[1] == 0 or k.shape[1] == 0:
        return dq.to(q.dtype), torch.zeros_like(k), torch.zeros_like(v)
    kv = (k.contiguous(), v.contiguous())
    grad_like = (torch.empty(k.shape, dtype=acc, device=k.device), torch.empty(v.shape, dtype=acc, device=v.device))
    sends = []
    for step, blocks in _steps(ring, layout, q.shape[1] * ring.world, k.shape[1] * ring.world, opts):
        # the same issue order on every rank: the sum for this step's keys, then the next keys
        incoming = ring.recv_prev(grad_like) if step > 0 else None
        pending = ring.exchange(kv) if step + 1 < ring.world else None
        k_cur, v_cur = kv
        dk, dv = torch.zeros_like(grad_like[0]), torch.zeros_like(grad_like[1])
        for blk in blocks:
            rows, cols = slice(blk.q0, blk.q1), slice(blk.k0, blk.k1)
            dq_b, dk_b, dv_b, _ = attention_backward(
                dout[:, rows], q[:, rows], k_cur[:, cols], v_cur[:, cols], out[:, rows], lse[:, :, rows],
                _block_opts(opts, blk), dlse=None if dlse is None else dlse[:, :, rows],
            )  # fmt: skip
            dq[:, rows] += dq_b
            dk[:, cols] += dk_b
            dv[:, cols] += dv_b
        if incoming is not None:
            dk_in, dv_in = incoming.wait()
            dk += dk_in
            dv += dv_in
        if ring.world > 1:
            sends.append(ring.send_next((dk, dv)))
        if pending is not None:
            kv = pending.wait()
    if ring.world > 1:  # the last hop: the complete sums for this rank's own keys
        dk, dv = ring.recv_prev(grad_like).wait()
    for s in sends:
        s.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------------
# Library ops: one node for torch.compile, with the backward registered as autograd
# ---------------------------------------------------------------------------------------------


def _opts(softmax_scale, window_left, window_right, softcap, deterministic) -> AttnOptions:
    return AttnOptions(
        softmax_scale=softmax_scale,
        window_left=window_left,
        window_right=window_right,
        softcap=softcap,
        deterministic=deterministic,
    )


@torch.library.custom_op("flashtron::ring_attn_fwd", mutates_args=())
def ring_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
    layout: str,
    group: str,
) -> tuple[Tensor, Tensor]:
    opts = _opts(softmax_scale, window_left, window_right, softcap, deterministic)
    return forward(q, k, v, opts, comm.P2PRing(comm.resolve(group)), layout)


@ring_attn_fwd.register_fake
def _(q, k, v, softmax_scale, window_left, window_right, softcap, deterministic, layout, group):
    b, s, h, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((b, s, h, v.shape[-1])), q.new_empty((b, h, s), dtype=lse_dtype)


@torch.library.custom_op("flashtron::ring_attn_bwd", mutates_args=())
def ring_attn_bwd(
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
    deterministic: bool,
    layout: str,
    group: str,
) -> tuple[Tensor, Tensor, Tensor]:
    opts = _opts(softmax_scale, window_left, window_right, softcap, deterministic)
    return backward(dout, dlse, q, k, v, out, lse, opts, comm.P2PRing(comm.resolve(group)), layout)


@ring_attn_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, softmax_scale, window_left, window_right, softcap, deterministic, layout, group):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *ctx.extra = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = ring_attn_bwd(dout.contiguous(), dlse, q, k, v, out, lse, *ctx.extra)
    return (dq, dk, dv) + (None,) * len(ctx.extra)


ring_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def ring_attention(q, k, v, opts: AttnOptions, group, layout: str):
    """Differentiable ring attention over `group`: (out, lse), lse differentiable too."""
    return ring_attn_fwd(
        q, k, v, opts.softmax_scale, opts.window_left, opts.window_right, opts.softcap, opts.deterministic,
        layout, comm.group_name(group),
    )  # fmt: skip
