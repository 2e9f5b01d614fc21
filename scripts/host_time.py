"""Host time of flashtron's eager calls on a machine without a GPU: the Python that runs before a kernel starts,
which bounds short calls (docs/perf-notes.md: an eager forward costs ~160 us of host time on the H200 machine,
more than its kernel at 512-1k tokens). CPU tensors are sent down the GPU route (autograd's dispatch, the
sm_90 check), and every kernel launch stops after Triton's binder and cache key, the work JITFunction.run does
before its launcher; the launcher itself (and the TMA descriptor fill) is not counted. So the numbers are the
library's own host cost plus Triton's argument binding, on this machine's CPU.

    PYTHONPATH=src python3 scripts/host_time.py [--profile CASE] [--repeat N]

Prints the least microseconds per call over N repeats of 1000 calls, per case; --profile prints cProfile's top
entries for one case. Compare runs on one machine only, and on an idle one."""

import argparse
import cProfile
import pstats
import sys
import timeit

import torch
import triton.runtime.jit as jit
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend

import flashtron
from flashtron import autograd, launch_hopper

BACKEND = make_backend(GPUTarget("cuda", 90, 32))
launches: dict = {}


def _bind_only(self, *args, grid, warmup, **kwargs):
    """JITFunction.run up to the launcher: binder (specialization) and cache key, as on the GPU."""
    if not hasattr(self, "_host_time_binder"):
        self._host_time_binder = jit.create_function_from_signature(self.signature, self.params, BACKEND)
        self._host_time_keys = {}
    kwargs["debug"] = kwargs.get("debug", self.debug)
    kwargs["instrumentation_mode"] = ""
    _, specialization, options = self._host_time_binder(*args, **kwargs)
    jit.compute_cache_key(self._host_time_keys, specialization, options)
    launches[self.fn.__name__] = launches.get(self.fn.__name__, 0) + 1


def stand_in_gpu() -> None:
    jit.JITFunction.run = _bind_only
    autograd.uses_triton = lambda t: True
    launch_hopper._on_sm90 = lambda device: True


def cases() -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 256, 8, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    q128, k128, v128 = (torch.randn(8, 256, 8, 128, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = flashtron.flash_attn_func(q128, k128, v128, causal=True)
    dout = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            flashtron.flash_attn_func(q, k, v, causal=True)

    def fwd_grad():
        flashtron.flash_attn_func(q128, k128, v128, causal=True)

    def bwd():
        q128.grad = k128.grad = v128.grad = None
        out.backward(dout, retain_graph=True)

    return {"fwd d64 causal, no grad": fwd, "fwd d128 causal, grad": fwd_grad, "bwd d128 causal": bwd}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    stand_in_gpu()
    all_cases = cases()
    for name, fn in all_cases.items():
        launches.clear()
        fn()
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(launches.items()))
        best = min(timeit.repeat(fn, number=1000, repeat=args.repeat)) / 1000 * 1e6
        print(f"{name:28s} {best:7.1f} us   ({kernels})", flush=True)
    if args.profile:
        fn = all_cases[args.profile]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2000):
            fn()
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
