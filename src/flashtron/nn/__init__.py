"""Layers on flashtron's public API: rotary embedding, attention with a KV cache, MLPs, a block.

RMSNorm and LayerNorm (fused residual add) come from flashtron.ops and are re-exported here.
"""

from flashtron.nn.block import Block
from flashtron.nn.mha import ATTENTION_BACKENDS, MHA, ContextParallel, KVCache, attention
from flashtron.nn.mlp import MLP, GatedMLP
from flashtron.nn.rotary import RotaryEmbedding
from flashtron.ops import LayerNorm, RMSNorm

__all__ = [
    "RotaryEmbedding",
    "MHA",
    "KVCache",
    "attention",
    "ATTENTION_BACKENDS",
    "MLP",
    "GatedMLP",
    "Block",
    "RMSNorm",
    "LayerNorm",
    "set_attention_backend",
    "ContextParallel",
    "set_context_parallel",
]


def set_attention_backend(model, backend: str):
    """Makes every MHA in `model` run its dense attention with `backend` (one of
    ATTENTION_BACKENDS); returns the model."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"set_attention_backend: backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    for module in model.modules():
        if isinstance(module, MHA):
            module.backend = backend
    return model


def set_context_parallel(model, context_parallel: ContextParallel | None):
    """Sets `context_parallel` on every module of `model` that has one (MHA, GPT): with a
    ContextParallel(group, layout) they take this rank's sequence shards and attend by ring attention
    over the group; None turns it off. Returns the model."""
    for module in model.modules():
        if hasattr(module, "context_parallel"):
            module.context_parallel = context_parallel
    return model
