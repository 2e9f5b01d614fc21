"""Every environment variable flashtron reads, in one place. Read at call time, never at import."""

from __future__ import annotations

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: CPU tensors run the real Triton kernels in Triton's interpreter."""
    return _flag("TRITON_INTERPRET")


def force_cpu_path() -> bool:
    """FLASHTRON_FORCE_CPU_PATH=1: CPU tensors take the PyTorch path even under TRITON_INTERPRET=1."""
    return _flag("FLASHTRON_FORCE_CPU_PATH")


def uses_triton(t) -> bool:
    """The one dispatch rule: CUDA tensors run the Triton kernels, and so do CPU tensors under
    TRITON_INTERPRET=1 (unless FLASHTRON_FORCE_CPU_PATH=1); other CPU tensors take the PyTorch path."""
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and triton_interpret() and not force_cpu_path()


VARIABLES = {
    "TRITON_INTERPRET": "1 runs the Triton kernels on CPU tensors through Triton's interpreter (tests).",
    "FLASHTRON_FORCE_CPU_PATH": "1 keeps CPU tensors on the PyTorch path even when TRITON_INTERPRET=1.",
}
