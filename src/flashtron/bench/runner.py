"""The plumbing every benchmark suite shares: result rows, tasks, timing, ceilings and progress.

A suite turns its grid into `Task`s. Each task owns the `Row`s it will fill (status "pending") and a
function that measures them. `run_tasks` runs the tasks in order under a wall-clock budget: a task
that raises marks its still-pending rows with the reason (OOM, not implemented, n/a, error), a task
past the budget marks them "skipped: time budget", and nothing is ever dropped from the results.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch

GIB = 1024**3


class Unsupported(Exception):
    """An implementation cannot run this measurement at all; the row reads "n/a: <reason>"."""


class SkipCell(Exception):
    """A measurement deliberately not run (too large, budget); the row reads "skipped: <reason>"."""

    def __init__(self, reason: str, peak_mem_bytes: int | None = None):
        super().__init__(reason)
        self.peak_mem_bytes = peak_mem_bytes


@dataclass
class Budget:
    """The knobs that decide how long a run takes. The full GPU run must fit in one 8-minute call.

    warmup_ms, rep_ms: `triton.testing.do_bench` warm-up and measuring time per measurement (GPU);
        on the CPU, rep_ms is the least total time of a measurement's timed calls.
    cpu_runs: on the CPU each measurement times at least cpu_runs calls, and at least rep_ms of them
        in all (up to cpu_max_runs), and reports the fastest call.
    time_budget_s: wall-clock seconds for all tasks; later tasks are reported as skipped. None = no limit.
    flex_headdims: prefill head dims at which FlexAttention runs (each shape costs a compile of
        several seconds); None = every head dim.
    standard_mem_fraction: standard attention runs only when its estimated memory fits in this
        fraction of the free memory; otherwise its row reads "skipped: too large".
    """

    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_runs: int = 5
    cpu_max_runs: int = 1000
    time_budget_s: float | None = None
    flex_headdims: tuple[int, ...] | None = None
    standard_mem_fraction: float = 0.5


@dataclass
class Row:
    """One measurement. Rows are what results.json and results.csv hold, one per measurement."""

    mode: str
    impl: str
    dtype: str = ""
    batch: int | None = None
    seqlen_q: int | None = None
    seqlen_k: int | None = None
    nheads: int | None = None
    nheads_k: int | None = None
    headdim: int | None = None
    causal: bool | None = None
    window: tuple[int, int] | None = None
    direction: str = ""
    ms: float | None = None
    tflops: float | None = None
    tbps: float | None = None
    pct_of_ceiling: float | None = None
    peak_mem_bytes: int | None = None
    max_err: float | None = None
    ref_err: float | None = None
    status: str = "pending"
    error: str = ""
    note: str = ""
    flops: float | None = field(default=None, repr=False)
    bytes: float | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def set_time(self, ms: float) -> None:
        """Record a time and derive TFLOP/s or TB/s from the work the suite attached to the row."""
        self.ms = ms
        if self.flops is not None and ms > 0:
            self.tflops = self.flops / (ms * 1e-3) / 1e12
        if self.bytes is not None and ms > 0:
            self.tbps = self.bytes / (ms * 1e-3) / 1e12
        self.status = "ok"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["window"] = list(self.window) if self.window is not None else None
        for key in ("flops", "bytes"):
            d.pop(key)
        return d


ROW_FIELDS = [f.name for f in fields(Row) if f.name not in ("flops", "bytes")]


@dataclass
class Task:
    """A unit of work: `run(rows)` fills in `rows` (they start "pending")."""

    label: str
    rows: list[Row]
    run: Callable[[list[Row]], None] | None = None


def classify(exc: BaseException) -> tuple[str, str]:
    """Map an exception raised while measuring to (status, error text) for its rows."""
    text = f"{type(exc).__name__}: {exc}".strip()
    text = " ".join(text.split())
    if len(text) > 320:  # compiler errors put the cause last: keep both ends
        text = text[:150] + " ... " + text[-165:]
    if isinstance(exc, Unsupported):
        return f"n/a: {exc}", ""
    if isinstance(exc, SkipCell):
        return f"skipped: {exc}", ""
    if isinstance(exc, NotImplementedError):
        return "not implemented", text
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "OOM", text
    return "error", text


def free_memory() -> None:
    """Drop Python garbage and the CUDA cache between cells, so each cell starts clean."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> int:
    """Bytes free on `device` now (GPU: the driver's count; CPU: available physical memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GIB


def bench_ms(
    fn: Callable[[], object],
    device: torch.device,
    budget: Budget,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> float:
    """Median milliseconds of `fn()`.

    GPU: `triton.testing.do_bench` (it flushes L2 between calls and times with CUDA events).
    CPU: one warm-up call, then `time.perf_counter` intervals until there are at least
    `budget.cpu_runs` of them and they add up to `budget.rep_ms` (at most `cpu_max_runs`); the
    fastest is reported. On a CPU that other work shares, a call is often descheduled for several
    milliseconds: the median of three calls was off by up to 10x on this project's 2-core machine
    (decode at 256 keys: 162 us in one run, 40 ms in another), while the fastest of many calls
    reflects the code, the same way for every implementation.
    `grad_to_none` tensors get `.grad = None` before each call, so backward timings do not
    include gradient accumulation.
    """
    if device.type == "cuda":
        import triton.testing  # lazy: triton is heavy and absent on some machines

        return float(
            triton.testing.do_bench(
                fn,
                warmup=budget.warmup_ms,
                rep=budget.rep_ms,
                grad_to_none=list(grad_to_none) if grad_to_none else None,
                return_mode="median",
            )
        )
    times: list[float] = []
    warm = False
    while len(times) < budget.cpu_max_runs and (len(times) < budget.cpu_runs or sum(times) < budget.rep_ms):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        if warm:  # the first call is the warm-up
            times.append((time.perf_counter() - start) * 1e3)
        warm = True
    return min(times)


def bench_graph_ms(fn: Callable[[], object], device: torch.device, budget: Budget) -> tuple[float, str]:
    """Median milliseconds of one replay of `fn` captured in a CUDA graph, as a serving loop runs a
    decode step: host launch overhead drops out, and do_bench still flushes L2 before each replay.
    Returns (ms, note): the note is empty, or says that capture failed and `fn` was timed eagerly."""
    import triton.testing

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the capture: compiles, workspaces, autotuning
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # a peer that cannot be captured is still timed, and labelled
        torch.cuda.synchronize(device)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:120]
        return bench_ms(fn, device, budget), f"eager (CUDA graph capture failed: {reason})"
    ms = triton.testing.do_bench(graph.replay, warmup=budget.warmup_ms, rep=budget.rep_ms, return_mode="median")
    return float(ms), ""


def measure_ceilings(device: torch.device, budget: Budget, dtype: torch.dtype) -> list[Row]:
    """This machine's matmul and copy ceilings, against which our numbers are read (GPU only)."""
    mm = Row(mode="ceiling", impl=f"matmul_{_dtype_name(dtype)}_8192", dtype=_dtype_name(dtype))
    cp = Row(mode="ceiling", impl="d2d_copy_1GiB", note="bytes read + written")
    if device.type != "cuda":
        for row in (mm, cp):
            row.status = "n/a: ceilings are measured on CUDA devices only"
        return [mm, cp]
    for row, measure in ((mm, _matmul_ms), (cp, _copy_ms)):
        try:
            row.flops, row.bytes = (2.0 * 8192**3, None) if row is mm else (None, 2.0 * GIB)
            row.set_time(measure(device, budget, dtype))
        except Exception as exc:  # a ceiling that fails is reported, the run goes on
            row.status, row.error = classify(exc)
        free_memory()
    return [mm, cp]


def _matmul_ms(device: torch.device, budget: Budget, dtype: torch.dtype) -> float:
    """8192^3 matmul on random normal data (zeros would flatter the tensor cores' power draw)."""
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    return bench_ms(lambda: a @ b, device, budget)


def _copy_ms(device: torch.device, budget: Budget, dtype: torch.dtype) -> float:
    """Device-to-device copy of 1 GiB: 1 GiB read + 1 GiB written."""
    src = torch.randn(GIB // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return bench_ms(lambda: dst.copy_(src), device, budget)


class Progress:
    """A tiny progress bar on stderr. On a terminal it redraws one line; in a log it prints a line
    every 5% so that the log stays short."""

    def __init__(self, total: int, stream=None, width: int = 28):
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_bucket = -1

    def update(self, label: str) -> None:
        """Show that task number `done + 1`, described by `label`, is starting."""
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.start
        filled = int(self.width * frac)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {_clock(elapsed)} {label}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
        else:
            bucket = int(frac * 20)
            if bucket == self._last_bucket:
                return
            self._last_bucket = bucket
            self.stream.write(line + "\n")
        self.stream.flush()

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        elapsed = time.perf_counter() - self.start
        line = f"[{'#' * self.width}] {self.done}/{self.total} {_clock(elapsed)} done"
        self.stream.write(("\r" + line.ljust(150) if self.tty else line) + "\n")
        self.stream.flush()


def run_tasks(tasks: list[Task], progress: Progress, deadline: float | None) -> list[Row]:
    """Run `tasks` in order; every row comes back with a final status, whatever happened."""
    out: list[Row] = []
    for task in tasks:
        progress.update(task.label)
        if task.run is not None and any(r.status == "pending" for r in task.rows):
            if deadline is not None and time.perf_counter() > deadline:
                _mark(task.rows, "skipped: time budget", "")
            else:
                try:
                    task.run(task.rows)
                except Exception as exc:  # never crash: the reason goes into the rows
                    status, error = classify(exc)
                    peak = getattr(exc, "peak_mem_bytes", None)
                    for row in task.rows:
                        if row.status == "pending":
                            row.status, row.error = status, error
                            if peak is not None:
                                row.peak_mem_bytes = peak
                free_memory()
        _mark(task.rows, "error", "the task ended without measuring this row")
        out.extend(task.rows)
        progress.advance()
    return out


def _mark(rows: list[Row], status: str, error: str) -> None:
    for row in rows:
        if row.status == "pending":
            row.status, row.error = status, error


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m:02d}:{s:02d}"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}.get(
        dtype, str(dtype)
    )


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN/inf: store them as null."""
    return x if x is not None and math.isfinite(x) else None
