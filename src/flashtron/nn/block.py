"""A pre-norm transformer block whose residual add is fused into the norms (flashtron.ops).

The residual stream travels beside the hidden states, as in flash_attn's Block: each norm adds its
input to the residual and normalises the sum in one pass (`prenorm=True` returns both), so the
stack never materialises `x + f(norm(x))` separately.
"""

from __future__ import annotations

import functools

import torch

from flashtron.nn.mha import MHA
from flashtron.nn.mlp import MLP
from flashtron.ops import LayerNorm, RMSNorm


class Block(torch.nn.Module):
    """mixer and MLP, each behind a norm, with the residual adds fused into the norms.

    dim: the model width. mixer_cls, mlp_cls, norm_cls: callables taking dim and returning a
    module (defaults: MHA with headdim 64, MLP with 4 * dim hidden features, flashtron LayerNorm).
    Other norms work too, with the residual add done separately. residual_in_fp32: keep the
    residual stream in fp32 when the block's input has none yet.
    """

    def __init__(self, dim: int, mixer_cls=None, mlp_cls=None, norm_cls=LayerNorm, residual_in_fp32: bool = False):
        super().__init__()
        mixer_cls = mixer_cls or functools.partial(MHA, num_heads=max(dim // 64, 1))
        mlp_cls = mlp_cls or MLP
        self.residual_in_fp32 = residual_in_fp32
        self.norm1, self.mixer = norm_cls(dim), mixer_cls(dim)
        self.norm2, self.mlp = norm_cls(dim), mlp_cls(dim)

    def _add_norm(self, norm, hidden_states, residual):
        if isinstance(norm, (RMSNorm, LayerNorm)):
            return norm(hidden_states, residual=residual, prenorm=True, residual_in_fp32=self.residual_in_fp32)
        residual = hidden_states if residual is None else hidden_states + residual
        if self.residual_in_fp32:
            residual = residual.float()
        return norm(residual.to(norm.weight.dtype)), residual

    def forward(self, hidden_states, residual=None, **mixer_kwargs):
        """hidden_states: (batch_size, seqlen, dim), or (total_seqlen, dim) with varlen
        mixer_kwargs. residual: like hidden_states, or None for the first block.
        Returns (hidden_states, residual); the model ends with norm(hidden_states, residual=residual).
        """
        hidden_states, residual = self._add_norm(self.norm1, hidden_states, residual)
        hidden_states = self.mixer(hidden_states, **mixer_kwargs)
        hidden_states, residual = self._add_norm(self.norm2, hidden_states, residual)
        return self.mlp(hidden_states), residual
