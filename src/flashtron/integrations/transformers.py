"""Hugging Face transformers: flashtron as an attention implementation of any model that supports one.

    from flashtron.integrations.transformers import register
    model = AutoModelForCausalLM.from_config(config, attn_implementation=register())

`register(name)` adds two functions under `name` (which must not contain "flash": transformers 5.x
treats such names as FlashAttention flavours and tries to load a kernel for them):

- a mask function (AttentionMaskInterface): the model's 2D padding mask cut to the keys of the
  layer, (batch_size, kv_length) bool, or None when nothing is padded; causal, sliding-window and
  packed-sequence structure is left to the attention function, as FlashAttention does.
- an attention function (AttentionInterface), called by each attention layer with
  query (batch_size, nheads, seqlen_q, headdim) and key/value (batch_size, nheads_k, seqlen_k,
  headdim), the cache already applied. It picks one of three paths:
    padding mask given       -> unpad_input, flash_attn_varlen_func, pad_input (padded queries get 0)
    packed sequences         -> flash_attn_varlen_func over the restarts of position_ids (batch of 1),
                                or over cu_seq_lens_q/k given by a data collator
    otherwise                -> flash_attn_func
  honouring is_causal, sliding_window (a window of that many keys, the query's own included),
  softcap (Gemma-2), scaling, dropout and s_aux (attention sinks, as learnable_sink).

transformers is imported inside `register` only; this module imports without it.
"""

from __future__ import annotations

import torch

from flashtron import flash_attn_func, flash_attn_varlen_func, pad_input, unpad_input

__all__ = ["register", "attention_forward", "padding_mask"]


def register(name: str = "ftron_attn") -> str:
    """Registers flashtron's attention and mask functions with transformers under `name`; returns
    `name`, for `from_pretrained(..., attn_implementation=register())` or
    `model.set_attn_implementation(register())`."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register: name must be a non-empty str, got {name!r}")
    if "flash" in name.lower():
        raise ValueError(
            f"register: name must not contain 'flash' (transformers would try to load a FlashAttention "
            f"kernel for it), got {name!r}"
        )
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(
            "flashtron.integrations.transformers needs transformers >= 4.56 (AttentionInterface and "
            "AttentionMaskInterface); install it with `pip install transformers`"
        ) from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)
    return name


def padding_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The mask function: attention_mask (batch_size, seen_tokens + q_length) bool/int, 1 for real
    tokens -> (batch_size, kv_length) bool aligned with the layer's keys, or None without padding.

    The keys of a sliding-window cache layer are the last kv_length tokens, hence the cut from the
    right; a static cache's keys run past the tokens seen so far, and those slots are masked out.
    """
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    if kv_length is not None:
        if mask.shape[1] >= kv_length:
            mask = mask[:, mask.shape[1] - kv_length :]
        else:  # static cache: slots not written yet hold no tokens
            mask = torch.nn.functional.pad(mask, (0, kv_length - mask.shape[1]), value=False)
    if bool(mask.all()):  # one host sync per forward, as FlashAttention's integration
        return None
    return mask


def attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux=None,
    position_ids=None,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q=None,
    max_length_k=None,
    **kwargs,
):
    """query: (batch_size, nheads, seqlen_q, headdim); key, value: (batch_size, nheads_k, seqlen_k,
    headdim); attention_mask: padding_mask's result. Returns (attn_output (batch_size, seqlen_q,
    nheads, headdim_v), None): transformers' contract (no attention weights)."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "flashtron attention: attention_mask must be the 2D (batch_size, seqlen_k) padding mask of its "
            f"registered mask function, got shape {tuple(attention_mask.shape)} (a custom 4D mask needs "
            "attn_implementation='sdpa' or 'eager')"
        )
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch_size, seqlen, nheads, headdim)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = (sliding_window - 1, sliding_window - 1) if sliding_window else (-1, -1)
    kw = dict(
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=bool(causal),
        window_size=window,
        softcap=float(softcap) if softcap else 0.0,
        learnable_sink=s_aux.float() if s_aux is not None else None,
    )
    if attention_mask is not None:
        return _padded(q, k, v, attention_mask, kw), None
    if cu_seq_lens_q is not None and cu_seq_lens_k is not None:
        out = flash_attn_varlen_func(
            q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seq_lens_q.int(), cu_seq_lens_k.int(),
            int(max_length_q), int(max_length_k), **kw,
        )  # fmt: skip
        return out.unflatten(0, q.shape[:2]), None
    cu_seqlens = _packed_cu_seqlens(position_ids, q, k)
    if cu_seqlens is not None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        out = flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)
        return out[None], None
    return flash_attn_func(q, k, v, **kw), None


def _padded(q, k, v, mask, kw):
    """Left-padded batches (the keys' mask also covers the queries, which are the last seqlen_q)."""
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    k_unpad, indices_k, cu_k, max_k, _ = unpad_input(k, mask)
    v_unpad = v.flatten(0, 1)[indices_k]
    if seqlen_q == seqlen_k:
        q_unpad, indices_q, cu_q, max_q = q.flatten(0, 1)[indices_k], indices_k, cu_k, max_k
    elif seqlen_q == 1:  # decoding: every row has its one real query
        q_unpad, indices_q, max_q = q.flatten(0, 1), torch.arange(batch, device=q.device), 1
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    else:
        q_unpad, indices_q, cu_q, max_q, _ = unpad_input(q, mask[:, seqlen_k - seqlen_q :])
    out = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k, **kw)
    return pad_input(out, indices_q, batch, seqlen_q)


def _packed_cu_seqlens(position_ids, q, k):
    """cu_seqlens (n + 1,) int32 when position_ids (1, seqlen) restart (several sequences packed in
    one row without padding or cache, positions counting up by 1 inside each), else None."""
    seqlen = q.shape[1]
    if position_ids is None or q.shape[0] != 1 or seqlen < 2 or k.shape[1] != seqlen:
        return None
    if position_ids.shape[-1] != seqlen:
        return None
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    if starts.numel() == 0:
        return None
    total = torch.tensor([0, pos.numel()], dtype=starts.dtype, device=starts.device)
    return torch.cat([total[:1], starts, total[1:]]).to(torch.int32)
