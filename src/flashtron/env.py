"""Every environment variable flashtron reads, in one place. Read at call time, never at import."""

from __future__ import annotations

import os
from pathlib import Path


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: CPU tensors run the real Triton kernels in Triton's interpreter."""
    return _flag("TRITON_INTERPRET")


def force_cpu_path() -> bool:
    """FLASHTRON_FORCE_CPU_PATH=1: CPU tensors take the PyTorch path even under TRITON_INTERPRET=1."""
    return _flag("FLASHTRON_FORCE_CPU_PATH")


def autotune() -> bool:
    """FLASHTRON_AUTOTUNE=1: time the candidate tiles on first use and cache the fastest (autotune.py)."""
    return _flag("FLASHTRON_AUTOTUNE")


def backend() -> str:
    """FLASHTRON_BACKEND: "triton" keeps every call on the portable Triton kernels; "gluon" sends the calls
    the Gluon Hopper forward covers (launch_hopper.covers) to it, and the dK/dV part of covered backwards to
    the Gluon dK/dV kernel (launch_hopper.covers_backward); unset or "auto" is the default choice
    (launch_hopper.GLUON_DEFAULT_HEAD_DIMS: head dim 64, 128 and 256 forwards; GLUON_DEFAULT_BACKWARD_HEAD_DIMS: the
    dK/dV of head dim 128 backwards). Forward features where the Gluon forward was timed slower than the
    Triton one (softcap; varlen at head dims 64 and 256: launch_hopper.GLUON_GATED_FEATURES) take it only with "gluon";
    softcap and varlen backwards stay on the Triton kernels. Other values raise, so that a typo does not
    silently change nothing."""
    value = os.environ.get("FLASHTRON_BACKEND", "auto").strip().lower() or "auto"
    if value not in ("auto", "triton", "gluon"):
        raise ValueError(f"FLASHTRON_BACKEND must be auto, triton or gluon, got {value!r}")
    return value


def gluon_dq() -> bool:
    """FLASHTRON_GLUON_DQ=1: a backward whose dK/dV takes the Gluon kernel (see backend()) runs its dQ on the
    Gluon dQ kernel too (launch_hopper.attention_backward_dq) instead of the Triton one. Opt-in: correct on an
    H200 (2026-12-02) but 0.91-1.07x the Triton dQ's whole backward there, so not the default. Without the Gluon
    dK/dV it changes nothing."""
    return _flag("FLASHTRON_GLUON_DQ")


def gluon_fused_dq() -> bool:
    """FLASHTRON_GLUON_FUSED_DQ=1: a backward with deterministic=False whose dK/dV takes the Gluon kernel (see
    backend()) adds dQ from inside that kernel by TMA reduce-add into an fp32 buffer (FA3's design;
    launch_hopper.attention_backward_fused), with no separate dQ pass. Not bit-reproducible from run to run.
    Opt-in: correct on an H200 (2026-12-02) but slower there (0.75-0.98x the default backward).
    deterministic=True never takes it; it takes
    precedence over FLASHTRON_GLUON_DQ where both apply."""
    return _flag("FLASHTRON_GLUON_FUSED_DQ")


def cache_dir() -> Path:
    """FLASHTRON_CACHE_DIR, else $XDG_CACHE_HOME/flashtron, else ~/.cache/flashtron."""
    given = os.environ.get("FLASHTRON_CACHE_DIR")
    if given:
        return Path(given)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flashtron"


def uses_triton(t) -> bool:
    """The one dispatch rule: CUDA tensors run the Triton kernels, and so do CPU tensors under
    TRITON_INTERPRET=1 (unless FLASHTRON_FORCE_CPU_PATH=1); other CPU tensors take the PyTorch path."""
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and triton_interpret() and not force_cpu_path()


VARIABLES = {
    "TRITON_INTERPRET": "1 runs the Triton kernels on CPU tensors through Triton's interpreter (tests).",
    "FLASHTRON_FORCE_CPU_PATH": "1 keeps CPU tensors on the PyTorch path even when TRITON_INTERPRET=1.",
    "FLASHTRON_AUTOTUNE": "1 times the candidate tiles of a kernel on first use and keeps the fastest (GPU).",
    "FLASHTRON_BACKEND": (
        "triton forces the Triton kernels; gluon sends every covered sm_90 forward, and the dK/dV part of "
        "every covered backward, to the Gluon kernels (default: head dim 64, 128 and 256 forwards, and the dK/dV of "
        "head dim 128 backwards); softcap forwards, and varlen ones at head dims 64 and 256, take the Gluon "
        "forward only with gluon (timed slower than Triton), and softcap and varlen backwards stay on Triton."
    ),
    "FLASHTRON_GLUON_DQ": (
        "1 runs the dQ of backwards whose dK/dV takes the Gluon kernel on the Gluon dQ kernel too (opt-in: "
        "not measured faster)."
    ),
    "FLASHTRON_GLUON_FUSED_DQ": (
        "1 adds dQ from inside the Gluon dK/dV kernel (fp32 TMA reduce-add, no dQ pass) for backwards with "
        "deterministic=False whose dK/dV takes the Gluon kernel (opt-in: measured slower)."
    ),
    "FLASHTRON_CACHE_DIR": "where the autotune cache lives (default $XDG_CACHE_HOME/flashtron or ~/.cache/flashtron).",
}
