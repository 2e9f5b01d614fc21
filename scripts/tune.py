"""Sweep tile configs and decode split counts on the GPU: every candidate is first checked for
correctness, then timed; `check` and `time` save their results in $OUT/tune.json and print a table,
`paged` only prints.

    python scripts/tune.py check [--workers N]  # compile and check every candidate (may share the GPU)
    python scripts/tune.py time                 # time the candidates that passed (needs an idle GPU)
    python scripts/tune.py paged                # paged decode against contiguous at 32k, by extra stages

Kinds: `fwd` (forward tile), `dkdv` and `dq` (the backward's two kernels, each swept with the other
at its table tile; a dK/dV candidate serves causal calls too while swept), `decode` (decode tile and
split count, timed as CUDA-graph replays next to SDPA-flash and SDPA-cuDNN). TUNE_ONLY="dkdv:128,..."
limits a run to those (kind, head dim) pairs. A candidate is installed by editing the config tables
in this process, never through the environment. Correctness uses the tests' tolerance rule
(tests/tolerance.py) against an fp32 reference. Sizes follow the bench's GPU grid: batch * seqlen =
16384 tokens, nheads = 2048 / headdim, bf16.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import functools
import json
import math
import multiprocessing
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "src"), os.path.join(HERE, "..", "tests")]

import torch  # noqa: E402

from flashtron.configs import HOPPER_CANDIDATES  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (kind, head dim): the autotune candidates. The first
# entry is HOPPER_FWD's / HOPPER_BWD_*'s tile; the window and causal tables' tiles are among the rest.
TILES = {
    kd: [(c.block_m, c.block_n, c.num_warps, c.num_stages) for c in cfgs] for kd, cfgs in HOPPER_CANDIDATES.items()
}
# decode: (BLOCK_M, BLOCK_N, num_warps, num_stages, min_blocks_per_split) at head dim 128, each timed at
# every split count of DECODE_SPLITS. The later five have more stages (checked to fit sm_90 shared
# memory dense and paged, 2026-12-01).
DECODE_TILES = [
    (64, 128, 4, 3, 8), (64, 64, 4, 3, 4), (64, 32, 4, 3, 8), (64, 64, 4, 2, 4), (64, 128, 8, 3, 8),
    (64, 64, 4, 4, 4), (64, 64, 4, 5, 4), (64, 32, 4, 8, 8), (32, 128, 4, 4, 8), (32, 128, 8, 4, 8),
]  # fmt: skip
DECODE_SPLITS = [0, 1, 2, 3, 4, 8, 16]
DECODE_CACHES = [1024, 8192, 32768]
PREFILL_SEQLENS = {"fwd": [512, 4096], "bwd": [1024, 8192]}
WINDOW = (16384, 16, 128, (1024, 0))  # seqlen, heads, headdim, window: the bench's window row
OUT = os.environ.get("OUT", ".")
STATE = os.path.join(OUT, "tune.json")


def install(kind: str, d: int, cfg: tuple) -> None:
    from flashtron import configs

    if kind == "decode":
        configs.GPU_DECODE[d] = configs.DecodeConfig(*cfg)
        return
    table = {"fwd": configs.HOPPER_FWD, "dkdv": configs.HOPPER_BWD_DKDV, "dq": configs.HOPPER_BWD_DQ}[kind]
    if kind == "dkdv":  # the candidate serves causal calls too, so that both columns time it
        configs.HOPPER_BWD_DKDV_CAUSAL.pop(d, None)
    table[d] = configs.TileConfig(*cfg)


def run_attention(kind: str, q, k, v, **kw):
    import flashtron

    return flashtron.flash_attn_func(q, k, v, **kw)


# ---------------------------------------------------------------------------------------- check


def check_prefill(kind: str, d: int) -> list[str]:
    """Out and gradients of two awkward shapes against the fp32 reference; raises on a miss."""
    from flashtron.reference import attention_ref
    from tolerance import assert_fa_close, assert_grads_close

    msgs = []
    for b, sq, sk, h, hk, causal in ((2, 300, 300, 8, 8, False), (2, 333, 517, 8, 2, True)):
        gen = torch.Generator().manual_seed(sq * 7 + sk)
        q, k, v, do = (
            torch.randn(b, s, n, d, generator=gen).cuda().bfloat16() for s, n in ((sq, h), (sk, hk), (sk, hk), (sq, h))
        )
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = run_attention(kind, *leaves, causal=causal)
        ref_in = [t.float().requires_grad_() for t in (q, k, v)]
        pt_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = attention_ref(*ref_in, causal=causal)[0]
        pt = attention_ref(*pt_in, causal=causal, upcast=False, reorder_ops=True)[0]
        assert_fa_close(out, ref, pt)
        if kind != "fwd":
            got = torch.autograd.grad(out, leaves, do)
            assert_grads_close(got, torch.autograd.grad(ref, ref_in, do.float()), torch.autograd.grad(pt, pt_in, do))
        msgs.append(f"{'causal' if causal else 'full'} {sq}x{sk} ok")
    return msgs


def check_decode(cfg: tuple) -> list[str]:
    import flashtron
    from flashtron.reference import attention_ref
    from tolerance import assert_fa_close

    b, h, hk, d, L = 4, 32, 8, 128, 3000
    q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(b, L + 100, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = torch.tensor([L, 1, 777, 2048], dtype=torch.int32, device="cuda")
    msgs = []
    for splits in (1, 3, 8):
        out = flashtron.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=splits)
        for i in range(b):
            n = int(lens[i])
            ins = (q[i : i + 1], kc[i : i + 1, :n], vc[i : i + 1, :n])
            ref = attention_ref(*ins)[0]
            pt = attention_ref(*ins, upcast=False, reorder_ops=True)[0]
            assert_fa_close(out[i : i + 1], ref, pt, name=f"out[{i}] splits={splits}")
        msgs.append(f"splits {splits} ok")
    return msgs


def check_one(kind: str, d: int, cfg: tuple) -> dict:
    install(kind, d, cfg)
    t0 = time.time()
    try:
        msgs = check_decode(cfg) if kind == "decode" else check_prefill(kind, d)
        return {"ok": True, "detail": "; ".join(msgs), "seconds": round(time.time() - t0, 1)}
    except Exception as exc:  # a failing candidate is a result, not a crash
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        if not isinstance(exc, AssertionError):
            text += " | " + traceback.format_exc().splitlines()[-3].strip()
        return {"ok": False, "detail": text[:400], "seconds": round(time.time() - t0, 1)}


def selected(kind: str, d: int) -> bool:
    """TUNE_ONLY="dkdv:128,decode:128" limits a run to those (kind, head dim) pairs."""
    only = os.environ.get("TUNE_ONLY", "")
    return not only or f"{kind}:{d}" in only.split(",")


def candidates() -> list[tuple[str, int, tuple]]:
    out = [(kind, d, cfg) for (kind, d), cfgs in TILES.items() for cfg in cfgs]
    out += [("decode", 128, cfg) for cfg in DECODE_TILES]
    return [c for c in out if selected(c[0], c[1])]


def key(kind, d, cfg) -> str:
    return f"{kind} d{d} {tuple(cfg)}"


def do_check(workers: int) -> dict:
    results = {}
    todo = candidates()
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        jobs = {pool.submit(check_one, *c): c for c in todo}
        for job in futures.as_completed(jobs):
            c = jobs[job]
            try:
                res = job.result()
            except Exception as exc:  # a worker that died (e.g. an illegal address) takes its own row
                res = {"ok": False, "detail": f"worker died: {type(exc).__name__}: {exc}"[:400]}
            results[key(*c)] = dict(kind=c[0], d=c[1], cfg=list(c[2]), check=res)
            print(f"{key(*c):34} {'ok ' if res['ok'] else 'BAD'} {res['detail'][:150]}", flush=True)
    return results


# ----------------------------------------------------------------------------------------- time


def bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def time_prefill(kind: str, d: int) -> dict:
    h = 2048 // d
    times = {}
    direction = "fwd" if kind == "fwd" else "bwd"
    for causal in (False, True):
        for s in PREFILL_SEQLENS[direction]:
            b = 16384 // s
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
            flops = 4.0 * b * h * s * s * d / (2 if causal else 1)
            if direction == "fwd":
                ms = bench(lambda q=q, k=k, v=v, causal=causal: run_attention(kind, q, k, v, causal=causal))
            else:
                out = run_attention(kind, q, k, v, causal=causal)
                do = torch.randn_like(out)
                ms = bench(lambda out=out, do=do, leaves=(q, k, v): backward(out, do, leaves))
                flops *= 2.5
            times[f"{'causal' if causal else 'full'} s={s}"] = {"ms": ms, "tflops": flops / ms / 1e9}
    if kind == "fwd" and d == WINDOW[2]:
        s, h, dw, window = WINDOW
        q, k, v = (torch.randn(1, s, h, dw, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
        causal_ms = bench(lambda: run_attention(kind, q, k, v, causal=True))
        window_ms = bench(lambda: run_attention(kind, q, k, v, causal=True, window_size=window))
        times["window/causal s=16384"] = {"ms": window_ms, "causal_ms": causal_ms, "ratio": window_ms / causal_ms}
    return times


def backward(out, do, leaves) -> None:
    for t in leaves:
        t.grad = None
    out.backward(do, retain_graph=True)


def graph_ms(fn) -> float:
    """Median ms of a CUDA-graph replay of fn, L2 flushed before each: how the bench times decode."""
    from flashtron.bench.runner import Budget, bench_graph_ms

    ms, note = bench_graph_ms(fn, torch.device("cuda"), Budget())
    if note:
        raise RuntimeError(note)
    return ms


SDPA = torch.nn.functional.scaled_dot_product_attention


def decode_problem(L: int, page: int | None = None):
    b, h, hk, d = 8, 32, 8, 128
    q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((b,), L, dtype=torch.int32, device="cuda")
    if page is None:
        kc, vc = (torch.randn(b, L, hk, d, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        return q, kc, vc, lens, None
    n = b * math.ceil(L / page)
    kc, vc = (torch.randn(n, page, hk, d, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    table = torch.randperm(n, device="cuda").to(torch.int32).view(b, -1)
    return q, kc, vc, lens, table


def time_decode(tiles: list[tuple]) -> dict:
    """Per cache length: SDPA-flash and SDPA-cuDNN, then each tile x split count."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flashtron

    results = {}
    kv_bytes = lambda L: 2.0 * 8 * L * 8 * 128 * 2
    record = lambda name, L, ms: results.__setitem__(f"{name} L={L}", {"us": ms * 1e3, "tbps": kv_bytes(L) / ms / 1e9})
    for L in DECODE_CACHES:
        q, kc, vc, lens, _ = decode_problem(L)
        qh, kh, vh = (t.transpose(1, 2) for t in (q, kc, vc))
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    record(name, L, graph_ms(lambda qh=qh, kh=kh, vh=vh: SDPA(qh, kh, vh, enable_gqa=True)))
            except Exception as exc:
                results[f"{name} L={L}"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        for cfg in tiles:
            install("decode", 128, cfg)
            for splits in DECODE_SPLITS:
                fn = lambda q=q, kc=kc, vc=vc, lens=lens, n=splits: flashtron.flash_attn_with_kvcache(
                    q, kc, vc, cache_seqlens=lens, num_splits=n
                )
                record(f"ours {tuple(cfg)} splits={splits}", L, graph_ms(fn))
    install("decode", 128, DECODE_TILES[0])
    for page in (16, 256):  # paged against contiguous at 32k, default tile and heuristic split
        q, kc, vc, lens, table = decode_problem(32768, page)
        fn = lambda q=q, kc=kc, vc=vc, lens=lens, table=table: flashtron.flash_attn_with_kvcache(
            q, kc, vc, cache_seqlens=lens, block_table=table
        )
        record(f"ours paged{page} splits=0", 32768, graph_ms(fn))
    return results


def save(results: dict) -> None:
    with open(STATE, "w") as f:
        json.dump(results, f, indent=1)


def do_time(results: dict) -> dict:
    from flashtron import configs

    tables = (configs.HOPPER_FWD, configs.HOPPER_BWD_DKDV, configs.HOPPER_BWD_DQ, configs.HOPPER_BWD_DKDV_CAUSAL)
    defaults = [dict(t) for t in tables]  # restored before each candidate (install() edits them)
    for (kind, d), cfgs in TILES.items():
        for cfg in cfgs:
            row = results.get(key(kind, d, cfg))
            if not row or not row["check"]["ok"] or not selected(kind, d):
                continue
            for table, default in zip(tables, defaults):  # everything else at its default
                table.update(default)
            install(kind, d, cfg)
            t0 = time.time()
            try:
                row["time"] = time_prefill(kind, d)
            except Exception as exc:
                row["time"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            cells = "  ".join(
                f"{c}: {v['tflops']:.0f}"
                if "tflops" in v
                else f"{c}: {v['ratio']:.3f} ({v['ms']:.3f}/{v['causal_ms']:.3f} ms)"
                for c, v in row["time"].items()
                if isinstance(v, dict) and ("tflops" in v or "ratio" in v)
            )
            print(f"{key(kind, d, cfg):34} {cells}  ({time.time() - t0:.0f}s)", flush=True)
            save(results)  # after every candidate: a run cut short keeps what it measured
            torch.cuda.empty_cache()
    passed = [c for c in DECODE_TILES if results.get(key("decode", 128, c), {}).get("check", {}).get("ok")]
    if DECODE_TILES[0] in passed and selected("decode", 128):  # the paged rows run on the default tile
        t0 = time.time()
        try:
            results["decode times"] = time_decode(passed)
        except Exception as exc:
            results["decode times"] = {"error": f"{type(exc).__name__}: {exc} {traceback.format_exc()[-400:]}"}
        print(f"decode sweep done ({time.time() - t0:.0f}s)", flush=True)
        summarize_decode(results["decode times"])
    return results


def summarize_decode(times: dict) -> None:
    for L in DECODE_CACHES:
        us = lambda name, L=L: times.get(f"{name} L={L}", {}).get("us", float("nan"))
        peers = "  ".join(f"{n} {us(n):.1f}us" for n in ("sdpa_flash", "sdpa_cudnn"))
        ours = sorted(
            ((v["us"], k) for k, v in times.items() if k.startswith("ours") and k.endswith(f"L={L}") and "us" in v)
        )
        heur = us(f"ours {DECODE_TILES[0]} splits=0")
        best = "; ".join(f"{k.split(' L=')[0][5:]} {us:.1f}us" for us, k in ours[:4])
        print(f"decode L={L}: {peers}  ours(default, heuristic) {heur:.1f}us  best: {best}", flush=True)


def time_paged() -> None:
    """Paged decode (page 16 and 256) against contiguous at 32k keys, default tile and split rule, with
    the paged launch given 0, 1, 2 or 3 stages more than the dense one (DecodeConfig.stages gives
    2 s - 1, i.e. +2 at the default s = 3)."""
    import flashtron
    from flashtron import configs

    kernel_stages = configs.DecodeConfig.stages
    q, kc, vc, lens, _ = decode_problem(32768)
    dense_us = graph_ms(lambda: flashtron.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)) * 1e3
    print(f"paged sweep: contiguous 32k {dense_us:.1f} us", flush=True)
    for page in (16, 256):
        q, kc, vc, lens, table = decode_problem(32768, page)
        fn = functools.partial(flashtron.flash_attn_with_kvcache, q, kc, vc, cache_seqlens=lens, block_table=table)
        gathered = (kc[table].flatten(1, 2), vc[table].flatten(1, 2))  # the same keys as a dense cache
        expected = flashtron.flash_attn_with_kvcache(q, *gathered, cache_seqlens=lens)
        for extra in (0, 1, 2, 3):
            configs.DecodeConfig.stages = lambda self, paged, e=extra: self.num_stages + (e if paged else 0)
            label = f"paged{page} +{extra} stages"  # on top of the dense tile's num_stages
            try:
                same = torch.equal(fn(), expected)
                us = graph_ms(fn) * 1e3
                print(f"{label}: {us:.1f} us ({us / dense_us:.3f}x contiguous, equal {same})", flush=True)
            except Exception as exc:
                print(f"{label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            finally:
                configs.DecodeConfig.stages = kernel_stages


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("check", "time", "paged"))
    ap.add_argument("--workers", type=int, default=6)
    args = ap.parse_args()
    if args.mode == "check":
        save(do_check(args.workers))
    elif args.mode == "paged":
        time_paged()
    else:
        save(do_time(json.load(open(STATE)) if os.path.exists(STATE) else {}))


if __name__ == "__main__":
    main()
