"""Sweep the dK/dV kernel's tile configs on one shape and print each gradient's error next to the
PyTorch-in-dtype error (a debugging aid for GPU-only failures; the interpreter has no pipelining)."""

import sys
import time

import torch

from flashtron import configs, flash_attn_func
from flashtron.configs import TileConfig
from flashtron.reference import attention_ref


def errors(b, s, h, hk, d, dtype, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, n, d, device="cuda", dtype=dtype) for n in (h, hk, hk))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attn_func(*leaves, causal=causal)
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, leaves, dout)
    rdt = torch.float64 if dtype == torch.float32 else torch.float32
    ref_in = [t.to(rdt).requires_grad_() for t in (q, k, v)]
    pt_in = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = attention_ref(*ref_in, causal=causal)[0]
    o_pt = attention_ref(*pt_in, causal=causal, upcast=False, reorder_ops=True)[0]
    g_ref = torch.autograd.grad(o_ref, ref_in, dout.to(rdt))
    g_pt = torch.autograd.grad(o_pt, pt_in, dout)
    e = lambda a, r: (a.double() - r.double()).abs().max().item()
    return [(n, e(a, r), e(p, r)) for n, a, r, p in zip(("dq", "dk", "dv"), g, g_ref, g_pt)]


cases = [
    (2, 512, 8, 8, 64, torch.bfloat16, False),
    (2, 300, 8, 2, 128, torch.bfloat16, False),
    (2, 300, 8, 8, 64, torch.float32, True),
]
sweep = [
    TileConfig(32, 128, 4, 3),
    TileConfig(32, 128, 4, 1),
    TileConfig(64, 64, 4, 2),
    TileConfig(32, 64, 4, 2),
    TileConfig(64, 64, 8, 2),
    TileConfig(16, 64, 4, 2),
]
for case in cases:
    bucket = configs.head_dim_bucket(case[4])
    for cfg in sweep:
        configs.HOPPER_BWD_DKDV[bucket] = cfg
        t0 = time.time()
        try:
            res = errors(*case)
            msg = "  ".join(f"{n} {a:.2e}/{p:.2e}{'!' if a > 3 * p + 1e-6 else ''}" for n, a, p in res)
        except Exception as exc:  # report and keep sweeping
            msg = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(
            f"{str(case[5])[6:]:8} d{case[4]:<4} causal={case[6]!s:5} {cfg}  {msg}  ({time.time() - t0:.0f}s)",
            flush=True,
        )
sys.exit(0)
