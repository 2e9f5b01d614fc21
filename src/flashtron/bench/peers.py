"""The implementations a benchmark compares: flashtron (through its public API only) and its peers.

Every implementation takes flash_attn's layout, q: (batch_size, seqlen_q, nheads, headdim) and
k, v: (batch_size, seqlen_k, nheads_k, headdim), and `build()` returns a zero-argument callable
that computes the attention output (in whatever layout the implementation produces), plus a note.
`build()` does the untimed set-up (layout views, block masks, GQA expansion); the callable is what
gets timed. A feature an implementation lacks raises `Unsupported` ("n/a: ..." in the results);
a flashtron feature not built yet raises NotImplementedError ("not implemented").
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable

import torch

from flashtron.masks import diagonal_offsets, hidden_by_window

from .runner import Unsupported

Fn = Callable[[], torch.Tensor]

NO_WINDOW = (-1, -1)


def attn_flops(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int, causal: bool) -> float:
    """Forward FLOPs as FlashAttention counts them: 4*b*h*sq*sk*d, halved when causal."""
    flops = 4.0 * batch * nheads * seqlen_q * seqlen_k * headdim
    return flops / 2 if causal else flops


def visible_pairs(seqlen_q: int, seqlen_k: int, window: tuple[int, int]) -> int:
    """Number of (query, key) pairs a (left, right) window lets through, bottom-right aligned."""
    left, right = window
    total = 0
    for i in range(seqlen_q):
        centre = i + seqlen_k - seqlen_q
        lo = 0 if left < 0 else max(0, centre - left)
        hi = seqlen_k - 1 if right < 0 else min(seqlen_k - 1, centre + right)
        total += max(0, hi - lo + 1)
    return total


def hidden_mask(seqlen_q: int, seqlen_k: int, window: tuple[int, int], device: torch.device) -> torch.Tensor | None:
    """(seqlen_q, seqlen_k) bool, True where query i may not see key j; None when nothing is hidden.

    Query i sees key j iff i + sk - sq - left <= j <= i + sk - sq + right (-1 = unbounded).
    """
    return hidden_by_window(diagonal_offsets(seqlen_q, seqlen_k, device=device), *window)


def standard_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    window: tuple[int, int] = NO_WINDOW,
    upcast: torch.dtype | None = None,
) -> torch.Tensor:
    """Materialised attention in plain PyTorch: scores, softmax (fp32), probabilities @ v.

    q: (batch_size, seqlen_q, nheads, headdim); k, v: (batch_size, seqlen_k, nheads_k, headdim).
    Returns out: (batch_size, seqlen_q, nheads, headdim). Rows that see no key come out NaN (no
    benchmark or check shape has them). With `upcast`, inputs are first cast to
    that dtype (the fp32/fp64 reference); otherwise matmuls run in the input dtype, as a user's
    eager attention does. GQA folds each KV head's query group into the rows, so K/V are not copied.
    """
    if upcast is not None:
        q, k, v = q.to(upcast), k.to(upcast), v.to(upcast)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    if causal:
        window = (window[0], 0)
    qh = q.transpose(1, 2)  # [b, h, sq, d]
    if g > 1:
        qh = qh.reshape(b, hk, g * sq, d)  # rows ordered (group, query)
    scores = torch.matmul(qh, k.transpose(1, 2).transpose(-1, -2)) * (d**-0.5)  # [b, hk, g*sq, sk]
    hidden = hidden_mask(sq, sk, window, q.device)
    if hidden is not None:
        scores = scores.masked_fill(hidden.repeat(g, 1) if g > 1 else hidden, float("-inf"))
    # softmax in fp32 at least (fp64 for the fp64 reference), back to the dtype for the second matmul
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    out = torch.matmul(probs, v.transpose(1, 2))  # [b, hk, g*sq, d]
    return out.reshape(b, h, sq, d).transpose(1, 2)


def standard_bytes(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, itemsize: int, backward: bool) -> int:
    """Rough peak memory of `standard_attention`: per score element, scores + fp32 softmax + probs
    (+ the same again in gradients when `backward`)."""
    per_elem = 2 * itemsize + 4
    if backward:
        per_elem += 2 * itemsize + 4
    return batch * nheads * seqlen_q * seqlen_k * per_elem


class Peer:
    """One implementation. Subclasses fill in `build`; the defaults suit a plain PyTorch peer."""

    name = ""
    label = ""
    needs_cuda = False
    supports_window = False

    def unavailable(self, device: torch.device) -> str | None:
        """Why this implementation cannot run on `device` at all, or None."""
        if self.needs_cuda and device.type != "cuda":
            return "needs CUDA"
        return None

    def context(self) -> contextlib.AbstractContextManager:
        """Entered once around set-up and timing (e.g. SDPA's backend choice), not per call."""
        return contextlib.nullcontext()

    def build(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: tuple[int, int]
    ) -> tuple[Fn, str]:
        raise NotImplementedError

    def _check_window(self, window: tuple[int, int]) -> None:
        if tuple(window) != NO_WINDOW and not self.supports_window:
            raise Unsupported(f"{self.label} has no sliding-window attention")


class Flashtron(Peer):
    """Ours, through the public API: flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache."""

    name = "flashtron"
    label = "flashtron"
    supports_window = True

    def unavailable(self, device: torch.device) -> str | None:
        try:
            import flashtron  # noqa: F401
        except Exception as exc:  # a broken package is reported in the table, not raised
            return f"import flashtron failed: {type(exc).__name__}: {exc}"
        return None

    @staticmethod
    def api(name: str) -> Callable:
        import flashtron

        fn = getattr(flashtron, name, None)
        if fn is None:
            raise NotImplementedError(f"flashtron.{name} does not exist yet")
        return fn

    def build(self, q, k, v, *, causal, window):
        attn = self.api("flash_attn_func")
        kwargs = {"causal": causal}
        if tuple(window) != NO_WINDOW:
            kwargs["window_size"] = tuple(window)
        return (lambda: attn(q, k, v, **kwargs)), ""

    def build_kvcache(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
        block_table: torch.Tensor | None = None,
    ) -> Fn:
        """q: (batch_size, 1, nheads, headdim); k_cache, v_cache: (batch_size, seqlen_cache, nheads_k,
        headdim), or (num_blocks, page_block_size, nheads_k, headdim) with block_table
        (batch_size, max_num_blocks_per_seq) int32."""
        attn = self.api("flash_attn_with_kvcache")
        return lambda: attn(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=block_table)

    def build_varlen(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool
    ) -> Fn:
        """q, k, v: (total_tokens, nheads, headdim); cu_seqlens: (batch_size + 1,) int32."""
        attn = self.api("flash_attn_varlen_func")
        return lambda: attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal)


class FlashtronAutotune(Flashtron):
    """Ours with FLASHTRON_AUTOTUNE=1 (flashtron/autotune.py). The untimed first call of each cell
    tunes it; the cache directory is the user's, so a second run reuses the first run's choices."""

    name = "flashtron_autotune"
    label = "flashtron (autotune)"

    def unavailable(self, device):
        if device.type != "cuda":
            return "autotuning applies to CUDA devices only"
        return super().unavailable(device)

    def context(self):
        return _environ("FLASHTRON_AUTOTUNE", "1")


@contextlib.contextmanager
def _environ(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


class Standard(Peer):
    """Materialised attention in the input dtype: the O(seqlen^2)-memory baseline."""

    name = "standard"
    label = "standard"
    supports_window = True

    def build(self, q, k, v, *, causal, window):
        return (lambda: standard_attention(q, k, v, causal, window)), ""


class Sdpa(Peer):
    """torch.nn.functional.scaled_dot_product_attention pinned to one backend with sdpa_kernel."""

    def __init__(self, name: str, label: str, backend: str, needs_cuda: bool):
        self.name, self.label, self.backend, self.needs_cuda = name, label, backend, needs_cuda

    def context(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, self.backend)])

    def build(self, q, k, v, *, causal, window):
        self._check_window(window)
        if causal and q.shape[1] != k.shape[1]:
            # SDPA's is_causal is top-left aligned; ours is bottom-right: only sq == sk compares.
            raise Unsupported("SDPA is_causal is top-left aligned; compared only for seqlen_q == seqlen_k")
        sdpa = torch.nn.functional.scaled_dot_product_attention
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants (b, h, s, d): views, no copy
        if q.shape[2] == k.shape[2]:
            return (lambda: sdpa(qh, kh, vh, is_causal=causal)), ""
        try:
            # A backend without native GQA raises (and warns why): fall back quietly, say so in the note.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sdpa(qh, kh, vh, is_causal=causal, enable_gqa=True)
            return (lambda: sdpa(qh, kh, vh, is_causal=causal, enable_gqa=True)), "enable_gqa=True"
        except RuntimeError:
            # This backend has no native GQA: give it K/V repeated to nheads (copied outside timing).
            g = q.shape[2] // k.shape[2]
            ke, ve = kh.repeat_interleave(g, dim=1), vh.repeat_interleave(g, dim=1)
            return (lambda: sdpa(qh, ke, ve, is_causal=causal)), "KV repeated to nheads (no native GQA)"


class Flex(Peer):
    """torch.nn.attention.flex_attention, compiled once per shape; masks as block masks."""

    name = "flex"
    label = "FlexAttention"
    needs_cuda = True
    supports_window = True

    def __init__(self):
        self._compiled = None

    def _flex(self) -> Callable:
        if self._compiled is None:
            import torch._dynamo.config as dynamo_config

            # Past the default 8 recompiles Flex silently falls back to an unfused path ~30x slower.
            for knob, value in (
                ("recompile_limit", 1000),
                ("cache_size_limit", 1000),
                ("accumulated_recompile_limit", 10000),
                ("accumulated_cache_size_limit", 10000),
            ):
                if hasattr(dynamo_config, knob):
                    setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), value))
            from torch.nn.attention.flex_attention import flex_attention

            self._compiled = torch.compile(flex_attention, dynamic=False)
        return self._compiled

    def unavailable(self, device):
        reason = super().unavailable(device)
        if reason:
            return "benchmarked on CUDA only (CPU compile is too slow here)"
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except ImportError as exc:
            return f"not importable: {exc}"
        return None

    def build(self, q, k, v, *, causal, window):
        from torch.nn.attention.flex_attention import create_block_mask

        flex = self._flex()
        sq, sk = q.shape[1], k.shape[1]
        left, right = (window[0], 0) if causal else tuple(window)
        block_mask = None
        if left >= 0 or right >= 0:
            offset = sk - sq

            def mask_mod(b, h, q_idx, kv_idx):
                keep = q_idx >= 0
                if right >= 0:
                    keep = keep & (kv_idx <= q_idx + offset + right)
                if left >= 0:
                    keep = keep & (kv_idx >= q_idx + offset - left)
                return keep

            block_mask = create_block_mask(mask_mod, None, None, sq, sk, device=q.device)
        return self._call(flex, q, k, v, block_mask), ""

    def build_document(self, q, k, v, cu_seqlens: torch.Tensor, causal: bool) -> Fn:
        """Varlen as Flex does it: q, k, v (1, total_tokens, nheads, headdim) and a document mask."""
        from torch.nn.attention.flex_attention import create_block_mask

        flex = self._flex()
        total = q.shape[1]
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)

        def mask_mod(b, h, q_idx, kv_idx):
            same = doc[q_idx] == doc[kv_idx]
            return same & (kv_idx <= q_idx) if causal else same

        block_mask = create_block_mask(mask_mod, None, None, total, total, device=q.device)
        return self._call(flex, q, k, v, block_mask)

    @staticmethod
    def _call(flex, q, k, v, block_mask) -> Fn:
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        gqa = q.shape[2] != k.shape[2]
        return lambda: flex(qh, kh, vh, block_mask=block_mask, enable_gqa=gqa)


class Fa4(Peer):
    """FlashAttention-4 (CuTe DSL), only when `flash_attn.cute` imports."""

    name = "fa4"
    label = "FA4 (CuTe)"
    needs_cuda = True
    supports_window = True

    def unavailable(self, device):
        reason = super().unavailable(device)
        if reason:
            return reason
        try:
            from flash_attn.cute.interface import flash_attn_func  # noqa: F401
        except Exception as exc:  # ImportError, or a CUDA/DSL error while importing
            return f"flash_attn.cute not importable ({type(exc).__name__})"
        return None

    def build(self, q, k, v, *, causal, window):
        from flash_attn.cute.interface import flash_attn_func

        kwargs = {"causal": causal}
        if tuple(window) != NO_WINDOW:
            kwargs["window_size"] = tuple(None if w < 0 else w for w in window)

        def fn():
            out = flash_attn_func(q, k, v, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        return fn, ""


# Every peer by its --peers name. flashtron is always measured and is not in this table.
PEERS: dict[str, Callable[[], Peer]] = {
    "standard": Standard,
    "sdpa_math": lambda: Sdpa("sdpa_math", "SDPA-math", "MATH", needs_cuda=False),
    "sdpa_flash": lambda: Sdpa("sdpa_flash", "SDPA-flash (FA2)", "FLASH_ATTENTION", needs_cuda=False),
    "sdpa_efficient": lambda: Sdpa("sdpa_efficient", "SDPA-efficient", "EFFICIENT_ATTENTION", needs_cuda=True),
    "sdpa_cudnn": lambda: Sdpa("sdpa_cudnn", "SDPA-cuDNN", "CUDNN_ATTENTION", needs_cuda=True),
    "flex": Flex,
    "fa4": Fa4,
    "flashtron_autotune": FlashtronAutotune,
}
DEFAULT_PEERS = {
    "cuda": ("standard", "sdpa_efficient", "sdpa_flash", "flex", "sdpa_cudnn", "fa4"),
    "cpu": ("standard", "sdpa_math"),
}
# The peers our targets are stated against (report.targets_table), for the ratio columns: ours / peer.
RATIO_PEERS = (("sdpa_flash", "FA2"), ("flex", "Flex"), ("sdpa_cudnn", "cuDNN"), ("fa4", "FA4"))


def make_peers(names: list[str]) -> dict[str, Peer]:
    """flashtron first, then the named peers in order. Unknown names raise ValueError."""
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"--peers: unknown peer(s) {unknown}; expected names from {sorted(PEERS)}")
    peers: dict[str, Peer] = {"flashtron": Flashtron()}
    for n in names:
        peers[n] = PEERS[n]()
    return peers
