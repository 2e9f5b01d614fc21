"""Peak memory of attention forward + backward on the CPU: flashtron's blockwise path vs materialised.

Each case runs in its own fresh subprocess, so the kernel's high-water mark (VmHWM in
/proc/self/status) starts clean. The number reported is the growth of VmHWM across forward + backward,
measured after the inputs exist, so it is the extra memory the computation needs.

    PYTHONPATH=src .venv/bin/python scripts/cpu_memory.py [--seqlen 8192] [--headdim 64] [--nheads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

CASES = ("blockwise", "materialised")


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def _run_case(case: str, seqlen: int, headdim: int, nheads: int) -> dict:
    import torch

    from flashtron import cpu
    from flashtron.options import AttnOptions

    torch.set_num_threads(1)  # the machine is shared; memory does not depend on threads
    torch.manual_seed(0)
    shape = (1, seqlen, nheads, headdim)
    q, k, v, dout = (torch.randn(shape) for _ in range(4))
    scale = 1.0 / math.sqrt(headdim)
    before = _hwm_mib()
    start = time.perf_counter()
    if case == "blockwise":
        opts = AttnOptions(softmax_scale=scale)
        out, lse = cpu.attention_forward(q, k, v, opts)
        grads = cpu.attention_backward(dout, q, k, v, out, lse, opts)
    else:
        qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
        scores = (qt @ kt.transpose(-1, -2)) * scale  # [b, h, seqlen, seqlen]
        out = torch.softmax(scores, dim=-1) @ vt
        out.backward(dout.transpose(1, 2))
        grads = (qt.grad, kt.grad, vt.grad)
    seconds = time.perf_counter() - start
    assert all(torch.isfinite(g).all() for g in grads[:3])
    return {"case": case, "peak_growth_mib": _hwm_mib() - before, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--nheads", type=int, default=2)
    parser.add_argument("--case", choices=CASES, help="run one case in this process (used internally)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_run_case(args.case, args.seqlen, args.headdim, args.nheads)))
        return

    sizes = ["--seqlen", str(args.seqlen), "--headdim", str(args.headdim), "--nheads", str(args.nheads)]
    rows = []
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, *sizes]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    one_matrix = args.nheads * args.seqlen**2 * 4 / 2**20
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(
        f"batch 1, seqlen {args.seqlen}, nheads {args.nheads}, headdim {args.headdim}, fp32, non-causal, "
        f"forward + backward; one fp32 score matrix over all heads = {one_matrix:.0f} MiB\n"
    )
    print("| path | peak RSS growth (MiB) | time (s, 1 thread) |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['peak_growth_mib']:.1f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
