"""One GPU run for the Gluon Hopper forward (issue 15): are the new variants right, and how fast is each.

    PYTHONPATH=src python3 scripts/gluon_check.py [--budget 220] [--variants pp,ws-ov,...] [--api]
    PYTHONPATH=src python3 scripts/gluon_check.py --backward [--budget 540] [--bwd-candidates lean-mask]
    PYTHONPATH=src python3 scripts/gluon_check.py --time-features [--budget 150]    # softcap, varlen: speed

Parts, each in its own child process with a time limit, so that a hang or a crash in one (a deadlocked
mbarrier, an illegal address) costs only that part:
  1. check <variant>, one child per variant, in the order given (default: pp, ws-ov, pp-256x64, ov-128x64;
     `persist`, the dispatched tiles on the persistent grid, only when asked for):
     `pp` is the dispatched ping-pong tile (launch_hopper.HOPPER_TILES: two one-warpgroup consumers taking
     turns on the tensor cores) and gets the full matrix; `ws-ov` is the first tile (8 warps in lock step,
     launch_hopper.CANDIDATE_TILES["ws-ov"]), the same-run baseline, checked on the bf16 configurations that
     the timing compiles (it passed the full matrix on 2026-12-02); `pp-256x64` and `ov-128x64` are d64-only tiles
     (launch_hopper.CANDIDATE_TILES), checked on three d64 configurations; `persist` gets the full matrix, each
     case also on a 3-program grid (bitwise equal to the full grid); `persist-1sec` is the same kernel with one
     L2 section (ONE_SECTION; scripts/persistent_balance.py says why); `persist-snake` (full matrix) and
     `persist-snake-1sec` run odd rounds of the grid backwards (launch_hopper.CANDIDATE_TILES["persist-snake"]);
     `d256` is head dim 256's tile (HOPPER_TILES[256], opt-in), checked on D256, and adds d256 timing cells;
     `persist-dyn` takes each program's next tile from an atomic counter (CANDIDATE_TILES["persist-dyn"]).
     The checks share the budget
     less TIME_RESERVE seconds, which the timing always keeps; a variant cut off by its time limit counts
     as failed and is not timed.
  2. time: TFLOP/s at ../shared/PERF.md's grid (bf16, batch * seqlen = 16384, nheads = 2048 / headdim,
     seqlens 16k, 4k, 1k in that order) for each variant whose cases all passed, the Triton forward, and
     SDPA's cuDNN and flash. Rows are saved as they come: a time-out keeps the rows done.
  features (after the variants' checks, before the timing; its own time limit and its own summary line):
     softcap and varlen on the dispatched tiles (HOPPER_TILES), gated until this part passes
     (launch_hopper.GLUON_GATED_FEATURES, docs/perf-notes.md 2026-12-02 "softcap and varlen"): softcap
     on dense calls at SEQLENS; varlen batches (VARLEN_BATCHES: sequences of length 0 and 1, lengths not
     multiples of the block, sq > sk with empty rows, seqused_k, one of 0, a last sequence with queries and no
     key) with and without softcap, K NaN and V Inf in every K/V row no query may read (past seqused_k, of
     sequences without queries, NaN padding after cu_seqlens_k[-1]), which a sequence's last, partial key block
     loads; GQA 4:1, NaN-poisoned outputs, the tolerance rule against the fp32 reference, two runs bitwise
     equal. Every case passed on an H200 on 2026-12-02 (100/100); at which head dims the features stay in
     GLUON_GATED_FEATURES is --time-features' verdict.
  3. with --api, if 30 s are left: a few calls through the public flash_attn_func with
     FLASHTRON_BACKEND=gluon, backward included (the Triton backward on the Gluon forward's out and lse).
Correctness: fp16 and bf16, head dims 64 and 128, no mask / causal (bottom-right) / a window (bf16),
GQA 4:1, 13 seqlen pairs from 1 to 4096 with seqlen_q != seqlen_k both ways; outputs poisoned with NaN;
out and lse against the fp32 reference by the tests' rule (tests/tolerance.py); two runs bitwise equal.
Prints one line per failure, a summary per variant, the TFLOP/s table last; writes $OUT/gluon_check.json.

With --backward the run is the backward's instead (issue 16), same budget design, four parts; the three
checks share the budget less BWD_TIME_RESERVE seconds, which the timing keeps (3 x 120 s of check limits
and 150 s of timing: --budget 540 lets every part run to its limit):
  1. check-bwd: the Gluon dK/dV kernel (launch_hopper.HOPPER_BWD_TILES) inside launch.attention_backward
     with FLASHTRON_BACKEND=gluon (delta and dQ on the Triton kernels), on the Gluon forward's out and lse,
     with a gradient on lse too: dq, dk, dv against the fp32 reference by the tests' backward rule, two
     runs bitwise equal, the Gluon kernel asserted to have run. BWD_CONFIGS x BWD_SEQLENS, GQA 4:1.
  2. check-dq: the same cases with FLASHTRON_GLUON_DQ=1 too, so dQ runs on the Gluon dQ kernel
     (launch_hopper.HOPPER_DQ_TILES; asserted to have run), in its own child: a hang or a crash of that
     kernel, never run on a GPU before 2026-12-02's compile-only session, costs only this part. Skipped if
     fewer than 15 s are left for it.
  3. check-fused: the same cases with FLASHTRON_GLUON_FUSED_DQ=1 (deterministic=False), so dQ is added from
     inside the Gluon dK/dV kernel (FUSED_DQ: TMA reduce-add into fp32, launch_hopper.attention_backward_fused;
     asserted to have run), in its own child, skipped if fewer than 15 s are left. Not bit-reproducible by
     design: each of the two runs is checked against the reference by the same 3x rule (so they agree within
     it), dk and dv (still accumulated in registers) bitwise equal.
  4. time-bwd, if every check-bwd case passed: backward TFLOP/s (2.5x the forward's FLOPs, halved when
     causal) at the same grid: the whole flashtron backward with the Gluon dK/dV ("gluon"), the Gluon dK/dV
     kernel on its own ("gluon-dkdv", FLOPs of its 3 of the 5 backward matmuls: 1.5x the forward's), the
     Triton backward, and SDPA cuDNN and flash (torch.autograd.grad of their out, retain_graph); if every
     check-dq case passed too, the whole backward with FLASHTRON_GLUON_DQ=1 ("gluon+dq") and the Gluon dQ
     kernel on its own ("gluon-dq", S, dP and dQ: also 1.5x the forward's FLOPs); if every check-fused case
     passed, the whole backward with FLASHTRON_GLUON_FUSED_DQ=1 ("gluon+fused": preprocess, zeroing, the fused
     kernel, the cast) and attention_backward_fused on its own ("gluon-fused": all 5 matmuls, 2.5x).
With --bwd-candidates NAME,... (launch_hopper.CANDIDATE_BWD_TILES), after the three checks: check-bwd again
per candidate, its tile in place of HOPPER_BWD_TILES' in the dK/dV launcher ("bwd-NAME"), within what is left
of the checks' budget (add BWD_CHECK_LIMIT seconds to --budget per candidate); time-bwd then times the dK/dV
kernel with each candidate that passed on its own ("dkdv-NAME", next to "gluon-dkdv").

With --time-features the run times the forward features instead (launch_hopper.GLUON_GATED_FEATURES: softcap
and varlen, correct on the GPU, taken by default only at the head dims where they timed faster), one part,
time-features, in its own child within --budget (87 s on an H200, 2026-12-02):
forward TFLOP/s, bf16, 16384 tokens, nheads = 2048 / headdim, causal halving the FLOPs, of the Gluon forward
on the tile that covers(..., backend="gluon") sends the call to (launch_hopper.dispatched_tile: the one-tile
ping-pong grid) against the Triton forward (launch.attention_forward under FLASHTRON_BACKEND=triton), same
tensors and options, FEATURE_TIME_CELLS in order: softcap 30 dense at TIME_SEQLENS, d128 and d64, full and
causal; varlen without softcap on TIME_VARLEN_BATCHES ("packed": 4 x 4096; "mixed": 4096, 1000, 17, 2900, 8192,
179), d128 and d64, full and causal, FLOPs summed over the sequences; softcap 30 varlen once (mixed, causal, d128
and d64). Each row also keeps max |out - Triton's out| as a sanity check. Last, informational (last so that a hang
there would cost no other row): the dense softcap cells on the persistent grid ("gluon-persist"),
which dispatched_tile does not give softcap. Rows are saved as they come. Prints a line per cell, then a table
with gluon/triton per cell and a verdict per feature from its own cells (softcap: the dense ones; varlen: those
without softcap; softcap+varlen matters only if both leave), per head dim: the feature leaves
GLUON_GATED_FEATURES at a head dim when every cell of that head dim is >= 1.0x, or none is below FEATURE_FLOOR
(0.97x) and their geometric mean is >= FEATURE_CLEARLY_FASTER (1.05x). Writes
$OUT/gluon_check_features_time.json (rows and verdicts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "src"), os.path.join(HERE, "..", "tests")]

SEQLENS = [(1, 1), (17, 17), (127, 127), (128, 128), (129, 129), (1000, 1000), (4096, 4096),
           (17, 129), (129, 17), (127, 1000), (1000, 127), (1, 1000), (4096, 1000)]  # fmt: skip
MASKS = {"none": (-1, -1), "causal": (-1, 0), "window": (256, 32)}
BATCH, NHEADS, NHEADS_K = 2, 8, 2  # GQA 4:1
WINDOW_LEFT = 1024  # the timed sliding window, (1024, 0), as PERF.md's window target
TIME_SEQLENS = [16384, 4096, 1024]  # the largest first: the rows that matter most come first


def _short(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    # Triton's CompilationError puts the cause last; assertion messages come first
    text = lines[-1] if type(exc).__name__ == "CompilationError" and lines else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text[:200]}"


# Configurations (dtype, head dim, mask) each variant is checked on; every one is a fresh compile.
FULL = [(dt, d, m) for dt in ("bfloat16", "float16") for d in (64, 128) for m in ("none", "causal", "window")
        if m != "window" or dt == "bfloat16"]  # fmt: skip
TIMED = [("bfloat16", d, m) for d in (64, 128) for m in ("none", "causal")]  # what the timing compiles
D64 = [("bfloat16", 64, "none"), ("bfloat16", 64, "causal"), ("float16", 64, "window")]
D256 = [("bfloat16", 256, m) for m in ("none", "causal", "window")] + [("float16", 256, "causal")]
OLD = TIMED + [("float16", 128, "causal")]
# name: (tile per head dim as a function of launch_hopper, configurations, seconds its check may take at most)
VARIANTS = {
    "pp": (lambda lh, d: lh.HOPPER_TILES[d], FULL, 95),  # the dispatched ping-pong tile; about 50 s
    "ws-ov": (lambda lh, d: lh.CANDIDATE_TILES["ws-ov"][d], TIMED, 40),  # the first tile (lock step), baseline
    "pp-256x64": (lambda lh, d: lh.CANDIDATE_TILES["pp-256x64"].get(d), D64, 35),
    # head dim 256's tile (HOPPER_TILES[256], only under FLASHTRON_BACKEND=gluon), never run: 64-key blocks; when
    # named, the timing adds d256 cells (nheads 8, as the bench)
    "d256": (lambda lh, d: lh.HOPPER_TILES[256] if d == 256 else None, D256, 60),
    "ov-128x64": (lambda lh, d: lh.CANDIDATE_TILES["ov-128x64"].get(d), D64, 35),
    # the dispatched tiles on the persistent grid, never run before: the full matrix, each case a second time on
    # a 3-program grid with 3-pair L2 sections (many tiles per program), bitwise equal; time limit a guess
    "persist": (lambda lh, d: lh.CANDIDATE_TILES["persist"][d], FULL, 120),
    # the same kernel with every (head, batch) pair in one L2 section (ONE_SECTION below): the static schedule
    # balanced (scripts/persistent_balance.py: d128 causal 1.03-1.06 max/mean against 1.17-1.21); nothing compiles
    "persist-1sec": (lambda lh, d: lh.CANDIDATE_TILES["persist"][d], TIMED, 30),
    # odd rounds of the grid reversed (hopper_common.snake_order), never run: with its sections, and with one
    "persist-snake": (lambda lh, d: lh.CANDIDATE_TILES["persist-snake"][d], FULL, 120),
    "persist-snake-1sec": (lambda lh, d: lh.CANDIDATE_TILES["persist-snake"][d], TIMED, 30),
    # the dynamic tile counter (HopperTile.dynamic), never run: the full matrix, each case also on the 3-program
    # grid (every program then takes many tiles from the counter), bitwise equal
    "persist-dyn": (lambda lh, d: lh.CANDIDATE_TILES["persist-dyn"][d], FULL, 120),
    # the first run's other variants (2026-12-02), for --variants
    "plain": (lambda lh, d: replace(lh.CANDIDATE_TILES["ws-ov"][d], warp_specialize=False, overlap=False), OLD, 45),
    "ws": (lambda lh, d: replace(lh.CANDIDATE_TILES["ws-ov"][d], overlap=False), OLD, 45),
    "ws-ov-deep": (
        lambda lh, d: replace(lh.CANDIDATE_TILES["ws-ov"][d], stages=lh.CANDIDATE_TILES["ws-ov"][d].stages + 1),
        OLD,
        45,
    ),
}
DEFAULT_VARIANTS = "pp,ws-ov,pp-256x64,ov-128x64"
# Variants run with launch_hopper.L2_SECTION_BYTES so large that the persistent schedule has one section
# (heads_per_section is a runtime argument of the same compiled kernel).
ONE_SECTION = {"persist-1sec", "persist-snake-1sec"}


def _forward(q, k, v, opts, variant: str):
    """launch_hopper.attention_forward on the variant's tile, with its L2 sectioning."""
    from flashtron import launch_hopper

    tile = _tile(q.shape[-1], variant)
    if variant not in ONE_SECTION:
        return launch_hopper.attention_forward(q, k, v, opts, tile)
    saved = launch_hopper.L2_SECTION_BYTES
    launch_hopper.L2_SECTION_BYTES = 1 << 62
    try:
        return launch_hopper.attention_forward(q, k, v, opts, tile)
    finally:
        launch_hopper.L2_SECTION_BYTES = saved


TIME_RESERVE = 55.0  # seconds the timing keeps whatever the checks take (about 40 s on 2026-12-02's H200)
API_RESERVE = 30.0


def _tile(d: int, variant: str):
    """The variant's HopperTile at head dim d, or None where it has none."""
    from flashtron import launch_hopper

    try:
        return VARIANTS[variant][0](launch_hopper, d)
    except KeyError:  # a tile table without this head dim (d256 has the one-tile tile only)
        return None


def _cases(variant: str):
    import torch

    for dtype, d, mask in VARIANTS[variant][1]:
        if _tile(d, variant) is not None:
            yield getattr(torch, dtype), d, mask


def _check_case(dtype, d, mask, variant, sq, sk):
    """Gluon forward against the fp32 reference and PyTorch-in-dtype; two runs bitwise equal."""
    import torch

    from flashtron import launch_hopper
    from flashtron.options import AttnOptions
    from flashtron.reference import attention_ref
    from tolerance import assert_fa_close

    g = torch.Generator(device="cuda").manual_seed(sq * 7919 + sk * 31 + d)
    q = torch.randn(BATCH, sq, NHEADS, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(BATCH, sk, NHEADS_K, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(BATCH, sk, NHEADS_K, d, device="cuda", generator=g).to(dtype)
    window = MASKS[mask]
    opts = AttnOptions(softmax_scale=d**-0.5, window_left=window[0], window_right=window[1])
    assert launch_hopper.covers(q, k, v, opts, varlen=False), "covers() refuses this case"
    tile = _tile(d, variant)
    out, lse = _forward(q, k, v, opts, variant)
    out2, lse2 = _forward(q, k, v, opts, variant)
    torch.cuda.synchronize()
    kw = dict(causal=False, window_size=window)
    out_ref, lse_ref, _ = attention_ref(q, k, v, upcast=True, **kw)
    out_pt, lse_pt, _ = attention_ref(q, k, v, upcast=False, reorder_ops=True, **kw)
    assert_fa_close(out, out_ref, out_pt, name="out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)), "lse: -inf pattern differs"
    finite = torch.isfinite(lse_ref)
    assert_fa_close(lse[finite], lse_ref[finite], lse_pt.float()[finite], name="lse")
    assert torch.equal(out, out2) and torch.equal(lse, lse2), "two runs differ"
    if tile.persistent:
        out3, lse3 = _few_programs_forward(q, k, v, opts, tile)
        torch.cuda.synchronize()
        assert torch.equal(out, out3) and torch.equal(lse, lse3), "3 programs, 3-pair sections: differs"


def _few_programs_forward(q, k, v, opts, tile, programs=3, heads_per_section=3):
    """The persistent kernel on a grid of `programs` (each program loops over many tiles, so the ring phases,
    Q buffers and ping-pong turns carry across tiles at every seqlen) with L2 sections of heads_per_section
    (batch, head) pairs, a short last one. Outputs NaN-poisoned like the launcher's."""
    import torch

    from flashtron import launch_hopper
    from flashtron.outputs import new_output

    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((q.shape[0], q.shape[2], q.shape[1]), torch.float32, q.device)
    kernel, grid, args, kwargs = launch_hopper.kernel_launch(q, k, v, out, lse, opts, tile)
    assert kernel.arg_names[len(args) - 1] == "heads_per_section"
    kernel[(min(programs, grid[0]),)](*args[:-1], heads_per_section, **kwargs)
    return out, lse


# softcap and varlen (issue 15): (dtype, head dim, mask, softcap, varlen); each a fresh compile
FEATURE_CONFIGS = [
    ("bfloat16", 128, "none", 30.0, False), ("float16", 128, "causal", 5.0, False),
    ("bfloat16", 64, "window", 50.0, False), ("float16", 64, "none", 30.0, False),
    ("bfloat16", 128, "causal", 0.0, True), ("float16", 64, "none", 0.0, True), ("bfloat16", 64, "causal", 0.0, True),
    ("bfloat16", 128, "window", 20.0, True), ("float16", 128, "causal", 10.0, True),
    ("bfloat16", 64, "none", 30.0, True),
]  # fmt: skip
# varlen batches: (lengths_q, lengths_k, seqused_k or None, rows of NaN padding after cu_seqlens_k[-1]); the K/V
# rows no query may read hold K NaN and V Inf (tests/attention_cases.poison_unread_keys): a sequence's last,
# partial key block loads the rows after it, and P V must not see them (0 x Inf is NaN; review, 2026-12-02)
VARLEN_BATCHES = [
    ([300, 0, 1, 129, 257], [257, 5, 0, 1000, 129], None, 0),  # empty sequences, sk = 0 with sq > 0
    ([17, 128, 1000, 1], [129, 128, 1, 1], None, 0),  # sq > sk: empty rows under causal
    ([129, 40, 513], [200, 300, 700], [100, 0, 700], 0),  # seqused_k, one of 0: rows past it poisoned
    ([4096, 1000], [1000, 4096], None, 0),
    ([1], [1], None, 0),
    # 257 and 1000 keys (not multiples of the block) followed by a sequence without queries (its rows Inf) and
    # by the NaN padding
    ([300, 0, 129, 513], [257, 60, 1000, 129], None, 77),
    # the last sequence has queries and no key: its K/V box lies wholly past the tensor (TMA zero-fills it and
    # must complete the byte count), out 0 and lse -inf there; then the same on the padding
    ([200, 77], [131, 0], None, 0),
    ([200, 77], [131, 0], None, 20),
]
FEATURE_CHECK_LIMIT = 120.0  # seconds the features part may take (a guess: 10 compiles and small cases)


def _check_feature_case(dtype, d, mask, softcap, case):
    """softcap and/or varlen on the dispatched tile: out and lse against the fp32 reference by the tests' rule,
    the -inf pattern, two runs bitwise equal. case: (sq, sk) dense, a VARLEN_BATCHES entry varlen."""
    import torch

    from attention_cases import poison_unread_keys
    from flashtron import launch_hopper
    from flashtron.options import AttnOptions
    from flashtron.reference import attention_ref, attention_varlen_ref
    from tolerance import assert_fa_close

    window = MASKS[mask]
    opts = AttnOptions(softmax_scale=d**-0.5, window_left=window[0], window_right=window[1], softcap=softcap)
    kw = dict(causal=False, window_size=window, softcap=softcap)
    if len(case) == 2:  # dense
        sq, sk = case
        g = torch.Generator(device="cuda").manual_seed(sq * 7919 + sk * 31 + d + 2)
        q = torch.randn(BATCH, sq, NHEADS, d, device="cuda", generator=g).to(dtype)
        k, v = (torch.randn(BATCH, sk, NHEADS_K, d, device="cuda", generator=g).to(dtype) for _ in "kv")
        varlen, extra = False, {}
        ref = lambda upcast: attention_ref(q, k, v, upcast=upcast, reorder_ops=not upcast, **kw)[:2]  # noqa: E731
    else:
        lens_q, lens_k, used, pad = case
        cu_q, cu_k = (torch.tensor([0, *n], device="cuda").cumsum(0).to(torch.int32) for n in (lens_q, lens_k))
        seqused = None if used is None else torch.tensor(used, dtype=torch.int32, device="cuda")
        g = torch.Generator(device="cuda").manual_seed(sum(lens_q) * 7919 + sum(lens_k) + d)
        q = torch.randn(sum(lens_q), NHEADS, d, device="cuda", generator=g).to(dtype)
        k, v = (torch.randn(sum(lens_k), NHEADS_K, d, device="cuda", generator=g).to(dtype) for _ in "kv")
        k, v = poison_unread_keys(k, v, cu_q, cu_k, seqused, pad)
        varlen = True
        extra = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), seqused_k=seqused)
        ref = lambda upcast: attention_varlen_ref(  # noqa: E731
            q, k, v, cu_q, cu_k, seqused_k=seqused, upcast=upcast, reorder_ops=not upcast, **kw
        )
    args = dict(varlen=varlen, seqused_k=extra.get("seqused_k"))
    assert launch_hopper.covers(q, k, v, opts, backend="gluon", **args), "covers() refuses this case"
    assert not launch_hopper.covers(q, k, v, opts, backend="auto", **args) or not (
        launch_hopper.gated_features(opts, d, varlen=varlen)
    ), "the gate lets a gated feature through by default"
    out, lse = launch_hopper.attention_forward(q, k, v, opts, **extra)
    out2, lse2 = launch_hopper.attention_forward(q, k, v, opts, **extra)
    torch.cuda.synchronize()
    (out_ref, lse_ref), (out_pt, lse_pt) = ref(True), ref(False)
    assert_fa_close(out, out_ref, out_pt, name="out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)), "lse: -inf pattern differs"
    finite = torch.isfinite(lse_ref)
    assert_fa_close(lse[finite], lse_ref[finite], lse_pt.float()[finite], name="lse")
    assert torch.equal(out, out2) and torch.equal(lse, lse2), "two runs differ"


def child_check_features(state: str) -> None:
    """Checks FEATURE_CONFIGS, saving after each configuration (a time-out keeps what ran)."""
    import torch

    from flashtron import launch

    launch.set_output_poisoning(True)
    results = {}
    for dtype, d, mask, softcap, varlen in FEATURE_CONFIGS:
        name = f"features {dtype} d{d} {mask}{f' softcap={softcap:g}' if softcap else ''}{' varlen' if varlen else ''}"
        cases = VARLEN_BATCHES if varlen else SEQLENS
        check = lambda case, dtype=dtype, d=d, mask=mask, softcap=softcap: _check_feature_case(
            getattr(torch, dtype), d, mask, softcap, case
        )
        if not _run_configuration(name, cases, check, str, 44, state, results):
            break


def child_check(variants: list[str], state: str) -> None:
    """Checks the variants, saving the results after each configuration (a time-out keeps what ran)."""
    from flashtron import launch

    launch.set_output_poisoning(True)
    results = {}
    for variant, dtype, d, mask in ((v, *c) for v in variants for c in _cases(v)):
        name = f"{variant} {str(dtype)[6:]} d{d} {mask}"
        check = lambda case, dtype=dtype, d=d, mask=mask, variant=variant: _check_case(dtype, d, mask, variant, *case)
        if not _run_configuration(name, SEQLENS, check, _seqlens_label, 26, state, results):
            break


def _run_configuration(name: str, cases: list, check, label, width: int, state: str, results: dict) -> bool:
    """Runs check(case) for every case of one configuration, records passes and failures under `name` in
    `results` (saved to `state` at once, so a time-out keeps what ran); label(case) names a case. Returns
    False when the CUDA context is broken and the part must stop."""
    fails, passed, t0 = [], 0, time.time()
    for case in cases:
        try:
            check(case)
            passed += 1
        except Exception as exc:  # one bad case must not stop the rest
            fails.append(f"{label(case)}: {_short(exc)}")
            if len(fails) <= 3:  # the first few say enough; the JSON keeps them all
                print(f"  FAIL {name} {label(case)}: {_short(exc)[:160]}", flush=True)
            if type(exc).__name__ in ("CompilationError", "OutOfResources") or "CUDA error" in str(exc):
                break  # every case of this configuration would fail the same way (or the context is gone)
    print(f"{name:{width}} {passed}/{len(cases)} passed ({time.time() - t0:.1f}s)", flush=True)
    results[name] = dict(passed=passed, total=len(cases), fails=fails)
    _save(state, results)
    if any("CUDA error" in f or "illegal" in f for f in fails):
        print("  CUDA context is broken; stopping this part", flush=True)
        return False
    return True


def _seqlens_label(case) -> str:
    return f"sq={case[0]} sk={case[1]}"


def _save(path: str, result: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def _check_api() -> dict:
    """Through flash_attn_func with FLASHTRON_BACKEND=gluon: forward on the Gluon kernel (asserted), the
    backward on the Triton kernels, against the reference (tests/attention_cases.py's checker)."""
    import torch

    from attention_cases import check_attention
    from flashtron import launch_hopper

    os.environ["FLASHTRON_BACKEND"] = "gluon"
    calls = []
    original = launch_hopper.attention_forward
    launch_hopper.attention_forward = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    cases = [
        dict(batch=2, seqlen_q=300, seqlen_k=300, nheads=8, nheads_k=2, d=128, dv=128, dtype=torch.bfloat16),
        dict(batch=1, seqlen_q=129, seqlen_k=1000, nheads=4, nheads_k=4, d=64, dv=64, dtype=torch.float16,
             causal=True, layouts=("bhsd", "contiguous", "bhsd")),
        dict(batch=2, seqlen_q=1000, seqlen_k=127, nheads=4, nheads_k=1, d=128, dv=128, dtype=torch.bfloat16,
             causal=True),
        dict(batch=1, seqlen_q=513, seqlen_k=513, nheads=2, nheads_k=2, d=64, dv=64, dtype=torch.bfloat16,
             window=(100, 0)),
    ]  # fmt: skip
    results = {}
    for i, case in enumerate(cases):
        name = f"api fwd+bwd #{i}"
        before = len(calls)
        try:
            check_attention(device="cuda", **case)
            assert len(calls) > before, "the call did not take the Gluon forward"
            results[name] = dict(passed=1, total=1, fails=[])
            print(f"{name:26} passed", flush=True)
        except Exception as exc:
            results[name] = dict(passed=0, total=1, fails=[_short(exc)])
            print(f"{name:26} FAIL {_short(exc)}", flush=True)
    launch_hopper.attention_forward = original
    os.environ.pop("FLASHTRON_BACKEND")
    return results


def _time_cell(d: int, causal: bool, s: int, variants: list[str], window_left: int = -1) -> dict:
    """TFLOP/s of each variant, the Triton forward and SDPA's cuDNN and flash at one cell; window_left >= 0 (with
    causal): the sliding window (window_left, 0), flops over the pairs it keeps, no SDPA peer (none takes one)."""
    import torch
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashtron import launch
    from flashtron.options import AttnOptions

    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    opts = AttnOptions(softmax_scale=d**-0.5, window_left=window_left, window_right=0 if causal else -1)
    fns = {}
    for name in variants:
        if _tile(d, name) is not None:  # d64-only tiles have no d128 cell
            fns[f"gluon-{name}"] = lambda name=name: _forward(q, k, v, opts, name)
    fns["triton"] = lambda: launch.attention_forward(q, k, v, opts)  # FLASHTRON_BACKEND=triton in this process
    peers = (("cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION))
    for label, backend in peers if window_left < 0 else ():

        def sdpa(backend=backend):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

        fns[label] = sdpa
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    if window_left >= 0:  # query i keeps min(i + 1, window_left + 1) keys
        w = min(window_left, s - 1)
        flops = 4 * b * h * d * ((w + 1) * s - w * (w + 1) // 2)
    row = dict(d=d, causal=causal, seqlen=s, window=window_left)
    for label, fn in fns.items():
        try:
            row[label] = flops / triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e9
        except Exception as exc:
            row[label] = None
            print(f"  time {label} d{d} causal={causal} s={s}: {_short(exc)}", flush=True)
    return row


def child_time(variants: list[str], state: str) -> None:
    os.environ["FLASHTRON_BACKEND"] = "triton"
    rows = []
    head_dims = (128, 64) + ((256,) if any(_tile(256, v) for v in variants) else ())
    for s in TIME_SEQLENS:
        for d in head_dims:
            for causal in (False, True):
                try:
                    rows.append(_time_cell(d, causal, s, variants))
                except Exception as exc:  # e.g. out of memory: the other cells still run
                    print(f"  time d{d} causal={causal} s={s}: {_short(exc)}", flush=True)
                    continue
                print("  " + " ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in rows[-1].items()), flush=True)  # fmt: skip
                _save(state, dict(rows=rows))
    # the sliding window (1024, 0) at 16k, whose time over the causal cell's is one of the targets (PERF.md)
    for d in (128, 64):
        try:
            rows.append(_time_cell(d, True, 16384, variants, window_left=WINDOW_LEFT))
        except Exception as exc:
            print(f"  time d{d} window s=16384: {_short(exc)}", flush=True)
            continue
        print("  " + " ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in rows[-1].items()), flush=True)  # fmt: skip
        _save(state, dict(rows=rows))


# --time-features: the forward features' speed (launch_hopper.GLUON_GATED_FEATURES), Gluon against Triton.
# (softcap, batch, head dim, causal): batch a dense seqlen (batch * seqlen = 16384, as TIME_SEQLENS) or a
# TIME_VARLEN_BATCHES name; softcap+varlen once (mixed, causal: a packed training batch)
FEATURE_SOFTCAP = 30.0
TIME_VARLEN_BATCHES = {
    "packed": [4096] * 4,  # equal lengths: the dense 4k cell's work, packed
    "mixed": [4096, 1000, 17, 2900, 8192, 179],  # 16384 tokens, short and unaligned sequences among long ones
}
FEATURE_TIME_CELLS = (
    [(FEATURE_SOFTCAP, s, d, c) for s in TIME_SEQLENS for d in (128, 64) for c in (False, True)]
    + [(0.0, b, d, c) for b in TIME_VARLEN_BATCHES for d in (128, 64) for c in (False, True)]
    + [(FEATURE_SOFTCAP, "mixed", d, True) for d in (128, 64)]
)
# A feature leaves GLUON_GATED_FEATURES at a head dim when every one of its cells there is at least 1.0x Triton,
# or when none is below FEATURE_FLOOR and the geometric mean of those cells is at least FEATURE_CLEARLY_FASTER
FEATURE_FLOOR, FEATURE_CLEARLY_FASTER = 0.97, 1.05


def _feature_name(softcap: float, batch) -> str:
    """The cell's GLUON_GATED_FEATURES names, "+"-joined."""
    return "+".join(n for n, on in (("softcap", softcap > 0), ("varlen", isinstance(batch, str))) if on)


def _tile_name(d: int, tile) -> str:
    from flashtron import launch_hopper

    if tile == launch_hopper.HOPPER_TILES[d]:
        return "pp"
    return next((n for n, tiles in launch_hopper.CANDIDATE_TILES.items() if tiles.get(d) == tile), str(tile))


def _time_feature_cell(softcap: float, batch, d: int, causal: bool, persist: bool = False) -> dict:
    """TFLOP/s of one --time-features cell, bf16, nheads = 2048 / d: "gluon", the Gluon forward on the tile that
    covers(..., backend="gluon") sends the call to (launch_hopper.dispatched_tile), and "triton", the Triton
    forward (launch.attention_forward under FLASHTRON_BACKEND=triton), same tensors and options; with persist
    instead "gluon-persist", the dense call on the persistent grid (not dispatched with softcap). Dense (batch
    a seqlen s): q, k, v (16384 // s, s, nheads, d); varlen (a TIME_VARLEN_BATCHES name): the sequences packed,
    q, k, v (16384, nheads, d), seqlen_q = seqlen_k in each, FLOPs summed over the sequences. "<label>-diff":
    max |out - Triton's out|, a sanity check (check-features is the correctness check)."""
    import torch
    import triton

    from flashtron import launch, launch_hopper
    from flashtron.options import AttnOptions

    h = 2048 // d
    opts = AttnOptions(softmax_scale=d**-0.5, window_right=0 if causal else -1, softcap=softcap)
    varlen = isinstance(batch, str)
    if varlen:
        lengths = TIME_VARLEN_BATCHES[batch]
        shape, seqlen, pairs = (sum(lengths), h, d), max(lengths), sum(n * n for n in lengths)
        cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
        extra = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=seqlen)
        triton_extra = dict(extra, max_seqlen_k=seqlen)
    else:
        shape, seqlen, pairs = (16384 // batch, batch, h, d), batch, 16384 * batch
        extra = triton_extra = {}
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert launch_hopper.covers(q, k, v, opts, varlen=varlen, backend="gluon"), "covers() refuses this cell"
    if persist:
        tile, label = launch_hopper.CANDIDATE_TILES["persist"][d], "gluon-persist"
    else:
        tile, label = launch_hopper.dispatched_tile(d, seqlen, opts, varlen=varlen), "gluon"
    fns = {label: lambda: launch_hopper.attention_forward(q, k, v, opts, tile, **extra)[0]}
    triton_fn = lambda: launch.attention_forward(q, k, v, opts, **triton_extra)[0]  # noqa: E731
    if not persist:
        fns["triton"] = triton_fn
    flops = 4 * h * d * pairs / (2 if causal else 1)
    row = dict(feature=_feature_name(softcap, batch), batch="dense" if not varlen else batch, seqlen=seqlen, d=d,
               causal=causal)  # fmt: skip
    row["persist-tile" if persist else "tile"] = _tile_name(d, tile)
    out_triton = triton_fn()
    for name, fn in fns.items():
        try:
            if name != "triton":
                row[f"{name}-diff"] = (fn().float() - out_triton.float()).abs().max().item()
            row[name] = flops / triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e9
        except Exception as exc:
            row[name] = None
            print(f"  time-features {name} {row['feature']} {row['batch']} d{d} causal={causal}: {_short(exc)}",
                  flush=True)  # fmt: skip
    return row


def _feature_line(row: dict) -> str:
    return "  " + " ".join(f"{k}={v:.3g}" if k.endswith("-diff") else f"{k}={v:.0f}" if isinstance(v, float)
                           else f"{k}={v}" for k, v in row.items())  # fmt: skip


def child_time_features(state: str) -> None:
    """Times FEATURE_TIME_CELLS, saving the rows after each cell (a time-out keeps those done); then, last (never
    run on a GPU, so a hang there loses nothing else), the dense softcap cells on the persistent grid, which
    dispatched_tile does not give softcap (its d128 kernel spills 8 bytes): would it be faster?"""
    os.environ["FLASHTRON_BACKEND"] = "triton"  # launch.attention_forward is then the Triton forward
    rows = []
    for softcap, batch, d, causal in FEATURE_TIME_CELLS:
        try:
            rows.append(_time_feature_cell(softcap, batch, d, causal))
        except Exception as exc:  # e.g. out of memory: the other cells still run
            print(f"  time-features {_feature_name(softcap, batch)} {batch} d{d} causal={causal}: {_short(exc)}",
                  flush=True)  # fmt: skip
            continue
        print(_feature_line(rows[-1]), flush=True)
        _save(state, dict(rows=rows))
    for row in rows:
        if row["batch"] == "dense" and row["tile"] != "persist":
            try:
                row.update(_time_feature_cell(FEATURE_SOFTCAP, row["seqlen"], row["d"], row["causal"], persist=True))
            except Exception as exc:
                print(f"  time-features gluon-persist d{row['d']} causal={row['causal']} s={row['seqlen']}: "
                      f"{_short(exc)}", flush=True)  # fmt: skip
                continue
            keys = ("feature", "seqlen", "d", "causal", "persist-tile", "gluon-persist-diff", "gluon-persist", "triton")
            print(_feature_line({k: row.get(k) for k in keys}), flush=True)
            _save(state, dict(rows=rows))


def _feature_verdicts(rows: list[dict]) -> dict:
    """Per feature of FEATURE_TIME_CELLS: its cells' gluon/triton ratios, their minimum and geometric mean (also
    per head dim), and the head dims at which it leaves GLUON_GATED_FEATURES ("leaves": None while not every
    cell was timed)."""
    verdicts = {}
    for feature in dict.fromkeys(_feature_name(c[0], c[1]) for c in FEATURE_TIME_CELLS):
        expected = sum(_feature_name(c[0], c[1]) == feature for c in FEATURE_TIME_CELLS)
        mine = [r for r in rows if r["feature"] == feature and r.get("gluon") and r.get("triton")]
        v = dict(cells=len(mine), expected=expected, leaves=None)
        for key, part in [("all", mine)] + [(f"d{d}", [r for r in mine if r["d"] == d]) for d in (128, 64)]:
            ratios = [r["gluon"] / r["triton"] for r in part]
            if ratios:
                geomean = 2 ** (sum(math.log2(x) for x in ratios) / len(ratios))
                v[key] = dict(min=min(ratios), geomean=geomean)
        persist = [r["gluon-persist"] / r["triton"] for r in mine if r.get("gluon-persist")]
        if persist:  # informational: softcap on the persistent grid, which dispatched_tile does not give it
            v["persist"] = dict(min=min(persist), geomean=2 ** (sum(math.log2(x) for x in persist) / len(persist)))
        if len(mine) == expected:
            v["leaves"] = [
                d for d in (128, 64)
                if v[f"d{d}"]["min"] >= 1.0
                or (v[f"d{d}"]["min"] >= FEATURE_FLOOR and v[f"d{d}"]["geomean"] >= FEATURE_CLEARLY_FASTER)
            ]  # fmt: skip
        verdicts[feature] = v
    return verdicts


def _features_table(rows: list[dict]) -> str:
    persist = any(r.get("gluon-persist") for r in rows)
    head = f"{'feature':>14} {'batch':>6} {'seqlen':>6} {'d':>4} {'mask':>6} {'tile':>5} {'gluon':>6} {'triton':>6}"
    head += "  gluon/triton" + ("  persist /triton" if persist else "")
    out = [f"forward TFLOP/s of the gated features, bf16, softcap {FEATURE_SOFTCAP:g} where named, 16384 tokens, "
           "nheads=2048/d (median of do_bench; varlen: FLOPs summed over the sequences, seqlen = the longest)",
           head]  # fmt: skip
    for r in rows:
        cells = " ".join(f"{r[c]:6.0f}" if r.get(c) else f"{'-':>6}" for c in ("gluon", "triton"))
        ratio = f"{r['gluon'] / r['triton']:.2f}x" if r.get("gluon") and r.get("triton") else "-"
        line = f"{r['feature']:>14} {r['batch']:>6} {r['seqlen']:>6} {r['d']:>4} "
        line += f"{'causal' if r['causal'] else 'full':>6} {r['tile']:>5} {cells}  {ratio:>12}"
        if r.get("gluon-persist"):
            line += f"  {r['gluon-persist']:7.0f}"
            line += f" {r['gluon-persist'] / r['triton']:.2f}x" if r.get("triton") else ""
        out.append(line)
    return "\n".join(out)


def _announce_device(unit: str) -> str:
    """Prints the device a run measures on (or that there is none: every cell or case then fails, which only exercises
    the script) and returns the folder the run writes its JSON to: $OUT, or here."""
    import torch

    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()} {torch.cuda.get_device_capability()}", flush=True)
    else:
        print(f"no CUDA device: every {unit} will fail (this only exercises the script)", flush=True)
    return os.environ.get("OUT") or "."


def main_time_features(budget: float) -> None:
    """The --time-features run: the time-features part within the budget, its table, a verdict per feature;
    writes $OUT/gluon_check_features_time.json."""

    from flashtron import launch_hopper

    start = time.time()
    out_dir = _announce_device("cell")
    left = budget - (time.time() - start)
    timing = _run_child("time-features", [], left - 3, os.path.join(out_dir, ".time-features.json"))
    rows = (timing or {}).get("rows", [])
    verdicts = _feature_verdicts(rows)
    with open(os.path.join(out_dir, "gluon_check_features_time.json"), "w") as f:
        json.dump({"time": timing, "verdicts": verdicts}, f, indent=1)
    print("\n== summary (gated features: Gluon forward against Triton)")
    print(_features_table(rows) if rows else "no cell timed")
    gated = {name: sorted(dims) for name, dims in launch_hopper.GLUON_GATED_FEATURES.items()}
    print(f"launch_hopper.GLUON_GATED_FEATURES now (head dims kept on Triton): {gated}; a feature leaves at a head "
          f"dim when its every cell there is >= 1.00x, or none is below {FEATURE_FLOOR:.2f}x and their geometric "
          f"mean is >= {FEATURE_CLEARLY_FASTER:.2f}x")  # fmt: skip
    for feature, v in verdicts.items():
        stats = "; ".join(f"{key} min {v[key]['min']:.2f}x geomean {v[key]['geomean']:.2f}x"
                          for key in ("all", "d128", "d64", "persist") if key in v)  # fmt: skip
        if v["leaves"] is None:
            verdict = f"undecided ({v['cells']}/{v['expected']} cells timed)"
        elif "+" in feature:  # the calls that use both move only when both names leave
            verdict = f"fine for both to leave at {v['leaves']}" if v["leaves"] else "keep one of the two names gated"
        else:
            verdict = f"leaves GLUON_GATED_FEATURES at head dims {v['leaves']}" if v["leaves"] else "stays gated"
        print(f"{feature}: {verdict}" + (f" ({stats})" if stats else ""))
    print(f"total {time.time() - start:.0f}s")


# The backward's check: every head dim, both dtypes, each mask kind at least once (every one is a fresh
# compile of the Gluon dK/dV kernel, and of the Triton dQ kernel).
BWD_CONFIGS = [("bfloat16", 128, "none"), ("bfloat16", 128, "causal"), ("bfloat16", 128, "window"),
               ("bfloat16", 64, "none"), ("bfloat16", 64, "causal"), ("float16", 128, "causal"),
               ("float16", 64, "window")]  # fmt: skip
BWD_SEQLENS = [(1, 1), (17, 17), (128, 128), (129, 129), (1000, 1000), (2048, 2048), (17, 129), (129, 17),
               (127, 1000), (1000, 127), (1, 1000), (4096, 1000)]  # fmt: skip
BWD_CHECK_LIMIT = 120.0  # seconds the backward check may take (not measured yet: 7 configurations)
BWD_DQ_CHECK_LIMIT = 120.0  # seconds the Gluon dQ check may take (the same cases, one more compile each)
BWD_FUSED_CHECK_LIMIT = 120.0  # seconds the fused check may take (the same cases, one fused compile each)
# seconds the backward timing keeps (Triton backward compiles for 4 (d, mask) cells, the Gluon dQ's and the
# fused kernel's)
BWD_TIME_RESERVE = 150.0


def _check_bwd_case(dtype, d, mask, sq, sk, calls, dq_calls=None, fused=False):
    """Gluon dK/dV (+ Triton dQ, or with dq_calls the Gluon dQ) against the fp32 reference and
    PyTorch-in-dtype; two runs bitwise equal. fused: calls counts attention_backward_fused, and dq of each
    run is checked against the reference on its own (TMA reduce-add: no fixed summation order)."""
    import torch

    from flashtron import launch, launch_hopper
    from flashtron.options import AttnOptions
    from flashtron.reference import attention_ref
    from tolerance import assert_grads_close

    g = torch.Generator(device="cuda").manual_seed(sq * 7919 + sk * 31 + d + 1)
    q = torch.randn(BATCH, sq, NHEADS, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(BATCH, sk, NHEADS_K, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(BATCH, sk, NHEADS_K, d, device="cuda", generator=g).to(dtype)
    dout = torch.randn(BATCH, sq, NHEADS, d, device="cuda", generator=g).to(dtype)
    window = MASKS[mask]
    opts = AttnOptions(softmax_scale=d**-0.5, window_left=window[0], window_right=window[1])
    assert launch_hopper.covers_backward(q, k, v, dout, opts, varlen=False), "covers_backward() refuses this case"
    out, lse = launch_hopper.attention_forward(q, k, v, opts)
    finite = torch.isfinite(lse)
    dlse = torch.where(finite, torch.randn(lse.shape, device="cuda", generator=g), 0.0)
    before, before_dq = len(calls), len(dq_calls or ())
    dq, dk, dv, _ = launch.attention_backward(dout, q, k, v, out, lse, opts, dlse=dlse)
    dq2, dk2, dv2, _ = launch.attention_backward(dout, q, k, v, out, lse, opts, dlse=dlse)
    torch.cuda.synchronize()
    assert len(calls) == before + 2, "the backward did not take the Gluon dK/dV kernel"
    if dq_calls is not None:
        assert len(dq_calls) == before_dq + 2, "the backward did not take the Gluon dQ kernel"
    grads = []
    for upcast in (True, False):
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o, lse_ref, _ = attention_ref(*ins, causal=False, window_size=window, upcast=upcast, reorder_ops=not upcast)
        grads.append(torch.autograd.grad((o, lse_ref), ins, (dout.to(o.dtype), dlse.to(lse_ref.dtype))))
    assert_grads_close((dq, dk, dv), *grads)
    if fused:  # two runs agree within the rule; dK, dV are still accumulated in registers, in a fixed order
        assert_grads_close((dq2, dk2, dv2), *grads)
        assert torch.equal(dk, dk2) and torch.equal(dv, dv2), "two runs differ in dk or dv"
    else:
        assert torch.equal(dq, dq2) and torch.equal(dk, dk2) and torch.equal(dv, dv2), "two runs differ"


def child_check_bwd(state: str, gluon_dq: bool = False, fused: bool = False, candidate: str | None = None) -> None:
    """Checks BWD_CONFIGS, saving after each configuration (a time-out keeps what ran); with gluon_dq, with
    FLASHTRON_GLUON_DQ=1 (dQ on the Gluon dQ kernel); with fused, with FLASHTRON_GLUON_FUSED_DQ=1 (dQ added
    inside the Gluon dK/dV kernel); with candidate, the dK/dV kernel on launch_hopper.CANDIDATE_BWD_TILES'
    tiles of that name."""
    import torch

    from flashtron import launch, launch_hopper

    launch.set_output_poisoning(True)
    os.environ["FLASHTRON_BACKEND"] = "gluon"
    calls, dq_calls = [], None
    original = launch_hopper.attention_backward_dkdv
    launch_hopper.attention_backward_dkdv = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    if candidate:  # launch.attention_backward passes no tile: the candidate's goes in here
        tiles = launch_hopper.CANDIDATE_BWD_TILES[candidate]
        launch_hopper.attention_backward_dkdv = lambda q, *a, **kw: (
            calls.append(1) or original(q, *a, tile=tiles[q.shape[-1]], **kw)
        )
    if fused:  # calls counts the fused launcher instead: the plain dK/dV one does not run
        os.environ["FLASHTRON_GLUON_FUSED_DQ"] = "1"
        launch_hopper.attention_backward_dkdv = original
        original_fused = launch_hopper.attention_backward_fused
        launch_hopper.attention_backward_fused = lambda *a, **kw: calls.append(1) or original_fused(*a, **kw)
    if gluon_dq:
        os.environ["FLASHTRON_GLUON_DQ"] = "1"
        dq_calls = []
        original_dq = launch_hopper.attention_backward_dq
        launch_hopper.attention_backward_dq = lambda *a, **kw: dq_calls.append(1) or original_dq(*a, **kw)
    results = {}
    for dtype, d, mask in BWD_CONFIGS:
        part = "bwd-fused" if fused else "bwd-dq" if gluon_dq else f"bwd-{candidate}" if candidate else "bwd"
        name = f"{part} {dtype} d{d} {mask}"
        check = lambda case, dtype=dtype, d=d, mask=mask: _check_bwd_case(
            getattr(torch, dtype), d, mask, *case, calls, dq_calls, fused
        )
        if not _run_configuration(name, BWD_SEQLENS, check, _seqlens_label, 26, state, results):
            break


def _time_bwd_cell(d: int, causal: bool, s: int, with_dq: bool = False, with_fused: bool = False,
                   candidates: tuple = ()) -> dict:  # fmt: skip
    import torch
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashtron import launch, launch_hopper
    from flashtron.options import AttnOptions

    b, h = 16384 // s, 2048 // d
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    opts = AttnOptions(softmax_scale=d**-0.5, window_right=0 if causal else -1)
    out, lse = launch_hopper.attention_forward(q, k, v, opts)
    _, _, _, delta = launch.attention_backward(dout, q, k, v, out, lse, opts)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def flashtron_bwd(backend, gluon_dq=False, fused=False):
        os.environ["FLASHTRON_BACKEND"] = backend
        os.environ["FLASHTRON_GLUON_DQ"] = "1" if gluon_dq else "0"
        os.environ["FLASHTRON_GLUON_FUSED_DQ"] = "1" if fused else "0"
        return launch.attention_backward(dout, q, k, v, out, lse, opts)

    fns = {
        "gluon": lambda: flashtron_bwd("gluon"),
        "gluon-dkdv": lambda: launch_hopper.attention_backward_dkdv(q, k, v, dout, lse, delta, dk, dv, opts),
        "triton": lambda: flashtron_bwd("triton"),
    }
    if with_dq:  # only after every check-dq case passed
        fns["gluon+dq"] = lambda: flashtron_bwd("gluon", gluon_dq=True)
        fns["gluon-dq"] = lambda: launch_hopper.attention_backward_dq(q, k, v, dout, lse, delta, dq, opts)
    if with_fused:  # only after every check-fused case passed
        fns["gluon+fused"] = lambda: flashtron_bwd("gluon", fused=True)
        fns["gluon-fused"] = lambda: launch_hopper.attention_backward_fused(q, k, v, dout, lse, delta, dq, dk, dv, opts)
    for name in candidates:  # only those whose check-bwd passed
        tile = launch_hopper.CANDIDATE_BWD_TILES[name][d]
        fns[f"dkdv-{name}"] = lambda tile=tile: launch_hopper.attention_backward_dkdv(
            q, k, v, dout, lse, delta, dk, dv, opts, tile
        )
    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    dot = dout.transpose(1, 2)
    for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        except Exception as exc:
            print(f"  time {label} d{d} causal={causal} s={s}: {_short(exc)}", flush=True)
            continue
        fns[label] = lambda o=o: torch.autograd.grad(o, (qt, kt, vt), dot, retain_graph=True)
    flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
    row = dict(d=d, causal=causal, seqlen=s)
    for label, fn in fns.items():
        # dK/dV alone: S, dP, dV, dK (S counted once); dQ alone: S, dP, dQ
        share = 1.5 / 2.5 if label in ("gluon-dkdv", "gluon-dq") or label.startswith("dkdv-") else 1.0
        try:
            row[label] = share * flops / triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e9
        except Exception as exc:
            row[label] = None
            print(f"  time {label} d{d} causal={causal} s={s}: {_short(exc)}", flush=True)
    return row


def child_time_bwd(state: str, with_dq: bool = False, with_fused: bool = False, candidates: tuple = ()) -> None:
    rows = []
    for s in TIME_SEQLENS:
        for d in (128, 64):
            for causal in (False, True):
                try:
                    rows.append(_time_bwd_cell(d, causal, s, with_dq, with_fused, candidates))
                except Exception as exc:  # e.g. out of memory: the other cells still run
                    print(f"  time-bwd d{d} causal={causal} s={s}: {_short(exc)}", flush=True)
                    continue
                print("  " + " ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in rows[-1].items()), flush=True)  # fmt: skip
                _save(state, dict(rows=rows))


def _bwd_table(rows: list[dict]) -> str:
    cols = [
        "gluon",
        "gluon-dkdv",
        *sorted({c for r in rows for c in r if c.startswith("dkdv-")}),
        "gluon+dq",
        "gluon-dq",
        "gluon+fused",
        "gluon-fused",
        "triton",
        "cudnn",
        "sdpa-flash",
    ]
    cols = [c for c in cols if any(c in r for r in rows)]
    widths = {c: max(11, len(c)) for c in cols}  # a candidate's name may be longer
    head = f"{'d':>4} {'mask':>6} {'seqlen':>6} " + " ".join(f"{c:>{widths[c]}}" for c in cols)
    head += "  gluon: /triton /cudnn" + ("  gluon+dq: /gluon" if "gluon+dq" in cols else "")
    head += "  gluon+fused: /gluon /cudnn" if "gluon+fused" in cols else ""
    out = ["backward TFLOP/s, bf16, batch*seqlen=16384, nheads=2048/d (median of do_bench; gluon-dkdv, dkdv-*, "
           "gluon-dq: their shares)", head]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["d"], r["causal"], r["seqlen"])):
        cells = " ".join(f"{r[c]:{widths[c]}.0f}" if r.get(c) else f"{'-':>{widths[c]}}" for c in cols)
        ratio = ""
        if r.get("gluon") and r.get("triton") and r.get("cudnn"):
            ratio = f"  {r['gluon'] / r['triton']:.2f}x {r['gluon'] / r['cudnn']:.2f}x"
            if r.get("gluon+dq"):
                ratio += f"  {r['gluon+dq'] / r['gluon']:.2f}x"
            if r.get("gluon+fused"):
                ratio += f"  {r['gluon+fused'] / r['gluon']:.2f}x {r['gluon+fused'] / r['cudnn']:.2f}x"
        out.append(f"{r['d']:>4} {'causal' if r['causal'] else 'full':>6} {r['seqlen']:>6} {cells}{ratio}")
    return "\n".join(out)


def main_backward(budget: float, candidates: list[str]) -> None:
    """The --backward run: check-bwd, check-dq, check-fused, check-bwd per dK/dV candidate, then time-bwd if
    every check-bwd case passed (with the Gluon dQ columns if every check-dq case passed too, the fused ones if
    every check-fused case did, a candidate's if every case of its check did); writes $OUT/gluon_check_bwd.json."""

    start = time.time()
    out_dir = _announce_device("case")
    checks_end = start + budget - BWD_TIME_RESERVE  # the checks may use the budget less what the timing keeps
    limit = min(BWD_CHECK_LIMIT, checks_end - time.time())
    check = _run_child("check-bwd", [], limit, os.path.join(out_dir, ".check-bwd.json")) or {}
    ok = _all_passed(check)
    check_dq = None
    limit = min(BWD_DQ_CHECK_LIMIT, checks_end - time.time())
    if limit < 15:
        print(f"== check-dq: skipped, {limit:.0f}s left for the checks", flush=True)
    else:
        check_dq = _run_child("check-dq", [], limit, os.path.join(out_dir, ".check-dq.json")) or {}
    dq_ok = check_dq is not None and _all_passed(check_dq)
    check_fused = None
    limit = min(BWD_FUSED_CHECK_LIMIT, checks_end - time.time())
    if limit < 15:
        print(f"== check-fused: skipped, {limit:.0f}s left for the checks", flush=True)
    else:
        check_fused = _run_child("check-fused", [], limit, os.path.join(out_dir, ".check-fused.json")) or {}
    fused_ok = check_fused is not None and _all_passed(check_fused)
    check_candidates = {}
    for name in candidates:
        limit = min(BWD_CHECK_LIMIT, checks_end - time.time())
        if limit < 15:
            print(f"== check-bwd {name}: skipped, {limit:.0f}s left for the checks", flush=True)
            continue
        state = os.path.join(out_dir, f".check-bwd-{name}.json")
        check_candidates[name] = _run_child("check-bwd", ["--bwd-candidates", name], limit, state) or {}
    candidates_ok = [n for n, res in check_candidates.items() if _all_passed(res)]
    timing = None
    if ok:
        left = budget - (time.time() - start)
        extra = (["--with-dq"] if dq_ok else []) + (["--with-fused"] if fused_ok else [])
        extra += ["--bwd-candidates", ",".join(candidates_ok)] if candidates_ok else []
        timing = _run_child("time-bwd", extra, left - 3, os.path.join(out_dir, ".time-bwd.json"))
    with open(os.path.join(out_dir, "gluon_check_bwd.json"), "w") as f:
        json.dump({"check": check, "check_dq": check_dq, "check_fused": check_fused,
                   "check_candidates": check_candidates, "time": timing}, f, indent=1)  # fmt: skip
    print("\n== summary (backward)")
    parts = [("check-bwd", check), ("check-dq", check_dq), ("check-fused", check_fused)]
    parts += [(f"check-bwd {name}", check_candidates.get(name)) for name in candidates]
    for part, res in parts:
        if res is None:
            print(f"{part}: not run")
            continue
        bad = [n for n, r in res.items() if r["passed"] != r["total"]]
        print(f"{part}: {sum(r['passed'] for r in res.values())}/{sum(r['total'] for r in res.values())} "
              f"cases passed, {len(res)}/{len(BWD_CONFIGS)} configurations ran"
              + (f"; failing: {', '.join(bad)}" if bad else ""))  # fmt: skip
    if not ok:
        print("not timed: a check-bwd configuration failed or did not run")
    elif not dq_ok:
        print("timed without the Gluon dQ columns: a check-dq configuration failed or did not run")
    if ok and not fused_ok:
        print("timed without the fused columns: a check-fused configuration failed or did not run")
    untimed = [n for n in candidates if n not in candidates_ok]
    if ok and untimed:
        print(f"not timed (a check-bwd configuration failed or did not run): {', '.join(untimed)}")
    if timing and timing.get("rows"):
        print(_bwd_table(timing["rows"]))
    print(f"total {time.time() - start:.0f}s")


def _bwd_candidate_names() -> set[str]:
    from flashtron import launch_hopper

    return set(launch_hopper.CANDIDATE_BWD_TILES)


def _all_passed(result: dict) -> bool:
    """Every BWD_CONFIGS configuration ran and all its cases passed."""
    return len(result) == len(BWD_CONFIGS) and all(r["passed"] == r["total"] for r in result.values())


def _run_child(part: str, extra: list[str], timeout: float, state: str) -> dict | None:
    """Runs one part; returns what its state file holds, also after a time-out (what it finished)."""
    t0 = time.time()
    if os.path.exists(state):
        os.remove(state)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", part, "--state", state, *extra]
    try:
        rc = subprocess.run(cmd, timeout=max(timeout, 5)).returncode
        print(f"== {part} {' '.join(extra)}: exit {rc} after {time.time() - t0:.0f}s", flush=True)
    except subprocess.TimeoutExpired:
        print(f"== {part} {' '.join(extra)}: TIMED OUT after {timeout:.0f}s (a hang, or compiles too slow); "
              "keeping what it saved", flush=True)  # fmt: skip
    try:
        with open(state) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _table(rows: list[dict], variants: list[str]) -> str:
    cols = [f"gluon-{v}" for v in variants] + ["triton", "cudnn", "sdpa-flash"]
    cols = [c for c in cols if any(c in r for r in rows)]
    width = {c: max(7, len(c)) for c in cols}
    head = f"{'d':>4} {'mask':>6} {'seqlen':>6} " + " ".join(f"{c:>{width[c]}}" for c in cols)
    out = ["TFLOP/s, bf16, batch*seqlen=16384, nheads=2048/d (median of do_bench)",
           head + "  best gluon: /triton /cudnn /ws-ov"]  # fmt: skip
    windowed = lambda r: r.get("window", -1) >= 0  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["d"], r["causal"], windowed(r), r["seqlen"])):
        cells = " ".join(f"{r[c]:{width[c]}.0f}" if r.get(c) else f"{'-':>{width[c]}}" for c in cols)
        best, name = max(((r.get(f"gluon-{v}") or 0), v) for v in variants)
        ratio = ""
        if best and r.get("triton") and r.get("cudnn"):
            ratio = f"  {name} {best / r['triton']:.2f}x {best / r['cudnn']:.2f}x"
            if r.get("gluon-ws-ov"):
                ratio += f" {best / r['gluon-ws-ov']:.2f}x"
        mask = "window" if windowed(r) else "causal" if r["causal"] else "full"
        out.append(f"{r['d']:>4} {mask:>6} {r['seqlen']:>6} {cells}{ratio}")
    # the window target: the window's time over the causal cell's at the same seqlen (time, not TFLOP/s)
    for r in rows:
        causal = [c for c in rows if c["d"] == r["d"] and c["seqlen"] == r["seqlen"] and c["causal"]
                  and not windowed(c)]  # fmt: skip
        if not windowed(r) or not causal:
            continue
        w, s = min(r["window"], r["seqlen"] - 1), r["seqlen"]
        work = ((w + 1) * s - w * (w + 1) // 2) / (s * s / 2)  # the window's flops over the causal cell's
        ratios = [f"{c.removeprefix('gluon-')} {work * causal[0][c] / r[c]:.3f}" for c in cols
                  if r.get(c) and causal[0].get(c)]  # fmt: skip
        out.append(f"d{r['d']} window ({r['window']}, 0) / causal time at {s}: " + ", ".join(ratios))
    return "\n".join(out)


def _variant_passed(result: dict | None, variant: str) -> bool:
    """Every case of the variant ran and passed (a variant cut off by a time-out counts as failed)."""
    mine = {n: r for n, r in (result or {}).items() if n.split(" ")[0] == variant}
    return len(mine) == len(list(_cases(variant))) and all(r["passed"] == r["total"] for r in mine.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--state")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--budget", type=float, default=220.0, help="seconds for the whole run")
    ap.add_argument("--api", action="store_true", help="also the public-API check, if 30 s are left")
    ap.add_argument("--backward", action="store_true", help="check and time the Gluon backward instead")
    ap.add_argument("--with-dq", action="store_true", help="time-bwd child: also time the Gluon dQ")
    ap.add_argument("--with-fused", action="store_true", help="time-bwd child: also time the fused dQ")
    ap.add_argument("--bwd-candidates", default="", help="--backward: also check and time these dK/dV tiles (of "
                    "launch_hopper.CANDIDATE_BWD_TILES)")  # fmt: skip
    ap.add_argument("--no-features", action="store_true", help="skip the softcap / varlen check")
    ap.add_argument("--time-features", action="store_true", help="time softcap / varlen (Gluon vs Triton) instead")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}")
    bwd_candidates = [c for c in args.bwd_candidates.split(",") if c]
    unknown = [c for c in bwd_candidates if c not in _bwd_candidate_names()]
    if unknown:
        ap.error(f"unknown dK/dV candidates {unknown}")
    if args.child == "time":
        child_time(variants, args.state)
    elif args.child == "check-api":
        _save(args.state, _check_api())
    elif args.child == "check":
        child_check(variants, args.state)
    elif args.child == "check-features":
        child_check_features(args.state)
    elif args.child == "check-bwd":
        child_check_bwd(args.state, candidate=bwd_candidates[0] if bwd_candidates else None)
    elif args.child == "check-dq":
        child_check_bwd(args.state, gluon_dq=True)
    elif args.child == "check-fused":
        child_check_bwd(args.state, fused=True)
    elif args.child == "time-bwd":
        child_time_bwd(args.state, args.with_dq, args.with_fused, tuple(bwd_candidates))
    elif args.child == "time-features":
        child_time_features(args.state)
    if args.child:
        return
    if args.backward:
        main_backward(args.budget, bwd_candidates)
        return
    if args.time_features:
        main_time_features(args.budget)
        return

    start = time.time()
    out_dir = _announce_device("case")
    report = {"check": {}}
    # the checks may use the budget less what the timing (and the API check) keep
    checks_end = start + args.budget - TIME_RESERVE - (API_RESERVE if args.api else 0)
    for v in variants:
        limit = min(VARIANTS[v][2], checks_end - time.time())
        if limit < 15:
            print(f"== check {v}: skipped, {limit:.0f}s left for the checks", flush=True)
            continue
        res = _run_child("check", ["--variants", v], limit, os.path.join(out_dir, f".check-{v}.json"))
        report["check"].update(res or {})
    report["features"] = None
    if not args.no_features:
        limit = min(FEATURE_CHECK_LIMIT, checks_end - time.time())
        if limit < 15:
            print(f"== check-features: skipped, {limit:.0f}s left for the checks", flush=True)
        else:
            path = os.path.join(out_dir, ".check-features.json")
            report["features"] = _run_child("check-features", [], limit, path) or {}
    # a variant is timed only if every case passed (a hang while timing would lose the table)
    ok = [v for v in variants if _variant_passed(report["check"], v)]
    left = args.budget - (time.time() - start) - (API_RESERVE if args.api else 0)
    report["time"] = None
    if ok:
        report["time"] = _run_child("time", ["--variants", ",".join(ok)], left - 3, os.path.join(out_dir, ".time.json"))
    left = args.budget - (time.time() - start)
    if args.api and left > API_RESERVE - 5:
        report["check-api"] = _run_child("check-api", [], left - 3, os.path.join(out_dir, ".check-api.json"))
    with open(os.path.join(out_dir, "gluon_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("\n== summary")
    for v in variants:
        mine = {n: r for n, r in report["check"].items() if n.split(" ")[0] == v}
        bad = [n for n, r in mine.items() if r["passed"] != r["total"]]
        total = sum(r["total"] for r in mine.values())
        passed = sum(r["passed"] for r in mine.values())
        print(f"check {v}: {passed}/{total} cases passed, {len(mine)}/{len(list(_cases(v)))} configurations ran"
              + (f"; failing: {', '.join(bad)}" if bad else ""))  # fmt: skip
    res = report["features"]
    if res is None:
        print("check-features (softcap, varlen; gated): not run")
    else:
        bad = [n for n, r in res.items() if r["passed"] != r["total"]]
        ran_all = len(res) == len(FEATURE_CONFIGS) and not bad
        print(f"check-features (softcap, varlen; gated): {sum(r['passed'] for r in res.values())}/"
              f"{sum(r['total'] for r in res.values())} cases passed, {len(res)}/{len(FEATURE_CONFIGS)} "
              f"configurations ran" + (f"; failing: {', '.join(bad)}" if bad else "")
              + ("; all passed (--time-features decides GLUON_GATED_FEATURES)" if ran_all else ""))  # fmt: skip
    if report.get("check-api"):
        res = report["check-api"]
        print(f"check-api: {sum(r['passed'] for r in res.values())}/{len(res)} passed")
    print(f"variants with every case passed (timed): {ok or 'none'}")
    if report["time"] and report["time"].get("rows"):
        print(_table(report["time"]["rows"], ok))
    print(f"total {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
