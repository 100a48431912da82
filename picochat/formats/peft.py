"""LoRA adapters in PEFT's format: the folder PEFT writes, and reads onto transformers' model of the same base.

    DIR/adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, base_model_name_or_path ...
    DIR/adapter_model.safetensors  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight ...

picochat writes its LoRA runs' checkpoints this way (train/sft.py), loads PEFT adapters of Llama/Qwen2-style
models, and folds them into a base's weights (`merge_into_state_dict`: what `picochat merge` and `-m
ADAPTER` do). The layers themselves are model/lora.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write
from ..model.lora import LoRAConfig, lora_state_dict
from .hf import CheckpointError, hf_to_picochat, picochat_to_hf

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def to_peft_names(sd: dict, model_config) -> dict:
    """picochat adapter names -> PEFT's (base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight)."""
    if model_config.architecture == "gpt2":
        raise ValueError("PEFT-format adapters are supported for Llama/Qwen2-style models, not GPT-2")
    out = {}
    for name, t in sd.items():
        base, _, lora = name.partition(".lora_")  # layers.0.attn.q_proj | A.weight
        hf = next(iter(picochat_to_hf({base + ".weight": t}, model_config)))  # model.layers.0.self_attn.q_proj.weight
        out[PEFT_PREFIX + hf.removesuffix(".weight") + ".lora_" + lora] = t
    return out


def from_peft_names(sd: dict, model_config) -> dict:
    """PEFT adapter names -> picochat's (also accepts keys with the adapter name, ...lora_A.default.weight)."""
    out = {}
    for name, t in sd.items():
        hf = name.removeprefix(PEFT_PREFIX).replace(".default.weight", ".weight")
        base, sep, lora = hf.partition(".lora_")
        if not sep or lora not in ("A.weight", "B.weight"):
            raise CheckpointError(f"unsupported adapter tensor {name!r} (only LoRA A/B matrices are supported)")
        ours = list(hf_to_picochat({base + ".weight": t}, model_config.replace(tie_word_embeddings=False)))
        if not ours:
            raise CheckpointError(f"adapter tensor {name!r} names no layer of a {model_config.architecture} model")
        out[ours[0].removesuffix(".weight") + ".lora_" + lora] = t
    return out


def adapter_config_dict(config: LoRAConfig, base_model_name_or_path: str) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA on a causal language model."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": sorted(config.target_modules), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
            "use_rslora": False, "use_dora": False, "revision": None}


def save_adapter(model: nn.Module, folder, base_model_name_or_path: str = "", state_dict: dict | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's format) for a model with LoRA layers."""
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA layers (apply_lora first)")
    sd = lora_state_dict(model) if state_dict is None else state_dict
    return write_adapter(folder, config, model.config, sd, base_model_name_or_path)


def write_adapter(folder, config: LoRAConfig, model_config, state_dict: dict, base_model_name_or_path: str = "") -> Path:
    """Write the LoRA tensors of a (picochat-named) state dict as a PEFT adapter folder, each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in state_dict.items() if ".lora_" in k}
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in to_peft_names(sd, model_config).items()}
    atomic_write(folder / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(adapter_config_dict(config, str(base_model_name_or_path)), indent=2)
    atomic_write(folder / ADAPTER_CONFIG, lambda p: Path(p).write_text(text))
    return folder


def is_adapter_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder) -> dict:
    """The adapter_config.json of an adapter folder: a JSON object whose base_model_name_or_path, if any, is a
    string. CheckpointError naming the file otherwise (it is data from a download: any shape may come)."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # (ValueError: bad JSON or bad UTF-8)
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(cfg).__name__}")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise CheckpointError(f"{path}: base_model_name_or_path must be a string, got {base!r}")
    return cfg


def read_adapter(folder, model_config) -> tuple[LoRAConfig, dict, str]:
    """(LoRAConfig, picochat-named tensors, base_model_name_or_path) of a PEFT LoRA adapter folder."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    cfg = read_adapter_config(folder)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: only LoRA adapters are supported, not {cfg.get('peft_type')}")
    for unsupported in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg.get(unsupported):
            raise CheckpointError(f"{path}: {unsupported} adapters are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{path}: per-layer rank_pattern/alpha_pattern is not supported")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    try:
        config = LoRAConfig(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])),
                            dropout=float(cfg.get("lora_dropout", 0.0)), target_modules=tuple(targets))
        config.validate()
    except KeyError as e:
        raise CheckpointError(f"{path} lacks {e}, which a LoRA adapter's config needs") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        tensors = load_file(folder / ADAPTER_WEIGHTS)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS} is not a readable safetensors file ({e})") from None
    return config, from_peft_names(tensors, model_config), cfg.get("base_model_name_or_path") or ""


def load_adapter_weights(model: nn.Module, sd: dict, source: str = "adapter"):
    """Copy picochat-named adapter tensors into a model that has the matching LoRA layers."""
    ours = lora_state_dict(model)
    missing, unexpected = set(ours) - set(sd), set(sd) - set(ours)
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit the model: missing {sorted(missing)[:4]}, "
                              f"unexpected {sorted(unexpected)[:4]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in sd.items():
            if tuple(v.shape) != tuple(params[k].shape):
                raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the model's is "
                                      f"{tuple(params[k].shape)} (a different rank or base model?)")
            params[k].copy_(v)


def merge_into_state_dict(sd: dict, config: LoRAConfig, adapter: dict) -> dict:
    """A base state dict with the adapter folded in (float32 arithmetic, then the base's dtype)."""
    out = dict(sd)
    for name in {k.partition(".lora_")[0] for k in adapter}:
        needed = (name + ".lora_A.weight", name + ".lora_B.weight")
        if name + ".weight" not in sd or any(k not in adapter for k in needed):
            raise CheckpointError(f"the adapter's {name} has no matching layer (or lacks lora_A/lora_B): "
                                  f"is it for this base model?")
        A, B = adapter[name + ".lora_A.weight"].float(), adapter[name + ".lora_B.weight"].float()
        W = sd[name + ".weight"]
        if (B.shape[0], A.shape[1]) != tuple(W.shape) or A.shape[0] != B.shape[1]:
            raise CheckpointError(f"the adapter's {name} has shapes A {tuple(A.shape)}, B {tuple(B.shape)}, "
                                  f"which do not fit the base weight {tuple(W.shape)}")
        out[name + ".weight"] = (W.float() + (B @ A) * config.scaling).to(W.dtype)
    return out
