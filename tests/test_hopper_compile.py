"""The Gluon Hopper kernels (the forward, its candidate tiles, the dK/dV and the opt-in dQ backward kernels)
compile for sm_90 on any machine (no GPU needed), for every variant the dispatch can send a call to, with
wgmma in their PTX, spills within stated bounds and shared memory that fits.

Gluon kernels do not run in Triton's interpreter, so this is the CPU tier's only check of them; the GPU
tier (test_hopper_gpu.py) and scripts/gluon_check.py check the numbers.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

import pytest
import torch

from flashtron.options import AttnOptions

gluon = pytest.importorskip("triton.experimental.gluon", reason="needs triton with Gluon (3.6+)")

from flashtron import launch_hopper  # noqa: E402

SMEM_LIMIT = 227 * 1024


def _compile(d, dtype, window, warp_specialize=True, overlap=True, seqlen_q=300, seqlen_k=257, tile=None):
    q = torch.empty(2, seqlen_q, 4, d, dtype=dtype)
    k = torch.empty(2, seqlen_k, 2, d, dtype=dtype)  # GQA 2:1
    v = torch.empty_like(k)
    out = torch.empty_like(q)
    lse = torch.empty(2, 4, seqlen_q)
    opts = AttnOptions(softmax_scale=d**-0.5, window_left=window[0], window_right=window[1])
    if tile is None:  # the dispatched tile, or the lock-step one without warp specialization or overlap
        tile = launch_hopper.HOPPER_TILES[d]
        if not (warp_specialize and overlap):
            tile = dataclasses.replace(
                launch_hopper.CANDIDATE_TILES["ws-ov"][d], warp_specialize=warp_specialize, overlap=overlap
            )
    kernel, _, args, kwargs = launch_hopper.kernel_launch(q, k, v, out, lse, opts, tile)
    return launch_hopper.compile_sm90(kernel, args, kwargs)


def _spill_bytes(compiled) -> int | None:
    """Stack bytes by the cuobjdump that triton ships (None where it is missing)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    try:
        from aot_report import cubin_resources

        return cubin_resources(compiled.asm["cubin"])[1]
    except (FileNotFoundError, OSError):
        return None


# Every head dim and mask kind the dispatch sends (launch_hopper.covers), each dtype once.
VARIANTS = [
    (64, torch.bfloat16, (-1, -1)),
    (64, torch.float16, (-1, 0)),
    (128, torch.bfloat16, (-1, -1)),
    (128, torch.bfloat16, (-1, 0)),
    (128, torch.float16, (64, 32)),
    (256, torch.bfloat16, (-1, -1)),  # dispatched by default since the fifth session of 2026-12-02
    (256, torch.float16, (-1, 0)),
]


@pytest.mark.parametrize("d, dtype, window", VARIANTS)
def test_hopper_forward_compiles_for_sm90(d, dtype, window):
    compiled = _compile(d, dtype, window)
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    assert "cp.async.bulk.tensor" in ptx  # TMA loads
    assert "setmaxnreg" in ptx  # the loader partition hands registers to the consumers
    assert "wgmma.wait_group.sync.aligned 1;" in ptx  # the softmax / P V overlap
    assert compiled.metadata.shared <= SMEM_LIMIT
    assert _spill_bytes(compiled) in (0, None)
    _check_barriers(launch_hopper.HOPPER_TILES[d], d, dtype, window, ptx)


def _check_barriers(tile, d, dtype, window, ptx):
    """The named barriers (id, threads) that Triton puts before the mbarrier waits and arrives: ping-pong
    consumers each sync only themselves (no lock step across them), and their code (wgmma included) is
    emitted once per consumer partition; the lock-step tile syncs all its consumer warps together."""
    syncs = {(int(i), int(n)) for i, n in re.findall(r"bar\.sync\s+(\d+),\s*(\d+);", ptx)}
    if tile.consumers > 1:
        assert syncs and all(n == 128 for _, n in syncs) and len({i for i, _ in syncs}) >= tile.consumers
        base = launch_hopper.CANDIDATE_TILES["ws-ov"].get(d)
        if base and dataclasses.replace(tile, consumers=1, num_warps=base.num_warps) == base:  # same blocks: compare
            one = _compile(d, dtype, window, tile=base).asm["ptx"]
            assert ptx.count("wgmma.mma_async") == tile.consumers * one.count("wgmma.mma_async")
    else:
        assert (0, 32 * tile.num_warps) in syncs


@pytest.mark.parametrize("warp_specialize, overlap", [(False, False), (True, False), (False, True)])
def test_hopper_forward_other_variants_compile(warp_specialize, overlap):
    # the simpler variants scripts/gluon_check.py checks next to the dispatched one
    compiled = _compile(128, torch.bfloat16, (-1, 0), warp_specialize, overlap)
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    assert ("setmaxnreg" in ptx) == warp_specialize
    assert ("wgmma.wait_group.sync.aligned 1;" in ptx) == overlap  # S waited for while P V still runs
    assert _spill_bytes(compiled) in (0, None)


# The candidates scripts/gluon_check.py measures (launch_hopper.CANDIDATE_TILES), each once, with a mask
# kind that exercises its edge blocks.
CANDIDATES = [
    ("ws-ov", 128, torch.bfloat16, (64, 32)),
    ("pp-256x64", 64, torch.bfloat16, (-1, 0)),
    ("ov-128x64", 64, torch.float16, (-1, -1)),
]


@pytest.mark.parametrize("name, d, dtype, window", CANDIDATES)
def test_hopper_candidate_tiles_compile(name, d, dtype, window):
    tile = launch_hopper.CANDIDATE_TILES[name][d]
    compiled = _compile(d, dtype, window, tile=tile)
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "wgmma.wait_group.sync.aligned 1;" in ptx
    assert "setmaxnreg" in ptx
    assert compiled.metadata.shared <= SMEM_LIMIT
    assert _spill_bytes(compiled) in (0, None)
    _check_barriers(tile, d, dtype, window, ptx)


# The persistent-grid candidate ("persist": the dispatched ping-pong tiles with PERSISTENT), every head dim and
# mask kind, bf16; never run on a GPU. Beyond the candidates' checks: the loader issues Q by TMA too, the
# K/V ring and Q buffers sit within the shared memory (Q double-buffered), and no spill, as the one-tile
# variant (stack 0).
PERSIST_VARIANTS = [(d, window) for d in (64, 128) for window in ((-1, -1), (-1, 0), (64, 32))]


@pytest.mark.parametrize("d, window", PERSIST_VARIANTS)
def test_hopper_persistent_forward_compiles_for_sm90(d, window):
    tile = launch_hopper.CANDIDATE_TILES["persist"][d]
    assert tile.persistent and dataclasses.replace(tile, persistent=False) == launch_hopper.HOPPER_TILES[d]
    compiled = _compile(d, torch.bfloat16, window, tile=tile)
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "wgmma.wait_group.sync.aligned 1;" in ptx
    assert "cp.async.bulk.tensor" in ptx
    assert "setmaxnreg" in ptx
    q_box = (tile.block_m // tile.consumers) * d * 2
    kv = 2 * tile.stages * tile.block_n * d * 2
    assert 2 * tile.consumers * q_box + kv <= compiled.metadata.shared <= SMEM_LIMIT
    assert _spill_bytes(compiled) in (0, None)
    _check_barriers(tile, d, torch.bfloat16, window, ptx)


@pytest.mark.parametrize("d, window", PERSIST_VARIANTS)
def test_hopper_dynamic_persistent_forward_compiles_for_sm90(d, window):
    """The dynamic tile counter (CANDIDATE_TILES["persist-dyn"], never run on a GPU): one atomic per tile in the
    loader, the tile slots read volatile by the consumers, no spill, and the shared memory of the static
    persistent kernel."""
    tile = launch_hopper.CANDIDATE_TILES["persist-dyn"][d]
    assert tile.dynamic and dataclasses.replace(tile, dynamic=False) == launch_hopper.CANDIDATE_TILES["persist"][d]
    compiled = _compile(d, torch.bfloat16, window, tile=tile)
    ptx = compiled.asm["ptx"]
    assert ptx.count("atom.global") == 1 and "ld.volatile.global" in ptx
    assert compiled.metadata.shared <= SMEM_LIMIT
    assert _spill_bytes(compiled) in (0, None)
    static = _compile(d, torch.bfloat16, window, tile=launch_hopper.CANDIDATE_TILES["persist"][d])
    assert "atom.global" not in static.asm["ptx"]  # the static schedule has no counter


@pytest.mark.parametrize("d", [64, 128])
def test_hopper_persistent_snake_compiles_for_sm90(d):
    # the snake-order candidate (odd rounds of the grid reversed: hopper_common.snake_order), causal, where it
    # matters: no spill, the same shared memory as the persistent tile it reorders
    tile = launch_hopper.CANDIDATE_TILES["persist-snake"][d]
    assert tile.snake and dataclasses.replace(tile, snake=False) == launch_hopper.CANDIDATE_TILES["persist"][d]
    compiled = _compile(d, torch.bfloat16, (-1, 0), tile=tile)
    plain = _compile(d, torch.bfloat16, (-1, 0), tile=launch_hopper.CANDIDATE_TILES["persist"][d])
    assert compiled.metadata.shared == plain.metadata.shared
    assert _spill_bytes(compiled) in (0, None)
    _check_barriers(tile, d, torch.bfloat16, (-1, 0), compiled.asm["ptx"])


# Softcap and varlen in the forward (issue 15); launch_hopper.GLUON_GATED_FEATURES keeps them off the default
# dispatch where they timed slower than the Triton forward. Every head dim and mask kind with softcap on/off x varlen
# on/off, bf16 (the dense no-softcap ones are VARIANTS above), and fp16 twice; one varlen variant with seqused_k.
FEATURE_VARIANTS = [
    (d, torch.bfloat16, window, softcap, varlen, False)
    for d in (64, 128)
    for window in ((-1, -1), (-1, 0), (64, 32))
    for softcap, varlen in ((True, False), (False, True), (True, True))
] + [
    (128, torch.float16, (-1, 0), True, True, False),
    (64, torch.float16, (64, 32), True, False, False),
    (128, torch.bfloat16, (-1, 0), False, True, True),
    # d256 (softcap and varlen gated, GLUON_GATED_FEATURES): softcap, and varlen under a mask (without one its
    # varlen kernel spills 16-24 bytes)
    (256, torch.bfloat16, (-1, 0), True, False, False),
    (256, torch.float16, (-1, 0), False, True, True),
]


def _compile_features(d, dtype, window, softcap, varlen, seqused, tile=None):
    """As _compile, with softcap 30 and/or varlen: q (600, 4, d) and k, v (514, 2, d) packed, two sequences."""
    opts = AttnOptions(softmax_scale=d**-0.5, window_left=window[0], window_right=window[1], softcap=30.0 * softcap)
    if not varlen:
        q, k = torch.empty(2, 300, 4, d, dtype=dtype), torch.empty(2, 257, 2, d, dtype=dtype)
        lse, kw = torch.empty(2, 4, 300), {}
    else:
        q, k = torch.empty(600, 4, d, dtype=dtype), torch.empty(514, 2, d, dtype=dtype)
        lse = torch.empty(4, 600)
        kw = dict(
            cu_seqlens_q=torch.tensor([0, 300, 600], dtype=torch.int32),
            cu_seqlens_k=torch.tensor([0, 257, 514], dtype=torch.int32),
            max_seqlen_q=300,
            seqused_k=torch.tensor([100, 257], dtype=torch.int32) if seqused else None,
        )
    tile = tile or launch_hopper.dispatched_tile(d, 300, opts, varlen=varlen)
    kernel, grid, args, kwargs = launch_hopper.kernel_launch(q, k, torch.empty_like(k), torch.empty_like(q), lse, opts,
                                                             tile, **kw)  # fmt: skip
    # varlen: cdiv(max_seqlen_q, BLOCK_M) query blocks, as the dense grid
    assert grid == (3, 4, 2) or (tile is not None and tile.persistent)
    return launch_hopper.compile_sm90(kernel, args, kwargs)


@pytest.mark.parametrize("d, dtype, window, softcap, varlen, seqused", FEATURE_VARIANTS)
def test_hopper_forward_softcap_varlen_compile(d, dtype, window, softcap, varlen, seqused):
    compiled = _compile_features(d, dtype, window, softcap, varlen, seqused)
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "wgmma.wait_group.sync.aligned 1;" in ptx
    assert ("cp.async.bulk.tensor.3d" if varlen else "cp.async.bulk.tensor.4d") in ptx  # 3-D boxes for varlen
    assert "setmaxnreg" in ptx
    # softcap: tanh by exp (hopper_fwd_tile.tanh, kernels/common.tanh's formula), not tanh.approx
    assert "tanh.approx" not in ptx
    assert ("ld.global" in ptx) == varlen  # cu_seqlens (and seqused_k) are the only global loads
    # varlen: V rows past the sequence zeroed in the slot by consumer 0 alone, before the last P V (zero_v_tail)
    assert ptx.count("fence.proxy.async") == (1 if varlen else 0)
    assert compiled.metadata.shared <= SMEM_LIMIT
    assert _spill_bytes(compiled) in (0, None)
    # ping-pong consumers each sync only themselves (_check_barriers' first half; its wgmma count compares with
    # a dense compile, and varlen's code has a different number of wgmma copies: 84 against 72 at d64)
    syncs = {(int(i), int(n)) for i, n in re.findall(r"bar\.sync\s+(\d+),\s*(\d+);", ptx)}
    assert syncs and all(n == 128 for _, n in syncs) and len({i for i, _ in syncs}) >= 2


@pytest.mark.parametrize("warp_specialize, overlap", [(True, True), (True, False), (False, False)])
def test_hopper_forward_varlen_lock_step_variants_compile(warp_specialize, overlap):
    # varlen (with seqused_k) on the 8-warp tile and its simpler forms, which no dispatch sends it to: without the
    # overlap a block's P V follows its softmax, so the V tail is zeroed in the peeled block and the masked
    # segments (zero_v_tail's other call sites), by all the consumer warps
    tile = dataclasses.replace(launch_hopper.CANDIDATE_TILES["ws-ov"][128], warp_specialize=warp_specialize,
                               overlap=overlap)  # fmt: skip
    compiled = _compile_features(128, torch.bfloat16, (-1, 0), False, True, True, tile=tile)
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "fence.proxy.async" in ptx
    assert compiled.metadata.shared <= SMEM_LIMIT
    assert _spill_bytes(compiled) in (0, None)


@pytest.mark.parametrize("d", [64, 128])
def test_persistent_forward_softcap_compiles_and_refuses_varlen(d):
    tile = launch_hopper.CANDIDATE_TILES["persist"][d]
    compiled = _compile_features(d, torch.bfloat16, (-1, 0), True, False, False, tile=tile)
    assert "wgmma.mma_async" in compiled.asm["ptx"]
    # the candidate (never dispatched) with causal softcap: d128 spilled 8 bytes (triton 3.6.0; docs/perf-notes.md,
    # 2026-12-02, softcap and varlen entry), 24 since P is packed two elements at a time (hopper_fwd_tile.pack_16bit;
    # every dispatched forward kernel stays at 0), d64 none; the bound catches a regression
    spill = _spill_bytes(compiled)
    assert spill is None or spill <= 24, f"stack {spill} bytes, bound 24"
    with pytest.raises(ValueError, match="varlen"):
        _compile_features(d, torch.bfloat16, (-1, 0), False, True, False, tile=tile)


def test_slower_features_are_gated(monkeypatch):
    """softcap at either head dim, and varlen at head dim 64, reach the Gluon forward only with
    FLASHTRON_BACKEND=gluon (covers' backend argument); varlen at head dim 128 (timed faster) by default too.
    The Gluon backward kernels never take either, whatever the backend."""
    q, q64 = torch.empty(1, 8, 2, 128, dtype=torch.bfloat16), torch.empty(1, 8, 2, 64, dtype=torch.bfloat16)
    plain, capped = AttnOptions(softmax_scale=0.125), AttnOptions(softmax_scale=0.125, softcap=30.0)
    assert launch_hopper.forward_features(plain, varlen=False) == frozenset()
    assert launch_hopper.forward_features(capped, varlen=True) == {"softcap", "varlen"}
    assert launch_hopper.gated_features(capped, 128, varlen=True) == {"softcap"}
    assert launch_hopper.gated_features(plain, 64, varlen=True) == {"varlen"}
    # CPU tensors stand in for sm_90 CUDA ones: the device and TMA checks pass
    monkeypatch.setattr(launch_hopper, "_kernel_takes", lambda *a, **kw: True)
    for backend in ("auto", "triton", "gluon"):
        assert launch_hopper.covers(q, q, q, plain, varlen=False, backend=backend)
        gated = backend != "gluon"
        assert launch_hopper.covers(q, q, q, capped, varlen=False, backend=backend) != gated
        assert launch_hopper.covers(q64, q64, q64, capped, varlen=False, backend=backend) != gated
        assert launch_hopper.covers(q, q, q, capped, varlen=True, backend=backend) != gated
        assert launch_hopper.covers(q64, q64, q64, plain, varlen=True, backend=backend) != gated
        assert launch_hopper.covers(q, q, q, plain, varlen=True, backend=backend)
        # seqused_k as varlen: the kernel zeroes the V rows past it (hopper_fwd_tile.zero_v_tail)
        assert launch_hopper.covers(q, q, q, plain, varlen=True, seqused_k=q, backend=backend)
        assert launch_hopper.covers(q64, q64, q64, plain, varlen=True, seqused_k=q, backend=backend) != gated
    assert not launch_hopper.covers(q, q, q, plain, varlen=False, seqused_k=q, backend="gluon")  # varlen only
    assert launch_hopper.covers_backward(q, q, q, q, plain, varlen=False)
    assert not launch_hopper.covers_backward(q, q, q, q, capped, varlen=False)
    assert not launch_hopper.covers_backward(q, q, q, q, plain, varlen=True)
    assert not launch_hopper.covers_backward(q, q, q, q, plain, varlen=True, seqused_k=q)


@pytest.mark.parametrize("shape, block_rows", [((2, 300, 4, 128), 64), ((1, 17, 2, 64), 128), ((257, 4, 256), 64)])
def test_descriptor_matches_a_validated_one(shape, block_rows):
    """launch_hopper._descriptor skips TensorDescriptor's per-call validation; what it builds must equal the
    validated descriptor field by field, and what that validation would refuse must still raise."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    t = torch.empty(shape, dtype=torch.bfloat16)
    fast = launch_hopper._descriptor(t, block_rows)
    block = [1, block_rows, 1, shape[-1]][4 - len(shape) :]
    layout = launch_hopper._box(block_rows, shape[-1], t.dtype, len(shape))[1]
    checked = TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)
    assert type(fast) is TensorDescriptor and fast.base is checked.base
    for field in ("shape", "strides", "block_shape", "layout", "padding"):
        assert getattr(fast, field) == getattr(checked, field), field
    with pytest.raises(ValueError, match="aligned base and strides"):
        launch_hopper._descriptor(torch.empty(2, 300, 4, 129, dtype=torch.bfloat16)[..., :128], block_rows)
    with pytest.raises(ValueError, match="no empty dim"):
        launch_hopper._descriptor(torch.empty(2, 0, 4, 128, dtype=torch.bfloat16), block_rows)


def test_covers_only_cuda_dense_supported_calls():
    q = torch.empty(1, 8, 2, 64, dtype=torch.bfloat16)
    opts = AttnOptions(softmax_scale=0.125)
    assert not launch_hopper.covers(q, q, q, opts, varlen=False)  # CPU tensors never
    assert launch_hopper.chosen("gluon", 64) and not launch_hopper.chosen("triton", 128)
    # by default, only the head dims where it measured faster than the Triton forward
    assert launch_hopper.chosen("auto", 128) and launch_hopper.chosen("auto", 64) and launch_hopper.chosen("auto", 256)
    assert not launch_hopper.chosen("auto", 96) and not launch_hopper.chosen("auto", 192)


def test_scales_that_vanish_in_fp32_stay_on_triton(monkeypatch):
    """The Gluon forward multiplies the scale in after masking (hopper_fwd_tile.softmax_step); a softmax_scale whose
    log2 scale is 0 or subnormal in fp32 would turn a masked -inf into NaN there, so such calls take the Triton
    forward (which scales first). Softcap calls scale before masking and keep the Gluon forward."""
    monkeypatch.setattr(launch_hopper, "_on_sm90", lambda device: True)  # CPU tensors stand in for sm_90 ones
    q = torch.empty(1, 8, 2, 64, dtype=torch.bfloat16)
    assert launch_hopper.covers(q, q, q, AttnOptions(softmax_scale=0.125), varlen=False)
    assert launch_hopper.covers(q, q, q, AttnOptions(softmax_scale=1e-37), varlen=False)
    for tiny in (1e-39, 1e-45, 5e-324):
        assert not launch_hopper.covers(q, q, q, AttnOptions(softmax_scale=tiny), varlen=False), tiny
    assert launch_hopper.covers(q, q, q, AttnOptions(softmax_scale=1e-45, softcap=5.0), varlen=False, backend="gluon")


def test_lean_mask_has_no_fused_dq():
    """LEAN_MASK drops the bounds a segment cannot cross, FUSED_DQ's keys < seqlen_k test with them: the launcher
    refuses the pair instead of compiling a kernel that would add NaN into dQ."""
    q = torch.empty(1, 300, 2, 128, dtype=torch.bfloat16)
    lse = torch.empty(1, 2, 300)
    opts = AttnOptions(softmax_scale=0.1, window_left=-1, window_right=0)
    tile = launch_hopper.CANDIDATE_BWD_TILES["lean-mask"][128]
    launch_hopper.backward_dkdv_launch(q, q, q, q, lse, lse, q, q, opts, tile)  # without dQ: fine
    with pytest.raises(ValueError, match="FUSED_DQ"):
        launch_hopper.backward_dkdv_launch(q, q, q, q, lse, lse, q, q, opts, tile, torch.zeros(q.shape))


# The Gluon dK/dV kernel (kernels/hopper_bwd.py), every head dim and mask kind that covers_backward takes,
# each dtype once, with a bound on the stack bytes: the unmasked kernels have none; with a causal or window
# mask the edge segments push the consumers past setmaxnreg's 240 registers and ptxas spills a few scalars
# of the loop state (24-80 bytes at this commit, triton 3.6.0; docs/perf-notes.md, 2026-12-02 backward
# entry). The bound catches a regression; the goal is 0 everywhere.
BWD_VARIANTS = [
    (64, torch.bfloat16, (-1, -1), 0),
    (64, torch.float16, (-1, 0), 96),
    (128, torch.bfloat16, (-1, -1), 0),
    (128, torch.bfloat16, (-1, 0), 96),
    (128, torch.float16, (64, 32), 96),
]


def _compile_bwd(d, dtype, window, seqlen_q=300, seqlen_k=257, tile=None):
    q = torch.empty(2, seqlen_q, 4, d, dtype=dtype)
    k = torch.empty(2, seqlen_k, 2, d, dtype=dtype)  # GQA 2:1
    lse = torch.empty(2, 4, seqlen_q)
    opts = AttnOptions(softmax_scale=d**-0.5, window_left=window[0], window_right=window[1])
    kernel, _, args, kwargs = launch_hopper.backward_dkdv_launch(
        q, k, torch.empty_like(k), torch.empty_like(q), lse, torch.empty_like(lse), torch.empty_like(k),
        torch.empty_like(k), opts, tile,
    )  # fmt: skip
    return launch_hopper.compile_sm90(kernel, args, kwargs)


@pytest.mark.parametrize("d, dtype, window, stack_bound", BWD_VARIANTS)
def test_hopper_backward_dkdv_compiles_for_sm90(d, dtype, window, stack_bound):
    _check_dkdv_compile(_compile_bwd(d, dtype, window), stack_bound)


def _check_dkdv_compile(compiled, stack_bound):
    """What every deterministic dK/dV kernel's sm_90 compile shows, and its stack within stack_bound."""
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    assert "cp.async.bulk.tensor" in ptx  # TMA loads of K, V, Q and dO
    assert "setmaxnreg" in ptx  # the 1-warp loader partition
    assert "wgmma.wait_group.sync.aligned 1;" in ptx  # P's math while dP^T runs, dS's while dV runs
    assert not re.search(r"^\s*(@!?%p\d+\s+)?(atom|red)\.", ptx, flags=re.M)  # deterministic: no atomics
    assert "cp.reduce.async.bulk" not in ptx  # nor the fused variant's TMA reduce-add
    assert compiled.metadata.shared <= SMEM_LIMIT
    spill = _spill_bytes(compiled)
    assert spill is None or spill <= stack_bound, f"stack {spill} bytes, bound {stack_bound}"


# The LEAN_MASK candidate (launch_hopper.CANDIDATE_BWD_TILES["lean-mask"], not dispatched): the masked kernels' stack
# bytes as measured at this commit (triton 3.6.0; the default kernel's in the comment), each a bound; docs/perf-
# notes.md, 2026-12-02 lean-mask entry. Without a mask it is the default kernel.
BWD_LEAN_VARIANTS = [
    (64, torch.bfloat16, (-1, -1), 0),
    (64, torch.float16, (-1, 0), 8),  # default 48
    (64, torch.bfloat16, (64, 32), 16),  # 80
    (64, torch.bfloat16, (20, -1), 8),  # 32
    (128, torch.bfloat16, (-1, -1), 0),
    (128, torch.bfloat16, (-1, 0), 16),  # 64
    (128, torch.float16, (64, 32), 24),  # 24
    (128, torch.bfloat16, (-1, 20), 16),  # 64
]


@pytest.mark.parametrize("d, dtype, window, stack_bound", BWD_LEAN_VARIANTS)
def test_hopper_backward_dkdv_lean_mask_compiles_for_sm90(d, dtype, window, stack_bound):
    tile = launch_hopper.CANDIDATE_BWD_TILES["lean-mask"][d]
    assert tile.lean_mask and dataclasses.replace(tile, lean_mask=False) == launch_hopper.HOPPER_BWD_TILES[d]
    compiled = _compile_bwd(d, dtype, window, tile=tile)
    _check_dkdv_compile(compiled, stack_bound)
    ptx = compiled.asm["ptx"]
    if window == (-1, -1):  # LEAN_MASK changes nothing without a mask
        assert ptx == _compile_bwd(d, dtype, window).asm["ptx"]
    else:
        assert not re.search(r"\b(div|rem)\.", ptx)  # (head, query block) by counters, not by group_size
        # the query offsets' buffer: written by plain 32-bit stores (an stmatrix .b16 of the int32 tensor is
        # what a swizzled layout got), then read by every masked step
        assert "stmatrix" not in ptx and re.search(r"st\.shared\.b32\s", ptx)
        assert compiled.metadata.shared >= _compile_bwd(d, dtype, window).metadata.shared + tile.block_m * 4


# The FUSED_DQ variant of the dK/dV kernel (deterministic=False, opt-in with FLASHTRON_GLUON_FUSED_DQ=1): every
# head dim and mask kind, bf16, and fp16 once, with launch_hopper.HOPPER_BWD_FUSED_TILES. Stack bytes at this
# commit (triton 3.6.0): d64 0 for every mask; d128 384 (none), 432 (causal), 440 (window): the dQ partial's
# 32 registers and its shared-memory operands' descriptors on top of a kernel at setmaxnreg's 240 already;
# docs/perf-notes.md, 2026-12-02, fused dQ entry. The bounds catch a regression.
FUSED_VARIANTS = [
    (64, torch.bfloat16, (-1, -1), 0),
    (64, torch.bfloat16, (-1, 0), 0),
    (64, torch.float16, (64, 32), 0),
    (128, torch.bfloat16, (-1, -1), 448),
    (128, torch.bfloat16, (-1, 0), 448),
    (128, torch.bfloat16, (64, 32), 448),
    (128, torch.float16, (-1, 0), 448),
]


@pytest.mark.parametrize("d, dtype, window, stack_bound", FUSED_VARIANTS)
def test_hopper_backward_fused_dq_compiles_for_sm90(d, dtype, window, stack_bound):
    q = torch.empty(2, 300, 4, d, dtype=dtype)
    k = torch.empty(2, 257, 2, d, dtype=dtype)  # GQA 2:1
    lse = torch.empty(2, 4, 300)
    opts = AttnOptions(softmax_scale=d**-0.5, window_left=window[0], window_right=window[1])
    kernel, _, args, kwargs = launch_hopper.backward_dkdv_launch(
        q, k, torch.empty_like(k), torch.empty_like(q), lse, torch.empty_like(lse), torch.empty_like(k),
        torch.empty_like(k), opts, dq_accum=torch.empty(q.shape),
    )  # fmt: skip
    assert kwargs["FUSED_DQ"] and kwargs["BLOCK_M"] == launch_hopper.HOPPER_BWD_FUSED_TILES[d].block_m
    compiled = launch_hopper.compile_sm90(kernel, args, kwargs)
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    assert "cp.async.bulk.tensor" in ptx  # TMA loads
    assert "setmaxnreg" in ptx
    assert "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add" in ptx.replace(".bulk_group", "")
    assert re.search(r"cp\.async\.bulk\.wait_group\.read\s+0;", ptx)  # dq_smem reused once the reduce read it
    assert not re.search(r"^\s*(@!?%p\d+\s+)?(atom|red)\.", ptx, flags=re.M)  # the TMA unit adds, not atomics
    tile = launch_hopper.HOPPER_BWD_FUSED_TILES[d]
    resident = 2 * tile.block_n * d * 2 + 2 * tile.stages * tile.block_m * d * 2
    staging = tile.block_n * tile.block_m * 2 + tile.block_m * d * 4  # dS^T and the fp32 dQ partial
    assert resident + staging <= compiled.metadata.shared <= SMEM_LIMIT
    spill = _spill_bytes(compiled)
    assert spill is None or spill <= stack_bound, f"stack {spill} bytes, bound {stack_bound}"


def test_gluon_fused_dq_is_opt_in(monkeypatch):
    from flashtron import env

    monkeypatch.delenv("FLASHTRON_GLUON_FUSED_DQ", raising=False)
    assert not env.gluon_fused_dq()
    monkeypatch.setenv("FLASHTRON_GLUON_FUSED_DQ", "1")
    assert env.gluon_fused_dq()
    assert set(launch_hopper.HOPPER_BWD_FUSED_TILES) == set(launch_hopper.HOPPER_BWD_TILES)


def test_backward_dispatch_follows_the_backend_setting():
    # "auto" sends d128 dK/dV to Gluon (measured faster on an H200), d64 stays on Triton; "triton" never
    assert launch_hopper.chosen_backward("gluon", 128) and launch_hopper.chosen_backward("gluon", 64)
    assert launch_hopper.chosen_backward("auto", 128) and not launch_hopper.chosen_backward("auto", 64)
    assert not any(launch_hopper.chosen_backward("triton", d) for d in (64, 128))
    q = torch.empty(1, 8, 2, 64, dtype=torch.bfloat16)
    assert not launch_hopper.covers_backward(q, q, q, q, AttnOptions(softmax_scale=0.125), varlen=False)


# The Gluon dQ kernel (kernels/hopper_bwd.attention_bwd_dq_hopper_kernel, opt-in with FLASHTRON_GLUON_DQ=1):
# every head dim and mask kind covers_backward takes, both dtypes, with a bound on the stack bytes. Every
# variant compiled with stack 0 at this commit (triton 3.6.0; docs/perf-notes.md, 2026-12-02, dQ entry), so
# the bound is 0: a spill is a regression.
DQ_VARIANTS = [
    (d, dtype, window)
    for d in (64, 128)
    for dtype in (torch.bfloat16, torch.float16)
    for window in ((-1, -1), (-1, 0), (64, 32))
]


def _compile_dq(d, dtype, window, seqlen_q=300, seqlen_k=257):
    q = torch.empty(2, seqlen_q, 4, d, dtype=dtype)
    k = torch.empty(2, seqlen_k, 2, d, dtype=dtype)  # GQA 2:1
    lse = torch.empty(2, 4, seqlen_q)
    opts = AttnOptions(softmax_scale=d**-0.5, window_left=window[0], window_right=window[1])
    kernel, _, args, kwargs = launch_hopper.backward_dq_launch(
        q, k, torch.empty_like(k), torch.empty_like(q), lse, torch.empty_like(lse), torch.empty_like(q), opts
    )
    return launch_hopper.compile_sm90(kernel, args, kwargs)


@pytest.mark.parametrize("d, dtype, window", DQ_VARIANTS)
def test_hopper_backward_dq_compiles_for_sm90(d, dtype, window):
    compiled = _compile_dq(d, dtype, window)
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    assert "cp.async.bulk.tensor" in ptx  # TMA loads of Q, dO, K and V
    assert "setmaxnreg" in ptx  # the 1-warp loader partition
    # dQ(t - 1) waited for while S(t) and dP(t) run; P's math while dP(t) runs
    assert "wgmma.wait_group.sync.aligned 2;" in ptx and "wgmma.wait_group.sync.aligned 1;" in ptx
    assert not re.search(r"^\s*(@!?%p\d+\s+)?(atom|red)\.", ptx, flags=re.M)  # deterministic: no atomics
    assert compiled.metadata.shared <= SMEM_LIMIT
    assert _spill_bytes(compiled) in (0, None)
    try:
        from aot_report import wgmma_serialized  # _spill_bytes put scripts/ on the path

        serialized = wgmma_serialized(ptx)
    except (ImportError, FileNotFoundError, OSError):
        serialized = False  # no ptxas here
    assert not serialized, "ptxas serializes the wgmmas (C7512: too few registers)"


def test_gluon_dq_is_opt_in(monkeypatch):
    from flashtron import env

    monkeypatch.delenv("FLASHTRON_GLUON_DQ", raising=False)
    assert not env.gluon_dq()
    monkeypatch.setenv("FLASHTRON_GLUON_DQ", "1")
    assert env.gluon_dq()
    assert set(launch_hopper.HOPPER_DQ_TILES) == set(launch_hopper.HOPPER_BWD_TILES)  # what covers_backward takes
