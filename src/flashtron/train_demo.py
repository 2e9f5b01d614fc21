"""Training demo: a small GPT trained on synthetic data with three attention backends swapped inside
the same model: flashtron, torch's SDPA, and the standard (materialised) attention.

For each backend it reports training throughput (tokens/s), peak memory, the final loss, and the
longest sequence that fits in memory for one training step at batch size 1 (doubling search,
catching out-of-memory, bounded by a length limit and a time budget). The data is generated: each
sequence repeats a random segment, so the loss falls as the model learns to copy. Nothing is
downloaded.

    python -m flashtron.train_demo            # CUDA: llama-small, bf16
    python -m flashtron.train_demo --quick    # CPU smoke run, < 60 s

`main(argv)` returns the exit status; the markdown table goes to stdout and to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

BACKENDS = ("flashtron", "sdpa", "standard")


@dataclasses.dataclass
class Result:
    backend: str
    tokens_per_s: float | None = None
    peak_mib: float | None = None
    final_loss: float | None = None
    longest: str = "-"
    error: str | None = None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashtron train-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU run for CI (< 60 s)")
    p.add_argument("--device", default=None, help="default: cuda when available (and not --quick), else cpu")
    p.add_argument("--config", default=None, help="GPTConfig preset (default: llama-small, tiny-llama with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 20, 10 with --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 (2 with --quick)")
    p.add_argument("--seqlen", type=int, default=None, help="training sequence length (default 1024, 64 with --quick)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, from {','.join(BACKENDS)}")
    p.add_argument("--search-limit", type=int, default=None, help="longest seqlen tried (default 131072, 512 quick)")
    p.add_argument("--search-seconds", type=float, default=None, help="time budget per backend (default 120, 5 quick)")
    p.add_argument("--no-search", action="store_true", help="skip the longest-sequence search")
    p.add_argument("--out", default="train-demo.md", help="markdown report (default: train-demo.md)")
    return p


def _defaults(args) -> argparse.Namespace:
    quick = args.quick
    pick = lambda value, full, small: value if value is not None else (small if quick else full)
    import torch

    args.device = pick(args.device, "cuda" if torch.cuda.is_available() else "cpu", "cpu")
    args.config = pick(args.config, "llama-small", "tiny-llama")
    args.steps = pick(args.steps, 20, 10)
    args.batch_size = pick(args.batch_size, 8, 2)
    args.seqlen = pick(args.seqlen, 1024, 64)
    args.search_limit = pick(args.search_limit, 131072, 512)
    args.search_seconds = pick(args.search_seconds, 120.0, 5.0)
    args.backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad or not args.backends:
        raise SystemExit(f"train-demo: --backends must be some of {','.join(BACKENDS)}, got {bad or 'none'}")
    for name in ("steps", "batch_size", "seqlen", "search_limit"):
        if getattr(args, name) < 1:
            raise SystemExit(f"train-demo: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def synthetic_batch(batch_size, seqlen, vocab_size, device, generator):
    """(inputs, targets), each (batch_size, seqlen) int64: a random segment of 8..32 tokens repeated."""
    import torch

    period = int(torch.randint(8, 33, (1,), generator=generator))
    segment = torch.randint(0, vocab_size, (batch_size, period), generator=generator)
    tokens = segment.repeat(1, (seqlen + 1) // period + 1)[:, : seqlen + 1].to(device)
    return tokens[:, :-1], tokens[:, 1:]


def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _model(args, config, backend):
    import torch

    from flashtron.models import GPT
    from flashtron.nn import set_attention_backend

    torch.manual_seed(0)  # the same initial weights for every backend
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    return set_attention_backend(GPT(config, device=args.device, dtype=dtype), backend)


def train(args, config, backend) -> Result:
    """N timed steps (after one warm-up step that compiles the kernels)."""
    import torch

    result = Result(backend)
    model = _model(args, config, backend)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3 if args.quick else 1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    cuda = torch.device(args.device).type == "cuda"
    for step in range(args.steps + 1):
        if step == 1:  # the clock and the memory counter start after the warm-up step
            _sync(args.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(args.device)
            start = time.perf_counter()
        x, y = synthetic_batch(args.batch_size, args.seqlen, config.vocab_size, args.device, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(args.device)
    elapsed = time.perf_counter() - start
    result.tokens_per_s = args.steps * args.batch_size * args.seqlen / elapsed
    result.final_loss = float(loss.detach())
    if cuda:
        result.peak_mib = torch.cuda.max_memory_allocated(args.device) / 2**20
    return result


def longest_sequence(args, config, backend) -> str:
    """Doubles the seqlen of one batch-1 training step (forward + backward) until it runs out of
    memory, reaches --search-limit or spends --search-seconds; returns the longest that ran."""
    import torch

    model = _model(args, config, backend)
    gen = torch.Generator().manual_seed(2)
    deadline = time.perf_counter() + args.search_seconds
    seqlen, fits, why = args.seqlen, None, "limit"
    while seqlen <= args.search_limit:
        if time.perf_counter() > deadline:
            why = "time budget"
            break
        try:
            x, y = synthetic_batch(1, seqlen, config.vocab_size, args.device, gen)
            _, loss = model(x, y)
            loss.backward()
            _sync(args.device)
            fits = seqlen
        except (RuntimeError, MemoryError) as e:
            if not _is_oom(e):
                raise
            why = f"OOM at {seqlen}"
            break
        finally:
            x = y = loss = None
            model.zero_grad(set_to_none=True)
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
        seqlen *= 2
    if fits is None:
        return f"< {args.seqlen} ({why})"
    return f"{fits} ({why})" if why.startswith("OOM") else f">= {fits} ({why})"


def report(args, config, results) -> str:
    import torch

    device = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "CPU"
    heads_kv = config.n_head_kv or config.n_head
    lines = [
        f"# flashtron training demo: {args.config}",
        "",
        f"device {device}; config {args.config} "
        f"(n_layer {config.n_layer}, n_embd {config.n_embd}, heads {config.n_head}/{heads_kv}); "
        f"batch {args.batch_size} x seqlen {args.seqlen}; {args.steps} timed steps after 1 warm-up",
        "",
        "| backend | tokens/s | peak memory (MiB) | final loss | longest seqlen, batch 1 |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.backend} | error: {r.error} | | | |")
            continue
        mem = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "n/a (CPU)"
        lines.append(f"| {r.backend} | {r.tokens_per_s:,.0f} | {mem} | {r.final_loss:.3f} | {r.longest} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = _defaults(_parser().parse_args(argv))
    import torch

    from flashtron.models import GPTConfig

    config = GPTConfig.from_name(args.config)
    if config.rotary_dim > 0:  # positions are not learned: any length can be tried
        config = dataclasses.replace(config, max_seqlen=max(args.search_limit, args.seqlen))
    elif args.seqlen > config.max_seqlen:
        raise SystemExit(f"train-demo: --seqlen must be <= {config.max_seqlen} for {args.config}, got {args.seqlen}")
    else:  # learned positions stop at max_seqlen
        args.search_limit = min(args.search_limit, config.max_seqlen)
    results = []
    for backend in args.backends:
        try:
            result = train(args, config, backend)
            if not args.no_search:
                result.longest = longest_sequence(args, config, backend)
        except Exception as e:  # one backend failing must not hide the others' numbers
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
            result = Result(backend, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        results.append(result)
        print(f"{backend}: done", file=sys.stderr)
    text = report(args, config, results)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
