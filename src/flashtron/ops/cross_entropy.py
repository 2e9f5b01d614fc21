"""Memory-efficient cross entropy over a large vocabulary, forward and backward.

`cross_entropy_loss` checks its arguments and reduces; `_CrossEntropyFn` is the autograd Function
over per-row losses; `_ce_fwd` / `_ce_bwd` dispatch CUDA tensors (and CPU tensors under
TRITON_INTERPRET=1) to the launchers and other CPU tensors to the PyTorch path.

Memory: the forward keeps only the per-row lse (fp32); no fp32 copy of the logits is made on the
GPU. The backward writes dlogits in the logits' dtype into a fresh buffer, or, with
inplace_backward=True, over the logits themselves (they must not be needed afterwards). The PyTorch
path works on blocks of rows so that its fp32 temporaries stay small too.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from flashtron import checks
from flashtron.configs import interpreting
from flashtron.env import uses_triton
from flashtron.outputs import new_output

_FN = "cross_entropy_loss"
_DTYPES = checks.FLOAT_DTYPES + (torch.float64,)
_REDUCTIONS = ("mean", "sum", "none")
# Vocabulary chunk per program step. GPU: measured on an H100 80GB (2026-11-22), 8192 x 128256 bf16
# logits: the forward ran at 2.84 TB/s with BLOCK_V 2048 or 4096 and 4 warps (8 warps: 2.19 / 2.77;
# BLOCK_V 1024: 2.29; 8192: 2.53-2.76), and the backward did not depend on either. torch's
# F.cross_entropy forward took 3.7x as long. Interpreter: 16, so small test vocabularies take several
# chunks and a masked tail.
_BLOCK_V_GPU = 4096
_NUM_WARPS_GPU = 4
_BLOCK_V_INTERPRET = 16
# The PyTorch path's fp32 temporaries hold at most this many logits at a time.
_CPU_CHUNK_ELEMENTS = 1 << 22


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    *,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Cross entropy of logits against integer labels, as torch.nn.functional.cross_entropy.

    Arguments:
        logits: (batch, vocab_size), fp16/bf16/fp32/fp64.
        labels: (batch,), int32 or int64, in [0, vocab_size) or equal to ignore_index (values are
            not checked, which would need a device sync; others give undefined losses).
        ignore_index: rows with this label have loss 0 and zero gradient, and are left out of "mean".
        label_smoothing: eps in [0, 1]: the target is (1 - eps) * one_hot + eps / vocab_size.
        reduction: "mean" (over rows not ignored), "sum" or "none".
        inplace_backward: write dlogits over the logits in the backward, saving one buffer (eager
            only: under torch.compile the backward writes a new buffer, as a library op must).
    Returns:
        the loss, fp32 (fp64 for fp64 logits): a scalar, or (batch,) with reduction="none".
    """
    checks.check_tensor(_FN, "logits", logits, ndim=2, layout="(batch, vocab_size)", dtype=_DTYPES)
    checks.check_tensor(
        _FN, "labels", labels, shape=logits.shape[:1], layout="(batch,)", dtype=(torch.int32, torch.int64)
    )
    checks.check_tensor(_FN, "labels", labels, device=logits.device, like="logits")
    if logits.shape[1] < 1:
        raise checks.InputValueError(f"{_FN}: logits must have vocab_size >= 1, got shape {tuple(logits.shape)}")
    ignore_index = checks.check_int(_FN, "ignore_index", ignore_index)
    label_smoothing = checks.check_real(_FN, "label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise checks.InputValueError(f"{_FN}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in _REDUCTIONS:
        raise checks.InputValueError(f"{_FN}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(inplace_backward, bool):
        raise checks.InputTypeError(f"{_FN}: inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    losses = _CrossEntropyFn.apply(logits, labels, ignore_index, label_smoothing, inplace_backward)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (labels != ignore_index).sum()  # nan when every row is ignored, as torch


class _CrossEntropyFn(torch.autograd.Function):
    """logits: (batch, vocab_size); returns the per-row losses (batch,)."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, inplace_backward):
        fwd = _ce_fwd_library if torch.compiler.is_compiling() else _ce_fwd
        losses, lse = fwd(logits, labels, ignore_index, label_smoothing)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.label_smoothing, ctx.inplace = ignore_index, label_smoothing, inplace_backward
        return losses

    @staticmethod
    def backward(ctx, dlosses):
        logits, labels, lse = ctx.saved_tensors
        if torch.compiler.is_compiling():  # out of place: a library op may not write over its input
            dlogits = _ce_bwd_library(dlosses, logits, labels, lse, ctx.ignore_index, ctx.label_smoothing)
        else:
            dlogits = logits if ctx.inplace else None
            dlogits = _ce_bwd(dlosses, logits, labels, lse, ctx.ignore_index, ctx.label_smoothing, dlogits)
        return dlogits, None, None, None, None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_args(logits: torch.Tensor) -> dict:
    import triton  # triton only on the Triton path
    import triton.language as tl

    if not interpreting(logits.device):
        block_v = min(_BLOCK_V_GPU, triton.next_power_of_2(logits.shape[1]))
        extra = dict(num_warps=_NUM_WARPS_GPU)
    else:
        block_v, extra = _BLOCK_V_INTERPRET, {}
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    return dict(ACC_DTYPE=acc, BLOCK_V=block_v, **extra)


def _guard(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _ce_fwd(logits, labels, ignore_index, label_smoothing):
    """Returns losses (batch,) and lse (batch,), both in the compute dtype."""
    if not uses_triton(logits):
        return _ce_fwd_cpu(logits, labels, ignore_index, label_smoothing)
    from flashtron.kernels.cross_entropy import cross_entropy_fwd_kernel

    rows, vocab = logits.shape
    acc = _acc_dtype(logits.dtype)
    losses = new_output((rows,), acc, logits.device)
    lse = new_output((rows,), acc, logits.device)
    if rows > 0:
        with _guard(logits):
            cross_entropy_fwd_kernel[(rows,)](
                logits, labels, losses, lse, logits.stride(0), vocab, ignore_index, label_smoothing,
                **_launch_args(logits),
            )  # fmt: skip
    return losses, lse


def _ce_bwd(dlosses, logits, labels, lse, ignore_index, label_smoothing, dlogits):
    """dlosses: (batch,). Writes into dlogits when given (the logits themselves), else a new buffer."""
    if not uses_triton(logits):
        return _ce_bwd_cpu(dlosses, logits, labels, lse, ignore_index, label_smoothing, dlogits)
    import triton

    from flashtron.kernels.cross_entropy import cross_entropy_bwd_kernel

    rows, vocab = logits.shape
    if dlogits is None:
        dlogits = new_output((rows, vocab), logits.dtype, logits.device)
    args = _launch_args(logits)
    if rows > 0:
        with _guard(logits):
            cross_entropy_bwd_kernel[(rows, triton.cdiv(vocab, args["BLOCK_V"]))](
                dlogits, logits, labels, dlosses, lse, dlogits.stride(0), logits.stride(0),
                dlosses.stride(0), vocab, ignore_index, label_smoothing, **args,
            )  # fmt: skip
    return dlogits


def _row_blocks(logits):
    step = max(1, _CPU_CHUNK_ELEMENTS // logits.shape[1])
    return range(0, logits.shape[0], step), step


def _label_index(labels, vocab):
    """(labels clamped into [0, vocab) as (rows, 1) int64, whether they were inside): the kernels
    mask the label's load, so a label outside the vocabulary reads as logit 0 there and here."""
    return labels.clamp(0, vocab - 1).long()[:, None], (labels >= 0) & (labels < vocab)


def _ce_fwd_cpu(logits, labels, ignore_index, label_smoothing):
    acc = _acc_dtype(logits.dtype)
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=acc, device=logits.device)
    starts, step = _row_blocks(logits)
    for r in starts:
        z, y = logits[r : r + step].to(acc), labels[r : r + step]
        lse_blk = torch.logsumexp(z, dim=1)
        idx, inside = _label_index(y, vocab)
        z_label = torch.where(inside, z.gather(1, idx)[:, 0], 0.0)
        loss = lse_blk - (1.0 - label_smoothing) * z_label - label_smoothing / vocab * z.sum(1)
        losses[r : r + step] = torch.where(y == ignore_index, 0.0, loss)
        lse[r : r + step] = lse_blk
    return losses, lse


def _ce_bwd_cpu(dlosses, logits, labels, lse, ignore_index, label_smoothing, dlogits):
    acc = lse.dtype
    rows, vocab = logits.shape
    if dlogits is None:
        dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    starts, step = _row_blocks(logits)
    for r in starts:
        z, y = logits[r : r + step].to(acc), labels[r : r + step]
        grad = torch.exp(z - lse[r : r + step, None]) - label_smoothing / vocab
        idx, inside = _label_index(y, vocab)
        grad.scatter_add_(1, idx, torch.where(inside, label_smoothing - 1.0, 0.0).to(acc)[:, None])
        dloss = torch.where(y == ignore_index, 0.0, dlosses[r : r + step].to(acc))
        dlogits[r : r + step] = (grad * dloss[:, None]).to(logits.dtype)
    return dlogits


# ---------------------------------------------------------------------------------------------
# torch.compile: each launcher as one opaque torch.library op (flashtron/autograd.py says why)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("flashtron::cross_entropy_fwd", mutates_args=())
def _ce_fwd_library(logits: Tensor, labels: Tensor, ignore_index: int, label_smoothing: float) -> tuple[Tensor, Tensor]:
    return _ce_fwd(logits, labels, ignore_index, label_smoothing)


@_ce_fwd_library.register_fake
def _(logits, labels, ignore_index, label_smoothing):
    rows, acc = logits.shape[0], _acc_dtype(logits.dtype)
    return logits.new_empty((rows,), dtype=acc), logits.new_empty((rows,), dtype=acc)


@torch.library.custom_op("flashtron::cross_entropy_bwd", mutates_args=())
def _ce_bwd_library(
    dlosses: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, ignore_index: int, label_smoothing: float
) -> Tensor:
    return _ce_bwd(dlosses, logits, labels, lse, ignore_index, label_smoothing, None)


@_ce_bwd_library.register_fake
def _(dlosses, logits, labels, lse, ignore_index, label_smoothing):
    return logits.new_empty(logits.shape)
