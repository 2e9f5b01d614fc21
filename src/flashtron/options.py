"""The normalised attention options that travel from the API down to every backend.

The public functions take flash_attn's loose arguments (causal flag, window tuple, 0.0 meaning
"off"); `api.py` checks them once and turns them into one `AttnOptions`. Everything below the API
(autograd, launchers, the CPU path, the reference) reads only this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class AttnOptions:
    """Options of one attention call, already validated.

    softmax_scale: multiplies q.k (default 1/sqrt(headdim_qk), filled in by the API).
    window_left, window_right: query i (0-based in its sequence) sees keys j with
        i + sk - sq - window_left <= j <= i + sk - sq + window_right; -1 means unbounded on that side.
        causal=True is window_right = 0 (bottom-right aligned), so there is no separate causal flag.
    softcap: > 0 replaces the scaled scores s by softcap * tanh(s / softcap); 0 disables it.
    alibi_slopes: fp32 (nheads,) or (batch, nheads), or None; adds -slope * |i + sk - sq - j|.
    dropout_p: probability of dropping a normalised probability; survivors are scaled by 1/(1-p).
    learnable_sink: (nheads,) logits added to each row's softmax denominator only, or None.
    deterministic: the backward pass must be bitwise reproducible.
    """

    softmax_scale: float
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: torch.Tensor | None = None
    dropout_p: float = 0.0
    learnable_sink: torch.Tensor | None = None
    deterministic: bool = False

    @property
    def causal(self) -> bool:
        """True when the window is exactly bottom-right causal (no left bound)."""
        return self.window_right == 0 and self.window_left < 0

    @property
    def has_window(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0


# AttnOptions as torch.library op arguments, generated from its fields: the one place where the options
# are flattened for an op schema and rebuilt inside the op (autograd.py and inference.py define ops).
_SCHEMA_TYPES = {"float": "float", "int": "SymInt", "bool": "bool", "torch.Tensor | None": "Tensor?"}
OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(AttnOptions))


def options_schema() -> str:
    """The options' part of an op schema: "float softmax_scale, int window_left, ...", in field order."""
    return ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in dataclasses.fields(AttnOptions))


def options_to_args(opts: AttnOptions) -> tuple:
    """The options as op arguments, in options_schema's order."""
    return tuple(getattr(opts, name) for name in OPTION_FIELDS)


def options_from_args(args) -> AttnOptions:
    """Inverse of options_to_args (the first len(OPTION_FIELDS) of args)."""
    return AttnOptions(**dict(zip(OPTION_FIELDS, args)))


# ----------------------------------------------------------------------------------------------------
# The KV cache's layout (flash_attn_with_kvcache), read off the cache and block table
# ----------------------------------------------------------------------------------------------------


class CacheLayout(NamedTuple):
    paged: bool
    page_size: int  # 0 when dense
    capacity: int  # positions a batch row can hold


def cache_layout(k_cache: torch.Tensor, block_table) -> CacheLayout:
    if block_table is not None:
        return CacheLayout(True, k_cache.shape[1], block_table.shape[1] * k_cache.shape[1])
    return CacheLayout(False, 0, k_cache.shape[1])
