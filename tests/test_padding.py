"""unpad_input / pad_input: values against hand computations, round trips, gradients, bad input."""

from __future__ import annotations

import pytest
import torch

from flashtron.padding import pad_input, unpad_input

# batch 3, seqlen 5; row 1 keeps one token, row 2 all five.
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
UNUSED = torch.tensor([[0, 0, 0, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64, torch.uint8])
def test_unpad_values_by_hand(mask_dtype):
    x = torch.randn(3, 5, 2, 4)
    hidden, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, MASK.to(mask_dtype))
    assert indices.tolist() == [0, 1, 2, 5, 10, 11, 12, 13, 14]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 3, 4, 9]
    assert max_seqlen == 5 and isinstance(max_seqlen, int)
    assert seqused.dtype == torch.int32 and seqused.tolist() == [3, 1, 5]
    rows = [x[0, 0], x[0, 1], x[0, 2], x[1, 0], x[2, 0], x[2, 1], x[2, 2], x[2, 3], x[2, 4]]
    assert torch.equal(hidden, torch.stack(rows))


def test_unpad_with_unused_mask_by_hand():
    x = torch.randn(3, 5, 6)
    hidden, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, MASK, UNUSED)
    # Allocated tokens are attention_mask | unused_mask; seqused counts attention_mask only.
    assert indices.tolist() == [0, 1, 2, 3, 5, 6, 7, 10, 11, 12, 13, 14]
    assert cu_seqlens.tolist() == [0, 4, 7, 12]
    assert max_seqlen == 5
    assert seqused.tolist() == [3, 1, 5]
    assert torch.equal(hidden, x.reshape(15, 6)[indices])


def test_empty_row_and_all_empty():
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    x = torch.randn(2, 3, 4)
    hidden, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask)
    assert cu_seqlens.tolist() == [0, 0, 2] and max_seqlen == 2 and seqused.tolist() == [0, 2]
    assert hidden.shape == (2, 4)
    hidden, indices, cu_seqlens, max_seqlen, _ = unpad_input(x, torch.zeros(2, 3, dtype=torch.bool))
    assert hidden.shape == (0, 4) and cu_seqlens.tolist() == [0, 0, 0] and max_seqlen == 0
    assert torch.equal(pad_input(hidden, indices, 2, 3), torch.zeros(2, 3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip(dtype):
    x = torch.randn(3, 5, 2, 4).to(dtype)
    hidden, indices, *_ = unpad_input(x, MASK)
    padded = pad_input(hidden, indices, 3, 5)
    assert padded.dtype == dtype and padded.shape == x.shape
    assert torch.equal(padded, torch.where(MASK[:, :, None, None], x, torch.zeros((), dtype=dtype)))
    assert torch.equal(unpad_input(padded, MASK)[0], hidden)


def test_round_trip_non_contiguous_hidden():
    x = torch.randn(5, 3, 7).transpose(0, 1)  # (batch 3, seqlen 5, 7), not contiguous
    hidden, indices, *_ = unpad_input(x, MASK)
    assert torch.equal(pad_input(hidden, indices, 3, 5), x * MASK[:, :, None])


def test_gradients_by_hand():
    x = torch.randn(3, 5, 4, requires_grad=True)
    hidden, indices, *_ = unpad_input(x, MASK)
    g = torch.randn_like(hidden)
    (dx,) = torch.autograd.grad(hidden, x, g)
    expected = torch.zeros(15, 4)
    expected[indices] = g
    assert torch.equal(dx, expected.view(3, 5, 4))

    y = torch.randn(9, 4, requires_grad=True)
    padded = pad_input(y, indices, 3, 5)
    gp = torch.randn_like(padded)
    (dy,) = torch.autograd.grad(padded, y, gp)
    assert torch.equal(dy, gp.reshape(15, 4)[indices])


def test_gradcheck():
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unpad_input(t, MASK, UNUSED)[0], (x,))
    indices = unpad_input(x.detach(), MASK)[1]
    y = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pad_input(t, indices, 3, 5), (y,))


BAD = {
    "hidden-not-tensor": (lambda: unpad_input([[1.0]], MASK), TypeError, r"unpad_input: hidden_states must be a torch"),
    "hidden-1d": (lambda: unpad_input(torch.randn(5), MASK), ValueError, r"hidden_states must be \(batch, seqlen"),
    "mask-shape": (lambda: unpad_input(torch.randn(3, 4, 2), MASK), ValueError, r"attention_mask must have shape"),
    "mask-rank": (lambda: unpad_input(torch.randn(3, 5, 2), MASK[0]), ValueError, r"attention_mask must be 2-D"),
    "mask-float": (lambda: unpad_input(torch.randn(3, 5), MASK.float()), TypeError, r"attention_mask must be a bool"),
    "unused-shape": (
        lambda: unpad_input(torch.randn(3, 5), MASK, UNUSED[:2]),
        ValueError,
        r"unused_mask must have shape",
    ),
    "indices-len": (
        lambda: pad_input(torch.randn(4, 2), torch.arange(3), 2, 3),
        ValueError,
        r"pad_input: indices must have one entry per row",
    ),
    "indices-float": (lambda: pad_input(torch.randn(3, 2), torch.zeros(3), 2, 3), TypeError, r"indices must have"),
    "batch-neg": (lambda: pad_input(torch.randn(3, 2), torch.arange(3), -1, 3), ValueError, r"batch must be >= 0"),
    "seqlen-float": (
        lambda: pad_input(torch.randn(3, 2), torch.arange(3), 1, 3.0),
        TypeError,
        r"seqlen must be an int",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(case):
    build, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        build()


def test_index_first_axis_and_put_by_hand():
    """flash_attn.bert_padding's index helpers: a row gather and its inverse scatter into zeros, with their
    gradients (rows go back where they came from; rows not gathered get 0)."""
    from flashtron.padding import index_first_axis, index_put_first_axis

    x = torch.randn(6, 2, 3, requires_grad=True)
    indices = torch.tensor([4, 0, 5], dtype=torch.int32)
    rows = index_first_axis(x, indices)
    assert torch.equal(rows, torch.stack([x[4], x[0], x[5]]))
    grad = torch.randn(3, 2, 3)
    rows.backward(grad)
    expected = torch.zeros(6, 2, 3)
    expected[4], expected[0], expected[5] = grad[0], grad[1], grad[2]
    assert torch.equal(x.grad, expected)

    values = torch.randn(3, 4, requires_grad=True)
    put = index_put_first_axis(values, indices.long(), 6)
    assert put.shape == (6, 4) and torch.equal(put[[4, 0, 5]], values.detach())
    assert torch.equal(put[[1, 2, 3]], torch.zeros(3, 4))
    put.backward(torch.arange(24.0).reshape(6, 4))
    assert torch.equal(values.grad, torch.arange(24.0).reshape(6, 4)[[4, 0, 5]])
    assert torch.equal(index_first_axis(put.detach(), indices), values.detach())  # the two are inverses


def test_unpad_concatenated_sequences_by_hand():
    """Rows that pack several sequences from the left ([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0]]): the
    first 5 tokens of each row, and cu_seqlens over the four sequences."""
    from flashtron.padding import unpad_input_for_concatenated_sequences

    x = torch.randn(2, 6, 4)
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0]])
    hidden, indices, cu_seqlens, max_seqlen = unpad_input_for_concatenated_sequences(x, lengths)
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 2, 5, 8, 10]
    assert max_seqlen == 3 and isinstance(max_seqlen, int)
    assert torch.equal(hidden, torch.cat([x[0, :5], x[1, :5]]))
    empty = unpad_input_for_concatenated_sequences(x, torch.zeros(2, 6, dtype=torch.int64))
    assert empty[0].shape == (0, 4) and empty[2].tolist() == [0] and empty[3] == 0


def test_bert_padding_module_names():
    """`from flash_attn.bert_padding import ...` works as `from flashtron.bert_padding import ...`."""
    from flashtron import bert_padding, padding

    for name in ("unpad_input", "pad_input", "index_first_axis", "index_put_first_axis",
                 "unpad_input_for_concatenated_sequences"):  # fmt: skip
        assert getattr(bert_padding, name) is getattr(padding, name)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: __import__("flashtron").padding.index_first_axis(torch.randn(4), torch.tensor([0])), "input"),
        (lambda: __import__("flashtron").padding.index_first_axis(torch.randn(4, 2), torch.tensor([0.0])), "indices"),
        (lambda: __import__("flashtron").padding.index_put_first_axis(torch.randn(2, 2), torch.tensor([0]), 4),
         "indices"),
        (lambda: __import__("flashtron").padding.unpad_input_for_concatenated_sequences(
            torch.randn(2, 3, 4), torch.ones(2, 3)), "attention_mask_in_length"),
        (lambda: __import__("flashtron").padding.unpad_input_for_concatenated_sequences(
            torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.int64)), "attention_mask_in_length"),
    ],
)  # fmt: skip
def test_index_helpers_bad_input(call, match):
    with pytest.raises(RuntimeError, match=match) as info:
        call()
    assert isinstance(info.value, (ValueError, TypeError))
