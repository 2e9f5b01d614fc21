"""The persistent Gluon forward's tile handshake, emulated on the CPU with threads: the real code of
kernels/hopper_fwd.py's `_persistent_loader`, `_load_work_tile` and `_persistent_consumer` (their undecorated
Python functions) runs with `gl` and `mbarrier` swapped for fakes, one loader thread and CONSUMERS consumer
threads per program, several programs sharing one tile counter. What is faked: a work tile's loads and its math
(the consumer's stand-in waits for the tile's Q barrier phase, records the tile and releases the Q buffer, as
hopper_fwd_tile.consume_tile does), and the barriers (a count, a phase bit, waits on parity as PTX's
mbarrier.try_wait.parity: wait(P) returns once the phase of parity P has completed, at once on a fresh
barrier for P = 1). What is real: the Q buffers' parity bookkeeping, the slots, the counter's claims, the
sentinel round that ends the consumers, and the static schedule's tile order. A hang fails the test (each wait
times out) instead of blocking it."""

from __future__ import annotations

import random
import threading
import time
import types

import pytest

pytest.importorskip("triton.experimental.gluon", reason="needs triton with Gluon (3.6+)")

from flashtron.kernels import hopper_common, hopper_fwd  # noqa: E402

WAIT_LIMIT = 10.0  # seconds a fake barrier wait may take before the handshake counts as hung


class _Barrier:
    """An mbarrier: `count` arrivals complete the current phase and flip the phase bit."""

    def __init__(self, count, cond):
        self.count, self.pending, self.phase, self.cond = count, count, 0, cond

    def arrive(self):
        with self.cond:
            self.pending -= 1
            assert self.pending >= 0
            if self.pending == 0:
                self.pending, self.phase = self.count, self.phase ^ 1
                self.cond.notify_all()

    def wait(self, parity):
        with self.cond:  # the phase of parity P has completed once the bit moved past P
            if not self.cond.wait_for(lambda: self.phase != parity, timeout=WAIT_LIMIT):
                raise TimeoutError(f"mbarrier wait on parity {parity} never completed")


class _Bars:
    def __init__(self, bars):
        self.bars = bars

    def index(self, i):
        return self.bars[i]


class _Memory:
    """Global memory for the counter and the tile slots, with addresses as plain ints."""

    def __init__(self):
        self.cells, self.lock = {}, threading.Lock()

    def store(self, addr, value):
        with self.lock:
            self.cells[addr] = value

    def load(self, addr, volatile=False):
        with self.lock:
            return self.cells[addr]

    def atomic_add(self, addr, value, sem=None):
        with self.lock:
            old = self.cells.get(addr, 0)
            self.cells[addr] = old + value
            return old


def _jitter():
    if random.random() < 0.3:
        time.sleep(random.random() * 1e-4)


def _run_grid(n_tiles, programs, consumers, dynamic, seed):
    """Runs the handshake of one launch; returns {pid: (loader's tiles, [each consumer's tiles])}."""
    random.seed(seed)
    memory, local = _Memory(), threading.local()
    fake_gl = types.SimpleNamespace(
        num_programs=lambda axis: programs,
        program_id=lambda axis: local.pid,
        cdiv=lambda a, b: -(-a // b),
        atomic_add=memory.atomic_add,
        store=memory.store,
        load=memory.load,
        thread_barrier=lambda: None,
    )
    fake_mbarrier = types.SimpleNamespace(
        wait=lambda bar, parity: (_jitter(), bar.wait(parity)),
        arrive=lambda bar, count=1: bar.arrive(),
        expect=lambda bar, nbytes: bar.arrive(),  # the Q box's bytes land at once: arrive + completion
    )
    log = {}

    def emulated(jitted, **extra):
        fn = jitted.fn
        return types.FunctionType(
            fn.__code__, {**fn.__globals__, "gl": fake_gl, "mbarrier": fake_mbarrier, **extra}, fn.__name__
        )

    def tile_work(tile, *args):  # (start_m, off_h, off_b, off_hk, lo, full_lo, full_hi, hi, n_blocks)
        return tile, 0, 0, 0, 0, 0, 0, 0, 1

    def load_q(q_desc, q_smem, bar, *args):
        _jitter()
        log[local.pid][0].append(("q", local.tile_hint))
        fake_mbarrier.expect(bar, 0)

    def load_work_tile_logged(*args):
        local.tile_hint = args[9]  # the tile argument
        return load_work_tile(*args)

    def consume_work_tile(q_smem, k_desc, v_desc, k_bufs, v_bufs, bars, q_bars, *args):
        tile, i, t = args[7], args[8], args[9]
        qb = i % 2
        q_bars.index(qb).wait((i // 2) & 1)  # as consume_tile: the tile's Q has landed
        _jitter()
        log[local.pid][1][local.cid].append(tile)
        q_bars.index(2 + qb).arrive()  # RELEASE_Q: the loader may refill this buffer
        return t + 1

    load_work_tile = emulated(hopper_fwd._load_work_tile, tile_work=tile_work, _load_q=load_q,
                              load_kv=lambda *a: None)  # fmt: skip
    persistent_tiles = emulated(hopper_common.persistent_tiles)
    loader = emulated(hopper_fwd._persistent_loader, _load_work_tile=load_work_tile_logged,
                      persistent_tiles=persistent_tiles)  # fmt: skip
    consumer = emulated(hopper_fwd._persistent_consumer, _consume_work_tile=consume_work_tile,
                        persistent_tiles=persistent_tiles)  # fmt: skip
    counter = 1000  # TileCounter's address; its cell starts at 0 as the launcher's zeros
    memory.store(counter, 0)
    # seqlen_q = n_tiles query blocks of BLOCK_M 1, one head, one batch entry: n_tiles work tiles
    shape = dict(seqlen_q=n_tiles, nheads=1, batch=1, BLOCK_M=1)
    errors, threads = [], []

    def run(pid, role, cid=0):
        local.pid, local.cid = pid, cid
        try:
            if role == "loader":
                loader(None, None, None, None, None, None, None, q_bars[pid], counter, shape["seqlen_q"], 0, 1, 0, 0,
                       shape["nheads"], shape["batch"], 1, shape["BLOCK_M"], 1, 2, False, True, False, consumers,
                       dynamic)  # fmt: skip
            else:
                consumer(None, None, None, None, None, None, q_bars[pid], counter, None, None, 0, 0, 0, 0, 0,
                         shape["seqlen_q"], 0, 1, 0, 0, 1.0, None, shape["nheads"], shape["batch"], 1,
                         shape["BLOCK_M"], 1, 64, 2, False, True, False, False, True, cid, consumers,
                         dynamic)  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(f"program {pid} {role} {cid}: {type(exc).__name__}: {exc}")

    q_bars = {}
    for pid in range(programs):
        cond = threading.Condition()
        q_bars[pid] = _Bars([_Barrier(1, cond), _Barrier(1, cond), _Barrier(consumers, cond),
                             _Barrier(consumers, cond)])  # fmt: skip
        log[pid] = ([], [[] for _ in range(consumers)])
        threads.append(threading.Thread(target=run, args=(pid, "loader")))
        threads += [threading.Thread(target=run, args=(pid, "consumer", c)) for c in range(consumers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=4 * WAIT_LIMIT)
    assert not any(th.is_alive() for th in threads), "a partition never finished"
    assert not errors, errors
    return log


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("consumers", [1, 2])
@pytest.mark.parametrize("n_tiles, programs", [(1, 1), (2, 1), (5, 2), (7, 3), (40, 3), (13, 13), (64, 5)])
def test_every_tile_once_in_the_loaders_order(n_tiles, programs, consumers, dynamic):
    """Every work tile is consumed exactly once over the grid; in each program every consumer takes the tiles the
    loader loaded, in its order; the static schedule gives program p the tiles p, p + P, ...; nothing hangs,
    including the dynamic schedule's last round (the slot holding the tile count)."""
    for seed in range(3):
        log = _run_grid(n_tiles, programs, consumers, dynamic, seed)
        seen = []
        for pid, (loads, taken) in log.items():
            loaded = [tile for kind, tile in loads if kind == "q"]
            assert all(t == loaded for t in taken), f"program {pid}: loader {loaded}, consumers {taken}"
            if not dynamic:
                assert loaded == list(range(pid, n_tiles, programs))
            elif loaded:
                assert loaded[0] == pid and loaded == sorted(loaded)  # its first tile, then claims in order
            seen += loaded
        assert sorted(seen) == list(range(n_tiles)), f"tiles {sorted(seen)}"
