"""How evenly the persistent Gluon forward's static schedule spreads work over the SMs, on the CPU: each program
p of the grid takes linear tiles p, p + P, p + 2P, ... (hopper_common.persistent_tiles) mapped to (query block,
head, batch) by the kernel's own tile_coords (its undecorated .fn, plain Python on ints), with L2 sections of
launch_hopper._heads_per_section's size. A tile's work is its KV block count. Prints
max / mean work per program, the kernel's time over a perfectly balanced one, for the PERF.md grid (batch * seqlen
16384, nheads 2048 / d), beside list scheduling of the one-tile grid's programs in launch order (what the
hardware's block scheduler does for the ping-pong grid, to a first approximation), the same static schedule
with a single section (heads_per_section = every pair), that with odd rounds reversed (snake_order, the
"persist-snake" candidate), and the dispatched sections with the dynamic tile counter ("persist-dyn": after its
first tile, each program takes the next tile in linear order when it frees).
    python scripts/persistent_balance.py [--d 128] [--sms 132]"""

import argparse
import heapq
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

from flashtron import launch_hopper  # noqa: E402
from flashtron.kernels.hopper_common import snake_order, tile_coords  # noqa: E402


def tile_blocks(pid_m, s, causal, block):
    """KV blocks of query block pid_m with seqlen_q = seqlen_k = s and square blocks: all of them, or under the
    causal mask those up to the diagonal (what hopper_common.kv_range gives for these shapes)."""
    keys = min((pid_m + 1) * block, s) if causal else s
    return -(-keys // block)


def static_imbalance(s, batch, nheads, causal, sms, per_section, snake=False, block=128):
    n_m = -(-s // block)
    n_pairs = batch * nheads
    n_tiles = n_m * n_pairs
    loads = [0] * min(sms, n_tiles)
    for t in range(n_tiles):
        order = snake_order.fn(t, n_tiles, len(loads)) if snake else t
        pid_m, _, _ = tile_coords.fn(order, n_m, n_pairs, nheads, per_section, causal)
        loads[t % len(loads)] += tile_blocks(pid_m, s, causal, block)
    return max(loads) / (sum(loads) / len(loads))


def counter_imbalance(s, batch, nheads, causal, sms, per_section, block=128):
    """The persistent grid with the dynamic tile counter: program p starts with tile p, then linear tiles go, in
    order, to whichever program frees first (kernels/hopper_fwd._persistent_loader)."""
    n_m = -(-s // block)
    n_pairs = batch * nheads
    n_tiles = n_m * n_pairs
    free = []
    for t in range(n_tiles):
        pid_m, _, _ = tile_coords.fn(t, n_m, n_pairs, nheads, per_section, causal)
        work = tile_blocks(pid_m, s, causal, block)
        if len(free) < min(sms, n_tiles):
            heapq.heappush(free, work)
        else:
            heapq.heappush(free, heapq.heappop(free) + work)
    return max(free) / (sum(free) / len(free))


def dynamic_imbalance(s, batch, nheads, causal, sms, block=128):
    """The one-tile grid (query block fastest, heaviest first under causal) handed to whichever SM frees first."""
    n_m = -(-s // block)
    free = [0] * sms
    for _ in range(batch * nheads):
        for i in range(n_m):
            pid_m = n_m - 1 - i if causal else i
            heapq.heappush(free, heapq.heappop(free) + tile_blocks(pid_m, s, causal, block))
    return max(free) / (sum(free) / sms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--sms", type=int, default=launch_hopper.SM90_SMS)
    args = ap.parse_args()
    nheads = 2048 // args.d
    print(f"d{args.d}, {nheads} heads, {args.sms} SMs: max / mean KV blocks per program")
    print(f"{'seqlen':>6} {'mask':>6} {'sections':>8} {'static':>7} {'1 section':>9} {'snake, 1 sec':>12} "
          f"{'counter':>7} {'one-tile grid':>13}")  # fmt: skip
    for s in (1024, 2048, 4096, 8192, 16384):
        batch = 16384 // s
        k = torch.empty(batch, s, nheads, args.d, dtype=torch.bfloat16)
        per_section = min(launch_hopper._heads_per_section(k, 1), batch * nheads)
        for causal in (False, True):
            row = (static_imbalance(s, batch, nheads, causal, args.sms, per_section),
                   static_imbalance(s, batch, nheads, causal, args.sms, batch * nheads),
                   static_imbalance(s, batch, nheads, causal, args.sms, batch * nheads, snake=True),
                   counter_imbalance(s, batch, nheads, causal, args.sms, per_section),
                   dynamic_imbalance(s, batch, nheads, causal, args.sms))  # fmt: skip
            mask = "causal" if causal else "full"
            print(f"{s:>6} {mask:>6} {per_section:>8} {row[0]:>7.3f} {row[1]:>9.3f} {row[2]:>12.3f} {row[3]:>7.3f} "
                  f"{row[4]:>13.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
