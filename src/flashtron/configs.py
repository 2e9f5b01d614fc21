"""Tile configurations, as data, chosen in one place.

Each entry is (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed by architecture family and head-dim
bucket. The comment on each table says where its numbers come from; entries not yet measured say so.
Under the interpreter one small config is used, with BLOCK_M != BLOCK_N so tests exercise the block
range arithmetic on both axes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Interpreter: tiny blocks keep the numpy emulation fast; 32 x 16 makes the two axes differ.
INTERPRET_FWD = TileConfig(32, 16, 1, 1)
INTERPRET_BWD_DKDV = TileConfig(16, 32, 1, 1)
INTERPRET_BWD_DQ = TileConfig(32, 16, 1, 1)

# Hopper (sm90). Head-dim bucket -> config. Measured on one H200 with scripts/tune.py, 2026-12-01
# (bf16, the bench's GPU grid sizes, TFLOP/s at seqlen 512 / 4096, full and causal; docs/perf-notes.md has the
# whole sweep). d64 (128, 64, 4, 3) and d128 (128, 64, 8, 3) stayed best or tied; d256 (64, 32, 4, 2)
# gave 226/381 full and 102/334 causal against 199/307 and 81/263 for the old (64, 64, 4, 2).
HOPPER_FWD = {
    64: TileConfig(128, 64, 4, 3),
    128: TileConfig(128, 64, 8, 3),
    256: TileConfig(64, 32, 4, 2),
    512: TileConfig(32, 32, 4, 1),
}
# Windows with a left bound: a query block of BLOCK_M rows visits about window + BLOCK_M keys, so
# smaller query blocks waste less. Same H200 sweep, window (1024, 0) at seqlen 16384, d128: window /
# causal time 0.155 with (64, 64, 4, 3) against 0.182 with (128, 64, 8, 3). Other head dims use
# HOPPER_FWD until measured.
HOPPER_FWD_WINDOW = {128: TileConfig(64, 64, 4, 3)}
# dK/dV and dQ of the two-kernel backward, same sweep (TFLOP/s of the whole backward at seqlen 8192,
# full / causal, each kernel swept with the other at its old tile). The dK/dV kernel loops over
# (query block, head) pairs in one flat loop since 2026-12-01; with the head loop nested outside the
# block loops every tile spilled (scripts/aot_report.py). d64 (64, 64, 4, 2): 343/311 (next best
# (32, 64, 4, 2) 331/306; (32, 128, 8, 2), the one without spills, only 246/247). d128 (32, 128, 8, 3):
# 357/335 ((32, 64, 4, 2) 350/333). d256 (64, 64, 8, 2): 183/196 against 64/59 for (16, 64, 4, 2).
# dQ: d64 (64, 64, 4, 3) +3% over (128, 32, 4, 3); d128 (64, 32, 4, 3) stayed best; d256 (128, 32, 8, 2)
# has no spills where (64, 16, 4, 2) spills 80 bytes (the d256 sweep was dominated by the slow dK/dV).
# 2026-11-22: (32, 128, 4, 3) at d64 and (16, 64, 4, 2) at d128 gave wrong dK on an H100 while
# tl.trans() of a dot's result fed another dot; the kernel no longer does that, and every tile of the
# 2026-12-01 sweep passed the fp32-reference check.
HOPPER_BWD_DKDV = {
    64: TileConfig(64, 64, 4, 2),
    128: TileConfig(32, 128, 8, 3),
    256: TileConfig(64, 64, 8, 2),
    512: TileConfig(16, 32, 4, 1),
}
# Causal calls (bottom-right, no left bound), where they differ. Same sweep, whole backward at seqlen
# 1024 / 8192, d128: (32, 64, 4, 2) gave 234/333 causal against 221/333 for (32, 128, 8, 3), which
# stays the full-attention tile (296/361 against 284/349).
HOPPER_BWD_DKDV_CAUSAL = {128: TileConfig(32, 64, 4, 2)}
HOPPER_BWD_DQ = {
    64: TileConfig(64, 64, 4, 3),
    128: TileConfig(64, 32, 4, 3),
    256: TileConfig(128, 32, 8, 2),
    512: TileConfig(32, 16, 4, 1),
}

# Everything else (Ampere, Ada, AMD, unknown), and fp32 inputs everywhere: conservative tiles that fit
# 100 KB of shared memory in 16-bit types, so about 200 KB in fp32. Hopper's 16-bit tiles do not fit
# in fp32: (64, 64, 8, 2) dK/dV at d256 needs 272 KB (scripts/aot_report.py), and the d160 fp32 GPU
# test failed with it (2026-12-01).
SAFE_FWD = {
    64: TileConfig(64, 64, 4, 2),
    128: TileConfig(64, 64, 4, 2),
    256: TileConfig(64, 32, 4, 1),
    512: TileConfig(32, 16, 4, 1),
}
SAFE_BWD_DKDV = {
    64: TileConfig(32, 64, 4, 2),
    128: TileConfig(32, 64, 4, 2),
    256: TileConfig(16, 32, 4, 1),
    512: TileConfig(16, 16, 4, 1),
}
SAFE_BWD_DQ = {
    64: TileConfig(64, 32, 4, 2),
    128: TileConfig(64, 32, 4, 2),
    256: TileConfig(32, 16, 4, 1),
    512: TileConfig(16, 16, 4, 1),
}

# fp32 with IEEE dots (the default for fp32: TF32 off): Triton builds these dots from FMAs, unrolled per
# thread, so compile time and spills grow with BLOCK_M * BLOCK_N * head_dim / threads. sm_90 compiles on
# a CPU (scripts/aot_report.py's compile, 2026-12-02), fwd + dK/dV + dQ, causal: d64 SAFE tiles 5.9 +
# 32.4 + 10.8 s with 1.2-14 KB of spills, these 1.9 + 3.1 + 3.3 s with none; d128 about 50 s against
# 2.2 + 5.7 + 3.5 s. FMA-bound either way, so the small tiles cost little speed (fp32 has no speed goal).
IEEE_FP32_FWD = {
    64: TileConfig(32, 32, 4, 2),
    128: TileConfig(16, 32, 4, 2),
    256: TileConfig(16, 16, 4, 1),
    512: TileConfig(16, 16, 4, 1),
}
IEEE_FP32_BWD_DKDV = {
    64: TileConfig(16, 32, 4, 2),
    128: TileConfig(16, 32, 4, 2),
    256: TileConfig(16, 16, 4, 1),
    512: TileConfig(16, 16, 4, 1),
}
IEEE_FP32_BWD_DQ = {
    64: TileConfig(32, 32, 4, 2),
    128: TileConfig(16, 32, 4, 2),
    256: TileConfig(16, 16, 4, 1),
    512: TileConfig(16, 16, 4, 1),
}

# Candidates for FLASHTRON_AUTOTUNE (autotune.py) and the tiles scripts/tune.py sweeps, by (kernel,
# head-dim bucket), Hopper and 16-bit inputs: the tiles in use above plus those picked from
# scripts/aot_report.py's sm_90 report (few or no spilled bytes). Every one passed tune.py's
# fp32-reference check on an H200 (2026-12-01).
_T = TileConfig
HOPPER_CANDIDATES = {
    ("fwd", 64): [_T(128, 64, 4, 3), _T(128, 128, 8, 3), _T(128, 64, 8, 3), _T(64, 64, 4, 3), _T(128, 32, 4, 3)],
    ("fwd", 128): [
        _T(128, 64, 8, 3), _T(128, 128, 8, 3), _T(64, 64, 4, 3), _T(128, 32, 8, 3), _T(128, 64, 8, 4), _T(128, 64, 8, 2)
    ],
    ("fwd", 256): [_T(64, 32, 4, 2), _T(64, 64, 4, 2), _T(128, 32, 8, 2)],
    ("dkdv", 64): [
        _T(64, 64, 4, 2), _T(32, 128, 8, 2), _T(32, 64, 4, 2), _T(64, 64, 8, 2), _T(32, 128, 8, 3), _T(16, 128, 8, 2)
    ],
    ("dkdv", 128): [_T(32, 128, 8, 3), _T(32, 128, 8, 2), _T(32, 64, 4, 2), _T(16, 128, 8, 2), _T(64, 64, 8, 2)],
    ("dkdv", 256): [_T(64, 64, 8, 2), _T(16, 64, 4, 2), _T(32, 64, 8, 2)],
    ("dq", 64): [_T(64, 64, 4, 3), _T(128, 32, 4, 3), _T(128, 64, 8, 3), _T(64, 32, 4, 3)],
    ("dq", 128): [_T(64, 32, 4, 3), _T(128, 64, 8, 2), _T(128, 32, 8, 3), _T(64, 64, 8, 2)],
    ("dq", 256): [_T(128, 32, 8, 2), _T(64, 16, 4, 2), _T(64, 32, 4, 2)],
}  # fmt: skip


def interpreting(device: torch.device) -> bool:
    """A Triton launch on a CPU tensor runs in Triton's interpreter (env.uses_triton sent it there): the one
    test every launcher uses to pick its interpreter sizes."""
    return device.type != "cuda"


def dot_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Upcast bf16 dot operands to fp32: only in the interpreter, which computes bf16 dots wrongly
    (../shared/NOTES.md); the GPU keeps bf16 tensor-core dots."""
    return interpreting(device) and dtype == torch.bfloat16


def preprocess_block(device: torch.device) -> int:
    """Rows per program of the backward's delta = rowsum(dO * O) preprocess."""
    return 16 if interpreting(device) else 64


def append_block(device: torch.device) -> int:
    """New tokens per program of the KV-cache append."""
    return 4 if interpreting(device) else 16


def combine_blocks(device: torch.device, block_dv: int) -> tuple[int, int]:
    """(splits per step, rows per program) of the split combine. On the GPU up to 8 splits of a row per
    step (more loop), fixed rather than next_power_of_2(num_splits), so that a new split count (it
    follows batch and cache length) never compiles another combine kernel; ~2k fp32 values per program.
    The interpreter's are small so that small tests take several split steps and row blocks."""
    if interpreting(device):
        return 2, 4
    block_s = max(2, min(8, 2048 // block_dv))
    return block_s, max(2, min(16, 2048 // (block_s * block_dv)))


def head_dim_bucket(head_dim: int) -> int:
    for bucket in (64, 128, 256, 512):
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head dim {head_dim} is above the largest supported (512)")


@functools.cache
def _arch(device_index: int) -> str:
    if torch.version.hip is not None:
        return "amd"
    major, _ = torch.cuda.get_device_capability(device_index)
    return "hopper" if major == 9 else "other"


def is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and _arch(device.index or 0) == "hopper"


def _hopper_tiles(device: torch.device, dtype: torch.dtype) -> bool:
    """The HOPPER_* tables apply: a Hopper GPU and 16-bit inputs (fp32 takes the SAFE_* tiles)."""
    return is_hopper(device) and dtype != torch.float32


def _pick(
    device: torch.device, dtype: torch.dtype, head_dim: int, hopper: dict, safe: dict, ieee_fp32: dict,
    interpret: TileConfig, hopper_override: dict | None = None, precision: str = "ieee",
) -> TileConfig:  # fmt: skip
    """The tile for head_dim: the interpreter's on CPU, else the IEEE fp32 table (fp32 without TF32),
    Hopper's (a bucket of hopper_override first) or the SAFE table's."""
    if interpreting(device):
        return interpret
    bucket = head_dim_bucket(head_dim)
    if dtype == torch.float32 and precision == "ieee":
        return ieee_fp32[bucket]
    if not _hopper_tiles(device, dtype):
        return safe[bucket]
    return (hopper_override or {}).get(bucket, hopper[bucket])


def fwd_config(
    device: torch.device, dtype: torch.dtype, head_dim: int, left_window: bool = False, precision: str = "ieee"
) -> TileConfig:
    """Forward tile; `left_window`: the call has a left window bound (see HOPPER_FWD_WINDOW);
    `precision`: the fp32 dot precision ("ieee" or "tf32"; 16-bit inputs ignore it)."""
    window = HOPPER_FWD_WINDOW if left_window else None
    return _pick(device, dtype, head_dim, HOPPER_FWD, SAFE_FWD, IEEE_FP32_FWD, INTERPRET_FWD, window, precision)


def bwd_configs(
    device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool = False, precision: str = "ieee"
) -> tuple[TileConfig, TileConfig]:
    """(dK/dV kernel config, dQ kernel config); `causal`: plain bottom-right causal (HOPPER_BWD_DKDV_CAUSAL);
    `precision` as in fwd_config."""
    dkdv_causal = HOPPER_BWD_DKDV_CAUSAL if causal else None
    dkdv = (HOPPER_BWD_DKDV, SAFE_BWD_DKDV, IEEE_FP32_BWD_DKDV, INTERPRET_BWD_DKDV, dkdv_causal, precision)
    dq = (HOPPER_BWD_DQ, SAFE_BWD_DQ, IEEE_FP32_BWD_DQ, INTERPRET_BWD_DQ, None, precision)
    return _pick(device, dtype, head_dim, *dkdv), _pick(device, dtype, head_dim, *dq)


def tune_candidates(kind: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> list[TileConfig]:
    """The tiles FLASHTRON_AUTOTUNE may choose among for kernel `kind` ("fwd", "dkdv", "dq"); empty
    where only the table's tile applies (not Hopper, fp32, head dims past 256, the interpreter)."""
    if not _hopper_tiles(device, dtype):
        return []
    return list(HOPPER_CANDIDATES.get((kind, head_dim_bucket(head_dim)), []))


# ----------------------------------------------------------------------------------------------------
# Decode (flash_attn_with_kvcache): tiles as data, the SM count and the split heuristic
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    block_m: int  # largest tile of packed rows (seqlen_q * group); smaller problems take a power of 2 >= 16
    block_n: int
    num_warps: int
    num_stages: int
    min_blocks_per_split: int  # a split shorter than this costs more in combine than it gains

    def stages(self, paged: bool) -> int:
        """Pipeline stages to launch with; `paged`: a paged call on Hopper. Triton's pipeliner runs a
        paged loop's block-table load ahead of the K/V loads that depend on it, and gives those loads
        floor((s - 1) / 2) buffers at s stages where a dense loop gets s - 1: sm_90 compiles of
        (16, 128, 4 warps) take 74 KB of shared memory paged at 3 and 4 stages, 140 KB at 5 and 6,
        against 139 KB dense at 3 (scripts/aot_report.py decode, 2026-12-01). Paged calls therefore
        launch with 2 s - 1 stages: the dense loop's buffering and shared memory, so every tile that
        fits dense fits paged. Seen on sm_90 only; other archs keep s."""
        return 2 * self.num_stages - 1 if paged else self.num_stages


# Hopper and others, by head-dim bucket, 16-bit inputs. d128 measured on one H200, 2026-12-01
# (scripts/tune.py: decode b=8, 32/8 heads, bf16, CUDA-graph replays, 5 tiles x 7 split counts):
# BLOCK_N 128 with 4 warps and 3 stages was best at 1k, 8k and 32k keys: 21.9 us at 1k with one split
# (2 splits 24.4 us: the combine costs more than the split gains), 82.4 us at 8k and 261.6 us at 32k
# with 2 splits, against 23.2 / 83.2 / 272.2 us for the old (64, 64, 4, 3). min_blocks_per_split 8
# keeps 1k (8 blocks) in one split. The other buckets keep the tile's K/V stages near the same
# shared memory (not yet measured).
GPU_DECODE = {
    64: DecodeConfig(64, 64, 4, 3, 4),
    128: DecodeConfig(64, 128, 4, 3, 8),
    256: DecodeConfig(32, 32, 4, 3, 8),
    512: DecodeConfig(16, 16, 4, 2, 16),
}
# fp32 K/V tiles take twice the shared memory: (64, 128, 4, 3) would need ~420 KB.
GPU_DECODE_FP32 = {
    64: DecodeConfig(64, 64, 4, 2, 4),
    128: DecodeConfig(64, 64, 4, 2, 4),
    256: DecodeConfig(32, 32, 4, 2, 8),
    512: DecodeConfig(16, 16, 4, 2, 16),
}
# Interpreter: tiny blocks so that small tests stream several KV blocks and several splits.
INTERPRET_DECODE = DecodeConfig(16, 16, 1, 1, 1)
# Split counts whose waves are at least this fraction as full as the best count's are good enough;
# the smallest of them wins. Measured by a helper on an H100 80GB, 2026-11-22 (docs/perf-notes.md,
# "Decode"): with 64 (batch, kv head) tiles on 132 SMs, 2 splits (one program per SM) beat 3
# (unbalanced) by 10% and 8-24 splits by 15-40% (measured before the combine loaded all splits at
# once; to re-measure).
WAVE_EFFICIENCY = 0.85
MAX_SPLITS = 64
INTERPRET_SMS = 16  # a pretend SM count, so that num_splits=0 splits in interpreter tests too


def decode_config(device: torch.device, dtype: torch.dtype, head_dim: int) -> DecodeConfig:
    if interpreting(device):
        return INTERPRET_DECODE
    table = GPU_DECODE_FP32 if dtype == torch.float32 else GPU_DECODE
    for bucket in (64, 128, 256, 512):
        if head_dim <= bucket:
            return table[bucket]
    raise ValueError(f"head dim {head_dim} is above the largest supported (512)")


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if interpreting(device):
        return INTERPRET_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_splits(num_splits: int, tiles: int, kv_blocks: int, num_sms: int, min_blocks_per_split: int) -> int:
    """The split count: num_splits itself when > 0. For 0, FlashAttention-2's rule: among the counts
    that leave each split at least min_blocks_per_split KV blocks of the cache capacity (a static
    bound on the keys, never their actual count), the smallest whose last wave of tiles * splits
    programs over num_sms is nearly as full (WAVE_EFFICIENCY) as the best count's. No split when the
    tiles alone nearly fill the machine."""
    if num_splits > 0:
        return num_splits
    if tiles >= 0.8 * num_sms:
        return 1
    most = max(1, min(kv_blocks // min_blocks_per_split, MAX_SPLITS))

    def efficiency(splits: int) -> float:
        waves = tiles * splits / num_sms
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if efficiency(s) >= WAVE_EFFICIENCY * best)
