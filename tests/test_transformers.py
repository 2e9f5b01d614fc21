"""flashtron registered as a Hugging Face transformers attention implementation, against the
library's own "eager" and "sdpa" on tiny random Llama and Gemma-2 models: logits on a left-padded
batch (fp64 eager as the reference), greedy generation with the cache, packed sequences.

Needs transformers >= 4.56 (AttentionInterface and AttentionMaskInterface); checked with 5.17.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tolerance import assert_fa_close

transformers = pytest.importorskip(
    "transformers", reason="needs Hugging Face transformers (pip install 'transformers>=4.56')"
)

from flashtron.integrations.transformers import register  # noqa: E402


@pytest.fixture(scope="module")
def name():
    return register()


def _llama_config(**kw):
    return transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, **kw,
    )  # fmt: skip


def _gemma2_config(softcap):
    # sliding_window 4 < the 12 tokens below, so the window matters; the initializer range is large
    # enough that attention moves the logits (the default 0.02 leaves them almost unchanged)
    return transformers.Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4, attn_logit_softcapping=softcap,
        final_logit_softcapping=30.0, query_pre_attn_scalar=16, max_position_embeddings=128,
        initializer_range=0.3,
    )  # fmt: skip


def _models(config, impls):
    """One model per attention implementation, same weights. Each gets its own config: the
    implementation is stored on it."""
    models = {}
    for impl in impls:
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl)
        if models:
            model.load_state_dict(next(iter(models.values())).state_dict())
        models[impl] = model.eval()
    return models


def _left_padded_batch():
    ids = torch.randint(0, 128, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return ids, mask


CASES = {
    "llama": (_llama_config, ("eager", "sdpa")),
    "gemma2-softcap": (lambda: _gemma2_config(2.0), ("eager",)),  # transformers' sdpa ignores softcap
    "gemma2": (lambda: _gemma2_config(None), ("eager", "sdpa")),
}


def _check_left_padded_and_generation(name, case, device):
    make_config, peers = CASES[case]
    models = {impl: m.to(device) for impl, m in _models(make_config(), (name, *peers)).items()}
    ids, mask = (t.to(device) for t in _left_padded_batch())
    real = mask.bool()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() computes them
    with torch.no_grad():
        ours = models[name](ids, attention_mask=mask, position_ids=position_ids).logits
        # reference: each row alone, unpadded, in fp64 (eager's padded fp64 run overflows its mask)
        eager64 = copy.deepcopy(models["eager"]).double()
        ref = torch.zeros_like(ours, dtype=torch.float64)
        for i in range(ids.shape[0]):
            ref[i, real[i]] = eager64(ids[i : i + 1, real[i]]).logits[0]
        assert torch.isfinite(ref[real]).all()
        for peer in peers:  # each peer on the padded batch in fp32 is the "PyTorch in dtype" error
            theirs = models[peer](ids, attention_mask=mask, position_ids=position_ids).logits
            assert_fa_close(ours[real], ref[real], theirs[real], name=f"logits vs {peer}")
        # the padding is not a no-op here: attending to it would change the logits a lot
        unmasked = models["eager"](ids, position_ids=position_ids).logits
        assert (unmasked[real] - ref[real].float()).abs().max() > 0.1

    generate = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ours = models[name].generate(ids, attention_mask=mask, **generate)
    for peer in peers:
        assert torch.equal(ours, models[peer].generate(ids, attention_mask=mask, **generate)), peer
    # without padding, decoding takes the dense path (one query over the cached keys)
    ours = models[name].generate(ids[:1], **generate)
    assert torch.equal(ours, models["eager"].generate(ids[:1], **generate))


@pytest.mark.parametrize("case", list(CASES))
def test_left_padded_logits_and_greedy_generation(name, case):
    _check_left_padded_and_generation(name, case, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_left_padded_logits_and_greedy_generation(name, case):
    """The same on the Triton kernels (fp32 models): Llama and Gemma-2 (window, softcap) against
    eager and sdpa."""
    _check_left_padded_and_generation(name, case, "cuda")


def test_sliding_window_is_honoured(name):
    """Gemma-2 with and without its window give different logits, and ours follows eager in both."""
    ids, mask = _left_padded_batch()
    config = _gemma2_config(None)
    models = _models(config, (name, "eager"))
    wide = copy.deepcopy(config)
    wide.sliding_window = 64
    wide_models = _models(wide, (name,))
    wide_models[name].load_state_dict(models[name].state_dict())
    with torch.no_grad():
        narrow_logits = models[name](ids, attention_mask=mask).logits
        wide_logits = wide_models[name](ids, attention_mask=mask).logits
        eager = models["eager"](ids, attention_mask=mask).logits
    real = mask.bool()
    assert (narrow_logits[real] - wide_logits[real]).abs().max() > 0.1
    torch.testing.assert_close(narrow_logits[real], eager[real], rtol=1e-4, atol=1e-4)


def test_packed_sequences(name):
    """Two sequences packed in one row: restarting position_ids (or a collator's cu_seq_lens) keep
    them apart, as if each ran alone."""
    models = _models(_llama_config(), (name, "eager"))
    a, b = torch.randint(0, 128, (1, 5)), torch.randint(0, 128, (1, 7))
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with torch.no_grad():
        separate = torch.cat([models["eager"](a).logits, models["eager"](b).logits], dim=1)
        by_positions = models[name](packed, position_ids=position_ids).logits
        by_cu_seqlens = models[name](
            packed, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7
        ).logits
        as_one = models[name](packed).logits
    torch.testing.assert_close(by_positions, separate, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by_cu_seqlens, separate, rtol=1e-4, atol=1e-4)
    assert (as_one[:, 5:] - separate[:, 5:]).abs().max() > 0.1  # packing is not a no-op here


def test_register_names():
    assert register("tron_attn_test") == "tron_attn_test"
    assert "tron_attn_test" in transformers.AttentionInterface._global_mapping
    with pytest.raises(ValueError, match="flash"):
        register("flashtron_attn")
    with pytest.raises(TypeError, match="name"):
        register("")


@pytest.mark.gpu
def test_gpu_llama_bf16_and_generation(name):
    config = _llama_config()
    models = _models(config, (name, "sdpa", "eager"))
    ids, mask = _left_padded_batch()
    ids, mask = ids.cuda(), mask.cuda()
    real = mask.bool()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = torch.zeros(*ids.shape, 128, dtype=torch.float64, device="cuda")
        eager64 = copy.deepcopy(models["eager"]).cuda().double()
        for i in range(ids.shape[0]):
            ref[i, real[i]] = eager64(ids[i : i + 1, real[i]]).logits[0]
        ours_bf16 = copy.deepcopy(models[name]).cuda().bfloat16()
        sdpa_bf16 = copy.deepcopy(models["sdpa"]).cuda().bfloat16()
        ours = ours_bf16(ids, attention_mask=mask, position_ids=position_ids).logits
        theirs = sdpa_bf16(ids, attention_mask=mask, position_ids=position_ids).logits
    # whole-model bf16 error: ours may be at most 2x SDPA's (plus the rounding floor)
    assert_fa_close(ours[real], ref[real], theirs[real], name="bf16 logits vs sdpa")
    generate = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    ours = models[name].cuda().generate(ids, attention_mask=mask, **generate)
    assert torch.equal(ours, models["sdpa"].cuda().generate(ids, attention_mask=mask, **generate))
