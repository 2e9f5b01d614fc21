"""Input validation for the public functions, run once at the API edge and before any dispatch.

Every helper takes `fn`, the public function's name, and raises InputTypeError (wrong kind of object
or dtype) or InputValueError (wrong shape, range, device or value), with a message that names the
argument, says what was expected and shows what was given. Both are RuntimeErrors, as flash_attn's
own checks are, so code that falls back to another attention on RuntimeError keeps working; and each
is also the TypeError or ValueError it is by nature.

What flash_attn accepts, flashtron accepts (flash_attn 2.8's wrapper and C++ checks): int-like
scalars given as ints, numpy ints or one-element integer tensors; a window_size as a tuple, a list,
a numpy array or a 2-element integer tensor, with any negative side meaning unbounded; a softcap <= 0
meaning off; tensors whose last dimension is not contiguous, copied as flash_attn's
maybe_contiguous does (contiguous_last) -- except the KV caches, which are written in place.

The shape checks never read tensor values. The value checks at the end (cu_seqlens in order and
inside the tensors, block_table entries, cache_seqlens within the cache...) do, so they run only where
`reads_values` says reading is free or allowed: see its docstring for the rule and its cost.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = 512


class InputError(RuntimeError):
    """A bad argument to a flashtron function. A RuntimeError, as flash_attn's TORCH_CHECK failures are."""


class InputTypeError(InputError, TypeError):
    """A wrong kind of object or dtype: catchable as TypeError and as RuntimeError."""


class InputValueError(InputError, ValueError):
    """A wrong shape, range, device or value: catchable as ValueError and as RuntimeError."""


def _dtype_names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def _is_numpy(value) -> bool:
    return type(value).__module__ == "numpy"


def contiguous_last(t):
    """flash_attn's maybe_contiguous: a contiguous copy of a tensor whose last dimension has a stride
    other than 1; anything else (other tensors, None, wrong types for the checks to reject) as given.
    The copy is differentiable, so gradients still reach the caller's tensor."""
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def check_tensor(
    fn, name, t, *, ndim=None, layout="", dtype=None, like=None, device=None, shape=None, unit_stride=True
):
    """Checks one tensor argument. dtype: a dtype or a tuple of accepted dtypes. like: the name of
    the argument whose dtype/device `dtype`/`device` come from (for the message). shape: exact
    shape. unit_stride: require stride(-1) == 1, the only layout constraint the kernels have (the
    public functions copy other tensors first, contiguous_last; tensors written in place cannot be)."""
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        accepted = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in accepted:
            want = f"the same dtype as {like} ({dtype})" if like else f"dtype {_dtype_names(accepted)}"
            raise InputTypeError(f"{fn}: {name} must have {want}, got {t.dtype}")
    if device is not None and t.device != device:
        raise InputValueError(f"{fn}: {name} must be on the same device as {like or 'q'} ({device}), got {t.device}")
    layout = f" {layout}" if layout else ""
    if ndim is not None and t.dim() != ndim:
        raise InputValueError(f"{fn}: {name} must be {ndim}-D{layout}, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise InputValueError(f"{fn}: {name} must have shape {tuple(shape)}{layout}, got {tuple(t.shape)}")
    if unit_stride and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise InputValueError(
            f"{fn}: {name} must have contiguous last dimension (stride(-1) == 1), got strides {t.stride()}"
        )
    return t


def _int_like(value):
    """value as an int, or None when it is not int-like: ints and numpy ints (never bools), and
    one-element integer tensors (read on the host, as flash_attn's int parameters read them)."""
    if type(value) is int:  # the common case first: these checks run on every eager call
        return value
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or (_is_numpy(value) and type(value).__name__.startswith("bool")):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() <= 1:
        if not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            return int(value.item())
    return None


def check_int(fn, name, value, *, minimum=None) -> int:
    """An int-like value (an int, a numpy int or a one-element integer tensor; never a bool or a
    float) not below `minimum`, as a Python int (a SymInt stays one)."""
    n = _int_like(value)
    if n is None:
        raise InputTypeError(f"{fn}: {name} must be an int, got {_describe(value)}")
    if minimum is not None and n < minimum:
        raise InputValueError(f"{fn}: {name} must be >= {minimum}, got {n}")
    return n


def check_real(fn, name, value) -> float:
    """A real number (int, float, numpy scalar, or a one-element int or float tensor), as a float."""
    if type(value) is float or type(value) is int:  # the common case first
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() <= 1:
        if not (value.is_complex() or value.dtype == torch.bool):
            return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{fn}: {name} must be a float, got {_describe(value)}")
    return float(value)


def check_bool(fn, name, value) -> bool:
    """A bool (or numpy bool), as flash_attn's bool parameters take; "yes", 1 or None are refused."""
    if isinstance(value, bool) or (_is_numpy(value) and type(value).__name__.startswith("bool")):
        return bool(value)
    raise InputTypeError(f"{fn}: {name} must be a bool, got {_describe(value)}")


# ---------------------------------------------------------------------------------------------
# q, k, v
# ---------------------------------------------------------------------------------------------


def check_qkv(fn, q, k, v, *, varlen=False, paged=False, names=("q", "k", "v"), same_batch=True):
    """Shapes (flash_attn's words): q (batch_size, seqlen_q, nheads, headdim), or (total_q, nheads,
    headdim) when varlen; k (batch_size, seqlen_k, nheads_k, headdim), or (total_k, nheads_k,
    headdim) when varlen, or (num_blocks, page_block_size, nheads_k, headdim) when paged; v as k with
    headdim_v. same_batch=False lets a dense KV cache have its own batch_size_cache. Returns
    (nheads, nheads_k, headdim, headdim_v)."""
    nq, nk, nv = names
    q_layout = "(total_q, nheads, headdim)" if varlen else "(batch_size, seqlen_q, nheads, headdim)"
    if paged:
        kv_layout = "(num_blocks, page_block_size, nheads_k, headdim)"
    elif varlen:
        kv_layout = "(total_k, nheads_k, headdim)"
    else:
        kv_layout = "(batch_size, seqlen_k, nheads_k, headdim)"
    check_tensor(fn, nq, q, ndim=3 if varlen else 4, layout=q_layout, dtype=FLOAT_DTYPES)
    kv_ndim = 4 if (paged or not varlen) else 3
    for name, t in ((nk, k), (nv, v)):
        check_tensor(fn, name, t, ndim=kv_ndim, layout=kv_layout, dtype=q.dtype, like=nq, device=q.device)
    if same_batch and not varlen and not paged:
        for name, t in ((nk, k), (nv, v)):
            if t.shape[0] != q.shape[0]:
                raise InputValueError(f"{fn}: {name} must have batch size {q.shape[0]} like {nq}, got {t.shape[0]}")
    lead_k, lead_v = tuple(k.shape[:-2]), tuple(v.shape[:-2])
    if lead_k != lead_v:
        lead = "(num_blocks, page_block_size)" if paged else "(total_k,)" if varlen else "(batch_size, seqlen_k)"
        raise InputValueError(f"{fn}: {nv} must have the same {lead} as {nk} {lead_k}, got {lead_v}")
    if v.shape[-2] != k.shape[-2]:
        raise InputValueError(f"{fn}: {nv} must have the same nheads as {nk} ({k.shape[-2]}), got {v.shape[-2]}")
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads_k < 1 or nheads < 1 or nheads % nheads_k != 0:
        raise InputValueError(
            f"{fn}: nheads of {nq} ({nheads}) must be a positive multiple of nheads_k of {nk} ({nheads_k})"
        )
    if k.shape[-1] != q.shape[-1]:
        raise InputValueError(f"{fn}: {nk} must have the same headdim as {nq} ({q.shape[-1]}), got {k.shape[-1]}")
    for name, d in ((nq, q.shape[-1]), (nv, v.shape[-1])):
        if not 1 <= d <= MAX_HEADDIM:
            raise InputValueError(f"{fn}: headdim of {name} must be between 1 and {MAX_HEADDIM}, got {d}")
    return nheads, nheads_k, q.shape[-1], v.shape[-1]


def check_packed(fn, name, t, *, ndim, count, layout):
    """qkv (batch_size, seqlen, 3, nheads, headdim) / kv (..., 2, nheads_k, headdim); the varlen
    forms drop batch_size. `count` is 3 or 2, at dim -3."""
    check_tensor(fn, name, t, ndim=ndim, layout=layout, dtype=FLOAT_DTYPES)
    if t.shape[-3] != count:
        raise InputValueError(
            f"{fn}: {name} must have size {count} at dim {ndim - 3} {layout}, got shape {tuple(t.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# Scalar options and per-head tensors
# ---------------------------------------------------------------------------------------------


def check_options(fn, *, dropout_p=0.0, softmax_scale=None, window_size=(-1, -1), softcap=0.0):
    """Returns (dropout_p, softmax_scale or None, window_left, window_right, softcap), each side of
    the window -1 when unbounded and softcap 0.0 when off (flash_attn: "softcap <= 0.0 means
    deactivate")."""
    dropout_p = check_real(fn, "dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:  # also rejects nan
        raise InputValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None:
        softmax_scale = check_real(fn, "softmax_scale", softmax_scale)
        if not (abs(softmax_scale) < math.inf and softmax_scale > 0):  # not isfinite: dynamo-traceable
            raise InputValueError(f"{fn}: softmax_scale must be a finite positive float or None, got {softmax_scale}")
    softcap = check_real(fn, "softcap", softcap)
    if not abs(softcap) < math.inf:  # also rejects nan
        raise InputValueError(f"{fn}: softcap must be a finite float (<= 0 disables it), got {softcap}")
    left, right = check_window(fn, window_size)
    return dropout_p, softmax_scale, left, right, max(softcap, 0.0)


def check_window(fn, window_size) -> tuple[int, int]:
    """window_size (left, right): a tuple, a list, a numpy array or a 2-element integer tensor (flash_attn's
    tests pass torch.randint(0, seqlen, (2,))), of int-like sides. A negative side is unbounded: -1."""
    if type(window_size) in (tuple, list) and len(window_size) == 2:  # the common case, without ABC checks
        left, right = window_size
        if type(left) is int and type(right) is int:
            return (-1 if left < 0 else left), (-1 if right < 0 else right)
    want = "window_size must be a (left, right) pair of ints (negative = unbounded)"
    given = window_size
    if isinstance(window_size, torch.Tensor) or _is_numpy(window_size):
        if window_size.dtype == torch.bool or not hasattr(window_size, "tolist"):
            raise InputTypeError(f"{fn}: {want}, got {_describe(window_size)}")
        window_size = window_size.tolist()  # floats and bools stay what they are, and are refused below
    if isinstance(window_size, (str, bytes)) or not isinstance(window_size, Sequence):
        raise InputTypeError(f"{fn}: {want}, got {_describe(given)}")
    if len(window_size) != 2:
        raise InputValueError(f"{fn}: {want}, got {len(window_size)} values {tuple(window_size)!r}")
    sides = [_int_like(w) for w in window_size]
    if any(w is None for w in sides):
        raise InputTypeError(f"{fn}: {want}, got {tuple(window_size)!r}")
    left, right = (-1 if w < 0 else w for w in sides)
    return left, right


def check_alibi(fn, alibi_slopes, *, nheads, batch, device):
    """alibi_slopes: (nheads,) or (batch_size, nheads), fp32."""
    if alibi_slopes is None:
        return
    check_tensor(fn, "alibi_slopes", alibi_slopes, dtype=torch.float32, device=device)
    shapes = [(nheads,)] + ([(batch, nheads)] if batch is not None else [])
    if tuple(alibi_slopes.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise InputValueError(
            f"{fn}: alibi_slopes must have shape (nheads,) or (batch_size, nheads) = {want}, "
            f"got {tuple(alibi_slopes.shape)}"
        )


def check_sink(fn, learnable_sink, *, nheads, device):
    """learnable_sink: (nheads,), floating point."""
    if learnable_sink is None:
        return
    check_tensor(fn, "learnable_sink", learnable_sink, device=device)
    if not learnable_sink.is_floating_point():
        raise InputTypeError(f"{fn}: learnable_sink must have a floating dtype, got {learnable_sink.dtype}")
    if tuple(learnable_sink.shape) != (nheads,):
        raise InputValueError(
            f"{fn}: learnable_sink must have shape (nheads,) = ({nheads},), got {tuple(learnable_sink.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# Varlen and paged-KV metadata
# ---------------------------------------------------------------------------------------------


def check_cu_seqlens(fn, cu_seqlens_q, cu_seqlens_k, *, device, names=("cu_seqlens_q", "cu_seqlens_k")) -> int:
    """cu_seqlens_q, cu_seqlens_k: (batch_size + 1,), int32. Returns batch_size."""
    for name, t in zip(names, (cu_seqlens_q, cu_seqlens_k)):
        check_tensor(fn, name, t, ndim=1, layout="(batch_size + 1,)", dtype=torch.int32, device=device)
        if t.shape[0] < 1:  # batch_size 0 is an empty batch: [0]
            raise InputValueError(f"{fn}: {name} must have batch_size + 1 >= 1 entries, got shape {tuple(t.shape)}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise InputValueError(
            f"{fn}: {names[1]} must have the same length (batch_size + 1) as {names[0]} "
            f"({cu_seqlens_q.shape[0]}), got {cu_seqlens_k.shape[0]}"
        )
    return cu_seqlens_q.shape[0] - 1


def check_batch_vector(fn, name, t, *, batch, device):
    """A per-sequence int32 vector (batch_size,), e.g. seqused_k, cache_leftpad, cache_batch_idx."""
    if t is not None:
        check_tensor(fn, name, t, shape=(batch,), layout="(batch_size,)", dtype=torch.int32, device=device)


def check_block_table(fn, block_table, *, batch, device):
    """block_table: (batch_size, max_num_blocks_per_seq), int32."""
    check_tensor(
        fn,
        "block_table",
        block_table,
        ndim=2,
        layout="(batch_size, max_num_blocks_per_seq)",
        dtype=torch.int32,
        device=device,
    )
    if block_table.shape[0] != batch:
        raise InputValueError(
            f"{fn}: block_table must have batch_size = {batch} rows, got shape {tuple(block_table.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# flash_attn_with_kvcache and flash_attn_combine
# ---------------------------------------------------------------------------------------------


def check_kvcache(
    fn,
    q,
    k_cache,
    v_cache,
    *,
    k,
    v,
    rotary_cos,
    rotary_sin,
    cache_seqlens,
    cache_batch_idx,
    cache_leftpad,
    block_table,
):
    """Checks flash_attn_with_kvcache's tensors (see its docstring for the shapes). Returns (nheads,
    cache_seqlens) with an int-like cache_seqlens as an int; the caller checks the scalar options."""
    names = ("q", "k_cache", "v_cache")
    paged = block_table is not None
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):  # written in place: no copy possible
        if isinstance(cache, torch.Tensor) and cache.dim() > 0 and cache.shape[-1] > 1 and cache.stride(-1) != 1:
            raise InputValueError(
                f"{fn}: {name} must have contiguous last dimension (stride(-1) == 1), got strides "
                f"{cache.stride()}; it is updated in place, so it cannot be copied"
            )
    nheads, nheads_k, _, dv = check_qkv(fn, q, k_cache, v_cache, paged=paged, names=names, same_batch=False)
    capacity = _check_cache_rows(fn, q, k_cache, block_table, cache_batch_idx, cache_leftpad)
    seqlen_new = _check_new_kv(fn, q, k, v, nheads_k, dv, cache_seqlens)
    if cache_seqlens is not None and not (isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.dim() > 0):
        # an int-like: an int, a numpy int or a 0-d tensor (API.md), one length for every row
        cache_seqlens = check_int(fn, "cache_seqlens", cache_seqlens, minimum=0)
        # An int is checked here; a tensor's values are checked by check_kvcache_values
        if cache_seqlens + seqlen_new > capacity:
            where = _capacity_words(k_cache, block_table)
            raise InputValueError(
                f"{fn}: cache_seqlens + seqlen_new must be <= the cache capacity {capacity}, "
                f"got {cache_seqlens} + {seqlen_new}{where}"
            )
    else:
        check_batch_vector(fn, "cache_seqlens", cache_seqlens, batch=q.shape[0], device=q.device)
    _check_rotary(fn, q, rotary_cos, rotary_sin, has_new_kv=k is not None, capacity=capacity)
    return nheads, cache_seqlens


def _capacity_words(k_cache, block_table) -> str:
    """Where a paged row's capacity comes from, for messages: it names block_table."""
    if block_table is None:
        return ""
    return (
        f"; block_table addresses block_table.shape[1] * page_block_size = {block_table.shape[1]} * "
        f"{k_cache.shape[1]} positions per row: give it more columns"
    )


def _check_cache_rows(fn, q, k_cache, block_table, cache_batch_idx, cache_leftpad) -> int:
    """How batch rows find their cache; returns the capacity (keys per row) of the cache."""
    batch, dev = q.shape[0], q.device
    check_batch_vector(fn, "cache_batch_idx", cache_batch_idx, batch=batch, device=dev)
    check_batch_vector(fn, "cache_leftpad", cache_leftpad, batch=batch, device=dev)
    if block_table is None:
        if cache_batch_idx is None and k_cache.shape[0] < batch:
            raise InputValueError(f"{fn}: k_cache must have at least batch_size = {batch} rows, got {k_cache.shape[0]}")
        return k_cache.shape[1]
    check_block_table(fn, block_table, batch=batch, device=dev)
    if cache_batch_idx is not None:
        raise InputValueError(
            f"{fn}: cache_batch_idx must be None with a paged cache (block_table maps rows), got "
            f"{_describe(cache_batch_idx)}"
        )
    return block_table.shape[1] * k_cache.shape[1]


def _check_new_kv(fn, q, k, v, nheads_k, headdim_v, cache_seqlens) -> int:
    """k, v: (batch_size, seqlen_new, nheads_k, headdim / headdim_v) or both None. Returns seqlen_new."""
    if (k is None) != (v is None):
        given, missing = ("k", "v") if v is None else ("v", "k")
        raise InputValueError(f"{fn}: {given} was given without {missing}; pass both new k and v, or neither")
    if k is None:
        return 0
    layout = "(batch_size, seqlen_new, nheads_k, headdim)"
    for name, t, hd in (("k", k, q.shape[-1]), ("v", v, headdim_v)):
        check_tensor(fn, name, t, ndim=4, layout=layout, dtype=q.dtype, like="q", device=q.device)
        want = (q.shape[0], k.shape[1], nheads_k, hd)
        if tuple(t.shape) != want:
            raise InputValueError(f"{fn}: {name} must have shape {want} {layout}, got {tuple(t.shape)}")
    if cache_seqlens is None:
        raise InputValueError(f"{fn}: cache_seqlens is required when k and v are given (where to write them), got None")
    return k.shape[1]


def _check_rotary(fn, q, rotary_cos, rotary_sin, *, has_new_kv, capacity):
    """rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2), dtype of q, seqlen_ro >= capacity."""
    if (rotary_cos is None) != (rotary_sin is None):
        given, missing = ("rotary_cos", "rotary_sin") if rotary_sin is None else ("rotary_sin", "rotary_cos")
        raise InputValueError(f"{fn}: {given} was given without {missing}")
    if rotary_cos is None:
        return
    if not has_new_kv:  # as in flash_attn: rotary is applied while appending new keys
        raise InputValueError(f"{fn}: rotary_cos/rotary_sin need the new k and v to be given, got k=None")
    layout = "(seqlen_ro, rotary_dim / 2)"
    for name, t, shape in (("rotary_cos", rotary_cos, None), ("rotary_sin", rotary_sin, rotary_cos.shape)):
        check_tensor(fn, name, t, ndim=2, layout=layout, shape=shape, dtype=q.dtype, like="q", device=q.device)
    rotary_dim, d = 2 * rotary_cos.shape[1], q.shape[-1]
    if not 2 <= rotary_dim <= d:
        raise InputValueError(
            f"{fn}: rotary_dim = 2 * rotary_cos.shape[1] must be in [2, headdim = {d}], got {rotary_dim}"
        )
    if rotary_cos.shape[0] < capacity:
        raise InputValueError(
            f"{fn}: rotary_cos/rotary_sin must cover the whole cache: seqlen_ro >= {capacity}, "
            f"got {rotary_cos.shape[0]}"
        )


def check_combine(fn, out_partial, lse_partial, out, out_dtype):
    """out_partial (num_splits, batch_size, seqlen, nheads, headdim) fp32, lse_partial (num_splits,
    batch_size, seqlen, nheads) fp32, out (batch_size, seqlen, nheads, headdim) of out_dtype."""
    layout = "(num_splits, batch_size, seqlen, nheads, headdim)"
    check_tensor(fn, "out_partial", out_partial, ndim=5, layout=layout, dtype=torch.float32)
    check_tensor(
        fn,
        "lse_partial",
        lse_partial,
        shape=out_partial.shape[:-1],
        layout="(num_splits, batch_size, seqlen, nheads)",
        dtype=torch.float32,
        like="out_partial",
        device=out_partial.device,
    )
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise InputTypeError(f"{fn}: out_dtype must be {_dtype_names(FLOAT_DTYPES)} or None, got {out_dtype!r}")
    if out is not None:
        want_dtype = out_dtype or out_partial.dtype
        check_tensor(
            fn,
            "out",
            out,
            shape=out_partial.shape[1:],
            layout="(batch_size, seqlen, nheads, headdim)",
            device=out_partial.device,
            like="out_partial",
        )
        if out.dtype != want_dtype:
            raise InputTypeError(f"{fn}: out must have dtype out_dtype ({want_dtype}), got {out.dtype}")


# ---------------------------------------------------------------------------------------------
# Values: read on the host, where that is free or allowed
# ---------------------------------------------------------------------------------------------


def reads_values(t: torch.Tensor, *, paged: bool) -> bool:
    """Whether the value checks below run for a call whose tensors live on t's device.

    CPU tensors: always; reading them costs nothing. CUDA tensors: only with a paged KV cache
    (block_table given), where they cost one device-to-host sync per call, as flash_attn's own
    paged-KV check does. Other CUDA calls are never synchronised: the kernels keep whatever values
    they get inside the tensors instead (README, "Bounds"). Never while torch.compile traces or a CUDA
    graph is being captured, where a sync would break the graph: the guards alone apply there.
    flash_attn_with_kvcache runs its value check at the top of inference.kvcache_attention, which
    torch.compile's kvcache op runs eagerly too, so compiled KV-cache calls are checked as well."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    if t.device.type == "cuda":
        return paged and not torch.cuda.is_current_stream_capturing()
    return False


def _first_bad_page(block_table, num_pages, page_size, lo, hi):
    """(batch_size,) int64: the first column of each block_table row whose page holds some position in
    [lo[b], hi[b]) but is not a page of the cache (outside [0, num_pages)), or -1. Entries no
    position uses are never read, so they may hold anything (-1 padding, say), as in flash_attn."""
    batch, max_pages = block_table.shape
    if max_pages == 0:
        return torch.full((batch,), -1, dtype=torch.int64, device=block_table.device)
    cols = torch.arange(max_pages, device=block_table.device)
    used = (cols[None, :] * page_size < hi[:, None]) & ((cols[None, :] + 1) * page_size > lo[:, None])
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    first = torch.where(bad, cols[None, :], max_pages).amin(dim=1)
    return torch.where(first < max_pages, first, -1)


def _read(parts) -> list[list[int]]:
    """The host values of several integer tensors, in one transfer (one sync on a GPU)."""
    flat = torch.cat([p.reshape(-1).to(torch.int64) for p in parts]).tolist()
    out, i = [], 0
    for p in parts:
        out.append(flat[i : i + p.numel()])
        i += p.numel()
    return out


def _check_cumulative(fn, name, cu, rows, tensor, max_name, max_seqlen):
    """cu: the host values of a cu_seqlens; rows: the rows of `tensor` it indexes (None: unchecked)."""
    if cu[0] < 0:
        raise InputValueError(f"{fn}: {name}[0] must be >= 0, got {cu[0]}")
    for i in range(len(cu) - 1):
        if cu[i + 1] < cu[i]:
            raise InputValueError(
                f"{fn}: {name} must be non-decreasing, got {name}[{i + 1}] = {cu[i + 1]} < {name}[{i}] = {cu[i]}"
            )
    if rows is not None and cu[-1] > rows:
        raise InputValueError(
            f"{fn}: {name}[-1] = {cu[-1]} runs past the end of {tensor}, which has {rows} rows (tokens)"
        )
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        b = lengths.index(longest)
        raise InputValueError(
            f"{fn}: {max_name} must be at least the longest sequence of {name} (sequence {b}: {longest} tokens), "
            f"got {max_seqlen}"
        )
    return lengths


def check_varlen_values(
    fn, names, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, seqused_k=None, block_table=None
):
    """The values behind a varlen call, in one host read: cu_seqlens_q / cu_seqlens_k non-decreasing
    from an entry >= 0 and inside q / k; no sequence longer than max_seqlen_q / max_seqlen_k;
    0 <= seqused_k[b] <= the length of sequence b; with a paged k, each sequence within what its
    block_table row addresses, through entries that are pages of k. names: (q's, k's, cu_seqlens_q's,
    cu_seqlens_k's, max_seqlen_q's, max_seqlen_k's) names in this function."""
    nq, nk, ncq, nck, nmq, nmk = names
    parts = [cu_seqlens_q, cu_seqlens_k] + ([seqused_k] if seqused_k is not None else [])
    if block_table is not None:
        lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
        parts.append(_first_bad_page(block_table, k.shape[0], k.shape[1], torch.zeros_like(lens), lens))
    values = _read(parts)
    _check_cumulative(fn, ncq, values[0], q.shape[0], nq, nmq, max_seqlen_q)
    lengths = _check_cumulative(
        fn, nck, values[1], None if block_table is not None else k.shape[0], nk, nmk, max_seqlen_k
    )
    if seqused_k is not None:
        for b, (used, n) in enumerate(zip(values[2], lengths)):
            if not 0 <= used <= n:
                raise InputValueError(f"{fn}: seqused_k[{b}] must be in [0, {n}] (sequence {b} of {nck}), got {used}")
    if block_table is not None:
        pages, page_size = block_table.shape[1], k.shape[1]
        for b, n in enumerate(lengths):
            if n > pages * page_size:
                raise InputValueError(
                    f"{fn}: sequence {b} of {nck} has {n} keys, more than block_table addresses: "
                    f"block_table.shape[1] * page_block_size = {pages} * {page_size} = {pages * page_size}"
                )
        _raise_bad_page(fn, values[-1], block_table, k.shape[0], nk)


def _raise_bad_page(fn, first_bad, block_table, num_pages, cache):
    for b, j in enumerate(first_bad):
        if j >= 0:
            raise InputValueError(
                f"{fn}: block_table[{b}, {j}] = {int(block_table[b, j])} is not a page of {cache} "
                f"(num_blocks = {num_pages}); the entries a row uses must be in [0, {num_pages})"
            )


def check_kvcache_values(fn, q, k_cache, *, cache_seqlens, seqlen_new, cache_batch_idx, cache_leftpad, block_table):
    """The values behind flash_attn_with_kvcache, in one host read, before anything is written:
    0 <= cache_seqlens[b] and cache_seqlens[b] + seqlen_new <= the capacity of a row (k_cache.shape[1],
    or what block_table addresses); cache_batch_idx[b] a row of k_cache; cache_leftpad[b] in
    [0, cache_seqlens[b] + seqlen_new]; every block_table entry that a used position falls in a page
    of k_cache. cache_seqlens: a (batch_size,) tensor, or None for the whole capacity."""
    batch = q.shape[0]
    if batch == 0:
        return
    paged = block_table is not None
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    lens = cache_seqlens
    if lens is None:
        lens = torch.full((batch,), capacity, dtype=torch.int64, device=q.device)
    parts = [lens] + [t for t in (cache_batch_idx, cache_leftpad) if t is not None]
    if paged:
        ends = (lens.long() + seqlen_new).clamp(0, capacity)
        starts = cache_leftpad.long().clamp(min=0) if cache_leftpad is not None else torch.zeros_like(ends)
        parts.append(_first_bad_page(block_table, k_cache.shape[0], page_size, starts, ends))
    values = _read(parts)
    lens_h, rest = values[0], values[1:]
    for b, n in enumerate(lens_h):
        if n < 0:
            raise InputValueError(f"{fn}: cache_seqlens[{b}] must be >= 0, got {n}")
        if n + seqlen_new > capacity:
            where = _capacity_words(k_cache, block_table) if paged else " (k_cache.shape[1])"
            raise InputValueError(
                f"{fn}: cache_seqlens[{b}] + seqlen_new = {n} + {seqlen_new} exceeds the cache capacity of "
                f"{capacity} positions per row{where}"
            )
    if cache_batch_idx is not None:
        rows = k_cache.shape[0]
        for b, i in enumerate(rest.pop(0)):
            if not 0 <= i < rows:
                raise InputValueError(
                    f"{fn}: cache_batch_idx[{b}] = {i} is not a row of k_cache (batch_size_cache = {rows})"
                )
    if cache_leftpad is not None:
        for b, (pad, n) in enumerate(zip(rest.pop(0), lens_h)):
            if not 0 <= pad <= n + seqlen_new:
                raise InputValueError(
                    f"{fn}: cache_leftpad[{b}] must be in [0, cache_seqlens[{b}] + seqlen_new = {n + seqlen_new}], "
                    f"got {pad}"
                )
    if paged:
        _raise_bad_page(fn, rest.pop(0), block_table, k_cache.shape[0], "k_cache")
