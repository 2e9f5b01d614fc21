"""flashtron.ops.apply_rotary_emb against the rotary formula written out here, in fp64.

The reference is flash_attn's own formulation, x * cos + rotate_half(x) * sin with the tables
repeated to the full rotary width, which is a different computation from both of ours (they rotate
the two halves, or the even and odd lanes, directly). Tolerance: FlashAttention's rule
(tests/tolerance.py), with the same formula run in the input dtype as the PyTorch baseline.
Tiers: the default tier runs the PyTorch path; `-m interpret` runs the Triton kernel on CPU tensors;
`-m gpu` runs it on CUDA with larger shapes.
"""

from __future__ import annotations

import pytest
import torch

from flashtron.ops import apply_rotary_emb
from tolerance import BWD_FACTOR, assert_fa_close


@pytest.fixture(autouse=True)
def _pytorch_path_unless_interpret(request, monkeypatch):
    """Tests not marked `interpret` check the PyTorch path, even when TRITON_INTERPRET=1 is set."""
    if request.node.get_closest_marker("interpret") is None:
        monkeypatch.setenv("FLASHTRON_FORCE_CPU_PATH", "1")


def rotate_half(x, interleaved):
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_formula(x, cos, sin, positions, interleaved):
    """x: (..., seqlen, nheads, headdim); positions: (..., seqlen) indices into cos/sin, where
    positions outside the tables leave the token unrotated. Computed in x's dtype."""
    seqlen_ro = cos.shape[0]
    inside = ((positions >= 0) & (positions < seqlen_ro))[..., None]
    idx = positions.clamp(0, seqlen_ro - 1)
    c = torch.where(inside, cos.to(x.dtype)[idx], torch.ones((), dtype=x.dtype))
    s = torch.where(inside, sin.to(x.dtype)[idx], torch.zeros((), dtype=x.dtype))
    pattern = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: torch.cat((t, t), -1))
    c, s = pattern(c).unsqueeze(-2), pattern(s).unsqueeze(-2)  # (..., seqlen, 1, rotary_dim)
    rd = c.shape[-1]
    xr = x[..., :rd]
    return torch.cat((xr * c + rotate_half(xr, interleaved) * s, x[..., rd:]), dim=-1)


def dense_positions(batch, seqlen, offsets):
    pos = torch.arange(seqlen)[None, :].expand(batch, seqlen)
    return pos + (offsets.cpu()[:, None] if isinstance(offsets, torch.Tensor) else offsets)


def varlen_positions(cu_seqlens, offsets):
    pieces = []
    for b in range(cu_seqlens.numel() - 1):
        n = int(cu_seqlens[b + 1] - cu_seqlens[b])
        off = int(offsets[b]) if isinstance(offsets, torch.Tensor) else offsets
        pieces.append(torch.arange(n) + off)
    return torch.cat(pieces)


def tables(seqlen_ro, rotary_dim, device):
    """cos/sin of real angles (fp32), as RotaryEmbedding would build them."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    freqs = torch.outer(torch.arange(seqlen_ro, dtype=torch.float64), inv_freq)
    return freqs.cos().float().to(device), freqs.sin().float().to(device)


def check_rotary(device, dtype, x_shape, rotary_dim, interleaved, offsets=0, cu_seqlens=None, seqlen_ro=None):
    """Forward and backward of apply_rotary_emb against the fp64 formula and the in-dtype one."""
    x = torch.randn(x_shape, dtype=dtype, device=device)
    if cu_seqlens is None:
        batch, seqlen = x_shape[:2]
        positions = dense_positions(batch, seqlen, offsets)
        max_seqlen, kwargs = None, {}
    else:
        positions = varlen_positions(cu_seqlens, offsets)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu_seqlens = cu_seqlens.to(device)
        kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    cos, sin = tables(seqlen_ro or int(positions.max()) + 1, rotary_dim, device)
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.to(device)
    positions = positions.to(device)
    dout = torch.randn_like(x)

    def run(fn, xin):
        xin = xin.detach().requires_grad_()
        out = fn(xin)
        out.backward(dout.to(out.dtype))
        return out.detach(), xin.grad

    out, dx = run(lambda t: apply_rotary_emb(t, cos, sin, interleaved, False, offsets, **kwargs), x)
    out_ref, dx_ref = run(lambda t: rotary_formula(t, cos.double(), sin.double(), positions, interleaved), x.double())
    out_pt, dx_pt = run(lambda t: rotary_formula(t, cos, sin, positions, interleaved), x)
    assert out.dtype == dtype and dx.dtype == dtype
    assert_fa_close(out, out_ref, out_pt, name="out")
    assert_fa_close(dx, dx_ref, dx_pt, factor=BWD_FACTOR, name="dx")
    # The features past rotary_dim are copied, bit for bit.
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])
    assert torch.equal(dx[..., rotary_dim:], dout[..., rotary_dim:])


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CU_SEQLENS = torch.tensor([0, 5, 22, 23, 40], dtype=torch.int32)  # lengths 5, 17, 1, 17


# ---------------------------------------------------------------------------------------------
# Default tier: the PyTorch path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize(
    "headdim,rotary_dim", [(40, 40), (72, 40), (40, 18)], ids=["full", "partial", "partial_odd_half"]
)
def test_cpu_dense(dtype, interleaved, headdim, rotary_dim):
    check_rotary("cpu", dtype, (2, 17, 3, headdim), rotary_dim, interleaved)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_cpu_offsets(interleaved):
    check_rotary("cpu", torch.float32, (2, 17, 2, 72), 40, interleaved, offsets=5)
    check_rotary("cpu", torch.bfloat16, (3, 17, 2, 40), 40, interleaved, offsets=torch.tensor([0, 7, 3]))


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_cpu_varlen(interleaved):
    check_rotary("cpu", torch.float32, (40, 3, 72), 40, interleaved, cu_seqlens=CU_SEQLENS)
    offsets = torch.tensor([2, 0, 9, 1], dtype=torch.int32)
    check_rotary("cpu", torch.bfloat16, (40, 2, 40), 24, interleaved, offsets=offsets, cu_seqlens=CU_SEQLENS)


def test_cpu_tensor_offsets_past_the_tables_pass_through():
    # A tensor offset cannot be checked without a device sync; positions past seqlen_ro are unrotated.
    check_rotary("cpu", torch.float32, (2, 17, 2, 40), 40, False, offsets=torch.tensor([0, 10]), seqlen_ro=20)


def test_cpu_matches_fp64_exactly_in_fp64():
    x = torch.randn(2, 17, 3, 72, dtype=torch.float64)
    cos, sin = (t.double() for t in tables(30, 40, "cpu"))
    out = apply_rotary_emb(x, cos, sin, seqlen_offsets=4)
    ref = rotary_formula(x, cos, sin, dense_positions(2, 17, 4), False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_cpu_gradcheck(interleaved):
    x = torch.randn(2, 5, 2, 10, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in tables(8, 6, "cpu"))
    offsets = torch.tensor([0, 3])
    assert torch.autograd.gradcheck(lambda t: apply_rotary_emb(t, cos, sin, interleaved, seqlen_offsets=offsets), x)
    xv = torch.randn(9, 2, 8, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    fn = lambda t: apply_rotary_emb(t, cos, sin, interleaved, cu_seqlens=cu, max_seqlen=5)
    assert torch.autograd.gradcheck(fn, xv)


def check_inplace(device):
    x = torch.randn(2, 17, 2, 72, device=device)
    cos, sin = tables(17, 40, device)
    expected = apply_rotary_emb(x, cos, sin)
    leaf = x.clone().requires_grad_()
    y = leaf * 1.0  # a non-leaf, so the in-place write is allowed
    out = apply_rotary_emb(y, cos, sin, inplace=True)
    assert out is y
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    dout = torch.randn_like(out)
    out.backward(dout)
    positions = dense_positions(2, 17, 0).to(device)
    dx_ref = rotary_formula(dout.double(), cos.double(), -sin.double(), positions, False)
    torch.testing.assert_close(leaf.grad.double(), dx_ref, rtol=0, atol=1e-5)


def test_cpu_inplace():
    check_inplace("cpu")


def test_cpu_empty_batch():
    x = torch.randn(0, 17, 2, 40)
    cos, sin = tables(17, 40, "cpu")
    assert apply_rotary_emb(x, cos, sin).shape == x.shape


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.randn(2, 4, 2, 16).half().int()), TypeError, "x must have dtype"),
        (dict(x=torch.randn(2, 4, 16)), ValueError, "x must be 4-D"),
        (dict(cos=torch.randn(8, 9), sin=torch.randn(8, 9)), ValueError, "rotary_dim"),
        (dict(sin=torch.randn(8, 3)), ValueError, "sin must have shape"),
        (dict(seqlen_offsets=5), ValueError, "seqlen_ro >= seqlen_offsets"),
        (dict(seqlen_offsets=-1), ValueError, "seqlen_offsets must be >= 0"),
        (dict(seqlen_offsets=torch.tensor([1])), ValueError, r"seqlen_offsets must have shape \(2,\)"),
        (dict(seqlen_offsets=torch.tensor([1.0, 2.0])), TypeError, "seqlen_offsets must have dtype"),
        (dict(interleaved=1), TypeError, "interleaved must be a bool"),
        (dict(max_seqlen=4), ValueError, "max_seqlen must be None"),
    ],
)
def test_validation(kwargs, error, match):
    args = dict(x=torch.randn(2, 4, 2, 16), cos=torch.randn(8, 4), sin=torch.randn(8, 4))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        apply_rotary_emb(**args)


def test_validation_varlen():
    x, cos, sin = torch.randn(9, 2, 16), torch.randn(8, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match="max_seqlen"):
        apply_rotary_emb(x, cos, sin, cu_seqlens=torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens must have dtype int32"):
        apply_rotary_emb(x, cos, sin, cu_seqlens=torch.tensor([0, 9]), max_seqlen=9)
    with pytest.raises(ValueError, match="seqlen_ro >= seqlen_offsets"):
        apply_rotary_emb(x, cos, sin, cu_seqlens=torch.tensor([0, 9], dtype=torch.int32), max_seqlen=9)


# ---------------------------------------------------------------------------------------------
# Interpreter tier: the Triton kernel on CPU tensors (TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_kernel_dense(kernel_device, dtype, interleaved):
    check_rotary(kernel_device, dtype, (2, 17, 2, 72), 40, interleaved, offsets=torch.tensor([3, 0]))
    check_rotary(kernel_device, dtype, (1, 6, 1, 40), 18, interleaved, offsets=2)  # odd rotary_dim / 2


@pytest.mark.interpret
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_kernel_varlen(kernel_device, interleaved):
    offsets = torch.tensor([2, 0, 9, 1], dtype=torch.int64)
    check_rotary(kernel_device, torch.float16, (40, 2, 40), 24, interleaved, offsets, cu_seqlens=CU_SEQLENS)


@pytest.mark.interpret
def test_kernel_past_the_tables_and_inplace(kernel_device):
    offsets = torch.tensor([0, 10])
    check_rotary(kernel_device, torch.float32, (2, 17, 1, 40), 40, True, offsets=offsets, seqlen_ro=20)
    check_inplace(kernel_device)


@pytest.mark.interpret
def test_kernel_strided_input(kernel_device):
    # A slice of packed qkv: every stride but the last is arbitrary.
    qkv = torch.randn(2, 9, 3, 2, 40, device=kernel_device)
    q = qkv[:, :, 0]
    cos, sin = tables(9, 40, kernel_device)
    out = apply_rotary_emb(q, cos, sin)
    ref = rotary_formula(q.double(), cos.double(), sin.double(), dense_positions(2, 9, 0).to(kernel_device), False)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("headdim,rotary_dim", [(128, 128), (128, 64), (72, 40), (256, 256)])
def test_gpu_dense(dtype, interleaved, headdim, rotary_dim):
    check_rotary("cuda", dtype, (4, 1027, 8, headdim), rotary_dim, interleaved, offsets=torch.tensor([0, 5, 100, 3]))


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_gpu_varlen(interleaved):
    cu = torch.tensor([0, 300, 301, 1100, 2048], dtype=torch.int32)
    check_rotary("cuda", torch.bfloat16, (2048, 16, 128), 64, interleaved, offsets=7, cu_seqlens=cu)


@pytest.mark.gpu
def test_gpu_inplace():
    check_inplace("cuda")


def _check_layers_rotary(device):
    """flash_attn.layers.rotary's functions under flashtron.layers.rotary: the packed helpers rotate q and k
    in place (k by cos_k/sin_k when given) exactly as apply_rotary_emb does on those slices, leave v alone,
    and pass gradients through (qkv a non-leaf, as a projection's output is)."""
    from flashtron.layers import rotary as layers_rotary

    assert layers_rotary.apply_rotary_emb is apply_rotary_emb is layers_rotary.apply_rotary_emb_func
    gen = torch.Generator().manual_seed(7)
    rn = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    b, s, h, d = 2, 9, 3, 16
    angles = (torch.rand(12, 6, generator=gen) * 4).to(device)
    cos, sin, cos_k, sin_k = angles.cos(), angles.sin(), (angles / 2).cos(), (angles / 2).sin()
    for interleaved in (False, True):
        base = rn(b, s, 3, h, d)
        want_q = apply_rotary_emb(base[:, :, 0], cos, sin, interleaved, seqlen_offsets=2)
        want_k = apply_rotary_emb(base[:, :, 1], cos_k, sin_k, interleaved, seqlen_offsets=2)
        qkv = base.clone()
        assert layers_rotary.apply_rotary_emb_qkv_(qkv, cos, sin, cos_k, sin_k, interleaved, 2) is qkv
        assert torch.equal(qkv[:, :, 0], want_q) and torch.equal(qkv[:, :, 1], want_k)
        assert torch.equal(qkv[:, :, 2], base[:, :, 2])
        # GQA form: 4 query heads, then 1 key head and 1 value head
        flat = rn(b, s, 6, d)
        packed = flat.clone()
        layers_rotary.apply_rotary_emb_qkv_(packed, cos, sin, interleaved=interleaved, num_heads_q=4)
        assert torch.equal(packed[:, :, :4], apply_rotary_emb(flat[:, :, :4], cos, sin, interleaved))
        assert torch.equal(packed[:, :, 4:5], apply_rotary_emb(flat[:, :, 4:5], cos, sin, interleaved))
        assert torch.equal(packed[:, :, 5:], flat[:, :, 5:])
        kv = base[:, :, :2].clone()
        layers_rotary.apply_rotary_emb_kv_(kv, cos, sin, interleaved)
        assert torch.equal(kv[:, :, 0], apply_rotary_emb(base[:, :, 0], cos, sin, interleaved))
        assert torch.equal(kv[:, :, 1], base[:, :, 1])
    leaf = rn(b, s, 3, h, d).requires_grad_()
    out = layers_rotary.apply_rotary_emb_qkv_(leaf * 1.0, cos, sin)
    grad = rn(b, s, 3, h, d)
    out.backward(grad)
    ref = leaf.detach().clone().requires_grad_()
    parts = [apply_rotary_emb(ref[:, :, 0], cos, sin), apply_rotary_emb(ref[:, :, 1], cos, sin), ref[:, :, 2]]
    torch.stack(parts, dim=2).backward(grad)
    assert torch.allclose(leaf.grad, ref.grad, atol=1e-6)


def test_flash_attn_layers_rotary_path():
    _check_layers_rotary("cpu")


@pytest.mark.interpret
def test_flash_attn_layers_rotary_path_interpret(kernel_device):
    _check_layers_rotary(kernel_device)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda r, c: r.apply_rotary_emb_qkv_(torch.randn(2, 3, 2, 4, 8), c, c), "qkv"),
        (lambda r, c: r.apply_rotary_emb_qkv_(torch.randn(2, 3, 5, 8), c, c, num_heads_q=2), "qkv"),
        (lambda r, c: r.apply_rotary_emb_kv_(torch.randn(2, 3, 3, 4, 8), c, c), "kv"),
    ],
)
def test_flash_attn_layers_rotary_bad_input(call, match):
    from flashtron.layers import rotary as layers_rotary

    with pytest.raises(RuntimeError, match=match) as info:
        call(layers_rotary, torch.ones(8, 4))
    assert isinstance(info.value, (ValueError, TypeError))
