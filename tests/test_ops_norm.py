"""flashtron.ops rms_norm / layer_norm (and the RMSNorm / LayerNorm modules) against the formulas
written out here.

The reference is the textbook formula in fp64 on the exact sum x + residual (autograd gives its
gradients); the PyTorch baseline is the same formula run in the input dtype, residual add included.
Tolerance: FlashAttention's rule (tests/tolerance.py). Tiers: the default tier runs the PyTorch
path; `-m interpret` runs the Triton kernels on CPU tensors; `-m gpu` runs them on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashtron.ops import LayerNorm, RMSNorm, layer_norm, rms_norm
from tolerance import BWD_FACTOR, assert_fa_close


@pytest.fixture(autouse=True)
def _pytorch_path_unless_interpret(request, monkeypatch):
    """Tests not marked `interpret` check the PyTorch path, even when TRITON_INTERPRET=1 is set."""
    if request.node.get_closest_marker("interpret") is None:
        monkeypatch.setenv("FLASHTRON_FORCE_CPU_PATH", "1")


def norm_formula(x, weight, bias, residual, eps, is_rms):
    """Returns (y, h) computed in x's dtype."""
    h = x if residual is None else x + residual
    if is_rms:
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    else:
        hc = h - h.mean(-1, keepdim=True)
        y = hc * torch.rsqrt(hc.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, h


def run_ours(is_rms, x, weight, bias, residual, eps, prenorm, residual_in_fp32=False):
    if is_rms:
        return rms_norm(x, weight, eps, residual, prenorm, residual_in_fp32)
    return layer_norm(x, weight, bias, eps, residual, prenorm, residual_in_fp32)


def check_norm(device, dtype, shape, is_rms, *, has_residual=True, prenorm=True, has_weight=True,
               has_bias=True, residual_in_fp32=False, eps=1e-5):  # fmt: skip
    """Forward and backward against the fp64 formula and the in-dtype one; y and h both get gradients."""
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device) if has_residual else None
    # Weights and biases away from 1 and 0, so that a dropped weight or bias shows.
    weight = (1 + 0.5 * torch.randn(n, dtype=dtype, device=device)) if has_weight else None
    bias = torch.randn(n, dtype=dtype, device=device) if (has_bias and not is_rms) else None
    dy = torch.randn(shape, dtype=dtype, device=device)
    dh = torch.randn(shape, dtype=dtype, device=device)
    inputs = [t for t in (x, residual, weight, bias) if t is not None]

    def run(fn, cast):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in inputs]
        args = iter(leaves)
        xx = next(args)
        rr = next(args) if has_residual else None
        ww = next(args) if has_weight else None
        bb = next(args) if bias is not None else None
        y, h = fn(xx, ww, bb, rr)
        loss = (y * dy.to(y.dtype)).sum() + ((h * dh.to(h.dtype)).sum() if prenorm else 0)
        loss.backward()
        return (y.detach(), None if h is None else h.detach()), [leaf.grad for leaf in leaves]

    def ours(xx, ww, bb, rr):
        out = run_ours(is_rms, xx, ww, bb, rr, eps, prenorm, residual_in_fp32)
        return out if prenorm else (out, None)

    formula = lambda xx, ww, bb, rr: norm_formula(xx, ww, bb, rr, eps, is_rms)
    (y, h), grads = run(ours, None)
    (y_ref, h_ref), grads_ref = run(formula, torch.float64)
    (y_pt, h_pt), grads_pt = run(formula, None)

    assert y.dtype == dtype
    assert_fa_close(y, y_ref, y_pt, name="y")
    if prenorm:
        want = torch.float32 if (residual_in_fp32 and not has_residual) else dtype
        assert h.dtype == want
        assert_fa_close(h, h_ref, h_pt, name="h")
    names = ["dx", "dresidual", "dweight", "dbias"]
    names = [nm for nm, t in zip(names, (x, residual, weight, bias)) if t is not None]
    for g, g_ref, g_pt, nm in zip(grads, grads_ref, grads_pt, names):
        assert g.dtype == dtype, nm
        assert_fa_close(g, g_ref, g_pt, factor=BWD_FACTOR, name=nm)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = [True, False]
KIND_IDS = ["rms", "layer"]


# ---------------------------------------------------------------------------------------------
# Default tier: the PyTorch path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_rms", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [40, 72, 1000])
def test_cpu_residual_prenorm(is_rms, dtype, width):
    check_norm("cpu", dtype, (3, 5, width), is_rms)


@pytest.mark.parametrize("is_rms", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize(
    "opts",
    [
        dict(has_residual=False, prenorm=False),
        dict(has_residual=True, prenorm=False),
        dict(has_residual=False, prenorm=True),
        dict(has_residual=False, prenorm=True, residual_in_fp32=True),
        dict(has_weight=False, has_bias=False, prenorm=False),
        dict(has_bias=False, has_residual=False, prenorm=False),
    ],
    ids=["plain", "residual", "prenorm_only", "residual_in_fp32", "no_affine", "no_bias"],
)
def test_cpu_variants(is_rms, opts):
    check_norm("cpu", torch.bfloat16, (17, 72), is_rms, **opts)


def test_cpu_matches_torch_functional():
    x, w, b = torch.randn(6, 72, dtype=torch.float64), torch.randn(72, dtype=torch.float64), torch.randn(72).double()
    torch.testing.assert_close(layer_norm(x, w, b, 1e-5), F.layer_norm(x, (72,), w, b, 1e-5), rtol=0, atol=1e-13)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), F.rms_norm(x, (72,), w, 1e-6), rtol=0, atol=1e-13)


@pytest.mark.parametrize("is_rms", KINDS, ids=KIND_IDS)
def test_cpu_gradcheck(is_rms):
    x, r = torch.randn(2, 3, 10, dtype=torch.float64), torch.randn(2, 3, 10, dtype=torch.float64)
    w, b = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, r, w, b)]
    fn = lambda x, r, w, b: run_ours(is_rms, x, w, None if is_rms else b, r, 1e-5, True)
    assert torch.autograd.gradcheck(fn, leaves)
    fn = lambda x, w, b: run_ours(is_rms, x, w, None if is_rms else b, None, 1e-5, False)
    assert torch.autograd.gradcheck(fn, leaves[:1] + leaves[2:])


def test_cpu_only_the_residual_stream_used():
    x = torch.randn(4, 40, requires_grad=True)
    r = torch.randn(4, 40, requires_grad=True)
    _, h = rms_norm(x, torch.randn(40), residual=r, prenorm=True)
    h.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(r.grad, torch.ones_like(r))


def test_modules():
    torch.manual_seed(1)
    ln = LayerNorm(72, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x, r = torch.randn(2, 5, 72), torch.randn(2, 5, 72)
    ref = F.layer_norm(x + r, (72,), ln.weight, ln.bias, 1e-5)
    y, h = ln(x, r, prenorm=True)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    assert set(ln.state_dict()) == {"weight", "bias"}

    rms = RMSNorm(72, eps=1e-5)
    with torch.no_grad():
        rms.weight.normal_()
    torch.testing.assert_close(rms(x), F.rms_norm(x, (72,), rms.weight, 1e-5), rtol=1e-5, atol=1e-5)
    assert set(rms.state_dict()) == {"weight"}
    rms(x).sum().backward()
    assert rms.weight.grad is not None and rms.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.randn(4, 8).int()), TypeError, "x must have dtype"),
        (dict(weight=torch.randn(7)), ValueError, r"weight must have shape \(8,\)"),
        (dict(residual=torch.randn(4, 7)), ValueError, r"residual must have shape \(4, 8\)"),
        (dict(eps=-1.0), ValueError, "eps must be >= 0"),
        (dict(eps="1e-5"), TypeError, "eps must be a float"),
        (dict(prenorm=1), TypeError, "prenorm must be a bool"),
        (dict(x=torch.randn(4, 8)[:, ::2], weight=torch.randn(4)), ValueError, "stride"),
    ],
)
def test_validation(kwargs, error, match):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(8))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rms_norm(**args)


# ---------------------------------------------------------------------------------------------
# Interpreter tier: the Triton kernels on CPU tensors (TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------


@pytest.mark.interpret
@pytest.mark.parametrize("is_rms", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_residual_prenorm(kernel_device, is_rms, dtype):
    # 7 rows over 3 backward programs (3, 3, 1 rows): uneven partial sums for dweight and dbias.
    check_norm(kernel_device, dtype, (7, 40), is_rms)
    check_norm(kernel_device, dtype, (2, 72), is_rms, prenorm=False)


@pytest.mark.interpret
@pytest.mark.parametrize("is_rms", KINDS, ids=KIND_IDS)
def test_kernel_variants(kernel_device, is_rms):
    check_norm(kernel_device, torch.float16, (5, 1000), is_rms, has_residual=False, prenorm=True, residual_in_fp32=True)
    check_norm(kernel_device, torch.float32, (1, 17), is_rms, has_weight=False, has_bias=False, prenorm=False)


@pytest.mark.interpret
def test_kernel_matches_cpu_path_in_fp64(kernel_device, monkeypatch):
    x, r = torch.randn(5, 40, dtype=torch.float64), torch.randn(5, 40, dtype=torch.float64)
    w, b = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    y, h = layer_norm(x, w, b, 1e-5, r, True)
    monkeypatch.setenv("FLASHTRON_FORCE_CPU_PATH", "1")
    y_cpu, h_cpu = layer_norm(x, w, b, 1e-5, r, True)
    torch.testing.assert_close(y, y_cpu, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, h_cpu, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("is_rms", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("width", [1000, 2048, 4096, 8192])
def test_gpu_residual_prenorm(is_rms, dtype, width):
    check_norm("cuda", dtype, (4, 1023, width), is_rms)


@pytest.mark.gpu
@pytest.mark.parametrize("is_rms", KINDS, ids=KIND_IDS)
def test_gpu_residual_in_fp32_and_no_affine(is_rms):
    check_norm("cuda", torch.bfloat16, (4096, 2048), is_rms, has_residual=False, residual_in_fp32=True)
    check_norm("cuda", torch.bfloat16, (4096, 2048), is_rms, has_weight=False, has_bias=False)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    grads = []
    for _ in range(3):
        x.grad = w.grad = b.grad = None
        layer_norm(x, w, b).backward(dy)
        grads.append((x.grad.clone(), w.grad.clone(), b.grad.clone()))
    for g in grads[1:]:
        assert all(torch.equal(a, c) for a, c in zip(grads[0], g))


@pytest.mark.gpu
def test_gpu_hidden_size_limit():
    with pytest.raises(ValueError, match="hidden_size <= 16384"):
        rms_norm(torch.randn(2, 16385, device="cuda"), None)
