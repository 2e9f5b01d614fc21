"""The Gluon dQ kernel's block walk (kernels/hopper_bwd.attention_bwd_dq_hopper_kernel), the FUSED_DQ dK/dV
kernel's (dQ added per step from the key side, emulate_fused_dq below) and the dK/dV kernel's with and without
LEAN_MASK (emulate_dkdv), emulated in float64 on the CPU with the kernels' own range and mask helpers, against
autograd of the reference.

Gluon kernels do not run in Triton's interpreter, and the kernel has only been compiled (test_hopper_compile).
What can be checked without a GPU is its index arithmetic: `hopper_common.kv_range` and `hopper_bwd._segment`
run here from their source (the `gl` module swapped for plain-int max/min), and the rest of the walk repeats
the kernel's lines: at least one block, block lo peeled and masked, the three segments clipped to start after
it, the keys of step t at lo + t * BLOCK_N (what the loader loads), zero-filled Q/dO/K/V rows past the
sequence ends, lse -inf (rows that see no key) and rows past seqlen_q read as +inf, the mask only in the
edge segments, GQA head h reading KV head h // group. If the walk skipped or repeated a block, masked too
little in the middle or let a row that sees nothing produce NaN, dq would differ from the reference.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="needs triton with Gluon (3.6+)")

from flashtron import launch_hopper  # noqa: E402
from flashtron.kernels import hopper_bwd, hopper_common  # noqa: E402
from flashtron.reference import attention_ref  # noqa: E402

LOG2E = math.log2(math.e)


def _on_ints(jitted):
    """The @gluon.jit helper's Python function, run on plain ints (gl.maximum / gl.minimum as max / min)."""
    shim = types.SimpleNamespace(maximum=max, minimum=min, constexpr=int)
    fn = jitted.fn
    return types.FunctionType(fn.__code__, {**fn.__globals__, "gl": shim}, fn.__name__, fn.__defaults__)


KV_RANGE = _on_ints(hopper_common.kv_range)
Q_RANGE = _on_ints(hopper_bwd._q_range)
SEGMENT = _on_ints(hopper_bwd._segment)
# LEAN_MASK's helpers: plain arithmetic and compares, so they run as they are on ints and torch tensors
KEY_THRESHOLDS = _on_ints(hopper_bwd.key_thresholds)
WINDOW_KEEP = _on_ints(hopper_bwd.window_keep)
NEXT_STEP = _on_ints(hopper_bwd.next_step)
CHECKED_BOUNDS = hopper_bwd.checked_bounds  # a constexpr_function: callable from the host


def _rows(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Rows [start, start + n) of t (seqlen, d), zero-filled past its end, as a TMA box reads them."""
    box = torch.zeros(n, t.shape[-1], dtype=t.dtype)
    part = t[start : start + n]
    box[: part.shape[0]] = part
    return box


def emulate_dq(q, k, v, dout, lse, delta, scale, window, block_m, block_n):
    """dq as the kernel computes it, in q's dtype (float64 here): q, dout (batch, seqlen_q, nheads, d),
    k, v (batch, seqlen_k, nheads_k, d), lse and delta (batch, nheads, seqlen_q)."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    has_left, has_right = window[0] >= 0, window[1] >= 0
    wl, wr = max(window[0], 0), max(window[1], 0)
    dq = torch.full_like(q, float("nan"))  # poisoned: every row below seqlen_q must be written
    for b in range(batch):
        for h in range(nheads):
            hk = h // (nheads // nheads_k)
            for start_m in range(0, seqlen_q, block_m):
                lo, full_lo, full_hi, hi = KV_RANGE(
                    start_m, seqlen_q, seqlen_k, wl, wr, block_m, block_n, has_left, has_right
                )
                n_blocks = max(-(-(hi - lo) // block_n), 1)
                assert lo < seqlen_k  # block lo, peeled, is in range
                steps = [(lo, True)]  # (start_n, MASK): block 0 peeled and masked
                first = lo + block_n
                for seg in range(3):
                    start, end = SEGMENT(seg, lo, full_lo, full_hi, hi)
                    steps += [(n, seg != 1) for n in range(max(start, first), max(end, first), block_n)]
                # the consumers' t-th step reads the slot the loader filled with block lo + t * BLOCK_N
                assert [n for n, _ in steps] == [lo + t * block_n for t in range(n_blocks)]
                qt = _rows(q[b, :, h], start_m, block_m)
                dot = _rows(dout[b, :, h], start_m, block_m)
                offs_m = start_m + torch.arange(block_m)
                row_ok = offs_m < seqlen_q
                lse_rows = torch.where(row_ok, _rows(lse[b, h, :, None], start_m, block_m)[:, 0], float("-inf"))
                delta_rows = _rows(delta[b, h, :, None], start_m, block_m)[:, 0]
                lse_log2 = torch.where(lse_rows == float("-inf"), float("inf"), lse_rows * LOG2E)
                acc = torch.zeros(block_m, d, dtype=q.dtype)
                for start_n, mask in steps:
                    kt = _rows(k[b, :, hk], start_n, block_n)
                    vt = _rows(v[b, :, hk], start_n, block_n)
                    cols = (start_n + torch.arange(block_n))[None, :]
                    diag = offs_m[:, None] + (seqlen_k - seqlen_q)
                    keep = (cols < seqlen_k).expand(block_m, block_n)
                    if has_right:
                        keep = keep & (cols <= diag + wr)
                    if has_left:
                        keep = keep & (cols >= diag - wl)
                    p = torch.exp2(qt @ kt.T * (scale * LOG2E) - lse_log2[:, None])
                    if mask:
                        p = torch.where(keep, p, 0.0)
                    else:  # the unmasked middle: every valid row sees every key of the block
                        assert keep[row_ok & torch.isfinite(lse_rows)].all()
                    ds = p * (dot @ vt.T - delta_rows[:, None])
                    acc = acc + ds @ kt
                n = min(block_m, seqlen_q - start_m)
                dq[b, start_m : start_m + n, h] = (acc * scale)[:n]
    return dq


# (seqlen_q, seqlen_k, nheads, nheads_k, window): causal is (-1, 0)
SHAPES = [
    (300, 300, 4, 2, (-1, 0)),
    (1, 1, 2, 1, (-1, -1)),
    (300, 70, 4, 1, (-1, 0)),  # sq > sk: the first 230 rows see no key
    (17, 129, 2, 2, (-1, 0)),
    (129, 17, 4, 2, (5, 3)),
    (257, 257, 2, 1, (64, 32)),
    (200, 513, 4, 4, (100, 0)),
    (513, 200, 2, 1, (0, 100)),
    (130, 1, 2, 2, (-1, 0)),  # one key, most rows empty
    (64, 300, 4, 2, (-1, -1)),
    (255, 383, 2, 1, (-1, -1)),
]


def _reference_case(sq, sk, h, hk, window, d, seed):
    """float64 inputs with 8 columns standing in for d, the kernels' other inputs (lse, delta, the scale) and
    (dq, dk, dv) by autograd through the reference (out and lse both carrying a gradient)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, sq, h, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, sk, hk, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, sk, hk, 8, generator=g, dtype=torch.float64, requires_grad=True)
    scale = d**-0.5
    out, lse, _ = attention_ref(q, k, v, softmax_scale=scale, window_size=window)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dlse = torch.where(torch.isfinite(lse), torch.randn(lse.shape, generator=g, dtype=torch.float64), 0.0)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    delta = (dout * out).sum(-1).transpose(1, 2) - dlse  # launch.attention_backward's delta
    inputs = (q.detach(), k.detach(), v.detach(), dout, lse.detach(), delta.detach(), scale, window)
    return inputs, grads


def _check_walk(emulate, tile, sq, sk, h, hk, window, d, seed):
    """emulate(q, k, v, dout, lse, delta, scale, window, block_m, block_n) -> dq, against the reference's."""
    inputs, (dq_ref, _, _) = _reference_case(sq, sk, h, hk, window, d, seed)
    dq = emulate(*inputs, tile.block_m, tile.block_n)
    assert not dq.isnan().any()
    torch.testing.assert_close(dq, dq_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", sorted(launch_hopper.HOPPER_DQ_TILES))
@pytest.mark.parametrize("sq, sk, h, hk, window", SHAPES)
def test_dq_block_walk_matches_reference(sq, sk, h, hk, window, d):
    # the dispatched tile's blocks
    _check_walk(emulate_dq, launch_hopper.HOPPER_DQ_TILES[d], sq, sk, h, hk, window, d, sq * 131 + sk)


def emulate_fused_dq(q, k, v, dout, lse, delta, scale, window, block_m, block_n):
    """dq as the FUSED_DQ dK/dV kernel computes it (float64 here): every program (key block, KV head) walks the
    query blocks of _q_range's three segments, every head of its group innermost, as _loader and _steps do,
    and adds each step's dS K * scale into the fp32 dq_accum rows of (query block, head); TMA drops the
    rows past seqlen_q. lse is read as the kernel reads it: +inf past seqlen_q in the masked segments, as
    stored (-inf for rows that see no key) everywhere else."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    has_left, has_right = window[0] >= 0, window[1] >= 0
    wl, wr = max(window[0], 0), max(window[1], 0)
    dq_accum = torch.zeros(batch, seqlen_q, nheads, d, dtype=q.dtype)  # the launcher's torch.zeros
    for b in range(batch):
        for hk in range(nheads_k):
            for start_n in range(0, seqlen_k, block_n):  # the grid's key blocks
                lo, full_lo, full_hi, hi = Q_RANGE(
                    start_n, seqlen_q, seqlen_k, wl, wr, block_m, block_n, has_left, has_right
                )
                kt = _rows(k[b, :, hk], start_n, block_n)
                vt = _rows(v[b, :, hk], start_n, block_n)
                cols = (start_n + torch.arange(block_n))[None, :]
                for seg in range(3):
                    start, end = SEGMENT(seg, lo, full_lo, full_hi, hi)
                    mask = seg != 1
                    for step in range(-(-(end - start) // block_m) * group):  # _steps' loop, as _loader's
                        h = hk * group + step % group
                        start_m = start + (step // group) * block_m
                        offs_m = start_m + torch.arange(block_m)
                        row_ok = offs_m < seqlen_q
                        lse_rows = _rows(lse[b, h, :, None], start_m, block_m)[:, 0]
                        if mask:
                            lse_rows = torch.where(row_ok, lse_rows, float("inf"))
                        else:  # the unmasked middle reads lse without a row mask: rows in range only
                            assert row_ok.all()
                        delta_rows = _rows(delta[b, h, :, None], start_m, block_m)[:, 0]
                        qt = _rows(q[b, :, h], start_m, block_m)
                        dot = _rows(dout[b, :, h], start_m, block_m)
                        diag = offs_m[:, None] + (seqlen_k - seqlen_q)
                        keep = (cols < seqlen_k).expand(block_m, block_n)
                        if has_right:
                            keep = keep & (cols <= diag + wr)
                        if has_left:
                            keep = keep & (cols >= diag - wl)
                        # exp2 of +inf (lse -inf) is inf: where() below selects 0 for those, as the kernel's
                        with torch.no_grad():
                            p = torch.exp2(qt @ kt.T * (scale * LOG2E) - lse_rows[:, None] * LOG2E)
                        if mask:  # the window mask and, for dQ's sake, the keys past seqlen_k
                            p = torch.where(keep, p, 0.0)
                        else:  # the unmasked middle: every row sees every key of the block
                            assert keep.all()
                        ds = p * (dot @ vt.T - delta_rows[:, None])
                        n = min(block_m, seqlen_q - start_m)
                        dq_accum[b, start_m : start_m + n, h] += (ds @ kt * scale)[:n]  # the TMA reduce-add
    return dq_accum


@pytest.mark.parametrize("d", sorted(launch_hopper.HOPPER_BWD_FUSED_TILES))
@pytest.mark.parametrize("sq, sk, h, hk, window", SHAPES)
def test_fused_dq_block_walk_matches_reference(sq, sk, h, hk, window, d):
    # the fused tile's blocks
    _check_walk(emulate_fused_dq, launch_hopper.HOPPER_BWD_FUSED_TILES[d], sq, sk, h, hk, window, d, sq * 131 + sk + 7)


def test_fused_dq_walk_visits_each_pair_once():
    """Every (query block, key block, head) pair whose rows see a key of the block is one step of exactly one
    program: counted on ints for a causal GQA shape with sq != sk and a ragged last block of each."""
    sq, sk, nheads, nheads_k, bm, bn = 300, 257, 4, 2, 64, 128
    group = nheads // nheads_k
    seen = {}
    for start_n in range(0, sk, bn):
        lo, full_lo, full_hi, hi = Q_RANGE(start_n, sq, sk, 0, 0, bm, bn, False, True)
        for seg in range(3):
            start, end = SEGMENT(seg, lo, full_lo, full_hi, hi)
            for step in range(-(-(end - start) // bm) * group):
                key = (start + (step // group) * bm, start_n, step % group)
                seen[key] = seen.get(key, 0) + 1
    assert set(seen.values()) == {1}
    shift = sk - sq  # causal, bottom-right: row i sees keys up to i + shift
    need = {(m, n, g) for m in range(0, sq, bm) for n in range(0, sk, bn) for g in range(group)
            if min(m + bm, sq) - 1 + shift >= n}  # fmt: skip
    assert set(seen) == need


def emulate_dkdv(q, k, v, dout, lse, delta, scale, window, block_m, block_n, lean_mask):
    """(dk, dv) as the dK/dV kernel computes them (float64 here), its walk as fused_dq's above; with lean_mask,
    as LEAN_MASK walks and masks: the (head, query block) of each step from next_step's counters (checked
    against the division), the mask from key_thresholds and window_keep over the offsets 0 .. block_m - 1 that
    the kernel loads from shared memory, only the bounds checked_bounds gives the segment, and that mask
    checked equal to the full one on every real row and key (rows past seqlen_q have P = 0 through lse +inf,
    keys past seqlen_k are not stored; neither needs it)."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    has_left, has_right = window[0] >= 0, window[1] >= 0
    wl, wr = max(window[0], 0), max(window[1], 0)
    lean = lean_mask and (has_left or has_right)  # the kernel's LEAN_WINDOW
    dk = torch.full_like(k, float("nan"))  # poisoned: every key row below seqlen_k must be written
    dv = torch.full_like(v, float("nan"))
    for b in range(batch):
        for hk in range(nheads_k):
            for start_n in range(0, seqlen_k, block_n):
                lo, full_lo, full_hi, hi = Q_RANGE(
                    start_n, seqlen_q, seqlen_k, wl, wr, block_m, block_n, has_left, has_right
                )
                kt = _rows(k[b, :, hk], start_n, block_n)
                vt = _rows(v[b, :, hk], start_n, block_n)
                keys = (start_n + torch.arange(block_n))[:, None]  # keys along the rows, as the kernel's blocks
                first_q, last_q = KEY_THRESHOLDS(keys, seqlen_q, seqlen_k, wl, wr)
                acc_dk = torch.zeros(block_n, d, dtype=q.dtype)
                acc_dv = torch.zeros(block_n, d, dtype=q.dtype)
                for seg in range(3):
                    start, end = SEGMENT(seg, lo, full_lo, full_hi, hi)
                    mask = seg != 1
                    check_left, check_right = CHECKED_BOUNDS(seg, has_left, has_right, lean)
                    counters = (hk * group, start)  # LEAN_MASK's (head, query block), advanced by next_step
                    for step in range(-(-(end - start) // block_m) * group):
                        h, start_m = hk * group + step % group, start + (step // group) * block_m  # the division
                        if lean:
                            assert counters == (h, start_m)
                            counters = NEXT_STEP(*counters, hk * group, hk * group + group, block_m)
                        offs_m = start_m + torch.arange(block_m)
                        row_ok = offs_m < seqlen_q
                        lse_rows = _rows(lse[b, h, :, None], start_m, block_m)[:, 0]
                        if mask:
                            lse_rows = torch.where(row_ok, lse_rows, float("inf"))
                        else:
                            assert row_ok.all()
                        delta_rows = _rows(delta[b, h, :, None], start_m, block_m)[:, 0]
                        qt = _rows(q[b, :, h], start_m, block_m)
                        dot = _rows(dout[b, :, h], start_m, block_m)
                        # transposed blocks, keys along the rows: S^T, P^T [block_n, block_m]
                        diag = offs_m[None, :] + (seqlen_k - seqlen_q)
                        full = torch.ones(block_n, block_m, dtype=torch.bool)
                        if has_right:
                            full = full & (keys <= diag + wr)
                        if has_left:
                            full = full & (keys >= diag - wl)
                        real = (keys < seqlen_k) & row_ok[None, :]
                        with torch.no_grad():
                            pt = torch.exp2(kt @ qt.T * (scale * LOG2E) - lse_rows[None, :] * LOG2E)
                        if mask and lean and (check_left or check_right):
                            q_offs = torch.arange(block_m)[None, :]  # what the kernel loads from shared memory
                            keep = WINDOW_KEEP(q_offs, first_q - start_m, last_q - start_m, check_right, check_left)
                            assert torch.equal(keep[real], full[real])
                            pt = torch.where(keep, pt, 0.0)
                        elif mask and (has_left or has_right) and not lean:
                            pt = torch.where(full, pt, 0.0)
                        else:  # no window compare in this segment: every real row sees every real key
                            assert full[real].all()
                        dst = pt * (vt @ dot.T - delta_rows[None, :])
                        acc_dv = acc_dv + pt @ dot
                        acc_dk = acc_dk + dst @ qt
                n = min(block_n, seqlen_k - start_n)
                dk[b, start_n : start_n + n, hk] = (acc_dk * scale)[:n]
                dv[b, start_n : start_n + n, hk] = acc_dv[:n]
    return dk, dv


# the dK/dV kernel's own shapes on top of SHAPES: windows left only, right only and both with sq != sk both ways,
# a window narrower than a query block (the masked left edge crosses both bounds), GQA 4:1
DKDV_SHAPES = SHAPES + [
    (300, 257, 4, 1, (20, -1)),
    (257, 300, 4, 2, (-1, 20)),
    (300, 257, 2, 2, (3, 5)),
    (257, 300, 4, 1, (0, 0)),
    (77, 400, 2, 1, (150, -1)),
    (400, 77, 2, 1, (-1, 150)),
]


@pytest.mark.parametrize("lean_mask", [False, True])
@pytest.mark.parametrize("d", sorted(launch_hopper.HOPPER_BWD_TILES))
@pytest.mark.parametrize("sq, sk, h, hk, window", DKDV_SHAPES)
def test_dkdv_block_walk_matches_reference(sq, sk, h, hk, window, d, lean_mask):
    # the dispatched tile's blocks; lean_mask as CANDIDATE_BWD_TILES["lean-mask"] sets it
    tile = launch_hopper.CANDIDATE_BWD_TILES["lean-mask"][d] if lean_mask else launch_hopper.HOPPER_BWD_TILES[d]
    assert tile.lean_mask == lean_mask and tile.block_m == launch_hopper.HOPPER_BWD_TILES[d].block_m
    inputs, (_, dk_ref, dv_ref) = _reference_case(sq, sk, h, hk, window, d, sq * 131 + sk + 11)
    dk, dv = emulate_dkdv(*inputs, tile.block_m, tile.block_n, tile.lean_mask)
    assert not dk.isnan().any() and not dv.isnan().any()
    torch.testing.assert_close(dk, dk_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dv, dv_ref, rtol=1e-10, atol=1e-10)
