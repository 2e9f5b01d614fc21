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


# ------------------------------------------------------------------------------------------------
# Guards: where the checks cannot run (CUDA-graph capture, torch.compile, unpaged CUDA calls)
# ------------------------------------------------------------------------------------------------


def poisoned(t):
    """A copy of t inside a buffer of NaN poison as long again on each side: (view, buffer, pad)."""
    n = t.numel()
    pad = max(n, 256)
    buffer = torch.full((pad + n + pad,), float("nan"), dtype=t.dtype, device=t.device)
    view = buffer[pad : pad + n].view(t.shape)
    view.copy_(t)
    return view, buffer, pad


def assert_poison_intact(buffer, pad, n, name):
    assert torch.isnan(buffer[:pad]).all() and torch.isnan(buffer[pad + n :]).all(), f"{name}: written outside"


@pytest.fixture
def unchecked(monkeypatch):
    """The host checks off, as under CUDA-graph capture or torch.compile: only the guards act."""
    monkeypatch.setattr(checks, "reads_values", lambda t, paged: False)


# name: (paged, the bad metadata, the same repaired for a reference run, bad row, effect). Effects:
# "skipped": nothing written for the row, out 0, lse -inf; "no-keys": its keys are appended but it
# attends nothing; "last-page": a bad entry over old keys reads the cache's last page, 6, in its place (the
# reference puts 6 there); "unwritten": a bad entry where the new keys go: they are dropped (the row's output is
# meaningless and not compared).
KV_GUARD = {
    "dense-overflow": (False, dict(cache_seqlens=(5, 11)), dict(cache_seqlens=(5, 9)), 1, "skipped"),
    "dense-negative": (False, dict(cache_seqlens=(-3, 9)), dict(cache_seqlens=(5, 9)), 0, "skipped"),
    "batch-idx-past": (False, dict(cache_batch_idx=(2, 7)), dict(cache_batch_idx=(2, 0)), 1, "skipped"),
    "batch-idx-negative": (False, dict(cache_batch_idx=(-1, 0)), dict(cache_batch_idx=(2, 0)), 0, "skipped"),
    "leftpad-past": (False, dict(cache_leftpad=(0, 12)), dict(cache_leftpad=(0, 11)), 1, "no-keys"),
    "leftpad-negative": (True, dict(cache_leftpad=(-4, 0)), dict(cache_leftpad=(7, 0)), 0, "no-keys"),
    "paged-overflow": (True, dict(cache_seqlens=(5, 11)), dict(cache_seqlens=(5, 9)), 1, "skipped"),
    "paged-int-max": (True, dict(cache_seqlens=(5, 2**31 - 1)), dict(cache_seqlens=(5, 9)), 1, "skipped"),
    "entry-past-pages": (True, dict(block_table=(6, 0, -1, 3, 99, 5)), dict(block_table=(6, 0, -1, 3, 6, 5)), 1,
                         "last-page"),
    "entry-negative": (True, dict(block_table=(-7, 0, -1, 3, 1, 5)), dict(block_table=(6, 0, -1, 3, 1, 5)), 0,
                       "last-page"),
    "entry-negative-append": (True, dict(block_table=(6, 0, -1, 3, 1, -2)), None, 1, "unwritten"),
}  # fmt: skip


def _kv_base(device, paged):
    """Two rows of 12 positions with 5 and 9 filled, 2 new keys each. Dense: 3 cache rows, batch row
    b in cache row (2, 0)[b]; paged: 7 pages of 4, table rows (6, 0, -1) and (3, 1, 5)."""
    args = kvcache_args(device, paged=paged)
    if not paged:
        args["cache_batch_idx"] = i32(2, 0, device=device)
    return args


def _with(args, over, device):
    out = dict(args)
    for name, values in over.items():
        t = torch.tensor(values, dtype=torch.int32, device=device)
        out[name] = t.view(2, 3) if name == "block_table" else t
    return out


def _expected_caches(pristine, args, rows):
    """The caches after the appends of batch rows `rows` alone, written out by hand on the host."""
    kc, vc = pristine[0].cpu().clone(), pristine[1].cpu().clone()
    lens, k_new, v_new = args["cache_seqlens"].cpu(), args["k"].cpu(), args["v"].cpu()
    for b in rows:
        for t in range(k_new.shape[1]):
            pos = int(lens[b]) + t
            if "block_table" in args:
                where = (int(args["block_table"][b, pos // kc.shape[1]]), pos % kc.shape[1])
            else:
                where = (int(args["cache_batch_idx"][b]), pos)
            kc[where], vc[where] = k_new[b, t], v_new[b, t]
    return kc, vc


def check_kvcache_guard(device, name, num_splits):
    paged, bad, fixed, row, effect = KV_GUARD[name]
    base = _kv_base(device, paged)
    pristine = base["k_cache"].clone(), base["v_cache"].clone()
    args = _with(base, bad, device)
    args["k_cache"], kbuf, kpad = poisoned(pristine[0])
    args["v_cache"], vbuf, vpad = poisoned(pristine[1])
    out, lse = flashtron.flash_attn_with_kvcache(**args, num_splits=num_splits, return_softmax_lse=True)
    assert_poison_intact(kbuf, kpad, pristine[0].numel(), "k_cache")
    assert_poison_intact(vbuf, vpad, pristine[1].numel(), "v_cache")
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "a read outside the caches (NaN poison)"
    good = 1 - row
    if fixed is not None:  # the good row (and a last-page row) as a run with repaired metadata gives them
        ref = _with(base, fixed, device)
        ref["k_cache"], ref["v_cache"] = pristine[0].clone(), pristine[1].clone()
        ref_out, ref_lse = flashtron.flash_attn_with_kvcache(**ref, num_splits=num_splits, return_softmax_lse=True)
        compared = [good, row] if effect == "last-page" else [good]
        assert torch.equal(out[compared], ref_out[compared]) and torch.equal(lse[compared], ref_lse[compared])
    if effect in ("skipped", "no-keys"):
        assert torch.equal(out[row], torch.zeros_like(out[row])) and torch.isneginf(lse[row]).all()
    writes = [good] if effect in ("skipped", "unwritten") else [0, 1]
    kc, vc = _expected_caches(pristine, args, writes)
    assert torch.equal(args["k_cache"].cpu(), kc) and torch.equal(args["v_cache"].cpu(), vc)


def check_varlen_guard(device):
    """cu_seqlens out of order and past the tensors, seqused_k out of range: every sequence is clamped
    into q and k, so no read reaches the poison around them and the covered rows are right."""
    gen = torch.Generator().manual_seed(4)
    q0, k0, v0 = (
        rn(7, H, D, device=device, gen=gen),
        rn(9, HK, D, device=device, gen=gen),
        rn(9, HK, D, device=device, gen=gen),
    )
    (q, qb, qp), (k, kb, kp), (v, vb, vp) = poisoned(q0), poisoned(k0), poisoned(v0)
    for t in (q, k, v):
        t.requires_grad_()
    # clamped: sequence 0 = q [0, 5) x k [0, 4); sequence 1 = q [5, 5) (empty) x k [4, 9) with seqused 0
    out = flashtron.flash_attn_varlen_func(
        q, k, v, i32(0, 5, 3, device=device), i32(0, 4, 20, device=device), 5, 16, causal=True,
        seqused_k=i32(7, -2, device=device),
    )  # fmt: skip
    assert not torch.isnan(out[:5]).any(), "a read outside q, k or v (NaN poison)"
    out[:5].sum().backward()
    assert not torch.isnan(q.grad[:5]).any() and not torch.isnan(k.grad).any() and not torch.isnan(v.grad).any()
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q0, k0, v0))
    ref = flashtron.flash_attn_varlen_func(
        qr[:5], kr[:4], vr[:4], i32(0, 5, device=device), i32(0, 4, device=device), 5, 4, causal=True
    )
    ref.sum().backward()
    torch.testing.assert_close(out[:5], ref)
    torch.testing.assert_close(q.grad[:5], qr.grad[:5])
    torch.testing.assert_close(k.grad[:4], kr.grad[:4])
    assert torch.equal(k.grad[4:], torch.zeros_like(k.grad[4:]))  # sequence 1 has no queries
    for buf, pad, name in ((qb, qp, "q"), (kb, kp, "k"), (vb, vp, "v")):
        assert_poison_intact(buf, pad, buf.numel() - 2 * pad, name)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("name", list(KV_GUARD))
def test_kvcache_guard_cpu_checks_first(name, splits):
    """On the CPU path the checks always run: every guard case is an error there instead."""
    paged, bad, _, _, _ = KV_GUARD[name]
    args = _with(_kv_base("cpu", paged), bad, "cpu")
    with pytest.raises(flashtron.InputValueError):
        flashtron.flash_attn_with_kvcache(**args, num_splits=splits)


@pytest.mark.interpret
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("name", list(KV_GUARD))
def test_kvcache_guard_interpret(kernel_device, unchecked, name, splits):
    check_kvcache_guard(kernel_device, name, splits)


@pytest.mark.interpret
def test_varlen_guard_interpret(kernel_device, unchecked):
    check_varlen_guard(kernel_device)


def test_varlen_guard_cpu(unchecked):
    check_varlen_guard("cpu")


# ------------------------------------------------------------------------------------------------
# GPU tier: the checks (paged calls, one sync) and the guards (everything else, and CUDA graphs)
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_reads_values_rule_gpu():
    t = torch.empty(1, device="cuda")
    assert checks.reads_values(t, paged=True) and not checks.reads_values(t, paged=False)
    graph, seen = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        seen.append(checks.reads_values(t, paged=True))
        t.add_(1)
    assert seen == [False]


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in BAD_KVCACHE if BAD_KVCACHE[c][0]])
def test_paged_kvcache_values_checked_gpu(case):
    """Paged calls on CUDA read their metadata (one sync) and raise before writing, as flash_attn."""
    _, over, match = BAD_KVCACHE[case]
    args = kvcache_args(
        "cuda", paged=True, **{n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in over.items()}
    )
    before = args["k_cache"].clone(), args["v_cache"].clone()
    assert_input_error(lambda: flashtron.flash_attn_with_kvcache(**args), match)
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(BAD_PAGED))
def test_paged_varlen_values_checked_gpu(case):
    over, match = BAD_PAGED[case]
    args = paged_args("cuda", **{n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in over.items()})
    assert_input_error(lambda: flashtron.flash_attn_varlen_func(**args), match)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("name", list(KV_GUARD))
def test_kvcache_guard_gpu(monkeypatch, name, splits):
    """Dense caches are never checked on CUDA: the guard acts as is. Paged ones are checked, so the
    checks are switched off here to reach the guard (test_kvcache_guard_cuda_graph reaches it the
    way users do)."""
    if KV_GUARD[name][0]:
        monkeypatch.setattr(checks, "reads_values", lambda t, paged: False)
    check_kvcache_guard("cuda", name, splits)


@pytest.mark.gpu
def test_varlen_guard_gpu():
    """Unpaged varlen calls are never checked on CUDA: the kernels' clamp acts as is."""
    check_varlen_guard("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("bad", ["overflow", "int-max", "entry-past", "entry-negative-append", "leftpad"])
def test_kvcache_guard_cuda_graph(bad, splits):
    """A paged decode step captured in a CUDA graph (no check can run there), replayed with bad
    metadata copied into the captured tensors: no access leaves the poisoned caches, the bad row is
    skipped or reads the last page, and the good row is unaffected."""
    args = _kv_base("cuda", paged=True)
    args["cache_leftpad"] = i32(0, 0, device="cuda")
    pristine = args["k_cache"].clone(), args["v_cache"].clone()
    args["k_cache"], kbuf, kpad = poisoned(pristine[0])
    args["v_cache"], vbuf, vpad = poisoned(pristine[1])
    step = lambda: flashtron.flash_attn_with_kvcache(**args, num_splits=splits, return_softmax_lse=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        good_out, good_lse = (t.clone() for t in step())  # warm-up compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    meta = {
        "overflow": ("cache_seqlens", (5, 11)),
        "int-max": ("cache_seqlens", (5, 2**31 - 1)),
        "entry-past": ("block_table", (6, 0, -1, 3, 99, 5)),
        "entry-negative-append": ("block_table", (6, 0, -1, 3, 1, -2)),
        "leftpad": ("cache_leftpad", (0, 12)),
    }[bad]
    saved = args[meta[0]].clone()
    for _ in range(2):  # the first replay with the good metadata, then with the bad
        args["k_cache"].copy_(pristine[0])
        args["v_cache"].copy_(pristine[1])
        graph.replay()
        torch.cuda.synchronize()
        args[meta[0]].copy_(torch.tensor(meta[1], dtype=torch.int32).view_as(saved))
    assert_poison_intact(kbuf, kpad, pristine[0].numel(), "k_cache")
    assert_poison_intact(vbuf, vpad, pristine[1].numel(), "v_cache")
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[0], good_out[0]) and torch.equal(lse[0], good_lse[0])  # row 0 is unaffected
    if bad in ("overflow", "int-max", "leftpad"):
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    args[meta[0]].copy_(saved)
