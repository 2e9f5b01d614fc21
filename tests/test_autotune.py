"""FLASHTRON_AUTOTUNE: the tuner picks the fastest candidate, caches it on disk for later processes,
skips candidates that fail and never times during graph capture; through the launchers, a tuned call
still gives the right answer (interpreter), and on the GPU the cache fills once per key."""

from __future__ import annotations

import json

import pytest
import torch

import flashtron
import flashtron.launch
from attention_cases import check_attention
from flashtron import autotune, env
from flashtron.configs import TileConfig

A, B, C = TileConfig(16, 16, 1, 1), TileConfig(32, 16, 1, 1), TileConfig(16, 32, 1, 1)


def fake(ms: dict, calls: list):
    """(run, timer) that launch nothing: candidate cfg 'takes' ms[cfg] (or raises ms[cfg])."""
    launched = []

    def timer(fn, device):
        fn()
        cfg = launched[-1]
        calls.append(cfg)
        if isinstance(ms[cfg], Exception):
            raise ms[cfg]
        return ms[cfg]

    return launched.append, timer


def choose(tuner, key, candidates, ms, calls=None, **kw):
    run, timer = fake(ms, [] if calls is None else calls)
    return tuner.choose(key, candidates[0], candidates, run, torch.device("cpu"), timer=timer, **kw)


def test_tuner_picks_fastest_and_persists(tmp_path):
    path = tmp_path / "autotune.json"
    calls = []
    tuner = autotune.Tuner(path)
    assert choose(tuner, "k1", [A, B, C], {A: 3.0, B: 1.0, C: 2.0}, calls) == B
    assert calls == [A, B, C]
    assert choose(tuner, "k1", [A, B, C], {A: 3.0, B: 1.0, C: 2.0}, calls) == B
    assert calls == [A, B, C], "a cached key must not be timed again"
    entry = json.loads(path.read_text())["entries"]["k1"]
    assert entry["config"] == [32, 16, 1, 1] and set(entry["ms"]) == {"16x16 w1 s1", "32x16 w1 s1", "16x32 w1 s1"}
    # another process (a new Tuner on the same file) reads it without timing
    later = autotune.Tuner(path)
    assert later.lookup("k1") == B
    # and a second key merges into the file instead of replacing it
    choose(later, "k2", [A, C], {A: 1.0, C: 5.0})
    assert set(json.loads(path.read_text())["entries"]) == {"k1", "k2"}


def test_tuner_skips_failing_candidates(tmp_path):
    tuner = autotune.Tuner(tmp_path / "autotune.json")
    assert choose(tuner, "k", [A, B, C], {A: RuntimeError("out of resources"), B: 2.0, C: 1.5}) == C
    report = json.loads((tmp_path / "autotune.json").read_text())["entries"]["k"]["ms"]
    assert report["16x16 w1 s1"] == "failed: RuntimeError"
    with pytest.raises(RuntimeError, match="the first failure"):  # all failed: an error, not a result
        choose(tuner, "k3", [A, B], {A: RuntimeError("the first failure"), B: ValueError("another")})


def test_tuner_does_not_time_when_told_not_to(tmp_path):
    """may_time=False (a CUDA graph is being captured): the cached entry or the default, no timing."""
    calls = []
    tuner = autotune.Tuner(tmp_path / "autotune.json")
    assert choose(tuner, "k", [A, B], {A: 2.0, B: 1.0}, calls, may_time=False) == A
    assert calls == [] and not (tmp_path / "autotune.json").exists()
    choose(tuner, "k", [A, B], {A: 2.0, B: 1.0}, calls)
    assert choose(tuner, "k", [A, B], {A: 2.0, B: 1.0}, calls, may_time=False) == B


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "null",
        "[]",
        '{"version": 1, "entries": []}',
        '{"version": 1, "entries": {"k": {"config": [16, 16]}}}',
        '{"version": 1, "entries": {"k": null}}',
        '{"version": 0, "entries": {"k": {"config": [16, 16, 1, 1], "ms": {}}}}',
    ],
)
def test_unreadable_cache_is_ignored(tmp_path, content):
    """A damaged, foreign or outdated file reads as empty (and is re-tuned), never an error per call."""
    path = tmp_path / "autotune.json"
    path.write_text(content)
    tuner = autotune.Tuner(path)
    assert tuner.lookup("k") is None
    assert choose(tuner, "k", [A, B], {A: 2.0, B: 1.0}) == B
    assert autotune.Tuner(path).lookup("k") == B  # and the rewritten file is whole


def test_cached_tile_that_is_no_longer_a_candidate_is_retuned(tmp_path):
    tuner = autotune.Tuner(tmp_path / "autotune.json")
    choose(tuner, "k", [A, B], {A: 2.0, B: 1.0})
    calls = []
    assert choose(autotune.Tuner(tmp_path / "autotune.json"), "k", [A, C], {A: 2.0, C: 3.0}, calls) == A
    assert calls == [A, C]


def test_concurrent_writers_keep_every_entry(tmp_path):
    """Threads of one process share one tuner; separate tuners (other processes) merge into the file."""
    import threading

    path = tmp_path / "autotune.json"
    tuners = [autotune.Tuner(path) for _ in range(4)]
    threads = [
        threading.Thread(target=choose, args=(tuners[i % 4], f"k{i}", [A, B], {A: 2.0, B: 1.0})) for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(json.loads(path.read_text())["entries"]) == {f"k{i}" for i in range(16)}


def test_keys_bucket_seqlens_and_programs():
    q = torch.empty(1, 1, 1, 8, dtype=torch.bfloat16)
    base = dict(kernel="fwd", q=q, head_dims=(128, 128), mask="causal", features="softcap")
    k1000 = autotune.key(**base, seqlens=(1000, 1000), programs=48)
    assert k1000 == autotune.key(**base, seqlens=(1024, 513), programs=64)
    assert k1000 != autotune.key(**base, seqlens=(1025, 1000), programs=48)
    assert k1000 != autotune.key(**base, seqlens=(1000, 1000), programs=65)
    assert k1000 != autotune.key(**dict(base, mask="full"), seqlens=(1000, 1000), programs=48)
    assert "bfloat16" in k1000 and "d128/128" in k1000


def test_enabled_only_on_cuda_with_the_variable(monkeypatch):
    monkeypatch.delenv("FLASHTRON_AUTOTUNE", raising=False)
    assert not autotune.enabled(torch.device("cuda"))
    monkeypatch.setenv("FLASHTRON_AUTOTUNE", "1")
    assert autotune.enabled(torch.device("cuda")) and not autotune.enabled(torch.device("cpu"))


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHTRON_CACHE_DIR", str(tmp_path / "here"))
    assert env.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("FLASHTRON_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert env.cache_dir() == tmp_path / "xdg" / "flashtron"


@pytest.fixture
def tuned_launches(monkeypatch, tmp_path):
    """Autotuning switched on for the interpreter, with small candidate tiles: the launchers' tuning
    path runs the real kernels. Yields the cache file."""
    monkeypatch.setenv("FLASHTRON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    monkeypatch.setattr(flashtron.launch, "tune_candidates", lambda kind, device, dtype, d: [A, B, C])
    yield tmp_path / "autotune.json"


class _LaunchLog:
    """Stands in for a Triton kernel: records each launch's (BLOCK_M, BLOCK_N), then launches."""

    def __init__(self, kernel, log: list):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.interpret
def test_tuned_launches_are_correct(tuned_launches, kernel_device, monkeypatch):
    """Forward and backward through the tuning path, every candidate run on the call's tensors: the
    reference's answer, one cache entry per kernel, and the winner (C, the table's tile only for dK/dV)
    is the last launch of each kernel."""
    logs = {name: [] for name in ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")}
    for name, log in logs.items():
        monkeypatch.setattr(flashtron.launch, name, _LaunchLog(getattr(flashtron.launch, name), log))
    order = iter([3.0, 2.0, 1.0] * 3)  # A, B, C in candidate order, for each kernel: C is fastest

    def timer(fn, device):
        fn()
        return next(order)

    monkeypatch.setattr(autotune, "time_ms", timer)
    check_attention(1, 17, 23, 2, 1, 16, 16, torch.float16, kernel_device, causal=True, softcap=2.0)
    entries = json.loads(tuned_launches.read_text())["entries"]
    assert sorted(key.split("|")[0] for key in entries) == ["dkdv", "dq", "fwd"]
    assert all(e["config"] == [16, 32, 1, 1] and len(e["ms"]) == 3 for e in entries.values())
    for name, log in logs.items():
        assert len(log) == 4 and log[-1] == (C.block_m, C.block_n), (name, log)  # 3 timed, then the winner


@pytest.mark.gpu
def test_gpu_autotune_fills_the_cache_once(monkeypatch, tmp_path):
    """The real timing path on the GPU: right answers, one entry per kernel, no re-timing. Two
    candidates per kernel (the table's tile and the next) keep the compiles few."""
    real_candidates = flashtron.launch.tune_candidates
    monkeypatch.setattr(flashtron.launch, "tune_candidates", lambda *args: real_candidates(*args)[:2])
    monkeypatch.setenv("FLASHTRON_AUTOTUNE", "1")
    monkeypatch.setenv("FLASHTRON_CACHE_DIR", str(tmp_path))
    # the autotuner tunes the Triton kernels: keep the d128 forward off the Gluon kernel it takes by default
    monkeypatch.setenv("FLASHTRON_BACKEND", "triton")
    check_attention(2, 1000, 1000, 8, 2, 128, 128, torch.bfloat16, "cuda", causal=True)
    entries = json.loads((tmp_path / "autotune.json").read_text())["entries"]
    assert sorted(key.split("|")[0] for key in entries) == ["dkdv", "dq", "fwd"]
    timed = []
    monkeypatch.setattr(autotune, "time_ms", lambda run, device: timed.append(1) or 1.0)
    q, k, v = (torch.randn(2, 1000, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2))
    flashtron.flash_attn_func(q, k, v, causal=True).sum().backward()
    assert timed == [], "a cached key was timed again (forward, dK/dV or dQ)"
