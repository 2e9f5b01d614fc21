"""The persistent Gluon forward's static tile schedule (kernels/hopper_common.tile_coords), on the CPU.

The kernel calls `tile_coords` on i32 scalars; here its Python body (the JITFunction's `.fn`, the same
source, not a copy) runs on Python ints, which means the same because it only divides and takes remainders
of non-negative values. Program p of a grid of P does linear tiles p, p + P, p + 2P, ... (hopper_fwd.
_persistent_tiles), as simulated below.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("triton.experimental.gluon", reason="needs triton with Gluon (3.6+)")

from flashtron import launch_hopper  # noqa: E402
from flashtron.kernels.hopper_common import snake_order, tile_coords  # noqa: E402

tile_coords = tile_coords.fn  # the undecorated function: plain Python on ints
snake_order = snake_order.fn

BLOCK_M = BLOCK_N = 128


def _causal_blocks(pid_m: int, seqlen_q: int, seqlen_k: int) -> int:
    """KV blocks a query block visits under the bottom-right causal mask (the work of the tile), at least one
    as in the kernel: test-side arithmetic, not the kernel's kv_range."""
    hi = min(seqlen_k, max((pid_m + 1) * BLOCK_M + seqlen_k - seqlen_q, 0))
    return max(math.ceil(hi / BLOCK_N), 1)


def _programs(n_tiles: int, grid: int) -> list[list[int]]:
    """Each program's linear tiles, in the order it does them."""
    return [list(range(p, n_tiles, grid)) for p in range(grid)]


# (batch, nheads, seqlen_q, heads_per_section): sections that divide the (batch, head) pairs, that do not
# (a short last section), one section of everything, one pair per section, a single query block
SHAPES = [(2, 8, 1000, 16), (2, 8, 1000, 3), (3, 5, 300, 4), (16, 16, 1024, 50), (1, 1, 4096, 1), (4, 3, 100, 2)]
GRIDS = [1, 7, 132, 10_000]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("batch, nheads, seqlen_q, per_section", SHAPES)
def test_every_tile_once(batch, nheads, seqlen_q, per_section, reverse):
    n_m = math.ceil(seqlen_q / BLOCK_M)
    n_tiles = n_m * nheads * batch
    for grid in GRIDS:
        grid = min(grid, n_tiles)  # kernel_launch's grid
        seen = [tile_coords(t, n_m, batch * nheads, nheads, per_section, reverse)
                for tiles in _programs(n_tiles, grid) for t in tiles]  # fmt: skip
        assert len(seen) == n_tiles
        assert set(seen) == {(m, h, b) for m in range(n_m) for h in range(nheads) for b in range(batch)}


@pytest.mark.parametrize("batch, nheads, seqlen_q, per_section", SHAPES)
@pytest.mark.parametrize("seqlen_k_delta", [0, 300, -200])
def test_causal_heaviest_first(batch, nheads, seqlen_q, per_section, seqlen_k_delta):
    """Within an L2 section the work never grows along the linear order, so each program does its tiles of
    a section heaviest first; with the whole problem one section, every program's whole sequence never
    grows and each wave of the grid is at least as heavy, tile for tile, as any later one."""
    seqlen_k = max(seqlen_q + seqlen_k_delta, 1)
    n_m = math.ceil(seqlen_q / BLOCK_M)
    n_pairs = batch * nheads
    section_tiles = per_section * n_m
    n_tiles = n_m * n_pairs

    def work(t):
        return _causal_blocks(tile_coords(t, n_m, n_pairs, nheads, per_section, True)[0], seqlen_q, seqlen_k)

    for start in range(0, n_tiles, section_tiles):
        works = [work(t) for t in range(start, min(start + section_tiles, n_tiles))]
        assert works == sorted(works, reverse=True)
        assert works[0] == _causal_blocks(n_m - 1, seqlen_q, seqlen_k)  # a section opens with a last block
    one = n_pairs  # one section of every pair
    for grid in GRIDS:
        grid = min(grid, n_tiles)
        waves = [[_causal_blocks(tile_coords(t, n_m, n_pairs, nheads, one, True)[0], seqlen_q, seqlen_k)
                  for t in range(w, min(w + grid, n_tiles))] for w in range(0, n_tiles, grid)]  # fmt: skip
        for earlier, later in zip(waves, waves[1:]):
            assert min(earlier) >= max(later)


def test_sections_keep_heads_together():
    """No mask: the tiles running at one time (a window of the linear order as long as the section) belong
    to at most two sections' worth of (batch, head) pairs, heads of one batch entry adjacent."""
    batch, nheads, n_m, per_section = 4, 6, 9, 4
    coords = [tile_coords(t, n_m, batch * nheads, nheads, per_section, False) for t in range(batch * nheads * n_m)]
    pairs = [b * nheads + h for _, h, b in coords]
    window = per_section * n_m
    for start in range(0, len(coords) - window + 1):
        assert len(set(pairs[start : start + window])) <= 2 * per_section
    # the first section: query blocks ascending (no mask), its pairs the first per_section ones
    assert [m for m, _, _ in coords[:window:per_section]] == list(range(n_m))
    assert set(pairs[:window]) == set(range(per_section))


def test_launcher_grid_and_sections():
    """kernel_launch's persistent grid: min(tiles, SMs), SM90_SMS for CPU tensors; the section size fits
    L2_SECTION_BYTES of K and V (a GQA group's heads share theirs), at least one head."""
    import torch

    from flashtron.options import AttnOptions

    tile = launch_hopper.CANDIDATE_TILES["persist"][128]
    opts = AttnOptions(softmax_scale=0.1, window_right=0)
    for batch, seqlen, nheads, nheads_k, programs in ((2, 300, 4, 2, 24), (16, 1024, 16, 16, 132), (1, 64, 1, 1, 1)):
        q = torch.empty(batch, seqlen, nheads, 128, dtype=torch.bfloat16)
        k = torch.empty(batch, seqlen, nheads_k, 128, dtype=torch.bfloat16)
        _, grid, args, kwargs = launch_hopper.kernel_launch(q, k, k, q, torch.empty(batch, nheads, seqlen), opts, tile)
        assert grid == (programs,) and kwargs["PERSISTENT"]
        per_section = args[-1]
        group = nheads // nheads_k
        kv = 2 * seqlen * 128 * 2
        assert 1 <= per_section <= batch * nheads
        assert per_section == 1 or per_section * kv <= launch_hopper.L2_SECTION_BYTES * group
    # the dispatch: dense calls take the persistent grid, except causal d128 ones without a left window past
    # PERSISTENT_CAUSAL_MAX_SEQLEN, softcap and varlen, which keep the 3-D grid; windows stay persistent
    _, grid, _, kwargs = launch_hopper.kernel_launch(q, k, k, q, torch.empty(1, 1, 64), opts)
    assert grid == (1,) and kwargs["PERSISTENT"]
    for d, o, persistent in ((128, opts, False), (128, AttnOptions(softmax_scale=0.1), True),
                             (64, opts, True), (128, AttnOptions(softmax_scale=0.1, softcap=5.0), False),
                             (128, AttnOptions(softmax_scale=0.1, window_left=512, window_right=0), True)):  # fmt: skip
        long_q = torch.empty(1, 8192, 1, d, dtype=torch.bfloat16)
        _, grid, _, kwargs = launch_hopper.kernel_launch(long_q, long_q, long_q, long_q, torch.empty(1, 1, 8192), o)
        assert kwargs["PERSISTENT"] == persistent and len(grid) == (1 if persistent else 3)


@pytest.mark.parametrize("n_tiles", [1, 7, 131, 132, 133, 264, 265, 1000, 2048])
@pytest.mark.parametrize("grid", [1, 2, 7, 132])
def test_snake_order_is_a_permutation_within_rounds(n_tiles, grid):
    """snake_order maps [0, n_tiles) onto itself, each tile staying in its round of `grid` programs; even
    rounds keep their order, odd ones run backwards (a partial last round within its own length)."""
    grid = min(grid, n_tiles)
    order = [snake_order(t, n_tiles, grid) for t in range(n_tiles)]
    assert sorted(order) == list(range(n_tiles))
    for t, o in zip(range(n_tiles), order):
        assert o // grid == t // grid
        if (t // grid) % 2 == 0:
            assert o == t
    if n_tiles > grid:  # the second round, reversed
        size = min(grid, n_tiles - grid)
        assert order[grid : grid + size] == list(range(grid + size - 1, grid - 1, -1))


@pytest.mark.parametrize("seqlen, nheads", [(1024, 16), (2048, 24), (4096, 16), (8192, 16), (16384, 16)])
def test_snake_one_section_balances_causal_work(seqlen, nheads):
    """The reason for snake order: with one L2 section, heaviest first under the causal mask, the busiest of
    132 programs does at most 3.5% more KV blocks than the mean (1024: whole tiles, 2048 over 132, allow no
    less), where the plain order with one section gives 3.6-6.3% from 2k up and with the dispatched d128
    sections up to 21% (scripts/persistent_balance.py); batch * seqlen = 16384 as in PERF.md's grid."""
    batch = 16384 // seqlen
    n_m = math.ceil(seqlen / BLOCK_M)
    n_pairs = batch * nheads
    n_tiles, grid = n_m * n_pairs, 132
    loads = [0] * grid
    for t in range(n_tiles):
        pid_m = tile_coords(snake_order(t, n_tiles, grid), n_m, n_pairs, nheads, n_pairs, True)[0]
        loads[t % grid] += _causal_blocks(pid_m, seqlen, seqlen)
    assert max(loads) <= 1.035 * sum(loads) / grid


@pytest.mark.parametrize(
    "window, persistent",
    [
        ((-1, -1), True),  # no mask: equal work per query block
        ((1024, 0), True),  # a band: equal work
        ((0, 0), True),
        ((-1, 0), False),  # causal: the work grows along the rows
        ((5, -1), False),  # a left bound only: it shrinks
        ((-1, 5), False),
        ((100000, 0), False),  # a left bound past every key is none: exactly causal
        ((1024, 100000), False),  # likewise a right bound past every query: a left bound only
    ],
)
def test_one_sided_masks_past_the_limit_take_the_one_tile_grid(window, persistent):
    """launch_hopper.dispatched_tile at d128, 8192 rows: calls whose work per query block is uneven (bounded on
    one side only, counting a bound past every key or query as none) take the one-tile grid past
    PERSISTENT_CAUSAL_MAX_SEQLEN, as causal does; no mask and bands stay on the persistent grid."""
    from flashtron.options import AttnOptions

    opts = AttnOptions(softmax_scale=0.1, window_left=window[0], window_right=window[1])
    assert launch_hopper.PERSISTENT_CAUSAL_MAX_SEQLEN[128] < 8192
    tile = launch_hopper.dispatched_tile(128, 8192, opts, varlen=False, seqlen_k=8192)
    assert tile.persistent == persistent
    short = launch_hopper.dispatched_tile(128, launch_hopper.PERSISTENT_CAUSAL_MAX_SEQLEN[128], opts, varlen=False)
    assert short.persistent  # at or below the limit every dense call is persistent


@pytest.mark.parametrize(
    "d, seqlen, window, dynamic",
    [
        (128, 1000, (-1, -1), True),  # d128: the dynamic counter for every persistent call
        (128, 4096, (-1, 0), True),
        (128, 16384, (1024, 0), True),
        (64, 1000, (-1, 0), False),  # d64: the static schedule at 1k and for even work
        (64, 2048, (-1, 0), False),
        (64, 2049, (-1, 0), True),  # causal past DYNAMIC_UNEVEN_MIN_SEQLEN: dynamic
        (64, 16384, (-1, 0), True),
        (64, 16384, (-1, -1), False),
        (64, 16384, (1024, 0), False),
    ],
)
def test_dynamic_schedule_where_measured_ahead(d, seqlen, window, dynamic):
    """dispatched_tile's persistent calls take the dynamic tile counter at d128, and at d64 for uneven (one-sided)
    masks past DYNAMIC_UNEVEN_MIN_SEQLEN, as the same-run timings in launch_hopper's comment found."""
    from flashtron.options import AttnOptions

    opts = AttnOptions(softmax_scale=0.1, window_left=window[0], window_right=window[1])
    tile = launch_hopper.dispatched_tile(d, seqlen, opts, varlen=False)
    assert tile.persistent and tile.dynamic == dynamic
    assert tile == launch_hopper.CANDIDATE_TILES["persist-dyn" if dynamic else "persist"][d]
