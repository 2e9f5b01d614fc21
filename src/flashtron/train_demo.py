"""Training demo: a small GPT trained on synthetic data with three attention backends swapped inside
the same model: flashtron, torch's SDPA, and the standard (materialised) attention.

For each backend it reports training throughput (tokens/s), peak memory, the final loss, and the
longest sequence that fits in memory for one training step at batch size 1 (doubling search,
catching out-of-memory, bounded by a length limit and a time budget). The data is generated: each
sequence repeats a random segment, so the loss falls as the model learns to copy. Nothing is
downloaded.

    python -m flashtron.train_demo            # CUDA: llama-small, bf16
    python -m flashtron.train_demo --quick    # CPU smoke run, < 60 s
    torchrun --nproc-per-node 2 -m flashtron.train_demo --context-parallel   # ring attention, 2 GPUs

With --context-parallel every rank of the torchrun job (NCCL on GPUs, gloo on CPUs; one process
without torchrun) trains the same GPT on its zigzag shard of each sequence, by ring attention, with
gradients averaged over the ranks; the report gives the world size, tokens/s in all and per rank,
and the longest *global* sequence one training step fits. Only flashtron runs there.

`main(argv)` returns the exit status; the markdown table goes to stdout and to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

BACKENDS = ("flashtron", "sdpa", "standard")


@dataclasses.dataclass
class Result:
    backend: str
    tokens_per_s: float | None = None  # all ranks together under context parallelism
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
    p.add_argument(
        "--context-parallel",
        nargs="?",
        const="zigzag",
        choices=("zigzag", "contiguous"),
        default=None,
        help="shard each sequence over the torchrun ranks and train with ring attention (layout, default zigzag)",
    )
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
    from flashtron.nn import ContextParallel, set_attention_backend

    torch.manual_seed(0)  # the same initial weights for every backend (and every rank)
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    cp = ContextParallel(None, args.context_parallel) if args.context_parallel else None
    return set_attention_backend(GPT(config, device=args.device, dtype=dtype, context_parallel=cp), backend)


# ---------------------------------------------------------------------------------------------
# Context parallelism: every rank runs this file; the ranks agree on every decision
# ---------------------------------------------------------------------------------------------


def _init_context_parallel(args) -> bool:
    """Joins the default process group, starting it when there is none (then returns True). Under
    torchrun, CUDA ranks take NCCL and their LOCAL_RANK's GPU; elsewhere gloo. Without torchrun: a
    group of one."""
    import torch
    import torch.distributed as dist

    cuda = torch.device(args.device).type == "cuda"
    if cuda and torch.device(args.device).index is None:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    if dist.is_initialized():
        return False
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


def _shard(args, *tensors):
    if not args.context_parallel:
        return tensors
    from flashtron.distributed import shard_sequence

    return tuple(shard_sequence(t, layout=args.context_parallel) for t in tensors)


def _average_gradients(args, model):
    """Every rank saw its shard of the same sequences: the model's gradient is the ranks' mean."""
    if not args.context_parallel:
        return
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _mean_over_ranks(args, value) -> float:
    """A rank's mean over its tokens -> the mean over all tokens (the shards are equal)."""
    if not args.context_parallel:
        return float(value)
    import torch.distributed as dist

    value = value.float().clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def _all_agree(args, ok: bool) -> bool:
    """True when `ok` holds on every rank (one rank stopping alone would leave the ring waiting)."""
    if not args.context_parallel:
        return ok
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], device=args.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


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
        x, y = _shard(args, *synthetic_batch(args.batch_size, args.seqlen, config.vocab_size, args.device, gen))
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(args, model)
        opt.step()
    _sync(args.device)
    elapsed = time.perf_counter() - start
    result.tokens_per_s = args.steps * args.batch_size * args.seqlen / elapsed
    result.final_loss = _mean_over_ranks(args, loss.detach())
    if cuda:
        result.peak_mib = torch.cuda.max_memory_allocated(args.device) / 2**20
    return result


def longest_sequence(args, config, backend) -> str:
    """Doubles the seqlen of one batch-1 training step (forward + backward) until it runs out of
    memory, reaches --search-limit or spends --search-seconds; returns the longest that ran. Under
    context parallelism the ranks agree on each stop, but an OOM that strikes one rank inside the
    ring leaves the others waiting for its transfers until the process group times out."""
    import torch

    model = _model(args, config, backend)
    gen = torch.Generator().manual_seed(2)
    deadline = time.perf_counter() + args.search_seconds
    seqlen, fits, why = args.seqlen, None, "limit"
    while seqlen <= args.search_limit:
        if not _all_agree(args, time.perf_counter() <= deadline):
            why = "time budget"
            break
        ran = False
        try:
            x, y = _shard(args, *synthetic_batch(1, seqlen, config.vocab_size, args.device, gen))
            _, loss = model(x, y)
            loss.backward()
            _sync(args.device)
            ran = True
        except (RuntimeError, MemoryError) as e:
            if not _is_oom(e):
                raise
        finally:
            x = y = loss = None
            model.zero_grad(set_to_none=True)
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
        if not _all_agree(args, ran):
            why = f"OOM at {seqlen}"
            break
        fits = seqlen
        seqlen *= 2
    if fits is None:
        return f"< {args.seqlen} ({why})"
    return f"{fits} ({why})" if why.startswith("OOM") else f">= {fits} ({why})"


def report(args, config, results) -> str:
    import torch

    device = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "CPU"
    heads_kv = config.n_head_kv or config.n_head
    world = args.world
    cp = f"; context parallel: ring attention, {args.context_parallel} shards, world {world}" if world else ""
    lines = [
        f"# flashtron training demo: {args.config}",
        "",
        f"device {device}; config {args.config} "
        f"(n_layer {config.n_layer}, n_embd {config.n_embd}, heads {config.n_head}/{heads_kv}); "
        f"batch {args.batch_size} x seqlen {args.seqlen}; {args.steps} timed steps after 1 warm-up{cp}",
        "",
    ]
    if world:
        lines += [
            "| backend | world | tokens/s | tokens/s per rank | peak memory per rank (MiB) | final loss "
            "| longest global seqlen, batch 1 |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
    else:
        lines += [
            "| backend | tokens/s | peak memory (MiB) | final loss | longest seqlen, batch 1 |",
            "|---|---:|---:|---:|---|",
        ]
    for r in results:
        lead = f"| {r.backend} | {world} |" if world else f"| {r.backend} |"
        if r.error:
            lines.append(f"{lead} error: {r.error} |" + " |" * (5 if world else 4))
            continue
        mem = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "n/a (CPU)"
        speed = f"{r.tokens_per_s:,.0f} | {r.tokens_per_s / world:,.0f}" if world else f"{r.tokens_per_s:,.0f}"
        lines.append(f"{lead} {speed} | {mem} | {r.final_loss:.3f} | {r.longest} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = _defaults(_parser().parse_args(argv))
    import torch

    from flashtron.models import GPTConfig

    config = GPTConfig.from_name(args.config)
    args.world, started = None, False
    if args.context_parallel:
        import torch.distributed as dist

        started = _init_context_parallel(args)
        args.world = dist.get_world_size()
        args.backends = ("flashtron",)  # the ring is flashtron's; SDPA and standard have no CP here
        parts = args.world * (2 if args.context_parallel == "zigzag" else 1)
        if args.seqlen % parts:
            raise SystemExit(f"train-demo: --seqlen must be a multiple of {parts} for {args.context_parallel} "
                             f"shards over {args.world} ranks, got {args.seqlen}")  # fmt: skip
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
    status = 0 if all(r.error is None for r in results) else 1
    if args.context_parallel:
        rank = dist.get_rank()
        if started:
            dist.destroy_process_group()
        if rank != 0:  # rank 0 reports for all
            return status
    text = report(args, config, results)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
