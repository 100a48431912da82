"""Packed models: an inference-ready model (quantized, fused) in a folder that loads by memory map.

    DIR/config.json           the Hugging Face config, plus "quantization_config":
                              {"quant_method": "picochat", "format": FORMAT, "modules": {name: spec}}
    DIR/model.safetensors     picochat's tensor names: layers.0.attn.qkv_proj.qweight (packed tiles), norms ...
    DIR/tokenizer.json, tokenizer_config.json (with the chat template), generation_config.json

Loading a GGUF file writes one into picochat's cache (keyed by the file's hash and picochat's version),
so the second start only maps the weights into memory instead of converting them; `picochat quantize`
writes one from any model. transformers does not read this quantization format: export float weights
(`picochat merge` / save_hf_folder) to share a model with other engines.

A module spec is {"kind": "qlinear", "bits", "group", "in_features", "out_features", "has_min", "bias"}
(quant.QLinear), {"kind": "qembedding", ...the same but bias} (quant.QEmbedding), {"kind": "linear",
"bias"} (a fused nn.Linear) or {"kind": "tied", "to": "embed"} (the output head shares the embedding).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..model.config import ModelConfig
from ..model.gpt import GPT, rope_frequencies
from ..quant.layers import QEmbedding, QLinear
from ..quant.matrix import QuantizedMatrix
from ..tokenizer.bpe import Tokenizer
from .hf import CheckpointError

FORMAT = "picochat-packed-v3"


def is_packed_folder(path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        hf = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    qc = hf.get("quantization_config") if isinstance(hf, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "picochat"


# ----------------------------------------------------------------------------- from a state dict
def split_state_dict(sd: dict, config: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """A state dict whose matrices may be QuantizedMatrix -> (plain tensors, module specs)."""
    tensors, specs = {}, {}
    for name, value in sd.items():
        if not isinstance(value, QuantizedMatrix):
            tensors[name] = value
            continue
        module = name.removesuffix(".weight")
        kind = "qembedding" if module == "embed" else "qlinear"
        specs[module] = {"kind": kind, **value.spec}
        if kind == "qlinear":
            specs[module]["bias"] = f"{module}.bias" in sd
        tensors[f"{module}.qweight"] = value.packed
    if specs.get("embed") and config.tie_word_embeddings:
        specs["lm_head"] = {"kind": "tied", "to": "embed"}
    return tensors, specs


def assemble(config: ModelConfig, tensors: dict[str, torch.Tensor], specs: dict[str, dict], dtype,
             source: str = "") -> GPT:
    """A GPT from plain tensors and module specs. Float tensors take `dtype`; integer codes stay as they are."""
    with torch.device("meta"):
        model = GPT(config)
    tensors = dict(tensors)
    for module, spec in specs.items():
        if spec["kind"] != "tied":
            _set_module(model, module, _build_module(module, spec, tensors, dtype, source))
    for module, spec in specs.items():
        if spec["kind"] == "tied":
            _set_module(model, module, QLinear(model.get_submodule(spec["to"]).matrix))
    for block in model.layers:  # fused projections replace their parts
        if block.attn.qkv_proj is not None:
            del block.attn.q_proj, block.attn.k_proj, block.attn.v_proj
        if block.mlp.gate_up_proj is not None:
            del block.mlp.gate_proj, block.mlp.up_proj
    fill(model, tensors, dtype, source)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def fill(model: GPT, tensors: dict[str, torch.Tensor], dtype, source: str = "") -> GPT:
    """Give a GPT built on the meta device its tensors, after checking their names and shapes.

    Float tensors take `dtype`; integer codes stay as they are. The rope frequencies are computed, not stored.
    """
    own = {k: v for k, v in model.state_dict().items() if v.device.type == "meta"}
    missing, unexpected = set(own) - set(tensors), set(tensors) - set(own)
    if missing:
        raise CheckpointError(f"{source}: missing tensors {', '.join(sorted(missing)[:8])}"
                              f"{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {', '.join(sorted(unexpected)[:8])}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the config implies "
                                  f"{tuple(own[name].shape)}")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                          strict=False, assign=True)
    if model.config.position == "rope":
        model.inv_freq = rope_frequencies(model.config)
    return model.eval()


def _set_module(model: nn.Module, path: str, module: nn.Module):
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _build_module(module: str, spec: dict, tensors: dict, dtype, source: str) -> nn.Module:
    def take(name, required=True):
        t = tensors.pop(f"{module}.{name}", None)
        if t is None and required:
            raise CheckpointError(f"{source}: missing tensor {module}.{name}")
        return t

    kind = spec.get("kind")
    if kind in ("qlinear", "qembedding"):
        try:
            matrix = QuantizedMatrix(take("qweight"), int(spec["bits"]), int(spec["group"]), int(spec["in_features"]),
                                     int(spec["out_features"]), bool(spec["has_min"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: bad quantized module {module}: {e}") from None
        if kind == "qembedding":
            return QEmbedding(matrix, dtype)
        bias = take("bias") if spec.get("bias") else None
        return QLinear(matrix, None if bias is None else bias.to(dtype))
    if kind == "linear":
        weight = take("weight")
        bias = take("bias") if spec.get("bias") else None
        with torch.device("meta"):
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return layer
    raise CheckpointError(f"{source}: unknown module kind {kind!r} for {module}")


# ----------------------------------------------------------------------------- folders
def module_specs(model: GPT) -> dict[str, dict]:
    """The specs of a model's quantized and fused modules (what `assemble` needs to rebuild it)."""
    specs = {}
    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            tied = isinstance(model.embed, QEmbedding) and m.qweight is model.embed.qweight
            specs[name] = {"kind": "tied", "to": "embed"} if tied else {
                "kind": "qlinear", **m.matrix.spec, "bias": m.bias is not None}
        elif isinstance(m, QEmbedding):
            specs[name] = {"kind": "qembedding", **m.matrix.spec}
        elif isinstance(m, nn.Linear) and name.endswith(("qkv_proj", "gate_up_proj")):
            specs[name] = {"kind": "linear", "bias": m.bias is not None}
    return specs


def save_packed(model: GPT, tokenizer: Tokenizer, folder, generation_config: dict | None = None,
                extra: dict | None = None) -> Path:
    """Write `model` (quantized and/or fused) as a packed folder, atomically: a temporary folder renamed."""
    folder = Path(folder)
    specs = module_specs(model)
    tied = [name for name, spec in specs.items() if spec["kind"] == "tied"]
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()
               if not any(k.startswith(t + ".") for t in tied)}
    hf = model.config.to_hf("float32")
    hf["quantization_config"] = {"quant_method": "picochat", "format": FORMAT, "modules": specs, **(extra or {})}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(generation_config or {}, indent=2))
    tokenizer.save(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def load_packed(folder, dtype=torch.float32) -> tuple[GPT, Tokenizer, dict, dict]:
    """(model, tokenizer, generation config, quantization_config) of a packed folder."""
    folder = Path(folder)
    try:
        hf = json.loads((folder / "config.json").read_text())
        qc = hf.get("quantization_config") if isinstance(hf, dict) else None
        if not isinstance(qc, dict) or qc.get("format") != FORMAT:
            found = qc.get("format") if isinstance(qc, dict) else None
            raise CheckpointError(f"{folder}: packed format {found!r}; this picochat reads {FORMAT}")
        config = ModelConfig.from_hf(hf)
        tensors = load_file(folder / "model.safetensors")
        gen_path = folder / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    except CheckpointError:
        raise
    except (OSError, ValueError, RecursionError, SafetensorError) as e:  # ValueError: bad JSON, invalid config
        raise CheckpointError(f"{folder} is not a readable packed model ({type(e).__name__}: {e})") from None
    modules = qc.get("modules", {})
    if not isinstance(modules, dict) or not all(isinstance(spec, dict) for spec in modules.values()):
        raise CheckpointError(f"{folder}: quantization_config.modules must map module names to specs")
    model = assemble(config, tensors, modules, dtype, str(folder))
    return model, Tokenizer.from_file(folder), gen, qc
