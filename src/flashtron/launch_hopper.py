"""Launchers for the Gluon Hopper kernels (kernels/hopper_fwd.py, kernels/hopper_bwd.py): which calls they
cover, their tiles, their TMA descriptors, and an sm_90 compile that needs no GPU (tests, scripts).

launch.attention_forward sends a call here when `covers` says the kernel handles it and the backend
choice (env.backend) allows it; everything else stays on the Triton kernel. Outputs are the Triton
forward's: out like q, lse (batch, nheads, seqlen_q) fp32 in natural log, so the Triton backward
consumes them unchanged. launch.attention_backward likewise sends the dK/dV part of a covered backward
to the Gluon dK/dV kernel (`chosen_backward`: head dim 128 by default, where an H200 measured it faster);
delta's preprocess and dQ stay on the Triton kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from flashtron import configs
from flashtron.options import AttnOptions

LOG2E = math.log2(math.e)
FP32_MIN_NORMAL = 2.0**-126

# Head dims whose covered calls take the Gluon forward by default (FLASHTRON_BACKEND unset or "auto"), where
# it measured correct and faster than the Triton forward at every size. H200, 2026-12-02, scripts/gluon_check.py
# --variants persist,pp (every case passed: fp16/bf16, none/causal/window, seqlens 1-4096, GQA 4), TFLOP/s at
# PERF.md's grid, peers in the same run: with `dispatched_tile`'s choice, d128 1.19-1.40x Triton (16k: 648 /
# 474 full, 593 / 455 causal; cuDNN 630 / 632), d64 1.04-1.09x (16k: 439 / 404 full, 421 / 391 causal).
# d256 joined on 2026-12-02 (fifth session, H200, gluon_check.py --variants persist-dyn,persist,pp,d256, then
# three rounds of its timing child, same runs): 52/52 d256 cases passed; 1.42-2.04x Triton in every cell, e.g.
# 16k full 688-753 against Triton 367-394 (cuDNN 706-746), causal 16k 699-739 against 344-385 (cuDNN 632-651).
GLUON_DEFAULT_HEAD_DIMS = frozenset({64, 128, 256})


def chosen(backend: str, head_dim: int) -> bool:
    """Whether the backend setting (env.backend()) sends covered calls of this head dim to the Gluon kernel."""
    return backend == "gluon" or (backend == "auto" and head_dim in GLUON_DEFAULT_HEAD_DIMS)


@dataclass(frozen=True)
class HopperTile:
    block_m: int
    block_n: int
    stages: int
    num_warps: int = 8  # two consumer warpgroups of 64 rows each
    warp_specialize: bool = True
    overlap: bool = True  # softmax of block j+1 while P V of block j runs (hopper_fwd_tile.attend)
    # 2: ping-pong, two one-warpgroup consumer partitions of block_m / 2 rows each, taking
    # turns on the tensor cores (needs warp_specialize and overlap, and num_warps 4)
    consumers: int = 1
    # a persistent grid of min(work tiles, SMs) programs looping over (query block, head, batch) tiles, the
    # heaviest first under a causal mask (hopper_common.tile_coords); needs warp_specialize, consumers <= 2
    persistent: bool = False
    # persistent only: every other round of the grid in reverse (hopper_common.snake_order), to balance the
    # heaviest-first order's work over the programs
    snake: bool = False
    # persistent only: after its first tile, a program takes the next free tile of a per-launch counter (an
    # atomic) instead of a fixed stride, so light and heavy causal tiles even out as the hardware's block
    # scheduler evens them out on the one-tile grid
    dynamic: bool = False


# The dispatched tiles: ping-pong, two one-warpgroup consumers of 64 rows taking turns on the tensor cores
# (consumers=2), a 1-warp TMA loader. Shared memory: Q BLOCK_M x d plus STAGES x (K + V) of BLOCK_N x d,
# 16-bit: d64 16K + 3 x 32K = 112K; d128 32K + 2 x 64K = 160K (227K fit). Against the first tile (8 warps in
# lock step, "ws-ov" below) in the same run: 1.09-1.32x at d128, 1.01-1.16x at d64 (docs/perf-notes.md).
# d256 (dispatched since the fifth session of 2026-12-02; see GLUON_DEFAULT_HEAD_DIMS): 64-key blocks, Q 64K + 2 x
# (K + V) 32K = 192K (197K with the barriers, triton 3.6.0), no spill dense (stack 0, any mask, softcap too);
# varlen without a mask spills 16-24 bytes. The persistent grid's second Q buffer would not fit (262K).
HOPPER_TILES = {
    64: HopperTile(128, 128, 3, num_warps=4, consumers=2),
    128: HopperTile(128, 128, 2, num_warps=4, consumers=2),
    256: HopperTile(128, 64, 2, num_warps=4, consumers=2),
}

# Measured next to HOPPER_TILES by scripts/gluon_check.py, not dispatched (compile report in
# docs/perf-notes.md; none spills). "ws-ov": the first Gluon tile, 8 consumer warps in lock step, kept as
# the same-run baseline. The d64 ones answer Triton's (128, 64, 4 warps, 3 stages) tile: ping-pong of two
# 128-row consumers over 64-key blocks (Q 2 x 16K + 4 x 16K K/V = 96K), and the 8-warp kernel over 64-key
# blocks with 4 stages (80K); both lost to the dispatched d64 tile from 4k up. Three 64-row consumers
# (192 x 128, FA3's d64 tile) spill 16 bytes at 160 registers each, so it is not among them.
CANDIDATE_TILES = {
    "ws-ov": {64: HopperTile(128, 128, 3), 128: HopperTile(128, 128, 2)},
    "pp-256x64": {64: HopperTile(256, 64, 4, num_warps=4, consumers=2)},
    "ov-128x64": {64: HopperTile(128, 64, 4)},
    # the ping-pong tiles on the persistent grid, Q double-buffered (one Q box more per consumer: d64 128K,
    # d128 192K of shared memory); dispatched by `dispatched_tile` for dense calls
    "persist": {
        64: HopperTile(128, 128, 3, num_warps=4, consumers=2, persistent=True),
        128: HopperTile(128, 128, 2, num_warps=4, consumers=2, persistent=True),
    },
    # the persistent tiles with odd rounds reversed (snake_order): compiled for sm_90 only, never run;
    # scripts/persistent_balance.py's model puts the busiest program at 1.00-1.06x the mean with one L2 section
    "persist-snake": {
        64: HopperTile(128, 128, 3, num_warps=4, consumers=2, persistent=True, snake=True),
        128: HopperTile(128, 128, 2, num_warps=4, consumers=2, persistent=True, snake=True),
    },
    # the persistent tiles with the dynamic tile counter (HopperTile.dynamic); dispatched where it measured
    # ahead (`dispatched_tile`). The static heaviest-first order left d128 causal 16k at 533-563 TFLOP/s against
    # the one-tile grid's 612 (H200, 2026-12-02), the busiest program at 1.17-1.21x the mean
    # (scripts/persistent_balance.py)
    "persist-dyn": {
        64: HopperTile(128, 128, 3, num_warps=4, consumers=2, persistent=True, dynamic=True),
        128: HopperTile(128, 128, 2, num_warps=4, consumers=2, persistent=True, dynamic=True),
    },
}

# The grid per head dim, from four same-session rounds of gluon_check.py's timing (H200, 2026-12-02, fifth session;
# TFLOP/s ranges over the rounds, static persistent / dynamic persistent / one-tile):
# - d128: the dynamic counter is level with the static schedule without a mask (16k 590-603 / 584-645 /
#   608-629) and ahead under causal (4k 457-469 / 513-531 / 476-483) and windows ((1024, 0) at 16k 421-431 /
#   435-437 / 387-404). Past 4k the one-tile grid still leads causal (16k 525-545 / 579-625 / 589-646), so calls
#   bounded on one side take it past PERSISTENT_CAUSAL_MAX_SEQLEN.
# - d64: the static schedule leads at 1k (full 366-378 / 354-362, causal 264-265 / 246-250) and on windows
#   (297-299 / 287-292); the dynamic one leads causal from 4k (4k 363-374 / 377-380, 16k 408-428 / 432-445;
#   one-tile 333-340, 399-412), hence DYNAMIC_UNEVEN_MIN_SEQLEN.
# An earlier run (static only) had causal d128 at 1k 340 / 314, 4k 490 / 472, 16k 533 / 612 persistent / one-tile.
PERSISTENT_CAUSAL_MAX_SEQLEN = {64: 1 << 30, 128: 4096}
DYNAMIC_HEAD_DIMS = frozenset({128})  # every persistent call; at d64 only uneven ones past DYNAMIC_UNEVEN_MIN_SEQLEN
DYNAMIC_UNEVEN_MIN_SEQLEN = 2048


def dispatched_tile(
    d: int, seqlen_q: int, opts: AttnOptions, *, varlen: bool, seqlen_k: int | None = None
) -> HopperTile:
    """The forward tile a covered call takes: the persistent grid for dense calls, with the static or the
    dynamic schedule as measured (see PERSISTENT_CAUSAL_MAX_SEQLEN for both rules), the one-tile ping-pong grid
    for varlen (the persistent schedule needs every sequence's length on the host) and softcap (the persistent
    d128 softcap kernel spills 8 bytes; the softcap checks on the GPU ran on the one-tile grid) and head dim 256
    (the persistent grid's second Q buffer would not fit)."""
    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    # a side bounded within the sequences (a bound past every key or query is none): with one side bounded, as
    # causal (-1, 0) or (w, -1), the work per query block grows or shrinks along the rows; with both, a band,
    # it is equal
    left = 0 <= opts.window_left < seqlen_k - 1
    right = 0 <= opts.window_right < seqlen_q - 1
    uneven = left != right
    if varlen or opts.softcap > 0 or d not in CANDIDATE_TILES["persist"]:
        return HOPPER_TILES[d]
    if uneven and seqlen_q > PERSISTENT_CAUSAL_MAX_SEQLEN[d]:
        return HOPPER_TILES[d]
    dynamic = d in DYNAMIC_HEAD_DIMS or (uneven and seqlen_q > DYNAMIC_UNEVEN_MIN_SEQLEN)
    return CANDIDATE_TILES["persist-dyn" if dynamic else "persist"][d]


# The persistent grid's program count where kernel_launch gets no GPU to ask (CPU tensors, for compile_sm90):
# an H100 SXM's or H200's 132 SMs. The grid is not part of the compiled kernel, so this changes no code.
SM90_SMS = 132
# The K and V bytes one L2 section of the persistent grid's schedule may read (hopper_common.tile_coords): about
# half of an H100 SXM's / H200's 50 MB L2, the rest left to Q, O and the other section in flight. A guess,
# not measured; a runtime argument, so trying other sizes compiles nothing new.
L2_SECTION_BYTES = 24 << 20


# Head dims whose covered backwards take the Gluon dK/dV kernel by default. scripts/gluon_check.py --backward
# (H200, 2026-12-02): whole backward 1.01-1.14x the all-Triton one at d128 (1k-16k, full and causal); at d64
# 0.96-1.07x, with the loss at causal 1k, so d64 stays on Triton.
GLUON_DEFAULT_BACKWARD_HEAD_DIMS = frozenset({128})


def chosen_backward(backend: str, head_dim: int) -> bool:
    """Whether the backend setting sends the dK/dV part of covered backwards of this head dim to Gluon."""
    return backend == "gluon" or (backend == "auto" and head_dim in GLUON_DEFAULT_BACKWARD_HEAD_DIMS)


@dataclass(frozen=True)
class HopperBwdTile:
    block_m: int  # query rows per step of the loop
    block_n: int  # keys per program (resident K and V)
    stages: int  # (Q, dO) ring slots
    num_warps: int = 8  # two consumer warpgroups of block_n / 2 keys each
    # the dK/dV kernel's LEAN_MASK: a window mask with fewer registers live through the steps (its docstring)
    lean_mask: bool = False


# FA3's dK/dV shapes (hopper/ of flash-attention, its d64 and d128 backward tiles): 128 keys per program in
# two warpgroups; 128 query rows per step at d64, 64 at d128 (dK and dV take 128 fp32 registers a thread at
# d128). Shared memory, 16-bit: K + V 2 x BLOCK_N x d, plus STAGES x (Q + dO) of BLOCK_M x d: d64 32K + 2 x
# 32K = 96K; d128 64K + 2 x 32K = 128K. Measured on an H200 on 2026-12-02 (docs/perf-notes.md,
# second session): the whole backward at 1.01-1.14x the all-Triton one at d128, 0.96-1.07x at d64.
HOPPER_BWD_TILES = {
    64: HopperBwdTile(128, 128, 2),
    128: HopperBwdTile(64, 128, 2),
}

# dK/dV tiles checked and timed next to HOPPER_BWD_TILES by scripts/gluon_check.py --backward --bwd-candidates,
# not dispatched. "lean-mask": the dispatched tiles with LEAN_MASK, against the masked kernels' spills (stack
# bytes at d64 / d128, triton 3.6.0, the compile test's shapes: causal 48 / 64 -> 8 / 16, window 80 / 24 -> 16 /
# 24, unmasked 0, the default kernel; docs/perf-notes.md, 2026-12-02 lean-mask entry). Never run on a GPU yet.
CANDIDATE_BWD_TILES = {
    "lean-mask": {d: dataclasses.replace(tile, lean_mask=True) for d, tile in HOPPER_BWD_TILES.items()},
}


# The FUSED_DQ candidate (opt-in, deterministic=False only; FLASHTRON_GLUON_FUSED_DQ=1): FA3's backward for
# non-deterministic calls, dQ added by TMA reduce-add from inside the dK/dV kernel, so the dQ pass (which
# recomputes S and dP) goes. 64 query rows a step at both head dims: on top of the dK/dV kernel's registers,
# the dQ partial takes 64 x d / 256 fp32 registers a consumer thread while its wgmma runs, and shared memory
# holds dS^T (16-bit 128 x 64, 16K) and the fp32 partial (64 x d): d64 64K + 16K + 16K = 96K, d128 128K +
# 16K + 32K = 176K. ptxas (triton 3.6.0, setmaxnreg 240): d64 stack 0 for every mask (with 128 rows a step,
# FA3's d64 tile: 128-344 bytes); d128 384-440 bytes (32 rows a step, dQ^T orientation: 160-224). Correct on an
# H200 (2026-12-02, 84/84) but slower: the whole backward at 0.75-0.98x the default (docs/perf-notes.md).
HOPPER_BWD_FUSED_TILES = {
    64: HopperBwdTile(64, 128, 2),
    128: HopperBwdTile(64, 128, 2),
}


# The Gluon forward's optional features, each with the head dims at which the default dispatch still keeps calls
# that use it on the Triton forward: `covers` takes those calls only when FLASHTRON_BACKEND=gluon. "softcap":
# softcap > 0; "varlen": cu_seqlens (and seqused_k). All are correct on an H200 (2026-12-02: gluon_check.py
# check-features 100/100 cases, softcap dense; varlen with K NaN / V Inf in every row no query may read,
# seqused_k, a last sequence with no key; and the tier's test_hopper_gpu.py cases). Timed against the Triton
# forward on the one-tile grid dispatched_tile gives them (H200, 2026-12-02, gluon_check.py --time-features, bf16,
# 16384 tokens, same run): varlen at d128 1.08-1.22x (packed 4 x 4096 and mixed lengths, full and causal), so it
# leaves the gate there; varlen at d64 0.81-0.93x; softcap at d128 1.25-1.30x without a mask but 0.66-1.00x
# causal, at d64 0.52-1.00x; softcap with varlen (causal) 0.73-0.87x.
GLUON_GATED_FEATURES = {"softcap": frozenset({64, 128, 256}), "varlen": frozenset({64, 256})}


def forward_features(opts: AttnOptions, *, varlen: bool) -> frozenset:
    """The GLUON_GATED_FEATURES names of the Gluon forward's optional features this call uses."""
    return frozenset(name for name, on in (("softcap", opts.softcap > 0), ("varlen", varlen)) if on)


def gated_features(opts: AttnOptions, head_dim: int, *, varlen: bool) -> frozenset:
    """The features this call uses that GLUON_GATED_FEATURES keeps off the Gluon forward by default at its head dim."""
    return frozenset(name for name in forward_features(opts, varlen=varlen) if head_dim in GLUON_GATED_FEATURES[name])


def covers(q, k, v, opts: AttnOptions, *, varlen: bool, seqused_k=None, backend: str = "auto") -> bool:
    """Whether the Gluon forward handles this call: sm_90 fp16/bf16, head dim 64, 128 or 256 for q, k and v,
    window/causal, softcap, dense or varlen (cu_seqlens, seqused_k), no ALiBi, dropout or sinks, and
    TMA-legal tensors (16-byte aligned base and strides). Calls that use a feature GLUON_GATED_FEATURES
    gates at their head dim are covered only when backend (env.backend()) is "gluon"."""
    if backend != "gluon" and gated_features(opts, q.shape[-1], varlen=varlen):
        return False
    if seqused_k is not None and not varlen:
        # the kernel zeroes V rows past seqused_k (a cache's unwritten slots: 0 x NaN) under varlen only
        return False
    return _kernel_takes(q, k, v, opts)


def _kernel_takes(q, k, v, opts: AttnOptions) -> bool:
    """The device, dtype, head dim, feature and TMA checks of `covers`, those that do not depend on the gate."""
    if not _on_sm90(q.device):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return False
    d = q.shape[-1]
    if d not in HOPPER_TILES or k.shape[-1] != d or v.shape[-1] != d:
        return False
    if opts.alibi_slopes is not None or opts.dropout_p > 0 or opts.learnable_sink is not None:
        return False
    if opts.softcap <= 0 and not opts.softmax_scale * LOG2E >= FP32_MIN_NORMAL:
        # the kernel scales inside exp2 after masking (hopper_fwd_tile.softmax_step): a scale that is 0 (or flushed
        # to 0) in fp32 would make a masked -inf score -inf * 0 = NaN; the Triton forward scales first
        return False
    return all(_tma_ok(t) for t in (q, k, v))


def _on_sm90(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 (scripts/host_time.py stands this in to time the host path on a CPU)."""
    return device.type == "cuda" and _is_sm90(device.index)


@functools.cache
def _is_sm90(index) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def _tma_ok(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride()[:-1])


def _tma_operand(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy when TMA cannot take its strides (e.g. an expanded gradient: stride 0)."""
    return t if _tma_ok(t) and 0 not in t.stride() else t.contiguous()


def _descriptor(t: torch.Tensor, block_rows: int):
    """A 4-D TMA descriptor over (batch, seqlen, nheads, headdim) with a [1, block_rows, 1, headdim] box, or for
    varlen's packed 3-D (total, nheads, headdim) a 3-D one with a [block_rows, 1, headdim] box.
    Built without TensorDescriptor's __post_init__, which re-validates per call what _tma_ok and _box (cached)
    establish: ~4 us a descriptor, 3-5 of them per eager call (scripts/host_time.py)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    if not _tma_ok(t):
        raise ValueError(f"a TMA descriptor needs a 16-byte aligned base and strides, got strides {t.stride()}")
    if 0 in t.shape:
        raise ValueError(f"a TMA descriptor needs no empty dim, got shape {tuple(t.shape)}")
    block, layout = _box(block_rows, t.shape[-1], t.dtype, t.dim())
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(
        base=t, shape=list(t.shape), strides=list(t.stride()), block_shape=list(block), layout=layout, padding="zero"
    )
    return desc


@functools.cache
def _box(block_rows: int, head_dim: int, dtype: torch.dtype, rank: int = 4):
    """The box (validated as TensorDescriptor validates it) and its shared-memory layout, which depend on the box
    and dtype only: computing the layout costs ~10 us, and short-sequence calls (launch-bound) pay it in full."""
    from triton._utils import validate_block_shape
    from triton.experimental.gluon import language as gl

    block = [1, block_rows, 1, head_dim][4 - rank :]
    validate_block_shape(block)
    return block, gl.NVMMASharedLayout.get_default_for(block, getattr(gl, str(dtype).removeprefix("torch.")))


def kernel_launch(q, k, v, out, lse, opts: AttnOptions, tile: HopperTile | None = None, *, cu_seqlens_q=None,
                  cu_seqlens_k=None, max_seqlen_q=None, seqused_k=None):  # fmt: skip
    """(kernel, grid, args, kwargs) of one launch: the arguments as kernel[grid](*args, **kwargs) takes them.
    Works on CPU tensors too (compile_sm90 builds the same specialization from them); a persistent tile's
    grid then assumes SM90_SMS SMs, while on a GPU it is min(work tiles, that device's SM count).
    Varlen (cu_seqlens_q given): q (total_q, nheads, d), k, v (total_k, nheads_k, d), out like q, lse
    (nheads, total_q); the grid covers max_seqlen_q (a host int: no device sync); one-tile grid only."""
    from flashtron.kernels.hopper_fwd import attention_fwd_hopper_kernel

    varlen = cu_seqlens_q is not None
    nheads, d = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    tile = tile or dispatched_tile(d, max_seqlen_q if varlen else q.shape[1], opts, varlen=varlen, seqlen_k=k.shape[-3])
    if varlen:
        if tile.persistent:
            raise ValueError("the persistent Gluon forward has no varlen variant (its schedule needs the lengths)")
        # the kernel clamps every sequence into the row counts (hopper_common.sequence_bounds)
        batch, seqlen_q = cu_seqlens_q.numel() - 1, max_seqlen_q
        rows_q, rows_k = q.shape[0], k.shape[0]
        strides_o = (0, out.stride(0), out.stride(1))
        strides_l = (0, lse.stride(0))
        assert lse.stride(1) == 1
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
        rows_q, rows_k = seqlen_q, k.shape[1]
        strides_o = (out.stride(0), out.stride(1), out.stride(2))
        strides_l = (lse.stride(0), lse.stride(1))
    grid = (math.ceil(seqlen_q / tile.block_m), nheads, batch)
    heads_per_section = nheads
    if tile.persistent:
        # at most every pair in one section: the kernel's section_tiles = heads_per_section * query blocks is
        # then at most the tile count (i32)
        heads_per_section = min(_heads_per_section(k, nheads // nheads_k), nheads * batch)
        grid = (min(grid[0] * nheads * batch, _num_sms(q.device)),)
    has_softcap = opts.softcap > 0
    args = (
        # one Q box per consumer
        _descriptor(q, tile.block_m // tile.consumers), _descriptor(k, tile.block_n), _descriptor(v, tile.block_n),
        out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k,
        # dynamic: the tile counter, then two tile slots per program (kernels/hopper_fwd._persistent_loader)
        torch.zeros(1 + 2 * grid[0], dtype=torch.int32, device=q.device) if tile.dynamic else None,
        *strides_o, *strides_l,
        rows_q, rows_k, nheads // nheads_k, max(opts.window_left, 0), max(opts.window_right, 0),
        # as launch.score_args; without softcap None, so the kernel has no such parameter (the code of today)
        opts.softmax_scale / opts.softcap if has_softcap else opts.softmax_scale * LOG2E,
        opts.softcap * LOG2E if has_softcap else None,
        nheads, batch, heads_per_section,
    )  # fmt: skip
    kwargs = dict(
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        STAGES=tile.stages,
        HAS_LEFT=opts.window_left >= 0,
        HAS_RIGHT=opts.window_right >= 0,
        WARP_SPECIALIZE=tile.warp_specialize,
        OVERLAP=tile.overlap,
        CONSUMERS=tile.consumers,
        PERSISTENT=tile.persistent,
        SNAKE=tile.snake,
        DYNAMIC=tile.dynamic,
        HAS_SOFTCAP=has_softcap,
        IS_VARLEN=varlen,
        HAS_SEQUSED_K=seqused_k is not None,
        num_warps=tile.num_warps,
        # with the 1-warp loader the CTA has one warpgroup more than the consumers': 3 (8 consumer warps, or
        # 2 ping-pong consumers) x 128 threads x 168 fits the 64K registers; setmaxnreg moves the loader's
        # share (24) to the consumers (240)
        maxnreg=168 if tile.warp_specialize else None,
    )
    return attention_fwd_hopper_kernel, grid, args, kwargs


def _num_sms(device: torch.device) -> int:
    """The persistent grid's program count: the device's SM count, or SM90_SMS for CPU tensors (compile only)."""
    return configs.num_sms(device) if device.type == "cuda" else SM90_SMS


def _heads_per_section(k: torch.Tensor, group_size: int) -> int:
    """Query heads per L2 section of the persistent schedule: as many as share L2_SECTION_BYTES of K and V
    (a KV head's K and V serve group_size query heads), at least one."""
    kv_bytes = 2 * k.shape[1] * k.shape[-1] * k.element_size()  # one KV head of one batch entry
    return max(1, L2_SECTION_BYTES * group_size // max(kv_bytes, 1))


def attention_forward(q, k, v, opts: AttnOptions, tile: HopperTile | None = None, *, cu_seqlens_q=None,
                      cu_seqlens_k=None, max_seqlen_q=None, seqused_k=None):  # fmt: skip
    """out like q and lse fp32 natural log, in the Triton forward's layouts: dense q (batch, seqlen_q, nheads,
    d), k, v (batch, seqlen_k, nheads_k, d), lse (batch, nheads, seqlen_q); varlen (cu_seqlens_q, cu_seqlens_k
    int32 (batch + 1,), max_seqlen_q a host int, optional seqused_k int32 (batch,)) q (total_q, nheads, d),
    k, v (total_k, nheads_k, d), lse (nheads, total_q). Callers check `covers` first."""
    from flashtron.outputs import new_output

    varlen = cu_seqlens_q is not None
    nheads = q.shape[-2]
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((nheads, q.shape[0]) if varlen else (q.shape[0], nheads, q.shape[1]), torch.float32, q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    if k.shape[-3] == 0:  # no key at all (dense seqlen_k or varlen total_k 0): a descriptor cannot be built
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    kernel, grid, args, kwargs = kernel_launch(
        q, k, v, out, lse, opts, tile, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, seqused_k=seqused_k,
    )  # fmt: skip
    kernel[grid](*args, **kwargs)
    if varlen:
        fill_outside_rows(out, lse, cu_seqlens_q)
    return out, lse


# Programs per head of fill_outside_rows: rows outside every sequence are usually none or a padding tail, and
# each program first scans cu_seqlens (256 entries a step), so a few suffice
FILL_PROGRAMS, FILL_BLOCK_M = 4, 64


def fill_outside_rows(out, lse, cu_seqlens_q):
    """Varlen: out 0 and lse -inf in the rows before cu_seqlens_q[0] and from cu_seqlens_q[-1] on (the spans as
    the kernels clamp them), as the Triton forward writes them in its extra batch slice
    (kernels/fwd.fill_outside_rows_kernel: one launch, no sync, stores only those rows). out (total_q, nheads,
    d), lse (nheads, total_q)."""
    from flashtron.kernels.fwd import fill_outside_rows_kernel

    total, nheads, d = out.shape
    programs = max(1, min(FILL_PROGRAMS, -(-total // FILL_BLOCK_M)))
    fill_outside_rows_kernel[(programs, nheads)](
        out, lse, cu_seqlens_q, out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), cu_seqlens_q.numel() - 1,
        total, BLOCK_M=FILL_BLOCK_M, BLOCK_DV=max(16, 1 << (d - 1).bit_length()), HEAD_DIM_V=d,
    )  # fmt: skip


def covers_backward(q, k, v, dout, opts: AttnOptions, *, varlen: bool, seqused_k=None) -> bool:
    """Whether the Gluon dK/dV kernel (and the opt-in Gluon dQ) handles this backward: what `covers` takes
    of a dense call without softcap at head dim 64 or 128 (HOPPER_BWD_TILES), with dout of q's dtype (dout with
    strides TMA cannot take is made contiguous by the launcher). The backward kernels have neither softcap nor
    varlen nor head dim 256, whatever the backend setting: such backwards run on the Triton kernels, on the Gluon
    forward's out and lse."""
    if varlen or seqused_k is not None or opts.softcap > 0 or q.shape[-1] not in HOPPER_BWD_TILES:
        return False
    return dout.dtype == q.dtype and covers(q, k, v, opts, varlen=False)


def backward_dkdv_launch(q, k, v, dout, lse, delta, dk, dv, opts: AttnOptions, tile: HopperBwdTile | None = None,
                         dq_accum=None):  # fmt: skip
    """(kernel, grid, args, kwargs) of one dK/dV launch, as kernel_launch. lse and delta: (batch, nheads,
    seqlen_q) fp32 with the same strides, rows contiguous; dk, dv like k, v (last stride 1). With dq_accum
    ((batch, seqlen_q, nheads, d) fp32, contiguous) the FUSED_DQ variant, which adds dQ into it (default
    tile HOPPER_BWD_FUSED_TILES)."""
    from flashtron.kernels.hopper_bwd import attention_bwd_dkdv_hopper_kernel

    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    fused = dq_accum is not None
    tile = tile or (HOPPER_BWD_FUSED_TILES if fused else HOPPER_BWD_TILES)[d]
    assert lse.stride() == delta.stride() and lse.stride(2) == 1
    grid = (math.ceil(seqlen_k / tile.block_n), nheads_k, batch)
    args = (
        _descriptor(q, tile.block_m), _descriptor(k, tile.block_n), _descriptor(v, tile.block_n),
        _descriptor(dout, tile.block_m), lse, delta, dk, dv, _descriptor(dq_accum, tile.block_m) if fused else None,
        lse.stride(0), lse.stride(1), dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1),
        dv.stride(2),
        seqlen_q, seqlen_k, nheads // nheads_k, max(opts.window_left, 0), max(opts.window_right, 0),
        opts.softmax_scale * LOG2E, opts.softmax_scale,
    )  # fmt: skip
    kwargs = _backward_kwargs(tile, opts)
    if fused:  # only then: the deterministic kernel's specialization stays what it was
        kwargs["FUSED_DQ"] = True
    if tile.lean_mask:  # likewise
        if fused:  # LEAN_MASK drops bounds a segment cannot cross, and with them FUSED_DQ's keys < seqlen_k test
            raise ValueError("the LEAN_MASK dK/dV tile has no FUSED_DQ variant")
        kwargs["LEAN_MASK"] = True
    return attention_bwd_dkdv_hopper_kernel, grid, args, kwargs


def attention_backward_dkdv(q, k, v, dout, lse, delta, dk, dv, opts: AttnOptions, tile: HopperBwdTile | None = None):
    """Writes dk, dv (allocated by the caller, like k and v) of a covered backward: q, dout (batch,
    seqlen_q, nheads, d), k, v (batch, seqlen_k, nheads_k, d), lse (natural log) and delta = rowsum(dout *
    out) - dlse, (batch, nheads, seqlen_q) fp32, same strides. Callers check `covers_backward` first."""
    dout = _tma_operand(dout)
    kernel, grid, args, kwargs = backward_dkdv_launch(q, k, v, dout, lse, delta, dk, dv, opts, tile)
    kernel[grid](*args, **kwargs)


def attention_backward_fused(q, k, v, dout, lse, delta, dq, dk, dv, opts: AttnOptions,
                             tile: HopperBwdTile | None = None):  # fmt: skip
    """Writes dq, dk, dv of a covered backward with the FUSED_DQ dK/dV kernel (deterministic=False only: the
    order in which key blocks add into dQ varies), arguments as attention_backward_dkdv's. The kernel adds
    dS K * softmax_scale into a zeroed fp32 dq_accum; the convert is one torch copy_ (a cast, one pass: read
    4 bytes, write 2 an element, what a Triton kernel would do; the scale is folded into the kernel's adds)."""
    dout = _tma_operand(dout)
    dq_accum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kernel, grid, args, kwargs = backward_dkdv_launch(q, k, v, dout, lse, delta, dk, dv, opts, tile, dq_accum)
    kernel[grid](*args, **kwargs)
    dq.copy_(dq_accum)


# The Gluon dQ kernel (kernels/hopper_bwd.attention_bwd_dq_hopper_kernel), opt-in: launch.attention_backward
# runs it in place of the Triton dQ only with FLASHTRON_GLUON_DQ=1 (env.gluon_dq) and only for calls whose
# dK/dV takes the Gluon kernel. Correct on an H200 (2026-12-02, 84/84 cases), but the whole backward with it
# measured 0.91-1.07x the default one (docs/perf-notes.md, third session), so it is not the default.
@dataclass(frozen=True)
class HopperDqTile:
    block_m: int  # query rows per program (resident Q and dO)
    block_n: int  # keys per step of the loop (K, V ring slots)
    stages: int  # (K, V) ring slots
    num_warps: int = 8  # two consumer warpgroups of block_m / 2 rows each


# 128 query rows in two warpgroups, as the forward. Registers a consumer thread holds through a step (fp32
# unless said): dQ 128 x d / 256, S and dP 2 x 128 x BLOCK_N / 256, the 16-bit dS operand of the in-flight
# dQ wgmma 128 x BLOCK_N / 512: d64 with 128 keys 32 + 128 + 32 = 192; d128 with 64 keys 64 + 64 + 16 = 144.
# d128 with 128 keys (224) compiles without spills, but ptxas serializes its wgmmas (advisory C7512: too few
# registers left at setmaxnreg's 240; scripts/aot_report.py gluon-dq). Shared memory, 16-bit: Q + dO
# 2 x 128 x d plus STAGES x (K + V) of BLOCK_N x d: d64 32K + 2 x 32K = 96K; d128 64K + 3 x 32K = 160K.
# Timed only as these tiles (gluon_check.py --backward, H200, 2026-12-02); no other tile was tried.
HOPPER_DQ_TILES = {
    64: HopperDqTile(128, 128, 2),
    128: HopperDqTile(128, 64, 3),
}


def backward_dq_launch(q, k, v, dout, lse, delta, dq, opts: AttnOptions, tile: HopperDqTile | None = None):
    """(kernel, grid, args, kwargs) of one dQ launch, as kernel_launch. lse and delta: (batch, nheads,
    seqlen_q) fp32 with the same strides, rows contiguous; dq like q (last stride 1)."""
    from flashtron.kernels.hopper_bwd import attention_bwd_dq_hopper_kernel

    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    tile = tile or HOPPER_DQ_TILES[d]
    assert lse.stride() == delta.stride() and lse.stride(2) == 1
    grid = (math.ceil(seqlen_q / tile.block_m), nheads, batch)
    args = (
        _descriptor(q, tile.block_m), _descriptor(k, tile.block_n), _descriptor(v, tile.block_n),
        _descriptor(dout, tile.block_m), lse, delta, dq,
        lse.stride(0), lse.stride(1), dq.stride(0), dq.stride(1), dq.stride(2),
        seqlen_q, seqlen_k, nheads // nheads_k, max(opts.window_left, 0), max(opts.window_right, 0),
        opts.softmax_scale * LOG2E, opts.softmax_scale,
    )  # fmt: skip
    return attention_bwd_dq_hopper_kernel, grid, args, _backward_kwargs(tile, opts)


def _backward_kwargs(tile, opts: AttnOptions) -> dict:
    """The launch keywords both Gluon backward kernels take from their tile and the mask."""
    return dict(
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        STAGES=tile.stages,
        HAS_LEFT=opts.window_left >= 0,
        HAS_RIGHT=opts.window_right >= 0,
        num_warps=tile.num_warps,
        # two consumer warpgroups and the loader's: 3 x 128 threads x 168 fit the 64K registers; setmaxnreg
        # moves the loader's share (24) to the consumers (240)
        maxnreg=168,
    )


def attention_backward_dq(q, k, v, dout, lse, delta, dq, opts: AttnOptions, tile: HopperDqTile | None = None):
    """Writes dq (allocated by the caller, like q) of a covered backward; the arguments as
    attention_backward_dkdv's. Callers check `covers_backward` first."""
    dout = _tma_operand(dout)
    kernel, grid, args, kwargs = backward_dq_launch(q, k, v, dout, lse, delta, dq, opts, tile)
    kernel[grid](*args, **kwargs)


def compile_sm90(kernel, args, kwargs):
    """Compile kernel for sm_90 exactly as kernel[grid](*args, **kwargs) would specialize it, without a GPU.
    Returns triton's CompiledKernel (asm["ptx"], asm["cubin"], metadata.shared)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    src = GluonASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)
