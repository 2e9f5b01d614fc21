"""The benchmark suites: correctness check, prefill, decode, memory, window and varlen.

Each suite turns a `Grid` into `Task`s (see runner.py). Sizes live in the grids below (the GPU grid
is the default `Grid()`); peers.py has the FLOP and byte formulas. Ours is measured through the
public API only, in the same run and on the same inputs' shapes as every peer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .peers import (
    NO_WINDOW,
    Flashtron,
    Flex,
    Peer,
    attn_flops,
    standard_attention,
    standard_bytes,
    visible_pairs,
)
from .runner import GIB, Budget, Row, SkipCell, Task, bench_graph_ms, bench_ms, free_bytes

MODES = ("prefill", "decode", "memory", "window", "varlen")


@dataclass(frozen=True)
class Grid:
    """Every size a run uses. `prefill`: batch = tokens // seqlen, nheads = model_dim // headdim."""

    tokens: int = 16384
    model_dim: int = 2048
    headdims: tuple[int, ...] = (64, 128)
    seqlens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    causals: tuple[bool, ...] = (False, True)
    # Head dim 256 against the peers that have it at full speed (issue 15 asks for it to be reported): a few
    # seqlens, outside the targets (PERF.md's goals are set at head dims 64 and 128)
    wide_headdims: tuple[int, ...] = (256,)
    wide_seqlens: tuple[int, ...] = (4096, 16384)
    wide_peers: tuple[str, ...] = ("sdpa_cudnn", "fa4")
    decode_batch: int = 8
    decode_heads: int = 32
    decode_kv_heads: int = 8
    decode_headdim: int = 128
    decode_caches: tuple[int, ...] = (1024, 8192, 32768, 65536)
    page_sizes: tuple[int, ...] = (16, 256)
    mem_seqlen: int = 16384
    mem_heads: int = 16
    mem_headdim: int = 128
    mem_curve: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    window_seqlen: int = 16384
    window_heads: int = 16
    window_headdim: int = 128
    window: tuple[int, int] = (1024, 0)
    varlen_lengths: tuple[int, ...] = (3803, 2917, 2211, 1989, 1536, 1200, 997, 768, 512, 300, 133, 18)
    varlen_heads: int = 16
    varlen_headdim: int = 128
    # (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal): plain, GQA, and sq != sk.
    check_shapes: tuple[tuple, ...] = (
        (2, 512, 512, 8, 8, 64, False),
        (1, 1000, 1000, 8, 2, 128, True),
        (2, 129, 700, 4, 4, 64, True),
    )
    description: str = "GPU grid"


GRIDS = {
    "cuda": Grid(),
    "cuda-quick": Grid(
        headdims=(128,),
        seqlens=(1024, 4096),
        wide_headdims=(),
        decode_caches=(1024, 32768),
        mem_curve=(1024, 4096, 16384),
        description="reduced GPU grid (--quick)",
    ),
    # On the CPU the GPU grid would take hours: same shapes of problem, smaller sizes.
    "cpu": Grid(
        tokens=4096,
        model_dim=512,
        wide_headdims=(),
        seqlens=(256, 512, 1024, 2048),
        decode_batch=4,
        decode_heads=16,
        decode_kv_heads=4,
        decode_caches=(1024, 4096, 16384),
        window_seqlen=4096,
        window_heads=4,
        window=(256, 0),
        varlen_lengths=(951, 729, 553, 497, 384, 300, 249, 192, 128, 75, 33, 5),
        varlen_heads=4,
        description="CPU grid (the GPU grid's problems at smaller sizes)",
    ),
    "cpu-quick": Grid(
        tokens=1024,
        model_dim=256,
        wide_headdims=(),
        headdims=(64,),
        seqlens=(128, 256, 512),
        decode_batch=2,
        decode_heads=8,
        decode_kv_heads=2,
        decode_headdim=64,
        decode_caches=(256, 1024),
        mem_curve=(),
        window_seqlen=1024,
        window_heads=4,
        window_headdim=64,
        window=(128, 0),
        varlen_lengths=(238, 182, 138, 124, 96, 75, 62, 48, 32, 19, 8, 2),
        varlen_heads=4,
        varlen_headdim=64,
        check_shapes=((2, 64, 64, 4, 4, 32, False), (1, 100, 100, 4, 2, 64, True), (1, 33, 90, 2, 2, 64, True)),
        description="small CPU grid (--quick)",
    ),
}


@dataclass
class Bench:
    """What every suite needs: where and how to run, and what to compare."""

    device: torch.device
    dtype: torch.dtype
    grid: Grid
    budget: Budget
    peers: dict[str, Peer]
    copy_tbps: float | None = None
    unavailable: dict[str, str | None] = field(default_factory=dict)

    @property
    def dtype_name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]

    def randn(self, *shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype, requires_grad=grad)

    def row(self, mode: str, impl: str, **kw) -> Row:
        return Row(mode=mode, impl=impl, dtype=self.dtype_name, **kw)

    def time(self, fn, grad_to_none=None) -> float:
        return bench_ms(fn, self.device, self.budget, grad_to_none)

    def time_decode(self, fn) -> tuple[float, str]:
        """A decode step is timed as servers run it: replayed from a CUDA graph (GPU)."""
        if self.device.type == "cuda":
            return bench_graph_ms(fn, self.device, self.budget)
        return bench_ms(fn, self.device, self.budget), ""


def _na(rows: list[Row], reason: str) -> Task:
    for r in rows:
        r.status = f"n/a: {reason}"
    return Task(label=f"{rows[0].mode} {rows[0].impl}", rows=rows)


def _gated(bench: Bench, peer: Peer, label: str, rows: list[Row], run) -> Task:
    """A task that runs only when `peer` can run on this device; otherwise its rows say why not."""
    if peer.name not in bench.unavailable:  # asked once per run: an import attempt per cell is slow
        bench.unavailable[peer.name] = peer.unavailable(bench.device)
    reason = bench.unavailable[peer.name]
    if reason:
        return _na(rows, reason)
    return Task(label=label, rows=rows, run=run)


def _time_fwd_bwd(bench: Bench, peer: Peer, q, k, v, fwd: Row, bwd: Row | None, causal, window=NO_WINDOW):
    """Time the forward, then the backward on its own (`out.backward(do, retain_graph=True)`)."""
    with peer.context():
        fn, note = peer.build(q, k, v, causal=causal, window=window)
        fwd.note = note
        out = fn()  # compiles / autotunes outside the timed region
        fwd.set_time(bench.time(fn))
        if bwd is None:
            return
        bwd.note = note
        do = torch.randn_like(out)
        bwd.set_time(bench.time(lambda: out.backward(do, retain_graph=True), grad_to_none=(q, k, v)))


def _standard_fits(bench: Bench, peer: Peer, batch, nheads, sq, sk, backward: bool) -> None:
    """Standard attention materialises the scores: skip it (with its estimate) when they won't fit."""
    if peer.name != "standard":
        return
    need = standard_bytes(batch, nheads, sq, sk, bench.dtype.itemsize, backward)
    allowed = bench.budget.standard_mem_fraction * free_bytes(bench.device)
    if need > allowed:
        raise SkipCell(f"too large: needs ~{need / GIB:.1f} GiB, budget {allowed / GIB:.1f} GiB", need)


# ----------------------------------------------------------------------------------------------
# correctness


def check_tasks(bench: Bench) -> list[Task]:
    """Ours vs an fp32 (CPU: fp64) reference, forward and gradients, next to PyTorch in the dtype.

    FlashAttention's rule: our max error <= 2x PyTorch-in-dtype's (3x for gradients) + a few ulps.
    """
    ours = bench.peers["flashtron"]
    ref_dtype = torch.float64 if bench.device.type == "cpu" else torch.float32
    tasks = []
    for shape in bench.grid.check_shapes:
        b, sq, sk, h, hk, d, causal = shape
        rows = [
            bench.row(
                "check", "flashtron", batch=b, seqlen_q=sq, seqlen_k=sk, nheads=h, nheads_k=hk, headdim=d,
                causal=causal, direction=name,
            )
            for name in ("out", "dq", "dk", "dv")
        ]  # fmt: skip

        def run(rows, b=b, sq=sq, sk=sk, h=h, hk=hk, d=d, causal=causal):
            gen = torch.Generator(device="cpu").manual_seed(1234 + sq + sk)
            q, k, v, do = (
                torch.randn(b, s, n, d, generator=gen).to(bench.device, bench.dtype)
                for s, n in ((sq, h), (sk, hk), (sk, hk), (sq, h))
            )
            results = {}
            for tag, fn, kw in (
                ("ref", standard_attention, {"upcast": ref_dtype}),
                ("pt", standard_attention, {}),
                ("ours", Flashtron.api("flash_attn_func"), {}),
            ):
                qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
                if tag == "ours":
                    out = fn(qq, kk, vv, causal=causal)
                else:
                    out = fn(qq, kk, vv, causal, **kw)
                grads = torch.autograd.grad(out, (qq, kk, vv), do.to(out.dtype))
                results[tag] = (out, *grads)
            for i, row in enumerate(rows):
                ours_t, ref_t, pt_t = results["ours"][i], results["ref"][i], results["pt"][i]
                row.max_err = _max_err(ours_t, ref_t)
                row.ref_err = _max_err(pt_t, ref_t)
                factor = 2.0 if i == 0 else 3.0
                bound = factor * row.ref_err + 4 * torch.finfo(torch.float32).eps * max(1.0, ref_t.abs().max().item())
                if ours_t.shape != ref_t.shape:
                    row.status, row.error = "FAIL", f"shape {tuple(ours_t.shape)} != {tuple(ref_t.shape)}"
                elif not torch.isfinite(ours_t).all():
                    row.status, row.error = "FAIL", "non-finite values"
                elif row.max_err > bound:
                    row.status = "FAIL"
                    row.error = (
                        f"max error {row.max_err:.3e} > {factor:g}x PyTorch-{bench.dtype_name} error bound {bound:.3e}"
                    )
                else:
                    row.status = "ok"

        tasks.append(_gated(bench, ours, f"check {shape}", rows, run))
    return tasks


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ----------------------------------------------------------------------------------------------
# prefill


def prefill_tasks(bench: Bench) -> list[Task]:
    """Forward and backward TFLOP/s over the grid: every head dim x causal x seqlen x implementation."""
    g = bench.grid
    tasks = []
    wide = [(hd, g.wide_seqlens, set(g.wide_peers)) for hd in g.wide_headdims]
    for hd, seqlens, only in [(hd, g.seqlens, None) for hd in g.headdims] + wide:
        nheads = g.model_dim // hd
        for causal in g.causals:
            for s in seqlens:
                batch = max(1, g.tokens // s)
                for peer in bench.peers.values():
                    if only is not None and peer.name not in only and not peer.name.startswith("flashtron"):
                        continue
                    shape = dict(
                        batch=batch, seqlen_q=s, seqlen_k=s, nheads=nheads, nheads_k=nheads, headdim=hd, causal=causal
                    )
                    fwd = bench.row("prefill", peer.name, direction="fwd", **shape)
                    bwd = bench.row("prefill", peer.name, direction="bwd", **shape)
                    fwd.flops = attn_flops(batch, nheads, s, s, hd, causal)
                    bwd.flops = 2.5 * fwd.flops
                    rows = [fwd, bwd]
                    limit = bench.budget.flex_headdims
                    if peer.name == "flex" and limit is not None and hd not in limit:
                        for r in rows:
                            r.status = (
                                f"skipped: Flex limited to headdim {','.join(map(str, limit))} by the time budget"
                            )
                        tasks.append(Task(label=f"prefill flex hd{hd}", rows=rows))
                        continue

                    def run(rows, peer=peer, batch=batch, s=s, nheads=nheads, hd=hd, causal=causal):
                        _standard_fits(bench, peer, batch, nheads, s, s, backward=True)
                        q, k, v = (bench.randn(batch, s, nheads, hd, grad=True) for _ in range(3))
                        _time_fwd_bwd(bench, peer, q, k, v, rows[0], rows[1], causal)

                    label = f"prefill hd{hd} {'causal' if causal else 'full'} s={s} {peer.name}"
                    tasks.append(_gated(bench, peer, label, rows, run))
    return tasks


# ----------------------------------------------------------------------------------------------
# decode


def decode_tasks(bench: Bench) -> list[Task]:
    """One new token per sequence against a KV cache: microseconds and KV bytes read per second."""
    g = bench.grid
    b, h, hk, d = g.decode_batch, g.decode_heads, g.decode_kv_heads, g.decode_headdim
    ours = bench.peers["flashtron"]
    tasks = []
    for L in g.decode_caches:
        impls: list[tuple[str, Peer, int | None]] = [("flashtron", ours, None)]
        impls += [(f"flashtron_paged{ps}", ours, ps) for ps in g.page_sizes]
        impls += [(p.name, p, None) for p in bench.peers.values() if p is not ours]
        for impl, peer, page in impls:
            row = bench.row(
                "decode", impl, batch=b, seqlen_q=1, seqlen_k=L, nheads=h, nheads_k=hk, headdim=d,
                causal=False, direction="fwd", note=f"page_size={page}" if page else "",
            )  # fmt: skip
            row.bytes = 2.0 * b * L * hk * d * bench.dtype.itemsize

            def run(rows, peer=peer, page=page, L=L):
                row = rows[0]
                _standard_fits(bench, peer, b, h, 1, L, backward=False)
                q = bench.randn(b, 1, h, d)
                if peer is ours:
                    fn = _ours_decode(bench, q, L, hk, d, page)
                    note = row.note
                    ms, how = bench.time_decode(fn)
                else:
                    k, v = bench.randn(b, L, hk, d), bench.randn(b, L, hk, d)
                    with peer.context():
                        fn, note = peer.build(q, k, v, causal=False, window=NO_WINDOW)
                        ms, how = bench.time_decode(fn)
                row.note = ", ".join(n for n in (note, how) if n)
                row.set_time(ms)
                if bench.copy_tbps and row.tbps is not None:
                    row.pct_of_ceiling = 100.0 * row.tbps / bench.copy_tbps

            tasks.append(_gated(bench, peer, f"decode cache={L} {impl}", [row], run))
    return tasks


def _ours_decode(bench: Bench, q: torch.Tensor, L: int, hk: int, d: int, page: int | None):
    """flash_attn_with_kvcache on a full cache: contiguous, or paged with scattered pages."""
    b = q.shape[0]
    ours = bench.peers["flashtron"]
    cache_seqlens = torch.full((b,), L, dtype=torch.int32, device=bench.device)
    if page is None:
        k_cache, v_cache = bench.randn(b, L, hk, d), bench.randn(b, L, hk, d)
        return ours.build_kvcache(q, k_cache, v_cache, cache_seqlens)
    pages_per_seq = -(-L // page)
    num_pages = b * pages_per_seq
    k_cache, v_cache = bench.randn(num_pages, page, hk, d), bench.randn(num_pages, page, hk, d)
    # Pages in a random order, as an allocator serving many requests would leave them.
    block_table = torch.randperm(num_pages, device=bench.device).to(torch.int32).view(b, pages_per_seq)
    return ours.build_kvcache(q, k_cache, v_cache, cache_seqlens, block_table)


# ----------------------------------------------------------------------------------------------
# memory


def memory_tasks(bench: Bench) -> list[Task]:
    """Extra peak memory of forward+backward (inputs and dout excluded), causal, batch 1."""
    g = bench.grid
    h, d = g.mem_heads, g.mem_headdim
    points = [("memory", p, g.mem_seqlen) for p in bench.peers.values()]
    points += [
        ("memory_curve", p, s)
        for s in g.mem_curve
        for p in bench.peers.values()
        if p.name in ("flashtron", "sdpa_flash")
    ]
    tasks = []
    for mode, peer, s in points:
        row = bench.row(mode, peer.name, batch=1, seqlen_q=s, seqlen_k=s, nheads=h, nheads_k=h, headdim=d,
                        causal=True, direction="fwd+bwd")  # fmt: skip
        if bench.device.type != "cuda":
            tasks.append(_na([row], "peak memory is measured on CUDA devices only"))
            continue

        def run(rows, peer=peer, s=s):
            row = rows[0]
            if peer.name == "standard":
                need = standard_bytes(1, h, s, s, bench.dtype.itemsize, backward=True)
                free = free_bytes(bench.device)
                if need > 0.9 * free:
                    raise SkipCell(f"too large: expected ~{need / GIB:.1f} GiB > {free / GIB:.1f} GiB free; "
                                   "estimated, not run", need)  # fmt: skip
            q, k, v = (bench.randn(1, s, h, d, grad=True) for _ in range(3))
            row.peak_mem_bytes, row.note = _peak_fwd_bwd(peer, q, k, v)
            row.status = "ok"

        tasks.append(_gated(bench, peer, f"{mode} s={s} {peer.name}", [row], run))
    return tasks


def _peak_fwd_bwd(peer: Peer, q, k, v) -> tuple[int, str]:
    with peer.context():
        fn, note = peer.build(q, k, v, causal=True, window=NO_WINDOW)
        out = fn()  # warm-up: compiles, autotunes and allocates workspaces before measuring
        do = torch.randn_like(out)
        out.backward(do)
        del out
        for t in (q, k, v):
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        out.backward(do)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, note


# ----------------------------------------------------------------------------------------------
# sliding window


def window_tasks(bench: Bench) -> list[Task]:
    """Forward time of a (left, 0) window vs full causal at one long seqlen; the ratio is the point."""
    g = bench.grid
    s, h, d = g.window_seqlen, g.window_heads, g.window_headdim
    tasks = []
    for peer in bench.peers.values():
        rows = []
        for window in (None, g.window):
            row = bench.row("window", peer.name, batch=1, seqlen_q=s, seqlen_k=s, nheads=h, nheads_k=h, headdim=d,
                            causal=True, window=window, direction="fwd")  # fmt: skip
            # TFLOP/s here counts the (query, key) pairs actually visible, so both rows compare.
            row.flops = 4.0 * h * d * visible_pairs(s, s, (window or (-1, 0)))
            rows.append(row)
        if not peer.supports_window:
            tasks.append(_na(rows, f"{peer.label} has no sliding-window attention"))
            continue

        def run(rows, peer=peer):
            _standard_fits(bench, peer, 1, h, s, s, backward=False)
            q, k, v = (bench.randn(1, s, h, d) for _ in range(3))
            for row in rows:
                _time_fwd_bwd(bench, peer, q, k, v, row, None, True, row.window or NO_WINDOW)

        tasks.append(_gated(bench, peer, f"window s={s} {peer.name}", rows, run))
    return tasks


# ----------------------------------------------------------------------------------------------
# varlen


def varlen_tasks(bench: Bench) -> list[Task]:
    """A packed batch of mixed lengths vs the same batch padded to its longest sequence, causal.

    TFLOP/s count the real tokens' FLOPs only, so padding shows up as lost throughput.
    """
    g = bench.grid
    lengths, h, d = g.varlen_lengths, g.varlen_heads, g.varlen_headdim
    total, nb, maxlen = sum(lengths), len(lengths), max(lengths)
    real_flops = sum(attn_flops(1, h, n, n, d, True) for n in lengths)
    ours = bench.peers["flashtron"]
    impls = [("flashtron", ours), ("flashtron_padded", ours)]
    if "sdpa_flash" in bench.peers:
        impls.append(("sdpa_flash_padded", bench.peers["sdpa_flash"]))
    if "flex" in bench.peers:
        impls.append(("flex_document_mask", bench.peers["flex"]))
    tasks = []
    for impl, peer in impls:
        padded = impl.endswith("_padded")
        shape = dict(batch=nb if padded else 1, seqlen_q=maxlen if padded else total, nheads=h, nheads_k=h, headdim=d)
        shape["seqlen_k"] = shape["seqlen_q"]
        note = f"{nb} sequences, {total} real tokens, longest {maxlen}"
        rows = [bench.row("varlen", impl, causal=True, direction=dr, note=note, **shape) for dr in ("fwd", "bwd")]
        rows[0].flops, rows[1].flops = real_flops, 2.5 * real_flops

        def run(rows, impl=impl, peer=peer, padded=padded):
            if padded:
                q, k, v = (bench.randn(nb, maxlen, h, d, grad=True) for _ in range(3))
                _time_fwd_bwd(bench, peer, q, k, v, rows[0], rows[1], True)
                return
            cu = torch.zeros(nb + 1, dtype=torch.int32, device=bench.device)
            cu[1:] = torch.cumsum(torch.tensor(lengths, device=bench.device), 0)
            if peer is ours:
                q, k, v = (bench.randn(total, h, d, grad=True) for _ in range(3))
                fn = ours.build_varlen(q, k, v, cu, maxlen, causal=True)
            else:
                assert isinstance(peer, Flex)
                q, k, v = (bench.randn(1, total, h, d, grad=True) for _ in range(3))
                fn = peer.build_document(q, k, v, cu, causal=True)
            out = fn()
            rows[0].set_time(bench.time(fn))
            do = torch.randn_like(out)
            rows[1].set_time(bench.time(lambda: out.backward(do, retain_graph=True), grad_to_none=(q, k, v)))

        tasks.append(_gated(bench, peer, f"varlen {impl}", rows, run))
    return tasks


SUITES = {
    "prefill": prefill_tasks,
    "decode": decode_tasks,
    "memory": memory_tasks,
    "window": window_tasks,
    "varlen": varlen_tasks,
}
