"""Which attention calls one ring step makes: pure integer arithmetic, no tensors, no communication.

A rank's shard is a few *segments* of the global sequence (one for `contiguous`, two for `zigzag`),
each a run of consecutive positions stored consecutively in the local tensor. At ring step s the
rank holds its own queries and the keys of rank `src`. Each (query segment, key segment) pair sees a
*band* of the global mask: query at position i sees key at position j iff
`lo <= j - i - (seqlen_k - seqlen_q) <= hi`, with lo = -window_left and hi = window_right (either
unbounded). In a block's own coordinates that band is `a <= jj - ii <= b`, with a and b shifted by
the segments' offsets.

flashtron's attention takes one window per call, bottom-right aligned: a block (rows x cols) with
window (left, right) sees `cols - rows - left <= jj - ii <= cols - rows + right`, left and right >= 0
or -1. A band that does not contain `cols - rows` (e.g. a window that starts right of the diagonal)
cannot be written that way, but the *bounding box* of the visible entries always can: its bottom-right
corner is always visible (the proof is in `_box`), so cropping the block to the box and measuring the
window from that corner is exact. Rows outside the box see nothing in this block and are skipped;
blocks that see nothing are dropped.

Neighbouring segments are merged into one call whenever a single band reproduces every pair's mask
(causal zigzag needs one call per step this way, instead of two or three).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

LAYOUTS = ("zigzag", "contiguous")
INF = float("inf")


class Segment(NamedTuple):
    start: int  # global position of the first token
    length: int
    offset: int  # index of the first token in the local shard


class Block(NamedTuple):
    """One attention call: local query rows [q0, q1), local key rows [k0, k1), the window to pass."""

    q0: int
    q1: int
    k0: int
    k1: int
    window_left: int  # -1: unbounded
    window_right: int


def chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def segments(layout: str, world: int, rank: int, seqlen: int) -> tuple[Segment, ...]:
    """The global runs that `rank` holds of a sequence of `seqlen` tokens split over `world` ranks.

    contiguous: chunk `rank` of `world`. zigzag: chunks `rank` and `2 * world - 1 - rank` of
    `2 * world`, so that under a causal mask every rank does the same work.
    """
    if layout == "contiguous":
        n = seqlen // world
        return (Segment(rank * n, n, 0),)
    n = seqlen // (2 * world)
    return Segment(rank * n, n, 0), Segment((2 * world - 1 - rank) * n, n, n)


def _clip(lo, hi, lo_range, hi_range):
    """[lo, hi] intersected with [lo_range, hi_range], or None when empty."""
    lo, hi = max(lo, lo_range), min(hi, hi_range)
    return (lo, hi) if lo <= hi else None


def _pairs(q_segs, k_segs, band_lo, band_hi, shift):
    """For each (query segment, key segment) of one candidate call: the range of jj - ii it covers in
    the call's coordinates and the part of that range the global band makes visible (or None)."""
    out = []
    row = 0
    for qs in q_segs:
        col = 0
        for ks in k_segs:
            # global j - i - shift = (jj - ii) + offset, for jj, ii counted from the call's first row/col
            offset = (ks.start - col) - (qs.start - row) - shift
            covered = (col - row - (qs.length - 1), col - row + ks.length - 1)
            out.append((covered, _clip(band_lo - offset, band_hi - offset, *covered)))
            col += ks.length
        row += qs.length
    return out


def _solve(pairs):
    """A band [a, b] (a may be -inf, b +inf) whose intersection with each pair's covered range is
    exactly that pair's visible part, or None. Each pair either fixes a bound or only limits it, so
    the candidates are the pairs' visible ends and the values just outside their ranges."""
    lows = {-INF} | {vis[0] for _, vis in pairs if vis} | {cov[1] + 1 for cov, _ in pairs}
    highs = {INF} | {vis[1] for _, vis in pairs if vis} | {cov[0] - 1 for cov, _ in pairs}
    for a, b in itertools.product(sorted(lows), sorted(highs, reverse=True)):
        if all(_clip(a, b, *cov) == vis for cov, vis in pairs):
            return a, b
    return None


def _box(a, b, rows, cols):
    """The bounding box (r0, r1, c0, c1), inclusive, of {(ii, jj): a <= jj - ii <= b} in a rows x cols
    block, or None when empty. Its bottom-right corner is visible: r1 is rows - 1 or cols - 1 - a, and
    c1 is cols - 1 or b + rows - 1; the first three combinations put c1 - r1 in [a, b], and the last
    one needs b < cols - rows < a, which cannot hold when the box is not empty."""
    r0, r1 = max(0, -b), min(rows - 1, cols - 1 - a)
    c0, c1 = max(0, a), min(cols - 1, b + rows - 1)
    if r0 > r1 or c0 > c1:
        return None
    return int(r0), int(r1), int(c0), int(c1)


def _call(q_segs, k_segs, band_lo, band_hi, shift):
    """The Block for one candidate call, None when nothing is visible, or False when no single window
    reproduces the global mask over these segments."""
    pairs = _pairs(q_segs, k_segs, band_lo, band_hi, shift)
    if not any(vis for _, vis in pairs):
        return None
    band = _solve(pairs)
    if band is None:
        return False
    rows, cols = sum(s.length for s in q_segs), sum(s.length for s in k_segs)
    r0, r1, c0, c1 = _box(*band, rows, cols)
    corner = c1 - r1
    # measured from the box's bottom-right corner; a side the box does not reach is left unbounded
    left = -1 if band[0] <= c0 - r1 else corner - band[0]
    right = -1 if band[1] >= c1 - r0 else band[1] - corner
    q_base, k_base = q_segs[0].offset, k_segs[0].offset
    return Block(q_base + r0, q_base + r1 + 1, k_base + c0, k_base + c1 + 1, int(left), int(right))


def _runs(n):
    """The ways of cutting n segments into runs of neighbours, fewest runs first."""
    cuts = [c for r in range(n) for c in itertools.combinations(range(1, n), r)]
    return [tuple(zip((0, *c), (*c, n))) for c in cuts]


@functools.lru_cache(maxsize=4096)
def ring_blocks(layout, world, rank, src, seqlen_q, seqlen_k, window_left, window_right) -> tuple[Block, ...]:
    """The calls rank `rank` makes with the keys of rank `src`: the fewest calls that are exact.

    seqlen_q, seqlen_k: the global lengths; window_left, window_right: the global window (-1
    unbounded, causal being window_right = 0), bottom-right aligned on the global sequence.
    """
    q_segs = segments(layout, world, rank, seqlen_q)
    k_segs = segments(layout, world, src, seqlen_k)
    band = (-window_left if window_left >= 0 else -INF, window_right if window_right >= 0 else INF)
    shift = seqlen_k - seqlen_q
    best = None
    for q_runs, k_runs in itertools.product(_runs(len(q_segs)), _runs(len(k_segs))):
        calls = [_call(q_segs[a:b], k_segs[c:d], *band, shift) for (a, b), (c, d) in itertools.product(q_runs, k_runs)]
        if False in calls:
            continue
        calls = tuple(c for c in calls if c is not None)
        if best is None or len(calls) < len(best):
            best = calls
    return best
