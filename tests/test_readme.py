"""The README's Python examples run as written. Without a GPU, a CUDA example runs on the CPU path
instead, in fp32 and at seqlen 256 (the same calls; the sizes only keep tier 1 quick)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2, "README.md lost its ```python examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index]
    if "transformers" in code:
        pytest.importorskip("transformers")
    if "cuda" in code and not torch.cuda.is_available():
        code = code.replace('device="cuda"', 'device="cpu"').replace("torch.bfloat16", "torch.float32")
        code = code.replace("4096", "256")
    exec(compile(code, f"README.md python block {index}", "exec"), {})


def test_readme_lists_every_environment_variable():
    """env.VARIABLES is the list of variables flashtron reads; the README's table names each, and no other."""
    from flashtron import env

    table = README.read_text().split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([A-Z_]+)", table, flags=re.M))
    assert listed == set(env.VARIABLES)
    src = Path(env.__file__).read_text()
    read = set(re.findall(r'"((?:FLASHTRON|TRITON)_[A-Z_]+)"', src.split("VARIABLES = {")[0]))
    assert read == set(env.VARIABLES), "env.py reads a variable that VARIABLES does not list, or the reverse"
