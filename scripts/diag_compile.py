"""Which op makes a compiled GPT training step differ from eager on the GPU?

Runs tests/test_compile.py's step (tiny-llama, fp32, CUDA) eagerly and under torch.compile, once with
every op on its Triton path and once per op with that op (norm, rotary, cross entropy) sent to its
PyTorch path, and prints the largest gradient difference of each run with the parameter it is in.
The run whose difference drops to rounding names the culprit.

    PYTHONPATH=src python scripts/diag_compile.py
"""

from __future__ import annotations

import contextlib

import torch

import flashtron.ops.cross_entropy
import flashtron.ops.norm
import flashtron.ops.rotary
from flashtron.models import GPT, GPTConfig

OPS = {"norm": flashtron.ops.norm, "rotary": flashtron.ops.rotary, "cross_entropy": flashtron.ops.cross_entropy}


@contextlib.contextmanager
def pytorch_path(names):
    saved = {n: OPS[n].uses_triton for n in names}
    for n in names:
        OPS[n].uses_triton = lambda t: False
    try:
        yield
    finally:
        for n, fn in saved.items():
            OPS[n].uses_triton = fn


def step_diff(names) -> str:
    torch.manual_seed(0)
    torch._dynamo.reset()
    with pytorch_path(names):
        model = GPT(GPTConfig.from_name("tiny-llama"), device="cuda")
        idx = torch.randint(0, 96, (2, 64), device="cuda")
        params = dict(model.named_parameters())
        _, loss_ref = model(idx, idx)
        grads_ref = torch.autograd.grad(loss_ref, list(params.values()))
        step = torch.compile(lambda i: model(i, i)[1], dynamic=False)
        loss = step(idx)
        grads = torch.autograd.grad(loss, list(params.values()))
    rows = []
    for name, a, b in zip(params, grads, grads_ref):
        err = (a - b).abs().max().item()
        rows.append((err / max(b.abs().max().item(), 1e-30), err, name))
    rows.sort(reverse=True)
    worst = ", ".join(f"{n} {e:.2e} (rel {r:.1e})" for r, e, n in rows[:3])
    return f"loss diff {abs(loss.item() - loss_ref.item()):.2e}; worst grads: {worst}"


def main() -> None:
    from flashtron.launch import cuda_matmul_uses_tf32

    print("tf32 matmul", cuda_matmul_uses_tf32())
    for names in ((), tuple(OPS), ("cross_entropy",), ("norm",), ("rotary",)):
        try:
            print(f"pytorch path for {names or 'none'}: {step_diff(names)}", flush=True)
        except Exception as exc:  # report and go on: one failing variant still tells something
            print(f"pytorch path for {names or 'none'}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)


if __name__ == "__main__":
    main()
