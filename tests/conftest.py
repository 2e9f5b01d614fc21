"""Test tiers, seeds and output poisoning.

Tiers:
- default (`pytest`): reference, CPU path, validation, layers; CPU tensors take the PyTorch path.
- `TRITON_INTERPRET=1 pytest -m interpret`: the real Triton kernels on CPU tensors, in Triton's
  interpreter. Tests marked `interpret` are deselected unless TRITON_INTERPRET=1 is set, because the
  interpreter must be chosen before the kernels are first imported.
- `pytest -m gpu`: the full grid on a CUDA device; skipped (and reported as skipped) without one.
- `pytest -m gluon_unverified`: CUDA tests of Gluon kernels that no GPU run has verified yet; neither the
  default run nor `-m gpu` selects them. A test leaves this marker for `gpu` once a GPU run has passed it.
"""

from __future__ import annotations

import os

import pytest
import torch

from compile_count import count_compiles

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The quick GPU subset (`-m "gpu and smoke"`, about 2 minutes): one case of each kernel family and
# each layer, so that a short device run still catches a broken build, launch or integration.
SMOKE = (
    "test_flash_attn.py::test_gpu_grid[causal-128-bf16]",
    "test_flash_attn.py::test_gpu_grid[full-64-fp16]",
    "test_flash_attn.py::test_gpu_grid[causal-64-fp32]",
    "test_flash_attn.py::test_gpu_features[128-128-window]",
    "test_flash_attn.py::test_gpu_varlen",
    "test_flash_attn.py::test_gpu_paged_varlen[16]",
    "test_flash_attn.py::test_gpu_dropout[causal-bf16]",
    "test_kvcache.py::test_kvcache_gpu_features[decode_dense_mha-torch.bfloat16-3]",
    "test_kvcache.py::test_kvcache_cuda_graph[0-3]",
    "test_gpu_shapes.py::test_gpu_new_seqlens_do_not_recompile",
    "test_compile.py::test_compiled_gpu_training_step",
    "test_gpt.py::test_gpu_training_step_matches_cpu",
    "test_transformers.py::test_gpu_llama_bf16_and_generation",
    "test_ops_rotary.py::test_gpu_varlen[neox]",
    "test_ops_norm.py::test_gpu_backward_is_deterministic",
    "test_ops_cross_entropy.py::test_gpu_reductions",
)


# GPU tests that take longest, mostly compiling (H200, 2026-12-02, gpu-tests.xml: the fp32 grid cases 34-85 s,
# the varlen grid 75 s, the other grid cases and the fp32 feature mix 25-57 s, the median test a few seconds):
# collected first, so that xdist hands them out first and its workers do not finish on one of them (14 workers
# spent 3,074 s of test time in 284 s of wall time, 220 s if evenly spread).
SLOW_FIRST = ("test_gpu_varlen", "test_gpu_grid[", "test_gpu_feature_mix[", "test_compiled_gpu_training_step")


def _start_rank(item) -> int:
    name = item.name
    if name.endswith("-fp32]") and name.startswith(("test_gpu_grid[", "test_gpu_feature_mix[")):
        return 0
    return next((1 + i for i, prefix in enumerate(SLOW_FIRST) if name.startswith(prefix)), len(SLOW_FIRST) + 1)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_start_rank)  # stable: within a rank, the collection order
    for item in items:
        if item.nodeid.split("/")[-1] in SMOKE:
            item.add_marker(pytest.mark.smoke)
    selected, deselected = [], []
    for item in items:
        if item.get_closest_marker("interpret") and not INTERPRET:
            deselected.append(item)
        else:
            selected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if any(item.get_closest_marker(m) for m in ("gpu", "gpu_big", "gluon_unverified")):
                item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Fixed seed per test; launchers fill fresh outputs with NaN so unwritten memory fails."""
    torch.manual_seed(0)
    try:
        from flashtron import launch
    except ImportError:  # the package is not built yet in this checkout
        yield
        return
    previous = launch.set_output_poisoning(True)
    yield
    launch.set_output_poisoning(previous)


@pytest.fixture(autouse=True)
def _tables_not_autotune(monkeypatch):
    """Tests run the table tiles whatever the caller's environment says; the autotune tests opt in."""
    monkeypatch.delenv("FLASHTRON_AUTOTUNE", raising=False)


@pytest.fixture(autouse=True)
def _count_kernel_compiles(request):
    """On a GPU, records how many Triton kernels each test compiled (printed at the end of the run):
    the GPU tier's time is mostly compiling, so this is where to look first."""
    if not torch.cuda.is_available():
        yield
        return
    with count_compiles() as counts:
        yield
    request.node.user_properties.append(("compiles", sum(counts.values())))


_COMPILES: dict[str, int] = {}


def pytest_runtest_logreport(report):
    for name, value in report.user_properties:
        if name == "compiles":  # appended at teardown, so the teardown report carries it
            _COMPILES[report.nodeid] = value


def pytest_terminal_summary(terminalreporter):
    if not _COMPILES:
        return
    top = sorted(_COMPILES.items(), key=lambda item: -item[1])[:25]
    terminalreporter.section(f"Triton compiles: {sum(_COMPILES.values())} in {len(_COMPILES)} tests; most")
    for nodeid, n in top:
        terminalreporter.write_line(f"{n:4d}  {nodeid}")


@pytest.fixture
def kernel_device():
    """The device whose tensors exercise the Triton kernels in this tier."""
    if INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("the Triton kernels need TRITON_INTERPRET=1 or a CUDA device")
