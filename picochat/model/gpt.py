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

from ..kernels import DECODE_TOKENS
from .config import ModelConfig


# Generating on the CPU, three steps below (RMSNorm, apply_rope, the one-token attention) may run on
# picochat's compiled kernels (kernels/ops.cpp): the same arithmetic in one pass instead of several PyTorch
# operations, which matters when a token takes ~60 of each. GPT.use_cpu_kernels() switches them on for one
# model (the loader does, once the kernels are loaded); training never uses them: they have no backward.
def _kernel_ok(x: torch.Tensor, enabled: bool) -> bool:
    return enabled and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()


# ----------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w   (Llama, Qwen2). Computed in float32 for stability."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.cpu_kernels = False  # see GPT.use_cpu_kernels

    def forward(self, x):
        if _kernel_ok(x, self.cpu_kernels) and self.weight.dtype == torch.float32:
            return torch.ops.picochat.rms_norm(x, self.weight, self.eps)
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
    # (on the CPU explicitly: a model built on the meta device gets these real values, computed cheaply)
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
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


def apply_rope(x, cos, sin, cpu_kernel: bool = False):
    """Rotate each (x_i, x_{i+d/2}) pair by position·θ_i (the HF 'rotate_half' layout)."""
    if _kernel_ok(x, cpu_kernel):
        return torch.ops.picochat.rope(x, cos, sin)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of every layer for positions already seen, so each new token costs one step.

    Preallocated: (batch, n_kv_head, max_len, head_dim) per layer. `lengths[b]` is how many positions
    row b holds. Rows may differ in length (a server decoding many conversations at once); then each
    forward step feeds one token per row. `rows(i, j)` is a view of some rows that shares the storage.
    """

    def __init__(self, k: list, v: list, lengths: torch.Tensor):
        self.k, self.v, self.lengths = k, v, lengths
        self.max_len = k[0].shape[2]

    @classmethod
    def allocate(cls, config: ModelConfig, batch_size: int, max_len: int, dtype, device="cpu") -> "KVCache":
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        return cls(k, v, torch.zeros(batch_size, dtype=torch.long, device=device))

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) as a cache of their own; writes go to this cache's storage."""
        return KVCache([t[start:stop] for t in self.k], [t[start:stop] for t in self.v], self.lengths[start:stop])

    @property
    def length(self) -> int:
        """Positions held, when every row holds the same number."""
        n = int(self.lengths[0])
        if not bool((self.lengths == n).all()):
            raise ValueError("rows of this KV cache hold different lengths")
        return n


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
        self.qkv_proj = None  # for inference, q/k/v may be fused into one matrix (load.fuse_projections)
        self.cpu_kernels = False  # see GPT.use_cpu_kernels

    def forward(self, x, rope, cache: KVCache | None, plan: "AttentionPlan"):
        B, T, _ = x.shape
        if self.qkv_proj is not None:  # one matrix product; the heads are then q | k | v
            qkv = self.qkv_proj(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
            qk, v = qkv[:, :self.n_head + self.n_kv_head], qkv[:, self.n_head + self.n_kv_head:]
            if rope is not None:  # q and k rotated together
                qk = apply_rope(qk, *rope, self.cpu_kernels)
            q, k = qk[:, :self.n_head], qk[:, self.n_head:]
        else:
            q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            if rope is not None:
                cos, sin = rope
                q, k = apply_rope(q, cos, sin, self.cpu_kernels), apply_rope(k, cos, sin, self.cpu_kernels)
        if cache is not None and T <= DECODE_TOKENS and _kernel_ok(x, self.cpu_kernels):
            # generating: the compiled kernel appends k, v and computes the formula below for each new token
            # as if it came alone (a pass checking drafted tokens computes exactly what decoding them would)
            y = torch.ops.picochat.decode_attention(q, k, v, cache.k[self.layer], cache.v[self.layer], cache.lengths)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        if cache is not None:  # append this step's keys/values, then attend over everything held
            ck, cv = cache.k[self.layer], cache.v[self.layer]
            if plan.per_row is None:
                ck[:, :, plan.start:plan.start + T] = k
                cv[:, :, plan.start:plan.start + T] = v
            else:  # one token per row, each at its own position
                rows = torch.arange(B, device=x.device)
                ck[rows, :, plan.per_row] = k[:, :, 0]
                cv[rows, :, plan.per_row] = v[:, :, 0]
            k, v = ck[:, :, :plan.n_keys], cv[:, :, :plan.n_keys]
        # Attention(Q, K, V) = softmax(Q·Kᵀ / √d_k) · V   (grouped-query: each K/V head serves n_head/n_kv_head Q heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, is_causal=plan.causal,
                                           enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class AttentionPlan:
    """Where this step's keys go in the cache and which keys each query may see (shared by all layers)."""

    def __init__(self, T: int, cache: KVCache | None, device):
        self.per_row, self.mask, self.causal = None, None, False
        if cache is None:
            self.start, self.n_keys, self.causal = 0, T, T > 1
            return
        lengths = cache.lengths
        first = int(lengths[0])
        if bool((lengths == first).all()):  # every row continues from the same position
            self.start, self.n_keys = first, first + T
            if T > 1 and first == 0:
                self.causal = True               # plain prefill: the standard lower triangle
            elif T > 1:                          # a chunk after cached positions: query i sees keys ≤ first+i
                self.mask = torch.ones(T, first + T, dtype=torch.bool, device=device).tril(diagonal=first)
            # T == 1: the new token sees every cached key, no mask needed
        else:
            if T != 1:
                raise ValueError("rows of different lengths can only be fed one token each")
            self.per_row = lengths
            self.start, self.n_keys = None, int(lengths.max()) + 1
            keys = torch.arange(self.n_keys, device=device)
            self.mask = (keys[None, :] <= lengths[:, None])[:, None, None, :]  # (B, 1, 1, keys): own positions only

    def positions(self, B: int, T: int, device) -> torch.Tensor:
        """(B or 1, T) absolute positions of this step's tokens."""
        if self.per_row is not None:
            return self.per_row[:, None]
        return torch.arange(self.start, self.start + T, device=device)[None, :]


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
        self.gate_up_proj = None  # for inference, gate and up may be fused into one matrix

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
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

    def forward(self, x, rope, cache, plan):
        x = x + self.attn(self.attn_norm(x), rope, cache, plan)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------- the model
class GPT(nn.Module):
    """Decoder-only Transformer: tokens -> embeddings -> N blocks -> norm -> logits over the vocabulary."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # (given an empty weight, nn.Embedding skips its own random init: init_weights does it, or a checkpoint)
        self.embed = nn.Embedding(config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd))
        if config.position == "learned":
            self.pos_embed = nn.Embedding(config.max_seq_len, config.n_embd,
                                          _weight=torch.empty(config.max_seq_len, config.n_embd))
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        # A tied head reuses the embedding matrix, so it owns no parameter (and no state-dict key).
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.position == "rope":
            self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self._rope_table = None  # cos and sin for positions 0..n-1, computed once (see rope_cos_sin)
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

    def use_cpu_kernels(self, enabled: bool = True) -> "GPT":
        """Run RMSNorm, RoPE and the one-token attention of generation on picochat's compiled CPU kernels
        (the same arithmetic, one pass each). The kernels must be loaded (kernels.available())."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention)):
                module.cpu_kernels = enabled
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        w = self.norm.weight  # a float parameter every model has (the embedding may be quantized)
        return KVCache.allocate(self.config, batch_size, max_len or self.config.max_seq_len, w.dtype, w.device)

    def rope_cos_sin(self, positions: torch.Tensor, n_positions: int, dtype):
        """cos and sin of position·θ_i, shaped (B or 1, 1, T, head_dim) to broadcast over heads.

        They come from a table for positions 0..n-1, computed once (and grown when a longer sequence
        comes), so a decode step only looks its row up.
        """
        table = self._rope_table
        if table is None or table.shape[1] < n_positions or table.device != self.inv_freq.device:
            n = max(n_positions, min(self.config.max_seq_len, 4096))
            freqs = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)[:, None] * self.inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)  # (n, head_dim)
            table = self._rope_table = torch.stack((emb.cos(), emb.sin()))
        cos_sin = table[:, positions].to(dtype)  # (2, B or 1, T, head_dim)
        return cos_sin[0][:, None], cos_sin[1][:, None]

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, last_only: bool = False,
                reduction: str = "mean"):
        """idx (B, T) token ids -> (logits, loss).

        targets (B, T) gives the next-token loss (positions marked -100 are ignored): their mean, or with
        reduction="none" each position's −log p(y_t|x_<t) as a (B, T) float32 tensor, 0 where ignored —
        the per-token log-probabilities preference tuning and RL sum over a reply.
        kv_cache continues each row from the positions it holds; last_only returns logits of the last
        position only.
        """
        B, T = idx.shape
        plan = AttentionPlan(T, kv_cache, idx.device)
        if plan.n_keys > self.config.max_seq_len:
            raise ValueError(f"sequence of {plan.n_keys} tokens exceeds the context length {self.config.max_seq_len}")
        if kv_cache is not None and plan.n_keys > kv_cache.max_len:
            raise ValueError(f"KV cache is full: {plan.n_keys} positions needed, {kv_cache.max_len} allocated")
        positions = plan.positions(B, T, idx.device)
        x = self.embed(idx)
        rope = None
        if self.config.position == "learned":
            x = x + self.pos_embed(positions)
        else:
            rope = self.rope_cos_sin(positions, plan.n_keys, x.dtype)
        for block in self.layers:
            x = block(x, rope, kv_cache, plan)
        if kv_cache is not None:
            kv_cache.lengths += T
        x = self.norm(x)
        if last_only:
            x = x[:, -1:, :]
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        loss = None
        if targets is not None:
            # L(θ) = E[−log p_θ(y|x)]: mean negative log-likelihood of each next token y given its prefix x
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100,
                                   reduction=reduction)
            if reduction == "none":
                loss = loss.view(B, -1)
        return logits, loss
