"""unpad_input / pad_input: between padded (batch, seqlen, ...) tensors and the varlen layout.

Same results as flash_attn's `bert_padding` (2.8). Both directions are differentiable: unpad is a
row gather, pad is a scatter of the rows into zeros, and autograd differentiates each as the other.
"""

from __future__ import annotations

import torch

from flashtron import checks

__all__ = ["unpad_input", "pad_input"]


def _check_mask(fn, name, mask, shape, device):
    checks.check_tensor(fn, name, mask, ndim=2, layout="(batch, seqlen)", device=device, unit_stride=False)
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise checks.InputTypeError(f"{fn}: {name} must be a bool or integer tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise checks.InputValueError(
            f"{fn}: {name} must have shape (batch, seqlen) = {tuple(shape)}, got {tuple(mask.shape)}"
        )
    return mask != 0


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """Gathers the tokens kept by the masks into the varlen layout.

    hidden_states: (batch, seqlen, ...). attention_mask: (batch, seqlen), bool / int, 1 means a
    valid token. unused_mask: (batch, seqlen) or None, 1 means a token that is allocated (kept in
    the output) but not used; place those after the valid tokens of each row.

    Returns (hidden_states, indices, cu_seqlens, max_seqlen_in_batch, seqused):
    hidden_states (total_nnz, ...) with total_nnz the tokens in attention_mask | unused_mask;
    indices (total_nnz,) int64, their positions in the flattened (batch * seqlen) input;
    cu_seqlens (batch + 1,) int32, cumulative lengths counting allocated tokens;
    max_seqlen_in_batch: int; seqused (batch,) int32, the valid tokens of each row.
    max_seqlen_in_batch is read back to the host, as in flash_attn.
    """
    fn = "unpad_input"
    checks.check_tensor(fn, "hidden_states", hidden_states, unit_stride=False)
    if hidden_states.dim() < 2:
        raise checks.InputValueError(
            f"{fn}: hidden_states must be (batch, seqlen, ...), got shape {tuple(hidden_states.shape)}"
        )
    shape = hidden_states.shape[:2]
    used = _check_mask(fn, "attention_mask", attention_mask, shape, hidden_states.device)
    kept = (
        used if unused_mask is None else used | _check_mask(fn, "unused_mask", unused_mask, shape, hidden_states.device)
    )
    seqlens = kept.sum(dim=-1, dtype=torch.int32)
    seqused = used.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(kept.flatten()).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return torch.index_select(flat, 0, indices), indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states, indices, batch, seqlen):
    """Scatters varlen rows back into a zero-padded batch; the inverse of unpad_input.

    hidden_states: (total_nnz, ...). indices: (total_nnz,), the positions returned by unpad_input.
    batch, seqlen: int, the padded shape. Returns (batch, seqlen, ...), zeros where no row lands.
    """
    fn = "pad_input"
    checks.check_tensor(fn, "hidden_states", hidden_states, unit_stride=False)
    if hidden_states.dim() < 1:
        raise checks.InputValueError(f"{fn}: hidden_states must be (total_nnz, ...), got a 0-D tensor")
    checks.check_tensor(
        fn, "indices", indices, ndim=1, layout="(total_nnz,)", device=hidden_states.device, unit_stride=False
    )
    if indices.dtype not in (torch.int64, torch.int32):
        raise checks.InputTypeError(f"{fn}: indices must have dtype int64 or int32, got {indices.dtype}")
    if indices.shape[0] != hidden_states.shape[0]:
        raise checks.InputValueError(
            f"{fn}: indices must have one entry per row of hidden_states ({tuple(hidden_states.shape[:1])}), "
            f"got shape {tuple(indices.shape)}"
        )
    batch = checks.check_int(fn, "batch", batch, minimum=0)
    seqlen = checks.check_int(fn, "seqlen", seqlen, minimum=0)
    rest = hidden_states.shape[1:]
    zeros = hidden_states.new_zeros((batch * seqlen, *rest))
    return zeros.index_copy(0, indices.long(), hidden_states).reshape(batch, seqlen, *rest)
