"""Rotary position embedding, `flash_attn.layers.rotary.apply_rotary_emb`'s signature and semantics.

Layers, top to bottom: `apply_rotary_emb` checks its arguments; `_ApplyRotaryEmb` is the autograd
Function (the backward is the same rotation by -theta, the kernel's CONJUGATE flag); `_rotary`
dispatches CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) to `_rotary_triton`, the
launcher, and other CPU tensors to `_rotary_cpu`, plain PyTorch computing the same thing.

Both paths compute in fp32 (fp64 for fp64 inputs) and round once to x's dtype. Token s of
sequence b is at position s + seqlen_offsets[b]; positions outside [0, seqlen_ro) are passed
through unrotated (an int offset is checked up front; a tensor one cannot be without a device sync).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from flashtron import checks, cpu
from flashtron.configs import interpreting
from flashtron.env import uses_triton
from flashtron.outputs import new_output

_FN = "apply_rotary_emb"
_DTYPES = checks.FLOAT_DTYPES + (torch.float64,)

# Tokens per program. GPU: measured on an H100 80GB (2026-11-22), x (8, 4096, 32, 128) bf16,
# rotary_dim 128: BLOCK_M 2 / 4 / 8 / 16 / 32 ran at 1.67 / 2.74 / 2.81 / 2.79 / 2.80 TB/s (both
# layouts alike), so 8. Interpreter: 4, so the small test shapes have several blocks and a masked tail.
_BLOCK_M_GPU = 8
_BLOCK_M_INTERPRET = 4


def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: int | torch.Tensor = 0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Rotates the first rotary_dim features of x by the angles in cos and sin.

    Arguments:
        x: (batch_size, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with cu_seqlens.
        cos, sin: (seqlen_ro, rotary_dim / 2), any float dtype; rotary_dim <= headdim. Features
            past rotary_dim pass through. cos and sin get no gradient (as in flash_attn).
        interleaved: rotate pairs of even and odd features (GPT-J) instead of the first and second
            halves of the rotary features (GPT-NeoX).
        inplace: write the result into x (and return x).
        seqlen_offsets: int, or (batch_size,) int32/int64 tensor: sequence b starts at this
            position of the tables (decoding with a KV cache).
        cu_seqlens: (batch_size + 1,) int32, with cu_seqlens[-1] == total_seqlen; max_seqlen: int,
            the longest sequence.
    Returns:
        out: like x.
    """
    varlen = cu_seqlens is not None
    layout = "(total_seqlen, nheads, headdim)" if varlen else "(batch_size, seqlen, nheads, headdim)"
    checks.check_tensor(_FN, "x", x, ndim=3 if varlen else 4, layout=layout, dtype=_DTYPES)
    cs_layout = "(seqlen_ro, rotary_dim / 2)"
    checks.check_tensor(_FN, "cos", cos, ndim=2, layout=cs_layout, device=x.device, like="x")
    checks.check_tensor(_FN, "sin", sin, shape=cos.shape, layout=f"like cos {cs_layout}", device=x.device, like="x")
    for name, t in (("cos", cos), ("sin", sin)):
        if not t.is_floating_point():
            raise checks.InputTypeError(f"{_FN}: {name} must have a floating dtype, got {t.dtype}")
    rotary_dim, headdim = 2 * cos.shape[1], x.shape[-1]
    if not 2 <= rotary_dim <= headdim:
        raise checks.InputValueError(
            f"{_FN}: rotary_dim = 2 * cos.shape[1] must be in [2, headdim = {headdim}], got {rotary_dim}"
        )
    for name, flag in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(flag, bool):
            raise checks.InputTypeError(f"{_FN}: {name} must be a bool, got {type(flag).__name__} {flag!r}")
    if varlen:
        batch = checks.check_cu_seqlens(_FN, cu_seqlens, cu_seqlens, device=x.device, names=("cu_seqlens",) * 2)
        if max_seqlen is None:
            raise checks.InputValueError(f"{_FN}: max_seqlen (int) is required with cu_seqlens, got None")
        seqlen = checks.check_int(_FN, "max_seqlen", max_seqlen, minimum=0)
    else:
        if max_seqlen is not None:
            raise checks.InputValueError(f"{_FN}: max_seqlen must be None without cu_seqlens, got {max_seqlen!r}")
        batch, seqlen = x.shape[0], x.shape[1]
    if isinstance(seqlen_offsets, torch.Tensor):
        int_dtypes = (torch.int32, torch.int64)
        checks.check_tensor(
            _FN, "seqlen_offsets", seqlen_offsets, shape=(batch,), layout="(batch_size,)", dtype=int_dtypes
        )
        checks.check_tensor(_FN, "seqlen_offsets", seqlen_offsets, device=x.device, like="x")
    else:
        seqlen_offsets = checks.check_int(_FN, "seqlen_offsets", seqlen_offsets, minimum=0)
    # As flash_attn: the tables cover the sequence; an int offset is checked too (a tensor one would
    # need a device sync, and positions it pushes past the tables are left unrotated).
    first = seqlen_offsets if isinstance(seqlen_offsets, int) else 0
    if first + seqlen > cos.shape[0]:
        raise checks.InputValueError(
            f"{_FN}: cos/sin must cover every position: seqlen_ro >= seqlen_offsets + seqlen = "
            f"{first} + {seqlen}, got seqlen_ro = {cos.shape[0]}"
        )
    return _ApplyRotaryEmb.apply(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, seqlen)


class _ApplyRotaryEmb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen):
        if torch.compiler.is_compiling():
            out = _rotary_op(x, cos, sin, interleaved, seqlen_offsets, cu_seqlens, max_seqlen, False)
            out = x.copy_(out) if inplace else out
        else:
            out = _rotary(x, cos, sin, interleaved, seqlen_offsets, cu_seqlens, max_seqlen, False, inplace)
        offsets_tensor = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None
        ctx.save_for_backward(cos, sin, cu_seqlens, offsets_tensor)
        ctx.offset_int = None if offsets_tensor is not None else seqlen_offsets
        ctx.interleaved, ctx.max_seqlen = interleaved, max_seqlen
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, dout):
        cos, sin, cu_seqlens, offsets_tensor = ctx.saved_tensors
        offsets = offsets_tensor if offsets_tensor is not None else ctx.offset_int
        if dout.stride(-1) != 1:  # e.g. the expanded gradient of a sum()
            dout = dout.contiguous()
        rotary = _rotary_op if torch.compiler.is_compiling() else functools.partial(_rotary, inplace=False)
        dx = rotary(dout, cos, sin, ctx.interleaved, offsets, cu_seqlens, ctx.max_seqlen, True)
        return dx, None, None, None, None, None, None, None


def _rotary(x, cos, sin, interleaved, offsets, cu_seqlens, max_seqlen, conjugate, inplace):
    """The rotation (by -theta when conjugate); into x when inplace, else into a new tensor."""
    if not uses_triton(x):
        out = _rotary_cpu(x, cos, sin, interleaved, offsets, cu_seqlens, conjugate)
        return x.copy_(out) if inplace else out
    out = x if inplace else new_output(x.shape, x.dtype, x.device)
    rotary_dim = 2 * cos.shape[1]
    if not inplace and rotary_dim < x.shape[-1]:
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
    if x.numel() > 0:
        _rotary_triton(out, x, cos, sin, interleaved, offsets, cu_seqlens, max_seqlen, conjugate)
    return out


def _rotary_triton(out, x, cos, sin, interleaved, offsets, cu_seqlens, max_seqlen, conjugate):
    """Launcher. out, x: (batch_size, seqlen, nheads, headdim) or (total, nheads, headdim)."""
    import triton  # triton only on this path
    import triton.language as tl

    from flashtron.kernels.rotary import rotary_kernel

    varlen = cu_seqlens is not None
    batch = cu_seqlens.shape[0] - 1 if varlen else x.shape[0]
    nheads = x.shape[-2]
    offsets_tensor = isinstance(offsets, torch.Tensor)
    block_m = _BLOCK_M_INTERPRET if interpreting(x.device) else _BLOCK_M_GPU
    grid = (triton.cdiv(max_seqlen, block_m), nheads, batch)
    x_strides = (0,) + x.stride()[:2] if varlen else x.stride()[:3]
    out_strides = (0,) + out.stride()[:2] if varlen else out.stride()[:3]
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        rotary_kernel[grid](
            out, x, cos, sin, cu_seqlens, offsets if offsets_tensor else None,
            max_seqlen, cos.shape[0], cos.shape[1], 0 if offsets_tensor else offsets,
            *x_strides, *out_strides, cos.stride(0), sin.stride(0),
            IS_VARLEN=varlen, HAS_OFFSETS_TENSOR=offsets_tensor, INTERLEAVED=interleaved,
            CONJUGATE=conjugate, ACC_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32,
            BLOCK_M=block_m, BLOCK_K=triton.next_power_of_2(cos.shape[1]),
        )  # fmt: skip


def _rotary_cpu(x, cos, sin, interleaved, offsets, cu_seqlens, conjugate):
    """The same rotation in PyTorch (cpu.rotate), at each token's position."""
    if cu_seqlens is None:
        pos = torch.arange(x.shape[1], device=x.device)[None, :]  # (1, seqlen)
        pos = pos + (offsets[:, None] if isinstance(offsets, torch.Tensor) else offsets)  # (batch or 1, seqlen)
    else:
        tokens = torch.arange(x.shape[0], device=x.device)
        seq = torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True).clamp(max=cu_seqlens.shape[0] - 2)
        pos = tokens - cu_seqlens.long()[seq]
        pos = pos + (offsets[seq] if isinstance(offsets, torch.Tensor) else offsets)  # (total,)
    return cpu.rotate(x, cos, sin, pos, interleaved, conjugate)


# ---------------------------------------------------------------------------------------------
# torch.compile: the launcher as one opaque torch.library op (flashtron/autograd.py says why)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("flashtron::rotary", mutates_args=())
def _rotary_library(
    x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, offset: int, offsets: Tensor | None,
    cu_seqlens: Tensor | None, max_seqlen: int | None, conjugate: bool,
) -> Tensor:  # fmt: skip
    offsets = offset if offsets is None else offsets
    return _rotary(x, cos, sin, interleaved, offsets, cu_seqlens, max_seqlen, conjugate, False)


@_rotary_library.register_fake
def _(x, cos, sin, interleaved, offset, offsets, cu_seqlens, max_seqlen, conjugate):
    return x.new_empty(x.shape)


def _rotary_op(x, cos, sin, interleaved, offsets, cu_seqlens, max_seqlen, conjugate):
    """_rotary out of place, through the library op (an int offset and a tensor one travel apart)."""
    tensor = isinstance(offsets, torch.Tensor)
    offset, offsets = (0, offsets) if tensor else (offsets, None)
    return _rotary_library(x, cos, sin, interleaved, offset, offsets, cu_seqlens, max_seqlen, conjugate)
