"""flash_attn_func and friends through the public API, in three tiers.

- interpret: the Triton kernels on CPU tensors (TRITON_INTERPRET=1), tiny awkward shapes.
- default: the same calls on CPU tensors take the PyTorch path.
- gpu: the full grid on CUDA.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import flashtron
from attention_cases import LAYOUTS, check_attention
from flashtron.reference import attention_ref, attention_varlen_ref
from tolerance import assert_fa_close

# (seqlen_q, seqlen_k): equal, sq < sk, sq > sk (rows with nothing to see under causal), single token
TINY_SEQLENS = [(1, 1), (17, 17), (33, 17), (17, 80), (1, 33), (80, 80)]
TINY_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _tiny_cases():
    """A pairwise-style walk over the features, so each one meets every seqlen pair and dtype without
    the full product (the interpreter runs about a case per second)."""
    heads = [(4, 4, 40, 40), (4, 2, 16, 16), (4, 1, 72, 72), (2, 2, 40, 24)]  # (h, hk, d, dv): MHA, GQA, MQA, dv != d
    features = [
        dict(),
        dict(causal=True),
        dict(window=(5, 3)),
        dict(window=(7, -1)),
        dict(causal=True, window=(4, -1)),
        dict(softcap=2.0, alibi="heads"),
        dict(causal=True, alibi="batch_heads", sink=True),
        dict(window=(-1, 2), softcap=1.5, sink=True),
    ]
    cases = []
    for i, (seqlens, dtype) in enumerate(itertools.product(TINY_SEQLENS, TINY_DTYPES)):
        feat = features[i % len(features)]
        shape = heads[i % len(heads)]
        layouts = (LAYOUTS[i % 3], LAYOUTS[(i + 1) % 3], LAYOUTS[(i + 2) % 3])
        cases.append((seqlens, dtype, shape, feat, layouts))
    return cases


def _case_id(case):
    (sq, sk), dtype, (h, hk, d, dv), feat, layouts = case
    name = "-".join(f"{k}={v}" for k, v in feat.items()) or "plain"
    return f"{sq}x{sk}-{str(dtype)[6:]}-h{h}k{hk}d{d}v{dv}-{name}-{'/'.join(lay[:2] for lay in layouts)}"


TINY_CASES = _tiny_cases()


@pytest.mark.interpret
@pytest.mark.parametrize("case", TINY_CASES, ids=[_case_id(c) for c in TINY_CASES])
def test_kernels_interpreted(case, kernel_device):
    (sq, sk), dtype, (h, hk, d, dv), feat, layouts = case
    check_attention(2, sq, sk, h, hk, d, dv, dtype, kernel_device, layouts=layouts, **feat)


@pytest.mark.interpret
@pytest.mark.parametrize("d,dv", [(320, 320), (256, 64)])
def test_large_head_dims_interpreted(kernel_device, d, dv):
    """Head dims past 256 that are not powers of two, and dv < d: padded blocks of 512 and 256."""
    check_attention(1, 17, 33, 2, 1, d, dv, torch.float16, kernel_device, causal=True, softcap=3.0)


@pytest.mark.parametrize("case", TINY_CASES, ids=[_case_id(c) for c in TINY_CASES])
def test_cpu_path(case):
    (sq, sk), dtype, (h, hk, d, dv), feat, layouts = case
    check_attention(2, sq, sk, h, hk, d, dv, dtype, "cpu", layouts=layouts, **feat)


def _packed_case(device, dtype):
    qkv = torch.randn(2, 33, 3, 4, 40, device=device).to(dtype).requires_grad_()
    out = flashtron.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.detach().unbind(2)
    ref = flashtron.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out, ref)
    out.backward(torch.ones_like(out))
    assert qkv.grad.shape == qkv.shape and torch.isfinite(qkv.grad).all()

    q = torch.randn(2, 17, 4, 40, device=device).to(dtype)
    kv = torch.randn(2, 33, 2, 2, 40, device=device).to(dtype)
    out, lse, probs = flashtron.flash_attn_kvpacked_func(q, kv, return_attn_probs=True)
    ref, lse_ref, probs_ref = attention_ref(q, kv[:, :, 0], kv[:, :, 1])
    assert_fa_close(out, ref, attention_ref(q, kv[:, :, 0], kv[:, :, 1], upcast=False)[0])
    assert probs.shape == (2, 4, 17, 33)
    torch.testing.assert_close(probs.float(), probs_ref.float(), atol=2e-3, rtol=0)


@pytest.mark.interpret
def test_packed_interpreted(kernel_device):
    _packed_case(kernel_device, torch.float16)


def test_packed_cpu_path():
    _packed_case("cpu", torch.float32)


def _varlen_case(device, dtype, causal, window=(-1, -1), seqused=False, softcap=0.0):
    seqlens_q = torch.tensor([5, 0, 17, 33], dtype=torch.int32)
    seqlens_k = torch.tensor([9, 4, 17, 20], dtype=torch.int32)
    cu_q = torch.nn.functional.pad(seqlens_q.cumsum(0), (1, 0)).to(torch.int32).to(device)
    cu_k = torch.nn.functional.pad(seqlens_k.cumsum(0), (1, 0)).to(torch.int32).to(device)
    seqused_k = torch.tensor([7, 0, 17, 13], dtype=torch.int32, device=device) if seqused else None
    h, hk, d = 4, 2, 40
    q = torch.randn(int(seqlens_q.sum()), h, d, device=device).to(dtype)
    k = torch.randn(int(seqlens_k.sum()), hk, d, device=device).to(dtype)
    v = torch.randn(int(seqlens_k.sum()), hk, d, device=device).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flashtron.flash_attn_varlen_func(
        *leaves, cu_q, cu_k, 33, 20, causal=causal, window_size=window, softcap=softcap, seqused_k=seqused_k,
        return_lse=True,
    )  # fmt: skip
    assert lse.shape == (h, q.shape[0])
    kw = dict(causal=causal, window_size=window, softcap=softcap, seqused_k=seqused_k)
    ins_ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ins_pt = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref, _ = attention_varlen_ref(*ins_ref, cu_q, cu_k, upcast=True, **kw)
    out_pt, _ = attention_varlen_ref(*ins_pt, cu_q, cu_k, upcast=False, reorder_ops=True, **kw)
    assert_fa_close(out, out_ref, out_pt)
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, leaves, dout)
    g_ref = torch.autograd.grad(out_ref, ins_ref, dout.float())
    g_pt = torch.autograd.grad(out_pt, ins_pt, dout)
    for a, r, p, n in zip(g, g_ref, g_pt, "qkv"):
        assert_fa_close(a, r, p, factor=3.0, name="d" + n)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "causal,window,seqused,softcap",
    [
        (False, (-1, -1), False, 0.0),
        (True, (-1, -1), True, 0.0),
        (False, (3, 5), False, 0.0),
        (True, (6, -1), True, 2.5),
    ],
)
def test_varlen_interpreted(kernel_device, causal, window, seqused, softcap):
    _varlen_case(kernel_device, torch.float16, causal, window, seqused, softcap)


@pytest.mark.parametrize("causal,seqused", [(False, False), (True, True)])
def test_varlen_cpu_path(causal, seqused):
    _varlen_case("cpu", torch.bfloat16, causal, seqused=seqused)


def _varlen_packed_case(device, dtype):
    """The varlen qkv- and kv-packed variants: the unpacked call's outputs and gradients, bitwise."""
    cu = torch.tensor([0, 5, 5, 22, 40], dtype=torch.int32, device=device)
    qkv = torch.randn(40, 3, 4, 24, device=device).to(dtype).requires_grad_()
    out = flashtron.flash_attn_varlen_qkvpacked_func(qkv, cu, 18, causal=True, softcap=3.0)
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(1))
    ref = flashtron.flash_attn_varlen_func(q, k, v, cu, cu, 18, 18, causal=True, softcap=3.0)
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    assert torch.equal(dqkv, torch.stack(torch.autograd.grad(ref, (q, k, v), dout), dim=1))

    cu_k = torch.tensor([0, 9, 12, 12, 30], dtype=torch.int32, device=device)
    q = torch.randn(40, 4, 24, device=device).to(dtype).requires_grad_()
    kv = torch.randn(30, 2, 2, 24, device=device).to(dtype).requires_grad_()
    out = flashtron.flash_attn_varlen_kvpacked_func(q, kv, cu, cu_k, 18, 18, window_size=(4, 2))
    k, v = (t.detach().clone().requires_grad_() for t in kv.unbind(1))
    q2 = q.detach().clone().requires_grad_()
    ref = flashtron.flash_attn_varlen_func(q2, k, v, cu, cu_k, 18, 18, window_size=(4, 2))
    assert torch.equal(out, ref)
    dq, dkv = torch.autograd.grad(out, (q, kv), dout)
    dq2, dk, dv = torch.autograd.grad(ref, (q2, k, v), dout)
    assert torch.equal(dq, dq2) and torch.equal(dkv, torch.stack((dk, dv), dim=1))


@pytest.mark.interpret
def test_varlen_packed_interpreted(kernel_device):
    _varlen_packed_case(kernel_device, torch.float16)


def test_varlen_packed_cpu_path():
    _varlen_packed_case("cpu", torch.float32)


def _low_level_case(device, dtype):
    """attention_forward / attention_backward without autograd (the context-parallel entry points):
    the autograd path's out, lse and gradients, with a gradient on lse and a learnable sink."""
    from flashtron.options import AttnOptions

    q = torch.randn(2, 19, 4, 32, device=device).to(dtype)
    k, v = (torch.randn(2, 27, 2, 32, device=device).to(dtype) for _ in "kv")
    sink = torch.randn(4, device=device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sink)]
    out, lse = flashtron.flash_attn_func(
        *leaves[:3], causal=True, softcap=4.0, learnable_sink=leaves[3], softmax_scale=0.3, return_lse=True
    )
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), leaves, (dout, dlse))
    opts = AttnOptions(softmax_scale=0.3, window_right=0, softcap=4.0, learnable_sink=sink)
    out2, lse2 = flashtron.attention_forward(q, k, v, opts)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    grads2 = flashtron.attention_backward(dout, q, k, v, out2, lse2, opts, dlse=dlse)
    for a, b, name in zip(grads2, grads, ("dq", "dk", "dv", "dsink")):
        assert torch.equal(a, b), name


@pytest.mark.interpret
def test_low_level_interpreted(kernel_device):
    _low_level_case(kernel_device, torch.float16)


def test_low_level_cpu_path():
    _low_level_case("cpu", torch.float32)


def _empty_rows_case(device):
    """sq > sk with causal: the first sq - sk rows see nothing: out 0, lse -inf, finite gradients."""
    q = torch.randn(1, 20, 2, 16, device=device, requires_grad=True)
    k = torch.randn(1, 5, 2, 16, device=device, requires_grad=True)
    v = torch.randn(1, 5, 2, 16, device=device, requires_grad=True)
    out, lse = flashtron.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :15] == 0) and torch.isneginf(lse[:, :, :15]).all()
    assert torch.isfinite(lse[:, :, 15:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :15] == 0)
    # an empty KV sequence
    out0 = flashtron.flash_attn_func(q.detach(), k.detach()[:, :0], v.detach()[:, :0])
    assert out0.shape == q.shape and torch.all(out0 == 0)


@pytest.mark.interpret
def test_empty_rows_interpreted(kernel_device):
    _empty_rows_case(kernel_device)


def test_empty_rows_cpu_path():
    _empty_rows_case("cpu")


@pytest.mark.interpret
def test_backward_is_deterministic(kernel_device):
    q, k, v = (torch.randn(1, 40, 4, 32, device=kernel_device, dtype=torch.float16) for _ in range(3))
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flashtron.flash_attn_func(*leaves, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- GPU tier: the full grid
GPU_SEQLENS = [
    (1, 1),
    (17, 17),
    (113, 203),
    (128, 128),
    (203, 113),
    (1023, 1024),
    (1024, 1023),
    (1, 2048),
    (2048, 2048),
    (4096, 4096),
]
GPU_HEADDIMS = [32, 40, 64, 72, 96, 128, 160, 192, 256]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("d", GPU_HEADDIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_grid(causal, d, dtype):
    """One test per head dim, dtype and mask; every seqlen pair runs through the same kernels (seqlens
    are runtime arguments), MHA and GQA 4 / MQA alternating. Each compiled variant costs seconds, so the
    variants are few on purpose: MHA and GQA (group size 1 is a specialization), contiguous tensors,
    and one pair with every tensor strided differently (bhsd-stored, sliced, contiguous). fp32 stops at
    2048: its fp64 reference at 4096 takes gigabytes per worker and tests no other kernel path."""
    for i, (sq, sk) in enumerate(GPU_SEQLENS):
        if dtype == torch.float32 and sq * sk > 2048 * 2048:
            continue
        nheads, nheads_k = [(8, 8), (8, 2), (8, 1)][i % 3]
        batch = 2 if sq * sk <= 2048 * 2048 else 1
        layouts = ("bhsd", "sliced", "contiguous") if (sq, sk) == (113, 203) else ("contiguous",) * 3
        try:
            check_attention(batch, sq, sk, nheads, nheads_k, d, d, dtype, "cuda", causal=causal, layouts=layouts)
        except AssertionError as e:
            raise AssertionError(f"seqlen_q={sq} seqlen_k={sk} nheads={nheads}/{nheads_k}: {e}") from e


@pytest.mark.gpu
@pytest.mark.parametrize(
    "feat",
    [
        dict(window=(64, 0)),
        dict(window=(100, 30)),
        dict(softcap=30.0),
        dict(alibi="batch_heads", causal=True),
        dict(sink=True, causal=True),
    ],
    ids=["window-causal", "window", "softcap", "alibi", "sink"],
)
@pytest.mark.parametrize("d,dv", [(64, 64), (128, 128), (192, 128), (64, 256), (256, 256), (384, 384), (512, 512)])
def test_gpu_features(feat, d, dv):
    check_attention(2, 300, 517, 4, 2, d, dv, torch.bfloat16, "cuda", **feat)


# Features crossed with what the feature grid above holds fixed: one-sided windows, sq > sk, GQA 8,
# ALiBi per head, fp16 and fp32, head dims past 256 outside bf16. (batch, sq, sk, nheads, nheads_k, d, dtype,
# features)
GPU_FEATURE_MIX = {
    "right-window-sq>sk-gqa8-fp16": (2, 517, 300, 8, 1, 128, torch.float16, dict(window=(-1, 30))),
    "left-window-softcap-fp32": (2, 300, 517, 4, 2, 64, torch.float32, dict(window=(50, -1), softcap=20.0)),
    "alibi-heads-causal-gqa8-bf16": (1, 700, 700, 8, 1, 96, torch.bfloat16, dict(alibi="heads", causal=True)),
    "sink-window-fp32": (2, 257, 257, 4, 4, 128, torch.float32, dict(sink=True, window=(64, 0))),
    "d512-causal-fp32": (1, 300, 300, 2, 1, 512, torch.float32, dict(causal=True)),
    "d320-window-fp16": (2, 200, 333, 4, 2, 320, torch.float16, dict(window=(40, 10))),
    "everything-sq>sk-bf16": (
        2, 517, 300, 4, 2, 256, torch.bfloat16, dict(window=(100, 20), softcap=15.0, alibi="batch_heads")
    ),
}  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_FEATURE_MIX))
def test_gpu_feature_mix(case):
    b, sq, sk, h, hk, d, dtype, feat = GPU_FEATURE_MIX[case]
    check_attention(b, sq, sk, h, hk, d, d, dtype, "cuda", **feat)


@pytest.mark.gpu
def test_gpu_varlen():
    _varlen_case("cuda", torch.bfloat16, True, seqused=True)
    _varlen_case("cuda", torch.float16, False, window=(8, 4))
    _varlen_case("cuda", torch.bfloat16, True, window=(6, -1), seqused=True, softcap=2.5)
    _varlen_packed_case("cuda", torch.bfloat16)
    _low_level_case("cuda", torch.bfloat16)


@pytest.mark.gpu
def test_gpu_backward_deterministic_20_runs():
    q, k, v = (torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    first = None
    for _ in range(20):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flashtron.flash_attn_func(*leaves, causal=True, deterministic=True)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        if first is None:
            first = grads
        else:
            assert all(torch.equal(a, b) for a, b in zip(first, grads))


@pytest.mark.gpu
def test_gpu_empty_rows():
    _empty_rows_case("cuda")


# ---------------------------------------------------------------- dropout, in every tier
def _dropout_case(device, dtype, p, causal, seqlens=(33, 47), heads=(4, 2), d=40):
    """Out and gradients against the reference given the mask that S_dmask reports (its sign): this
    also proves the kernel's Philox draws and the PyTorch rebuild in flashtron/dropout.py agree."""
    sq, sk = seqlens
    h, hk = heads
    q, k, v = (torch.randn(2, s, n, d, device=device).to(dtype) for s, n in ((sq, h), (sk, hk), (sk, hk)))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(123)
    out, lse, s_dmask = flashtron.flash_attn_func(*leaves, dropout_p=p, causal=causal, return_attn_probs=True)
    torch.manual_seed(123)
    again = flashtron.flash_attn_func(q, k, v, dropout_p=p, causal=causal)
    assert torch.equal(out, again), "dropout is not reproducible under torch.manual_seed"
    keep = s_dmask >= 0
    kw = dict(dropout_p=p, dropout_mask=keep, causal=causal)
    ins_ref = [t.float().clone().requires_grad_() for t in (q, k, v)]
    ins_pt = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = attention_ref(*ins_ref, **kw)[0]
    out_pt = attention_ref(*ins_pt, upcast=False, reorder_ops=True, **kw)[0]
    assert_fa_close(out, out_ref, out_pt)
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, leaves, dout)
    g_ref = torch.autograd.grad(out_ref, ins_ref, dout.float())
    g_pt = torch.autograd.grad(out_pt, ins_pt, dout)
    for a, r, pt, n in zip(g, g_ref, g_pt, "qkv"):
        assert_fa_close(a, r, pt, factor=3.0, name="d" + n)
    return s_dmask


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_interpreted(kernel_device, causal):
    _dropout_case(kernel_device, torch.float16, 0.17, causal)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_cpu_path(causal):
    _dropout_case("cpu", torch.float32, 0.17, causal)


def test_dropout_cpu_path_query_blocks():
    """Causal with more rows than one CPU query block (256): every block must draw its own rows."""
    _dropout_case("cpu", torch.float32, 0.17, True, seqlens=(300, 333), heads=(2, 1), d=16)


def _dropout_kept(out, p, n_keys):
    """out of a call with q = 0 (every key gets probability 1 / n_keys) and v = identity (key j's
    weight lands in feature j): kept entries read 1 / (n_keys (1 - p)), dropped ones exactly 0."""
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (n_keys * (1 - p))))  # dtype's tolerance
    return kept


def _dropped_fraction(device, p, dtype=torch.float32):
    """The fraction the kernel itself dropped on 256 x 256, read off its output, after checking that
    S_dmask (rebuilt in PyTorch, flashtron/dropout.py) marks exactly the same entries."""
    n = 256
    q, k = torch.zeros(1, n, 1, n, device=device, dtype=dtype), torch.randn(1, n, 1, n, device=device).to(dtype)
    v = torch.eye(n, device=device, dtype=dtype).view(1, n, 1, n)
    out, _, s_dmask = flashtron.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True)
    kept = _dropout_kept(out[0, :, 0], p, n)  # (query, key)
    assert torch.equal(kept, s_dmask[0, 0] >= 0)
    return 1.0 - kept.float().mean().item()


def _dropout_varlen_mask_case(device, dtype, p):
    """Varlen draws its mask at each sequence's offsets: the kernel's mask, read off its output as in
    _dropped_fraction, equals the padded S_dmask's inside each sequence and is empty outside."""
    lens = [100, 0, 1, 155]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    n = sum(lens)
    q, k = torch.zeros(n, 2, n, device=device, dtype=dtype), torch.randn(n, 2, n, device=device).to(dtype)
    v = torch.eye(n, device=device, dtype=dtype)[:, None, :].expand(n, 2, n).contiguous()
    torch.manual_seed(11)
    out, _, s_dmask = flashtron.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), dropout_p=p,
                                                       return_attn_probs=True)  # fmt: skip
    for b, (start, length) in enumerate(zip(cu.tolist(), lens)):
        rows = out[start : start + length].transpose(0, 1)  # (head, query, key of the whole batch)
        assert torch.all(rows[..., :start] == 0) and torch.all(rows[..., start + length :] == 0)
        kept = _dropout_kept(rows[..., start : start + length], p, length) if length else rows[..., :0] != 0
        assert torch.equal(kept, s_dmask[b, :, :length, :length] >= 0), f"sequence {b}"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_fraction_cpu_path(p):
    assert abs(_dropped_fraction("cpu", p) - p) < 0.01


@pytest.mark.interpret
def test_dropout_fraction_interpreted(kernel_device):
    assert abs(_dropped_fraction(kernel_device, 0.3, torch.float16) - 0.3) < 0.01


def test_dropout_varlen_mask_cpu_path():
    _dropout_varlen_mask_case("cpu", torch.float32, 0.25)


@pytest.mark.interpret
def test_dropout_varlen_mask_interpreted(kernel_device):
    _dropout_varlen_mask_case(kernel_device, torch.float16, 0.25)


def test_dropout_varlen_cpu_path():
    cu = torch.tensor([0, 5, 20], dtype=torch.int32)
    q, k, v = (torch.randn(20, 2, 16) for _ in range(3))
    torch.manual_seed(5)
    a = flashtron.flash_attn_varlen_func(q, k, v, cu, cu, 15, 15, dropout_p=0.3)
    torch.manual_seed(5)
    b = flashtron.flash_attn_varlen_func(q, k, v, cu, cu, 15, 15, dropout_p=0.3)
    torch.manual_seed(6)
    c = flashtron.flash_attn_varlen_func(q, k, v, cu, cu, 15, 15, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_dropout(dtype, causal):
    _dropout_case("cuda", dtype, 0.17, causal, seqlens=(300, 517), heads=(8, 2), d=128)
    assert abs(_dropped_fraction("cuda", 0.3, dtype) - 0.3) < 0.01
    _dropout_varlen_mask_case("cuda", dtype, 0.25)


# ---------------------------------------------------------------- paged prefill (varlen + block_table)
def _paged_varlen_case(device, dtype, page_size):
    """flash_attn_varlen_func with block_table equals the same call on the gathered contiguous K/V."""
    seqlens = [7, 0, 20]
    cu = torch.tensor([0, 7, 7, 27], dtype=torch.int32, device=device)
    h, hk, d = 4, 2, 32
    pages_per_seq = -(-max(seqlens) // page_size)
    num_pages = 3 * pages_per_seq + 2
    k_pages, v_pages = (torch.randn(num_pages, page_size, hk, d, device=device).to(dtype) for _ in range(2))
    block_table = torch.randperm(num_pages, device=device)[: 3 * pages_per_seq].view(3, pages_per_seq).int()
    q = torch.randn(27, h, d, device=device).to(dtype)
    # the contiguous K/V that the pages describe
    rows = [block_table[b].long().repeat_interleave(page_size) for b in range(3)]
    slots = torch.arange(pages_per_seq * page_size, device=device) % page_size
    k = torch.cat([k_pages[rows[b], slots][: seqlens[b]] for b in range(3)])
    v = torch.cat([v_pages[rows[b], slots][: seqlens[b]] for b in range(3)])
    leaves = [t.clone().requires_grad_() for t in (q, k_pages, v_pages)]
    out = flashtron.flash_attn_varlen_func(
        leaves[0], leaves[1], leaves[2], cu, cu, 20, 20, causal=True, block_table=block_table
    )
    ref = flashtron.flash_attn_varlen_func(q, k, v, cu, cu, 20, 20, causal=True)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    out.sum().backward()
    # gradient lands on the pages that hold keys, nowhere else
    used = torch.zeros(num_pages, dtype=torch.bool, device=device)
    for b in range(3):
        used[block_table[b, : -(-seqlens[b] // page_size)].long()] = True
    assert torch.all(leaves[1].grad[~used] == 0) and leaves[1].grad[used].abs().sum() > 0


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_paged_varlen_cpu_path(page_size):
    _paged_varlen_case("cpu", torch.float32, page_size)


@pytest.mark.interpret
@pytest.mark.parametrize("page_size", [3, 64])  # 64: the gathered span passes the dK/dV tile's 32 keys
def test_paged_varlen_interpreted(kernel_device, page_size):
    _paged_varlen_case(kernel_device, torch.float16, page_size)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16, 256])
def test_gpu_paged_varlen(page_size):
    _paged_varlen_case("cuda", torch.bfloat16, page_size)


@pytest.mark.interpret
@pytest.mark.parametrize("d,dv", [(512, 512), (192, 128), (64, 256)], ids=["512", "192-128", "64-256"])
def test_large_and_mixed_headdims_interpreted(kernel_device, d, dv):
    check_attention(1, 17, 33, 2, 1, d, dv, torch.float16, kernel_device, causal=True)


@pytest.mark.parametrize("d,dv", [(512, 512), (192, 128)], ids=["512", "192-128"])
def test_large_and_mixed_headdims_cpu_path(d, dv):
    check_attention(1, 17, 33, 2, 1, d, dv, torch.bfloat16, "cpu", window=(4, 2))


@pytest.mark.parametrize(
    "setting, expected",
    [
        (("allow_tf32", True), "tf32"),
        (("allow_tf32", False), "ieee"),
        (("fp32_precision", "tf32"), "tf32"),
        (("fp32_precision", "ieee"), "ieee"),
    ],
)
def test_fp32_dot_precision_follows_torch(setting, expected):
    """fp32 dots are IEEE unless the user turned TF32 on, through either of torch's APIs (reading the
    legacy allow_tf32 raises once the new fp32_precision was set, so the launcher must not)."""
    from flashtron.launch import score_args
    from flashtron.options import AttnOptions

    matmul = torch.backends.cuda.matmul
    name, value = setting
    new_api = hasattr(matmul, "fp32_precision")  # torch >= 2.9; allow_tf32 exists everywhere
    if name == "fp32_precision" and not new_api:
        pytest.skip("this torch has no torch.backends.cuda.matmul.fp32_precision")
    saved = matmul.fp32_precision if new_api else matmul.allow_tf32
    try:
        setattr(matmul, name, value)
        q = torch.zeros(1, 1, 1, 8)
        assert score_args(q, AttnOptions(softmax_scale=1.0))["PRECISION"] == expected
        assert score_args(q.half(), AttnOptions(softmax_scale=1.0))["PRECISION"] == "ieee"  # 16-bit: no tf32
    finally:
        setattr(matmul, "fp32_precision" if new_api else "allow_tf32", saved)


def check_one_output_carries_the_gradient(device, monkeypatch):
    """A loss on out alone, then on lse alone: the other output's gradient reaches the backward as None (the
    Function does not materialize zeros for it), and dq, dk, dv still match the reference's."""
    from flashtron import autograd

    seen = []
    backward = autograd.attention_backward
    monkeypatch.setattr(autograd, "attention_backward", lambda dout, *a, dlse=None, **kw: seen.append(dlse is None)
                        or backward(dout, *a, dlse=dlse, **kw))  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 65, 4, 32, generator=gen) for _ in range(3))
    k, v = k[:, :40, :2], v[:, :40, :2]  # sq > sk, GQA 2:1
    for loss in (lambda out, lse: (out * out).sum(), lambda out, lse: lse.sum()):
        ours = [t.clone().to(device).requires_grad_() for t in (q, k, v)]
        ref = [t.double().requires_grad_() for t in (q, k, v)]
        out, lse = flashtron.flash_attn_func(*ours, causal=True, return_lse=True)
        out_ref, lse_ref, _ = attention_ref(*ref, causal=True)
        empty = torch.isneginf(lse_ref)  # rows that see no key: lse -inf, no gradient through them
        loss(out, torch.where(empty.to(device), 0.0, lse)).backward()
        loss(out_ref, torch.where(empty, 0.0, lse_ref)).backward()
        for a, r, name in zip(ours, ref, "qkv"):
            want = torch.zeros_like(r) if r.grad is None else r.grad  # lse does not depend on v
            torch.testing.assert_close(a.grad.cpu().double(), want, atol=2e-4, rtol=2e-4, msg=f"d{name}")
    assert seen == [True, False], "dlse: None for the loss on out alone, a tensor for the loss on lse"


def test_one_output_carries_the_gradient_cpu(monkeypatch):
    check_one_output_carries_the_gradient("cpu", monkeypatch)


@pytest.mark.interpret
def test_one_output_carries_the_gradient_interpreted(kernel_device, monkeypatch):
    check_one_output_carries_the_gradient(kernel_device, monkeypatch)
