"""The ops' launchers as torch.library custom ops, for torch.compile.

Under torch.compile the autograd Functions of rotary, norm and cross entropy call their launchers
through these ops instead of directly, as flashtron.compile does for attention. Inductor then sees
one opaque node per launch, with shapes from a fake implementation, and neither traces into the
launchers nor rewrites the Triton kernels' buffers through its own analysis of them: compiled and
eager run the same kernels on the same inputs. Eager calls skip the op dispatch.

Custom ops cannot return None, so an absent output (no residual, no mean for RMSNorm) travels as an
empty tensor and the caller, which knows from its flags which outputs exist, turns it back.
"""

from __future__ import annotations

import torch


def encode(t: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """t, or an empty placeholder for None."""
    return torch.empty(0, dtype=dtype, device=device) if t is None else t
