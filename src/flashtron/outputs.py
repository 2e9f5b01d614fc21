"""Output allocation shared by every launcher, with the tests' NaN poisoning. No triton import, so
that the PyTorch paths of the ops work where triton is not installed."""

from __future__ import annotations

import torch

_poison_outputs = False


def set_output_poisoning(enabled: bool) -> bool:
    """Fill freshly allocated outputs with NaN (tests), so memory a kernel forgot to write fails.
    Returns the previous setting."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, bool(enabled)
    return previous


def new_output(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison_outputs:
        out.fill_(float("nan"))
    return out
