"""Context-parallel scaling: ring attention's forward + backward per world size, and the overlap.

Run once per world size under torchrun (NCCL on GPUs, gloo on CPUs), then combine the runs:

    torchrun --nproc-per-node 1 scripts/cp_scaling.py --out cp-w1.json
    torchrun --nproc-per-node 2 scripts/cp_scaling.py --out cp-w2.json
    python scripts/cp_scaling.py --report cp-w1.json cp-w2.json      # the markdown table

For each global seqlen (batch 1, llama-like heads by default) it times ring_flash_attn_func forward
+ backward on the zigzag shards, and the same ring steps with the transfers left out (each rank
reuses its own K/V, the calls unchanged): the compute alone. step / compute near 1 means the K/V
transfers hide behind the compute. tokens/s per rank (GPU) = seqlen / step time / world, and the
efficiency of world W is its tokens/s per rank over world 1's at the same seqlen. An out-of-memory
seqlen is reported as such. `--varlen N` times ring_flash_attn_varlen_func instead, on N packed
sequences of uneven lengths, with "compute alone" the same step with K/V gathered beforehand.
`--longest` then runs `flashtron train-demo --context-parallel` (llama-small by default) for the
longest sequence a training step fits at this world size.

CPU smoke run: torchrun --nproc-per-node 2 scripts/cp_scaling.py --seqlens 256,512 --heads 4
--heads-k 2 --headdim 32 --dtype fp32 --reps 2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from flashtron.distributed import ring, shard_sequence
from flashtron.distributed.comm import P2PRing, Pending
from flashtron.options import AttnOptions

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ComputeOnlyRing:
    """P2PRing's interface without transfers: every step sees this rank's own K/V (same shapes, so
    the same calls), and the dK/dV sums are dropped. Times the compute alone."""

    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def exchange(self, tensors):
        return Pending([], tensors)

    def send_next(self, tensors):
        return Pending([], [])

    def recv_prev(self, like):
        return Pending([], [torch.zeros_like(t) for t in like])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _inputs(args, seqlen, device):
    gen = torch.Generator(device=device).manual_seed(0)
    make = lambda heads: torch.randn(1, seqlen, heads, args.headdim, device=device, dtype=DTYPES[args.dtype],
                                     generator=gen)  # fmt: skip
    return make(args.heads), make(args.heads_k), make(args.heads_k)


def ring_step(args, seqlen, comm, device):
    """One ring forward + backward on this rank's zigzag shards, as a closure."""
    q, k, v = (shard_sequence(t) for t in _inputs(args, seqlen, device))
    dout = torch.randn_like(q)
    opts = AttnOptions(softmax_scale=args.headdim**-0.5, window_right=0 if args.causal else -1)

    def step():
        out, lse = ring.forward(q, k, v, opts, comm, "zigzag")
        ring.backward(dout, None, q, k, v, out, lse, opts, comm, "zigzag")

    return step


def varlen_step(args, seqlen, device, gather):
    """ring_flash_attn_varlen_func forward + backward on this rank's 1/world of `args.varlen`
    sequences of uneven lengths packed into `seqlen` tokens. gather=False: the K/V all-gather (and
    its reduce-scatter) done once outside the step, leaving the compute alone."""
    from flashtron.distributed import comm, ring_flash_attn_varlen_func, varlen

    rank, world = dist.get_rank(), dist.get_world_size()
    cuts = torch.rand(args.varlen - 1, generator=torch.Generator().manual_seed(1)).mul(seqlen).long().sort().values
    cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([seqlen])]).to(torch.int32)
    lengths = cu.diff()
    n = seqlen // world
    q, k, v = (t[0, rank * n : (rank + 1) * n].detach().requires_grad_() for t in _inputs(args, seqlen, device))
    dout = torch.randn_like(q)
    kw = dict(causal=args.causal)
    cu_dev, cu_list = cu.to(device), cu.tolist()
    k_all, v_all = (comm.all_gather(t.detach(), 0, comm.group_name(dist.group.WORLD)).requires_grad_() for t in (k, v))

    def step():
        if gather:
            out = ring_flash_attn_varlen_func(q, k, v, cu_dev, cu_dev, int(lengths.max()), int(lengths.max()), **kw)
        else:
            window = (-1, 0 if args.causal else -1)
            out, _ = varlen.attention(q, k_all, v_all, cu_list, cu_list, rank * n, (rank + 1) * n, window)
        out.backward(dout)

    return step


def time_step(args, make_step, device):
    """Median seconds of make_step()(), or None on OOM (agreed by all ranks, so none is left
    waiting in a transfer)."""
    times, ok = [], True
    try:
        step = make_step()
        for i in range(args.warmup + args.reps):
            dist.barrier()
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        del step
    except (RuntimeError, MemoryError) as e:
        if not _is_oom(e):
            raise
        ok = False
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not flag.item():
        return None
    # the slowest rank sets the step time
    worst = torch.tensor([statistics.median(times)], device=device, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def measure(args) -> dict:
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    real, alone = P2PRing(dist.group.WORLD), ComputeOnlyRing(rank, world)
    rows = []
    for seqlen in args.seqlens:
        if args.varlen:
            with_comm, without = (functools.partial(varlen_step, args, seqlen, device, g) for g in (True, False))
        else:
            with_comm, without = (functools.partial(ring_step, args, seqlen, c, device) for c in (real, alone))
        step = time_step(args, with_comm, device)
        compute = time_step(args, without, device) if step is not None else None
        rows.append(dict(seqlen=seqlen, step_s=step, compute_s=compute))
        if rank == 0:
            print(f"world {world} seqlen {seqlen}: step {step} s, compute alone {compute} s", file=sys.stderr)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    shape = dict(heads=args.heads, heads_k=args.heads_k, headdim=args.headdim, dtype=args.dtype, causal=args.causal,
                 varlen=args.varlen)  # fmt: skip
    result = dict(world=world, device=name, backend=dist.get_backend(), shape=shape, rows=rows)
    dist.destroy_process_group()
    return result if rank == 0 else None


def report(runs) -> str:
    """The markdown table of several runs (one per world size)."""
    base = {r["seqlen"]: r for r in next((run["rows"] for run in runs if run["world"] == 1), [])}
    s = runs[0]["shape"]
    causal = "causal" if s["causal"] else "full"
    what = "Ring attention, zigzag, batch 1"
    if s.get("varlen"):
        what = f"ring_flash_attn_varlen_func (K/V all-gathered), {s['varlen']} packed sequences"
    lines = [
        f"{what}, forward + backward, {s['heads']}/{s['heads_k']} heads of dim {s['headdim']}, {s['dtype']}, "
        f"{causal}; {runs[0]['device']}, {runs[0]['backend']}.",
        "",
        "| world | seqlen | step (ms) | compute alone (ms) | step / compute | tokens/s per rank | efficiency |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in sorted(runs, key=lambda r: r["world"]):
        w = run["world"]
        for row in run["rows"]:
            if row["step_s"] is None:
                lines.append(f"| {w} | {row['seqlen']} | OOM | | | | |")
                continue
            per_gpu = row["seqlen"] / row["step_s"] / w
            one = base.get(row["seqlen"])
            eff = f"{per_gpu / (row['seqlen'] / one['step_s']):.2f}" if one and one["step_s"] else "n/a"
            ratio = row["step_s"] / row["compute_s"]
            lines.append(
                f"| {w} | {row['seqlen']} | {row['step_s'] * 1e3:.1f} | {row['compute_s'] * 1e3:.1f} | {ratio:.2f} "
                f"| {per_gpu:,.0f} | {eff} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", default="32768,65536,131072,262144", help="global seqlens, comma-separated")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--heads-k", type=int, default=8)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--full", dest="causal", action="store_false", help="no causal mask (default: causal)")
    p.add_argument("--varlen", type=int, default=0, help="time the varlen function on this many packed sequences")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default=None, help="cpu to force gloo on a GPU machine")
    p.add_argument("--out", default=None, help="JSON of this run (rank 0 writes it)")
    p.add_argument("--longest", action="store_true", help="then the longest trainable sequence (train-demo)")
    p.add_argument("--report", nargs="+", default=None, help="JSON files of earlier runs: print the table")
    args = p.parse_args(argv)
    if args.report:
        runs = []
        for path in args.report:
            with open(path) as f:
                runs.append(json.load(f))
        print(report(runs))
        return 0
    args.seqlens = [int(x) for x in args.seqlens.split(",")]
    result = measure(args)
    if result is not None:
        print(report([result]))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    if args.longest:
        from flashtron import train_demo

        return train_demo.main(["--context-parallel", "--search-limit", str(1 << 20), "--search-seconds", "600"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
