"""The feed-forward layers of a transformer block: MLP (GPT-2) and GatedMLP (SwiGLU, Llama)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# tanh-approximated GELU, as GPT-2 (a module-level default, not a call in the signature)
gelu_tanh = functools.partial(F.gelu, approximate="tanh")


def _check_features(cls: str, **dims) -> None:
    for name, value in dims.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{cls}: {name} must be a positive int, got {value!r}")


class MLP(torch.nn.Module):
    """fc2(activation(fc1(x))). x: (..., in_features) -> (..., out_features).

    hidden_features: default 4 * in_features. out_features: default in_features.
    activation: default tanh-approximated GELU, as GPT-2.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        activation=gelu_tanh,
        bias1: bool = True,
        bias2: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_features("MLP", in_features=in_features, hidden_features=hidden_features, out_features=out_features)
        hidden_features = hidden_features or 4 * in_features
        out_features = out_features or in_features
        self.activation = activation
        self.fc1 = torch.nn.Linear(in_features, hidden_features, bias=bias1, device=device, dtype=dtype)
        self.fc2 = torch.nn.Linear(hidden_features, out_features, bias=bias2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class GatedMLP(torch.nn.Module):
    """fc2(y * activation(gate)) with (y, gate) = fc1(x) split in halves: SwiGLU with silu.

    x: (..., in_features) -> (..., out_features). hidden_features: default 8/3 * in_features
    rounded up to a multiple of `multiple_of` (Llama's sizing). fc1 holds the up and gate
    projections stacked, (2 * hidden_features, in_features), up first.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        activation=F.silu,
        bias1: bool = True,
        bias2: bool = True,
        multiple_of: int = 128,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_features(
            "GatedMLP",
            in_features=in_features,
            hidden_features=hidden_features,
            out_features=out_features,
            multiple_of=multiple_of,
        )
        if hidden_features is None:
            hidden_features = -(-int(8 * in_features / 3) // multiple_of) * multiple_of
        out_features = out_features or in_features
        self.activation = activation
        self.fc1 = torch.nn.Linear(in_features, 2 * hidden_features, bias=bias1, device=device, dtype=dtype)
        self.fc2 = torch.nn.Linear(hidden_features, out_features, bias=bias2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * self.activation(gate))
