"""Compile the attention kernels for Hopper (sm_90) on any machine, GPU or not, and print what the
compiler reports for each tile config: registers per thread, spilled bytes, shared memory, and the
compile time. A config that spills or needs more shared memory than an SM has (227 KiB) is not worth
device time.

    python scripts/aot_report.py [fwd|dkdv|dq ...] [--d 64,128]
    python scripts/aot_report.py decode   # every decode table entry, dense and paged, and a stage sweep
    python scripts/aot_report.py gluon    # the Gluon Hopper forward's variants (launch_hopper)
    python scripts/aot_report.py gluon-bwd    # the Gluon dK/dV kernel's tiles, each mask kind
    python scripts/aot_report.py gluon-dq     # the Gluon dQ kernel's tiles, each mask kind and dtype
    python scripts/aot_report.py gluon-fused  # the dK/dV kernel's FUSED_DQ candidate (dQ by TMA reduce-add)

Needs only triton (its bundled ptxas). Pointer and stride arguments are marked 16-aligned as the JIT
marks them for contiguous bf16 tensors, so the code matches what a launch would build.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flashtron.kernels.bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel  # noqa: E402
from flashtron.kernels.fwd import attention_fwd_kernel  # noqa: E402

SMEM_LIMIT = 227 * 1024
FP32_POINTERS = {"LSE", "Delta", "AlibiSlopes", "Sink"}
NONE_POINTERS = {"AlibiSlopes", "Sink", "CuSeqlensQ", "CuSeqlensK", "SequsedK"}
FLOAT_SCALARS = {"qk_scale", "softcap_log2", "dropout_scale", "dk_scale", "dq_scale"}


def features(causal: bool) -> dict:
    return dict(
        HAS_LEFT=False,
        HAS_RIGHT=causal,
        HAS_SOFTCAP=False,
        HAS_ALIBI=False,
        HAS_DROPOUT=False,
        IS_VARLEN=False,
        HAS_SEQUSED_K=False,
        DOT_FP32=False,
        PRECISION="ieee",
    )


def compile_report(
    kernel, constexprs: dict, num_warps: int, num_stages: int, none=NONE_POINTERS, fp32=FP32_POINTERS, i32=(),
    data="*bf16",
) -> dict:  # fmt: skip
    """none: pointer arguments passed as None; fp32 / i32: pointers of those types; data: the rest."""
    fn = kernel  # the JITFunction: ASTSource reads its arg_names
    names = fn.arg_names
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in none:
            consts[name] = None
            signature[name] = "constexpr"
        elif name[0].isupper():
            signature[name] = "*fp32" if name in fp32 else "*i32" if name in i32 else data
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_") and name not in ("stride_os", "stride_ls"):  # 0 for one split
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, {(names.index(k),): v for k, v in consts.items()}, attrs)
    t0 = time.time()
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
    )
    seconds = time.time() - t0
    regs, spills = cubin_resources(compiled.asm["cubin"])  # read off the binary: loading needs a GPU
    return dict(regs=regs, spills=spills, smem=compiled.metadata.shared, seconds=seconds)


def cubin_resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spill bytes: stack frame + spill stores) by the cuobjdump Triton ships."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    stack = int(re.search(r"STACK:(\d+)", text).group(1))
    return regs, stack


def wgmma_serialized(ptx: str) -> bool:
    """Whether the ptxas Triton ships serializes the wgmma instructions of this PTX for sm_90a (advisory
    C7512: too few registers to keep the asynchronous ones in flight), read off `ptxas -v`."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([tool, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)  # fmt: skip
    return "C7512" in run.stdout + run.stderr


def constexprs_for(kind: str, d: int, block_m: int, block_n: int, causal: bool) -> tuple:
    common = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d, BLOCK_DV=d, **features(causal))
    if kind == "fwd":
        return attention_fwd_kernel, dict(common, HAS_SINK=False, HEAVY_FIRST=causal)
    if kind == "dq":
        return attention_bwd_dq_kernel, dict(common, HEAVY_FIRST=causal)
    return attention_bwd_dkdv_kernel, common


def decode_report(paged: bool, d: int, block_m: int, block_n: int, warps: int, stages: int, fp32: bool) -> dict:
    """The decode kernel (one split's partials, no rotary or options), dense or paged."""
    from flashtron.kernels.decode import decode_kernel

    consts = dict(
        HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d, BLOCK_DV=d, HAS_LEFT=False,
        HAS_RIGHT=False, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_SINK=False, PAGED=paged, HAS_BATCH_IDX=False,
        HAS_LEFTPAD=False, HAS_ROTARY=False, ROTARY_INTERLEAVED=False, ROTARY_PER_TOKEN=False, WRITE_FINAL=False,
        DOT_FP32=False, PRECISION="tf32" if fp32 else "ieee",
    )  # fmt: skip
    none = {"CacheBatchIdx", "CacheLeftpad", "Cos", "Sin", "AlibiSlopes", "Sink"} | (set() if paged else {"BlockTable"})
    return compile_report(
        decode_kernel,
        consts,
        warps,
        stages,
        none=none,
        fp32={"Out", "LSE"},
        i32={"CacheSeqlens", "BlockTable"},
        data="*fp32" if fp32 else "*bf16",
    )


def main_decode() -> None:
    """Shared memory and registers of the decode kernel: each table entry dense at its stages and paged
    at DecodeConfig.stages(paged=True), at 16 packed rows (a decode step) and at the table's BLOCK_M; then
    the d128 tile over stage counts, dense and paged (the buffering rule in DecodeConfig.stages)."""
    from flashtron.configs import GPU_DECODE, GPU_DECODE_FP32, DecodeConfig

    def show(label, paged, d, bm, bn, w, st, fp32):
        r = decode_report(paged, d, bm, bn, w, st, fp32)
        kind = "paged" if paged else "dense"
        print(f"{label:5} d{d:<3} {kind} ({bm:2},{bn:3},{w},{st}) regs {r['regs']:3} stack {r['spills']:4} "
              f"smem {r['smem'] / 1024:6.1f}K", flush=True)  # fmt: skip

    for fp32, table in ((False, GPU_DECODE), (True, GPU_DECODE_FP32)):
        for d, c in table.items():
            for bm in sorted({16, c.block_m}):
                for paged in (False, True):
                    show("fp32" if fp32 else "bf16", paged, d, bm, c.block_n, c.num_warps, c.stages(paged), fp32)
    base = DecodeConfig(16, 128, 4, 3, 8)
    for st in range(2, 8):
        for paged in (False, True):
            show("sweep", paged, 128, base.block_m, base.block_n, base.num_warps, st, False)


def main_gluon() -> None:
    """The Gluon Hopper forward for sm_90, bf16: each (warp specialization, overlap, stages) variant of the
    dispatched tiles at d64 and d128, then the candidate tiles (ping-pong, d64 tiles, the persistent grid
    "persist"), full and causal.
    Registers are the launch's (with warp specialization the partitions get theirs by setmaxnreg); stack
    > 0 means spills; bar.sync lists the named barriers (id, threads): 256 is both consumer warpgroups in
    lock step, 128 one warpgroup."""
    from dataclasses import replace

    from flashtron import launch_hopper

    tiles = [(d, "dispatched", tile) for d, tile in launch_hopper.HOPPER_TILES.items()]
    for d, base in launch_hopper.CANDIDATE_TILES["ws-ov"].items():  # the lock-step tile and its simpler forms
        for ws, overlap, stages in ((False, False, 0), (True, False, 0), (True, True, 0), (True, True, 1)):
            tiles.append((d, "", replace(base, stages=base.stages + stages, warp_specialize=ws, overlap=overlap)))
    for name, per_d in launch_hopper.CANDIDATE_TILES.items():
        tiles += [(d, name, tile) for d, tile in per_d.items() if name != "ws-ov"]
    for d, name, tile in tiles:
        for causal in (False, True):
            gluon_report(d, name, tile, causal)


def gluon_report(d, name, tile, causal) -> None:
    import torch

    from flashtron import launch_hopper
    from flashtron.options import AttnOptions

    q = torch.empty(2, 1000, 4, d, dtype=torch.bfloat16)
    out, lse = torch.empty_like(q), torch.empty(2, 4, 1000)
    opts = AttnOptions(softmax_scale=d**-0.5, window_right=0 if causal else -1)
    t0 = time.time()
    try:
        kernel, _, args, kwargs = launch_hopper.kernel_launch(q, q, q, out, lse, opts, tile)
        compiled = launch_hopper.compile_sm90(kernel, args, kwargs)
    except Exception as exc:
        print(f"gluon d{d} {tile} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
        return
    regs, stack = cubin_resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    nreg = sorted({int(n) for n in re.findall(r"setmaxnreg[.a-z]*\.u32\s+(\d+)", ptx)})
    bars = sorted(set(re.findall(r"bar\.sync\s+(\d+,\s*\d+)", ptx)))
    print(f"gluon d{d:<3} {name:9} ({tile.block_m},{tile.block_n}) stages {tile.stages} warps {tile.num_warps} "
          f"consumers {tile.consumers} ws {int(tile.warp_specialize)} overlap {int(tile.overlap)} "
          f"{'causal' if causal else 'full  '} regs {regs} stack {stack} smem {compiled.metadata.shared / 1024:6.1f}K "
          f"wgmma {'wgmma.mma_async' in ptx} setmaxnreg {nreg} bar.sync {[b.replace(' ', '') for b in bars]} "
          f"{time.time() - t0:4.1f}s", flush=True)  # fmt: skip


def main_gluon_bwd(fused: bool = False) -> None:
    """The Gluon dK/dV kernel (kernels/hopper_bwd.py) for sm_90, bf16: the dispatched tile per head dim, and
    one more stage, with no mask, causal and a window. Stack > 0 means spills (ptxas's spill stores and loads
    with them). fused: its FUSED_DQ candidate (HOPPER_BWD_FUSED_TILES), which also adds dQ into an fp32
    accumulator by TMA reduce-add."""
    from dataclasses import replace

    import torch

    from flashtron import launch_hopper
    from flashtron.options import AttnOptions

    kind = "gluon-fused" if fused else "gluon-bwd"
    tiles = launch_hopper.HOPPER_BWD_FUSED_TILES if fused else launch_hopper.HOPPER_BWD_TILES
    for d, base in tiles.items():
        for tile in (base, replace(base, stages=base.stages + 1)):
            for mask, window in (("full", (-1, -1)), ("causal", (-1, 0)), ("window", (256, 32))):
                q = torch.empty(2, 1000, 4, d, dtype=torch.bfloat16)
                k = torch.empty(2, 1000, 2, d, dtype=torch.bfloat16)
                lse = torch.empty(2, 4, 1000)
                opts = AttnOptions(softmax_scale=d**-0.5, window_left=window[0], window_right=window[1])
                t0 = time.time()
                dq_accum = torch.empty(q.shape, dtype=torch.float32) if fused else None
                try:
                    kernel, _, args, kwargs = launch_hopper.backward_dkdv_launch(
                        q, k, k, q, lse, lse, torch.empty_like(k), torch.empty_like(k), opts, tile, dq_accum=dq_accum
                    )
                    compiled = launch_hopper.compile_sm90(kernel, args, kwargs)
                except Exception as exc:
                    print(f"{kind} d{d} {tile} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
                    continue
                regs, stack = cubin_resources(compiled.asm["cubin"])
                ptx = compiled.asm["ptx"]
                nreg = sorted({int(n) for n in re.findall(r"setmaxnreg[.a-z]*\.u32\s+(\d+)", ptx)})
                print(f"{kind} d{d:<3} ({tile.block_m},{tile.block_n}) stages {tile.stages} warps {tile.num_warps} "
                      f"{mask:6} regs {regs} stack {stack} smem {compiled.metadata.shared / 1024:6.1f}K "
                      f"wgmma {ptx.count('wgmma.mma_async')} setmaxnreg {nreg} {time.time() - t0:4.1f}s",
                      flush=True)  # fmt: skip


def main_gluon_dq() -> None:
    """The Gluon dQ kernel (kernels/hopper_bwd.attention_bwd_dq_hopper_kernel) for sm_90: the dispatched tile
    per head dim with no mask, causal and a window, bf16 and fp16; then one stage more and fewer or more keys
    per step (bf16). Stack > 0 means spills; "serialized" that ptxas found too few registers to keep the
    wgmmas asynchronous (advisory C7512) and made each wait for the one before."""
    from dataclasses import replace

    import torch

    from flashtron import launch_hopper
    from flashtron.options import AttnOptions

    runs = []
    for d, base in launch_hopper.HOPPER_DQ_TILES.items():
        runs += [(d, base, dtype) for dtype in (torch.bfloat16, torch.float16)]
        other_n = 64 if base.block_n == 128 else 128
        runs += [
            (d, tile, torch.bfloat16)
            for tile in (replace(base, stages=base.stages + 1), replace(base, block_n=other_n, stages=2))
        ]
    for d, tile, dtype in runs:
        for mask, window in (("full", (-1, -1)), ("causal", (-1, 0)), ("window", (256, 32))):
            q = torch.empty(2, 1000, 4, d, dtype=dtype)
            k = torch.empty(2, 1000, 2, d, dtype=dtype)
            lse = torch.empty(2, 4, 1000)
            opts = AttnOptions(softmax_scale=d**-0.5, window_left=window[0], window_right=window[1])
            t0 = time.time()
            try:
                kernel, _, args, kwargs = launch_hopper.backward_dq_launch(
                    q, k, k, q, lse, lse, torch.empty_like(q), opts, tile
                )
                compiled = launch_hopper.compile_sm90(kernel, args, kwargs)
            except Exception as exc:
                print(f"gluon-dq d{d} {tile} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
                continue
            regs, stack = cubin_resources(compiled.asm["cubin"])
            ptx = compiled.asm["ptx"]
            nreg = sorted({int(n) for n in re.findall(r"setmaxnreg[.a-z]*\.u32\s+(\d+)", ptx)})
            atomics = bool(re.search(r"^\s*(@!?%p\d+\s+)?(atom|red)\.", ptx, flags=re.M))
            serial = wgmma_serialized(ptx)
            smem = compiled.metadata.shared / 1024
            print(f"gluon-dq d{d:<3} {str(dtype)[6:]:8} ({tile.block_m},{tile.block_n}) stages {tile.stages} "
                  f"warps {tile.num_warps} {mask:6} regs {regs} stack {stack} smem {smem:6.1f}K "
                  f"wgmma {ptx.count('wgmma.mma_async')} serialized {serial} setmaxnreg {nreg} atomics {atomics} "
                  f"{time.time() - t0:4.1f}s",
                  flush=True)  # fmt: skip


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tune import TILES

    if sys.argv[1:2] == ["decode"]:
        main_decode()
        return
    if sys.argv[1:2] == ["gluon"]:
        main_gluon()
        return
    if sys.argv[1:2] == ["gluon-bwd"]:
        main_gluon_bwd()
        return
    if sys.argv[1:2] == ["gluon-fused"]:
        main_gluon_bwd(fused=True)
        return
    if sys.argv[1:2] == ["gluon-dq"]:
        main_gluon_dq()
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("kinds", nargs="*", default=["fwd", "dkdv", "dq"])
    ap.add_argument("--d", default="64,128,256")
    ap.add_argument("--causal", action="store_true", help="compile the causal variant (default: full)")
    args = ap.parse_args()
    dims = [int(x) for x in args.d.split(",")]
    for (kind, d), cfgs in TILES.items():
        if kind not in args.kinds or d not in dims:
            continue
        for bm, bn, warps, stages in cfgs:
            kernel, consts = constexprs_for(kind, d, bm, bn, args.causal)
            try:
                r = compile_report(kernel, consts, warps, stages)
                flag = " SPILLS" if r["spills"] else ""
                flag += " SMEM>227K" if r["smem"] > SMEM_LIMIT else ""
                print(
                    f"{kind:5} d{d:<3} ({bm:3},{bn:3},{warps:2},{stages}) regs {r['regs']:3} stack {r['spills']:5} "
                    f"smem {r['smem'] / 1024:6.1f}K  {r['seconds']:5.1f}s{flag}",
                    flush=True,
                )
            except Exception as exc:
                reason = str(exc).splitlines()[0][:150]
                print(f"{kind:5} d{d:<3} ({bm},{bn},{warps},{stages}) FAILED {type(exc).__name__}: {reason}")


if __name__ == "__main__":
    main()
