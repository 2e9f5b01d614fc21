"""A GPT in one sitting: config presets, a training forward, and cached generation (optionally in a CUDA graph).

GPT-2 style (learned positions, LayerNorm, GELU MLP) and Llama style (rotary, RMSNorm, SwiGLU, GQA)
are the same model with different config fields. Attention runs on flashtron (flash_attn_func for
training, flash_attn_with_kvcache for generation), norms and the loss on flashtron.ops.

Context parallelism: `GPT(config, context_parallel=ContextParallel(group, "zigzag"))` (or
`flashtron.nn.set_context_parallel` later) makes forward take this rank's shard of idx and targets
(flashtron.distributed.shard_sequence); positions are global and attention is ring attention over
the group. The loss is the mean over this rank's tokens, so average it, and the gradients, over
the group (equal shards: the mean of the means is the full mean).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from flashtron.nn import MHA, MLP, Block, ContextParallel, GatedMLP, KVCache, LayerNorm, RMSNorm, set_context_parallel
from flashtron.ops import cross_entropy_loss


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 50304
    max_seqlen: int = 1024  # learned positions and the longest generation
    n_layer: int = 12
    n_head: int = 12
    n_head_kv: int | None = None  # GQA when < n_head
    n_embd: int = 768
    mlp_hidden: int | None = None  # default 4 * n_embd, or 8/3 * n_embd rounded to 128 when gated
    gated_mlp: bool = False  # SwiGLU
    rms_norm: bool = False
    norm_eps: float = 1e-5
    rotary_dim: int = 0  # 0: learned absolute positions
    rotary_base: float = 10000.0
    bias: bool = True
    tie_embeddings: bool = True
    causal: bool = True
    window_size: tuple[int, int] = (-1, -1)
    dropout: float = 0.0  # attention dropout

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        """A preset (see PRESETS) with some fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"GPTConfig.from_name: name must be one of {sorted(PRESETS)}, got {name!r}")
        return dataclasses.replace(PRESETS[name], **overrides)


_LLAMA = dict(gated_mlp=True, rms_norm=True, norm_eps=1e-6, bias=False, tie_embeddings=False)
PRESETS = {
    "gpt2-small": GPTConfig(),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "llama-small": GPTConfig(  # 125M (untied embeddings), head dim 64, 3 query heads per KV head
        vocab_size=32000, max_seqlen=2048, n_head_kv=4, rotary_dim=64, rotary_base=500000.0, **_LLAMA
    ),
    "tiny-gpt2": GPTConfig(vocab_size=96, max_seqlen=64, n_layer=2, n_head=4, n_embd=32),
    "tiny-llama": GPTConfig(
        vocab_size=96, max_seqlen=64, n_layer=2, n_head=4, n_head_kv=2, n_embd=32, rotary_dim=8, **_LLAMA
    ),
}


class GPT(torch.nn.Module):
    """Decoder-only transformer. forward(idx, targets=None, kv_cache=None); generate(idx, ...)."""

    def __init__(self, config: GPTConfig, device=None, dtype=None, context_parallel: ContextParallel | None = None):
        super().__init__()
        c, factory = config, dict(device=device, dtype=dtype)
        self.context_parallel = None
        if c.n_embd % c.n_head:
            raise ValueError(f"GPT: n_embd ({c.n_embd}) must be a multiple of n_head ({c.n_head})")
        self.config = c
        self.wte = torch.nn.Embedding(c.vocab_size, c.n_embd, **factory)
        self.wpe = torch.nn.Embedding(c.max_seqlen, c.n_embd, **factory) if c.rotary_dim == 0 else None
        norm = functools.partial(RMSNorm if c.rms_norm else LayerNorm, eps=c.norm_eps, **factory)
        if c.gated_mlp:
            mlp = functools.partial(GatedMLP, hidden_features=c.mlp_hidden, bias1=c.bias, bias2=c.bias, **factory)
        else:
            mlp = functools.partial(MLP, hidden_features=c.mlp_hidden, bias1=c.bias, bias2=c.bias, **factory)

        def mixer(dim, i):
            return MHA(dim, c.n_head, c.n_head_kv, qkv_proj_bias=c.bias, out_proj_bias=c.bias, dropout=c.dropout,
                       causal=c.causal, window_size=c.window_size, rotary_emb_dim=c.rotary_dim,
                       rotary_emb_base=c.rotary_base, layer_idx=i, **factory)  # fmt: skip

        self.blocks = torch.nn.ModuleList(
            Block(c.n_embd, functools.partial(mixer, i=i), mlp, norm, residual_in_fp32=True) for i in range(c.n_layer)
        )
        self.ln_f = norm(c.n_embd)
        self.lm_head = torch.nn.Linear(c.n_embd, c.vocab_size, bias=False, **factory)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("out_proj.weight", "fc2.weight")):
                torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.n_layer))
        set_context_parallel(self, context_parallel)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx: (batch_size, seqlen) int64 -> final normed hidden states (batch_size, seqlen, n_embd).
        With kv_cache, the tokens continue each cached row and the cache advances by seqlen."""
        seqlen = idx.shape[1]
        h = self.wte(idx)
        if self.wpe is not None:
            pos = torch.arange(seqlen, device=idx.device)
            if self.context_parallel is not None:  # a shard: its tokens' global positions
                pos = self.context_parallel.positions(seqlen, idx.device)
            if kv_cache is not None:  # per-row positions read on the device: no host sync
                pos = kv_cache.cache_seqlens[:, None].long() + pos
            h = h + self.wpe(pos)
        residual = None
        for block in self.blocks:
            h, residual = block(h, residual, kv_cache=kv_cache) if kv_cache is not None else block(h, residual)
        if kv_cache is not None:
            kv_cache.advance(seqlen)
        return self.ln_f(h, residual=residual)

    def forward(self, idx, targets=None, kv_cache=None):
        """idx: (batch_size, seqlen) int64. Returns logits (batch_size, seqlen, vocab_size), or
        (logits, loss) when targets (batch_size, seqlen) int64 are given (-100 ignored). Under
        context parallelism idx, targets and logits are this rank's shards."""
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"GPT: idx must be (batch_size, seqlen) int64, got {tuple(idx.shape)} {idx.dtype}")
        seqlen = idx.shape[1]
        if self.context_parallel is not None:
            if kv_cache is not None:
                raise ValueError("GPT: kv_cache does not work with context_parallel (generation is not sharded)")
            seqlen *= self.context_parallel.world()
        if self.wpe is not None and kv_cache is None and seqlen > self.config.max_seqlen:
            raise ValueError(f"GPT: seqlen must be <= max_seqlen = {self.config.max_seqlen}, got {seqlen}")
        logits = self.lm_head(self.hidden_states(idx, kv_cache))
        if targets is None:
            return logits
        loss = cross_entropy_loss(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def allocate_kv_cache(self, batch_size: int, max_seqlen: int) -> KVCache:
        c, weight = self.config, self.lm_head.weight
        n_head_kv = c.n_head_kv or c.n_head
        return KVCache(
            c.n_layer, batch_size, max_seqlen, n_head_kv, c.head_dim, device=weight.device, dtype=weight.dtype
        )

    @torch.no_grad()
    def generate(
        self, idx, max_new_tokens, temperature=1.0, top_k=None, greedy=False, use_cuda_graph=False, use_cache=True
    ):
        """Appends max_new_tokens sampled tokens to idx (batch_size, seqlen) int64; returns
        (batch_size, seqlen + max_new_tokens). greedy (or temperature 0) takes the argmax; top_k
        keeps the k largest logits. use_cache=False recomputes the whole prefix at every step.
        use_cuda_graph (CUDA): the one-token decode step is captured once and replayed."""
        batch, prompt = idx.shape
        total = prompt + max_new_tokens
        if max_new_tokens < 0 or total > self.config.max_seqlen:
            raise ValueError(
                f"GPT.generate: seqlen + max_new_tokens must be in [seqlen, max_seqlen = {self.config.max_seqlen}], "
                f"got {prompt} + {max_new_tokens}"
            )
        out = idx.new_empty(batch, total)
        out[:, :prompt] = idx
        if max_new_tokens == 0:
            return out
        sample = functools.partial(_sample, temperature=temperature, top_k=top_k, greedy=greedy)
        if not use_cache:
            for t in range(prompt, total):
                out[:, t] = sample(self(out[:, :t])[:, -1])
            return out
        cache = self.allocate_kv_cache(batch, total)
        logits = self._last_logits(idx, cache)  # prefill
        step = functools.partial(self._last_logits, kv_cache=cache)
        if use_cuda_graph and idx.is_cuda and max_new_tokens > 1:
            step = self._graphed_step(cache, idx.new_zeros(batch, 1))
        for t in range(prompt, total):
            out[:, t] = sample(logits)
            if t + 1 < total:
                logits = step(out[:, t : t + 1])
        return out

    def _last_logits(self, idx, kv_cache):
        return self.lm_head(self.hidden_states(idx, kv_cache)[:, -1])

    def _graphed_step(self, cache: KVCache, static_idx):
        """The decode step captured in a CUDA graph: static input/output buffers, cache_seqlens read
        and advanced on the device. Warm-up runs (which compile the kernels) write one garbage
        position that the first real step overwrites; cache_seqlens is restored after them."""
        saved = cache.cache_seqlens.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._last_logits(static_idx, cache)
                cache.cache_seqlens.copy_(saved)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = self._last_logits(static_idx, cache)

        def step(tokens):
            static_idx.copy_(tokens)
            graph.replay()
            return static_logits

        return step


def _sample(logits, temperature=1.0, top_k=None, greedy=False):
    """logits: (batch_size, vocab_size) -> (batch_size,) int64, without host syncs."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # argmax(p / E) with E ~ Exp(1) draws from p (a race of exponential clocks), with no multinomial sync
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1)
