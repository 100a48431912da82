"""`picochat info`: what a model file or folder holds, read from headers only (no weights loaded)."""
from __future__ import annotations

import json
import math
from collections import Counter

from safetensors import safe_open

from ..formats.gguf import gguf_tensor_summary
from ..formats.hf import CheckpointError, read_config, weight_files
from ..formats.packed import is_packed_folder
from ..formats.peft import ADAPTER_WEIGHTS, is_adapter_folder, read_adapter_config
from ..hub import adapter_base, resolve


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _types(counts: dict) -> str:
    return ", ".join(f"{n} × {t}" for t, n in counts.items())


def describe(model: str | None) -> dict[str, str]:
    """A few human-readable facts about a model: architecture, size, tensor types, context, chat template."""
    path = resolve(model)
    if is_adapter_folder(path):  # a LoRA adapter: the base it names, and the adapter's shape
        cfg = read_adapter_config(path)
        try:
            with safe_open(path / ADAPTER_WEIGHTS, "pt") as sf:
                n = sum(math.prod(sf.get_slice(k).get_shape()) for k in sf.keys())
        except Exception as e:  # a missing or unreadable safetensors file
            raise CheckpointError(f"{path} is not a readable LoRA adapter ({e})") from None
        targets = cfg.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else targets
        return {"adapter": str(path),
                "adapter type": f"LoRA r={cfg.get('r')}, alpha={cfg.get('lora_alpha')} on {', '.join(targets)} "
                                f"({_count(n)} parameters)",
                **describe(adapter_base(path))}
    if is_packed_folder(path):
        return describe_packed(path)
    if path.is_dir():
        config = read_config(path)
        types, n_params = Counter(), 0
        for f in weight_files(path):
            try:
                with safe_open(f, "pt") as sf:
                    for name in sf.keys():
                        piece = sf.get_slice(name)
                        types[piece.get_dtype()] += 1
                        shape = piece.get_shape()
                        n = 1
                        for d in shape:
                            n *= d
                        n_params += n
            except Exception as e:  # safetensors raises several types for a bad header
                raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from None
        template = False
        tc = path / "tokenizer_config.json"
        if tc.is_file():
            try:
                tokenizer_config = json.loads(tc.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise CheckpointError(f"{tc} is not valid JSON") from None
            if not isinstance(tokenizer_config, dict):
                raise CheckpointError(f"{tc} must hold a JSON object")
            template = bool(tokenizer_config.get("chat_template"))
        template = template or (path / "chat_template.jinja").is_file()
        fmt, arch, ctx, vocab = "Hugging Face folder (safetensors)", config.architecture, config.max_seq_len, config.vocab_size
    else:
        s = gguf_tensor_summary(path)
        if s["config_error"]:
            raise CheckpointError(s["config_error"])
        config, n_params, types = s["config"], s["n_params"], s["tensor_types"]
        fmt, arch, ctx, vocab, template = f"GGUF v{s['version']}", s["architecture"], s["context_length"], s["vocab_size"], s["chat_template"]
    return {
        "model": str(path),
        "format": fmt,
        "architecture": arch,
        "parameters": _count(n_params),
        "tensor types": _types(dict(types)),
        "context length": str(ctx),
        "vocabulary": str(vocab),
        "layers": f"{config.n_layer} × (hidden {config.n_embd}, {config.n_head} heads, {config.n_kv_head} kv heads, "
                  f"mlp {config.intermediate_size}, {config.mlp})",
        "positions": f"RoPE (base {config.rope_theta:g})" if config.position == "rope" else "learned",
        "tied embeddings": "yes" if config.tie_word_embeddings else "no",
        "chat template": "yes" if template else "no",
        "size on disk": _count(sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())) + "B",
    }


def describe_packed(path) -> dict[str, str]:
    """A packed folder (picochat quantize, or a cached GGUF conversion): what its matrices hold."""
    try:
        hf = json.loads((path / "config.json").read_text())
        specs = hf["quantization_config"].get("modules", {})
        config = read_config(path)
        with safe_open(path / "model.safetensors", "pt") as sf:
            floats = sum(math.prod(sf.get_slice(k).get_shape()) for k in sf.keys() if not k.endswith(".qweight"))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable packed model ({e})") from None
    kinds = Counter(f"{s['bits']}-bit (groups of {s['group']})" for s in specs.values() if "bits" in s)
    n = floats + sum(s["in_features"] * s["out_features"] for s in specs.values() if "bits" in s)
    qc = hf["quantization_config"]
    source = f", from {qc['source']}" if qc.get("source") else ""
    return {
        "model": str(path),
        "format": f"picochat packed folder (quantized{source})",
        "architecture": config.architecture,
        "parameters": _count(n),
        "tensor types": _types(dict(kinds)) + f", {floats:,} float values",
        "context length": str(config.max_seq_len),
        "vocabulary": str(config.vocab_size),
        "layers": f"{config.n_layer} × (hidden {config.n_embd}, {config.n_head} heads, {config.n_kv_head} kv heads, "
                  f"mlp {config.intermediate_size}, {config.mlp})",
        "tied embeddings": "yes" if config.tie_word_embeddings else "no",
        "chat template": "yes" if (path / "tokenizer_config.json").is_file()
                         and "chat_template" in (path / "tokenizer_config.json").read_text() else "no",
        "size on disk": _count(sum(f.stat().st_size for f in path.rglob("*") if f.is_file())) + "B",
    }
