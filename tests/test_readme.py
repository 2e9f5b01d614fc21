"""The README's Python examples run exactly as written, on whatever device is present: the first one
picks CUDA when there is one and flashtron's CPU path otherwise, so a machine without a GPU runs it
unchanged."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2, "README.md lost its ```python examples"


def test_first_example_needs_no_gpu():
    """No hard-coded CUDA device: it must run as written where there is none."""
    assert 'device="cuda"' not in BLOCKS[0] and "torch.cuda.is_available()" in BLOCKS[0]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index]
    if "transformers" in code:
        pytest.importorskip("transformers")
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
