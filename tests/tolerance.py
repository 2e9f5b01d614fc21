"""The one tolerance rule, FlashAttention's.

Our error against a high-precision reference may be at most `factor` times the error of the same
PyTorch computation done in the input dtype (2 for outputs, 3 for gradients), plus the rounding of the
result to its own dtype (half an ulp at the reference's largest magnitude: storing the exact answer in
bf16 already costs that) and a few fp32 ulps.
"""

from __future__ import annotations

import math

import torch

FWD_FACTOR = 2.0
BWD_FACTOR = 3.0


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """The spacing of `dtype` values at `magnitude`."""
    if magnitude == 0 or not math.isfinite(magnitude):
        return torch.finfo(dtype).tiny
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_fa_close(ours, ref, pt, *, factor: float = FWD_FACTOR, name: str = "out", terms: float = 1.0) -> None:
    """ours: tensor under test; ref: fp32/fp64 reference; pt: PyTorch in the input dtype.
    terms: how much larger than 1 the intermediate terms are (gradients: sqrt(headdim), see below)."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    if ours.numel() == 0:
        return
    for label, t in (("", ours), (" reference", ref), (" PyTorch-in-dtype", pt)):
        # a NaN anywhere would make the comparisons below vacuous (NaN > x is False)
        bad = torch.isnan(t) if label else ~torch.isfinite(t)
        assert not bad.any(), f"{name}{label}: {int(bad.sum())} bad values, first at {bad.nonzero()[0].tolist()}"
    err = max_abs_err(ours, ref)
    err_pt = max_abs_err(pt, ref)
    biggest = ref.double().abs().max().item()
    atol = 0.5 * ulp(ours.dtype, biggest) + 4 * torch.finfo(torch.float32).eps * max(1.0, biggest) * terms
    if err > factor * err_pt + atol:
        where = (ours.double() - ref.double()).abs().flatten().argmax().item()
        index = list(torch.unravel_index(torch.tensor(where), ours.shape))
        raise AssertionError(
            f"{name}: max error {err:.3e} > {factor} x PyTorch-in-dtype error {err_pt:.3e} + {atol:.1e} "
            f"(worst at index {[int(i) for i in index]})"
        )


def assert_grads_close(ours, ref, pt, names=("dq", "dk", "dv")) -> None:
    # dS = P * (dP - delta): dP and delta = rowsum(dO * O) are ~sqrt(headdim) in size even where dS is
    # ~0 (one key), so their fp32 rounding, not the result's magnitude, sets the floor.
    terms = math.sqrt(max(t.shape[-1] for t in ours))
    for g, r, p, n in zip(ours, ref, pt, names):
        assert_fa_close(g, r, p, factor=BWD_FACTOR, name=n, terms=terms)
