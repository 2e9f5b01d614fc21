"""The public context-parallel functions: checks, argument normalisation, dispatch.

Input errors are the API's usual TypeError/ValueError with the function and argument named, raised
as classes that are RuntimeError too (as flash_attn's callers expect). Features that cannot be exact
across ranks raise NotImplementedError naming the argument.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from flashtron import checks
from flashtron.api import flash_attn_func
from flashtron.checks import InputTypeError, InputValueError
from flashtron.distributed import comm, ring, varlen
from flashtron.distributed.plan import LAYOUTS, chunks_per_rank, segments
from flashtron.options import AttnOptions


def _group(fn, group):
    """(group, rank, world) of an initialised process group that this process belongs to."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InputValueError(f"{fn}: torch.distributed is not initialised; call torch.distributed.init_process_group")
    if group is None:
        group = dist.group.WORLD
    # new_group hands the ranks it leaves out a sentinel int, not a group
    left_out = isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER
    if not left_out and not isinstance(group, dist.ProcessGroup):
        raise InputTypeError(
            f"{fn}: group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}"
        )
    if left_out or dist.get_rank(group) < 0:
        raise InputValueError(f"{fn}: group must contain this process (global rank {dist.get_rank()}), it does not")
    rank = dist.get_rank(group)
    return group, rank, dist.get_world_size(group)


def _layout(fn, layout):
    if layout not in LAYOUTS:
        raise InputValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _unsupported(fn, dropout_p, alibi_slopes, return_attn_probs, *, alibi_ok=False):
    if dropout_p > 0:
        raise NotImplementedError(f"{fn}: dropout_p > 0 is not supported with context parallelism, got {dropout_p}")
    if alibi_slopes is not None and not alibi_ok:
        raise NotImplementedError(
            f"{fn}: alibi_slopes is not supported (the bias needs global positions the kernels do not take); "
            "ulysses_flash_attn_func supports it"
        )
    if return_attn_probs:
        raise NotImplementedError(f"{fn}: return_attn_probs=True is not supported with context parallelism")


def _options(fn, q, *, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic):
    dropout_p, scale, left, right, softcap = checks.check_options(
        fn, dropout_p=dropout_p, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap
    )
    if causal:
        right = 0
    return AttnOptions(
        softmax_scale=scale if scale is not None else q.shape[-1] ** -0.5,  # the full head dim: shards split tokens
        window_left=left,
        window_right=right,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        deterministic=bool(deterministic),
    )


def _divides(fn, what, size, parts, hint):
    if size % parts:
        raise InputValueError(f"{fn}: {what} must be a multiple of {parts} ({hint}), got {size}")


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------


def shard_sequence(x, group=None, layout="zigzag", dim=1):
    """This rank's shard of a full tensor x: (batch_size, seqlen, ...) with the sequence at `dim`.

    layout="zigzag": the sequence is cut into 2 * world chunks and rank r keeps chunks r and
    2 * world - 1 - r (balanced causal work); "contiguous": rank r keeps chunk r of world. seqlen
    must be a multiple of 2 * world (zigzag) or world. Differentiable; every rank passes the same x.
    """
    fn = "shard_sequence"
    checks.check_tensor(fn, "x", x, unit_stride=False)
    group, rank, world = _group(fn, group)
    layout = _layout(fn, layout)
    dim = _dim(fn, x, dim)
    parts = world * chunks_per_rank(layout)
    _divides(fn, f"x.shape[{dim}] (seqlen)", x.shape[dim], parts, f"{chunks_per_rank(layout)} * world, {layout}")
    pieces = [x.narrow(dim, s.start, s.length) for s in segments(layout, world, rank, x.shape[dim])]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def gather_sequence(x_local, group=None, layout="zigzag", dim=1):
    """The full tensor, on every rank, from each rank's shard x_local (as shard_sequence cut it).

    Differentiable: the gradient is summed over the ranks and each rank gets its shard's part (a
    reduce-scatter), so a loss computed identically on every rank counts once per rank.
    """
    fn = "gather_sequence"
    checks.check_tensor(fn, "x_local", x_local, unit_stride=False)
    group, _, world = _group(fn, group)
    layout = _layout(fn, layout)
    dim = _dim(fn, x_local, dim)
    _divides(fn, f"x_local.shape[{dim}]", x_local.shape[dim], chunks_per_rank(layout), f"layout {layout}")
    full = comm.all_gather(x_local, dim, comm.group_name(group))
    if layout == "contiguous":
        return full
    # rank order is (r0: c0, c_last), (r1: c1, c_last-1), ...: the first halves in rank order, then
    # the second halves in reverse rank order
    halves = full.unflatten(dim, (world, 2, x_local.shape[dim] // 2))
    first, second = halves.select(dim + 1, 0), halves.select(dim + 1, 1).flip(dim)
    return torch.cat([first, second], dim=dim).flatten(dim, dim + 1)


def shard_positions(seqlen, group=None, layout="zigzag", device=None):
    """The global positions (int64, (seqlen / world,)) of this rank's tokens of a sequence of
    `seqlen` tokens: what rotary or learned position embeddings need under context parallelism."""
    fn = "shard_positions"
    seqlen = checks.check_int(fn, "seqlen", seqlen, minimum=0)
    group, rank, world = _group(fn, group)
    layout = _layout(fn, layout)
    _divides(fn, "seqlen", seqlen, world * chunks_per_rank(layout), f"{chunks_per_rank(layout)} * world, {layout}")
    ranges = [torch.arange(s.start, s.start + s.length, device=device) for s in segments(layout, world, rank, seqlen)]
    return ranges[0] if len(ranges) == 1 else torch.cat(ranges)


def _dim(fn, x, dim):
    dim = checks.check_int(fn, "dim", dim)
    if not -x.dim() <= dim < x.dim():
        raise InputValueError(f"{fn}: dim must be in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-D tensor, got {dim}")
    return dim % x.dim()


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def ring_flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    group=None,
    layout="zigzag",
    return_lse=False,
):
    """flash_attn_func over a sequence sharded across `group`, by ring attention.

    q: (batch_size, seqlen_q / world, nheads, headdim), k: (batch_size, seqlen_k / world, nheads_k,
    headdim), v: (batch_size, seqlen_k / world, nheads_k, headdim_v): this rank's shards in `layout`
    ("zigzag" or "contiguous", see shard_sequence), of the same shapes on every rank. Causal and
    window masks use global positions, bottom-right aligned on the global (seqlen_q, seqlen_k).
    softmax_scale defaults to 1/sqrt(headdim).

    Returns this rank's shard of flash_attn_func's out, (batch_size, seqlen_q / world, nheads,
    headdim_v); with return_lse=True, (out, softmax_lse), softmax_lse (batch_size, nheads,
    seqlen_q / world) fp32 and differentiable. dropout_p > 0, alibi_slopes and return_attn_probs
    raise NotImplementedError.
    """
    fn = "ring_flash_attn_func"
    checks.check_qkv(fn, q, k, v)
    opts = _options(
        fn, q, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
    )  # fmt: skip
    _unsupported(fn, opts.dropout_p, alibi_slopes, return_attn_probs)
    group, _, world = _group(fn, group)
    layout = _layout(fn, layout)
    if layout == "zigzag":
        for name, t in (("q", q), ("k", k)):
            _divides(fn, f"{name}.shape[1] (the local seqlen)", t.shape[1], 2, "a zigzag shard holds two chunks")
    out, lse = ring.ring_attention(q, k, v, opts, group, layout)
    return (out, lse) if return_lse else out


def ulysses_flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    group=None,
    return_lse=False,
):
    """flash_attn_func over a sequence sharded across `group`, by all-to-all (DeepSpeed Ulysses).

    q, k, v: this rank's contiguous shards, shapes as ring_flash_attn_func. An all-to-all turns
    the sequence shards into head shards (the whole sequence, nheads / world heads), flash_attn_func
    runs on them, and a second all-to-all turns the result back. nheads must be a multiple of world.
    When nheads_k is not, each KV head is repeated (by world / gcd(nheads_k, world)) before the
    exchange, which needs nheads to be a multiple of that many KV heads; the repeats' gradients
    sum back. alibi_slopes ((nheads,) or (batch_size, nheads)) is supported. Returns as
    ring_flash_attn_func; dropout_p > 0 and return_attn_probs raise NotImplementedError.
    """
    fn = "ulysses_flash_attn_func"
    nheads, nheads_k, _, _ = checks.check_qkv(fn, q, k, v)
    checks.check_alibi(fn, alibi_slopes, nheads=nheads, batch=q.shape[0], device=q.device)
    opts = _options(
        fn, q, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
    )  # fmt: skip
    _unsupported(fn, opts.dropout_p, alibi_slopes, return_attn_probs, alibi_ok=True)
    group, rank, world = _group(fn, group)
    _divides(fn, "nheads of q", nheads, world, "world: each rank takes nheads / world heads")
    repeat = world // math.gcd(nheads_k, world)
    _divides(fn, "nheads of q", nheads, nheads_k * repeat, f"nheads_k ({nheads_k}) repeated {repeat}x for world")
    name = comm.group_name(group)
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    q, k, v = (comm.all_to_all(t, 2, 1, name) for t in (q, k, v))  # (b, seqlen, nheads / world, d)
    slopes = None
    if alibi_slopes is not None:
        per_rank = nheads // world
        slopes = alibi_slopes[..., rank * per_rank : (rank + 1) * per_rank]
    out, lse = _local_attention(q, k, v, opts, slopes)
    out = comm.all_to_all(out, 1, 2, name)  # (b, seqlen / world, nheads, dv)
    lse = comm.all_to_all(lse, 2, 1, name)  # (b, nheads, seqlen / world)
    return (out, lse) if return_lse else out


def _local_attention(q, k, v, opts: AttnOptions, alibi_slopes):
    return flash_attn_func(
        q,
        k,
        v,
        softmax_scale=opts.softmax_scale,
        window_size=(opts.window_left, opts.window_right),
        softcap=opts.softcap,
        alibi_slopes=alibi_slopes,
        deterministic=opts.deterministic,
        return_lse=True,
    )


def ring_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    group=None,
    return_lse=False,
):
    """flash_attn_varlen_func over packed tokens sharded across `group`.

    q: (total_q / world, nheads, headdim), k: (total_k / world, nheads_k, headdim), v: (total_k /
    world, nheads_k, headdim_v): this rank's contiguous slice of the packed tokens (rank r holds
    tokens [r * n, (r + 1) * n)); sequences may straddle ranks. cu_seqlens_q, cu_seqlens_k:
    (batch_size + 1,) int32, *global* (the same on every rank); max_seqlen_q, max_seqlen_k: int,
    global. Causal and window masks are per sequence, as flash_attn_varlen_func's.

    K and V are all-gathered (Llama 3's approach, see flashtron.distributed.varlen): every rank holds
    all total_k keys and values during the call, and their gradients in the backward. cu_seqlens are
    read on the host (a device sync on CUDA). Returns this rank's rows of flash_attn_varlen_func's
    out, (total_q / world, nheads, headdim_v); with return_lse=True also softmax_lse (nheads,
    total_q / world). dropout_p > 0, alibi_slopes and return_attn_probs raise NotImplementedError.
    """
    fn = "ring_flash_attn_varlen_func"
    checks.check_qkv(fn, q, k, v, varlen=True)
    checks.check_cu_seqlens(fn, cu_seqlens_q, cu_seqlens_k, device=q.device)
    checks.check_int(fn, "max_seqlen_q", max_seqlen_q, minimum=0)
    checks.check_int(fn, "max_seqlen_k", max_seqlen_k, minimum=0)
    opts = _options(
        fn, q, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
    )  # fmt: skip
    _unsupported(fn, opts.dropout_p, alibi_slopes, return_attn_probs)
    group, rank, world = _group(fn, group)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for name, t, total in (("q", q, cu_q[-1]), ("k", k, cu_k[-1])):
        if t.shape[0] * world != total:
            raise InputValueError(
                f"{fn}: {name} must hold total / world = {total} / {world} tokens (world must divide the "
                f"packed total), got {t.shape[0]}"
            )
    name = comm.group_name(group)
    k_all, v_all = comm.all_gather(k, 0, name), comm.all_gather(v, 0, name)
    n = q.shape[0]
    out, lse = varlen.attention(
        q, k_all, v_all, cu_q, cu_k, rank * n, (rank + 1) * n, (opts.window_left, opts.window_right),
        softmax_scale=opts.softmax_scale, softcap=opts.softcap, deterministic=opts.deterministic,
    )  # fmt: skip
    return (out, lse) if return_lse else out
