"""GPU tier for the Gluon Hopper forward: a handful of calls through flash_attn_func with
FLASHTRON_BACKEND=gluon (forward on the Gluon kernel, backward on the Triton kernels), on sm_90 only.
Few cases on purpose: each Gluon variant is a fresh compile."""

from __future__ import annotations

import pytest
import torch

from attention_cases import check_attention

pytest.importorskip("triton.experimental.gluon", reason="needs triton with Gluon (3.6+)")


@pytest.fixture
def gluon_forward(monkeypatch):
    """Routes covered forwards to the Gluon kernel and counts the calls that took it."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon forward is sm_90 only")
    from flashtron import launch_hopper

    calls = []
    original = launch_hopper.attention_forward
    monkeypatch.setattr(launch_hopper, "attention_forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    monkeypatch.setenv("FLASHTRON_BACKEND", "gluon")
    return calls


CASES = [
    # (batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, causal, window, layouts)
    (2, 257, 257, 4, 4, 128, torch.bfloat16, False, (-1, -1), ("contiguous",) * 3),
    (2, 129, 1000, 8, 2, 64, torch.float16, True, (-1, -1), ("contiguous",) * 3),
    (1, 1000, 127, 4, 1, 128, torch.bfloat16, True, (-1, -1), ("bhsd", "contiguous", "bhsd")),
    (1, 513, 513, 2, 2, 64, torch.bfloat16, False, (100, 8), ("contiguous",) * 3),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_gluon_forward_through_api(gluon_forward, case):
    batch, sq, sk, h, hk, d, dtype, causal, window, layouts = case
    check_attention(batch, sq, sk, h, hk, d, d, dtype, "cuda", causal=causal, window=window, layouts=layouts)
    assert gluon_forward, "the forward did not take the Gluon kernel"


@pytest.mark.gpu
def test_uncovered_calls_stay_on_triton(gluon_forward):
    # head dim 96 and the sliced layout (unaligned base) are not covered: the Triton forward runs
    check_attention(1, 65, 65, 2, 2, 96, 96, torch.bfloat16, "cuda", causal=True)
    check_attention(1, 65, 65, 2, 2, 64, 64, torch.bfloat16, "cuda", layouts=("sliced",) * 3, backward=False)
    assert not gluon_forward
