"""One checker for flash_attn_func-style calls, shared by the CPU-path, interpreter and GPU tiers.

It builds q, k, v in a chosen memory layout, runs flashtron forward and backward (with a gradient on
lse too), and holds out, lse and the gradients to the FlashAttention tolerance rule against
`reference.attention_ref` in fp32 (ref) and in the input dtype (pt).
"""

from __future__ import annotations

import math

import torch

import flashtron
from flashtron.reference import attention_ref
from tolerance import assert_fa_close, assert_grads_close

LAYOUTS = ("contiguous", "bhsd", "sliced")


def make_tensor(shape, dtype, device, layout, generator=None):
    """(b, s, h, d) tensor stored as asked: contiguous; (b, h, s, d)-stored and viewed back; or sliced
    out of a wider buffer (padding on the head and feature axes) so every stride is unusual."""
    b, s, h, d = shape
    if layout == "contiguous":
        return torch.randn(shape, device=device, dtype=torch.float32, generator=generator).to(dtype)
    if layout == "bhsd":
        return torch.randn(b, h, s, d, device=device, generator=generator).to(dtype).transpose(1, 2)
    if layout == "sliced":
        wide = torch.randn(b, s, h + 3, d + 8, device=device, generator=generator).to(dtype)
        return wide[:, :, 1 : h + 1, 3 : d + 3]
    raise ValueError(layout)


def check_attention(
    batch,
    seqlen_q,
    seqlen_k,
    nheads,
    nheads_k,
    d,
    dv,
    dtype,
    device,
    *,
    causal=False,
    window=(-1, -1),
    softcap=0.0,
    alibi=None,
    sink=False,
    layouts=("contiguous",) * 3,
    backward=True,
    lse_grad=True,
):
    q = make_tensor((batch, seqlen_q, nheads, d), dtype, device, layouts[0])
    k = make_tensor((batch, seqlen_k, nheads_k, d), dtype, device, layouts[1])
    v = make_tensor((batch, seqlen_k, nheads_k, dv), dtype, device, layouts[2])
    slopes = None
    if alibi == "heads":
        slopes = torch.rand(nheads, device=device) * 0.3
    elif alibi == "batch_heads":
        slopes = torch.rand(batch, nheads, device=device) * 0.3
    sinks = torch.randn(nheads, device=device) if sink else None
    kwargs = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)

    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    sink_leaf = sinks.detach().clone().requires_grad_(backward) if sink else None
    out, lse = flashtron.flash_attn_func(*leaves, learnable_sink=sink_leaf, return_lse=True, **kwargs)

    # fp32 inputs need an fp64 reference: an fp32 one has the same precision as PyTorch-in-dtype
    ref_dtype = torch.float64 if dtype == torch.float32 else None

    def reference(upcast):
        cast = (lambda t: t.to(ref_dtype)) if upcast and ref_dtype else (lambda t: t)
        ins = [cast(t.detach()).clone().requires_grad_(backward) for t in (q, k, v)]
        s = cast(sink_leaf.detach()).clone().requires_grad_(backward) if sink else None
        o, lse_, _ = attention_ref(*ins, learnable_sink=s, upcast=upcast, reorder_ops=not upcast, **kwargs)
        return o, lse_, ins + ([s] if sink else [])

    out_ref, lse_ref, ins_ref = reference(True)
    out_pt, lse_pt, ins_pt = reference(False)
    assert out.dtype == dtype and out.shape == (batch, seqlen_q, nheads, dv)
    assert lse.dtype == torch.float32 and lse.shape == (batch, nheads, seqlen_q)
    assert_fa_close(out, out_ref, out_pt, name="out")
    # -inf exactly where the reference has it (empty rows), finite and close elsewhere
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)), "lse: -inf pattern differs"
    finite = torch.isfinite(lse_ref)
    assert_fa_close(lse[finite], lse_ref[finite], lse_pt.float()[finite], name="lse")
    if not backward:
        return
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if lse_grad else torch.zeros_like(lse)
    dlse_ref = torch.where(finite, dlse, 0.0)  # no gradient flows through an empty row's -inf
    grads = torch.autograd.grad((out, lse), leaves + ([sink_leaf] if sink else []), (dout, dlse_ref))
    grads_ref = torch.autograd.grad((out_ref, lse_ref), ins_ref, (dout.to(out_ref.dtype), dlse_ref.to(lse_ref.dtype)))
    grads_pt = torch.autograd.grad((out_pt, lse_pt), ins_pt, (dout, dlse_ref.to(lse_pt.dtype)))
    assert_grads_close(grads[:3], grads_ref[:3], grads_pt[:3])
    if sink:
        assert_fa_close(grads[3], grads_ref[3], grads_pt[3], factor=3.0, name="dsink")


def default_scale(d):
    return 1.0 / math.sqrt(d)


def poison_unread_keys(k, v, cu_seqlens_q, cu_seqlens_k, seqused_k=None, pad=0):
    """Varlen k, v (total_k, nheads_k, d) with the rows that no query may read poisoned, K NaN and V Inf (0 x
    Inf is NaN): the rows past seqused_k and every row of a sequence without queries; and `pad` rows of NaN
    appended (padding after cu_seqlens_k[-1]). A kernel that lets such a key into the softmax, or its V row into
    P V even with P = 0, puts NaN into out. The reference slices each sequence and never sees them."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    unread = torch.zeros(k.shape[0], dtype=torch.bool)
    for b in range(len(cu_q) - 1):
        used = cu_k[b + 1] - cu_k[b] if seqused_k is None else int(seqused_k[b])
        unread[cu_k[b] + (used if cu_q[b + 1] > cu_q[b] else 0) : cu_k[b + 1]] = True
    unread = unread.to(k.device)
    k = k.masked_fill(unread[:, None, None], float("nan"))
    v = v.masked_fill(unread[:, None, None], float("inf"))
    padding = torch.full((pad, *k.shape[1:]), float("nan"), dtype=k.dtype, device=k.device)
    return torch.cat([k, padding]), torch.cat([v, padding])
