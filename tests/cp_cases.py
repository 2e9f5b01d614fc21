"""Shared by the context-parallel tests: the cases, the single-process comparison, and an in-process ring.

`check_*` functions take full-sequence inputs, run the context-parallel function for this rank, run
flash_attn_func / flash_attn_varlen_func on the whole sequence in this process, and compare this
rank's out, lse and dq, dk, dv with that reference's shard. Both sides are flashtron's exact fp32
arithmetic; they differ only in the order of the softmax's sums (blocks merged by lse against one
online pass), so the tolerance is a few fp32 ulps at the values' scale: `close`.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading

import torch

import flashtron
from flashtron.distributed import plan, ring
from flashtron.options import AttnOptions

# |ours - ref| <= RTOL * max(1, max|ref|): 64 fp32 ulps; sums of 64 terms reordered stay well inside
RTOL = 64 * torch.finfo(torch.float32).eps


def close(name, ours, ref):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != {ref.dtype}"
    if ours.numel() == 0:
        return
    inf_ours, inf_ref = torch.isneginf(ours), torch.isneginf(ref)
    assert torch.equal(inf_ours, inf_ref), f"{name}: -inf pattern differs"
    ours, ref = ours.masked_fill(inf_ours, 0).double(), ref.masked_fill(inf_ref, 0).double()
    assert not torch.isnan(ours).any(), f"{name}: NaN"
    err, scale = (ours - ref).abs().max().item(), max(1.0, ref.abs().max().item())
    assert err <= RTOL * scale, f"{name}: max error {err:.3e} > {RTOL * scale:.3e}"


def shard(x, layout, world, rank, dim=1):
    segs = plan.segments(layout, world, rank, x.shape[dim])
    return torch.cat([x.narrow(dim, s.start, s.length) for s in segs], dim=dim)


def dense_inputs(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    q, k, v = make(batch, seqlen_q, nheads, d), make(batch, seqlen_k, nheads_k, d), make(batch, seqlen_k, nheads_k, d)
    dout, dlse = make(batch, seqlen_q, nheads, d), make(batch, nheads, seqlen_q).float()
    return q, k, v, dout, dlse


def reference(q, k, v, dout, dlse, **kwargs):
    """(out, lse, dq, dk, dv) of flash_attn_func on the whole sequence, with gradients on out and lse."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = flashtron.flash_attn_func(*leaves, return_lse=True, **kwargs)
    dlse = torch.where(torch.isneginf(lse), 0.0, dlse)  # no gradient through an empty row's -inf
    grads = torch.autograd.grad((out, lse), leaves, (dout, dlse))
    return (out.detach(), lse.detach(), *grads)


# ---------------------------------------------------------------------------------------------
# The in-process ring: world ranks as threads, P2P as queues
# ---------------------------------------------------------------------------------------------


class _Received:
    def __init__(self, inbox, count):
        self.inbox, self.count = inbox, count

    def wait(self):
        msg = self.inbox.get(timeout=120)
        assert len(msg) == self.count, "messages crossed: the ranks issued different sequences"
        return msg


class _Sent:
    def wait(self):
        return []


class ThreadRing:
    """comm.P2PRing's interface for rank `rank` of an in-process ring; inboxes[r] holds r's messages."""

    def __init__(self, inboxes, rank):
        self.inboxes, self.rank, self.world = inboxes, rank, len(inboxes)

    def send_next(self, tensors):
        self.inboxes[(self.rank + 1) % self.world].put([t.clone() for t in tensors])
        return _Sent()

    def recv_prev(self, like):
        return _Received(self.inboxes[self.rank], len(like))

    def exchange(self, tensors):
        self.send_next(tensors)
        return self.recv_prev(tensors)


@contextlib.contextmanager
def _one_rank_computes_at_a_time():
    """The ranks' attention calls take turns (Triton's interpreter is not thread-safe); waiting for a
    message holds no lock, so the ring still makes progress."""
    lock = threading.Lock()
    saved = ring.attention_forward, ring.attention_backward

    def serial(fn):
        def call(*args, **kwargs):
            with lock:
                return fn(*args, **kwargs)

        return call

    ring.attention_forward, ring.attention_backward = map(serial, saved)
    try:
        yield
    finally:
        ring.attention_forward, ring.attention_backward = saved


def run_ranks(world, fn):
    """fn(rank, ring) on `world` threads joined by a ThreadRing, their attention calls in turn;
    returns the results by rank."""
    inboxes = [queue.Queue() for _ in range(world)]
    results, errors = [None] * world, []

    def body(rank):
        try:
            results[rank] = fn(rank, ThreadRing(inboxes, rank))
        except BaseException as e:  # reported below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    with _one_rank_computes_at_a_time():
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return results


def check_ring_engine(world, layout, batch, seqlen_q, seqlen_k, nheads, nheads_k, d, device, *, causal=False,
                      window=(-1, -1), softcap=0.0, dtype=torch.float32):  # fmt: skip
    """ring.forward/backward for every rank of an in-process ring against flash_attn_func.

    fp32: within `close` of flash_attn_func on the whole sequence. fp16/bf16 (the partial outputs
    are rounded to the dtype before they merge): tests/tolerance.py's rule, with flash_attn_func in
    fp32 as the reference and flash_attn_func in the dtype as the error to stay within 2x (3x)."""
    q, k, v, dout, dlse = dense_inputs(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, device)
    kwargs = dict(causal=causal, window_size=window, softcap=softcap)
    expected = reference(q, k, v, dout, dlse, **kwargs)
    if dtype in (torch.float16, torch.bfloat16):
        upcast = reference(*(t.float() for t in (q, k, v, dout)), dlse, **kwargs)
        compare = functools.partial(_compare_16bit, pt=expected)
        expected = upcast
    else:
        compare = _compare_fp32
    out, lse, dq, dk, dv = expected
    left, right = window
    opts = AttnOptions(softmax_scale=d**-0.5, window_left=left, window_right=0 if causal else right, softcap=softcap)

    def rank_fn(rank, comm):
        cut = lambda x, dim=1: shard(x, layout, world, rank, dim)
        o, l_ = ring.forward(cut(q), cut(k), cut(v), opts, comm, layout)
        grads = ring.backward(cut(dout), cut(dlse, 2), cut(q), cut(k), cut(v), o, l_, opts, comm, layout)
        return o, l_, grads

    for rank, (o, l_, grads) in enumerate(run_ranks(world, rank_fn)):
        cut = lambda tensors, r=rank: [shard(x, layout, world, r, 2 if i == 1 else 1) for i, x in enumerate(tensors)]
        compare(rank, [o, l_, *grads], cut(expected), cut)


def _compare_fp32(rank, ours, expected, cut):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, expected):
        close(f"rank {rank} {name}", a, b)


def _compare_16bit(rank, ours, expected, cut, pt):
    from tolerance import assert_fa_close, assert_grads_close

    pt = cut(pt)
    assert_fa_close(ours[0], expected[0], pt[0], name=f"rank {rank} out")
    assert torch.equal(torch.isneginf(ours[1]), torch.isneginf(expected[1])), f"rank {rank} lse: -inf pattern"
    finite = torch.isfinite(expected[1])
    assert_fa_close(ours[1][finite], expected[1][finite], pt[1][finite], name=f"rank {rank} lse")
    assert_grads_close(ours[2:], expected[2:], pt[2:])


# ---------------------------------------------------------------------------------------------
# Through the public API, on a real process group (one process per rank)
# ---------------------------------------------------------------------------------------------


def _grads_of(fn, shards, dout, dlse):
    """fn(*leaves) -> (out, lse); returns (out, lse, *grads of the leaves) for gradients dout, dlse."""
    leaves = [t.detach().clone().requires_grad_() for t in shards]
    out, lse = fn(*leaves)
    dlse = torch.where(torch.isneginf(lse), 0.0, dlse)
    return (out.detach(), lse.detach(), *torch.autograd.grad((out, lse), leaves, (dout, dlse)))


def _compare(rank, ours, expected):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, expected):
        close(f"rank {rank} {name}", a, b)


# batch, nheads, head dim of the process-group cases: small enough for CI's two cores
BATCH, NHEADS, HEADDIM = 2, 4, 16


def check_ring(group, layout, nheads_k, q_factor=1, k_factor=1, **kwargs):
    """ring_flash_attn_func on this rank's shards against flash_attn_func on the whole sequence, at
    seqlens 6 * world times the factors (zigzag chunks of 3 tokens: windows cross chunk edges)."""
    from flashtron.distributed import ring_flash_attn_func

    rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    sq, sk = 6 * world * q_factor, 6 * world * k_factor
    q, k, v, dout, dlse = dense_inputs(BATCH, sq, sk, NHEADS, nheads_k, HEADDIM, torch.float32, "cpu")
    expected = reference(q, k, v, dout, dlse, **kwargs)
    cut = lambda x, dim=1: shard(x, layout, world, rank, dim)
    fn = lambda *t: ring_flash_attn_func(*t, group=group, layout=layout, return_lse=True, **kwargs)
    ours = _grads_of(fn, [cut(q), cut(k), cut(v)], cut(dout), cut(dlse, 2))
    _compare(rank, ours, [cut(expected[0]), cut(expected[1], 2), *map(cut, expected[2:])])


def check_ulysses(group, nheads_k, alibi=False, **kwargs):
    """ulysses_flash_attn_func at seqlen 5 * world (odd local seqlens) against flash_attn_func."""
    from flashtron.distributed import ulysses_flash_attn_func

    rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    q, k, v, dout, dlse = dense_inputs(BATCH, 5 * world, 5 * world, NHEADS, nheads_k, HEADDIM, torch.float32, "cpu")
    if alibi:
        kwargs["alibi_slopes"] = torch.linspace(0.05, 0.5, BATCH * NHEADS).view(BATCH, NHEADS)
    expected = reference(q, k, v, dout, dlse, **kwargs)
    cut = lambda x, dim=1: shard(x, "contiguous", world, rank, dim)
    fn = lambda *t: ulysses_flash_attn_func(*t, group=group, return_lse=True, **kwargs)
    ours = _grads_of(fn, [cut(q), cut(k), cut(v)], cut(dout), cut(dlse, 2))
    _compare(rank, ours, [cut(expected[0]), cut(expected[1], 2), *map(cut, expected[2:])])


def check_varlen(group, lengths_q, lengths_k, nheads_k, **kwargs):
    """ring_flash_attn_varlen_func on rank r's 1/world of the packed tokens against
    flash_attn_varlen_func on the whole packed batch."""
    from flashtron.distributed import ring_flash_attn_varlen_func

    rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    nheads, d = NHEADS, HEADDIM
    cu = lambda lengths: torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_q, cu_k = cu(lengths_q), cu(lengths_k)
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    q, k, v, dout, _ = dense_inputs(1, total_q, total_k, nheads, nheads_k, d, torch.float32, "cpu")
    q, k, v, dout = (t[0] for t in (q, k, v, dout))
    dlse = torch.randn(nheads, total_q, generator=torch.Generator().manual_seed(1))
    meta = (cu_q, cu_k, max(lengths_q), max(lengths_k))

    def whole(*t):
        return flashtron.flash_attn_varlen_func(*t, *meta, return_lse=True, **kwargs)

    expected = _grads_of(whole, [q, k, v], dout, dlse)
    nq, nk = total_q // world, total_k // world
    rows_q, rows_k = slice(rank * nq, (rank + 1) * nq), slice(rank * nk, (rank + 1) * nk)
    fn = lambda *t: ring_flash_attn_varlen_func(*t, *meta, group=group, return_lse=True, **kwargs)
    ours = _grads_of(fn, [q[rows_q], k[rows_k], v[rows_k]], dout[rows_q], dlse[:, rows_q])
    out, lse, dq, dk, dv = expected
    _compare(rank, ours, [out[rows_q], lse[:, rows_q], dq[rows_q], dk[rows_k], dv[rows_k]])


def check_shard_gather(group, layout):
    """gather_sequence(shard_sequence(x)) == x, and the gradient of a loss every rank computes on the
    gathered tensor comes back summed over the ranks."""
    from flashtron.distributed import gather_sequence, shard_sequence

    world = torch.distributed.get_world_size(group)
    x = torch.randn(2, 4 * world, 3, generator=torch.Generator().manual_seed(2))
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    for dim in (1, -2):
        local = shard_sequence(x, group=group, layout=layout, dim=dim).detach().requires_grad_()
        full = gather_sequence(local, group=group, layout=layout, dim=dim)
        assert torch.equal(full, x), f"{layout}: gather(shard(x)) != x"
        (grad,) = torch.autograd.grad((full * weight).sum(), local)
        expected = world * shard_sequence(weight, group=group, layout=layout, dim=dim)
        assert torch.equal(grad, expected), f"{layout}: gather_sequence's gradient is not the ranks' sum"


def check_gpt(group, preset, layout="zigzag"):
    """A GPT with context_parallel on this rank's shard against the same GPT on the whole batch:
    logits, the loss (averaged over the ranks) and the parameters' gradients (summed / world)."""
    import copy

    import torch.distributed as dist

    from flashtron.models import GPT, GPTConfig
    from flashtron.nn import ContextParallel, set_context_parallel

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(preset))
    sharded = set_context_parallel(copy.deepcopy(model), ContextParallel(group, layout))
    idx = torch.randint(0, model.config.vocab_size, (2, 8 * world + 1), generator=torch.Generator().manual_seed(4))
    x, y = idx[:, :-1], idx[:, 1:]
    logits, loss = model(x, y)
    loss.backward()
    cut = lambda t: shard(t, layout, world, rank)
    logits_local, loss_local = sharded(cut(x), cut(y))
    loss_local.backward()
    close("logits", logits_local.detach(), cut(logits.detach()))
    mean = loss_local.detach().clone()
    dist.all_reduce(mean, group=group)
    close("loss", mean / world, loss.detach())
    for (name, p), p_local in zip(model.named_parameters(), sharded.parameters()):
        grad = p_local.grad.clone()
        dist.all_reduce(grad, group=group)
        close(f"grad of {name}", grad / world, p.grad)
