"""RMSNorm and LayerNorm with a fused residual add, forward and backward, and their nn.Modules.

`rms_norm` / `layer_norm` check their arguments; `_NormFn` is the autograd Function; `_norm_fwd`
and `_norm_bwd` dispatch CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) to the launchers
and other CPU tensors to the PyTorch path, which computes the same thing.

Semantics (flash_attn's `layer_norm_fn` / `rms_norm_fn` without dropout): h = x + residual is
summed in fp32, rounded to the residual dtype (residual.dtype; without a residual, fp32 when
residual_in_fp32, else x.dtype) and that rounded h is normalised, so the forward and the backward
see the same values. Statistics are fp32 (fp64 for fp64 inputs). y has x's dtype. With
prenorm=True the functions return (y, h), and h is differentiable. dweight and dbias are summed
from per-program partial sums in a fixed order, so the backward is deterministic.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from flashtron import checks
from flashtron.configs import interpreting, num_sms
from flashtron.env import uses_triton
from flashtron.outputs import new_output

_DTYPES = checks.FLOAT_DTYPES + (torch.float64,)
# A row is one block; past 64 KB per row the block no longer fits in registers (as flash_attn).
_MAX_ROW_BYTES = 65536
# Backward programs under the interpreter: few, and not a divisor of the test row counts, so the
# partial-sum reduction and an uneven last program are exercised.
_BWD_PROGRAMS_INTERPRET = 3


def rms_norm(x, weight, eps=1e-6, residual=None, prenorm=False, residual_in_fp32=False):
    """RMSNorm of x (+ residual): y = h / sqrt(mean(h^2) + eps) * weight.

    Arguments:
        x: (..., hidden_size). weight: (hidden_size,) or None.
        residual: like x (any float dtype) or None; added to x before the normalisation.
        prenorm: also return h = x + residual (the next residual stream).
        residual_in_fp32: without a residual, return h in fp32.
    Returns:
        y like x, or (y, h) with prenorm.
    """
    return _norm("rms_norm", x, weight, None, eps, residual, prenorm, residual_in_fp32, is_rms=True)


def layer_norm(x, weight, bias, eps=1e-5, residual=None, prenorm=False, residual_in_fp32=False):
    """LayerNorm of x (+ residual): y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias.

    Arguments as `rms_norm`; bias: (hidden_size,) or None.
    """
    return _norm("layer_norm", x, weight, bias, eps, residual, prenorm, residual_in_fp32, is_rms=False)


class RMSNorm(torch.nn.Module):
    """flash_attn.ops.triton.layer_norm.RMSNorm: a weight of ones, forward(x, residual=None, ...)."""

    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm(x, self.weight, self.eps, residual, prenorm, residual_in_fp32)


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm's parameters and state dict; forward(x, residual=None, ...) fused."""

    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__(hidden_size, eps=eps, device=device, dtype=dtype)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return layer_norm(x, self.weight, self.bias, self.eps, residual, prenorm, residual_in_fp32)


def _norm(fn, x, weight, bias, eps, residual, prenorm, residual_in_fp32, is_rms):
    checks.check_tensor(fn, "x", x, layout="(..., hidden_size)", dtype=_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise checks.InputValueError(
            f"{fn}: x must be (..., hidden_size) with hidden_size >= 1, got shape {tuple(x.shape)}"
        )
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            checks.check_tensor(fn, name, t, shape=(n,), layout="(hidden_size,)", dtype=_DTYPES)
            checks.check_tensor(fn, name, t, device=x.device, like="x")
    if residual is not None:
        checks.check_tensor(fn, "residual", residual, shape=x.shape, layout="like x", dtype=_DTYPES)
        checks.check_tensor(fn, "residual", residual, device=x.device, like="x")
    eps = checks.check_real(fn, "eps", eps)
    if not eps >= 0:  # also rejects nan
        raise checks.InputValueError(f"{fn}: eps must be >= 0, got {eps}")
    for name, flag in (("prenorm", prenorm), ("residual_in_fp32", residual_in_fp32)):
        if not isinstance(flag, bool):
            raise checks.InputTypeError(f"{fn}: {name} must be a bool, got {type(flag).__name__} {flag!r}")
    if uses_triton(x) and n * x.element_size() > _MAX_ROW_BYTES:
        raise checks.InputValueError(
            f"{fn}: the Triton kernels take rows of at most {_MAX_ROW_BYTES} bytes, i.e. hidden_size <= "
            f"{_MAX_ROW_BYTES // x.element_size()} for {x.dtype}, got {n}"
        )
    if residual is not None:
        residual_dtype = residual.dtype
    else:
        residual_dtype = torch.promote_types(x.dtype, torch.float32) if residual_in_fp32 else x.dtype
    y, h = _NormFn.apply(
        x.reshape(-1, n), weight, bias, None if residual is None else residual.reshape(-1, n),
        eps, is_rms, residual_dtype, prenorm,
    )  # fmt: skip
    return (y.view(x.shape), h.view(x.shape)) if prenorm else y.view(x.shape)


class _NormFn(torch.autograd.Function):
    """x, residual: (rows, hidden_size). Returns (y, h if prenorm else None)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, is_rms, residual_dtype, prenorm):
        # h must be stored whenever it differs from x: it is what the backward normalises.
        store_h = prenorm or residual is not None or residual_dtype != x.dtype
        fwd = _norm_fwd_op if torch.compiler.is_compiling() else _norm_fwd
        y, h, mean, rstd = fwd(x, residual, weight, bias, eps, is_rms, residual_dtype, store_h)
        ctx.save_for_backward(h if store_h else x, weight, bias, mean, rstd)
        ctx.is_rms = is_rms
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.set_materialize_grads(False)
        return y, (h if prenorm else None)

    @staticmethod
    def backward(ctx, dy, dh_out):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:  # only the returned residual stream was used
            dy = torch.zeros_like(h, dtype=ctx.x_dtype)
        bwd = _norm_bwd_op if torch.compiler.is_compiling() else _norm_bwd
        dx, dresidual, dw, db = bwd(
            dy, dh_out, h, weight, bias, mean, rstd, ctx.is_rms, ctx.x_dtype, ctx.residual_dtype
        )
        return dx, dw, db, dresidual, None, None, None, None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_args(n: int, acc: torch.dtype) -> dict:
    """Constexprs shared by both kernels. num_warps as flash_attn picks them; on an H100 80GB
    (2026-11-22), rms_norm of (16384, 4096) bf16 ran at 2.81 TB/s forward (torch's F.rms_norm 2.26)."""
    import triton
    import triton.language as tl

    block_n = triton.next_power_of_2(n)
    return dict(
        ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_N=block_n,
        num_warps=min(max(block_n // 256, 1), 8),
    )


def _guard(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


def _norm_fwd(x, residual, weight, bias, eps, is_rms, residual_dtype, store_h):
    """x, residual: (rows, N). Returns y (rows, N), h (rows, N) or None, mean (rows,) or None, rstd."""
    if not uses_triton(x):
        return _norm_fwd_cpu(x, residual, weight, bias, eps, is_rms, residual_dtype, store_h)
    from flashtron.kernels.norm import norm_fwd_kernel  # triton only on this path

    m, n = x.shape
    acc = _acc_dtype(x.dtype)
    y = new_output((m, n), x.dtype, x.device)
    h = new_output((m, n), residual_dtype, x.device) if store_h else None
    mean = None if is_rms else new_output((m,), acc, x.device)
    rstd = new_output((m,), acc, x.device)
    if m > 0:
        with _guard(x):
            norm_fwd_kernel[(m,)](
                x, residual, weight, bias, y, h, mean, rstd,
                x.stride(0), 0 if residual is None else residual.stride(0), y.stride(0),
                0 if h is None else h.stride(0), n, eps,
                IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, STORE_RESIDUAL_OUT=store_h,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **_launch_args(n, acc),
            )  # fmt: skip
    return y, h, mean, rstd


def _norm_fwd_cpu(x, residual, weight, bias, eps, is_rms, residual_dtype, store_h):
    acc = _acc_dtype(x.dtype)
    h = x.to(acc)
    if residual is not None:
        h = h + residual.to(acc)
    h_out = None
    if store_h:
        h_out = h.to(residual_dtype, copy=True)  # never an alias of x, which is an input
        h = h_out.to(acc)
    mean = None if is_rms else h.mean(-1)
    hc = h if is_rms else h - mean[:, None]
    rstd = torch.rsqrt((hc * hc).mean(-1) + eps)
    y = hc * rstd[:, None]
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), h_out, mean, rstd


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


def _norm_bwd(dy, dh_out, h, weight, bias, mean, rstd, is_rms, x_dtype, residual_dtype):
    """dy, dh_out (or None), h: (rows, N). Returns dx, dresidual (or None), dweight, dbias."""
    if dy.stride(-1) != 1:  # e.g. the expanded gradient of a sum()
        dy = dy.contiguous()
    if dh_out is not None and dh_out.stride(-1) != 1:
        dh_out = dh_out.contiguous()
    if not uses_triton(h):
        return _norm_bwd_cpu(dy, dh_out, h, weight, bias, mean, rstd, is_rms, x_dtype, residual_dtype)
    import triton

    from flashtron.kernels.norm import norm_bwd_kernel

    m, n = h.shape
    acc = rstd.dtype
    dx = new_output((m, n), x_dtype, h.device)
    dres = None if residual_dtype is None else new_output((m, n), residual_dtype, h.device)
    programs = _BWD_PROGRAMS_INTERPRET if interpreting(h.device) else num_sms(h.device)
    rows_per_program = triton.cdiv(m, max(min(programs, m), 1))
    programs = triton.cdiv(m, rows_per_program)
    dw = None if weight is None else new_output((programs, n), acc, h.device)
    db = None if bias is None else new_output((programs, n), acc, h.device)
    if m > 0:
        with _guard(h):
            norm_bwd_kernel[(programs,)](
                h, weight, dy, dh_out, dx, dres, dw, db, mean, rstd,
                h.stride(0), dy.stride(0), 0 if dh_out is None else dh_out.stride(0), dx.stride(0),
                0 if dres is None else dres.stride(0), m, n, rows_per_program,
                IS_RMS=is_rms, HAS_DRESIDUAL_OUT=dh_out is not None, STORE_DRESIDUAL=dres is not None,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **_launch_args(n, acc),
            )  # fmt: skip
    dw = None if weight is None else dw.sum(0).to(weight.dtype)
    db = None if bias is None else db.sum(0).to(bias.dtype)
    return dx, dres, dw, db


def _norm_bwd_cpu(dy, dh_out, h, weight, bias, mean, rstd, is_rms, x_dtype, residual_dtype):
    acc = rstd.dtype
    h, dy = h.to(acc), dy.to(acc)
    xhat = (h if is_rms else h - mean[:, None]) * rstd[:, None]
    wdy = dy if weight is None else dy * weight.to(acc)
    # d(xhat) projected off the directions the normalisation removes (1 and xhat for LayerNorm).
    proj = xhat * (xhat * wdy).mean(-1, keepdim=True)
    if not is_rms:
        proj = proj + wdy.mean(-1, keepdim=True)
    dh = (wdy - proj) * rstd[:, None]
    if dh_out is not None:
        dh = dh + dh_out.to(acc)
    dres = None if residual_dtype is None else dh.to(residual_dtype, copy=True)  # never an alias of dx
    dw = None if weight is None else (dy * xhat).sum(0).to(weight.dtype)
    db = None if bias is None else dy.sum(0).to(bias.dtype)
    return dh.to(x_dtype), dres, dw, db


# ---------------------------------------------------------------------------------------------
# torch.compile: each launcher as one opaque torch.library op (flashtron/autograd.py says why).
# Custom ops cannot return None, so an absent output (no residual, no mean for RMSNorm) travels as an
# empty tensor and the caller, which knows from its flags which outputs exist, turns it back.
# ---------------------------------------------------------------------------------------------


def _encode(t: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    """t, or an empty placeholder for None."""
    return torch.empty(0, dtype=dtype, device=device) if t is None else t


@torch.library.custom_op("flashtron::norm_fwd", mutates_args=())
def _norm_fwd_library(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool,
    residual_dtype: torch.dtype, store_h: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    y, h, mean, rstd = _norm_fwd(x, residual, weight, bias, eps, is_rms, residual_dtype, store_h)
    return y, _encode(h, residual_dtype, x.device), _encode(mean, rstd.dtype, x.device), rstd


@_norm_fwd_library.register_fake
def _(x, residual, weight, bias, eps, is_rms, residual_dtype, store_h):
    (m, n), acc = x.shape, _acc_dtype(x.dtype)
    h = x.new_empty((m, n) if store_h else (0,), dtype=residual_dtype)
    return x.new_empty((m, n)), h, x.new_empty((0,) if is_rms else (m,), dtype=acc), x.new_empty((m,), dtype=acc)


def _norm_fwd_op(x, residual, weight, bias, eps, is_rms, residual_dtype, store_h):
    y, h, mean, rstd = _norm_fwd_library(x, residual, weight, bias, eps, is_rms, residual_dtype, store_h)
    return y, h if store_h else None, None if is_rms else mean, rstd


@torch.library.custom_op("flashtron::norm_bwd", mutates_args=())
def _norm_bwd_library(
    dy: Tensor, dh_out: Tensor | None, h: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor | None,
    rstd: Tensor, is_rms: bool, x_dtype: torch.dtype, residual_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    dx, dres, dw, db = _norm_bwd(dy, dh_out, h, weight, bias, mean, rstd, is_rms, x_dtype, residual_dtype)
    device = h.device
    dres = _encode(dres, residual_dtype or x_dtype, device)
    dw = _encode(dw, x_dtype if weight is None else weight.dtype, device)
    return dx, dres, dw, _encode(db, x_dtype if bias is None else bias.dtype, device)


@_norm_bwd_library.register_fake
def _(dy, dh_out, h, weight, bias, mean, rstd, is_rms, x_dtype, residual_dtype):
    (m, n), none = h.shape, (0,)
    dres = h.new_empty(none if residual_dtype is None else (m, n), dtype=residual_dtype or x_dtype)
    dw = h.new_empty(none, dtype=x_dtype) if weight is None else weight.new_empty((n,))
    db = h.new_empty(none, dtype=x_dtype) if bias is None else bias.new_empty((n,))
    return h.new_empty((m, n), dtype=x_dtype), dres, dw, db


def _norm_bwd_op(dy, dh_out, h, weight, bias, mean, rstd, is_rms, x_dtype, residual_dtype):
    dx, dres, dw, db = _norm_bwd_library(dy, dh_out, h, weight, bias, mean, rstd, is_rms, x_dtype, residual_dtype)
    return dx, None if residual_dtype is None else dres, None if weight is None else dw, None if bias is None else db
