"""Layers on flashtron's public API: rotary embedding, attention with a KV cache, MLPs, a block.

RMSNorm and LayerNorm (fused residual add) come from flashtron.ops and are re-exported here.
"""

from flashtron.nn.block import Block
from flashtron.nn.mha import ATTENTION_BACKENDS, MHA, KVCache, attention
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
