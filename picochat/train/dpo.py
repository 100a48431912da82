"""Preference tuning (DPO): teach a model which of two replies is better, on the one training loop.

For a prompt x with a chosen reply y_c and a rejected one y_r, DPO (Rafailov et al., 2023) raises the
policy's log-probability ratio to a frozen reference on y_c over the same ratio on y_r:

    r(y) = β · (log π_θ(y|x) − log π_ref(y|x))          the implicit reward of a reply
    L    = −log σ(r(y_c) − r(y_r))                       sigmoid (DPO)
    L    = ((r(y_c) − r(y_r)) / β − 1/(2β))²             IPO: a target margin instead of an ever-larger one
    L    = −log σ(β/|y_c| log π(y_c) − β/|y_r| log π(y_r) − γ)   SimPO: length-normalised, no reference

With sft_weight α > 0 (RPO, Pang et al., 2024), α · (−log π(y_c|x) / |y_c|) is added: the chosen reply's own
SFT loss, which keeps DPO from lowering the likelihood of good replies along with the bad (it otherwise
loses fluency on a small model).

log π(y|x) is the sum of the model's own per-token log-probabilities over the reply's tokens (its forward
with reduction="none": the SFT masking, no second scoring path). The reference is the frozen base: with
LoRA the same weights with the adapter switched off (model/lora.adapters_off: no second copy in memory);
fully fine-tuned, a frozen copy.

    picochat dpo -m smollm2 --data pairs.jsonl --out-dir out/dpo --lora-rank 16
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.preferences import PairStream, load_pairs, prepare_pairs
from ..formats.peft import read_adapter
from ..model.lora import LoRAConfig, adapters_off
from .loop import train
from .sft import needs_data, sft_defaults, start_finetune

LOSSES = ("sigmoid", "ipo", "simpo")


def preference_losses(logps: torch.Tensor, ref_logps: torch.Tensor | None, lengths: torch.Tensor, beta: float,
                      loss_type: str = "sigmoid", gamma: float = 0.5):
    """Per-pair losses and the chosen / rejected rewards from sequence log-probabilities of 2P rows (the P
    chosen replies, then their P rejected ones). lengths: tokens of each reply (SimPO's normalisation)."""
    P = len(logps) // 2
    if loss_type == "simpo":
        rewards = beta * logps / lengths.clamp(min=1)          # r = β/|y| · log π(y|x)
        return -F.logsigmoid(rewards[:P] - rewards[P:] - gamma), rewards[:P], rewards[P:]
    rewards = beta * (logps - ref_logps)                       # r = β · (log π(y|x) − log π_ref(y|x))
    margin = rewards[:P] - rewards[P:]
    if loss_type == "ipo":
        losses = (margin / beta - 1 / (2 * beta)) ** 2         # (h − 1/(2β))², h the log-ratio margin
    else:
        losses = -F.logsigmoid(margin)                         # −log σ(r_c − r_r)
    return losses, rewards[:P], rewards[P:]


def sequence_logps(forward, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(reply|prompt) of each row, its reply's length): Σ_t log p(y_t | x_<t) over targets not -100."""
    x, y = batch
    _, nll = forward(x, y, reduction="none")                   # −log p(y_t|x_<t) per position, 0 where -100
    return -nll.sum(dim=-1), (y != -100).sum(dim=-1)


@dataclass
class DPO:
    """The training loop's objective for preference pairs (PairStream's batches); see the module's formulas."""
    beta: float = 0.1
    loss_type: str = "sigmoid"
    gamma: float = 0.5                    # SimPO's target margin
    sft_weight: float = 0.0               # α of the chosen reply's SFT loss added (RPO); 0: plain DPO
    reference: nn.Module | None = None    # a frozen copy of the base (full fine-tuning); None: adapters off

    def __post_init__(self):
        if self.loss_type not in LOSSES:
            raise ValueError(f"unknown preference loss {self.loss_type!r}; choose from {', '.join(LOSSES)}")
        if self.beta <= 0:
            raise ValueError(f"--beta must be positive, got {self.beta}")
        if self.sft_weight < 0:
            raise ValueError(f"--sft-weight must not be negative, got {self.sft_weight}")

    def weight(self, batch) -> int:
        """Pairs that count: those whose chosen row has reply tokens (not the epoch's top-up)."""
        y = batch[1]
        return int((y[:len(y) // 2] != -100).any(dim=-1).sum())

    def reference_logps(self, forward, model, batch) -> torch.Tensor | None:
        if self.loss_type == "simpo":
            return None
        with torch.no_grad():
            if self.reference is not None:
                return sequence_logps(self.reference.to(batch[0].device), batch)[0]
            with adapters_off(model):
                return sequence_logps(forward, batch)[0]

    def pair_terms(self, forward, model, batch):
        """(per-pair losses, chosen rewards, rejected rewards, which pairs count)."""
        ref = self.reference_logps(forward, model, batch)
        logps, lengths = sequence_logps(forward, batch)
        losses, chosen, rejected = preference_losses(logps, ref, lengths, self.beta, self.loss_type, self.gamma)
        P = len(logps) // 2
        if self.sft_weight > 0:
            losses = losses - self.sft_weight * logps[:P] / lengths[:P].clamp(min=1)   # + α · NLL(y_c) / |y_c|
        return losses, chosen, rejected, (batch[1][:P] != -100).any(dim=-1)

    def loss(self, forward, model, batch):
        losses, chosen, rejected, counted = self.pair_terms(forward, model, batch)
        n = counted.sum().clamp(min=1)
        mean = lambda t: (t.detach().float() * counted).sum() / n  # noqa: E731 - the statistics' mean
        stats = {"reward_margin": mean(chosen - rejected), "accuracy": mean((chosen > rejected).float()),
                 "chosen_reward": mean(chosen), "rejected_reward": mean(rejected)}
        return (losses * counted).sum() / n, stats

    def validate(self, model, batches, run, reduce) -> dict:
        """Held-out pairs: mean loss, reward margin and how often the chosen reply wins (each pair once)."""
        device = next(model.parameters()).device
        totals = torch.zeros(4, dtype=torch.float64, device=device)   # loss, margin, wins, pairs
        with torch.no_grad():
            for batch in batches:
                batch = tuple(t.to(device) for t in batch)
                with run.autocast:
                    losses, chosen, rejected, counted = self.pair_terms(model, model, batch)
                margin = (chosen - rejected).double()
                totals += torch.stack([(losses.double() * counted).sum(), (margin * counted).sum(),
                                       ((margin > 0) & counted).sum().double(), counted.sum().double()])
        if reduce is not None:
            reduce(totals)
        loss, margin, wins, n = totals.tolist()
        n = max(n, 1)
        return {"val_loss": loss / n, "val_margin": margin / n, "val_accuracy": wins / n}


def dpo_defaults(lora: bool):
    """Training settings for preference tuning (flags override them): small steps from a tuned model."""
    return dataclasses.replace(sft_defaults(lora), batch_size=4, max_steps=100, lr=2e-4 if lora else 5e-6,
                               warmup_steps=10, eval_interval=25, checkpoint_interval=50)


def dpo(base: str, data: str, config, lora: LoRAConfig | None = None, beta: float = 0.1, loss_type: str = "sigmoid",
        val_fraction: float = 0.1, resume=None, on_record: Callable[[dict], None] | None = None,
        start_adapter=None, sft_weight: float = 0.0):
    """Preference-tune the model `base` (-m argument) on pairs; `picochat dpo` is this function.

    config: a train.TrainConfig (batch_size counts pairs); the encoded pairs go to out_dir/data.
    start_adapter: a LoRA adapter folder of `base` to go on training (its rank and targets replace `lora`);
    the reference stays the base itself. Returns train.TrainResult (val_loss is the held-out pairs' DPO
    loss; metrics.jsonl also has val_margin and val_accuracy: how often the chosen reply's reward is higher).
    """
    objective = DPO(beta=beta, loss_type=loss_type, sft_weight=sft_weight)   # checked before the model loads
    loaded, config, finetune = start_finetune(base, config, lora, resume)
    if start_adapter is not None:
        finetune.lora, finetune.start, _ = read_adapter(start_adapter, finetune.model_config)
    if needs_data(config, resume):
        prepare_pairs(load_pairs(data), loaded.tokenizer, config.data_dir, val_fraction, config.seed, [str(data)])
    del loaded
    if finetune.lora is None and loss_type != "simpo":  # full fine-tuning: the reference is a frozen copy of the base
        objective.reference = finetune.build_model().eval().requires_grad_(False)
    return train(config, finetune.model_config, resume=resume, on_record=on_record, stream=PairStream,
                 finetune=finetune, objective=objective)
