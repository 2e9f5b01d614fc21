"""Re-times a few prefill forward cells of the bench grid (bf16, batch * seqlen = 16384, nheads = 2048 / d)
for flashtron's default dispatch, the all-Triton path and SDPA's cuDNN backend, interleaved and repeated,
to tell a cell's real speed from one noisy bench measurement. Per implementation it prints the
TFLOP/s of do_bench (what the bench reports) for 3 rounds, then, with --split, the TFLOP/s of the
same call replayed from a CUDA graph (GPU time only) and the host microseconds per eager call (50
calls queued without a sync): a cell whose host time nears its GPU time is launch-bound. --backward times the
backward instead (out.backward(dout, retain_graph=True), gradients reset as the bench does); with --split it adds
the host time per call with autograd's device threads off (torch.autograd.set_multithreading_enabled(False): on
CUDA the engine otherwise runs a Python Function's backward on another thread, which must take the GIL).
    PYTHONPATH=src python3 scripts/spot_forward.py [--split] [--backward] 128:1024:full 64:1024:causal ..."""

import os
import sys
import time

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashtron


def cell_flops(b, h, s, d, causal, backward=False):
    """The bench's count: 4 b h s^2 d, halved under causal; the backward 2.5x the forward."""
    return 4 * b * h * s * s * d / (2 if causal else 1) * (2.5 if backward else 1)


def tflops(fn, flops, grads=None):
    return flops / triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median") / 1e9


def host_us(fn, calls: int = 50, grads=()) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        for t in grads:  # as do_bench's grad_to_none, so a backward does not accumulate
            t.grad = None
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def time_cell(d, s, causal, split=False, backward=False):
    """{name: [TFLOP/s of each of 3 interleaved rounds, then with split: graph TFLOP/s, host us (and with backward
    the host us with autograd's multithreading off)]} for one cell."""
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    flops = cell_flops(b, h, s, d, causal, backward)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def ours():
        return flashtron.flash_attn_func(q, k, v, causal=causal)

    got = {"auto": [], "triton": [], "cudnn": []}
    for _ in range(3):
        for name in got:
            os.environ["FLASHTRON_BACKEND"] = name if name != "cudnn" else "auto"
            fn = cudnn if name == "cudnn" else ours
            if backward:  # the graph of one forward, its backward timed as the bench does
                out = fn()
                dout = torch.randn_like(out)
                fn = lambda out=out, dout=dout: out.backward(dout, retain_graph=True)  # noqa: E731
            got[name].append(tflops(fn, flops, [q, k, v] if backward else None))
            if split and len(got[name]) == 3:
                try:  # autograd's backward under graph capture can refuse (another thread's stream)
                    graph_ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
                    got[name].append(flops / graph_ms / 1e9)
                except Exception:
                    got[name].append(float("nan"))
                grads = (q, k, v) if backward else ()
                got[name].append(host_us(fn, grads=grads))
                if backward:
                    torch.autograd.set_multithreading_enabled(False)
                    got[name].append(host_us(fn, grads=grads))
                    torch.autograd.set_multithreading_enabled(True)
    os.environ.pop("FLASHTRON_BACKEND", None)
    return got


def main():
    torch.manual_seed(0)
    split, backward = "--split" in sys.argv, "--backward" in sys.argv
    for cell in (a for a in sys.argv[1:] if not a.startswith("--")):
        d, s, mask = cell.split(":")
        got = time_cell(int(d), int(s), mask == "causal", split, backward)

        def extra(xs):
            if not split:
                return ""
            one_thread = f" (1 thread {xs[5]:.0f}us)" if backward else ""
            return f" graph {xs[3]:.0f} host {xs[4]:.0f}us{one_thread}"

        cells = "  ".join(f"{n} " + "/".join(f"{x:.0f}" for x in xs[:3]) + extra(xs) for n, xs in got.items())
        print(f"d{d} {s} {mask:<6} {'bwd' if backward else 'fwd'}  {cells}", flush=True)


if __name__ == "__main__":
    main()
