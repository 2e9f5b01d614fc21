"""Communication for context parallelism, all of it torch.distributed (NCCL on GPUs, gloo on CPUs).

- `P2PRing`: the ring's neighbour exchanges, batched P2P ops that return at once and are waited on
  later, so the transfer of the next block runs while the current block computes.
- `all_to_all` and `all_gather`: differentiable collectives for Ulysses and varlen, written as
  torch.library ops so that torch.compile sees each as one node. A process group cannot be an op
  argument, so the ops take its name and look it up in torch.distributed's own registry, as
  torch's functional collectives do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed the flat-tensor collectives (the old names warn); older torch has only those
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_name(group) -> str:
    """The name the ops below know `group` by."""
    return group.group_name


def resolve(name: str):
    # private, but it is how torch's functional collectives find groups (a registry of our own would
    # be filled while Dynamo traces, which does not keep that side effect)
    return dist.distributed_c10d._resolve_process_group(name)


class Pending:
    """Transfers in flight; wait() blocks until they are done and returns the received tensors."""

    def __init__(self, works, received):
        self.works, self.received = works, received

    def wait(self):
        for w in self.works:
            w.wait()
        return self.received


class P2PRing:
    """Rank r sends to r + 1 and receives from r - 1 (mod world) within `group`.

    Every rank issues the same sequence of calls, and each pair of ranks matches sends to receives in
    issue order (NCCL and gloo both do), so differently shaped messages never cross.
    """

    def __init__(self, group):
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)
        self.group = group

    def _batch(self, sends, recvs) -> Pending:
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recvs]
        return Pending(dist.batch_isend_irecv(ops), recvs)

    def exchange(self, tensors) -> Pending:
        """Sends `tensors` on and receives the previous rank's tensors of the same shapes."""
        return self._batch(tensors, [torch.empty_like(t) for t in tensors])

    def send_next(self, tensors) -> Pending:
        return self._batch(tensors, [])

    def recv_prev(self, like) -> Pending:
        return self._batch([], [torch.empty_like(t) for t in like])


# ---------------------------------------------------------------------------------------------
# Collectives with autograd, as library ops
# ---------------------------------------------------------------------------------------------


def _split_dims(x: Tensor, dim: int, world: int) -> Tensor:
    """x with `dim` cut into (world, size // world) and the world axis moved to the front, contiguous."""
    x = x.unflatten(dim, (world, x.shape[dim] // world))
    return x.movedim(dim, 0).contiguous()


@torch.library.custom_op("flashtron::cp_all_to_all", mutates_args=())
def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: str) -> Tensor:
    """Cuts x's `scatter_dim` into world parts and sends part i to rank i; the parts received are
    concatenated along `gather_dim` in rank order. Its own gradient is the reverse all-to-all."""
    world = dist.get_world_size(resolve(group))
    send = _split_dims(x, scatter_dim, world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=resolve(group))
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1).contiguous()


@all_to_all.register_fake
def _(x, scatter_dim, gather_dim, group):
    world = dist.get_world_size(resolve(group))
    shape = list(x.shape)
    shape[scatter_dim] //= world
    shape[gather_dim] *= world
    return x.new_empty(shape)


def _all_to_all_setup(ctx, inputs, output):
    ctx.dims, ctx.group = inputs[1:3], inputs[3]


def _all_to_all_backward(ctx, grad):
    scatter_dim, gather_dim = ctx.dims
    return all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


all_to_all.register_autograd(_all_to_all_backward, setup_context=_all_to_all_setup)


@torch.library.custom_op("flashtron::cp_all_gather", mutates_args=())
def all_gather(x: Tensor, dim: int, group: str) -> Tensor:
    """The ranks' x concatenated along `dim` in rank order. Its gradient is a reduce-scatter (sum):
    every rank's use of the gathered tensor sends gradient back to the owner of each part."""
    pg = resolve(group)
    world = dist.get_world_size(pg)
    recv = x.new_empty((world * x.shape[0], *x.shape[1:]))  # gloo wants the parts along dim 0, not stacked
    _all_gather_flat(recv, x.contiguous(), group=pg)
    return recv.unflatten(0, (world, x.shape[0])).movedim(0, dim).flatten(dim, dim + 1).contiguous()


@all_gather.register_fake
def _(x, dim, group):
    shape = list(x.shape)
    shape[dim] *= dist.get_world_size(resolve(group))
    return x.new_empty(shape)


@torch.library.custom_op("flashtron::cp_reduce_scatter", mutates_args=())
def reduce_scatter(x: Tensor, dim: int, group: str) -> Tensor:
    """Sums x over the ranks and keeps this rank's part of `dim` (cut into world equal parts)."""
    pg = resolve(group)
    world = dist.get_world_size(pg)
    send = _split_dims(x, dim, world)
    recv = send.new_empty(send.shape[1:])
    _reduce_scatter_flat(recv, send.flatten(0, 1), group=pg)
    return recv


@reduce_scatter.register_fake
def _(x, dim, group):
    shape = list(x.shape)
    shape[dim] //= dist.get_world_size(resolve(group))
    return x.new_empty(shape)


def _gather_setup(ctx, inputs, output):
    ctx.dim, ctx.group = inputs[1], inputs[2]


def _all_gather_backward(ctx, grad):
    # the ranks' shares are summed in fp32, as the ring sums dk and dv
    summed = reduce_scatter(grad.to(torch.promote_types(grad.dtype, torch.float32)).contiguous(), ctx.dim, ctx.group)
    return summed.to(grad.dtype), None, None


def _reduce_scatter_backward(ctx, grad):
    return all_gather(grad.contiguous(), ctx.dim, ctx.group), None, None


all_gather.register_autograd(_all_gather_backward, setup_context=_gather_setup)
reduce_scatter.register_autograd(_reduce_scatter_backward, setup_context=_gather_setup)
