"""flash_attn_with_kvcache and flash_attn_combine against the reference (flashtron.reference).

Everything goes through the public functions. Tolerance: FlashAttention's rule (tests/tolerance.py):
the reference is kvcache_ref(upcast=True) on copies of the inputs (fp64 copies for fp32 inputs), the
PyTorch-in-dtype baseline kvcache_ref(upcast=False). The caches updated in place must equal the
reference's updated caches: bitwise without rotary, within one rounding of the dtype with it (the
rotation is computed in fp32 on both sides, but the kernels may fuse multiply-adds).

Tiers: the default tier runs the exact CPU path on a broad grid of tiny problems; `-m interpret`
(TRITON_INTERPRET=1) runs the Triton append/decode/combine kernels on a selection; `-m gpu` runs the
kernels on realistic shapes (page sizes up to 256, caches up to 8k, d up to 256) and a CUDA graph.
Paged caches get a shuffled block table and spare pages, so a wrong page lookup reads other data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch

import flashtron
from flashtron.reference import kvcache_ref
from tolerance import assert_fa_close

NO_WINDOW = (-1, -1)


@dataclass(frozen=True)
class KVCase:
    b: int = 3
    sq: int = 1  # query tokens per row
    sn: int = 1  # new tokens appended per row (0: no k, v)
    h: int = 4
    hk: int = 1
    d: int = 40
    dv: int = 40
    capacity: int = 40  # positions per row (paged: pages_per_row * page)
    page: int = 0  # page size; 0 = dense cache
    batch_idx: bool = False  # dense cache with more rows than the batch, mapped by cache_batch_idx
    leftpad: bool = False
    rotary: str | None = None  # "interleaved" (GPT-J) or "neox"
    rotary_dim: int = 16
    causal: bool = False
    window: tuple[int, int] = NO_WINDOW
    softcap: float = 0.0
    alibi: str | None = None  # "head": (nheads,), "batch": (batch_size, nheads)
    sink: bool = False
    seqlens: str = "tensor"  # "tensor", "int" or "none" (the full cache, needs sn = 0)
    empty_row: bool = False  # row 0 has no keys at all (cache_seqlens 0 or leftpad = seqlen, no append)
    num_splits: int = 0
    seqlen: int | None = None  # fixed filled length of every row (default: random per row)


CASES = {
    "decode_dense_mha": KVCase(h=2, hk=2),
    "decode_dense_gqa4_causal": KVCase(h=8, hk=2, causal=True),
    "paged1_gqa_neox_causal_sq3": KVCase(sq=3, sn=2, page=1, rotary="neox", causal=True),
    "paged3_interleaved_noncausal_sq3": KVCase(sq=3, sn=3, h=2, hk=2, page=3, rotary="interleaved", capacity=42),
    "paged16_leftpad_window": KVCase(sq=3, sn=1, page=16, capacity=48, leftpad=True, window=(5, 0)),
    "batch_idx_softcap": KVCase(batch_idx=True, softcap=5.0, sq=3, sn=2),
    "batch_idx_rotary_interleaved_window": KVCase(batch_idx=True, rotary="interleaved", rotary_dim=40, window=(7, 2)),
    "alibi_head_causal_sq3": KVCase(sq=3, sn=3, alibi="head", causal=True),
    "alibi_batch_leftpad_paged3": KVCase(alibi="batch", leftpad=True, page=3, capacity=39, h=4, hk=4),
    "sink_gqa_empty_row": KVCase(sink=True, sn=0, empty_row=True),
    "empty_row_no_sink_causal": KVCase(sn=0, empty_row=True, causal=True, sq=3),
    "empty_row_leftpad_paged1": KVCase(sn=0, empty_row=True, leftpad=True, page=1, capacity=20),
    "seqlens_int_append": KVCase(seqlens="int", sn=2, sq=2, causal=True, rotary="neox"),
    "seqlens_none_full_cache": KVCase(seqlens="none", sn=0, capacity=24, window=(4, -1)),
    "causal_sq_gt_keys": KVCase(sq=3, sn=0, causal=True, seqlen=1),  # queries 0, 1 see nothing
    "window_right_only_sq3": KVCase(sq=3, sn=1, window=(-1, 1), h=8, hk=2, dv=24),
    "alibi_batch_equal_rows_dense": KVCase(alibi="batch", h=4, hk=2, seqlen=20, sn=1, causal=True),  # one CPU call
    "alibi_batch_leftpad_dense": KVCase(alibi="batch", leftpad=True, h=4, hk=2, sq=2, sn=1, causal=True),
    # equal rows of > 1 MiB of fp32 keys and values each: the CPU path attends them one row at a time
    "long_equal_rows_dense": KVCase(b=2, h=4, hk=2, d=64, dv=64, capacity=1100, seqlen=1050, sn=1, causal=True),
    "paged64_gqa_neox_causal": KVCase(sq=2, sn=2, h=8, hk=2, page=64, capacity=128, rotary="neox", causal=True),
    "paged256_softcap_window_alibi_head": KVCase(
        sq=1, sn=1, page=256, capacity=256, softcap=3.0, window=(50, 0), alibi="head", leftpad=True
    ),
    "everything": KVCase(
        sq=3, sn=2, h=8, hk=2, d=40, dv=24, page=3, capacity=45, leftpad=True, rotary="interleaved",
        causal=True, window=(9, 0), softcap=4.0, alibi="batch", sink=True,
    ),
}  # fmt: skip
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


# ----------------------------------------------------------------------------------------------------
# Problem construction and the check
# ----------------------------------------------------------------------------------------------------


def _rotary_tables(capacity, rotary_dim, dtype, device):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(capacity, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


def make_problem(c: KVCase, dtype, device):
    """Inputs of one flash_attn_with_kvcache call, as a dict of its keyword arguments."""
    gen = torch.Generator().manual_seed(1234)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    def randint(lo, hi, shape=()):  # hi inclusive
        return torch.randint(lo, hi + 1, shape, generator=gen)

    b = c.b
    if c.seqlen is not None:
        lens = torch.full((b,), c.seqlen)
    else:
        # rotary rotates query token t at cache_seqlens + t: keep that inside the tables too
        room = max(c.sn, c.sq) if c.rotary else c.sn
        lens = randint(0, c.capacity - room, (b,))
        lens[-1] = c.capacity - room  # one row filled to capacity
    if c.seqlens == "none":
        lens = torch.full((b,), c.capacity)
    elif c.seqlens == "int":
        lens = torch.full((b,), int(lens[1]))
    pads = torch.stack([randint(0, int(n)) for n in lens]) if c.leftpad else torch.zeros(b, dtype=torch.long)
    if c.empty_row:
        lens[0] = 0 if not c.leftpad else lens[0]
        pads[0] = lens[0]

    kw = dict(q=randn(b, c.sq, c.h, c.d))
    if c.page:
        pages_per_row = c.capacity // c.page
        num_pages = b * pages_per_row + 3  # spare pages that no row maps
        kw["k_cache"], kw["v_cache"] = randn(num_pages, c.page, c.hk, c.d), randn(num_pages, c.page, c.hk, c.dv)
        perm = torch.randperm(num_pages, generator=gen)[: b * pages_per_row]
        kw["block_table"] = perm.view(b, pages_per_row).to(torch.int32).to(device)
    else:
        rows = b + 2 if c.batch_idx else b
        kw["k_cache"], kw["v_cache"] = randn(rows, c.capacity, c.hk, c.d), randn(rows, c.capacity, c.hk, c.dv)
        if c.batch_idx:
            kw["cache_batch_idx"] = torch.randperm(rows, generator=gen)[:b].to(torch.int32).to(device)
    if c.sn:
        kw["k"], kw["v"] = randn(b, c.sn, c.hk, c.d), randn(b, c.sn, c.hk, c.dv)
    if c.rotary:
        kw["rotary_cos"], kw["rotary_sin"] = _rotary_tables(c.capacity, c.rotary_dim, dtype, device)
        kw["rotary_interleaved"] = c.rotary == "interleaved"
    if c.seqlens == "tensor":
        kw["cache_seqlens"] = lens.to(torch.int32).to(device)
    elif c.seqlens == "int":
        kw["cache_seqlens"] = int(lens[0])
    if c.leftpad:
        kw["cache_leftpad"] = pads.to(torch.int32).to(device)
    kw["softmax_scale"] = 1.0 / math.sqrt(c.d)
    kw["causal"], kw["window_size"], kw["softcap"] = c.causal, c.window, c.softcap
    if c.alibi == "head":
        kw["alibi_slopes"] = (torch.rand(c.h, generator=gen) * 0.5).to(device)
    elif c.alibi == "batch":
        kw["alibi_slopes"] = (torch.rand(b, c.h, generator=gen) * 0.5).to(device)
    if c.sink:
        kw["learnable_sink"] = torch.randn(c.h, generator=gen).to(device)
    return kw


def _reference(kw, upcast: bool):
    """kvcache_ref on copies; fp32 problems get an fp64 reference when upcast."""
    ref_dtype = torch.float64 if upcast and kw["q"].dtype == torch.float32 else None

    def copy(x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.to(ref_dtype) if ref_dtype is not None and x.is_floating_point() else x.clone()

    return kvcache_ref(**{name: copy(x) for name, x in kw.items()}, upcast=upcast)


def _assert_lse_close(ours, ref, pt):
    """-inf (or the sink) exactly where the reference has it; finite entries under the rule."""
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(ours), empty), "lse: -inf rows differ from the reference"
    assert not torch.isnan(ours).any(), "lse: NaN"
    assert_fa_close(ours[~empty], ref[~empty], pt[~empty].to(ref.dtype), name="lse")


def _assert_cache_close(ours, ref, rotated: bool, name: str):
    if not rotated:
        assert torch.equal(ours, ref.to(ours.dtype)), f"{name}: cache differs from the reference"
        return
    # one rounding of the dtype: |ours - ref| <= eps(dtype) * |ref| (+ fp32 noise near zero)
    tol = torch.finfo(ours.dtype).eps * ref.double().abs() + 4 * torch.finfo(torch.float32).eps
    err = (ours.double() - ref.double()).abs()
    assert (err <= tol).all(), f"{name}: cache off by {err.max().item():.3e}"


def check_kvcache(c: KVCase, dtype, device, *, num_splits=None, return_lse=True):
    kw = make_problem(c, dtype, device)
    ref = _reference(kw, upcast=True)
    pt = _reference(kw, upcast=False)
    splits = c.num_splits if num_splits is None else num_splits
    result = flashtron.flash_attn_with_kvcache(**kw, num_splits=splits, return_softmax_lse=return_lse)
    if not return_lse:
        assert isinstance(result, torch.Tensor)
        result = (result, None)
    out, lse = result
    assert out.dtype == dtype and out.shape == (c.b, c.sq, c.h, c.dv)
    assert_fa_close(out.cpu(), ref[0].cpu(), pt[0].cpu())
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == (c.b, c.h, c.sq)
        _assert_lse_close(lse.cpu(), ref[1].cpu(), pt[1].cpu())
    _assert_cache_close(kw["k_cache"].cpu(), ref[2].cpu(), c.rotary is not None, "k_cache")
    _assert_cache_close(kw["v_cache"].cpu(), ref[3].cpu(), False, "v_cache")
    return out, lse


def _combine_expected(out_partial, lse_partial):
    """flash_attn_combine written out in fp64: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s."""
    o, lse_s = out_partial.double(), lse_partial.double()
    lse = torch.logsumexp(lse_s, dim=0)
    out = torch.zeros_like(o[0])
    for s in range(o.shape[0]):
        w = torch.exp(lse_s[s] - lse).nan_to_num(0.0)  # -inf - -inf: the row has no mass at all
        out += torch.where(torch.isneginf(lse_s[s])[..., None], 0.0, o[s]) * w[..., None]
    return out, lse


def check_combine(device, num_splits=3, b=2, sq=3, h=4, d=40, out_dtype=None, given_out=False):
    out_partial = torch.randn(num_splits, b, sq, h, d).to(device)
    lse_partial = torch.randn(num_splits, b, sq, h).to(device) * 3
    lse_partial[0, 0, 0, :] = float("-inf")  # one split empty for some rows
    lse_partial[:, 1, sq - 1, 1] = float("-inf")  # every split empty for one row: out 0, lse -inf
    out_partial[0, 0, 0, :] = float("nan")  # an empty split's output must not be read as a number
    out = None
    if given_out:
        out = torch.full((b, sq, h, d), float("nan"), dtype=out_dtype or torch.float32, device=device)
    got, lse = flashtron.flash_attn_combine(out_partial, lse_partial, out=out, out_dtype=out_dtype)
    if given_out:
        assert got is out
    exp_out, exp_lse = _combine_expected(out_partial.cpu(), lse_partial.cpu())
    assert got.dtype == (out_dtype or torch.float32) and got.shape == (b, sq, h, d)
    assert lse.dtype == torch.float32 and lse.shape == (b, sq, h)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(exp_lse))
    finite = ~torch.isneginf(exp_lse)
    torch.testing.assert_close(lse.cpu().double()[finite], exp_lse[finite], atol=1e-5, rtol=1e-5)
    tol = 1e-5 if got.dtype == torch.float32 else torch.finfo(got.dtype).eps
    torch.testing.assert_close(got.cpu().double(), exp_out, atol=tol, rtol=tol)
    assert torch.equal(got[1, sq - 1, 1].cpu(), torch.zeros(d, dtype=got.dtype))


# ----------------------------------------------------------------------------------------------------
# Default tier: the CPU path
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_kvcache_cpu(name, dtype):
    check_kvcache(CASES[name], dtype, "cpu")


@pytest.mark.parametrize("name", ["decode_dense_gqa4_causal", "everything"])
def test_kvcache_cpu_out_only(name):
    """return_softmax_lse=False returns the output tensor alone."""
    check_kvcache(CASES[name], torch.bfloat16, "cpu", return_lse=False)


def test_kvcache_cpu_batch_without_queries():
    """seqlen_q = 0 still appends the new keys and values."""
    check_kvcache(replace(CASES["paged3_interleaved_noncausal_sq3"], sq=0), torch.float16, "cpu")


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16], ids=str)
@pytest.mark.parametrize("given_out", [False, True])
def test_combine_cpu(out_dtype, given_out):
    check_combine("cpu", out_dtype=out_dtype, given_out=given_out)


def test_paged_decode_stages():
    """Paged launches on Hopper get 2s - 1 stages (the dense loop's K/V buffering, see DecodeConfig.stages);
    dense launches and other archs keep the table's s."""
    from flashtron.configs import GPU_DECODE, DecodeConfig

    assert [DecodeConfig(16, 64, 4, s, 1).stages(paged=True) for s in (1, 2, 3, 4)] == [1, 3, 5, 7]
    assert all(cfg.stages(paged=False) == cfg.num_stages for cfg in GPU_DECODE.values())


def test_choose_num_splits():
    from flashtron.configs import MAX_SPLITS, choose_num_splits

    assert choose_num_splits(4, tiles=64, kv_blocks=2, num_sms=132, min_blocks_per_split=4) == 4  # forced
    assert choose_num_splits(0, tiles=1024, kv_blocks=1024, num_sms=132, min_blocks_per_split=4) == 1  # full
    assert choose_num_splits(0, tiles=64, kv_blocks=7, num_sms=132, min_blocks_per_split=4) == 1  # short cache
    # 64 tiles on 132 SMs: 2 splits make one nearly full wave (128 programs); 3 would leave 2 half waves
    assert choose_num_splits(0, tiles=64, kv_blocks=1024, num_sms=132, min_blocks_per_split=4) == 2
    # one tile: efficiency grows with the count up to MAX_SPLITS (64) or the cache's 10 splits of 4
    # blocks; the smallest count within 85% of that best wins (55 of 64, 9 of 10)
    assert MAX_SPLITS == 64
    assert choose_num_splits(0, tiles=1, kv_blocks=10**6, num_sms=132, min_blocks_per_split=4) == 55
    assert choose_num_splits(0, tiles=1, kv_blocks=40, num_sms=132, min_blocks_per_split=4) == 9


# ----------------------------------------------------------------------------------------------------
# Interpreter tier: the Triton kernels on CPU tensors
# ----------------------------------------------------------------------------------------------------

INTERPRET_CASES = [
    ("decode_dense_gqa4_causal", torch.float16, 1),
    ("decode_dense_gqa4_causal", torch.bfloat16, 3),
    ("paged1_gqa_neox_causal_sq3", torch.bfloat16, 0),
    ("paged16_leftpad_window", torch.float16, 3),
    ("paged3_interleaved_noncausal_sq3", torch.float32, 1),
    ("batch_idx_rotary_interleaved_window", torch.bfloat16, 0),
    ("sink_gqa_empty_row", torch.float16, 3),
    ("empty_row_no_sink_causal", torch.bfloat16, 1),
    ("causal_sq_gt_keys", torch.float16, 3),
    ("seqlens_int_append", torch.float16, 1),
    ("everything", torch.bfloat16, 3),
    ("everything", torch.float16, 1),
    ("paged64_gqa_neox_causal", torch.float16, 3),
    ("paged256_softcap_window_alibi_head", torch.bfloat16, 2),
    ("alibi_head_causal_sq3", torch.float16, 0),
    ("seqlens_none_full_cache", torch.float16, 2),
]


@pytest.mark.interpret
@pytest.mark.parametrize("name,dtype,splits", INTERPRET_CASES, ids=lambda x: str(x))
def test_kvcache_interpret(kernel_device, name, dtype, splits):
    check_kvcache(CASES[name], dtype, kernel_device, num_splits=splits)


@pytest.mark.interpret
def test_kvcache_interpret_out_only(kernel_device):
    """return_softmax_lse=False: the output alone, split (the combine writes no lse anyone reads)."""
    check_kvcache(CASES["everything"], torch.float16, kernel_device, return_lse=False, num_splits=3)


@pytest.mark.interpret
def test_kvcache_interpret_two_row_tiles(kernel_device):
    """group 8 x 3 tokens = 24 packed rows: two row tiles of 16, the second holding one token."""
    c = KVCase(sq=3, sn=2, h=8, hk=1, d=24, dv=24, page=16, capacity=48, causal=True, alibi="batch", sink=True)
    check_kvcache(c, torch.float16, kernel_device, num_splits=2)


@pytest.mark.interpret
@pytest.mark.parametrize("given_out", [False, True])
def test_combine_interpret(kernel_device, given_out):
    check_combine(kernel_device, out_dtype=torch.float16 if given_out else None, given_out=given_out)


# ----------------------------------------------------------------------------------------------------
# GPU tier
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [0, 1, 4])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("page", [0, 1, 16, 64, 256])
def test_kvcache_gpu_grid(page, dtype, d, num_splits):
    capacity = 8192 if d == 128 else 2048  # caches up to 8k; the larger head dims keep the test quick
    c = KVCase(
        b=4, sq=1, sn=1, h=16, hk=4, d=d, dv=d, capacity=capacity, page=page, leftpad=page == 16, causal=True,
        rotary="neox" if d == 128 else "interleaved", rotary_dim=min(d, 64),
    )  # fmt: skip
    check_kvcache(c, dtype, "cuda", num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_kvcache_gpu_features(name, dtype, splits):
    check_kvcache(CASES[name], dtype, "cuda", num_splits=splits)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [0, 64])
def test_kvcache_gpu_chunked_prefill(page):
    """seqlen_q = 64 new tokens (chunked prefill / speculative decoding) over a 2k cache, GQA 4."""
    c = KVCase(b=2, sq=64, sn=64, h=16, hk=4, d=128, dv=128, capacity=2048, page=page, causal=True, rotary="neox",
               rotary_dim=128)  # fmt: skip
    check_kvcache(c, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_kvcache_gpu_fp32():
    c = KVCase(b=2, sq=2, sn=2, h=8, hk=2, d=64, dv=64, capacity=512, page=16, causal=True, rotary="neox")
    check_kvcache(c, torch.float32, "cuda", num_splits=0)


@pytest.mark.gpu
def test_combine_gpu():
    check_combine("cuda", num_splits=5, b=3, sq=2, h=8, d=128, out_dtype=torch.bfloat16, given_out=True)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("page", [0, 16])
def test_kvcache_cuda_graph(page, num_splits):
    """One decode step (append + attention; with 3 splits, the combine kernel too) captured once and
    replayed with new cache_seqlens copied into the captured tensor: each replay must match the
    reference for those lengths."""
    c = KVCase(b=4, sq=1, sn=1, h=16, hk=4, d=128, dv=128, capacity=1024, page=page, causal=True, rotary="neox",
               rotary_dim=128)  # fmt: skip
    kw = make_problem(c, torch.bfloat16, "cuda")
    pristine = {name: x.clone() for name, x in kw.items() if isinstance(x, torch.Tensor)}

    def step():
        return flashtron.flash_attn_with_kvcache(**kw, num_splits=num_splits, return_softmax_lse=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()

    for trial, lens in enumerate(([0, 5, 700, 1023], [1023, 64, 1, 300], [17, 17, 17, 17])):
        for name in ("k_cache", "v_cache"):
            kw[name].copy_(pristine[name])
        for name in ("q", "k", "v"):
            kw[name].copy_(torch.randn_like(kw[name]))
        kw["cache_seqlens"].copy_(torch.tensor(lens, dtype=torch.int32))
        ref = _reference(kw, upcast=True)
        pt = _reference(kw, upcast=False)
        graph.replay()
        torch.cuda.synchronize()
        assert_fa_close(out.cpu(), ref[0].cpu(), pt[0].cpu(), name=f"out (replay {trial})")
        _assert_lse_close(lse.cpu(), ref[1].cpu(), pt[1].cpu())
        _assert_cache_close(kw["k_cache"].cpu(), ref[2].cpu(), True, "k_cache")
        _assert_cache_close(kw["v_cache"].cpu(), ref[3].cpu(), False, "v_cache")


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_cpu_lengths_past_capacity_raise(paged):
    """A cache_seqlens tensor past the capacity names the row instead of attending a clipped cache
    (checks.check_kvcache_values; tests/test_bounds.py has the rest of the value checks)."""
    q, k_new, v_new = torch.randn(2, 1, 4, 8), torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8)
    if paged:
        k_cache, v_cache = torch.randn(5, 4, 2, 8), torch.randn(5, 4, 2, 8)
        kw = dict(block_table=torch.tensor([[0, 3], [4, 1]], dtype=torch.int32))  # capacity 8
    else:
        k_cache, v_cache, kw = torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8), {}
    lens = torch.tensor([3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] \+ seqlen_new = 7 \+ 2 exceeds the cache capacity of 8"):
        flashtron.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, **kw)
    lens = torch.tensor([3, 6], dtype=torch.int32)  # exactly full is fine
    flashtron.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, **kw)
