"""Sentence embeddings: a BERT encoder (all-MiniLM-L6-v2 by default) in plain PyTorch.

A sentence goes in, a unit vector of `dim` floats comes out; two texts that mean the same thing get
vectors with a high dot product (cosine similarity), which is what the knowledge base (kb.py) searches with.
The pipeline is the one sentence-transformers runs for this model, written out:

    WordPiece tokens ([CLS] ... [SEP], at most max_tokens)
    → BERT: embeddings (word + position + token type) → LayerNorm
            → N × [self-attention → dense → add & LayerNorm → dense, gelu → dense → add & LayerNorm]
    → mean of the last hidden states over the real (non-padding) tokens
    → L2 normalisation

The weights are a Hugging Face BERT folder (config.json, model.safetensors, tokenizer.json), fetched by
`picochat pull minilm` (models.pull_embedding); nothing is downloaded here.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class EncoderFormatError(ValueError):
    """A folder that is not a BERT sentence-embedding model; the message names the folder and the problem."""


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


# Hugging Face BERT names → ours, applied after stripping a "bert." prefix (BertFor* checkpoints)
_RENAMES = [
    (r"^embeddings\.word_embeddings\.", "embeddings.word."),
    (r"^embeddings\.position_embeddings\.", "embeddings.position."),
    (r"^embeddings\.token_type_embeddings\.", "embeddings.token_type."),
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attn_out."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attn_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.up."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.down."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.out_norm."),
]


def rename_hf_keys(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face BERT state dict (with or without the "bert." prefix) in our module's names.

    What the encoder does not use (the pooler, a masked-LM head, position_ids buffers) is dropped."""
    out = {}
    for key, tensor in hf.items():
        name = key.removeprefix("bert.")
        name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))  # TF-era LayerNorm names
        for pattern, repl in _RENAMES:
            new, n = re.subn(pattern, repl, name)
            if n:
                out[new] = tensor
                break
    return out


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


def _read_json(path: Path, folder: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EncoderFormatError(f"{folder}: {path.name} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise EncoderFormatError(f"{folder}: {path.name} must hold a JSON object")
    return data


def _model_name(folder: Path) -> str:
    """The model's name: a packaged model's own name where the folder is one, else the folder's name."""
    from . import models
    for key, spec in models.EMBEDDING_MODELS.items():
        if folder.name == spec.name:
            return spec.name
        installed = models._installed_folder(spec)
        if installed is not None and installed.resolve() == folder.resolve():
            return spec.name
    return folder.name


def load_encoder(path: str | None = None) -> SentenceEncoder:
    """Load a sentence encoder from a Hugging Face BERT folder; None → the default embedding model.

    Raises models.ModelNotFound (a FileNotFoundError) when there is no model, saying to run
    `picochat pull minilm`, and EncoderFormatError (a ValueError) for a folder that is not a BERT model."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from . import models
    if path is None or (str(path) in models.EMBEDDING_MODELS and not Path(path).exists()):  # a name: minilm
        folder = models.find_embedding(models.DEFAULT_EMBEDDING if path is None else str(path))
    else:
        folder = Path(path).expanduser()
        if not folder.exists():
            raise models.ModelNotFound(f"no embedding model at {folder}: give a Hugging Face BERT folder, or run "
                                       f"`picochat pull {models.DEFAULT_EMBEDDING}` for the default one")
    if not folder.is_dir():
        raise EncoderFormatError(f"{folder} is not a folder: an embedding model is a Hugging Face BERT folder")
    for f in models.EMBEDDING_FILES:
        if not (folder / f).is_file():
            raise EncoderFormatError(f"{folder} is not a BERT sentence-embedding folder: it has no {f}")
    cfg = _read_json(folder / "config.json", folder)
    if cfg.get("model_type") != "bert":
        raise EncoderFormatError(f"{folder}: config.json has model_type {cfg.get('model_type')!r}, not 'bert'")
    if cfg.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise EncoderFormatError(f"{folder}: unsupported hidden_act {cfg.get('hidden_act')!r}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise EncoderFormatError(f"{folder}: only absolute position embeddings are supported")
    try:
        config = BertConfig.from_hf(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise EncoderFormatError(f"{folder}: config.json lacks or garbles {e}") from None
    if config.hidden_size % config.num_heads:
        raise EncoderFormatError(f"{folder}: hidden_size {config.hidden_size} is not a multiple of "
                                 f"num_attention_heads {config.num_heads}")
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file() and not _read_json(pooling, folder).get("pooling_mode_mean_tokens", True):
        raise EncoderFormatError(f"{folder}: only mean pooling is supported (see 1_Pooling/config.json)")

    try:
        sd = rename_hf_keys(load_file(folder / "model.safetensors"))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise EncoderFormatError(f"{folder}: model.safetensors is not readable ({e})") from None
    with torch.device("meta"):  # no time spent on random initialisation: every tensor comes from the file
        model = Bert(config)
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    except RuntimeError as e:  # missing tensors or wrong shapes
        raise EncoderFormatError(f"{folder}: model.safetensors does not match config.json: {e}") from None

    st_config = folder / "sentence_bert_config.json"
    max_tokens = int(_read_json(st_config, folder).get("max_seq_length") or 256) if st_config.is_file() else 256
    max_tokens = min(max_tokens, config.max_position)
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise EncoderFormatError(f"{folder}: tokenizer.json is not readable ({e})") from None
    # the file may carry its own settings (all-MiniLM-L6-v2's pads every text to 128): pad per batch
    # ourselves, and truncate to what the model was trained with (special tokens count)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_tokens)
    return SentenceEncoder(model, tokenizer, _model_name(folder), max_tokens)
