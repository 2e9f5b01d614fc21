"""Optional autotuning of the attention tiles (FLASHTRON_AUTOTUNE=1), with an on-disk cache.

Off by default: the tables in configs.py decide. With FLASHTRON_AUTOTUNE=1, the first call of a kernel
for a key times each candidate tile of configs.HOPPER_CANDIDATES on that call's own tensors (every
candidate passed the fp32-reference check of scripts/tune.py), keeps the fastest, and writes it to
autotune.json in env.cache_dir() ($FLASHTRON_CACHE_DIR, else $XDG_CACHE_HOME/flashtron, else
~/.cache/flashtron), so later calls and later processes
skip the timing. Keys are bucketed so that nearby shapes share one entry:

    kernel | device | flashtron and triton versions | dtype | head dims | mask kind | features | seqlens | batch*heads

with seqlens and batch * heads rounded up to powers of two; the features include the GQA group size.
Where there is nothing to choose from (other archs, fp32, head dims past 256) the table's tile is
used and nothing is timed.

Which tile runs can change the result's last bits, so: calls with deterministic=True always take the
table's tile; nothing is timed while a CUDA graph is being captured (a cached entry is used, else the
table's tile, so a graph captured before its key was tuned keeps the table's tile while later eager
calls take the tuned one); results are reproducible for a given cache file. Tuning launches the kernel
several times on the call's inputs; the kernels overwrite their outputs, and the winner is launched
once more, so the call's result is the winner's. The first call of each key costs a compile per
candidate.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from flashtron import env
from flashtron.configs import TileConfig

TIMED_RUNS = 5  # after one untimed run (it compiles); the median is kept
_FILE = "autotune.json"
_VERSION = 1


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and env.autotune()


def bucket(n: int) -> int:
    """n rounded up to a power of two (at least 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def key(kernel: str, q: torch.Tensor, head_dims: tuple[int, int], mask: str, features: str, seqlens, programs) -> str:
    """The cache key of one launch (module docstring). seqlens: (seqlen_q, seqlen_k); programs:
    batch * heads."""
    import triton

    from flashtron import __version__

    name = torch.cuda.get_device_name(q.device) if q.is_cuda else q.device.type
    dtype = str(q.dtype).removeprefix("torch.")
    sq, sk = (bucket(s) for s in seqlens)
    return (
        f"{kernel}|{name}|flashtron {__version__}|triton {triton.__version__}|{dtype}|d{head_dims[0]}/{head_dims[1]}|"
        f"{mask}|{features or '-'}|s{sq}x{sk}|bh{bucket(programs)}"
    )


def time_ms(run: Callable[[], None], device: torch.device) -> float:
    """Median of TIMED_RUNS timings of run() after one untimed call: CUDA events on the GPU, the wall
    clock elsewhere (the interpreter, in tests)."""
    run()
    times = []
    for _ in range(TIMED_RUNS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Tuner:
    """Chosen tiles by key, backed by a JSON file that several threads and processes may share.

    Writes merge with the file's current entries under an advisory lock (POSIX flock; without it a
    concurrent writer's new entry can be lost, never the file) and replace it atomically. Entries that
    do not parse, or whose tile is no longer a candidate (the kernels or the lists changed), are
    ignored and re-tuned."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict | None = None
        self._lock = threading.Lock()
        self._warned = False

    def _load(self) -> dict:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            entries = data["entries"] if data["version"] == _VERSION else {}
            return {k: e for k, e in entries.items() if _tile(e) is not None}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):  # absent, or not ours
            return {}

    def lookup(self, key: str, candidates: Sequence[TileConfig] = ()) -> TileConfig | None:
        """The cached tile for key, if it is one of the candidates (any tile when none are given)."""
        tile = _tile(self._load().get(key))
        return tile if tile is not None and (not candidates or tile in candidates) else None

    def record(self, key: str, cfg: TileConfig, timings: dict) -> None:
        entry = {"config": [cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages], "ms": timings}
        self._load()[key] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path.with_name(self.path.name + ".lock")):
                entries = self._read()
                entries[key] = entry
                tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.tmp")
                tmp.write_text(json.dumps({"version": _VERSION, "entries": entries}, indent=1, sort_keys=True))
                os.replace(tmp, self.path)
        except OSError as exc:
            if not self._warned:
                message = f"flashtron autotune: cannot write {self.path} ({exc}); results stay in memory"
                warnings.warn(message, stacklevel=4)
                self._warned = True

    def choose(
        self,
        key: str,
        default: TileConfig,
        candidates: Sequence[TileConfig],
        run: Callable[[TileConfig], None],
        device: torch.device,
        may_time: bool = True,
        timer: Callable[[Callable[[], None], torch.device], float] | None = None,
    ) -> TileConfig:
        """The cached tile for key; else, when may_time, the fastest candidate (timed with run(cfg)
        and recorded); else default. A candidate that fails (e.g. out of shared memory) is skipped;
        if every one fails, the first failure is raised."""
        with self._lock:
            cached = self.lookup(key, candidates)
            if cached is not None:
                return cached
            if not may_time or len(candidates) < 2:
                return default
            timer = timer or time_ms
            timings, failures = {}, {}
            for cfg in candidates:
                try:
                    timings[cfg] = timer(lambda cfg=cfg: run(cfg), device)
                except Exception as exc:  # e.g. a tile this device lacks the shared memory for
                    failures[cfg] = exc
            if not timings:  # nothing ran: a real error, not a tuning result
                raise next(iter(failures.values()))
            best = min(timings, key=timings.get)
            report = {_label(c): ms for c, ms in timings.items()}
            report.update({_label(c): f"failed: {type(e).__name__}" for c, e in failures.items()})
            self.record(key, best, report)
            return best


def _tile(entry) -> TileConfig | None:
    """The tile of a cache entry, or None for anything malformed."""
    try:
        config = entry["config"]
        if len(config) == 4 and all(isinstance(x, int) and x > 0 for x in config):
            return TileConfig(*config)
    except (TypeError, KeyError, IndexError):
        pass
    return None


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: unlocked (a concurrent entry may be lost, the file stays whole)
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _label(cfg: TileConfig) -> str:
    return f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"


_tuners: dict[Path, Tuner] = {}
_tuners_lock = threading.Lock()


def tuner() -> Tuner:
    """The process's tuner for the current FLASHTRON_CACHE_DIR (one per file, shared by threads)."""
    path = env.cache_dir() / _FILE
    with _tuners_lock:
        if path not in _tuners:
            _tuners[path] = Tuner(path)
        return _tuners[path]


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
