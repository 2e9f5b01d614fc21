"""Tile configurations, as data, chosen in one place.

Each entry is (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed by architecture family and head-dim
bucket. The comment on each table says where its numbers come from; entries not yet measured say so.
Under the interpreter one small config is used, with BLOCK_M != BLOCK_N so tests exercise the block
range arithmetic on both axes.
"""

from __future__ import annotations

import functools
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
INTERPRET_BWD_FUSED = TileConfig(16, 32, 1, 1)

# Hopper (sm90). Head-dim bucket -> config. Starting points from the Triton fused-attention tutorial's
# Hopper search space; measured and revised in docs/perf-notes.md.
HOPPER_FWD = {
    64: TileConfig(128, 64, 4, 3),
    128: TileConfig(128, 64, 8, 3),
    256: TileConfig(64, 64, 4, 2),
    512: TileConfig(32, 32, 4, 1),
}
# dK/dV: the kernel loops over (query block, head) pairs in one flat loop since 2026-12-01, which took
# its sm_90 register use under 255 with no spills at (32, 128, 8 warps, 2 stages) for d64 and d128
# (scripts/aot_report.py; every tile spilled 160-2400 bytes with the nested head loop). First pick
# for the GPU sweep (scripts/tune.py). (16, 64, 4, 2) at d256 spills and is to be re-measured.
# Earlier: (32, 128, 4, 3) at d64 and (16, 64, 4, 2) at d128 gave wrong dK on an H100 (2026-11-22)
# while tl.trans() of a dot's result fed another dot; the kernel no longer does that.
HOPPER_BWD_DKDV = {
    64: TileConfig(32, 128, 8, 2),
    128: TileConfig(32, 128, 8, 2),
    256: TileConfig(16, 64, 4, 2),
    512: TileConfig(16, 32, 4, 1),
}
HOPPER_BWD_DQ = {
    64: TileConfig(128, 32, 4, 3),
    128: TileConfig(64, 32, 4, 3),
    256: TileConfig(64, 16, 4, 2),
    512: TileConfig(32, 16, 4, 1),
}

# The fused dK/dV + atomic dQ backward (deterministic=False). None: that bucket uses the two kernels.
# Not yet timed: the tiles with no spilled bytes in the sm_90 register report, for scripts/tune.py.
HOPPER_BWD_FUSED = {
    64: TileConfig(32, 128, 8, 2),
    128: TileConfig(16, 128, 8, 2),
    256: None,
    512: None,
}

# Everything else (Ampere, Ada, AMD, unknown): conservative tiles that fit 100 KB of shared memory.
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
# Unmeasured off Hopper: the two deterministic kernels everywhere.
SAFE_BWD_FUSED = {64: None, 128: None, 256: None, 512: None}


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


def _pick(device: torch.device, head_dim: int, hopper: dict, safe: dict, interpret: TileConfig) -> TileConfig:
    if device.type != "cuda":
        return interpret
    table = hopper if _arch(device.index or 0) == "hopper" else safe
    return table[head_dim_bucket(head_dim)]


def fwd_config(device: torch.device, head_dim: int) -> TileConfig:
    return _pick(device, head_dim, HOPPER_FWD, SAFE_FWD, INTERPRET_FWD)


def bwd_configs(device: torch.device, head_dim: int) -> tuple[TileConfig, TileConfig]:
    """(dK/dV kernel config, dQ kernel config) of the deterministic two-kernel backward."""
    return (
        _pick(device, head_dim, HOPPER_BWD_DKDV, SAFE_BWD_DKDV, INTERPRET_BWD_DKDV),
        _pick(device, head_dim, HOPPER_BWD_DQ, SAFE_BWD_DQ, INTERPRET_BWD_DQ),
    )


def bwd_fused_config(device: torch.device, head_dim: int) -> TileConfig | None:
    """Config of the fused dK/dV + atomic dQ backward, or None where the two kernels are faster
    (or the fused form is unmeasured)."""
    return _pick(device, head_dim, HOPPER_BWD_FUSED, SAFE_BWD_FUSED, INTERPRET_BWD_FUSED)
