"""The `flashtron` command line. Sub-commands: `bench` (flashtron against its peers, one run).

Each sub-command registers a parser and a handler in `COMMANDS`, so adding one is a function and a
line. Heavy imports (torch, the benchmark package) happen inside the handlers, never at import.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable

BENCH_MODES = ("prefill", "decode", "memory", "window", "varlen")
BENCH_DTYPES = ("bf16", "fp16", "fp32")


def _csv(kind: str, allowed: tuple[str, ...] | None = None) -> Callable[[str], tuple[str, ...]]:
    """An argparse type for comma-separated lists, checked against `allowed`."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        if not items:
            raise argparse.ArgumentTypeError(f"{kind}: expected a comma-separated list, got {text!r}")
        bad = [x for x in items if allowed is not None and x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{kind}: unknown {bad}; expected some of {', '.join(allowed)}")
        return items

    return parse


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark flashtron against its peers (SDPA, FlexAttention, FA4, standard) in one run",
        description="Correctness check, then prefill/decode/memory/window/varlen benchmarks of flashtron "
        "and its peers on one device; prints tables and writes results.json, results.csv, report.md and "
        "PNG plots under --out.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes (CPU: < 2 minutes on 2 cores)")
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out/)")
    p.add_argument(
        "--modes",
        type=_csv("--modes", BENCH_MODES),
        default=BENCH_MODES,
        help=f"comma-separated, from {','.join(BENCH_MODES)} (default: all)",
    )
    p.add_argument(
        "--peers",
        type=_csv("--peers"),
        default=None,
        help="comma-separated peers, from standard,sdpa_math,sdpa_flash,sdpa_efficient,sdpa_cudnn,flex,fa4,"
        "flashtron_autotune (ours with FLASHTRON_AUTOTUNE=1) or 'all' (default on GPU: standard, the three "
        "SDPA backends, flex and fa4; on CPU: standard,sdpa_math); flashtron always runs",
    )
    p.add_argument(
        "--dtype",
        choices=BENCH_DTYPES,
        default=None,
        help="input dtype (default: bf16 on GPU; fp32 on CPU, where PyTorch's bf16 kernels are slow paths)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for all measurements; later cells are reported as skipped (0: no limit; "
        "default: 420 on GPU, 240 with --quick, 100 for the CPU --quick run)",
    )
    p.add_argument("--warmup", type=int, default=None, help="do_bench warm-up, ms (default 25)")
    p.add_argument(
        "--rep",
        type=int,
        default=None,
        help="do_bench measuring time, ms (default 100); on the CPU the least time of the timed calls (default 200)",
    )
    p.add_argument("--runs", type=int, default=None, help="on the CPU, the least number of timed calls (default 5)")
    p.add_argument(
        "--flex-headdims",
        type=_int_list,
        default=None,
        help="prefill head dims at which FlexAttention runs, e.g. 128 (each shape costs a compile)",
    )
    p.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace, argv: list[str]) -> int:
    from .bench import BenchOptions, run_bench  # lazy: pulls in torch
    from .bench.peers import PEERS

    peers = args.peers
    if peers == ("all",):
        peers = tuple(PEERS)
    elif peers is not None and any(p not in PEERS for p in peers):
        bad = [p for p in peers if p not in PEERS]
        raise SystemExit(f"flashtron bench: --peers: unknown {bad}; expected some of {', '.join(PEERS)} or 'all'")
    opts = BenchOptions(
        quick=args.quick,
        out=args.out,
        modes=tuple(args.modes),
        peers=peers,
        dtype=args.dtype,
        device=args.device,
        time_budget_s=args.time_budget,
        warmup_ms=args.warmup,
        rep_ms=args.rep,
        cpu_runs=args.runs,
        flex_headdims=args.flex_headdims,
        command="flashtron " + shlex.join(argv),
    )
    try:
        return run_bench(opts)
    except ValueError as exc:  # bad --device and the like: a message, not a traceback
        raise SystemExit(f"flashtron bench: {exc}") from None


def _add_train_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-demo",
        help="train a small GPT on synthetic data with flashtron, SDPA and standard attention",
        add_help=False,  # train_demo parses its own flags (see `flashtron train-demo --help`)
    )
    p.set_defaults(handler=_run_train_demo)


def _run_train_demo(args: argparse.Namespace, argv: list[str]) -> int:
    from flashtron import train_demo

    return train_demo.main(argv[argv.index("train-demo") + 1 :])


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_bench, _add_train_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashtron", description="flashtron: FlashAttention in Python + Triton.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `flashtron` script. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, _ = parser.parse_known_args(argv) if argv[:1] == ["train-demo"] else (parser.parse_args(argv), None)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return args.handler(args, argv)


if __name__ == "__main__":
    sys.exit(main())
