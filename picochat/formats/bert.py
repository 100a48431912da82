"""A Hugging Face BERT sentence-embedding folder (all-MiniLM-L6-v2) -> model/encoder.py's SentenceEncoder.

    DIR/config.json                   model_type "bert": sizes, activation, position embeddings
    DIR/model.safetensors             the weights, with or without the "bert." prefix
    DIR/tokenizer.json                WordPiece ([CLS] ... [SEP])
    DIR/sentence_bert_config.json     max_seq_length (optional)
    DIR/1_Pooling/config.json         sentence-transformers' pooling (mean only; optional)

Every field is checked before the model is built: a folder that is not such a model gets an
EncoderFormatError naming the folder and the problem.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from ..model.encoder import ACTIVATIONS, Bert, BertConfig, SentenceEncoder

BERT_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # what a usable folder holds


class EncoderFormatError(ValueError):
    """A folder that is not a BERT sentence-embedding model; the message names the folder and the problem."""


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


def _read_json(path: Path, folder: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EncoderFormatError(f"{folder}: {path.name} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise EncoderFormatError(f"{folder}: {path.name} must hold a JSON object")
    return data


def load_sentence_encoder(folder, name: str | None = None) -> SentenceEncoder:
    """The sentence encoder of a Hugging Face BERT folder, called `name` (default: the folder's name).
    Raises EncoderFormatError (a ValueError) for a folder that is not a BERT sentence-embedding model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EncoderFormatError(f"{folder} is not a folder: an embedding model is a Hugging Face BERT folder")
    for f in BERT_FILES:
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
    return SentenceEncoder(model, tokenizer, name or folder.name, max_tokens)
