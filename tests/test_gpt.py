"""The GPT model: presets, the training loss, cached generation against recomputation, CUDA graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashtron.models import GPT, PRESETS, GPTConfig
from flashtron.nn import set_attention_backend

TINY = ["tiny-gpt2", "tiny-llama"]


def test_presets():
    sizes = {}
    for name in ("gpt2-small", "llama-small"):
        model = GPT(GPTConfig.from_name(name), device="meta")  # no memory, no init cost
        sizes[name] = sum(p.numel() for p in model.parameters())
    assert 124e6 < sizes["gpt2-small"] < 125e6  # GPT-2 small, tied embeddings, vocab padded to 50304
    llama = GPTConfig.from_name("llama-small")
    assert llama.n_head_kv < llama.n_head and llama.rotary_dim == llama.head_dim and llama.gated_mlp
    assert GPTConfig.from_name("tiny-llama", n_layer=3).n_layer == 3
    assert set(TINY) <= set(PRESETS)
    with pytest.raises(ValueError, match="name"):
        GPTConfig.from_name("gpt5")


@pytest.mark.parametrize("name", TINY)
def test_loss_is_cross_entropy_and_decreases(name):
    model = GPT(GPTConfig.from_name(name))
    idx = torch.randint(0, model.config.vocab_size, (4, 32))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100  # ignored
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 32, model.config.vocab_size)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_generate_with_cache_equals_recompute(name):
    model = GPT(GPTConfig.from_name(name)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (3, 7))
    cached = model.generate(prompt, 20, greedy=True)
    recomputed = model.generate(prompt, 20, greedy=True, use_cache=False)
    assert cached.shape == (3, 27) and torch.equal(cached[:, :7], prompt)
    assert torch.equal(cached, recomputed)
    # and the cached logits themselves match the full forward at every generated position
    cache = model.allocate_kv_cache(3, 27)
    step_logits = [model(cached[:, :7], kv_cache=cache)[:, -1]]
    for t in range(7, 26):
        step_logits.append(model(cached[:, t : t + 1], kv_cache=cache)[:, -1])
    full = model(cached[:, :26])[:, 6:]
    torch.testing.assert_close(torch.stack(step_logits, dim=1), full, rtol=1e-4, atol=1e-5)


def test_generate_sampling():
    model = GPT(GPTConfig.from_name("tiny-llama")).eval()
    prompt = torch.randint(0, 96, (2, 4))
    torch.manual_seed(1)
    a = model.generate(prompt, 10, temperature=0.8, top_k=5)
    torch.manual_seed(1)
    b = model.generate(prompt, 10, temperature=0.8, top_k=5)
    assert torch.equal(a, b)
    assert torch.equal(model.generate(prompt, 10, top_k=1), model.generate(prompt, 10, greedy=True))
    # top_k: every sampled token is among the 5 most likely ones under its prefix
    logits = model(a[:, :-1])[:, 3:]
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == a[:, 4:, None]).any(-1).all()
    with pytest.raises(ValueError, match="max_seqlen"):
        model.generate(prompt, 61)


def test_attention_backends_agree():
    model = GPT(GPTConfig.from_name("tiny-llama", window_size=(6, -1))).eval()
    idx = torch.randint(0, 96, (2, 20))
    ref = model(idx)
    for backend in ("sdpa", "standard"):
        torch.testing.assert_close(set_attention_backend(model, backend)(idx), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", TINY + ["llama-small"])
def test_cuda_graph_decode_equals_eager(name):
    config = GPTConfig.from_name(name, n_layer=2) if name == "llama-small" else GPTConfig.from_name(name)
    model = GPT(config, device="cuda", dtype=torch.bfloat16).eval()
    prompt = torch.randint(0, config.vocab_size, (4, 9), device="cuda")
    eager = model.generate(prompt, 40, greedy=True)
    graphed = model.generate(prompt, 40, greedy=True, use_cuda_graph=True)
    assert torch.equal(eager, graphed)
    torch.manual_seed(3)
    eager = model.generate(prompt, 40, top_k=20)
    torch.manual_seed(3)
    graphed = model.generate(prompt, 40, top_k=20, use_cuda_graph=True)
    assert torch.equal(eager, graphed)


@pytest.mark.gpu
def test_gpu_training_step_matches_cpu():
    config = GPTConfig.from_name("tiny-llama")
    cpu_model = GPT(config)
    gpu_model = GPT(config, device="cuda")
    gpu_model.load_state_dict(cpu_model.state_dict())
    idx = torch.randint(0, config.vocab_size, (2, 48))
    _, loss_cpu = cpu_model(idx, idx)
    _, loss_gpu = gpu_model(idx.cuda(), idx.cuda())
    loss_cpu.backward()
    loss_gpu.backward()
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-4, atol=1e-4)
    for (name, p_cpu), p_gpu in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_train_demo_quick(tmp_path):
    from flashtron import train_demo

    out = tmp_path / "demo.md"
    argv = ["--quick", "--steps", "2", "--seqlen", "32", "--search-limit", "128", "--out", str(out)]
    assert train_demo.main(argv) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["flashtron", "sdpa", "standard"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert float(cells[1].replace(",", "")) > 0  # tokens/s
        assert cells[4] == ">= 128 (limit)"  # 32, 64, 128 all ran; CPU memory is not the limit here
    with pytest.raises(SystemExit):
        train_demo.main(["--quick", "--backends", "flash"])
