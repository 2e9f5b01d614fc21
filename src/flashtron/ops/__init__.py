"""Fused Triton ops beside attention, each with forward, backward and an exact PyTorch CPU path:
rotary embedding, RMSNorm/LayerNorm with a fused residual add, and memory-efficient cross entropy."""

from flashtron.ops.cross_entropy import cross_entropy_loss
from flashtron.ops.norm import LayerNorm, RMSNorm, layer_norm, rms_norm
from flashtron.ops.rotary import apply_rotary_emb

__all__ = ["apply_rotary_emb", "rms_norm", "layer_norm", "RMSNorm", "LayerNorm", "cross_entropy_loss"]
