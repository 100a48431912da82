"""LoRA: low-rank adapters on a frozen model, saved in PEFT's format, folded back in by `merge`.

A LoRA layer keeps a linear layer's weight W frozen and learns a low-rank update:

    y = W x + b + (alpha / r) · B(A(dropout(x)))        A: r × in (Kaiming init), B: out × r (zeros)

so at the start (B = 0) the adapted model computes exactly what the base model does. Only A and B
train: r·(in + out) numbers per adapted matrix instead of in·out.

    model = apply_lora(model, LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
    save_adapter(model, "out/adapter", base_model_name_or_path="path/to/base")
    merged = merge_lora(model)                          # plain nn.Linear layers again

The adapter folder is what PEFT writes (adapter_config.json + adapter_model.safetensors, with keys like
base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight), so PEFT loads it onto transformers'
model of the same base, and picochat loads PEFT adapters of Llama/Qwen2-style models.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .formats.atomic import atomic_write
from .formats.hf import CheckpointError, picochat_to_hf

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    r: int = 8                          # rank of the update
    alpha: float = 16.0                 # the update is scaled by alpha / r
    dropout: float = 0.0                # dropout on the adapter's input (training only)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def validate(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [m for m in self.target_modules if m not in TARGET_MODULES]
        if unknown or not self.target_modules:
            raise ValueError(f"unknown LoRA target modules {', '.join(unknown) or '(none)'}; "
                             f"choose from {', '.join(TARGET_MODULES)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Linear):
    """An nn.Linear with a trainable low-rank update. It shares (not copies) the base layer's weight and
    bias, so its state-dict keys are the base layer's plus lora_A.weight and lora_B.weight."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        kw = {"device": base.weight.device, "dtype": torch.float32 if base.weight.is_floating_point() else None}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default initialisation
        nn.init.zeros_(self.lora_B.weight)                            # so the update starts at zero

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return y + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) · B A, in float32: what merging adds to W."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}"


def _targets(model: nn.Module, targets) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every nn.Linear inside the Transformer blocks named in targets."""
    found = []
    for name, module in model.named_modules():
        if not name.startswith("layers."):
            continue
        for attr in targets:
            child = getattr(module, attr, None)
            if isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                found.append((module, attr, child))
    return found


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap the target linear layers of every block with LoRA and freeze everything else (in place)."""
    config.validate()
    if getattr(model, "config", None) is not None and model.config.architecture == "gpt2" \
            and {"q_proj", "k_proj", "v_proj"} & set(config.target_modules):
        raise ValueError("LoRA on q/k/v of a GPT-2 model is not supported (Hugging Face fuses them into c_attn, "
                         "so the adapter could not be saved in PEFT's format): target o_proj, up_proj, down_proj")
    found = _targets(model, config.target_modules)
    if not found:
        raise ValueError(f"the model has none of the LoRA target modules {', '.join(config.target_modules)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, linear in found:
        setattr(parent, attr, LoRALinear(linear, config.r, config.alpha, config.dropout))
    model.lora_config = config
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, by picochat name (layers.0.attn.q_proj.lora_A.weight ...)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight (W += (alpha/r)·BA) and restore plain nn.Linear layers."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device="meta")
                with torch.no_grad():
                    merged = child.weight.float() + child.delta_weight().to(child.weight.device)
                    merged = merged.to(child.weight.dtype)
                plain.weight = nn.Parameter(merged, requires_grad=False)
                if child.bias is not None:
                    plain.bias = child.bias
                setattr(module, attr, plain)
    if hasattr(model, "lora_config"):
        del model.lora_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------- PEFT format
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
    from .formats.hf import hf_to_picochat
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


def read_adapter(folder, model_config) -> tuple[LoRAConfig, dict, str]:
    """(LoRAConfig, picochat-named tensors, base_model_name_or_path) of a PEFT LoRA adapter folder."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: only LoRA adapters are supported, not {cfg.get('peft_type')}")
    for unsupported in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg.get(unsupported):
            raise CheckpointError(f"{path}: {unsupported} adapters are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{path}: per-layer rank_pattern/alpha_pattern is not supported")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    config = LoRAConfig(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])),
                        dropout=float(cfg.get("lora_dropout", 0.0)), target_modules=tuple(targets))
    try:
        config.validate()
    except ValueError as e:
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
