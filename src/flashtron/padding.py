"""unpad_input / pad_input: between padded (batch, seqlen, ...) tensors and the varlen layout, and the rest of
flash_attn's `bert_padding` (2.8): index_first_axis, index_put_first_axis and
unpad_input_for_concatenated_sequences (flashtron.bert_padding has them under that module's name).

Same results as flash_attn's. Every direction is differentiable: unpad is a row gather, pad is a scatter of
the rows into zeros, and autograd differentiates each as the other.
"""

from __future__ import annotations

import torch

from flashtron import checks

__all__ = [
    "unpad_input",
    "pad_input",
    "index_first_axis",
    "index_put_first_axis",
    "unpad_input_for_concatenated_sequences",
]


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


def _check_indices(fn, indices, device):
    checks.check_tensor(fn, "indices", indices, ndim=1, layout="(n,)", device=device, unit_stride=False)
    if indices.dtype not in (torch.int64, torch.int32):
        raise checks.InputTypeError(f"{fn}: indices must have dtype int64 or int32, got {indices.dtype}")


def index_first_axis(input, indices):
    """input[indices] along the first axis: input (first_axis_dim, ...), indices (n,) int64 / int32; returns
    (n, ...). The gradient goes back to the rows it came from (summed where an index repeats)."""
    fn = "index_first_axis"
    checks.check_tensor(fn, "input", input, unit_stride=False)
    if input.dim() < 2:
        raise checks.InputValueError(f"{fn}: input must have at least 2 dimensions, got shape {tuple(input.shape)}")
    _check_indices(fn, indices, input.device)
    return torch.index_select(input, 0, indices.long())


def index_put_first_axis(values, indices, first_axis_dim):
    """The rows of values at positions indices of a zero tensor of first_axis_dim rows: values (n, ...),
    indices (n,) int64 / int32, distinct; returns (first_axis_dim, ...), differentiable in values."""
    fn = "index_put_first_axis"
    checks.check_tensor(fn, "values", values, unit_stride=False)
    if values.dim() < 2:
        raise checks.InputValueError(f"{fn}: values must have at least 2 dimensions, got shape {tuple(values.shape)}")
    _check_indices(fn, indices, values.device)
    if indices.shape[0] != values.shape[0]:
        raise checks.InputValueError(
            f"{fn}: indices must have one entry per row of values ({values.shape[0]}), got shape {tuple(indices.shape)}"
        )
    first_axis_dim = checks.check_int(fn, "first_axis_dim", first_axis_dim, minimum=0)
    zeros = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return zeros.index_copy(0, indices.long(), values)


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """unpad_input for rows that each pack several sequences back to back (flash_attn's "concatenated"
    form). attention_mask_in_length: (batch, seqlen) int, row b lists the lengths of its sequences from the
    left, then zeros: [[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0]] is sequences of 2 and 3 tokens at the start of
    row 0 and of 3 and 2 at the start of row 1.

    Returns (hidden_states, indices, cu_seqlens, max_seqlen_in_batch): hidden_states (total_nnz, ...) the
    first sum(lengths) tokens of each row; indices (total_nnz,) int64 in the flattened (batch * seqlen) input;
    cu_seqlens (number of sequences + 1,) int32 over every sequence of every row; max_seqlen_in_batch an int
    (read back to the host, as in flash_attn).
    """
    fn = "unpad_input_for_concatenated_sequences"
    checks.check_tensor(fn, "hidden_states", hidden_states, unit_stride=False)
    if hidden_states.dim() < 2:
        raise checks.InputValueError(
            f"{fn}: hidden_states must be (batch, seqlen, ...), got shape {tuple(hidden_states.shape)}"
        )
    lengths = attention_mask_in_length
    checks.check_tensor(fn, "attention_mask_in_length", lengths, ndim=2, layout="(batch, seqlen)",
                        device=hidden_states.device, unit_stride=False)  # fmt: skip
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise checks.InputTypeError(f"{fn}: attention_mask_in_length must be an integer tensor, got {lengths.dtype}")
    if tuple(lengths.shape) != tuple(hidden_states.shape[:2]):
        raise checks.InputValueError(
            f"{fn}: attention_mask_in_length must have shape (batch, seqlen) = {tuple(hidden_states.shape[:2])}, "
            f"got {tuple(lengths.shape)}"
        )
    seqlen = lengths.shape[1]
    per_row = lengths.sum(dim=-1)  # the tokens each row holds, from its left end
    kept = torch.arange(seqlen, device=lengths.device)[None, :] < per_row[:, None]
    seqlens = lengths.flatten()
    seqlens = seqlens[seqlens != 0]  # the sequences, row after row, in order
    indices = torch.nonzero(kept.flatten()).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return torch.index_select(flat, 0, indices), indices, cu_seqlens, max_seqlen


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
