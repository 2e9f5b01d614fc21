"""What importing flashtron costs, and what works without triton: `import flashtron` loads no triton
and touches no GPU; the layers, the GPT (training step and generation) and the ops' PyTorch paths
run on a machine where triton is not installed at all (macOS, Windows)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_loads_no_triton_and_no_cuda():
    out = _run(
        """
        import sys, torch
        import flashtron
        print("triton" in sys.modules, torch.cuda.is_initialized())
        """
    )
    assert out.split() == ["False", "False"]


def test_cpu_paths_work_without_triton():
    out = _run(
        """
        import sys
        sys.modules["triton"] = None  # every `import triton` now raises ImportError
        import torch
        import flashtron
        from flashtron.models import GPT, GPTConfig
        from flashtron.ops import apply_rotary_emb, cross_entropy_loss, rms_norm

        torch.manual_seed(0)
        model = GPT(GPTConfig.from_name("tiny-llama"))
        idx = torch.randint(0, 96, (2, 16))
        _, loss = model(idx, idx)
        loss.backward()
        out = model.generate(idx[:, :4], max_new_tokens=3, greedy=True)
        x = torch.randn(2, 5, 3, 8)
        apply_rotary_emb(x, torch.rand(5, 4), torch.rand(5, 4))
        rms_norm(x, torch.ones(8), residual=x)
        cross_entropy_loss(torch.randn(4, 7), torch.tensor([0, 6, 3, -100]))
        flashtron.flash_attn_func(x, x, x, causal=True)
        print("ok", tuple(out.shape), bool(torch.isfinite(loss)))
        """
    )
    assert out.split() == ["ok", "(2,", "7)", "True"]
