"""How the weights move: the learning-rate schedule, parameter groups, AdamW and Muon.

Each optimizer step applies lr_schedule(step)·peak to every group: AdamW (fused; decoupled weight decay on
matrices only) for embeddings, norms, biases and the head, and with --optimizer muon, Muon for the 2-D
hidden matrices of the blocks. Any training loop (pre-training, SFT, preference tuning) builds its
optimizers here.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..quant.tuning import resolve_dtype
from .config import TrainConfig


def lr_schedule(step: int, total_steps: int, config: TrainConfig, elapsed: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Linear warmup over warmup_steps, then a decay over the rest of the run: cosine down to min_lr_frac,
    or warmup-stable-decay (flat, then linear down to min_lr_frac over the last decay_frac), or constant.
    With a time budget, progress is whichever of steps and time is further along.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = 0.0
    if total_steps > 0:  # the last step (total_steps - 1) reaches progress 1 exactly
        progress = (step - config.warmup_steps) / max(1, total_steps - 1 - config.warmup_steps)
    if config.max_time > 0:
        progress = max(progress, elapsed / config.max_time)
    progress = min(max(progress, 0.0), 1.0)
    floor = config.min_lr_frac
    if config.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "wsd":
        start = 1 - config.decay_frac
        return 1.0 if progress <= start else floor + (1 - floor) * (1 - progress) / config.decay_frac
    return 1.0


def param_groups(model: nn.Module, config: TrainConfig) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by treatment: "muon" (2-D hidden matrices, with --optimizer muon),
    "decay" (other matrices: AdamW with weight decay), "no_decay" (norms, biases, embeddings)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {"muon": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 2 and id(p) not in embeddings:
            hidden = name.startswith("layers.")  # the Transformer blocks: not the embedding, not the head
            groups["muon" if config.optimizer == "muon" and hidden else "decay"].append((name, p))
        else:
            groups["no_decay"].append((name, p))
    return groups


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton–Schulz orthogonalisation in a chosen dtype, batched.

    torch runs the iteration in bfloat16, which a CPU without native bf16 (AVX2-only) multiplies several
    times slower than float32: there it made Muon's step most of a training step. And it orthogonalises
    one matrix at a time; a small model has dozens of small matrices of a few shapes, so matrices of the
    same shape go through the iteration together (batched matrix products: far fewer operations). The
    arithmetic per matrix is torch's; the optimizer state (momentum_buffer) is the same.
    """

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import _adjust_lr
        for group in self.param_groups:
            momentum, updates = group["momentum"], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                updates.append((p, p.grad.lerp(buf, momentum) if group["nesterov"] else buf))
            ns = (group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
            for p, update in orthogonalise(updates, *ns):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))


def orthogonalise(updates: list, coefficients, steps: int, eps: float, dtype) -> list:
    """[(param, update)] -> [(param, orthogonalised update)]: same-shaped plain tensors as one batch."""
    batches: dict = {}
    out = []
    for p, u in updates:
        if type(u) is torch.Tensor:  # (FSDP2's sharded DTensors go one at a time)
            batches.setdefault((tuple(u.shape), u.device), []).append((p, u))
        else:
            out.append((p, newton_schulz(u, coefficients, steps, eps, dtype)))
    for items in batches.values():
        x = newton_schulz(torch.stack([u for _, u in items]), coefficients, steps, eps, dtype)
        out += [(p, x[i]) for i, (p, _) in enumerate(items)]
    return out


def newton_schulz(g: torch.Tensor, coefficients, steps: int, eps: float, dtype) -> torch.Tensor:
    """Orthogonalise g, or each matrix of a batch g, (U·S'·Vᵀ with S' ≈ 1) by the quintic Newton–Schulz
    iteration in `dtype`."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    mul_add = torch.baddbmm if x.dim() == 3 else torch.addmm  # beta·input + alpha·(m1 @ m2), one operation
    for _ in range(steps):
        gram = x @ x.mT
        x = mul_add(x, mul_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a·x + (b·G + c·G²)·x
    return x.mT if tall else x


def make_optimizers(model: nn.Module, config: TrainConfig, device_type: str,
                    dtype: torch.dtype = torch.bfloat16) -> list[torch.optim.Optimizer]:
    """AdamW (decoupled weight decay on matrices only; fused into one kernel per step), plus Muon with
    --optimizer muon, orthogonalising in the training dtype (bfloat16 where the CPU multiplies it fast)."""
    groups = param_groups(model, config)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    adam_groups = [{"params": [p for _, p in groups["decay"]], "weight_decay": config.weight_decay,
                    "base_lr": config.lr},
                   {"params": [p for _, p in groups["no_decay"]], "weight_decay": 0.0, "base_lr": config.lr}]
    adam_groups = [g for g in adam_groups if g["params"]]
    optimizers = []
    if adam_groups:
        optimizers.append(torch.optim.AdamW(adam_groups, lr=config.lr, betas=(config.beta1, config.beta2),
                                            eps=1e-8, fused=True))
    if groups["muon"]:
        optimizers.append(Muon([{"params": [p for _, p in groups["muon"]], "base_lr": config.muon_lr}],
                               ns_dtype=dtype, lr=config.muon_lr, weight_decay=config.weight_decay, momentum=0.95,
                               nesterov=True))
    return optimizers


def training_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The autocast dtype: as given, or for "auto" bfloat16 on a GPU that supports it and on a CPU whose
    bfloat16 matrix products are measured faster (cpu.compute_dtype), float32 elsewhere."""
    if device.type == "cuda" and config.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return resolve_dtype(config.dtype)
