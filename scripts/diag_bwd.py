"""Sweep the backward kernels' tile configs: each candidate's gradient errors next to the
PyTorch-in-dtype error, and (with --time) its backward time on a PERF.md-sized problem.

    python scripts/diag_bwd.py check   # compile and check every candidate (can share the GPU)
    python scripts/diag_bwd.py time    # time the candidates that passed; run on an idle GPU

A debugging and tuning aid for GPU-only behaviour (the interpreter has no pipelining). Results go to
stdout, one line per (kernel, head dim, config); `time` reads the `check` log from stdin-free JSON.
"""

import json
import os
import sys
import time

import torch

from flashtron import configs, flash_attn_func
from flashtron.configs import TileConfig
from flashtron.reference import attention_ref

CANDIDATES = {
    ("dkdv", 64): [
        (64, 64, 4, 2),
        (64, 128, 4, 2),
        (128, 64, 8, 2),
        (64, 128, 8, 3),
        (128, 128, 8, 2),
        (32, 128, 4, 3),
    ],
    ("dkdv", 128): [(32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 1)],
    ("dq", 64): [(128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
    ("dq", 128): [(64, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
}
STATE = os.path.join(os.environ.get("OUT", "."), "diag-bwd.json")


def grads(q, k, v, dout, causal):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attn_func(*leaves, causal=causal)
    return torch.autograd.grad(out, leaves, dout)


def errors(d, causal, hk):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 300, n, d, device="cuda", dtype=torch.bfloat16) for n in (8, hk, hk))
    dout = torch.randn(2, 300, 8, d, device="cuda", dtype=torch.bfloat16)
    got = grads(q, k, v, dout, causal)
    ref_in = [t.float().requires_grad_() for t in (q, k, v)]
    pt_in = [t.clone().requires_grad_() for t in (q, k, v)]
    g_ref = torch.autograd.grad(attention_ref(*ref_in, causal=causal)[0], ref_in, dout.float())
    o_pt = attention_ref(*pt_in, causal=causal, upcast=False, reorder_ops=True)[0]
    g_pt = torch.autograd.grad(o_pt, pt_in, dout)
    e = lambda a, r: (a.double() - r.double()).abs().max().item()
    return [(n, e(a, r), e(p, r)) for n, a, r, p in zip(("dq", "dk", "dv"), got, g_ref, g_pt)]


def bwd_ms(d, causal):
    import triton

    seqlen, h = 4096, 2048 // d
    q, k, v = (torch.randn(4, seqlen, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = flash_attn_func(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    ms = triton.testing.do_bench(lambda: out.backward(dout, retain_graph=True), return_mode="median")
    flops = 2.5 * 4 * 4 * seqlen * seqlen * h * d / (2 if causal else 1)
    return ms, flops / ms / 1e9


def install(kernel, d, cfg):
    table = configs.HOPPER_BWD_DKDV if kernel == "dkdv" else configs.HOPPER_BWD_DQ
    table[d] = TileConfig(*cfg)


def main(mode):
    defaults = {d: (configs.HOPPER_BWD_DKDV[d], configs.HOPPER_BWD_DQ[d]) for d in (64, 128)}
    results = json.load(open(STATE)) if mode == "time" and os.path.exists(STATE) else {}
    for (kernel, d), cands in CANDIDATES.items():
        for cfg in cands:
            configs.HOPPER_BWD_DKDV[d], configs.HOPPER_BWD_DQ[d] = defaults[d]
            install(kernel, d, cfg)
            key = f"{kernel} d{d} {cfg}"
            t0 = time.time()
            try:
                if mode == "check":
                    res = errors(d, False, 2) + errors(d, True, 8)
                    ok = all(a <= 3 * p + 1e-3 for _, a, p in res)
                    results[key] = {"ok": ok, "errors": res}
                    msg = ("ok  " if ok else "BAD ") + "  ".join(f"{n} {a:.1e}/{p:.1e}" for n, a, p in res)
                else:
                    if not results.get(key, {}).get("ok", False):
                        continue
                    times = {c: bwd_ms(d, c) for c in (False, True)}
                    results[key]["time"] = times
                    msg = "  ".join(f"causal={c} {ms:.3f} ms {tf:.0f} TFLOP/s" for c, (ms, tf) in times.items())
            except Exception as exc:  # report and keep sweeping
                results[key] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                msg = results[key]["error"]
            print(f"{key:28} {msg}  ({time.time() - t0:.0f}s)", flush=True)
    json.dump(results, open(STATE, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "check")
