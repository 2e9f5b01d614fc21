"""`flashtron bench`: flashtron against its peers, in one run, on one device.

Layout: `runner` (rows, tasks, timing, ceilings, progress), `peers` (the implementations),
`suites` (check, prefill, decode, memory, window, varlen), `report` (tables, files, plots).
This module ties them together in `run_bench`. Benchmarks use only flashtron's public API.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import report
from .peers import DEFAULT_PEERS, make_peers
from .runner import Budget, Progress, Row, measure_ceilings, run_tasks
from .suites import GRIDS, MODES, SUITES, Bench, check_tasks

__all__ = ["BenchOptions", "run_bench", "MODES", "DTYPES"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Per grid: (warmup_ms, rep_ms, time budget in s, Flex prefill headdims). The full GPU run must fit
# in one device call of < 8 minutes with every Flex compile included; None = no limit.
BUDGETS = {
    "cuda": (25, 100, 420.0, None),
    "cuda-quick": (25, 100, 240.0, None),
    "cpu": (0, 200, None, None),
    "cpu-quick": (0, 200, 100.0, None),
}


@dataclass
class BenchOptions:
    """What `flashtron bench` was asked to do. None means "the default for this device"."""

    quick: bool = False
    out: str = "bench-out"
    modes: tuple[str, ...] = MODES
    peers: tuple[str, ...] | None = None
    dtype: str | None = None
    device: str | None = None
    time_budget_s: float | None = None
    warmup_ms: int | None = None
    rep_ms: int | None = None
    cpu_runs: int | None = None
    flex_headdims: tuple[int, ...] | None = None
    command: str = "flashtron bench"


def run_bench(opts: BenchOptions, stdout=None, stderr=None) -> int:
    """Run the benchmark, print the tables, write the files. Returns the exit code: 1 when the
    correctness check failed or flashtron raised an error (other than NotImplementedError)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    device = _device(opts.device)
    # bf16 on GPUs; fp32 on CPUs, where PyTorch's bf16 kernels (softmax, small matmuls) take slow paths.
    dtype_name = opts.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    key = device.type + ("-quick" if opts.quick else "")
    grid = GRIDS[key]
    warmup, rep, limit, flex_hd = BUDGETS[key]
    budget = Budget(
        warmup_ms=opts.warmup_ms if opts.warmup_ms is not None else warmup,
        rep_ms=opts.rep_ms if opts.rep_ms is not None else rep,
        cpu_runs=opts.cpu_runs if opts.cpu_runs is not None else Budget.cpu_runs,
        time_budget_s=(opts.time_budget_s or None) if opts.time_budget_s is not None else limit,
        flex_headdims=opts.flex_headdims if opts.flex_headdims is not None else flex_hd,
    )
    peers = make_peers(list(opts.peers if opts.peers is not None else DEFAULT_PEERS[device.type]))
    torch.manual_seed(0)

    ceilings = measure_ceilings(device, budget, dtype)
    meta = _meta(opts, device, dtype_name, grid, budget, peers, ceilings)
    out_dir = Path(opts.out)
    print("\n".join(report.header_lines(meta)), file=stdout, flush=True)

    bench = Bench(device, dtype, grid, budget, peers, copy_tbps=meta["ceilings"]["copy_tbps"])
    plan = [("check", check_tasks(bench))] + [(m, SUITES[m](bench)) for m in opts.modes]
    progress = Progress(sum(len(tasks) for _, tasks in plan), stream=stderr)
    deadline = time.perf_counter() + budget.time_budget_s if budget.time_budget_s else None
    rows: list[Row] = list(ceilings)
    for _, tasks in plan:
        rows += run_tasks(tasks, progress, deadline)
        report.write_results(out_dir, meta, rows)  # after every mode, so a killed run keeps its rows
    progress.close()

    tables = report.build_tables(rows, meta)
    print("\n" + "\n\n".join(t.to_text() for t in tables), file=stdout)
    written = report.write_report(out_dir, meta, tables, rows)
    where = out_dir.resolve()
    print(f"\nreport: {where / 'report.md'} (the tables above, in markdown)", file=stdout)
    print(f"data: {where / 'results.json'} and results.csv beside it (every measurement)", file=stdout)
    for line in written:
        print(line, file=stdout)
    return _verdict(rows, stdout, stderr)


def _verdict(rows: list[Row], stdout, stderr) -> int:
    failed = [r for r in rows if r.mode == "check" and r.status in ("FAIL", "error")]
    broken = [r for r in rows if r.impl.startswith("flashtron") and r.mode != "check" and r.status == "error"]
    unbuilt = [r for r in rows if r.mode == "check" and r.status == "not implemented"]
    if unbuilt:
        print("\nWARNING: flashtron.flash_attn_func is not implemented: correctness NOT checked.", file=stdout)
    if not failed and not broken:
        return 0
    lines = ["", "!" * 78]
    if failed:
        lines.append(f"!! CORRECTNESS CHECK FAILED: {len(failed)} tensor(s) beyond FlashAttention's tolerance")
        lines += [f"!!   {r.direction} @ ({r.batch}, {r.seqlen_q}, {r.seqlen_k}, {r.nheads}, {r.nheads_k}, "
                  f"{r.headdim}, causal={r.causal}): {r.error}" for r in failed]  # fmt: skip
    if broken:
        lines.append(f"!! flashtron raised errors in {len(broken)} benchmark cell(s), e.g. {broken[0].error}")
    lines.append("!" * 78)
    print("\n".join(lines), file=stdout, flush=True)
    print("flashtron bench: FAILED (see the banner in the output)", file=stderr, flush=True)
    return 1


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device: expected 'cuda' or 'cpu', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: 'cuda' was asked for, but torch sees no CUDA device")
    return device


def _meta(opts: BenchOptions, device, dtype_name: str, grid, budget: Budget, peers, ceilings: list[Row]) -> dict:
    mm = next((r.tflops for r in ceilings if r.impl.startswith("matmul") and r.ok), None)
    cp = next((r.tbps for r in ceilings if r.impl.startswith("d2d") and r.ok), None)
    notes = []
    if budget.time_budget_s:
        notes.append(f"time budget: {budget.time_budget_s:.0f} s; cells past it read 'skipped: time budget'")
    if budget.flex_headdims is not None and "flex" in peers:
        notes.append(f"FlexAttention runs at prefill headdim {budget.flex_headdims} only (time budget)")
    if device.type == "cpu":
        notes.append(_cpu_load())
    return {
        "device": _device_name(device),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": opts.command,
        "versions": _versions(device),
        "dtype": dtype_name,
        "grid": grid.description,
        "grid_sizes": {k: v for k, v in vars(grid).items() if k != "description"},
        "timing": (
            f"triton do_bench(warmup={budget.warmup_ms}, rep={budget.rep_ms}, median)"
            if device.type == "cuda"
            else f"fastest of >= {budget.cpu_runs} time.perf_counter runs and >= {budget.rep_ms} ms "
            "after 1 warm-up (a shared CPU deschedules calls; the fastest is the code's time)"
        ),
        "peers": [p for p in peers if p != "flashtron"],
        "ceilings": {"matmul_tflops": mm, "copy_tbps": cp},
        "notes": notes,
    }


def _cpu_load() -> str:
    """The machine's load when the run starts: CPU numbers from a busy machine are slow, all alike."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "CPU load: unknown"
    cores = os.cpu_count() or 1
    busy = " (other work shares the CPU: every number may be slow)" if load > 0.5 * cores else ""
    return f"CPU load at the start: {load:.2f} over the last minute on {cores} cores{busy}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 1024**3:.0f} GiB, {props.multi_processor_count} SMs)"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _versions(device: torch.device) -> dict:
    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": dist("triton"),
        "cuda": torch.version.cuda or "n/a",
        "cuDNN": str(cudnn) if cudnn else "n/a",
        "flashtron": getattr(sys.modules.get("flashtron"), "__version__", None) or dist("flashtron"),
    }
