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
