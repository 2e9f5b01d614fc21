"""Time flashtron's CPU path, forward and backward, full / causal / sliding window (the kind of run
behind the CPU numbers in docs/perf-notes.md).

    PYTHONPATH=src .venv/bin/python scripts/cpu_time.py [--seqlen 4096] [--nheads 4] [--headdim 128]
"""

from __future__ import annotations

import argparse
import time

import torch

import flashtron


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--nheads", type=int, default=4)
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--window", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    shape = (1, args.seqlen, args.nheads, args.headdim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    cases = {"full": {}, "causal": {"causal": True}, f"window ({args.window}, 0)": {"window_size": (args.window, 0)}}
    print(f"CPU path, fp32, {shape}, torch threads {torch.get_num_threads()}; min of 2 runs")
    for name, kw in cases.items():
        fwd, bwd = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            out = flashtron.flash_attn_func(q, k, v, **kw)
            t1 = time.perf_counter()
            out.backward(torch.randn_like(out))
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
        print(f"{name:16} forward {min(fwd) * 1e3:8.1f} ms   backward {min(bwd) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
