"""LayerNorm and RMSNorm with a fused residual add: one forward and one backward kernel, IS_RMS picks.

Vocabulary: a row of N features is h = x (+ residual), optionally rounded to the residual's dtype
(STORE_RESIDUAL_OUT) so that the forward and the backward normalise exactly the same values.
LayerNorm: xhat = (h - mean) * rstd, rstd = 1 / sqrt(var + eps). RMSNorm: xhat = h * rstd with
var = mean(h^2). y = xhat * w + b. Statistics are kept in ACC_DTYPE (fp32, fp64 for fp64 inputs).
Rows are one block of BLOCK_N >= N features; the tail is masked.
"""

import triton
import triton.language as tl


@triton.jit
def norm_fwd_kernel(
    X, Residual, W, B, Y, ResidualOut, Mean, Rstd,
    stride_x_row, stride_res_row, stride_y_row, stride_resout_row,
    N, eps,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL_OUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """X, Residual, Y, ResidualOut: (rows, N); W, B: (N,); Mean, Rstd: (rows,). Grid: (rows,)."""
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask = offs_n < N
    h = tl.load(X + row * stride_x_row + offs_n, mask=mask, other=0.0).to(ACC_DTYPE)  # [BLOCK_N]
    if HAS_RESIDUAL:
        h += tl.load(Residual + row * stride_res_row + offs_n, mask=mask, other=0.0).to(ACC_DTYPE)
    if STORE_RESIDUAL_OUT:
        h_out = h.to(ResidualOut.dtype.element_ty)
        tl.store(ResidualOut + row * stride_resout_row + offs_n, h_out, mask=mask)
        h = h_out.to(ACC_DTYPE)
    if IS_RMS:
        hc = h
    else:
        mean = tl.sum(h, axis=0) / N
        tl.store(Mean + row, mean)
        hc = tl.where(mask, h - mean, 0.0)
    var = tl.sum(hc * hc, axis=0) / N
    if ACC_DTYPE == tl.float32:
        # IEEE sqrt: tl.sqrt is approximate in fp32 on the GPU. The cast: under torch.compile, Inductor
        # passes the float eps as an fp64 scalar, which would promote the sum (and sqrt_rn is fp32-only).
        rstd = 1.0 / tl.sqrt_rn((var + eps).to(tl.float32))
    else:
        rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Rstd + row, rstd)
    y = hc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + offs_n, mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_BIAS:
        y = y + tl.load(B + offs_n, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(Y + row * stride_y_row + offs_n, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def norm_bwd_kernel(
    H, W, DY, DResidualOut, DX, DResidual, DW, DB, Mean, Rstd,
    stride_h_row, stride_dy_row, stride_dresout_row, stride_dx_row, stride_dres_row,
    M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_DRESIDUAL_OUT: tl.constexpr, STORE_DRESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """H: the normalised input (rows, N); DY, DResidualOut: incoming gradients of y and of the
    returned residual (rows, N); DX, DResidual: (rows, N); DW, DB: (programs, N) partial sums, one
    row per program, summed by the launcher so the result does not depend on scheduling.
    Grid: (programs,), each owning rows [pid * rows_per_program, (pid + 1) * rows_per_program)."""
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    offs_n = tl.arange(0, BLOCK_N)
    mask = offs_n < N
    if HAS_WEIGHT:
        w = tl.load(W + offs_n, mask=mask, other=0.0).to(ACC_DTYPE)
    dw = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    db = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    for row in range(row_start, row_end):
        h = tl.load(H + row * stride_h_row + offs_n, mask=mask, other=0.0).to(ACC_DTYPE)
        dy = tl.load(DY + row * stride_dy_row + offs_n, mask=mask, other=0.0).to(ACC_DTYPE)
        rstd = tl.load(Rstd + row)
        if IS_RMS:
            xhat = h * rstd
        else:
            xhat = tl.where(mask, (h - tl.load(Mean + row)) * rstd, 0.0)
        if HAS_WEIGHT:
            wdy = dy * w
            dw += dy * xhat
        else:
            wdy = dy
        if HAS_BIAS:
            db += dy
        # d(xhat) projected off the directions the normalisation removes (1 and xhat for LayerNorm).
        c1 = tl.sum(xhat * wdy, axis=0) / N
        if IS_RMS:
            dh = (wdy - xhat * c1) * rstd
        else:
            c2 = tl.sum(wdy, axis=0) / N
            dh = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DRESIDUAL_OUT:
            dh += tl.load(DResidualOut + row * stride_dresout_row + offs_n, mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(DX + row * stride_dx_row + offs_n, dh.to(DX.dtype.element_ty), mask=mask)
        if STORE_DRESIDUAL:
            tl.store(DResidual + row * stride_dres_row + offs_n, dh.to(DResidual.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(DW + pid * N + offs_n, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB + pid * N + offs_n, db, mask=mask)
