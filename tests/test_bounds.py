"""Never an access outside the tensors: the metadata's values (cu_seqlens, seqused_k, block_table,
cache_seqlens, cache_batch_idx, cache_leftpad) are checked where reading them is allowed, and guarded
in the kernels where it is not.

- Checks (checks.reads_values): CPU tensors always; CUDA tensors with a block_table (one sync);
  never under CUDA-graph capture or torch.compile. A bad value raises InputValueError, a
  RuntimeError that names the argument (block_table for a paged overflow, as flash_attn), and
  nothing has been written into the caches by then.
- Guards (where the checks do not run): the kernels clamp varlen bounds into the tensors and skip KV
  cache rows whose metadata is out of range; the CPU path clamps varlen bounds the same way. The
  guard tests switch the checks off (as capture does) and surround every tensor with NaN poison: a
  read outside a tensor turns a result into NaN, a write outside it changes the poison.

Default tier: the checks on the CPU path, and its guard. `-m interpret`: the kernels' guards in
Triton's interpreter. `-m gpu`: the checks and guards on CUDA, eager and replayed from a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

import flashtron
from flashtron import checks

H, HK, D = 4, 2, 16


def i32(*values, device="cpu"):
    return torch.tensor(values, dtype=torch.int32, device=device)


def rn(*shape, device="cpu", gen=None):
    return torch.randn(*shape, generator=gen).to(device)


def assert_input_error(call, match):
    """The call raises InputValueError matching `match`, and the same error is a RuntimeError."""
    with pytest.raises(RuntimeError, match=match) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, flashtron.InputValueError)


# ------------------------------------------------------------------------------------------------
# Varlen: the checks
# ------------------------------------------------------------------------------------------------


def varlen_args(device="cpu", **over):
    gen = torch.Generator().manual_seed(0)
    args = dict(
        q=rn(7, H, D, device=device, gen=gen),
        k=rn(9, HK, D, device=device, gen=gen),
        v=rn(9, HK, D, device=device, gen=gen),
        cu_seqlens_q=i32(0, 3, 7, device=device),
        cu_seqlens_k=i32(0, 4, 9, device=device),
        max_seqlen_q=4,
        max_seqlen_k=5,
    )
    args.update(over)
    return args


def paged_args(device="cpu", **over):
    """Two sequences of 4 and 5 keys in pages of 2: rows use 2 and 3 of their 3 entries."""
    gen = torch.Generator().manual_seed(1)
    table = i32(4, 0, -1, 2, 5, 1, device=device).view(2, 3)  # -1: an unused entry (padding)
    args = varlen_args(
        device, k=rn(6, 2, HK, D, device=device, gen=gen), v=rn(6, 2, HK, D, device=device, gen=gen), block_table=table
    )
    args.update(over)
    return args


BAD_VARLEN = {
    "cu-q-decreasing": (
        dict(cu_seqlens_q=i32(0, 5, 3)),
        r"flash_attn_varlen_func: cu_seqlens_q must be non-decreasing, "
        r"got cu_seqlens_q\[2\] = 3 < cu_seqlens_q\[1\] = 5",
    ),
    "cu-q-negative": (dict(cu_seqlens_q=i32(-1, 3, 7)), r"cu_seqlens_q\[0\] must be >= 0, got -1"),
    "cu-q-past-total": (
        dict(cu_seqlens_q=i32(0, 3, 8)),
        r"cu_seqlens_q\[-1\] = 8 runs past the end of q, which has 7 rows",
    ),
    "cu-k-past-total": (
        dict(cu_seqlens_k=i32(0, 4, 12), max_seqlen_k=8),
        r"cu_seqlens_k\[-1\] = 12 runs past the end of k",
    ),
    "cu-k-decreasing": (dict(cu_seqlens_k=i32(0, 9, 4)), r"cu_seqlens_k must be non-decreasing"),
    "max-q-short": (
        dict(max_seqlen_q=3),
        r"max_seqlen_q must be at least the longest sequence of cu_seqlens_q \(sequence 1: 4 tokens\), got 3",
    ),
    "max-k-short": (dict(max_seqlen_k=4), r"max_seqlen_k must be at least the longest sequence of cu_seqlens_k"),
    "seqused-long": (
        dict(seqused_k=i32(4, 6)),
        r"seqused_k\[1\] must be in \[0, 5\] \(sequence 1 of cu_seqlens_k\), got 6",
    ),
    "seqused-negative": (dict(seqused_k=i32(-1, 2)), r"seqused_k\[0\] must be in \[0, 4\]"),
}

BAD_PAGED = {
    "past-table": (
        dict(cu_seqlens_k=i32(0, 4, 11), max_seqlen_k=7),
        r"sequence 1 of cu_seqlens_k has 7 keys, more than block_table addresses: "
        r"block_table.shape\[1\] \* page_block_size = 3 \* 2 = 6",
    ),
    "entry-negative": (
        dict(block_table=i32(4, -1, 0, 2, 5, 1).view(2, 3)),
        r"block_table\[0, 1\] = -1 is not a page of k \(num_blocks = 6\)",
    ),
    "entry-past-pages": (dict(block_table=i32(4, 0, 3, 2, 5, 6).view(2, 3)), r"block_table\[1, 2\] = 6 is not a page"),
}


@pytest.mark.parametrize("case", list(BAD_VARLEN))
def test_varlen_values_checked_cpu(case):
    over, match = BAD_VARLEN[case]
    assert_input_error(lambda: flashtron.flash_attn_varlen_func(**varlen_args(**over)), match)


@pytest.mark.parametrize("case", list(BAD_PAGED))
def test_paged_varlen_values_checked_cpu(case):
    over, match = BAD_PAGED[case]
    assert_input_error(lambda: flashtron.flash_attn_varlen_func(**paged_args(**over)), match)


def test_varlen_packed_names():
    """The packed form names its own arguments."""
    qkv = torch.randn(7, 3, H, D)
    call = lambda: flashtron.flash_attn_varlen_qkvpacked_func(qkv, i32(0, 5, 3), 5)
    assert_input_error(call, r"flash_attn_varlen_qkvpacked_func: cu_seqlens must be non-decreasing")
    call = lambda: flashtron.flash_attn_varlen_qkvpacked_func(qkv, i32(0, 3, 9), 6)
    assert_input_error(call, r"cu_seqlens\[-1\] = 9 runs past the end of qkv")


def test_paged_varlen_unused_entries_may_hold_anything():
    """flash_attn never reads the entries past a sequence's pages: -1 padding there works and gives
    the same result as any valid page number."""
    args = paged_args()
    out = flashtron.flash_attn_varlen_func(**args)
    padded = dict(args, block_table=i32(4, 0, 3, 2, 5, 1).view(2, 3))
    assert torch.equal(out, flashtron.flash_attn_varlen_func(**padded))


def test_varlen_cpu_guard_clamps_when_unchecked(monkeypatch):
    """Under torch.compile the API cannot read the values; the CPU path then clamps them like the
    kernels do: every sequence stays inside q and k (no error, no wrap-around, no NaN read)."""
    monkeypatch.setattr(checks, "reads_values", lambda t, paged: False)
    args = varlen_args(cu_seqlens_q=i32(0, 5, 3), cu_seqlens_k=i32(0, 4, 20), seqused_k=i32(9, -2))
    out = flashtron.flash_attn_varlen_func(**args)
    assert out.shape == (7, H, D) and torch.isfinite(out[:5]).all()
    # sequence 0: queries [0, 5) over keys [0, 4); sequence 1: q [5, 5) empty, k [4, 9) used 0
    ref = flashtron.flash_attn_varlen_func(
        **varlen_args(cu_seqlens_q=i32(0, 5, 5), cu_seqlens_k=i32(0, 4, 4), max_seqlen_q=5)
    )
    assert torch.equal(out[:5], ref[:5])


# ------------------------------------------------------------------------------------------------
# KV cache: the checks, before anything is written
# ------------------------------------------------------------------------------------------------


def kvcache_args(device="cpu", paged=False, **over):
    gen = torch.Generator().manual_seed(2)
    args = dict(q=rn(2, 1, H, D, device=device, gen=gen), k=rn(2, 2, HK, D, device=device, gen=gen))
    args["v"] = rn(2, 2, HK, D, device=device, gen=gen)
    if paged:  # pages of 4, 3 entries per row: 12 positions
        args["k_cache"], args["v_cache"] = (
            rn(7, 4, HK, D, device=device, gen=gen),
            rn(7, 4, HK, D, device=device, gen=gen),
        )
        args["block_table"] = i32(6, 0, -1, 3, 1, 5, device=device).view(2, 3)  # row 0 uses 2 pages
        args["cache_seqlens"] = i32(5, 9, device=device)
    else:  # 3 cache rows of 12 positions
        args["k_cache"], args["v_cache"] = (
            rn(3, 12, HK, D, device=device, gen=gen),
            rn(3, 12, HK, D, device=device, gen=gen),
        )
        args["cache_seqlens"] = i32(5, 9, device=device)
    args.update(over)
    return args


BAD_KVCACHE = {
    "seqlens-negative": (False, dict(cache_seqlens=i32(-1, 3)), r"cache_seqlens\[0\] must be >= 0, got -1"),
    "dense-overflow": (
        False,
        dict(cache_seqlens=i32(5, 11)),
        r"cache_seqlens\[1\] \+ seqlen_new = 11 \+ 2 exceeds the cache capacity of 12 positions per row \(k_cache",
    ),
    "paged-overflow": (
        True,
        dict(cache_seqlens=i32(5, 11)),
        r"cache_seqlens\[1\] \+ seqlen_new = 11 \+ 2 exceeds the cache capacity of 12 positions per row; "
        r"block_table addresses block_table.shape\[1\] \* page_block_size = 3 \* 4",
    ),
    "paged-overflow-no-new": (
        True,
        dict(cache_seqlens=i32(5, 13), k=None, v=None),
        r"cache_seqlens\[1\] \+ seqlen_new = 13 \+ 0 exceeds .* block_table",
    ),
    "batch-idx-past": (
        False,
        dict(cache_batch_idx=i32(0, 3)),
        r"cache_batch_idx\[1\] = 3 is not a row of k_cache \(batch_size_cache = 3\)",
    ),
    "batch-idx-negative": (False, dict(cache_batch_idx=i32(-1, 2)), r"cache_batch_idx\[0\] = -1 is not a row"),
    "leftpad-negative": (False, dict(cache_leftpad=i32(-2, 0)), r"cache_leftpad\[0\] must be in \[0, cache_seqlens"),
    "leftpad-past": (True, dict(cache_leftpad=i32(0, 12)), r"cache_leftpad\[1\] must be in \[0, .* = 11\], got 12"),
    "entry-negative": (
        True,
        dict(block_table=i32(6, -1, -1, 3, 1, 5).view(2, 3)),
        r"block_table\[0, 1\] = -1 is not a page of k_cache \(num_blocks = 7\)",
    ),
    "entry-past-pages": (
        True,
        dict(block_table=i32(6, 0, -1, 3, 1, 7).view(2, 3)),
        r"block_table\[1, 2\] = 7 is not a",
    ),
}


@pytest.mark.parametrize("case", list(BAD_KVCACHE))
def test_kvcache_values_checked_before_writing_cpu(case):
    paged, over, match = BAD_KVCACHE[case]
    args = kvcache_args(paged=paged, **over)
    before = args["k_cache"].clone(), args["v_cache"].clone()
    assert_input_error(lambda: flashtron.flash_attn_with_kvcache(**args), match)
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1]), "cache written"


def test_kvcache_unused_entries_may_hold_anything():
    args = kvcache_args(paged=True)  # row 0 uses pages 6, 0; its third entry is -1
    out = flashtron.flash_attn_with_kvcache(
        **{n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in args.items()}
    )
    args["block_table"] = i32(6, 0, 2, 3, 1, 5).view(2, 3)
    assert torch.equal(out, flashtron.flash_attn_with_kvcache(**args))


def test_kvcache_int_overflow_names_block_table():
    args = kvcache_args(paged=True, cache_seqlens=11)
    assert_input_error(
        lambda: flashtron.flash_attn_with_kvcache(**args),
        r"cache_seqlens \+ seqlen_new must be <= the cache capacity 12, got 11 \+ 2; block_table addresses",
    )


def test_reads_values_rule(monkeypatch):
    """CPU: always. CUDA: only paged, and not under capture. Never while compiling. Meta: never."""
    cpu, meta = torch.empty(1), torch.empty(1, device="meta")
    assert checks.reads_values(cpu, paged=False) and checks.reads_values(cpu, paged=True)
    assert not checks.reads_values(meta, paged=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not checks.reads_values(cpu, paged=True)
