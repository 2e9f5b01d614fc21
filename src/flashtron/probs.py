"""S_dmask for `return_attn_probs=True`: the attention probabilities, materialised.

This is for testing and inspection (it costs O(seqlen_q * seqlen_k) memory, as in flash_attn). The
probabilities are rebuilt exactly from the saved lse with the CPU path's score function, on the
tensors' own device: P = exp(s - lse), 0 where masked, and negated where dropout removed it.
"""

from __future__ import annotations

import torch

from flashtron import cpu
from flashtron.options import AttnOptions


def _dense_probs(q, k, lse, opts: AttnOptions, slopes, drop=None):
    """q (b, sq, h, d), k (b, sk, hk, d), lse (b, h, sq) -> (b, h, sq, sk) fp32."""
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    group = h // hk
    if b * sq * sk == 0:  # nothing to score (the reshapes below cannot infer a size then)
        return torch.zeros(b, h, sq, sk, dtype=torch.float32, device=q.device)
    problem = cpu.make_problem(opts, sq, sk, hk, group, slopes, torch.float32, max(sk, 1))
    logits, _ = cpu.block_logits(
        problem, cpu.heads_first(q, hk, torch.float32), cpu.heads_first(k, hk, torch.float32), 0, sq, 0
    )  # (b, hk, group, sq, sk)
    lse = lse.float().reshape(b, hk, group, sq, 1)
    probs = torch.exp(logits - torch.where(torch.isneginf(lse), 0.0, lse))
    if drop is not None:  # flash_attn marks dropped entries by their sign
        probs = torch.where(drop.keep(0, sq, 0, sk).to(probs.device), probs, -probs)
    return probs.reshape(b, h, sq, sk)


def attention_probs(
    q, k, lse, opts: AttnOptions, *, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, dropout_seed=0
):
    """Dense: (batch, nheads, seqlen_q, seqlen_k). Varlen: (batch, nheads, max_seqlen_q, max_seqlen_k),
    zero-padded."""
    if cu_seqlens_q is None:
        return _dense_probs(q, k, lse, opts, opts.alibi_slopes, cpu.dense_dropout(opts, dropout_seed, q, k))
    seqs = list(cpu.sequences(cu_seqlens_q, cu_seqlens_k, seqused_k, q.shape[0], k.shape[0]))
    max_q = max((q1 - q0 for _, q0, q1, _, _ in seqs), default=0)
    max_k = max((k1 - k0 for _, _, _, k0, k1 in seqs), default=0)
    out = torch.zeros(len(seqs), q.shape[1], max_q, max_k, dtype=torch.float32, device=q.device)
    for i, q0, q1, k0, k1 in seqs:
        if q1 == q0 or k1 == k0:  # an empty sequence: its block stays zero
            continue
        drop = cpu.varlen_dropout(opts, dropout_seed, q, k, q0, k0)
        probs = _dense_probs(q[None, q0:q1], k[None, k0:k1], lse[None, :, q0:q1], opts, cpu.slopes_of(opts, i), drop)
        out[i, :, : q1 - q0, : k1 - k0] = probs[0]
    return out
