"""Turning result rows into tables (text and markdown), results.json, results.csv and PNG plots.

A cell that was not measured shows a short tag (n/a, OOM, skip, NI = not implemented, err, FAIL)
and each table lists the reasons beneath it, so no implementation is ever silently dropped.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .peers import PEERS, RATIO_PEERS, visible_pairs
from .runner import GIB, ROW_FIELDS, Row, finite_or_none

LABELS = {"flashtron": "flashtron"}


def label(impl: str) -> str:
    """Column label of an implementation (result rows store the short --peers name)."""
    if impl in LABELS:
        return LABELS[impl]
    if impl in PEERS:
        LABELS[impl] = PEERS[impl]().label
        return LABELS[impl]
    for base in sorted(list(PEERS) + ["flashtron"], key=len, reverse=True):
        if impl.startswith(base + "_"):  # variants: flashtron_paged16, sdpa_flash_padded, ...
            return f"{label(base)} {impl[len(base) + 1 :].replace('_', ' ')}"
    return impl


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        widths = [max(len(str(c)) for c in col) for col in zip(self.columns, *self.rows)]
        fmt = lambda cells: "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )
        lines = [self.title, fmt(self.columns), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in self.rows]
        lines += [f"  * {n}" for n in self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# cells


def _num(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _tag(row: Row | None) -> str:
    if row is None:
        return "-"
    status = row.status
    for prefix, tag in (("n/a", "n/a"), ("skipped", "skip"), ("not implemented", "NI"), ("OOM", "OOM")):
        if status.startswith(prefix):
            return tag
    return {"FAIL": "FAIL", "error": "err"}.get(status, status)


def _cell(row: Row | None, value: Callable[[Row], str]) -> str:
    return value(row) if row is not None and row.ok else _tag(row)


def _ratio_words(ratio_peers) -> str:
    """A title's mention of the speedup columns, only when the table has some (none on the CPU)."""
    if not ratio_peers:
        return ""
    return "; speedups of ours over " + ", ".join(short for _, short in ratio_peers) + " on the right"


def _speedup(ours: Row | None, peer: Row | None) -> str:
    """How many times faster ours is than the peer (peer time / our time) for the same work."""
    if ours is None or peer is None or not (ours.ok and peer.ok) or not ours.ms or not peer.ms:
        return "-"
    return f"{peer.ms / ours.ms:.2f}x"


class Notes:
    """Collects why cells are empty: one line per (implementation, status, error)."""

    def __init__(self, row_notes: bool = True):
        self.seen: dict[tuple[str, str, str], int] = {}
        self.row_notes = row_notes

    def add(self, row: Row | None) -> None:
        if row is None:
            return
        if row.ok:
            if row.note and self.row_notes:  # how a peer was run (e.g. KV repeated for GQA) belongs beside its numbers
                self.seen.setdefault((label(row.impl), "note", row.note), 0)
                self.seen[(label(row.impl), "note", row.note)] += 1
            return
        key = (label(row.impl), row.status, row.error)
        self.seen[key] = self.seen.get(key, 0) + 1

    def lines(self) -> list[str]:
        out = []
        for (impl, status, error), n in self.seen.items():
            cells = f" ({n} cells)" if n > 1 else ""
            if status == "note":
                out.append(f"{impl}: {error}{cells}")
            else:
                out.append(f"{impl}: {status}{cells}" + (f" — {error}" if error else ""))
        return out


def _index(rows: Iterable[Row], mode: str) -> dict[tuple, Row]:
    return {
        (r.impl, r.headdim, r.causal, r.seqlen_q, r.seqlen_k, r.direction, tuple(r.window or ())): r
        for r in rows
        if r.mode == mode
    }


def _impls(rows: Iterable[Row], mode: str) -> list[str]:
    """Implementations in a mode, peers first in run order, ours last (next to the ratios)."""
    seen = list(dict.fromkeys(r.impl for r in rows if r.mode == mode))
    ours = [i for i in seen if i.startswith("flashtron")]
    return [i for i in seen if i not in ours] + ours


# ----------------------------------------------------------------------------------------------
# tables


def check_table(rows: list[Row]) -> Table | None:
    checks = [r for r in rows if r.mode == "check"]
    if not checks:
        return None
    t = Table(
        "Correctness: max abs error vs an fp32/fp64 reference (bound: 2x PyTorch-in-dtype, 3x for grads)",
        ["shape (b, sq, sk, h, hk, d, causal)", "tensor", "flashtron", "PyTorch in dtype", "status"],
    )
    notes = Notes()
    for r in checks:
        shape = f"({r.batch}, {r.seqlen_q}, {r.seqlen_k}, {r.nheads}, {r.nheads_k}, {r.headdim}, {r.causal})"
        err = lambda x: "-" if x is None else f"{x:.2e}"
        t.rows.append([shape, r.direction, err(r.max_err), err(r.ref_err), r.status])
        if r.status != "ok":
            notes.add(r)
    t.notes = notes.lines()
    return t


def prefill_tables(rows: list[Row]) -> list[Table]:
    idx = _index(rows, "prefill")
    if not idx:
        return []
    headdims = sorted({k[1] for k in idx})
    tables = []
    for direction, word in (("fwd", "Forward"), ("bwd", "Backward")):
        for hd in headdims:
            # per head dim: the wide head dims run fewer seqlens and peers than the grid's
            at_hd = [r for r in rows if r.mode == "prefill" and r.headdim == hd]
            impls = _impls(at_hd, "prefill")
            ratio_peers = [(name, short) for name, short in RATIO_PEERS if name in impls]
            cells = sorted({(k[2], k[3]) for k in idx if k[1] == hd})  # (causal, seqlen)
            sample = next(r for k, r in idx.items() if k[1] == hd)
            t = Table(
                f"Prefill {word} TFLOP/s, headdim {hd} (batch*seqlen = {sample.batch * sample.seqlen_q}, "
                f"nheads = {sample.nheads}){_ratio_words(ratio_peers)}",
                ["seqlen"] + [label(i) for i in impls] + [f"vs {short}" for _, short in ratio_peers],
            )
            notes = Notes()
            for causal, s in cells:
                get = lambda impl, hd=hd, causal=causal, s=s, d=direction: idx.get((impl, hd, causal, s, s, d, ()))
                line = [f"{s} causal" if causal else str(s)]
                for impl in impls:
                    line.append(_cell(get(impl), lambda r: _num(r.tflops)))
                    notes.add(get(impl))
                line += [_speedup(get("flashtron"), get(name)) for name, _ in ratio_peers]
                t.rows.append(line)
            t.notes = notes.lines()
            tables.append(t)
    return tables


def decode_table(rows: list[Row], copy_tbps: float | None) -> Table | None:
    dec = [r for r in rows if r.mode == "decode"]
    if not dec:
        return None
    impls = _impls(rows, "decode")
    idx = {(r.impl, r.seqlen_k): r for r in dec}
    ratio_peers = [(name, short) for name, short in RATIO_PEERS if name in impls]
    r0 = dec[0]
    ceiling = f"{copy_tbps:.2f} TB/s" if copy_tbps else "not measured"
    t = Table(
        f"Decode: microseconds (KV TB/s, % of copy ceiling {ceiling}); batch {r0.batch}, "
        f"{r0.nheads}/{r0.nheads_k} heads, headdim {r0.headdim}; on GPUs each step is replayed from a CUDA graph "
        f"unless noted{_ratio_words(ratio_peers)}",
        ["cache"] + [label(i) for i in impls] + [f"vs {short}" for _, short in ratio_peers],
    )
    notes = Notes()

    def fmt(r: Row) -> str:
        pct = f", {r.pct_of_ceiling:.0f}%" if r.pct_of_ceiling is not None else ""
        return f"{_num(r.ms * 1e3)} ({r.tbps:.3g}{pct})"

    for L in sorted({r.seqlen_k for r in dec}):
        line = [str(L)]
        for impl in impls:
            line.append(_cell(idx.get((impl, L)), fmt))
            notes.add(idx.get((impl, L)))
        line += [_speedup(idx.get(("flashtron", L)), idx.get((name, L))) for name, _ in ratio_peers]
        t.rows.append(line)
    t.notes = notes.lines()
    return t


def memory_tables(rows: list[Row]) -> list[Table]:
    tables = []
    mem = [r for r in rows if r.mode == "memory"]
    gib = lambda b: f"{b / GIB:.3f}" if b is not None else "-"
    if mem:
        r0 = mem[0]
        fa2 = next((r for r in mem if r.impl == "sdpa_flash" and r.ok), None)
        t = Table(
            f"Extra peak memory of forward+backward, GiB: seqlen {r0.seqlen_q}, {r0.nheads} heads, "
            f"headdim {r0.headdim}, causal, batch 1",
            ["impl", "extra GiB", "vs FA2", "status"],
        )
        for r in mem:
            shown = gib(r.peak_mem_bytes) + (" (estimated)" if not r.ok and r.peak_mem_bytes else "")
            ratio = f"{r.peak_mem_bytes / fa2.peak_mem_bytes:.2f}x" if fa2 and r.peak_mem_bytes else "-"
            status = r.status + (f" — {r.error}" if r.error else "")
            t.rows.append([label(r.impl), shown if r.peak_mem_bytes is not None else _tag(r), ratio, status])
        tables.append(t)
    curve = [r for r in rows if r.mode == "memory_curve"]
    if curve:
        impls = _impls(rows, "memory_curve")
        idx = {(r.impl, r.seqlen_q): r for r in curve}
        t = Table("Extra peak memory (GiB) vs seqlen, causal fwd+bwd", ["seqlen"] + [label(i) for i in impls])
        notes = Notes()
        for s in sorted({r.seqlen_q for r in curve}):
            t.rows.append([str(s)] + [_cell(idx.get((i, s)), lambda r: gib(r.peak_mem_bytes)) for i in impls])
            for i in impls:
                notes.add(idx.get((i, s)))
        t.notes = notes.lines()
        tables.append(t)
    return tables


def window_table(rows: list[Row]) -> Table | None:
    win = [r for r in rows if r.mode == "window"]
    if not win:
        return None
    windowed = next(r.window for r in win if r.window)
    s = win[0].seqlen_q
    ideal = visible_pairs(s, s, tuple(windowed)) / visible_pairs(s, s, (-1, 0))
    t = Table(
        f"Sliding window {tuple(windowed)} vs full causal, forward, seqlen {s}, headdim {win[0].headdim} "
        f"(ideal time ratio = visible pairs ratio = {ideal:.3f})",
        ["impl", "causal ms", "window ms", "window/causal", "causal TFLOP/s", "window TFLOP/s"],
    )
    notes = Notes()
    for impl in _impls(rows, "window"):
        full = next((r for r in win if r.impl == impl and not r.window), None)
        part = next((r for r in win if r.impl == impl and r.window), None)
        ratio = f"{part.ms / full.ms:.3f}" if full and part and full.ok and part.ok else "-"
        t.rows.append([
            label(impl), _cell(full, lambda r: f"{r.ms:.3f}"), _cell(part, lambda r: f"{r.ms:.3f}"), ratio,
            _cell(full, lambda r: _num(r.tflops)), _cell(part, lambda r: _num(r.tflops)),
        ])  # fmt: skip
        notes.add(full)
        notes.add(part)
    t.notes = notes.lines()
    return t


def varlen_table(rows: list[Row]) -> Table | None:
    var = [r for r in rows if r.mode == "varlen"]
    if not var:
        return None
    t = Table(
        f"Varlen, causal: {var[0].note}; TFLOP/s count real tokens only",
        ["impl", "fwd ms", "fwd TFLOP/s", "bwd ms", "bwd TFLOP/s"],
    )
    notes = Notes(row_notes=False)  # the rows' note is the batch description, already in the title
    for impl in _impls(rows, "varlen"):
        fwd = next((r for r in var if r.impl == impl and r.direction == "fwd"), None)
        bwd = next((r for r in var if r.impl == impl and r.direction == "bwd"), None)
        t.rows.append([
            label(impl), _cell(fwd, lambda r: f"{r.ms:.3f}"), _cell(fwd, lambda r: _num(r.tflops)),
            _cell(bwd, lambda r: f"{r.ms:.3f}"), _cell(bwd, lambda r: _num(r.tflops)),
        ])  # fmt: skip
        notes.add(fwd)
        notes.add(bwd)
    t.notes = notes.lines()
    return t


# The prefill targets (../shared/PERF.md) are set at these head dims; other head dims are reported only.
TARGET_HEADDIMS = (64, 128)


def targets_table(rows: list[Row], copy_tbps: float | None) -> Table | None:
    """The project's floors and goals (each row states its own), counted over the cells where ours and
    the peers named were all measured."""
    t = Table("Targets, over cells where every implementation named was measured", ["target", "met"])
    pre = _index(rows, "prefill")
    for direction in ("fwd", "bwd"):
        floor = goal = n_floor = n_goal = 0
        for key, ours in pre.items():
            if key[0] != "flashtron" or key[5] != direction or not ours.ok or key[1] not in TARGET_HEADDIMS:
                continue
            peer = lambda name, key=key: pre.get((name,) + key[1:])
            flex, fa2 = peer("flex"), peer("sdpa_flash")
            if flex and fa2 and flex.ok and fa2.ok:
                n_floor += 1
                floor += ours.tflops >= flex.tflops and ours.tflops >= 1.3 * fa2.tflops
            best = [p.tflops for p in (peer("sdpa_cudnn"), peer("fa4")) if p and p.ok]
            if best:
                n_goal += 1
                goal += ours.tflops >= max(best)
        if n_floor:
            t.rows.append([f"prefill {direction}: >= Flex and >= 1.3x FA2 (floor)", f"{floor}/{n_floor}"])
        if n_goal:
            t.rows.append([f"prefill {direction}: >= max(cuDNN, FA4) (goal)", f"{goal}/{n_goal}"])
    dec = [r for r in rows if r.mode == "decode" and r.impl == "flashtron" and r.ok]
    if copy_tbps:
        long = [r for r in dec if r.seqlen_k >= 8192]
        met = sum(r.tbps >= 0.85 * copy_tbps for r in long)
        t.rows.append(["decode, cache >= 8k: >= 85% of the copy ceiling", f"{met}/{len(long)}"])
    fa2_dec = {r.seqlen_k: r for r in rows if r.mode == "decode" and r.impl == "sdpa_flash" and r.ok}
    short = [r for r in dec if r.seqlen_k in fa2_dec and r.seqlen_k <= 1024]
    if short:
        met = sum(r.ms <= 2 * fa2_dec[r.seqlen_k].ms for r in short)
        t.rows.append(["decode, cache 1k: <= 2x FA2 latency", f"{met}/{len(short)}"])
    mem = {r.impl: r for r in rows if r.mode == "memory" and r.ok}
    if "flashtron" in mem and "sdpa_flash" in mem:
        ok = mem["flashtron"].peak_mem_bytes <= 1.1 * mem["sdpa_flash"].peak_mem_bytes
        t.rows.append(["memory: <= 1.1x FA2's extra memory", "1/1" if ok else "0/1"])
    checks = [r for r in rows if r.mode == "check"]
    if checks:
        t.rows.append(
            ["accuracy: error <= 2x PyTorch-in-dtype (3x grads)", f"{sum(r.ok for r in checks)}/{len(checks)}"]
        )
    return t if t.rows else None


def build_tables(rows: list[Row], meta: dict) -> list[Table]:
    copy = meta.get("ceilings", {}).get("copy_tbps")
    tables: list[Table | None] = [check_table(rows)]
    tables += prefill_tables(rows)
    tables += [decode_table(rows, copy)]
    tables += memory_tables(rows)
    tables += [window_table(rows), varlen_table(rows), targets_table(rows, copy)]
    return [t for t in tables if t is not None]


# ----------------------------------------------------------------------------------------------
# files


def header_lines(meta: dict) -> list[str]:
    v = meta["versions"]
    ceil = meta.get("ceilings", {})
    mm, cp = ceil.get("matmul_tflops"), ceil.get("copy_tbps")
    lines = [
        f"device: {meta['device']}",
        f"date: {meta['date']}",
        f"command: {meta['command']}",
        "versions: " + ", ".join(f"{k} {v[k]}" for k in v),
        f"dtype: {meta['dtype']}; grid: {meta['grid']}; timing: {meta['timing']}",
        "ceilings: "
        + (f"{meta['dtype']} matmul 8192^3 {mm:.0f} TFLOP/s, " if mm else "matmul not measured, ")
        + (f"device copy {cp:.2f} TB/s (read+write)" if cp else "copy not measured"),
    ]
    lines += meta.get("notes", [])
    return lines


def render_markdown(meta: dict, tables: list[Table]) -> str:
    head = ["# flashtron benchmark", ""] + [f"- {line}" for line in header_lines(meta)]
    return "\n\n".join(["\n".join(head)] + [t.to_markdown() for t in tables]) + "\n"


def write_results(out_dir: Path, meta: dict, rows: list[Row]) -> None:
    """results.json ({"meta": ..., "rows": [...]}, one row per measurement) and results.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dicts = [_clean(r.to_dict()) for r in rows]
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": dicts}, indent=1) + "\n")
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        w.writeheader()
        for d in dicts:
            d = dict(d)
            d["window"] = "" if d["window"] is None else f"{d['window'][0]},{d['window'][1]}"
            w.writerow(d)


def _clean(d: dict) -> dict:
    return {k: finite_or_none(v) if isinstance(v, float) else v for k, v in d.items()}


def write_report(out_dir: Path, meta: dict, tables: list[Table], rows: list[Row]) -> list[str]:
    """report.md and the PNG plots; returns lines to print about what was (not) written."""
    (out_dir / "report.md").write_text(render_markdown(meta, tables))
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots: none (matplotlib is not installed)"]
    written = []
    for name, draw in (("prefill.png", _plot_prefill), ("speedup.png", _plot_speedup), ("memory.png", _plot_memory)):
        fig = draw(plt, rows)
        if fig is not None:
            fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(name)
    return [f"plots: {', '.join(written)} beside the report" if written else "plots: none (no data to plot)"]


def _prefill_configs(rows: list[Row]) -> list[tuple[int, bool]]:
    return sorted({(r.headdim, r.causal) for r in rows if r.mode == "prefill"})


def _plot_grid(plt, rows: list[Row], ylabel: str, value: Callable[[Row, dict], float | None]):
    configs = _prefill_configs(rows)
    if not configs:
        return None
    pre = _index(rows, "prefill")
    fig, axes = plt.subplots(2, len(configs), figsize=(4.2 * len(configs), 7), squeeze=False)
    for i, direction in enumerate(("fwd", "bwd")):
        for j, (hd, causal) in enumerate(configs):
            ax = axes[i][j]
            for impl in _impls(rows, "prefill"):
                pts = []
                for key, r in sorted(pre.items(), key=lambda kv: kv[0][3]):
                    if key[:3] == (impl, hd, causal) and key[5] == direction and r.ok:
                        y = value(r, pre)
                        if y is not None:
                            pts.append((r.seqlen_q, y))
                if pts:
                    style = "-o" if impl == "flashtron" else "--."
                    ax.plot(*zip(*pts), style, label=label(impl))
            ax.set_xscale("log", base=2)
            ax.set_title(f"{direction}, hd{hd}, {'causal' if causal else 'non-causal'}", fontsize=9)
            ax.set_xlabel("seqlen")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_prefill(plt, rows):
    return _plot_grid(plt, rows, "TFLOP/s", lambda r, pre: r.tflops)


def _plot_speedup(plt, rows):
    def speedup(r: Row, pre: dict) -> float | None:
        std = pre.get(("standard", r.headdim, r.causal, r.seqlen_q, r.seqlen_k, r.direction, ()))
        return std.ms / r.ms if std is not None and std.ok and r.ms else None

    if not any(r.impl == "standard" and r.ok for r in rows if r.mode == "prefill"):
        return None
    return _plot_grid(plt, rows, "speedup over standard attention", speedup)


def _plot_memory(plt, rows):
    curve = [r for r in rows if r.mode == "memory_curve" and r.ok]
    if not curve:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for impl in _impls(curve, "memory_curve"):
        pts = sorted((r.seqlen_q, r.peak_mem_bytes / GIB) for r in curve if r.impl == impl)
        ax.plot(*zip(*pts), "-o", label=label(impl))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("seqlen")
    ax.set_ylabel("extra peak memory, GiB (fwd+bwd)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
