"""torch.compile: the library ops (attention's in flashtron.autograd, inference's, the layers') pass
torch.library.opcheck, the attention op path matches the eager Function bit for bit, and the public
functions compile with fullgraph=True and dynamic shapes (one graph for several seqlens)."""

from __future__ import annotations

import pytest
import torch

import flashtron
import flashtron.autograd
import flashtron.ops  # registers the library ops of rotary, norm and cross entropy
from flashtron.autograd import _op_args, attn_bwd, attn_fwd
from flashtron.inference import combine_op, kvcache_attn
from flashtron.options import AttnOptions, options_to_args


@pytest.fixture
def fresh_dynamo():
    """Each compile test starts and ends with Dynamo's caches empty (no graph reused across tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _qkv(shape_q, shape_kv, requires_grad=True):
    q = torch.randn(*shape_q, requires_grad=requires_grad)
    k = torch.randn(*shape_kv, requires_grad=requires_grad)
    v = torch.randn(*shape_kv, requires_grad=requires_grad)
    return q, k, v


def _fwd_args(q, k, v, opts, cu_q=None, cu_k=None, max_q=None, max_k=None, seqused_k=None):
    varlen = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, seqused_k=seqused_k)
    return (q, k, v, *_op_args(opts, None, varlen))  # None: no dropout seed


def _op_path_attention(q, k, v, opts):
    """flashtron.autograd.attention taking its torch.compile branch (the library ops), run eagerly."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        return flashtron.autograd.attention(q, k, v, opts)


OPTION_CASES = {
    "plain": AttnOptions(softmax_scale=0.35),
    "causal-window": AttnOptions(softmax_scale=0.35, window_left=3, window_right=0),
    "softcap-alibi": AttnOptions(softmax_scale=0.35, softcap=2.0, alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 0.05])),
    "sink": AttnOptions(softmax_scale=0.35, learnable_sink=torch.randn(4, requires_grad=True)),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_opcheck_dense(case):
    opts = OPTION_CASES[case]
    q, k, v = _qkv((2, 7, 4, 8), (2, 11, 2, 8))
    torch.library.opcheck(attn_fwd, _fwd_args(q, k, v, opts))


def test_opcheck_varlen_and_backward():
    opts = AttnOptions(softmax_scale=0.35, window_right=0)
    q, k, v = _qkv((10, 4, 8), (13, 2, 8))
    cu_q = torch.tensor([0, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 13], dtype=torch.int32)
    args = _fwd_args(q, k, v, opts, cu_q, cu_k, 7, 7)
    torch.library.opcheck(attn_fwd, args)
    out, lse = attn_fwd(*args)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    bwd_args = (dout, dlse, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), *args[3:])
    torch.library.opcheck(attn_bwd, bwd_args)


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_custom_op_equals_autograd_path(case):
    opts = OPTION_CASES[case]
    q, k, v = _qkv((2, 9, 4, 8), (2, 9, 2, 8))
    params = [q, k, v] + ([opts.learnable_sink] if opts.learnable_sink is not None else [])
    results = []
    for attention in (_op_path_attention, flashtron.autograd.attention):
        out, lse, _ = attention(q, k, v, opts)
        loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum() + lse.sin().sum()  # lse's gradient too
        results.append((out, lse, *torch.autograd.grad(loss, params)))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_compiled_custom_op_dynamic_shapes():
    """The ops alone (no public-API checks on the way): one graph serves every seqlen."""
    torch._dynamo.reset()
    opts = AttnOptions(softmax_scale=0.35, window_left=4, window_right=0)

    def fn(q, k, v):
        out, lse, _ = flashtron.autograd.attention(q, k, v, opts)
        return out * 2, lse

    counters = torch._dynamo.utils.counters
    counters.clear()
    fn_c = torch.compile(fn, fullgraph=True, dynamic=True)
    for seqlen in (5, 12, 17):
        q, k, v = _qkv((2, seqlen, 4, 8), (2, seqlen + 4, 2, 8))  # sizes unlike the others: no duck sizing
        ours = fn_c(q, k, v)
        ref = fn(q, k, v)
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
        grads = torch.autograd.grad(ours[0].sum() + ours[1].sum(), (q, k, v))
        grads_ref = torch.autograd.grad(ref[0].sum() + ref[1].sum(), (q, k, v))
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_public_functions(fresh_dynamo, dynamic):
    """flash_attn_func and flash_attn_varlen_func under torch.compile(fullgraph=True); no graph breaks
    (fullgraph raises on one) and eager's results."""

    def dense(q, k, v):
        return flashtron.flash_attn_func(q, k, v, causal=True, window_size=(3, -1), softcap=1.5)

    def varlen(q, k, v, cu, max_seqlen):
        return flashtron.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)

    dense_c = torch.compile(dense, fullgraph=True, dynamic=dynamic)
    varlen_c = torch.compile(varlen, fullgraph=True, dynamic=dynamic)
    for seqlen in (6, 13):
        q, k, v = _qkv((2, seqlen, 4, 8), (2, seqlen, 2, 8))
        out, ref = dense_c(q, k, v), dense(q, k, v)
        assert torch.equal(out, ref)
        for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
            assert torch.equal(a, b)
    for lens in ((3, 7), (5, 1, 9)):
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        q, k, v = _qkv((sum(lens), 4, 8), (sum(lens), 2, 8))
        assert torch.equal(varlen_c(q, k, v, cu, max(lens)), varlen(q, k, v, cu, max(lens)))


def test_compiled_graph_holds_the_attention_ops(fresh_dynamo):
    """Under torch.compile the public functions reach attention as the flashtron library ops (the hook in
    flashtron.autograd.attention), not as a trace through the autograd Function and its launchers."""
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    def dense(q, k, v):
        return flashtron.flash_attn_func(q, k, v, causal=True)

    q, k, v = _qkv((2, 5, 4, 8), (2, 5, 2, 8))
    torch.compile(dense, fullgraph=True, backend=recording_backend)(q, k, v)
    assert any("flashtron.attn_fwd" in t for t in targets), targets


@pytest.mark.gpu
def test_compiled_gpu_training_step(fresh_dynamo):
    """As the CPU test below, with every op on its Triton kernels (fp32 inputs, IEEE dots)."""
    torch._dynamo.reset()
    loss, loss_ref, grads, grads_ref = _training_step_grads("cuda")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def _norm_outputs(x, residual, weight, bias, is_rms, residual_dtype, store_h):
    return torch.ops.flashtron.norm_fwd(x, residual, weight, bias, 1e-5, is_rms, residual_dtype, store_h)


@pytest.mark.parametrize("is_rms", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck_norm(is_rms, residual):
    x, w, b = torch.randn(6, 16), torch.randn(16), torch.randn(16)
    res = torch.randn(6, 16) if residual else None
    bias = None if is_rms else b
    fwd_args = (x, res, w, bias, 1e-5, is_rms, torch.float32, residual)
    torch.library.opcheck(torch.ops.flashtron.norm_fwd.default, fwd_args)
    y, h, mean, rstd = _norm_outputs(x, res, w, bias, is_rms, torch.float32, residual)
    saved = h if residual else x
    bwd_args = (torch.randn_like(y), None, saved, w, bias, None if is_rms else mean, rstd, is_rms, torch.float32)
    torch.library.opcheck(torch.ops.flashtron.norm_bwd.default, (*bwd_args, torch.float32 if residual else None))


@pytest.mark.parametrize("offsets", ["int", "tensor", "varlen"])
def test_opcheck_rotary(offsets):
    cos, sin = torch.rand(12, 3), torch.rand(12, 3)
    if offsets == "varlen":
        x, cu = torch.randn(9, 2, 8), torch.tensor([0, 4, 9], dtype=torch.int32)
        args = (x, cos, sin, False, 1, None, cu, 5, False)
    elif offsets == "tensor":
        args = (torch.randn(2, 5, 3, 8), cos, sin, True, 0, torch.tensor([0, 3]), None, None, True)
    else:
        args = (torch.randn(2, 5, 3, 8), cos, sin, False, 2, None, None, None, False)
    torch.library.opcheck(torch.ops.flashtron.rotary.default, args)


def test_opcheck_cross_entropy():
    logits, labels = torch.randn(7, 11), torch.tensor([1, 0, -100, 10, 3, 3, 5])
    fwd_args = (logits, labels, -100, 0.1)
    torch.library.opcheck(torch.ops.flashtron.cross_entropy_fwd.default, fwd_args)
    _, lse = torch.ops.flashtron.cross_entropy_fwd(*fwd_args)
    torch.library.opcheck(
        torch.ops.flashtron.cross_entropy_bwd.default, (torch.randn(7), logits, labels, lse, -100, 0.1)
    )


def _training_step_grads(device):
    """Eager and compiled (fullgraph: no graph break) loss and gradients of one tiny-llama step."""
    from flashtron.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny-llama"), device=device)
    idx = torch.randint(0, 96, (2, 64), device=device)
    _, loss_ref = model(idx, idx)
    grads_ref = torch.autograd.grad(loss_ref, list(model.parameters()))
    step = torch.compile(lambda i: model(i, i)[1], dynamic=False, fullgraph=True)
    loss = step(idx)
    return loss, loss_ref, torch.autograd.grad(loss, list(model.parameters())), grads_ref


def test_compiled_cpu_training_step():
    """The whole model under fullgraph=True: attention, rotary, norms and cross entropy go through
    their library ops; Inductor compiles the rest, so agreement is to rounding, not bitwise."""
    torch._dynamo.reset()
    loss, loss_ref, grads, grads_ref = _training_step_grads("cpu")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _kvcache_inputs(paged: bool, device="cpu", dtype=torch.float32):
    torch.manual_seed(1)
    with torch.device(device):
        tensors = _kvcache_tensors(paged)
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def _kvcache_tensors(paged: bool):
    b, h, hk, d, page = 2, 4, 2, 8, 4
    q = torch.randn(b, 2, h, d)
    k_new, v_new = torch.randn(b, 2, hk, d), torch.randn(b, 2, hk, d)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    cos, sin = torch.rand(16, 2), torch.rand(16, 2)
    if paged:
        k_cache, v_cache = torch.randn(8, page, hk, d), torch.randn(8, page, hk, d)
        table = torch.tensor([[3, 0, 6], [1, 7, 2]], dtype=torch.int32)
    else:
        k_cache, v_cache, table = torch.randn(b, 12, hk, d), torch.randn(b, 12, hk, d), None
    return q, k_cache, v_cache, k_new, v_new, cos, sin, lens, table


@pytest.mark.parametrize("paged", [False, True])
def test_opcheck_kvcache(paged):
    q, k_cache, v_cache, k_new, v_new, cos, sin, lens, table = _kvcache_inputs(paged)
    opts = AttnOptions(softmax_scale=0.35, window_right=0)
    args = (q, k_cache, v_cache, k_new, v_new, cos, sin, lens, None, None, table, *options_to_args(opts), False, 0)
    torch.library.opcheck(kvcache_attn, args)


def test_opcheck_combine():
    out_partial, lse_partial = torch.randn(3, 2, 4, 5, 8), torch.randn(3, 2, 4, 5)
    lse_partial[:, 0, 1] = float("-inf")  # a row that no split saw
    torch.library.opcheck(combine_op, (out_partial, lse_partial, torch.float16))


@pytest.mark.parametrize(
    "device, dtype", [("cpu", torch.float32), pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)]
)
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("paged", [False, True])
def test_compiled_kvcache_and_combine(paged, dynamic, device, dtype):
    """flash_attn_with_kvcache (append with rotary, causal, GQA) and flash_attn_combine under
    fullgraph=True: eager's outputs, and the same cache contents after the in-place append."""
    torch._dynamo.reset()

    def step(q, k_cache, v_cache, k_new, v_new, cos, sin, lens, table):
        out, lse = flashtron.flash_attn_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens,
            block_table=table, causal=True, rotary_interleaved=False, return_softmax_lse=True,
        )  # fmt: skip
        # two "splits" that are the same result: the combine gives it back
        merged, merged_lse = flashtron.flash_attn_combine(
            torch.stack([out, out]).float(), torch.stack([lse, lse]).transpose(-1, -2).contiguous(), out_dtype=q.dtype
        )
        return out, lse, merged, merged_lse

    inputs = _kvcache_inputs(paged, device, dtype)
    eager_inputs = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
    ours = torch.compile(step, fullgraph=True, dynamic=dynamic)(*inputs)
    ref = step(*eager_inputs)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    torch.testing.assert_close(ours[2], ours[0])  # two equal splits merge into themselves
    for a, b in zip(inputs[1:3], eager_inputs[1:3]):  # the appended caches
        assert torch.equal(a, b)


def test_compiled_combine_into_given_out():
    """flash_attn_combine(out=...) under fullgraph=True writes the caller's tensor, as eager does."""
    torch._dynamo.reset()
    out_partial, lse_partial = torch.randn(3, 2, 4, 5, 8), torch.randn(3, 2, 4, 5)
    lse_partial[:, 1, 2] = float("-inf")

    def merge(out_partial, lse_partial, out):
        result, lse = flashtron.flash_attn_combine(out_partial, lse_partial, out=out, out_dtype=torch.bfloat16)
        return result, lse

    out, out_ref = torch.empty(2, 4, 5, 8, dtype=torch.bfloat16), torch.empty(2, 4, 5, 8, dtype=torch.bfloat16)
    result, lse = torch.compile(merge, fullgraph=True)(out_partial, lse_partial, out)
    result_ref, lse_ref = merge(out_partial, lse_partial, out_ref)
    assert torch.equal(out, out_ref) and torch.equal(result, result_ref) and torch.equal(lse, lse_ref)
    assert torch.all(out[1, 2] == 0) and torch.isneginf(lse[1, 2]).all()


def test_compiled_training_step_dynamic_seqlen():
    """dynamic=True: one graph serves every seqlen of the GPT (rotary tables are not rounded to a
    pinned size under tracing), with eager's loss and gradients at each."""
    from flashtron.models import GPT, GPTConfig

    torch._dynamo.reset()
    model = GPT(GPTConfig.from_name("tiny-llama"))
    counters = torch._dynamo.utils.counters
    counters.clear()
    step = torch.compile(lambda i: model(i, i)[1], dynamic=True, fullgraph=True)
    for seqlen in (32, 48, 17):
        idx = torch.randint(0, 96, (2, seqlen))
        loss, loss_ref = step(idx), model(idx, idx)[1]
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for a, b in zip(grads, torch.autograd.grad(loss_ref, list(model.parameters()))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
