"""Attention backward dK/dV for Hopper (sm_90) in Gluon: K and V resident in shared memory, Q and dO
streamed through a TMA ring by a 1-warp loader, async wgmma. FA3's shape for the key side; dQ stays on
the Triton dQ kernel (kernels/bwd.py), and delta = rowsum(dO * O) - dlse comes from its preprocess.

Grid: (key blocks, nheads_k, batch), like kernels/bwd.py's attention_bwd_dkdv_kernel, and the same
results. A program owns BLOCK_N keys of one KV head and loops over the query blocks of every query head
of its GQA group (heads innermost), accumulating dK and dV in registers: no atomics, so two runs agree
bit for bit. Per (query block, head) step, with every block built transposed, keys along the rows:

    S^T  = K Q^T          [BLOCK_N, BLOCK_M]   (A: K in shared memory, B: Q's tile permuted)
    P^T  = exp2(S^T * qk_scale - lse * log2 e)
    dP^T = V dO^T         [BLOCK_N, BLOCK_M]
    dV  += P^T dO         [BLOCK_N, HEAD_DIM]  (A: P^T from registers, B: dO's tile)
    dS^T = P^T (dP^T - delta)
    dK  += dS^T Q         [BLOCK_N, HEAD_DIM]  (A: dS^T from registers, B: Q's tile)

so P and dS never go through shared memory, and dK, dV need no transpose (dK is scaled by softmax_scale
at the end). The dV matmul runs while dS is computed. LSE and delta are plain loads by the consumers (a
TMA box needs 16-byte row strides, seqlen_q * 4 bytes is not one in general).

Q and dO arrive as 4-D TMA descriptors over (batch, seqlen, nheads, headdim), boxes [1, BLOCK_M, 1, d]:
rows past seqlen_q are zero-filled per batch entry; K and V likewise with [1, BLOCK_N, 1, d].

Ring: STAGES slots of (Q, dO), a ready barrier each (TMA arrives with the byte count) and one free barrier
per slot that the consumers arrive on once both matmuls reading it (dV's and dK's) are done. The query
blocks a key block visits come as kernels/common.py's q_block_bounds gives them: the masked left edge,
the unmasked middle, the masked right edge; loader and consumers walk the same sequence of steps.

FUSED_DQ (opt-in, deterministic=False only: launch_hopper.attention_backward_fused) adds dQ from here, FA3's
way: dS^T goes to shared memory once, dK and dQ_partial = dS K (A: dS^T permuted, B: the resident K) both
read it there, and each step's partial * softmax_scale is added into an fp32 (batch, seqlen_q, nheads, d)
buffer by TMA reduce-add (tma_reduce_add); the order of those adds varies, so dQ is not bit-reproducible.

The dQ kernel (attention_bwd_dq_hopper_kernel, opt-in: launch_hopper.gluon_dq) is the forward's shape turned
to the gradient: grid (query blocks, nheads, batch); the program's Q and dO tiles, its LSE and delta rows
stay resident, K and V stream through a STAGES-slot ring filled by the forward's 1-warp loader
(hopper_common.kv_loader, same barrier array). Per key block, 8 consumer warps (two warpgroups of 64 rows):

    S  = Q K^T            [BLOCK_M, BLOCK_N]   (A: Q tile, B: K tile permuted; both in shared memory)
    dP = dO V^T           [BLOCK_M, BLOCK_N]   (A: dO tile, B: V tile permuted)
    P  = exp2(S * qk_scale - lse * log2 e)
    dS = P (dP - delta)
    dQ += dS K            [BLOCK_M, HEAD_DIM]  (A: dS from registers, B: K tile)

dQ(j) is issued at the top of step j + 1, so the tensor cores run dQ(j), S(j + 1), dP(j + 1) back to back
(block lo is peeled, the last block's dQ issued after the loop). V's slot is freed once dP is in, K(j)'s
once dQ(j) is (the first of the step's three waits).
No atomics: each program owns its dQ rows, so two runs agree bit for bit.
"""

import triton
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from flashtron.kernels.hopper_common import kv_loader, kv_range, program_query_block

LOG2E = gl.constexpr(1.4426950408889634)


@builtin
def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """Add the shared-memory tile src into the global box of tensor_desc at coord, by the TMA unit
    (`cp.reduce.async.bulk.tensor` .add; rows outside the tensor are dropped), asynchronous like
    tma.async_copy_shared_to_global: tma.store_wait says when src may be written again. Triton 3.6's builder
    has the op (ttng.async_tma_reduce) but Gluon's tma module does not expose it, so it is wrapped here the
    way that module wraps async_copy_shared_to_global."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _q_range(start_n, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
             HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):  # fmt: skip
    """Query range [lo, hi) whose rows see some key of [start_n, start_n + BLOCK_N) and its unmasked middle
    [full_lo, full_hi), as kernels/common.py's q_block_bounds (bottom-right aligned window)."""
    shift = seqlen_k - seqlen_q
    lo = 0
    full_lo = 0
    hi = seqlen_q
    full_hi = (seqlen_q // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        lo = (gl.maximum(start_n - shift - window_right, 0) // BLOCK_M) * BLOCK_M
        first_all = gl.maximum(start_n + BLOCK_N - 1 - shift - window_right, 0)
        full_lo = ((first_all + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = gl.minimum(hi, gl.maximum(start_n + BLOCK_N - shift + window_left, 0))
        full_hi = gl.minimum(full_hi, (gl.maximum(start_n - shift + window_left + 1, 0) // BLOCK_M) * BLOCK_M)
    if start_n + BLOCK_N > seqlen_k:  # a key block that runs past seqlen_k has no unmasked middle
        full_hi = full_lo
    hi = gl.maximum(hi, lo)
    full_lo = gl.minimum(gl.maximum(full_lo, lo), hi)
    full_hi = gl.minimum(gl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@gluon.jit
def _segment(seg: gl.constexpr, lo, full_lo, full_hi, hi):
    """[start, end) of segment seg: 0 the masked left edge, 1 the unmasked middle, 2 the masked right edge."""
    start = full_hi
    end = hi
    if seg == 0:
        start = lo
        end = full_lo
    elif seg == 1:
        start = full_lo
        end = full_hi
    return start, end


@triton.constexpr_function
def checked_bounds(seg, has_left, has_right, lean_mask):
    """(left, right): the window bounds that segment seg's mask tests. With LEAN_MASK the masked right edge
    (seg 2) skips the right bound: its blocks start at or past _q_range's full_lo, the first row that sees
    every key of the block under it. The masked left edge keeps both: under a window narrower than a query
    block its blocks can cross the left bound too."""
    return has_left, has_right and not (lean_mask and seg == 2)


@gluon.jit
def key_thresholds(offs_key, seqlen_q, seqlen_k, window_left, window_right):
    """Per key, the first query that sees it under the right bound and the last under the left bound (bottom-
    right aligned: query i sees keys i + shift - window_left .. i + shift + window_right)."""
    shift = seqlen_k - seqlen_q
    return offs_key - shift - window_right, offs_key - shift + window_left


@gluon.jit
def window_keep(q_offs, first_q, last_q, CHECK_RIGHT: gl.constexpr, CHECK_LEFT: gl.constexpr):
    """LEAN_MASK's mask: query offsets against key_thresholds' per-key values (either side may be relative to
    the same origin), one compare per bound and element, nothing built per element first."""
    if CHECK_RIGHT and CHECK_LEFT:
        keep = (q_offs >= first_q) & (q_offs <= last_q)
    elif CHECK_RIGHT:
        keep = q_offs >= first_q
    else:
        keep = q_offs <= last_q
    return keep


@gluon.jit
def next_step(off_h, start_m, off_h0, off_h_end, BLOCK_M: gl.constexpr):
    """LEAN_MASK's (head, query block) after a step, heads innermost as step % group_size and step //
    group_size give them, as counters: no division by the runtime group_size a step."""
    off_h += 1
    if off_h == off_h_end:
        off_h = off_h0
        start_m += BLOCK_M
    return off_h, start_m


# Barriers live in one [3 * STAGES + 1, 1] array: per slot s, Q ready (s), dO ready (STAGES + s), slot free
# (2 STAGES + s); then K and V ready (3 STAGES).
@gluon.jit
def _loader(q_desc, do_desc, q_bufs, do_bufs, bars, lo, full_lo, full_hi, hi, off_b, off_h0, group_size,
            BLOCK_M: gl.constexpr, STAGES: gl.constexpr, LEAN_MASK: gl.constexpr):  # fmt: skip
    """The load partition: the (Q, dO) tiles of every step, each as soon as its slot is free."""
    t = 0
    for seg in gl.static_range(3):
        start, end = _segment(seg, lo, full_lo, full_hi, hi)
        if LEAN_MASK:
            off_h = off_h0
            start_m = start
        for step in range(gl.cdiv(end - start, BLOCK_M) * group_size):
            if not LEAN_MASK:
                off_h = off_h0 + step % group_size
                start_m = start + (step // group_size) * BLOCK_M
            s = t % STAGES
            # a fresh mbarrier counts as having completed the phase before 0, so the first lap passes
            mbarrier.wait(bars.index(2 * STAGES + s), ((t // STAGES) & 1) ^ 1)
            mbarrier.expect(bars.index(s), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [off_b, start_m, off_h, 0], bars.index(s), q_bufs.index(s))
            mbarrier.expect(bars.index(STAGES + s), do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                do_desc, [off_b, start_m, off_h, 0], bars.index(STAGES + s), do_bufs.index(s)
            )
            if LEAN_MASK:
                off_h, start_m = next_step(off_h, start_m, off_h0, off_h0 + group_size, BLOCK_M)
            t += 1


@gluon.jit
def _steps(dk, dv, t, k_tile, v_tile, q_bufs, do_bufs, bars, LSE, Delta, stride_lh, start, end, off_h0, group_size,
           offs_n, seqlen_q, seqlen_k, window_left, window_right, qk_scale, ds_smem, dq_smem, dq_desc, dq_scale,
           q_offs_smem, s_layout: gl.constexpr, acc_layout: gl.constexpr, BLOCK_M: gl.constexpr,
           HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, MASK: gl.constexpr, HAS_LEFT: gl.constexpr,
           HAS_RIGHT: gl.constexpr, FUSED_DQ: gl.constexpr, LEAN_MASK: gl.constexpr):  # fmt: skip
    """Accumulate into dK, dV the query blocks [start, end) of every head of the group; t is the ring
    position of the first step. LSE, Delta point at row 0, head 0 of this sequence. With FUSED_DQ, each step
    also adds its dQ partial dS K * dq_scale into dq_desc's fp32 tensor (ds_smem: dS^T's staging tile,
    dq_smem: the partial's; unused otherwise). With LEAN_MASK, HAS_LEFT and HAS_RIGHT are the bounds this
    segment's blocks can cross (checked_bounds) and q_offs_smem holds 0 .. BLOCK_M - 1 (_consumer stores it)."""
    dtype: gl.constexpr = q_bufs.dtype
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    # the dQ partial's wgmma layout: a warpgroup per 64 query rows, the other warpgroups along HEAD_DIM
    # (BLOCK_M 64: each warpgroup computes 64 x HEAD_DIM / 2 of it); below 64 rows, dQ^T [HEAD_DIM, BLOCK_M]
    # with the warpgroups along HEAD_DIM, as dK's
    if BLOCK_M >= 64:
        DQ_WG_M: gl.constexpr = min(BLOCK_M // 64, gl.num_warps() // 4)
        DQ_WARPS_N: gl.constexpr = gl.num_warps() // (4 * DQ_WG_M)
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4 * DQ_WG_M, DQ_WARPS_N], instr_shape=[16, HEAD_DIM // DQ_WARPS_N, 16]
        )
    else:
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, BLOCK_M, 16]
        )
    # the row statistics are prefetched compact (one value a thread or fewer) and spread over the block's
    # columns only where used: held in the wgmma layout from the start they cost 32 registers through the
    # step, and the consumers are at the 240 of setmaxnreg already (ptxas spilled)
    row_layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    arange_m = gl.arange(0, BLOCK_M, layout=row_layout)
    cols = gl.expand_dims(offs_n, 1)  # keys: the rows of a transposed block
    if LEAN_MASK:
        first_q, last_q = key_thresholds(cols, seqlen_q, seqlen_k, window_left, window_right)
        off_h = off_h0
        start_m = start
    for step in range(gl.cdiv(end - start, BLOCK_M) * group_size):
        if not LEAN_MASK:
            off_h = off_h0 + step % group_size
            start_m = start + (step // group_size) * BLOCK_M
        offs_m = start_m + arange_m
        rows_lse = LSE + off_h.to(gl.int64) * stride_lh + offs_m
        rows_delta = Delta + off_h.to(gl.int64) * stride_lh + offs_m
        if MASK:
            # rows past seqlen_q get P = exp2(s - inf) = 0 (their Q and dO rows are zero-filled): no row mask
            lse = gl.load(rows_lse, mask=offs_m < seqlen_q, other=float("inf"))
            delta = gl.load(rows_delta, mask=offs_m < seqlen_q, other=0.0)
        else:
            lse = gl.load(rows_lse)
            delta = gl.load(rows_delta)
        s = t % STAGES
        phase = (t // STAGES) & 1
        q_tile = q_bufs.index(s).reshape([BLOCK_M, HEAD_DIM])
        do_tile = do_bufs.index(s).reshape([BLOCK_M, HEAD_DIM])
        mbarrier.wait(bars.index(s), phase)
        zero_s = gl.zeros([offs_n.shape[0], BLOCK_M], gl.float32, s_layout)
        st = warpgroup_mma(k_tile, q_tile.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        mbarrier.wait(bars.index(STAGES + s), phase)
        dpt = warpgroup_mma(v_tile, do_tile.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        st = warpgroup_mma_wait(num_outstanding=1, deps=(st,))  # S^T done; dP^T may still run
        lse = gl.convert_layout(lse * LOG2E, gl.SliceLayout(0, s_layout))
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))  # [BLOCK_N, BLOCK_M]
        # Keys past seqlen_k need no mask: their K and V rows are zero-filled and each key's dK, dV row
        # depends on its own row of P and dS only, and those rows are not stored.
        # With FUSED_DQ they are masked all the same: dQ sums over the keys, and a P that overflows the 16-bit
        # dS (lse below about -11) would reach dQ as inf * 0 = NaN through the zero-filled K rows.
        if MASK and (HAS_LEFT or HAS_RIGHT):
            if LEAN_MASK:
                # the block's query offsets from shared memory, loaded in the step: an arange in the wgmma
                # layout is hoisted out of the loop by LLVM and holds 16-32 registers through every step (ptxas
                # spilled); compared relative to start_m, so the step's own work is on the per-key thresholds
                q_offs = gl.expand_dims(q_offs_smem.load(gl.SliceLayout(0, s_layout)), 0)
                keep = window_keep(q_offs, first_q - start_m, last_q - start_m, HAS_RIGHT, HAS_LEFT)
            else:
                diag = gl.expand_dims(start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout)), 0)
                diag = diag + (seqlen_k - seqlen_q)
                if HAS_RIGHT and HAS_LEFT:
                    keep = (cols <= diag + window_right) & (cols >= diag - window_left)
                elif HAS_RIGHT:
                    keep = cols <= diag + window_right
                else:
                    keep = cols >= diag - window_left
            if FUSED_DQ:
                keep = keep & (cols < seqlen_k)
            pt = gl.where(keep, pt, 0.0)
        elif MASK and FUSED_DQ:
            pt = gl.where(cols < seqlen_k, pt, 0.0)
        dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), op_layout), do_tile, dv, is_async=True)
        dpt = warpgroup_mma_wait(num_outstanding=1, deps=(dpt,))  # dP^T done; dV may still run
        delta = gl.convert_layout(delta, gl.SliceLayout(0, s_layout))
        dst = pt * (dpt - gl.expand_dims(delta, 0))  # [BLOCK_N, BLOCK_M]
        if FUSED_DQ:
            # dQ partial = dS K = (dS^T)^T K [BLOCK_M, HEAD_DIM]: its reduction runs over the keys, which both
            # warpgroups hold, so dS^T goes through shared memory once (Triton puts the bar.sync before the
            # wgmmas) and both matmuls read it there: dK as it is (A: dS^T), dQ permuted (A: dS, MN-major;
            # B: the resident K block). A from shared memory, not registers: no operand registers held while
            # they run, which the 32 of the dQ partial need.
            ds_smem.store(dst.to(dtype))
            fence_async_shared()
            dk = warpgroup_mma(ds_smem, q_tile, dk, is_async=True)
            if BLOCK_M >= 64:
                dq = warpgroup_mma(ds_smem.permute((1, 0)), k_tile, gl.zeros([BLOCK_M, HEAD_DIM], gl.float32,
                                   dq_layout), use_acc=False, is_async=True)  # fmt: skip
            else:  # wgmma's M is 64 rows a warpgroup: dQ^T = K^T dS^T [HEAD_DIM, BLOCK_M] instead
                dq = warpgroup_mma(k_tile.permute((1, 0)), ds_smem, gl.zeros([HEAD_DIM, BLOCK_M], gl.float32,
                                   dq_layout), use_acc=False, is_async=True)  # fmt: skip
            dv, dk, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, dq))
            mbarrier.arrive(bars.index(2 * STAGES + s), count=1)
            # the previous step's reduce has read dq_smem (long done: it was issued a step of five matmuls
            # ago), then this partial goes out: TMA adds it into the fp32 rows of (batch, head, query block)
            tma.store_wait(0)
            if BLOCK_M >= 64:
                dq_smem.reshape([BLOCK_M, HEAD_DIM]).store(dq * dq_scale)
            else:
                dq_smem.reshape([BLOCK_M, HEAD_DIM]).permute((1, 0)).store(dq * dq_scale)
            fence_async_shared()
            tma_reduce_add(dq_desc, [gl.program_id(2), start_m, off_h, 0], dq_smem)
        else:
            dk = warpgroup_mma(gl.convert_layout(dst.to(dtype), op_layout), q_tile, dk, is_async=True)
            dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
            mbarrier.arrive(bars.index(2 * STAGES + s), count=1)
        if LEAN_MASK:
            off_h, start_m = next_step(off_h, start_m, off_h0, off_h0 + group_size, BLOCK_M)
        t += 1
    return dk, dv, t


@gluon.jit
def _consumer(k_bufs, v_bufs, q_bufs, do_bufs, bars, LSE, Delta, DK, DV, stride_lb, stride_lh, stride_dkb,
              stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, start_n, lo, full_lo, full_hi, hi,
              off_h0, group_size, seqlen_q, seqlen_k, window_left, window_right, qk_scale, dk_scale,
              ds_smem, dq_smem, dq_desc, q_offs_smem,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
              FUSED_DQ: gl.constexpr, LEAN_MASK: gl.constexpr):  # fmt: skip
    """The math partition (num_warps warps; each warpgroup owns 64 keys of the block): the four matmuls,
    P and dS, and the epilogue. The pointers are the kernel's own: offsets to this program's batch and head
    are taken here, the output ones after the loop, so that no register carries them through it (the
    consumers are at setmaxnreg's 240)."""
    num_warps: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16]
    )
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    k_tile = k_bufs.index(0).reshape([BLOCK_N, HEAD_DIM])
    v_tile = v_bufs.index(0).reshape([BLOCK_N, HEAD_DIM])
    # also when no query sees these keys: the K/V copies must land before the program ends
    mbarrier.wait(bars.index(3 * STAGES), 0)
    off_b = gl.program_id(2)
    LSE += off_b.to(gl.int64) * stride_lb
    Delta += off_b.to(gl.int64) * stride_lb
    if LEAN_MASK:
        # written once, read by every masked step; plain 32-bit stores from a 1-D blocked layout (Triton's
        # membar pass puts the barrier between them and the first load)
        q_offs_smem.store(gl.arange(0, BLOCK_M, layout=gl.BlockedLayout([1], [32], [num_warps], [0])))
    t = 0
    for seg in gl.static_range(3):
        start, end = _segment(seg, lo, full_lo, full_hi, hi)
        dk, dv, t = _steps(
            dk, dv, t, k_tile, v_tile, q_bufs, do_bufs, bars, LSE, Delta, stride_lh, start, end, off_h0, group_size,
            offs_n, seqlen_q, seqlen_k, window_left, window_right, qk_scale, ds_smem, dq_smem, dq_desc, dk_scale,
            q_offs_smem, s_layout, acc_layout, BLOCK_M, HEAD_DIM, STAGES, seg != 1,
            checked_bounds(seg, HAS_LEFT, HAS_RIGHT, LEAN_MASK)[0],
            checked_bounds(seg, HAS_LEFT, HAS_RIGHT, LEAN_MASK)[1], FUSED_DQ, LEAN_MASK,
        )  # fmt: skip
    if FUSED_DQ:
        tma.store_wait(0)  # the last reduce has read dq_smem before the program's shared memory goes

    dk = dk * dk_scale
    off_hk = gl.program_id(1)
    DK += off_b.to(gl.int64) * stride_dkb + off_hk.to(gl.int64) * stride_dkh
    DV += off_b.to(gl.int64) * stride_dvb + off_hk.to(gl.int64) * stride_dvh
    offs_an = gl.convert_layout(offs_n, gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    n_ok = gl.expand_dims(offs_an < seqlen_k, 1)
    rows = gl.expand_dims(offs_an.to(gl.int64), 1)
    dk_ptrs = DK + rows * stride_dkn + gl.expand_dims(offs_d, 0)
    gl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_ok)
    dv_ptrs = DV + rows * stride_dvn + gl.expand_dims(offs_d, 0)
    gl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok)


# seqlens, the group size, the window and the LSE strides that follow the seqlens are runtime values: no
# recompile per sequence length (see hopper_fwd.attention_fwd_hopper_kernel)
@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "group_size", "window_left", "window_right", "stride_lb",
                              "stride_lh"])  # fmt: skip
def attention_bwd_dkdv_hopper_kernel(
    q_desc, k_desc, v_desc, do_desc, LSE, Delta, DK, DV, dq_desc,
    stride_lb, stride_lh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    seqlen_q, seqlen_k, group_size, window_left, window_right, qk_scale, dk_scale,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, FUSED_DQ: gl.constexpr = False,
    LEAN_MASK: gl.constexpr = False,
):  # fmt: skip
    """q_desc, do_desc: TMA descriptors over (batch, seqlen_q, nheads, headdim), boxes [1, BLOCK_M, 1, d];
    k_desc, v_desc over (batch, seqlen_k, nheads_k, headdim), boxes [1, BLOCK_N, 1, d]. LSE (natural log)
    and Delta: (batch, nheads, seqlen_q) fp32, same strides, rows contiguous. DK, DV like k and v (last
    stride 1). qk_scale = softmax_scale * log2(e), dk_scale = softmax_scale. group_size = nheads //
    nheads_k. Launch with num_warps 8 (two consumer warpgroups of BLOCK_N / 2 keys each).
    FUSED_DQ (deterministic=False only): dq_desc is a TMA descriptor over dq_accum, (batch, seqlen_q, nheads,
    headdim) fp32 zero-filled by the launcher, box [1, BLOCK_M, 1, d]; every step adds its dS K *
    softmax_scale into it (TMA reduce-add, so the summation order over key blocks varies from run to run).
    Without FUSED_DQ, dq_desc is None and the kernel is the deterministic dK/dV one.
    LEAN_MASK (opt-in, a candidate tile's: launch_hopper.CANDIDATE_BWD_TILES) builds the window mask with fewer
    registers live through the steps, against the masked kernels' spills: the query offsets from a shared int32
    buffer, per-key thresholds, per segment only the bounds its blocks can cross (checked_bounds), and the
    (head, query block) of a step as counters (next_step) instead of divisions by group_size. Without a window
    mask the kernel is the default one."""
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
    gl.static_assert(q_desc.block_type.shape[1] == BLOCK_M)
    gl.static_assert(k_desc.block_type.shape[1] == BLOCK_N)
    gl.static_assert(do_desc.block_type.shape[3] == HEAD_DIM)
    pid_n = gl.program_id(0)
    off_hk = gl.program_id(1)
    off_b = gl.program_id(2)
    start_n = pid_n * BLOCK_N
    off_h0 = off_hk * group_size
    lo, full_lo, full_hi, hi = _q_range(
        start_n, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )

    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [1] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [1] + v_desc.block_type.shape, v_desc.layout)
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_bufs = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    if FUSED_DQ:
        gl.static_assert(dq_desc.block_type.shape[1] == BLOCK_M)
        # dS^T in 16 bits, keys along the rows; the fp32 dQ partial in the layout of dq_desc's box
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], q_desc.dtype)
        ds_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_N, BLOCK_M], ds_layout)
        dq_smem = gl.allocate_shared_memory(dq_desc.dtype, dq_desc.block_type.shape, dq_desc.layout)
    else:
        ds_smem = k_bufs  # unused: placeholders, so that the partition's arguments are the same
        dq_smem = k_bufs
    # without a window mask LEAN_MASK would change only the step counters, which cost the unmasked kernel stack
    # (8 bytes at d128): that kernel stays the default one
    LEAN_WINDOW: gl.constexpr = LEAN_MASK and (HAS_LEFT or HAS_RIGHT)
    if LEAN_WINDOW:
        # a padded layout (no padding within the buffer) makes Triton store it with st.shared.b32; a swizzled
        # one got an stmatrix .b16 for the int32 tensor
        q_offs_layout: gl.constexpr = gl.PaddedSharedLayout.with_identity_for([[BLOCK_M, 1]], [BLOCK_M], [0])
        q_offs_smem = gl.allocate_shared_memory(gl.int32, [BLOCK_M], q_offs_layout)
    else:
        q_offs_smem = k_bufs  # unused placeholder, as ds_smem
    bars = gl.allocate_shared_memory(gl.int64, [3 * STAGES + 1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(3 * STAGES + 1):  # every barrier has one arrive (or one expect) per phase
        mbarrier.init(bars.index(i), count=1)

    kv_bar = bars.index(3 * STAGES)
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [off_b, start_n, off_hk, 0], kv_bar, k_bufs.index(0))
    tma.async_copy_global_to_shared(v_desc, [off_b, start_n, off_hk, 0], kv_bar, v_bufs.index(0))

    # argument tuples inline: a tuple assigned to a name turns its constexprs into tensors
    gl.warp_specialize([
        (_consumer, (
            k_bufs, v_bufs, q_bufs, do_bufs, bars, LSE, Delta, DK, DV, stride_lb, stride_lh, stride_dkb,
            stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, start_n, lo, full_lo, full_hi, hi,
            off_h0, group_size, seqlen_q, seqlen_k, window_left, window_right, qk_scale, dk_scale, ds_smem,
            dq_smem, dq_desc, q_offs_smem, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, FUSED_DQ,
            LEAN_WINDOW,
        )),
        (_loader, (
            q_desc, do_desc, q_bufs, do_bufs, bars, lo, full_lo, full_hi, hi, off_b, off_h0, group_size,
            BLOCK_M, STAGES, LEAN_WINDOW,
        )),
    ], [1], [24])  # fmt: skip


# The dQ kernel. Barriers as the forward's (hopper_fwd, one consumer): [4 * STAGES + 1, 1], per slot s K ready
# (s), V ready (STAGES + s), K free (2 STAGES + s), V free (3 STAGES + s); then Q and dO ready (4 STAGES).
@gluon.jit
def _dq_step(dq, ds_op, t, start_n, q_tile, do_tile, k_bufs, v_bufs, bars, lse_log2, delta, offs_m, seqlen_q,
             seqlen_k, window_left, window_right, qk_scale,
             s_layout: gl.constexpr, op_layout: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
             STAGES: gl.constexpr, FIRST: gl.constexpr, MASK: gl.constexpr, HAS_LEFT: gl.constexpr,
             HAS_RIGHT: gl.constexpr):  # fmt: skip
    """Key block t (keys [start_n, start_n + BLOCK_N), ring slot t % STAGES): issue the previous block's
    dQ += dS K (unless FIRST), then S and dP of this one; returns dQ and this block's dS as the next dQ
    wgmma's A operand. The tensor cores run dQ(t - 1), S(t), dP(t) back to back; P's math runs while dP
    is in flight. K(t - 1)'s slot is freed as soon as dQ(t - 1) is done, V(t)'s once dP(t) is."""
    s = t % STAGES
    phase = (t // STAGES) & 1
    k_tile = k_bufs.index(s).reshape([BLOCK_N, HEAD_DIM])
    if not FIRST:
        k_prev = k_bufs.index((t + STAGES - 1) % STAGES).reshape([BLOCK_N, HEAD_DIM])
        dq = warpgroup_mma(ds_op, k_prev, dq, is_async=True)  # [BLOCK_M, HEAD_DIM]
    zero_s = gl.zeros([offs_m.shape[0], BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(bars.index(s), phase)
    qk = warpgroup_mma(q_tile, k_tile.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    mbarrier.wait(bars.index(STAGES + s), phase)
    dp = warpgroup_mma(do_tile, v_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero_s,
                       use_acc=False, is_async=True)  # fmt: skip
    if not FIRST:
        # wgmma groups complete in order: dQ(t - 1) is done, S and dP may still run
        dq, ds_op = warpgroup_mma_wait(num_outstanding=2, deps=(dq, ds_op))
        mbarrier.arrive(bars.index(2 * STAGES + (t + STAGES - 1) % STAGES), count=1)
    qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))  # S done; dP may still run
    p = gl.exp2(qk * qk_scale - gl.expand_dims(lse_log2, 1))  # [BLOCK_M, BLOCK_N]
    if MASK:
        cols = gl.expand_dims(start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), 0)
        keep = cols < seqlen_k
        diag = gl.expand_dims(offs_m, 1) + (seqlen_k - seqlen_q)
        if HAS_RIGHT:
            keep = keep & (cols <= diag + window_right)
        if HAS_LEFT:
            keep = keep & (cols >= diag - window_left)
        p = gl.where(keep, p, 0.0)
    dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp,))  # [BLOCK_M, BLOCK_N]
    mbarrier.arrive(bars.index(3 * STAGES + s), count=1)  # V's last use is done
    ds = p * (dp - gl.expand_dims(delta, 1))  # [BLOCK_M, BLOCK_N]
    return dq, gl.convert_layout(ds.to(k_bufs.dtype), op_layout)


@gluon.jit
def _dq_steps(dq, ds_op, t, q_tile, do_tile, k_bufs, v_bufs, bars, lse_log2, delta, start, end, offs_m,
              seqlen_q, seqlen_k, window_left, window_right, qk_scale,
              s_layout: gl.constexpr, op_layout: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, MASK: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):  # fmt: skip
    """The key blocks [start, end), t the ring position of the first; each step issues the dQ of the block
    before it, so on return the last block's dQ is still to be issued (from ds_op)."""
    for start_n in range(start, end, BLOCK_N):
        dq, ds_op = _dq_step(
            dq, ds_op, t, start_n, q_tile, do_tile, k_bufs, v_bufs, bars, lse_log2, delta, offs_m, seqlen_q,
            seqlen_k, window_left, window_right, qk_scale, s_layout, op_layout, BLOCK_N, HEAD_DIM, STAGES, False,
            MASK, HAS_LEFT, HAS_RIGHT,
        )  # fmt: skip
        t += 1
    return dq, ds_op, t


@gluon.jit
def _dq_consumer(q_smem, do_smem, k_bufs, v_bufs, bars, LSE, Delta, DQ, stride_lb, stride_lh, stride_dqb,
                 stride_dqm, stride_dqh, start_m, lo, full_lo, full_hi, hi, seqlen_q, seqlen_k, window_left,
                 window_right, qk_scale, dq_scale,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                 HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):  # fmt: skip
    """The math partition (num_warps warps; each warpgroup owns 64 query rows): the three matmuls, P and dS,
    and the epilogue, over the key blocks [lo, hi) in ascending order (masked left edge, unmasked middle,
    masked right edge), as the loader issued them. The batch and head offsets come from the program ids
    where used, so that no register carries them through the loop."""
    num_warps: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    off_h = gl.program_id(1)
    off_b = gl.program_id(2)
    offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    row_ok = offs_m < seqlen_q
    rows = off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh + offs_m
    lse = gl.load(LSE + rows, mask=row_ok, other=float("-inf"))
    delta = gl.load(Delta + rows, mask=row_ok, other=0.0)
    # rows past seqlen_q and rows that see no key (lse -inf) get lse +inf: P = exp2(s - inf) = 0 in every
    # block, the unmasked ones included, so their dq is 0 and never NaN
    lse_log2 = gl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, acc_layout)
    q_tile = q_smem.index(0).reshape([BLOCK_M, HEAD_DIM])
    do_tile = do_smem.index(0).reshape([BLOCK_M, HEAD_DIM])
    mbarrier.wait(bars.index(4 * STAGES), 0)

    # block 0, peeled (masked: it may be an edge block, or see nothing at all), so that every step of the
    # loop has a previous block whose dQ it issues
    dq, ds_op = _dq_step(
        dq, dq, 0, lo, q_tile, do_tile, k_bufs, v_bufs, bars, lse_log2, delta, offs_m, seqlen_q, seqlen_k,
        window_left, window_right, qk_scale, s_layout, op_layout, BLOCK_N, HEAD_DIM, STAGES, True, True, HAS_LEFT,
        HAS_RIGHT,
    )  # fmt: skip
    t = 1
    first = lo + BLOCK_N
    for seg in gl.static_range(3):
        # (masked left edge, unmasked middle, masked right edge), each clipped to start after block 0
        start, end = _segment(seg, lo, full_lo, full_hi, hi)
        dq, ds_op, t = _dq_steps(
            dq, ds_op, t, q_tile, do_tile, k_bufs, v_bufs, bars, lse_log2, delta, gl.maximum(start, first),
            gl.maximum(end, first), offs_m, seqlen_q, seqlen_k, window_left, window_right, qk_scale, s_layout,
            op_layout, BLOCK_N, HEAD_DIM, STAGES, seg != 1, HAS_LEFT, HAS_RIGHT,
        )  # fmt: skip
    # the last block's dQ (its K slot needs no freeing: the loader has issued every load)
    k_last = k_bufs.index((t + STAGES - 1) % STAGES).reshape([BLOCK_N, HEAD_DIM])
    dq = warpgroup_mma(ds_op, k_last, dq, is_async=True)
    dq, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ds_op))

    dq = dq * dq_scale
    DQ += off_b.to(gl.int64) * stride_dqb + off_h.to(gl.int64) * stride_dqh
    offs_am = gl.convert_layout(offs_m, gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    dq_ptrs = DQ + gl.expand_dims(offs_am.to(gl.int64) * stride_dqm, 1) + gl.expand_dims(offs_d, 0)
    gl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=gl.expand_dims(offs_am < seqlen_q, 1))


# runtime values as in attention_bwd_dkdv_hopper_kernel: no recompile per sequence length, group or window
@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "group_size", "window_left", "window_right", "stride_lb",
                              "stride_lh"])  # fmt: skip
def attention_bwd_dq_hopper_kernel(
    q_desc, k_desc, v_desc, do_desc, LSE, Delta, DQ,
    stride_lb, stride_lh, stride_dqb, stride_dqm, stride_dqh,
    seqlen_q, seqlen_k, group_size, window_left, window_right, qk_scale, dq_scale,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
):  # fmt: skip
    """q_desc, do_desc: TMA descriptors over (batch, seqlen_q, nheads, headdim), boxes [1, BLOCK_M, 1, d];
    k_desc, v_desc over (batch, seqlen_k, nheads_k, headdim), boxes [1, BLOCK_N, 1, d]. LSE (natural log)
    and Delta: (batch, nheads, seqlen_q) fp32, same strides, rows contiguous. DQ like q (last stride 1).
    qk_scale = softmax_scale * log2(e), dq_scale = softmax_scale. group_size = nheads // nheads_k.
    Launch with num_warps 8 (two consumer warpgroups of BLOCK_M / 2 rows each)."""
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
    # K(t-1)'s slot is freed after K(t)'s ready wait: with one slot K(t)'s load would wait on that free
    gl.static_assert(STAGES >= 2, "the dQ ring needs two stages")
    gl.static_assert(q_desc.block_type.shape[1] == BLOCK_M)
    gl.static_assert(k_desc.block_type.shape[1] == BLOCK_N)
    gl.static_assert(do_desc.block_type.shape[3] == HEAD_DIM)
    start_m, off_h, off_b, off_hk = program_query_block(group_size, BLOCK_M, HAS_RIGHT)
    lo, full_lo, full_hi, hi = kv_range(
        start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    # at least one block, also for rows that see no key: block lo is in range (lo < seqlen_k) and fully
    # masked for them (and their lse is -inf, read as +inf), so they come out as dq 0 without a separate path
    n_blocks = gl.maximum(gl.cdiv(hi - lo, BLOCK_N), 1)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [1] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [1] + do_desc.block_type.shape, do_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [4 * STAGES + 1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(4 * STAGES + 1):  # one consumer partition: one arrive (or expect) per phase
        mbarrier.init(bars.index(i), count=1)

    qdo_bar = bars.index(4 * STAGES)
    mbarrier.expect(qdo_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [off_b, start_m, off_h, 0], qdo_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(do_desc, [off_b, start_m, off_h, 0], qdo_bar, do_smem.index(0))

    # argument tuples inline: a tuple assigned to a name turns its constexprs into tensors
    gl.warp_specialize([
        (_dq_consumer, (
            q_smem, do_smem, k_bufs, v_bufs, bars, LSE, Delta, DQ, stride_lb, stride_lh, stride_dqb, stride_dqm,
            stride_dqh, start_m, lo, full_lo, full_hi, hi, seqlen_q, seqlen_k, window_left, window_right,
            qk_scale, dq_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT,
        )),
        (kv_loader, (k_desc, v_desc, k_bufs, v_bufs, bars, n_blocks, lo, off_b, off_hk, BLOCK_N, STAGES)),
    ], [1], [24])  # fmt: skip
