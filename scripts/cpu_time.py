"""Time flashtron's CPU path, forward and backward, full / causal / sliding window, or a decode step
over a dense KV cache next to SDPA-math (the runs behind the CPU numbers in README.md and
docs/perf-notes.md).

    PYTHONPATH=src .venv/bin/python scripts/cpu_time.py [--seqlen 4096] [--nheads 4] [--headdim 128]
    PYTHONPATH=src .venv/bin/python scripts/cpu_time.py --decode
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

import flashtron


def decode() -> None:
    """flash_attn_with_kvcache, one query token, fp32, against SDPA-math on the same cache: median of 20."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    print(f"CPU decode step, fp32, torch threads {torch.get_num_threads()}; median of 20 after 3 warm-ups")
    for b, h, hk, d, length in ((1, 32, 8, 128, 4096), (4, 32, 8, 128, 1024), (2, 8, 2, 64, 256)):
        q, kc, vc = torch.randn(b, 1, h, d), torch.randn(b, length, hk, d), torch.randn(b, length, hk, d)
        lens = torch.full((b,), length, dtype=torch.int32)
        ours = _median_us(functools.partial(flashtron.flash_attn_with_kvcache, q, kc, vc, cache_seqlens=lens))
        heads_first = (t.transpose(1, 2) for t in (q, kc, vc))
        theirs = _median_us(functools.partial(sdpa, *heads_first, enable_gqa=True))
        shape = f"batch {b}, heads {h}/{hk}, head dim {d}, {length} keys"
        print(f"{shape}: flashtron {ours:8.0f} us   SDPA-math {theirs:8.0f} us")


def _median_us(fn, runs: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[runs // 2] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--nheads", type=int, default=4)
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--decode", action="store_true", help="time a decode step instead (fixed shapes)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.decode:
        decode()
        return
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
