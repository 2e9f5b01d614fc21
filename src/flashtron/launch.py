"""Launchers for the Triton attention kernels: allocate outputs, pick the config, build the grid.

Tensors arrive validated (api.py) with stride(-1) == 1. Dense tensors are (batch, seqlen, nheads, d);
varlen tensors are (total, nheads, d) with cu_seqlens, which the kernels see as batch stride 0.
"""

from __future__ import annotations

import math

import torch

from flashtron import autotune, env, launch_hopper
from flashtron.configs import (
    TileConfig,
    append_block,
    bwd_configs,
    choose_num_splits,
    combine_blocks,
    decode_config,
    dot_fp32,
    fwd_config,
    is_hopper,
    num_sms,
    preprocess_block,
    tune_candidates,
)
from flashtron.dropout import keep_threshold
from flashtron.kernels.bwd import (
    attention_bwd_dkdv_kernel,
    attention_bwd_dq_kernel,
    attention_bwd_preprocess_kernel,
)
from flashtron.kernels.combine import combine_kernel
from flashtron.kernels.decode import append_kv_kernel, decode_kernel
from flashtron.kernels.fwd import attention_fwd_kernel
from flashtron.options import AttnOptions, CacheLayout
from flashtron.outputs import new_output, set_output_poisoning  # noqa: F401 (re-exported)

LOG2E = math.log2(math.e)


def _cdiv(a: int, b: int) -> int:
    # plain ints: triton.cdiv and triton.next_power_of_2 are constexpr functions in triton 3.6, and their
    # argument unwrapping costs microseconds per eager call on this host path
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _seq_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; varlen tensors have no batch axis."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides of an LSE-shaped tensor: (b, h, sq) dense, (h, total_q) varlen."""
    if varlen:
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)


def score_args(q: torch.Tensor, opts: AttnOptions) -> dict:
    has_softcap = opts.softcap > 0
    return dict(
        qk_scale=opts.softmax_scale / opts.softcap if has_softcap else opts.softmax_scale * LOG2E,
        softcap_log2=opts.softcap * LOG2E if has_softcap else 0.0,
        window_left=max(opts.window_left, 0),
        window_right=max(opts.window_right, 0),
        HAS_LEFT=opts.window_left >= 0,
        HAS_RIGHT=opts.window_right >= 0,
        HAS_SOFTCAP=has_softcap,
        HAS_ALIBI=opts.alibi_slopes is not None,
        DOT_FP32=dot_fp32(q.device, q.dtype),
        PRECISION="tf32" if q.dtype == torch.float32 and cuda_matmul_uses_tf32() else "ieee",
    )


def cuda_matmul_uses_tf32() -> bool:
    """Whether the user enabled TF32 for fp32 CUDA matmuls. torch >= 2.9 has fp32_precision (on
    the matmul backend, else inherited from torch.backends), and reading the older allow_tf32 raises
    once the new API set it; older torch has only allow_tf32."""
    for backend in (torch.backends.cuda.matmul, torch.backends):
        precision = getattr(backend, "fp32_precision", "none")
        if precision != "none":
            return precision == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch refuses to read it after a mix of the two APIs: IEEE, the default
        return False


def _dropout_args(q, k, opts: AttnOptions, dropout_seed, varlen: bool) -> dict:
    """Philox draw parameters (flashtron/dropout.py defines the offsets); inert when p == 0."""
    p = opts.dropout_p
    return dict(
        dropout_seed=dropout_seed if p > 0 else 0,
        dropout_threshold=keep_threshold(p) if p > 0 else 0,
        dropout_scale=1.0 / (1.0 - p),
        philox_rows=q.shape[0] if varlen else q.shape[1],
        philox_cols=k.shape[0] if varlen else k.shape[1],
        HAS_DROPOUT=p > 0,
    )


def alibi_strides(opts: AttnOptions) -> tuple[int, int]:
    slopes = opts.alibi_slopes
    if slopes is None:
        return 0, 0
    return (slopes.stride(0), slopes.stride(1)) if slopes.dim() == 2 else (0, slopes.stride(0))


def _shape_info(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    varlen = cu_seqlens_q is not None
    if varlen:
        batch, seqlen_q, seqlen_k = cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    nheads, head_dim = q.shape[-2], q.shape[-1]
    nheads_k, head_dim_v = k.shape[-2], v.shape[-1]
    return varlen, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, head_dim_v


def _kernel_seqlens(q, k, varlen, seqlen_q, seqlen_k):
    """The seqlen_q / seqlen_k the kernels get: dense, the lengths; varlen, the row counts of q and k,
    into which the kernels clamp every sequence read from cu_seqlens (kernels/common.py,
    sequence_bounds), so metadata the host did not check cannot point outside the tensors."""
    return (q.shape[0], k.shape[0]) if varlen else (seqlen_q, seqlen_k)


def attention_forward(
    q,
    k,
    v,
    opts: AttnOptions,
    *,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    seqused_k=None,
    dropout_seed=0,
):
    """Returns out (like q, with v's head dim) and lse (fp32, natural log): (b, h, sq) or (h, total_q)."""
    varlen, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, head_dim_v = _shape_info(
        q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k
    )
    backend = env.backend()
    if launch_hopper.chosen(backend, q.shape[-1]) and launch_hopper.covers(
        q, k, v, opts, varlen=varlen, seqused_k=seqused_k, backend=backend
    ):
        return launch_hopper.attention_forward(
            q, k, v, opts, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            seqused_k=seqused_k,
        )  # fmt: skip
    out = new_output((*q.shape[:-1], head_dim_v), q.dtype, q.device)
    lse_shape = (nheads, q.shape[0]) if varlen else (batch, nheads, seqlen_q)
    lse = new_output(lse_shape, torch.float32, q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    score = score_args(q, opts)
    cfg = fwd_config(
        q.device, q.dtype, max(head_dim, head_dim_v), left_window=opts.window_left >= 0, precision=score["PRECISION"]
    )
    rows_q, rows_k = _kernel_seqlens(q, k, varlen, seqlen_q, seqlen_k)

    def launch(cfg):
        attention_fwd_kernel[(max(_cdiv(seqlen_q, cfg.block_m), int(varlen)), nheads, batch + int(varlen))](
            q, k, v, out, lse, opts.alibi_slopes, opts.learnable_sink, cu_seqlens_q, cu_seqlens_k, seqused_k,
            *_seq_strides(q, varlen), *_seq_strides(k, varlen), *_seq_strides(v, varlen),
            *_seq_strides(out, varlen), *_lse_strides(lse, varlen), *alibi_strides(opts),
            rows_q, rows_k, nheads // nheads_k,
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_D=max(16, _next_power_of_2(head_dim)), BLOCK_DV=max(16, _next_power_of_2(head_dim_v)),
            HAS_SINK=opts.learnable_sink is not None, IS_VARLEN=varlen, HAS_SEQUSED_K=seqused_k is not None,
            HEAVY_FIRST=opts.window_right >= 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **score, **_dropout_args(q, k, opts, dropout_seed, varlen),
        )  # fmt: skip

    shape = ((head_dim, head_dim_v), (seqlen_q, seqlen_k), batch * nheads, nheads // nheads_k, varlen, seqused_k)
    launch(_tuned("fwd", cfg, launch, q, opts, *shape))
    return out, lse


def attention_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    opts: AttnOptions,
    *,
    dlse=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    seqused_k=None,
    dropout_seed=0,
):
    """Gradients of attention. dout like out; dlse (optional) is the gradient flowing into lse.
    Returns (dq, dk, dv, delta) where delta = rowsum(dout * out) - dlse, shaped like lse (the sink's
    gradient is -sum(exp(sink - lse) * delta))."""
    varlen, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, head_dim_v = _shape_info(
        q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k
    )
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    lse = lse.contiguous()  # the kernels address delta (allocated contiguous) with lse's strides
    delta = new_output(lse.shape, torch.float32, q.device)
    if q.numel() == 0 or k.numel() == 0:
        for t in (dq, dk, dv, delta):
            t.zero_()
        return dq, dk, dv, delta
    block_d = max(16, _next_power_of_2(head_dim))
    block_dv = max(16, _next_power_of_2(head_dim_v))
    lse_strides = _lse_strides(lse, varlen)
    rows_q, rows_k = _kernel_seqlens(q, k, varlen, seqlen_q, seqlen_k)
    pre_block = preprocess_block(q.device)
    attention_bwd_preprocess_kernel[(_cdiv(seqlen_q, pre_block), nheads, batch)](
        out,
        dout,
        delta,
        cu_seqlens_q,
        *_seq_strides(out, varlen),
        *_seq_strides(dout, varlen),
        *lse_strides,
        rows_q,
        HEAD_DIM_V=head_dim_v,
        BLOCK_M=pre_block,
        BLOCK_DV=block_dv,
        IS_VARLEN=varlen,
    )
    if dlse is not None:
        # d lse_i / d s_ij = P_ij, so a gradient on lse folds into delta: dS = P * (dP - (delta - dlse))
        delta.sub_(dlse)
    score = score_args(q, opts)
    cfg_kv, cfg_q = bwd_configs(
        q.device, q.dtype, max(head_dim, head_dim_v), causal=opts.causal, precision=score["PRECISION"]
    )
    common = dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        IS_VARLEN=varlen,
        HAS_SEQUSED_K=seqused_k is not None,
        **score,
        **_dropout_args(q, k, opts, dropout_seed, varlen),
    )
    seq_strides = (
        *_seq_strides(q, varlen),
        *_seq_strides(k, varlen),
        *_seq_strides(v, varlen),
        *_seq_strides(dout, varlen),
        *lse_strides,
    )

    def launch_dkdv(cfg):
        attention_bwd_dkdv_kernel[(max(_cdiv(seqlen_k, cfg.block_n), int(varlen)), nheads_k, batch + int(varlen))](
            q, k, v, dout, lse, delta, dk, dv, opts.alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k,
            *seq_strides, *_seq_strides(dk, varlen), *_seq_strides(dv, varlen), *alibi_strides(opts),
            rows_q, rows_k, nheads // nheads_k, dk_scale=opts.softmax_scale,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
        )  # fmt: skip

    def launch_dq(cfg):
        attention_bwd_dq_kernel[(max(_cdiv(seqlen_q, cfg.block_m), int(varlen)), nheads, batch + int(varlen))](
            q, k, v, dout, lse, delta, dq, opts.alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k,
            *seq_strides, *_seq_strides(dq, varlen), *alibi_strides(opts),
            rows_q, rows_k, nheads // nheads_k, dq_scale=opts.softmax_scale,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAVY_FIRST=opts.window_right >= 0,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
        )  # fmt: skip

    shape = ((head_dim, head_dim_v), (seqlen_q, seqlen_k), batch * nheads, nheads // nheads_k, varlen, seqused_k)
    gluon_dkdv = launch_hopper.chosen_backward(env.backend(), head_dim) and launch_hopper.covers_backward(
        q, k, v, dout, opts, varlen=varlen, seqused_k=seqused_k
    )
    if gluon_dkdv and not opts.deterministic and env.gluon_fused_dq():
        # opt-in (measured slower): dQ added from inside the Gluon dK/dV kernel by fp32 TMA reduce-add
        launch_hopper.attention_backward_fused(q, k, v, dout, lse, delta, dq, dk, dv, opts)
        return dq, dk, dv, delta
    if gluon_dkdv:
        # dK/dV on the Gluon Hopper kernel, dQ on the Triton one below: both without atomics
        launch_hopper.attention_backward_dkdv(q, k, v, dout, lse, delta, dk, dv, opts)
    else:
        launch_dkdv(_tuned("dkdv", cfg_kv, launch_dkdv, q, opts, *shape))
    if gluon_dkdv and env.gluon_dq():
        # opt-in (not measured faster): dQ on the Gluon Hopper kernel, also without atomics
        launch_hopper.attention_backward_dq(q, k, v, dout, lse, delta, dq, opts)
    else:
        launch_dq(_tuned("dq", cfg_q, launch_dq, q, opts, *shape))
    return dq, dk, dv, delta


def _tuned(kind: str, table_cfg: TileConfig, launch, q, opts: AttnOptions, head_dims, seqlens, programs, group,
           varlen, seqused_k) -> TileConfig:  # fmt: skip
    """The tile to launch with: the table's, or under FLASHTRON_AUTOTUNE the tuner's pick among the
    candidates (the table's tile included), timed by launch(cfg) on this call's tensors. Calls with
    deterministic=True keep the table's tile (autotune.py says why). programs: batch * nheads;
    group: nheads // nheads_k."""
    if not autotune.enabled(q.device) or opts.deterministic:
        return table_cfg
    candidates = tune_candidates(kind, q.device, q.dtype, max(head_dims))
    if not candidates:
        return table_cfg
    if table_cfg not in candidates:
        candidates.insert(0, table_cfg)
    # the mask kinds that the tables tell apart (fwd_config: a left bound; bwd_configs: plain causal)
    if opts.causal:
        mask = "causal"
    elif opts.window_left >= 0:
        mask = f"left-window{'+right' if opts.window_right >= 0 else ''}"
    else:
        mask = "right-window" if opts.window_right >= 0 else "full"
    flags = dict(softcap=opts.softcap > 0, alibi=opts.alibi_slopes is not None, sink=opts.learnable_sink is not None,
                 dropout=opts.dropout_p > 0, varlen=varlen, seqused=seqused_k is not None)  # fmt: skip
    features = ",".join([f"g{group}"] + [name for name, on in flags.items() if on])
    key = autotune.key(kind, q, head_dims, mask, features, seqlens, programs)
    return autotune.tuner().choose(key, table_cfg, candidates, launch, q.device, may_time=not autotune.capturing())


# ----------------------------------------------------------------------------------------------------
# Decode: flash_attn_with_kvcache and flash_attn_combine on the Triton kernels
# ----------------------------------------------------------------------------------------------------


def kvcache_forward(
    q,
    k_cache,
    v_cache,
    opts: AttnOptions,
    cache: CacheLayout,
    *,
    k,
    v,
    rotary_cos,
    rotary_sin,
    cache_seqlens,
    cache_batch_idx,
    cache_leftpad,
    block_table,
    rotary_interleaved,
    num_splits,
):
    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_k, head_dim_v = k_cache.shape[2], v_cache.shape[3]
    if cache_seqlens is None:
        cache_seqlens = torch.full((batch,), cache.capacity, dtype=torch.int32, device=q.device)
    seqlen_new = 0 if k is None else k.shape[1]
    has_rotary = rotary_cos is not None
    # Dummy pointers for absent optional tensors: never read, the constexpr flags say so.
    cos = rotary_cos if has_rotary else cache_seqlens
    sin = rotary_sin if has_rotary else cache_seqlens
    rotary = dict(
        stride_cos=cos.stride(0) if has_rotary else 0,
        stride_sin=sin.stride(0) if has_rotary else 0,
        rotary_dim=2 * rotary_cos.shape[1] if has_rotary else 0,
        seqlen_ro=rotary_cos.shape[0] if has_rotary else 0,
        HAS_ROTARY=has_rotary,
        ROTARY_INTERLEAVED=bool(rotary_interleaved),
    )
    table = block_table if cache.paged else cache_seqlens
    layout = dict(
        stride_btb=block_table.stride(0) if cache.paged else 0,
        page_size=max(cache.page_size, 1),
        # the kernels' Bounds guard (kernels/decode.py) skips rows and pages outside these
        capacity=cache.capacity,
        cache_rows=k_cache.shape[0],
        PAGED=cache.paged,
        HAS_BATCH_IDX=cache_batch_idx is not None,
    )
    block_d = max(16, _next_power_of_2(head_dim))
    block_dv = max(16, _next_power_of_2(head_dim_v))

    if seqlen_new > 0 and batch > 0:
        block_t = append_block(q.device)
        append_kv_kernel[(_cdiv(seqlen_new, block_t), nheads_k, batch)](
            k,
            v,
            k_cache,
            v_cache,
            cache_seqlens,
            cache_batch_idx,
            table,
            cos,
            sin,
            *k.stride()[:3],
            *v.stride()[:3],
            *k_cache.stride()[:3],
            *v_cache.stride()[:3],
            seqlen_new=seqlen_new,
            HEAD_DIM=head_dim,
            HEAD_DIM_V=head_dim_v,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            BLOCK_DV=block_dv,
            **layout,
            **rotary,
        )

    out = new_output((batch, seqlen_q, nheads, head_dim_v), q.dtype, q.device)
    lse = new_output((batch, nheads, seqlen_q), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse

    group = nheads // nheads_k
    cfg = decode_config(q.device, q.dtype, max(head_dim, head_dim_v))
    rows = seqlen_q * group
    block_m = min(cfg.block_m, max(16, _next_power_of_2(rows)))
    m_blocks = _cdiv(rows, block_m)
    splits = choose_num_splits(
        num_splits,
        batch * nheads_k * m_blocks,
        _cdiv(cache.capacity, cfg.block_n),
        num_sms(q.device),
        cfg.min_blocks_per_split,
    )
    if splits == 1:
        out_k, lse_k = out, lse
        out_strides = (0, *out.stride()[:3])
        lse_strides = (0, *lse.stride())
    else:
        out_k = new_output((splits, batch, nheads, seqlen_q, head_dim_v), torch.float32, q.device)
        lse_k = new_output((splits, batch, nheads, seqlen_q), torch.float32, q.device)
        s = out_k.stride()
        out_strides = (s[0], s[1], s[3], s[2])  # (split, batch, token, head)
        lse_strides = lse_k.stride()  # (split, batch, head, token)
    score = score_args(q, opts)
    decode_kernel[(splits * m_blocks, nheads_k, batch)](
        q,
        k_cache,
        v_cache,
        out_k,
        lse_k,
        cache_seqlens,
        cache_batch_idx,
        cache_leftpad,
        table,
        cos,
        sin,
        opts.alibi_slopes,
        opts.learnable_sink,
        *q.stride()[:3],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        *out_strides,
        *lse_strides,
        **dict(zip(("stride_ab", "stride_ah"), alibi_strides(opts))),
        seqlen_q=seqlen_q,
        seqlen_new=seqlen_new,
        group_size=group,
        num_splits=splits,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        HAS_SINK=opts.learnable_sink is not None,
        HAS_LEFTPAD=cache_leftpad is not None,
        ROTARY_PER_TOKEN=opts.has_window,
        WRITE_FINAL=splits == 1,
        num_warps=cfg.num_warps,
        num_stages=cfg.stages(cache.paged and is_hopper(q.device)),
        **layout,
        **rotary,
        **score,
    )
    if splits > 1:
        # the kernel's partial layout (split, batch, head, token) seen as combine's (split, batch, token, head)
        launch_combine(out_k.transpose(2, 3), lse_k.transpose(2, 3), out, lse.transpose(1, 2), opts.learnable_sink)
    return out, lse


def launch_combine(out_partial, lse_partial, out, lse, sink):
    """out_partial: (num_splits, batch, seqlen, nheads, headdim_v), lse_partial: (num_splits, batch,
    seqlen, nheads), out: (batch, seqlen, nheads, headdim_v), lse: (batch, seqlen, nheads); any strides."""
    num_splits, batch, seqlen, nheads, head_dim_v = out_partial.shape
    if out.numel() == 0 and lse.numel() == 0:
        return
    block_dv = max(16, _next_power_of_2(head_dim_v))
    block_s, block_m = combine_blocks(out.device, block_dv)
    combine_kernel[(_cdiv(seqlen * nheads, block_m), batch)](
        out_partial,
        lse_partial,
        out,
        lse,
        sink,
        *out_partial.stride()[:4],
        *lse_partial.stride(),
        *out.stride()[:3],
        *lse.stride(),
        num_splits,
        seqlen,
        nheads,
        HEAD_DIM_V=head_dim_v,
        BLOCK_S=block_s,
        BLOCK_M=block_m,
        BLOCK_DV=block_dv,
        HAS_SINK=sink is not None,
    )
