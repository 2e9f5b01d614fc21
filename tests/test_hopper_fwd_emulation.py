"""The Gluon forward's varlen block walk and softcap (kernels/hopper_fwd.py, issue 15), emulated in float64 on the
CPU with the kernel's own helpers, against the reference's varlen attention.

Gluon kernels do not run in Triton's interpreter, and the softcap and varlen variants have only been compiled
(test_hopper_compile). What can be checked without a GPU is the index arithmetic and the score math. From their
source, on plain ints or float64 tensors (the `gl` module swapped for Python/PyTorch equivalents), run:
`hopper_common.sequence_bounds` (cu_seqlens and seqused_k, clamped), `hopper_common.kv_range`,
`hopper_common.box_coords` (where a 3-D TMA box lands in the packed tensor), `hopper_fwd_tile.softmax_step` (the
mask, the softcap through `hopper_fwd_tile.tanh`, the online softmax). The rest repeats the kernel's lines: the grid
over max_seqlen_q with a program past its sequence's end returning, the reversed query blocks under a right
bound, at least one block with block lo peeled and masked, the three segments clipped to start after it and
the keys of step t at lo + t * BLOCK_N (what the loader loads), each ping-pong consumer's Q box (a consumer
wholly past the sequence reads the last row's box), TMA boxes that read the next sequence's rows (zero-filled
only past the whole tensor), the tile's last V block zeroed past the sequence's end by `hopper_fwd_tile.zero_v_tail`
(run from its source on a stand-in for the shared-memory slot), stores masked to the sequence's rows, out 0 /
lse -inf for rows that see no key. Outputs start NaN-poisoned: a row the walk forgot to store, or a key of the
next sequence left unmasked, makes out or lse differ from the reference. The rows no query may read (past
seqused_k, of a sequence without queries, padding after cu_seqlens_k[-1]) hold K NaN and V Inf
(attention_cases.poison_unread_keys): a V row past the end that reaches P V unzeroed makes out NaN (0 x Inf).
"""

from __future__ import annotations

import math
import types

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="needs triton with Gluon (3.6+)")

from attention_cases import poison_unread_keys  # noqa: E402
from flashtron import launch_hopper  # noqa: E402
from flashtron.kernels import hopper_common, hopper_fwd_tile  # noqa: E402
from flashtron.reference import attention_varlen_ref  # noqa: E402

LOG2E = math.log2(math.e)


class _Ptr:
    """A pointer into a 1-D int tensor: `P + i` and gl.load as the kernel uses them on scalars."""

    def __init__(self, t, offset=0):
        self.t, self.offset = t, offset

    def __add__(self, i):
        return _Ptr(self.t, self.offset + int(i))


def _maximum(a, b):
    return torch.maximum(a, b) if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else max(a, b)


def _minimum(a, b):
    return torch.minimum(a, b) if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else min(a, b)


GL = types.SimpleNamespace(
    maximum=_maximum,
    minimum=_minimum,
    constexpr=int,
    load=lambda p: int(p.t[p.offset]),
    arange=lambda start, end, layout=None: torch.arange(start, end),
    SliceLayout=lambda dim, parent: None,
    expand_dims=lambda x, dim: x.unsqueeze(dim),
    where=torch.where,
    max=lambda x, dim: x.amax(dim),
    sum=lambda x, dim: x.sum(dim),
    exp=torch.exp,
    exp2=torch.exp2,
    static_assert=lambda cond, msg="": None,
    BlockedLayout=lambda *args: None,
    num_warps=lambda: 4,
    zeros_like=torch.zeros_like,
)


def _emulated(jitted, **extra):
    """The @gluon.jit helper's Python function with `gl` (and the helpers it calls) swapped for GL."""
    fn = jitted.fn
    return types.FunctionType(fn.__code__, {**fn.__globals__, "gl": GL, **extra}, fn.__name__, fn.__defaults__)


SEQUENCE_BOUNDS = _emulated(hopper_common.sequence_bounds)
KV_RANGE = _emulated(hopper_common.kv_range)
BOX_COORDS = _emulated(hopper_common.box_coords)
SOFTMAX_STEP = _emulated(hopper_fwd_tile.softmax_step, tanh=_emulated(hopper_fwd_tile.tanh))
ZERO_V_TAIL = _emulated(hopper_fwd_tile.zero_v_tail, fence_async_shared=lambda: None)


class _Slot:
    """A shared-memory slot holding one box: load and store as zero_v_tail uses them."""

    def __init__(self, t):
        self.t = t

    def load(self, layout):
        return self.t.clone()

    def store(self, value):
        self.t.copy_(value)


def _box(t: torch.Tensor, desc, off_b: int, row: int, off_h: int, n: int) -> torch.Tensor:
    """The TMA box of n rows that box_coords places at (off_b, row, off_h) in the packed t (total, nheads, d):
    rows outside the whole tensor zero-filled, rows of the next (or previous) sequence read as they are."""
    first, head, _ = BOX_COORDS(desc, off_b, row, off_h)
    out = torch.zeros(n, t.shape[-1], dtype=t.dtype)
    for i in range(n):
        if 0 <= first + i < t.shape[0]:
            out[i] = t[first + i, head]
    return out


def emulate_varlen_forward(q, k, v, cu_q, cu_k, seqused, max_seqlen_q, scale, window, softcap, tile):
    """(out, lse) as the one-tile kernel writes them, in float64: q (total_q, nheads, d), k, v (total_k, nheads_k,
    d); out (total_q, nheads, d), lse (nheads, total_q), NaN where the kernel stores nothing."""
    total_q, nheads, d = q.shape
    nheads_k = k.shape[1]
    batch = cu_q.numel() - 1
    block_m, block_n, consumers = tile.block_m, tile.block_n, tile.consumers
    rows = block_m // consumers
    has_left, has_right, has_softcap = window[0] >= 0, window[1] >= 0, softcap > 0
    wl, wr = max(window[0], 0), max(window[1], 0)
    qk_scale = scale / softcap if has_softcap else scale * LOG2E  # launch_hopper.kernel_launch
    softcap_log2 = softcap * LOG2E if has_softcap else None
    desc = types.SimpleNamespace(block_type=types.SimpleNamespace(shape=[block_n, 1, d]))  # 3-D: varlen
    out = torch.full_like(q, float("nan"))
    lse = torch.full((nheads, total_q), float("nan"), dtype=q.dtype)
    n_programs = -(-max_seqlen_q // block_m)
    seq_ptrs = (_Ptr(cu_q), _Ptr(cu_k), None if seqused is None else _Ptr(seqused))
    for off_b in range(batch):
        for off_h in range(nheads):
            for program in range(n_programs):
                q_start, seqlen_q, k_start, seqlen_k = SEQUENCE_BOUNDS(
                    off_b, total_q, k.shape[0], *seq_ptrs, True, seqused is not None
                )
                pid_m = n_programs - 1 - program if has_right else program
                if pid_m * block_m >= seqlen_q:
                    continue  # the kernel's early return
                start_m = pid_m * block_m
                off_hk = off_h // (nheads // nheads_k)
                lo, full_lo, full_hi, hi = KV_RANGE(
                    start_m, seqlen_q, seqlen_k, wl, wr, block_m, block_n, has_left, has_right
                )
                n_blocks = max(-(-(hi - lo) // block_n), 1)
                steps = [(lo, True)]  # block lo peeled and masked
                first = lo + block_n
                for start, end, mask in ((first, max(full_lo, first), True),
                                         (max(full_lo, first), max(full_hi, first), False),
                                         (max(full_hi, first), max(hi, first), True)):  # fmt: skip
                    steps += [(n, mask) for n in range(start, end, block_n)]
                assert [n for n, _ in steps] == [lo + t * block_n for t in range(n_blocks)]  # the loader's order
                slot = _Slot(_box(v, desc, k_start, steps[-1][0], off_hk, block_n))  # the tile's last V block
                # consume_tile: consumer 0 zeroes its rows past the end before anyone's last P V
                ZERO_V_TAIL(slot, seqlen_k - (lo + (n_blocks - 1) * block_n), block_n, d)
                for cid in range(consumers):
                    row = start_m + cid * rows
                    if cid > 0:
                        row = min(row, seqlen_q - 1)  # _load_q
                    qt = _box(q, desc, q_start, row, off_h, rows)
                    offs_m = start_m + cid * rows + torch.arange(rows)
                    m_i = torch.full((rows,), float("-inf"), dtype=q.dtype)
                    l_i = torch.zeros(rows, dtype=q.dtype)
                    acc = torch.zeros(rows, d, dtype=q.dtype)
                    for step, (start_n, mask) in enumerate(steps):
                        kt = _box(k, desc, k_start, start_n, off_hk, block_n)
                        vt = slot.t if step == n_blocks - 1 else _box(v, desc, k_start, start_n, off_hk, block_n)
                        if not mask:  # the unmasked middle: every stored row sees every key of the block
                            cols = start_n + torch.arange(block_n)[None, :]
                            diag = offs_m[offs_m < seqlen_q][:, None] + (seqlen_k - seqlen_q)
                            assert (cols < seqlen_k).all()
                            assert not has_right or (cols <= diag + wr).all()
                            assert not has_left or (cols >= diag - wl).all()
                        p, alpha, m_i, l_i = SOFTMAX_STEP(
                            qt @ kt.T, m_i, l_i, offs_m, start_n, seqlen_q, seqlen_k, wl, wr, qk_scale, softcap_log2,
                            None, block_n, mask, has_left, has_right, has_softcap,
                        )  # fmt: skip
                        acc = acc * alpha[:, None] + p @ vt
                    empty = l_i == 0.0
                    l_safe = torch.where(empty, 1.0, l_i)
                    row_lse = torch.where(empty, float("-inf"), (m_i + torch.log2(l_safe)) * math.log(2))
                    keep = offs_m < seqlen_q  # the masked stores
                    out[q_start + offs_m[keep], off_h] = (acc / l_safe[:, None])[keep]
                    lse[off_h, q_start + offs_m[keep]] = row_lse[keep]
    return out, lse


# (q lengths, k lengths, seqused_k or None, nheads, nheads_k, window, NaN rows of padding after the last key):
# causal is (-1, 0)
CASES = [
    ([300, 1, 129], [257, 64, 1], None, 4, 2, (-1, -1), 37),
    ([300, 1, 129], [257, 64, 1], None, 4, 2, (-1, 0), 0),  # sq > sk in the last: empty rows
    ([0, 17, 256, 5], [3, 0, 300, 129], None, 2, 1, (-1, 0), 200),  # empty sequences, sk = 0 with sq > 0
    ([200, 131], [513, 140], None, 4, 4, (64, 32), 5),
    ([129, 40], [200, 300], [100, 0], 4, 2, (-1, 0), 0),  # seqused_k, one of 0
    ([128, 127, 1], [128, 129, 255], [128, 7, 255], 2, 2, (-1, -1), 1),
    ([250, 33], [70, 400], None, 2, 1, (0, 100), 0),
    ([300, 0, 129], [257, 50, 3], None, 2, 1, (-1, -1), 130),  # 257 = 2 x 128 + 1: its last block reads Inf
    ([100, 40], [129, 0], None, 2, 1, (-1, 0), 0),  # the last sequence has no key: its box is past the tensor
    ([100, 40], [129, 0], None, 2, 2, (-1, -1), 20),  # ... or reads the NaN padding
]


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("d", sorted(launch_hopper.HOPPER_TILES))
@pytest.mark.parametrize("lens_q, lens_k, used, h, hk, window, pad", CASES)
def test_varlen_block_walk_matches_reference(lens_q, lens_k, used, h, hk, window, pad, d, softcap):
    tile = launch_hopper.HOPPER_TILES[d]  # the dispatched tile's blocks and consumers; 8 columns stand in for d
    g = torch.Generator().manual_seed(sum(lens_q) * 131 + sum(lens_k))
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0).to(torch.int32)
    seqused = None if used is None else torch.tensor(used, dtype=torch.int32)
    # scaled up so that the softcap bites (scores of tens) and the next sequence's keys would dominate if unmasked
    q = 3 * torch.randn(int(cu_q[-1]), h, 8, generator=g, dtype=torch.float64)
    k = 3 * torch.randn(int(cu_k[-1]), hk, 8, generator=g, dtype=torch.float64)
    v = torch.randn(int(cu_k[-1]), hk, 8, generator=g, dtype=torch.float64)
    k, v = poison_unread_keys(k, v, cu_q, cu_k, seqused, pad)
    scale = d**-0.5
    out_ref, lse_ref = attention_varlen_ref(
        q, k, v, cu_q, cu_k, seqused_k=seqused, softmax_scale=scale, window_size=window, softcap=softcap
    )
    out, lse = emulate_varlen_forward(q, k, v, cu_q, cu_k, seqused, max(lens_q), scale, window, softcap, tile)
    assert not out.isnan().any() and not lse.isnan().any()  # every row of every sequence stored, no NaN
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[finite], lse_ref[finite], rtol=1e-10, atol=1e-10)
