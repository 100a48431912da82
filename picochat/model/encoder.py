"""Sentence embeddings: a BERT encoder (all-MiniLM-L6-v2 by default) in plain PyTorch.

A sentence goes in, a unit vector of `dim` floats comes out; two texts that mean the same thing get
vectors with a high dot product (cosine similarity), which is what the knowledge base (kb.py) searches with.
The pipeline is the one sentence-transformers runs for this model, written out:

    WordPiece tokens ([CLS] ... [SEP], at most max_tokens)
    → BERT: embeddings (word + position + token type) → LayerNorm
            → N × [self-attention → dense → add & LayerNorm → dense, gelu → dense → add & LayerNorm]
    → mean of the last hidden states over the real (non-padding) tokens
    → L2 normalisation

The weights come from a Hugging Face BERT folder (config.json, model.safetensors, tokenizer.json) read by
formats/bert.py, which `picochat pull minilm` fetches (hub.py); nothing is downloaded here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, cfg: dict) -> "BertConfig":
        """From a Hugging Face config.json's fields."""
        return cls(vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                   num_layers=int(cfg["num_hidden_layers"]), num_heads=int(cfg["num_attention_heads"]),
                   intermediate_size=int(cfg["intermediate_size"]),
                   max_position=int(cfg.get("max_position_embeddings", 512)),
                   type_vocab_size=int(cfg.get("type_vocab_size", 2)),
                   layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                   hidden_act=str(cfg.get("hidden_act", "gelu")), pad_token_id=int(cfg.get("pad_token_id") or 0))


# Hugging Face's activation names → ours ("gelu" in BERT is the exact, erf-based one)
ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


# ----------------------------------------------------------------------------- the model
class Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position = nn.Embedding(c.max_position, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        # one sentence per row: every token has token type 0
        x = self.word(ids) + self.position(positions)[None] + self.token_type.weight[0]
        return self.norm(x)


class Layer(nn.Module):
    """One BERT layer: post-LayerNorm (add, then normalise), unlike GPT's pre-norm blocks."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.attn_out = nn.Linear(c.hidden_size, c.hidden_size)
        self.attn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.up = nn.Linear(c.hidden_size, c.intermediate_size)
        self.down = nn.Linear(c.intermediate_size, c.hidden_size)
        self.out_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        heads = lambda t: t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, H, T, d)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # softmax(QKᵀ/√d)·V, bidirectional: every token sees every real token; `mask` (B, 1, 1, T) hides
        # the padding keys so a sentence's vector does not depend on the batch it was padded in
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.attn_norm(x + self.attn_out(y.transpose(1, 2).reshape(B, T, C)))
        return self.out_norm(x + self.down(self.act(self.up(x))))


class Bert(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, T, hidden) for token ids (B, T); attention_mask is 1 at real tokens."""
        mask = attention_mask.bool()[:, None, None, :]
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x


# ----------------------------------------------------------------------------- the sentence encoder
class SentenceEncoder:
    """Texts → unit-length float32 vectors (mean-pooled BERT states), for cosine similarity search."""

    def __init__(self, model: Bert, tokenizer, name: str, max_tokens: int):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.dim = model.config.hidden_size
        self.max_tokens = max_tokens

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text is encoded with (special tokens included, after truncation to max_tokens)."""
        return [len(ids) for ids in self._tokenize(texts)]

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Embed `texts`: an (n, dim) float32 array of unit rows, in the order given.

        Texts are batched by length (longest first) so little compute goes to padding; the rows are put
        back in the caller's order at the end."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self._tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        pad = self.model.config.pad_token_id
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            T = len(ids[rows[0]])
            batch = torch.full((len(rows), T), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for r, i in enumerate(rows):
                batch[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            h = self.model(batch, mask).float()
            m = mask[..., None].to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)   # mean over real tokens only
            out[rows] = F.normalize(pooled, p=2, dim=1, eps=1e-12).numpy()
        return out
