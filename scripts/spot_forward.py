"""Re-times a few prefill forward cells of the bench grid (bf16, batch * seqlen = 16384, nheads = 2048 / d)
for flashtron's default dispatch, the all-Triton path and SDPA's cuDNN backend, interleaved and repeated,
to tell a cell's real speed from one noisy bench measurement.
    PYTHONPATH=src python3 scripts/spot_forward.py 128:1024:full 64:1024:causal ..."""

import os
import sys

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashtron


def tflops(fn, b, h, s, d, causal):
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    return flops / triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e9


def time_cell(d, s, causal):
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
    os.environ.pop("FLASHTRON_BACKEND", None)
    return got


def main():
    torch.manual_seed(0)
    for cell in sys.argv[1:]:
        d, s, mask = cell.split(":")
        got = time_cell(int(d), int(s), mask == "causal")
        cells = "  ".join(f"{n} " + "/".join(f"{x:.0f}" for x in xs) for n, xs in got.items())
        print(f"d{d} {s} {mask:<6}  {cells}", flush=True)


if __name__ == "__main__":
    main()
