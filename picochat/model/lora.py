"""LoRA: low-rank adapters on a frozen model, and folding them back in (`merge`).

A LoRA layer keeps a linear layer's weight W frozen and learns a low-rank update:

    y = W x + b + (alpha / r) · B(A(dropout(x)))        A: r × in (Kaiming init), B: out × r (zeros)

so at the start (B = 0) the adapted model computes exactly what the base model does. Only A and B
train: r·(in + out) numbers per adapted matrix instead of in·out.

    model = apply_lora(model, LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
    merged = merge_lora(model)                          # plain nn.Linear layers again
    with adapters_off(model): ...                       # the base model again, on the same weights

For generation on weights that cannot absorb the update (integer codes), `LowRankAdded` keeps a trained
update beside the layer instead (load.attach_adapter).

Adapters are saved and read in PEFT's format by formats/peft.py.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
        self.enabled = True                                           # False: the base layer alone

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return y + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) · B A, in float32: what merging adds to W."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}"


class LowRankAdded(nn.Module):
    """A trained LoRA update beside a layer left as it is — a quantized one keeps its integer codes, which
    W + (alpha/r)·BA could not be folded into exactly:

        y = base(x) + B_s(A(x))        A: r × in, B_s = (alpha / r) · B: out × r, float32, frozen

    Two thin products per token (r·(in + out) multiply-adds against the base's in·out). For inference."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B_scaled: torch.Tensor):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = A.shape[1], B_scaled.shape[0]
        self.register_buffer("lora_A", A.float().contiguous(), persistent=False)
        self.register_buffer("lora_B", B_scaled.float().contiguous(), persistent=False)

    def forward(self, x):
        y = self.base(x)
        return y + F.linear(F.linear(x.float(), self.lora_A), self.lora_B).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.lora_A.shape[0]}"


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


@contextmanager
def adapters_off(model: nn.Module):
    """Inside the block the model computes as its base does (every LoRA update skipped): the frozen reference
    policy of preference tuning and RL, without a second copy of the weights in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.enabled = was


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
