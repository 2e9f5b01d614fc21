"""Counts Triton kernel compiles: every specialization a process builds (or loads from the disk cache)
for the first time. Used by the GPU tier's per-test report (conftest.py) and the recompile tests."""

from __future__ import annotations

import collections
import contextlib


@contextlib.contextmanager
def count_compiles():
    """Yields a Counter of kernel name -> compiles inside the block (empty under the interpreter,
    which compiles nothing)."""
    counts: collections.Counter = collections.Counter()
    try:
        from triton import knobs
    except ImportError:  # no triton: nothing can compile
        yield counts
        return
    previous = knobs.runtime.jit_post_compile_hook

    def hook(*args, **kwargs):
        counts[kwargs["fn"].name] += 1
        return previous(*args, **kwargs) if previous else None

    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield counts
    finally:
        knobs.runtime.jit_post_compile_hook = previous
