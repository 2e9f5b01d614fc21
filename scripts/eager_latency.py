"""Eager (no CUDA graph) latency of small calls, where Python overhead dominates: decode through
flash_attn_with_kvcache and a short forward+backward. Run it once per source tree and compare:
    PYTHONPATH=<tree>/src python3 scripts/eager_latency.py --label <name> [--profile "fwd+bwd 256x8x64"]
Prints microseconds per call: the least of 15 repeats of 200 back-to-back calls (launch-bound), and
of 200 calls each followed by a synchronize (end-to-end latency). --profile NAME then prints cProfile's
top host functions over 500 calls of that case (where the host time goes: our Python, Triton's launcher,
torch's allocator or autograd engine). The fwd+bwd case is also timed with the autograd engine's device threads
off (torch.autograd.set_multithreading_enabled(False): the backward runs on the calling thread), which says
what handing our Python backward to the engine's CUDA thread and back costs per call."""

import argparse
import cProfile
import pstats
import time

import torch

import flashtron


def per_call_us(fn, sync_each: bool, calls: int = 200, repeats: int = 15) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
            if sync_each:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return min(samples)  # the machine's other load only adds time: the least is the least noisy


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default=flashtron.__file__)
    parser.add_argument("--profile", default=None, help="a case name, as printed")
    parsed = parser.parse_args()
    label = parsed.label
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    cases = {}
    for cache in (1024, 8192):
        q = torch.randn(8, 1, 32, 128, device=dev, dtype=dt)
        kc = torch.randn(8, cache, 8, 128, device=dev, dtype=dt)
        vc = torch.randn_like(kc)
        k_new, v_new = torch.randn(8, 1, 8, 128, device=dev, dtype=dt), torch.randn(8, 1, 8, 128, device=dev, dtype=dt)
        lens = torch.full((8,), cache - 2, dtype=torch.int32, device=dev)
        cases[f"decode cache {cache}"] = lambda q=q, kc=kc, vc=vc, lens=lens: flashtron.flash_attn_with_kvcache(
            q, kc, vc, cache_seqlens=lens, causal=True
        )
        cases[f"decode+append cache {cache}"] = lambda q=q, kc=kc, vc=vc, k=k_new, v=v_new, lens=lens: (
            flashtron.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True)
        )
    q, k, v = (torch.randn(1, 256, 8, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    cases["fwd 256x8x64"] = lambda: flashtron.flash_attn_func(q, k, v, causal=True)

    def fwd_bwd():
        flashtron.flash_attn_func(q, k, v, causal=True).sum().backward()

    cases["fwd+bwd 256x8x64"] = fwd_bwd

    def fwd_bwd_one_thread():
        with torch.autograd.set_multithreading_enabled(False):
            fwd_bwd()

    cases["fwd+bwd 256x8x64 1 thread"] = fwd_bwd_one_thread
    for name, fn in cases.items():
        print(f"{label:>8}  {name:<26} {per_call_us(fn, False):8.1f} us/call  {per_call_us(fn, True):8.1f} us synced")
    if parsed.profile:
        fn = cases[parsed.profile]
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(500):
            fn()
        torch.cuda.synchronize()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
