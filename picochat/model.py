"""The picochat Transformer: one decoder-only model for the GPT-2 and Llama families.

Read top to bottom: norms -> rotary positions -> attention -> MLP -> block -> GPT.
The attention formula and the pre-training loss each live here, once.
Which family a model belongs to is decided only by ModelConfig switches (config.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


# ----------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w   (Llama, Qwen2). Computed in float32 for stability."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)  # GPT-2: y = (x - mean) / std · w + b


# ----------------------------------------------------------------------------- rotary positions
def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies θ_i = base^(-2i/d) of RoPE, with Llama 3's long-context rescaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    s = config.rope_scaling
    if s:  # "llama3": slow down low frequencies by `factor`, keep high ones, blend in between
        factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, blended))
    return inv_freq


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+d/2}) pair by position·θ_i (the HF 'rotate_half' layout)."""
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of every layer for positions already seen, so each new token costs one step.

    Preallocated to `max_len` positions; `length` is how many are filled (the same for every row).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype, device="cpu"):
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k, v):
        """Store this step's keys/values at positions [length, length+T); return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def crop(self, length: int):
        """Forget positions from `length` on (e.g. to reuse a shared prompt prefix)."""
        self.length = min(self.length, length)


# ----------------------------------------------------------------------------- attention
class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.out_bias)

    def forward(self, x, rope: tuple | None, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k, v)
        # Causal mask: query i (at absolute position past+i) sees keys 0..past+i.
        if T == 1:
            mask, causal = None, False           # one new token sees every cached key
        elif past == 0:
            mask, causal = None, True            # plain prefill: the standard lower triangle
        else:                                     # a chunk appended after cached positions
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        # Attention(Q, K, V) = softmax(Q·Kᵀ / √d_k) · V   (grouped-query: each K/V head serves n_head/n_kv_head Q heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


# ----------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """SwiGLU (Llama): down(silu(gate(x)) · up(x)).  GELU (GPT-2): down(gelu(up(x)))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.mlp_bias)
        self.gelu_approx = "none" if config.extra.get("activation_function") == "gelu" else "tanh"

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.gelu_approx))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache):
        x = x + self.attn(self.attn_norm(x), rope, cache)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------- the model
class GPT(nn.Module):
    """Decoder-only Transformer: tokens -> embeddings -> N blocks -> norm -> logits over the vocabulary."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.pos_embed = nn.Embedding(config.max_seq_len, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        # A tied head reuses the embedding matrix, so it owns no parameter (and no state-dict key).
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.position == "rope":
            self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        if self.embed.weight.device.type != "meta":  # built on "meta" to be filled from a checkpoint
            self.init_weights()

    def init_weights(self):
        """GPT-2's initialisation: N(0, 0.02), zero biases, residual projections scaled by 1/√(2·n_layer)."""
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=self.config.initializer_range / math.sqrt(2 * self.config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        dtype = self.embed.weight.dtype
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, dtype, self.embed.weight.device)

    def rope_cos_sin(self, positions: torch.Tensor, dtype):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, head_dim/2): position·θ_i
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, last_only: bool = False):
        """idx (B, T) token ids -> (logits, loss).

        targets (B, T) gives the next-token loss (positions marked -100 are ignored).
        kv_cache continues from the positions it holds; last_only returns logits of the last position only.
        """
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds the context length {self.config.max_seq_len}")
        positions = torch.arange(past, past + T, device=idx.device)
        x = self.embed(idx)
        rope = None
        if self.config.position == "learned":
            x = x + self.pos_embed(positions)
        else:
            rope = self.rope_cos_sin(positions, x.dtype)
        for block in self.layers:
            x = block(x, rope, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.norm(x)
        if last_only:
            x = x[:, -1:, :]
        logits = F.linear(x, self.embed.weight if self.lm_head is None else self.lm_head.weight)
        loss = None
        if targets is not None:
            # L(θ) = E[−log p_θ(y|x)]: mean negative log-likelihood of each next token y given its prefix x
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)
        return logits, loss
