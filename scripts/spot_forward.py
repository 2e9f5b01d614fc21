"""Re-times a few prefill forward cells of the bench grid (bf16, batch * seqlen = 16384, nheads = 2048 / d)
for flashtron's default dispatch, the all-Triton path and SDPA's cuDNN backend, interleaved and repeated,
to tell a cell's real speed from one noisy bench measurement. Per implementation it prints the
TFLOP/s of do_bench (what the bench reports) for 3 rounds, then, with --split, the TFLOP/s of the
same call replayed from a CUDA graph (GPU time only) and the host microseconds per eager call (50
calls queued without a sync): a cell whose host time nears its GPU time is launch-bound.
    PYTHONPATH=src python3 scripts/spot_forward.py [--split] 128:1024:full 64:1024:causal ..."""

import os
import sys
import time

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashtron


def tflops(fn, b, h, s, d, causal):
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    return flops / triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e9


def host_us(fn, calls: int = 50) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def time_cell(d, s, causal, split=False):
    """{name: [TFLOP/s of each of 3 interleaved rounds]} for one cell."""
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    got = {"auto": [], "triton": [], "cudnn": []}
    for _ in range(3):
        for name in got:
            os.environ["FLASHTRON_BACKEND"] = name if name != "cudnn" else "auto"
            fn = cudnn if name == "cudnn" else (lambda: flashtron.flash_attn_func(q, k, v, causal=causal))
            got[name].append(tflops(fn, b, h, s, d, causal))
            if split and len(got[name]) == 3:
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                graph_ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
                got[name] += [flops / graph_ms / 1e9, host_us(fn)]
    os.environ.pop("FLASHTRON_BACKEND", None)
    return got


def main():
    torch.manual_seed(0)
    split = "--split" in sys.argv
    for cell in (a for a in sys.argv[1:] if a != "--split"):
        d, s, mask = cell.split(":")
        got = time_cell(int(d), int(s), mask == "causal", split)
        cells = "  ".join(
            f"{n} " + "/".join(f"{x:.0f}" for x in xs[:3]) + (f" graph {xs[3]:.0f} host {xs[4]:.0f}us" if split else "")
            for n, xs in got.items()
        )
        print(f"d{d} {s} {mask:<6}  {cells}", flush=True)


if __name__ == "__main__":
    main()
