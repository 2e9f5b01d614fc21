"""Context parallelism: attention over a sequence split across the ranks of a torch.distributed group.

- `shard_sequence` / `gather_sequence`: cut a full (batch, seqlen, ...) tensor into this rank's shard
  and put the shards back together (differentiable). `shard_positions`: the global positions of this
  rank's tokens (for rotary or learned position embeddings).
- `ring_flash_attn_func`: ring attention on "zigzag" or "contiguous" shards; K/V shards travel the
  ring with batched P2P ops that overlap the compute, and dK/dV travel back the same way (ring.py).
- `ulysses_flash_attn_func`: all-to-all from sequence shards to head shards and back (api.py).
- `ring_flash_attn_varlen_func`: packed batches; K/V all-gathered, queries attended locally (varlen.py).

Each returns this rank's shard of exactly what flash_attn_func / flash_attn_varlen_func give on the
whole sequence, forward and backward. NCCL on GPUs and gloo on CPUs both work; importing this module
needs torch.distributed to be available, not initialised.
"""

from flashtron.distributed.api import (
    gather_sequence,
    ring_flash_attn_func,
    ring_flash_attn_varlen_func,
    shard_positions,
    shard_sequence,
    ulysses_flash_attn_func,
)

__all__ = [
    "shard_sequence",
    "gather_sequence",
    "shard_positions",
    "ring_flash_attn_func",
    "ulysses_flash_attn_func",
    "ring_flash_attn_varlen_func",
]
