"""Rotary position embedding: one kernel for the forward rotation and, with CONJUGATE, its inverse.

Each program rotates BLOCK_M tokens of one (sequence, head). Token s of sequence b sits at position
s + offset[b] of the cos/sin tables; positions outside [0, seqlen_ro) are left unrotated (cos 1,
sin 0), exactly as the PyTorch path does. The rotated pair is (x0, x1) -> (x0 cos - x1 sin,
x0 sin + x1 cos): x0, x1 are the two halves of the first rotary_dim features (GPT-NeoX), or the
even and odd features (GPT-J, INTERLEAVED). Features past rotary_dim are not touched here.
"""

import triton
import triton.language as tl


@triton.jit
def rotary_kernel(
    Out, X, Cos, Sin, CuSeqlens, SeqlenOffsets,
    seqlen, seqlen_ro, rotary_dim_half, seqlen_offset,
    stride_xb, stride_xs, stride_xh,
    stride_ob, stride_os, stride_oh,
    stride_cos, stride_sin,
    IS_VARLEN: tl.constexpr, HAS_OFFSETS_TENSOR: tl.constexpr, INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """X, Out: (batch_size, seqlen, nheads, headdim), or (total, nheads, headdim) with CuSeqlens
    (batch_size + 1,) when IS_VARLEN. Cos, Sin: (seqlen_ro, rotary_dim / 2). SeqlenOffsets:
    (batch_size,) when HAS_OFFSETS_TENSOR, else the int seqlen_offset. BLOCK_K >= rotary_dim / 2.
    Grid: (cdiv(seqlen or max_seqlen, BLOCK_M), nheads, batch_size)."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    if IS_VARLEN:
        start = tl.load(CuSeqlens + pid_b).to(tl.int64)
        seqlen = (tl.load(CuSeqlens + pid_b + 1) - start).to(tl.int32)
        X += start * stride_xs + pid_h * stride_xh
        Out += start * stride_os + pid_h * stride_oh
    else:
        X += pid_b * stride_xb + pid_h * stride_xh
        Out += pid_b * stride_ob + pid_h * stride_oh
    if pid_m * BLOCK_M >= seqlen:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    if HAS_OFFSETS_TENSOR:
        pos = offs_m + tl.load(SeqlenOffsets + pid_b)
    else:
        pos = offs_m + seqlen_offset
    mask_m = offs_m < seqlen
    mask_cs = ((pos >= 0) & (pos < seqlen_ro))[:, None] & (offs_k < rotary_dim_half)[None, :]
    pos = tl.where(pos >= 0, pos, 0).to(tl.int64)  # masked rows must still form in-range pointers
    cos = tl.load(Cos + pos[:, None] * stride_cos + offs_k[None, :], mask=mask_cs, other=1.0)
    sin = tl.load(Sin + pos[:, None] * stride_sin + offs_k[None, :], mask=mask_cs, other=0.0)
    cos = cos.to(ACC_DTYPE)  # [BLOCK_M, BLOCK_K]
    sin = sin.to(ACC_DTYPE)  # [BLOCK_M, BLOCK_K]
    if CONJUGATE:
        sin = -sin

    rows_x = offs_m.to(tl.int64)[:, None] * stride_xs
    rows_o = offs_m.to(tl.int64)[:, None] * stride_os
    if INTERLEAVED:
        # Load the 2 * BLOCK_K features contiguously and split them into even and odd lanes.
        offs_k2 = tl.arange(0, 2 * BLOCK_K)
        mask = mask_m[:, None] & (offs_k2 < 2 * rotary_dim_half)[None, :]
        x = tl.load(X + rows_x + offs_k2[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        x0, x1 = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_K, 2]))  # [BLOCK_M, BLOCK_K] each
        o0 = x0 * cos - x1 * sin
        o1 = x0 * sin + x1 * cos
        out = tl.reshape(tl.join(o0, o1), [BLOCK_M, 2 * BLOCK_K])
        tl.store(Out + rows_o + offs_k2[None, :], out.to(Out.dtype.element_ty), mask=mask)
    else:
        mask = mask_m[:, None] & (offs_k < rotary_dim_half)[None, :]
        x0 = tl.load(X + rows_x + offs_k[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        x1 = tl.load(X + rows_x + rotary_dim_half + offs_k[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        o0 = x0 * cos - x1 * sin  # [BLOCK_M, BLOCK_K]
        o1 = x0 * sin + x1 * cos  # [BLOCK_M, BLOCK_K]
        tl.store(Out + rows_o + offs_k[None, :], o0.to(Out.dtype.element_ty), mask=mask)
        tl.store(Out + rows_o + rotary_dim_half + offs_k[None, :], o1.to(Out.dtype.element_ty), mask=mask)
