"""flashtron.ops.cross_entropy_loss against torch.nn.functional.cross_entropy.

The reference is torch's cross entropy on fp64 copies (label smoothing and ignore_index included);
the PyTorch baseline is the same call in the input dtype. Tolerance: FlashAttention's rule
(tests/tolerance.py). Tiers: the default tier runs the PyTorch path; `-m interpret` runs the Triton
kernels on CPU tensors (vocabularies that take several 16-wide chunks and a masked tail); `-m gpu`
runs them on CUDA, where peak memory is checked too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashtron.ops import cross_entropy as ce_module
from flashtron.ops import cross_entropy_loss
from tolerance import BWD_FACTOR, assert_fa_close


@pytest.fixture(autouse=True)
def _pytorch_path_unless_interpret(request, monkeypatch):
    """Tests not marked `interpret` check the PyTorch path, even when TRITON_INTERPRET=1 is set."""
    if request.node.get_closest_marker("interpret") is None:
        monkeypatch.setenv("FLASHTRON_FORCE_CPU_PATH", "1")


def make_inputs(device, dtype, rows, vocab, ignored=(), scale=3.0):
    logits = (scale * torch.randn(rows, vocab, dtype=torch.float32)).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows,))
    labels[list(ignored)] = -100
    return logits, labels.to(device)


def check_ce(device, dtype, rows, vocab, *, ignored=(), label_smoothing=0.0, reduction="mean", ignore_index=-100):
    """Loss and dlogits against torch in fp64 (reference) and in dtype (baseline)."""
    logits, labels = make_inputs(device, dtype, rows, vocab, ignored)
    if ignore_index != -100:
        labels[labels == -100] = ignore_index
    dloss = torch.randn(rows, device=device) if reduction == "none" else torch.tensor(1.7, device=device)

    def run(fn, cast):
        leaf = logits.detach().to(cast or logits.dtype).requires_grad_()
        loss = fn(leaf, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
        loss.backward(dloss.to(loss.dtype))
        return loss.detach(), leaf.grad

    loss, dlogits = run(cross_entropy_loss, None)
    loss_ref, dlogits_ref = run(F.cross_entropy, torch.float64)
    loss_pt, dlogits_pt = run(F.cross_entropy, None)
    assert loss.dtype == torch.float32 and dlogits.dtype == dtype
    assert_fa_close(loss, loss_ref, loss_pt, name="loss")
    assert_fa_close(dlogits, dlogits_ref, dlogits_pt, factor=BWD_FACTOR, name="dlogits")
    if ignored:
        assert not dlogits[list(ignored)].any(), "ignored rows must get a zero gradient"


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------
# Default tier: the PyTorch path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cpu(dtype, reduction, label_smoothing):
    check_ce("cpu", dtype, 9, 1000, ignored=(2, 5), label_smoothing=label_smoothing, reduction=reduction)


def test_cpu_row_blocks(monkeypatch):
    # Rows are processed in blocks of _CPU_CHUNK_ELEMENTS // vocab; make that 3 rows of 72 here.
    monkeypatch.setattr(ce_module, "_CPU_CHUNK_ELEMENTS", 3 * 72 + 5)
    check_ce("cpu", torch.bfloat16, 17, 72, ignored=(16,), label_smoothing=0.2)


def test_cpu_ignore_index_inside_the_vocabulary():
    check_ce("cpu", torch.float32, 9, 40, ignored=(0, 3), ignore_index=7, reduction="sum")


def test_cpu_all_ignored_is_nan_like_torch():
    logits = torch.randn(3, 40, requires_grad=True)
    labels = torch.full((3,), -100)
    assert torch.isnan(cross_entropy_loss(logits, labels)) and torch.isnan(F.cross_entropy(logits, labels))
    cross_entropy_loss(logits, labels, reduction="sum").backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_cpu_gradcheck(label_smoothing):
    logits = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 12, -100, 4, 4])
    fn = lambda z: cross_entropy_loss(z, labels, label_smoothing=label_smoothing, reduction="none")
    assert torch.autograd.gradcheck(fn, logits)


def check_inplace_backward(device):
    logits, labels = make_inputs(device, torch.bfloat16, 6, 40, ignored=(1,))
    expected_grad = torch.func.grad(lambda z: F.cross_entropy(z.double(), labels))(logits.float())
    leaf = logits.clone().requires_grad_()
    buffer = leaf * 1.0  # a non-leaf whose storage the backward may take over
    seen = []
    buffer.register_hook(seen.append)
    cross_entropy_loss(buffer, labels, inplace_backward=True).backward()
    assert seen[0].data_ptr() == buffer.data_ptr(), "dlogits must be written over the logits buffer"
    torch.testing.assert_close(leaf.grad.float(), expected_grad.float(), rtol=1e-2, atol=1e-3)


def test_cpu_inplace_backward():
    check_inplace_backward("cpu")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(logits=torch.randn(4, 10, 2)), ValueError, "logits must be 2-D"),
        (dict(logits=torch.randn(4, 10).int()), TypeError, "logits must have dtype"),
        (dict(labels=torch.zeros(4)), TypeError, "labels must have dtype"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, r"labels must have shape \(4,\)"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(ignore_index=1.0), TypeError, "ignore_index must be an int"),
        (dict(logits=torch.randn(4, 0)), ValueError, "vocab_size >= 1"),
    ],
)
def test_validation(kwargs, error, match):
    args = dict(logits=torch.randn(4, 10), labels=torch.zeros(4, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        cross_entropy_loss(**args)


# ---------------------------------------------------------------------------------------------
# Interpreter tier: the Triton kernels on CPU tensors (TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_kernel(kernel_device, dtype, label_smoothing):
    # vocab 40 = 2 full chunks of 16 and a masked tail of 8.
    check_ce(kernel_device, dtype, 5, 40, ignored=(3,), label_smoothing=label_smoothing)
    check_ce(kernel_device, dtype, 3, 7, reduction="none", label_smoothing=label_smoothing)


@pytest.mark.interpret
def test_kernel_int32_labels_and_ignore_inside(kernel_device):
    logits, labels = make_inputs(kernel_device, torch.float32, 5, 33)
    labels[1] = 4
    loss = cross_entropy_loss(logits, labels.int(), ignore_index=4, reduction="none")
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, ignore_index=4, reduction="none"))


@pytest.mark.interpret
def test_kernel_inplace_backward(kernel_device):
    check_inplace_backward(kernel_device)


# ---------------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("vocab", [32000, 50257, 128256])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_gpu(dtype, vocab, label_smoothing):
    check_ce("cuda", dtype, 512, vocab, ignored=(0, 100, 511), label_smoothing=label_smoothing)


@pytest.mark.gpu
def test_gpu_reductions():
    for reduction in ("sum", "none"):
        check_ce("cuda", torch.bfloat16, 1000, 4099, ignored=(7,), reduction=reduction)


@pytest.mark.gpu
def test_gpu_no_fp32_copy_of_the_logits():
    rows, vocab = 2048, 128256
    logits, labels = make_inputs("cuda", torch.bfloat16, rows, vocab, ignored=(5,))
    logits.requires_grad_()
    fp32_copy = rows * vocab * 4
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = cross_entropy_loss(logits, labels)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < fp32_copy // 16, "the forward made a large temporary"
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    # The backward allocates dlogits (rows * vocab in bf16, half of an fp32 copy) and little else.
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < fp32_copy // 2 + fp32_copy // 16, f"backward peak {extra} bytes"


@pytest.mark.gpu
def test_gpu_inplace_backward():
    check_inplace_backward("cuda")
