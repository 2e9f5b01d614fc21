"""flash_attn.layers.rotary's functions under flashtron: apply_rotary_emb (also as apply_rotary_emb_func) and
the in-place helpers for packed projections, apply_rotary_emb_qkv_ and apply_rotary_emb_kv_. The rotation is
flashtron.ops.apply_rotary_emb; these only pick the q and k parts of a packed tensor. flash_attn's
RotaryEmbedding module takes a packed qkv in forward; flashtron.nn.RotaryEmbedding takes q and k, so it is not
re-exported here under flash_attn's name."""

from __future__ import annotations

from flashtron import checks
from flashtron.ops.rotary import apply_rotary_emb

apply_rotary_emb_func = apply_rotary_emb

__all__ = ["apply_rotary_emb", "apply_rotary_emb_func", "apply_rotary_emb_qkv_", "apply_rotary_emb_kv_"]


def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, seqlen_offsets=0,
                          num_heads_q=None):  # fmt: skip
    """Rotates q and k of a packed projection in place and returns qkv.

    qkv: (batch_size, seqlen, 3, nheads, headdim), or with num_heads_q (batch_size, seqlen, num_heads_q + 2 *
    nheads_k, headdim), q's heads first, then k's, then v's. cos, sin: (seqlen_ro, rotary_dim / 2) for q, and
    for k unless cos_k, sin_k are given. interleaved, seqlen_offsets: as apply_rotary_emb.
    """
    fn = "apply_rotary_emb_qkv_"
    checks.check_tensor(fn, "qkv", qkv, unit_stride=False)
    if num_heads_q is None:
        if qkv.dim() != 5 or qkv.shape[2] != 3:
            raise checks.InputValueError(
                f"{fn}: qkv must be (batch_size, seqlen, 3, nheads, headdim) without num_heads_q, got shape "
                f"{tuple(qkv.shape)}"
            )
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    else:
        num_heads_q = checks.check_int(fn, "num_heads_q", num_heads_q, minimum=1)
        if qkv.dim() != 4 or (qkv.shape[2] - num_heads_q) <= 0 or (qkv.shape[2] - num_heads_q) % 2:
            raise checks.InputValueError(
                f"{fn}: qkv must be (batch_size, seqlen, num_heads_q + 2 * nheads_k, headdim) with num_heads_q = "
                f"{num_heads_q}, got shape {tuple(qkv.shape)}"
            )
        nheads_k = (qkv.shape[2] - num_heads_q) // 2
        q, k = qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q : num_heads_q + nheads_k]
    apply_rotary_emb(q, cos, sin, interleaved, True, seqlen_offsets)
    apply_rotary_emb(k, cos if cos_k is None else cos_k, sin if sin_k is None else sin_k, interleaved, True,
                     seqlen_offsets)  # fmt: skip
    return qkv


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets=0):
    """Rotates k of a packed (batch_size, seqlen, 2, nheads_k, headdim) kv in place and returns kv."""
    fn = "apply_rotary_emb_kv_"
    checks.check_tensor(fn, "kv", kv, unit_stride=False)
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise checks.InputValueError(
            f"{fn}: kv must be (batch_size, seqlen, 2, nheads_k, headdim), got shape {tuple(kv.shape)}"
        )
    apply_rotary_emb(kv[:, :, 0], cos, sin, interleaved, True, seqlen_offsets)
    return kv
