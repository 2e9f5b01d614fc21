"""flashtron.distributed on real process groups: gloo, world 2 and 4, one spawned group per world size.

Each case runs on every rank and compares that rank's out, lse, dq, dk and dv with its shard of
flash_attn_func / flash_attn_varlen_func run on the whole sequence in the same process (cp_cases.py
states the tolerance). Spawning costs an `import torch` per rank, so every case of a world size runs
in one group and the tests below only read its results. The plan and the ring's merge logic are also
tested in one process, without torch.distributed, at the end of this file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cp_cases
import flashtron
from cp_cases import NHEADS as H
from cp_cases import check_gpt, check_ring, check_shard_gather, check_ulysses, check_varlen
from flashtron.distributed import plan

WORLDS = (2, 4)


# name: (nheads_k, keyword arguments); the factors scale seqlen_q or seqlen_k (sq != sk both ways,
# causal then leaving the first queries with no key when seqlen_q > seqlen_k)
RING_CASES = {
    "full": (H, dict()),
    "causal": (H, dict(causal=True)),
    "causal-window": (H, dict(causal=True, window_size=(5, -1))),
    "window": (H, dict(window_size=(3, 2))),
    "window-right-of-diagonal": (H, dict(window_size=(-1, 4))),
    "softcap-causal": (H, dict(causal=True, softcap=3.0)),
    "gqa-causal": (2, dict(causal=True)),
    "mqa-window": (1, dict(window_size=(4, 1))),
    "longer-k-causal": (2, dict(causal=True, k_factor=2)),
    "shorter-k-causal": (2, dict(causal=True, q_factor=2)),
}


def _ring_cases():
    return {
        f"ring-{layout}-{name}": functools.partial(check_ring, layout=layout, nheads_k=hk, **kw)
        for layout in plan.LAYOUTS
        for name, (hk, kw) in RING_CASES.items()
    }


def _ulysses_cases():
    return {
        "ulysses-causal": functools.partial(check_ulysses, nheads_k=H, causal=True),
        "ulysses-gqa-window-softcap": functools.partial(check_ulysses, nheads_k=2, window_size=(3, 2), softcap=3.0),
        "ulysses-mqa-replicated": functools.partial(check_ulysses, nheads_k=1, causal=True),
        "ulysses-alibi": functools.partial(check_ulysses, nheads_k=2, causal=True, alibi=True),
    }


# global packed lengths (uneven; an empty sequence; one sequence spanning ranks), total 24 or 48
VARLEN_Q = (5, 11, 1, 0, 7)
VARLEN_K_CROSS = (9, 3, 1, 4, 7)


def _varlen_cases():
    masks = {
        "full": dict(),
        "causal": dict(causal=True),
        "causal-window": dict(causal=True, window_size=(4, -1)),
        "window": dict(window_size=(3, 2)),
        "left-window": dict(window_size=(4, -1)),
        "right-window": dict(window_size=(-1, 2)),
    }
    same = dict(lengths_q=VARLEN_Q, lengths_k=VARLEN_Q)
    cases = {f"varlen-{n}": functools.partial(check_varlen, nheads_k=2, **same, **kw) for n, kw in masks.items()}
    cross = dict(lengths_q=VARLEN_Q, lengths_k=VARLEN_K_CROSS)
    cases["varlen-cross-causal"] = functools.partial(check_varlen, nheads_k=1, causal=True, **cross)
    cases["varlen-cross-window"] = functools.partial(check_varlen, nheads_k=4, window_size=(2, 3), **cross)
    return cases


def _sharding_cases():
    return {f"shard-gather-{layout}": functools.partial(check_shard_gather, layout=layout) for layout in plan.LAYOUTS}


def _raises(exc, match, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc as e:
        assert isinstance(e, RuntimeError), f"{type(e).__name__} is not a RuntimeError"
        assert match in str(e), f"{match!r} not in {str(e)!r}"
        return
    raise AssertionError(f"no {exc.__name__} raised (expected {match!r})")


def check_errors(group):
    """Wrong shapes, sizes the world does not divide, and a group this rank is not in."""
    from flashtron import distributed as cp

    world = dist.get_world_size(group)
    x = torch.randn(1, 4 * world, H, 16)
    _raises(ValueError, "q must be 4-D", cp.ring_flash_attn_func, x[0], x, x, group=group)
    _raises(ValueError, "q.shape[1]", cp.ring_flash_attn_func, x[:, :3], x[:, :3], x[:, :3], group=group)
    _raises(ValueError, "layout must be one of", cp.ring_flash_attn_func, x, x, x, group=group, layout="striped")
    _raises(TypeError, "group must be", cp.ring_flash_attn_func, x, x, x, group="world")
    _raises(TypeError, "must have the same dtype", cp.ring_flash_attn_func, x, x.double(), x, group=group)
    _raises(NotImplementedError, "dropout_p", cp.ring_flash_attn_func, x, x, x, 0.1, group=group)
    _raises(NotImplementedError, "alibi_slopes", cp.ring_flash_attn_func, x, x, x, alibi_slopes=torch.ones(H))
    _raises(ValueError, "multiple of", cp.shard_sequence, torch.randn(1, 2 * world + 1), group=group)
    _raises(ValueError, "dim must be", cp.gather_sequence, x, group=group, dim=4)
    _raises(ValueError, "nheads of q", cp.ulysses_flash_attn_func, x[:, :, :1], x[:, :, :1], x[:, :, :1], group=group)
    cu = torch.tensor([0, 4 * world + 1], dtype=torch.int32)
    v = x[0]
    _raises(ValueError, "world must divide", cp.ring_flash_attn_varlen_func, v, v, v, cu, cu, 9, 9, group=group)
    # a group without this rank: new_group is collective, so every rank makes it
    only_rank0 = dist.new_group([0])
    if dist.get_rank() != 0:
        _raises(ValueError, "group must contain this process", cp.ring_flash_attn_func, x, x, x, group=only_rank0)


def check_compile(group):
    """ring and Ulysses attention, and a context-parallel GPT, inside torch.compile(fullgraph=True)
    match eager, gradients too."""
    from flashtron.distributed import ring_flash_attn_func, ulysses_flash_attn_func

    q, k, v, _, _ = cp_cases.dense_inputs(1, 4, 4, H, 2, 16, torch.float32, "cpu")  # local shards

    def model(q, k, v):
        a = ring_flash_attn_func(q, k, v, causal=True, group=group)
        b = ulysses_flash_attn_func(q, k, v, causal=True, group=group)
        return (a * 2 + b).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (model, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        outs.append((out, *torch.autograd.grad(out.sum(), leaves)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *outs):
        cp_cases.close(f"compiled {name}", a, b)

    # a context-parallel GPT's training loss: one graph, the collectives inside library ops
    from flashtron.models import GPT, GPTConfig
    from flashtron.nn import ContextParallel

    torch.manual_seed(0)
    gpt = GPT(GPTConfig.from_name("tiny-llama"), context_parallel=ContextParallel(group, "zigzag"))
    idx = torch.randint(0, gpt.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5))
    loss_of = lambda idx: gpt(idx, idx)[1]
    losses, grads = [], []
    for fn in (loss_of, torch.compile(loss_of, fullgraph=True, backend="aot_eager")):
        gpt.zero_grad()
        losses.append(fn(idx))
        losses[-1].backward()
        grads.append([p.grad.clone() for p in gpt.parameters()])
    cp_cases.close("compiled GPT loss", losses[1].detach(), losses[0].detach())
    for (name, _), a, b in zip(gpt.named_parameters(), *grads):
        cp_cases.close(f"compiled GPT grad of {name}", b, a)


GPT_CASES = {
    "gpt-rotary-zigzag": functools.partial(check_gpt, preset="tiny-llama"),
    "gpt-learned-positions-contiguous": functools.partial(check_gpt, preset="tiny-gpt2", layout="contiguous"),
}
CASES = {
    **_ring_cases(),
    **_ulysses_cases(),
    **_varlen_cases(),
    **_sharding_cases(),
    **GPT_CASES,
    "errors": check_errors,
}


def check_train_demo(group):
    """`flashtron train-demo --context-parallel` trains on every rank and rank 0 reports the world."""
    from flashtron import train_demo

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "demo.md")
        argv = ["--quick", "--context-parallel", "--steps", "2", "--search-limit", "128", "--out", out]
        assert train_demo.main(argv) == 0
        if dist.get_rank() == 0:
            with open(out) as f:
                row = [line for line in f if line.startswith("| flashtron")][0]
            cells = [c.strip() for c in row.split("|")[1:-1]]
            assert cells[1] == str(dist.get_world_size()), row
            assert float(cells[2].replace(",", "")) > 0, row
            assert cells[6] == ">= 128 (limit)", row


SLOW_WORLD = 2  # the cases that cost seconds (compiling, the demo) run at one world size only


def _cases(world):
    slow = {"compile": check_compile, "train-demo": check_train_demo}
    return {**CASES, **slow} if world == SLOW_WORLD else CASES


# ---------------------------------------------------------------------------------------------
# One spawned gloo group per world size
# ---------------------------------------------------------------------------------------------


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)  # world processes share CI's two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    try:
        for name, case in _cases(world).items():
            torch.manual_seed(0)
            start = time.perf_counter()
            try:
                case(dist.group.WORLD)
                results[name] = None
            except Exception:
                results[name] = traceback.format_exc(limit=-4)
            if os.environ.get("CP_TIMES"):
                print(f"rank {rank} {name}: {time.perf_counter() - start:.2f}s", flush=True)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@functools.cache
def _results(world):
    """{case: {rank: traceback}} for the cases that failed somewhere, after one spawned run."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world)
        by_rank = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                by_rank.append(json.load(f))
    return {name: {r: res[name] for r, res in enumerate(by_rank) if res.get(name, "missing")} for name in _cases(world)}


@pytest.mark.parametrize(
    "world, case", [(w, c) for w in WORLDS for c in _cases(w)], ids=[f"{c}-{w}" for w in WORLDS for c in _cases(w)]
)
def test_process_group(world, case):
    failures = _results(world)[case]
    assert not failures, "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in failures.items())


# ---------------------------------------------------------------------------------------------
# Without torch.distributed: the plan, and the ring's merge logic with ranks as threads
# ---------------------------------------------------------------------------------------------


def _visible_pairs(layout, world, rank, src, seqlen_q, seqlen_k, left, right):
    """(local query row, local key row) pairs of the global mask, and those the planned calls cover."""
    positions = lambda r, n: [s.start + t for s in plan.segments(layout, world, r, n) for t in range(s.length)]
    qp, kp = positions(rank, seqlen_q), positions(src, seqlen_k)
    sees = lambda rel, lo, hi: (lo < 0 or rel >= -lo) and (hi < 0 or rel <= hi)
    shift = seqlen_k - seqlen_q
    want = {(a, b) for a, i in enumerate(qp) for b, j in enumerate(kp) if sees(j - i - shift, left, right)}
    got = []
    for blk in plan.ring_blocks(layout, world, rank, src, seqlen_q, seqlen_k, left, right):
        rows, cols = blk.q1 - blk.q0, blk.k1 - blk.k0
        got += [(blk.q0 + ii, blk.k0 + jj) for ii in range(rows) for jj in range(cols)
                if sees(jj - ii - (cols - rows), blk.window_left, blk.window_right)]  # fmt: skip
    return want, got


@pytest.mark.parametrize("layout", plan.LAYOUTS)
@pytest.mark.parametrize("world", (1, 2, 3))
def test_ring_plan_covers_the_mask_once(layout, world):
    per = 2 * world if layout == "zigzag" else world
    for sq, sk in ((per * 3, per * 3), (per * 2, per * 5), (per * 5, per * 1)):
        for left in (-1, 0, 2, 7):
            for right in (-1, 0, 1, 4):
                for rank in range(world):
                    for src in range(world):
                        want, got = _visible_pairs(layout, world, rank, src, sq, sk, left, right)
                        where = f"rank {rank} src {src} seqlens {sq},{sk} window {left},{right}"
                        assert len(got) == len(set(got)), f"{where}: a pair computed twice"
                        assert set(got) == want, f"{where}: mask differs"


def test_causal_zigzag_is_one_balanced_call_per_step():
    for world in (2, 4, 8):
        seqlen, work = 16 * world, set()
        for rank in range(world):
            calls = [plan.ring_blocks("zigzag", world, rank, src, seqlen, seqlen, -1, 0) for src in range(world)]
            assert all(len(c) == 1 for c in calls), f"world {world} rank {rank}: {calls}"
            work.add(sum((b.q1 - b.q0) * (b.k1 - b.k0) for c in calls for b in c))
        assert len(work) == 1, f"world {world}: the ranks' blocks differ in size: {work}"


ENGINE_CASES = {
    "zigzag-causal": dict(layout="zigzag", causal=True),
    "zigzag-window-softcap": dict(layout="zigzag", window=(5, 2), softcap=4.0),
    "contiguous-causal-window": dict(layout="contiguous", causal=True, window=(7, -1)),
    "contiguous-right-window": dict(layout="contiguous", window=(-1, 3)),
}


def _engine(device, world, case, dtype=torch.float32):
    kw = dict(ENGINE_CASES[case])
    layout = kw.pop("layout")
    per = 2 * world if layout == "zigzag" else world
    cp_cases.check_ring_engine(world, layout, 2, per * 4, per * 4, 4, 2, 16, device, dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("world", (1, 2, 3))
@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_ring_engine_cpu(case, world, dtype):
    _engine("cpu", world, case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("world", (2, 4))
@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_ring_engine_gpu(case, world, dtype):
    _engine("cuda", world, case, dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_ring_engine_interpreter(case):
    """The Triton kernels under the ring: query/key slices as strided views, an lse slice as the
    backward's input, the cropped windows."""
    _engine("cpu", 2, case)


def test_readme_torchrun_example(tmp_path):
    """README.md's torchrun example, as written, with torchrun = this Python's torch.distributed.run."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = re.findall(r"```bash\n(cat > cp_example.py.*?)```", readme, flags=re.S)
    block = block.replace("torchrun ", f"{sys.executable} -m torch.distributed.run ")
    src = str(Path(flashtron.__file__).resolve().parents[1])  # the flashtron under test
    # unbuffered: a rank that aborts still leaves the lines it printed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")  # fmt: skip

    def run():
        return subprocess.run(["bash", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    def errors(result):
        return [float(e) for e in re.findall(r"max \|ring - single process\| over the ranks = (\S+)", result.stdout)]

    result = run()
    if result.returncode != 0 and "terminate called without an active exception" in result.stderr and errors(result):
        # Once on CI (torch 2.13, gloo, 2026-12-02), both ranks aborted at exit, after destroy_process_group:
        # std::terminate on a still-joinable thread in gloo's teardown; never reproduced in 12 runs alone or
        # 6 at once. The example had finished (its line is above); one more run must pass whole.
        assert errors(result)[0] < 1e-5, result.stdout
        result = run()
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(errors(result)) == 1 and errors(result)[0] < 1e-5, result.stdout
