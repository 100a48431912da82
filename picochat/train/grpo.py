"""GRPO: reinforcement learning from verifiable rewards (DeepSeekMath's Group Relative Policy Optimization).

Each step, for P prompts of a task with a checker (rl_tasks.py):

    G completions per prompt, sampled at a temperature through the engine's Batcher (n from one prefill)
    r_i    = task.reward(completion_i) ∈ [0, 1]                   unit tests in the sandbox, or exact match
    A_i    = r_i − mean(r_group)          (÷ (std(r_group) + ε) with scale_by_std)
    L(θ)   = −Σ_i Σ_t A_i · log π_θ(y_i,t | x, y_i,<t) / Σ_i |y_i|       token-level normalisation (DAPO)
             + β · Σ_i Σ_t k3_i,t / Σ_i |y_i|,   k3 = exp(ref − logp) − (ref − logp) − 1   (optional KL)

A completion cut off at max_new_tokens (finish "length") is left out of the loss (DAPO's overlong
masking: its reward judges a reply that was never finished), but its reward still counts in its group's
mean. A group whose rewards are all equal has zero advantages and teaches nothing: without a KL term it is
left out of the update (DAPO's dynamic sampling, without resampling), so Σ|y_i| counts the completions that
teach. The share of such groups is logged, with the mean reward, completion length, and tokens/s of rollouts
and of training.

One update per batch of rollouts, on-policy: the policy that sampled them is the one being updated, so
PPO's importance ratio π_θ/π_old is 1 and its clipped objective's gradient is A·∇log π (no clipping to do).
log π comes from the model's own forward (reduction="none"); the KL reference is the base model, the same
weights with the LoRA adapter switched off (model/lora.adapters_off).

    picochat rl -m smollm2 --task arithmetic --steps 30 --out-dir out/rl
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .. import kernels
from ..atomic import fsync_dir, fsync_tree
from ..engine.engine import Engine
from ..engine.sampling import SamplingParams
from ..model.lora import LoRAConfig, adapters_off, lora_state_dict
from .config import TrainConfig
from .metrics import plot_curve
from .optim import lr_schedule, make_optimizers
from .rl_tasks import TASKS, Task, TaskScore, evaluate_tasks, generate_all, rewards_of, task_sets
from .sft import FineTune, start_finetune

STD_EPS = 1e-4   # keeps A finite for a group whose rewards barely differ


@dataclass
class GRPOConfig:
    task: str = "arithmetic"           # rl_tasks.TASKS
    steps: int = 30
    prompts_per_step: int = 8
    group_size: int = 8                # G completions per prompt
    max_new_tokens: int = 32           # rl_tasks.MAX_TOKENS has each task's (a code reply needs more)
    temperature: float = 0.7
    lr: float = 3e-4
    warmup_steps: int = 2
    lora_rank: int = 16                # 0: fine-tune every weight
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    kl_coef: float = 0.0               # β; 0 = no KL term
    scale_by_std: bool = False         # A_i ÷ (std + ε) (GRPO's original; Dr. GRPO leaves it out)
    grad_clip: float = 1.0
    seed: int = 0
    out_dir: str = "out/rl"
    train_prompts: int = 200           # the pool training prompts are drawn from
    eval_prompts: int = 64             # held-out tasks measured before, after and every eval_every steps
    eval_every: int = 0                # 0: before and after only
    rollout_batch: int = 32            # sequences the Batcher decodes at once
    micro_batch: int = 16              # completions per forward/backward pass
    threads: int = 0                   # 0: the cores other processes leave idle

    def validate(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r} (--task): choose from {', '.join(TASKS)}")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "rollout_batch", "micro_batch",
                     "train_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (--{name.replace('_', '-')}), got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError("--group must be at least 2: advantages compare completions of one prompt")
        if not (self.temperature > 0 and self.lr > 0):
            raise ValueError("--temperature and --lr must be positive (GRPO needs varied samples and a step size)")
        if self.kl_coef < 0 or self.eval_prompts < 0 or self.eval_every < 0 or self.lora_rank < 0:
            raise ValueError("--kl, --eval-prompts, --eval-every and --lora-rank must not be negative")
        if self.kl_coef > 0 and self.lora_rank == 0:
            raise ValueError("--kl needs LoRA (--lora-rank > 0): the reference is the base with the adapter off")

    def lora(self) -> LoRAConfig | None:
        if self.lora_rank == 0:
            return None
        return LoRAConfig(r=self.lora_rank, alpha=self.lora_alpha, target_modules=tuple(self.lora_targets))


# ----------------------------------------------------------------------------- advantages
def group_advantages(rewards: list[float], scale_by_std: bool) -> list[float]:
    """A_i = r_i − mean(r); with scale_by_std, ÷ (std(r) + ε), std over the group (population)."""
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    if not scale_by_std:
        return centred
    std = math.sqrt(sum(c * c for c in centred) / len(rewards))
    return [c / (std + STD_EPS) for c in centred]


def zero_spread_share(groups: list[list[float]]) -> float:
    """The share of groups whose rewards are all equal (all right or all wrong): their advantages are 0."""
    return sum(max(g) == min(g) for g in groups) / max(1, len(groups))


# ----------------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]     # what was sampled, with the end-of-turn token when the reply ended on one
    text: str
    truncated: bool               # cut at max_new_tokens (finish "length"): no loss
    reward: float = 0.0
    advantage: float = 0.0


@dataclass
class RolloutBatch:
    groups: list[list[Rollout]]   # G rollouts per prompt
    seconds: float                # generating (not scoring)
    tokens: int                   # completion tokens generated


def completion_of(gen, prompt_ids: list[int], end_ids: set[int]) -> Rollout:
    """A finished Generation as a Rollout; the end-of-turn token it stopped on is part of what it chose."""
    ids = list(gen.token_ids)
    if gen.finish_reason == "stop" and gen.stop_string is None and gen.last_token in end_ids:
        ids.append(gen.last_token)   # trained on too: learning when to stop is part of the reply
    return Rollout(list(prompt_ids), ids, gen.text, truncated=gen.finish_reason == "length")


def roll_out(engine: Engine, tasks: list[Task], config: GRPOConfig, step: int,
             generate: Callable = generate_all) -> RolloutBatch:
    """G sampled completions of each task through the Batcher (`generate`: rl_tasks.generate_all, or a
    scripted stand-in), their rewards and their group advantages."""
    prompts = [engine.chat_prompt(t.messages) for t in tasks]
    G = config.group_size
    choices = [[SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                               seed=((config.seed * 100_003 + step) * 1_000 + i) * G + j) for j in range(G)]
               for i in range(len(tasks))]   # a seed per completion (its draws, whatever else is batched)
    start = time.perf_counter()
    generations = generate(engine, prompts, choices, max(G, config.rollout_batch))
    seconds = time.perf_counter() - start
    end_ids = set(engine.tokenizer.end_of_turn_ids)
    groups = [[completion_of(gen, ids, end_ids) for gen in gens] for ids, gens in zip(prompts, generations)]
    rewards = rewards_of([t for t in tasks for _ in range(G)], [r.text for g in groups for r in g])
    for i, group in enumerate(groups):
        for r, reward in zip(group, rewards[i * G:(i + 1) * G]):
            r.reward = reward
        for r, a in zip(group, group_advantages([r.reward for r in group], config.scale_by_std)):
            r.advantage = a
    return RolloutBatch(groups, seconds, sum(len(g.token_ids) for gens in generations for g in gens))


# ----------------------------------------------------------------------------- the loss
def pack(rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, advantages) of rollouts: row i is prompt + completion shifted by one, right-padded;
    targets are the completion's tokens, -100 on the prompt and the padding (never scored)."""
    seqs = [r.prompt_ids + r.completion_ids for r in rollouts]
    T = max(len(s) for s in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (r, s) in enumerate(zip(rollouts, seqs)):
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        start = len(r.prompt_ids) - 1   # target at position t is token t+1: the first completion token
        y[i, start:len(s) - 1] = torch.tensor(r.completion_ids)
    return x, y, torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)


def token_logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log π(y_t | x_≤t) per position (B, T), 0 where the target is -100: the model's own per-token loss."""
    _, nll = model(x, y, reduction="none")   # −log p(y_t|x_<t), 0 where ignored
    return -nll


def policy_loss(model: nn.Module, rollouts: list[Rollout], n_tokens: int, kl_coef: float = 0.0
                ) -> tuple[torch.Tensor, float]:
    """This micro-batch's share of L(θ) (its sum over all micro-batches is the step's loss: every term is
    divided by n_tokens, the completion tokens of the whole batch) and the sum of k3 over its tokens."""
    x, y, advantages = pack(rollouts)
    mask = (y != -100).float()
    logp = token_logps(model, x, y)
    per_token = -advantages[:, None] * logp                   # −A_i · log π(y_t): ratio 1, on-policy
    kl_sum = 0.0
    if kl_coef > 0:
        with torch.no_grad(), adapters_off(model):
            ref = token_logps(model, x, y)
        d = ref - logp
        k3 = torch.exp(d) - d - 1                              # k3 ≥ 0, unbiased for KL(π‖π_ref)
        per_token = per_token + kl_coef * k3
        kl_sum = float((k3.detach() * mask).sum())
    return (per_token * mask).sum() / n_tokens, kl_sum        # Σ_{i,t} / Σ|y_i|: token-level normalisation


def accumulate_gradient(model: nn.Module, batch: list[Rollout], config: GRPOConfig) -> dict:
    """loss.backward() of L(θ) over the untruncated rollouts, a micro-batch at a time (the gradients add up
    to the whole batch's). Truncated rollouts are not even run: they carry no loss."""
    kept = [r for r in batch if not r.truncated]
    n_tokens = sum(len(r.completion_ids) for r in kept)
    stats = {"loss": 0.0, "kl": 0.0, "train_tokens": 0, "train_s": 0.0, "updated": False}
    if n_tokens == 0 or (config.kl_coef == 0 and all(r.advantage == 0 for r in kept)):
        return stats   # nothing to learn from: every completion cut off, or every group all-equal
    start = time.perf_counter()
    model.train()
    for i in range(0, len(kept), config.micro_batch):
        part = kept[i:i + config.micro_batch]
        loss, kl_sum = policy_loss(model, part, n_tokens, config.kl_coef)
        loss.backward()
        stats["loss"] += float(loss.detach())
        stats["kl"] += kl_sum / n_tokens
        stats["train_tokens"] += sum(len(r.prompt_ids) + len(r.completion_ids) - 1 for r in part)
    model.eval()
    stats["train_s"], stats["updated"] = time.perf_counter() - start, True
    return stats


def update(model: nn.Module, optimizers: list, batch: list[Rollout], config: GRPOConfig, lr: float) -> dict:
    """One optimizer step at learning rate lr on the batch's gradient (clipped to grad_clip)."""
    stats = accumulate_gradient(model, batch, config)
    if not stats["updated"]:
        return stats
    start = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.grad_clip > 0:
        stats["grad_norm"] = float(nn.utils.clip_grad_norm_(trainable, config.grad_clip))
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
    stats["train_s"] += time.perf_counter() - start
    return stats


# ----------------------------------------------------------------------------- the run
@dataclass
class GRPORun:
    config: GRPOConfig
    model: nn.Module
    engine: Engine
    optimizers: list
    finetune: FineTune
    train_tasks: list[Task]
    eval_tasks: list[Task]
    metrics: object                          # metrics.jsonl, open for appending
    rng: random.Random
    order: list[int] = field(default_factory=list)   # training prompts left in this pass over the pool
    records: list[dict] = field(default_factory=list)


@dataclass
class GRPOResult:
    steps: int
    reward_before: float | None       # mean held-out reward (None without --eval-prompts)
    reward_after: float | None
    eval_curve: list[tuple[int, float]]
    adapter: Path                     # the saved weights: out_dir/adapter (PEFT), or out_dir/model without LoRA
    metrics: Path
    seconds: float
    records: list[dict]


def grpo(base: str, config: GRPOConfig, on_record: Callable[[dict], None] | None = None) -> GRPOResult:
    """Train the model `base` (-m) with GRPO on config.task; `picochat rl` is this function."""
    config.validate()
    threads_before = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    try:
        run = set_up(base, config)
        with run.metrics:
            curve = run_steps(run, on_record)
            adapter = save_weights(run)
        reward_png(Path(config.out_dir) / "metrics.jsonl", Path(config.out_dir) / "reward.png")
    finally:
        torch.set_num_threads(threads_before)   # a library call leaves the process as it found it
    before, after = (curve[0][1], curve[-1][1]) if curve else (None, None)
    return GRPOResult(config.steps, before, after, curve, adapter, Path(config.out_dir) / "metrics.jsonl",
                      time.perf_counter() - start, run.records)


def set_up(base: str, config: GRPOConfig) -> GRPORun:
    """The float model with its adapter, an engine over it, the optimizer, and the two task sets."""
    out_dir = Path(config.out_dir)
    if (out_dir / "metrics.jsonl").exists():
        raise ValueError(f"{out_dir} already holds an RL run (metrics.jsonl): choose another --out-dir")
    train_tasks, eval_tasks = task_sets(config.task, config.train_prompts, config.eval_prompts, config.seed)
    torch.manual_seed(config.seed)   # the adapter's initialisation
    loaded, _, finetune = start_finetune(base, TrainConfig(out_dir=str(out_dir)), config.lora(), None)
    model = finetune.build_model()
    finetune.base_state = {}         # (the base's tensors: built into the model, not needed twice in memory)
    if kernels.available():
        model.use_cpu_kernels()      # generation's norms, RoPE and attention; training never uses them
    engine = Engine(model, loaded.tokenizer, speculate=False, adapt_threads=config.threads == 0)
    train_config = TrainConfig(lr=config.lr, weight_decay=0.0, optimizer="adamw")
    optimizers = make_optimizers(model, train_config, "cpu", torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
    return GRPORun(config, model, engine, optimizers, finetune, train_tasks, eval_tasks, metrics,
                   random.Random(config.seed))


def run_steps(run: GRPORun, on_record) -> list[tuple[int, float]]:
    """The held-out reward before, every eval_every steps and after; a GRPO step between. Returns the
    held-out curve [(step, mean reward)]."""
    config, curve = run.config, []
    schedule = TrainConfig(warmup_steps=config.warmup_steps, schedule="constant")
    for step in range(config.steps + 1):
        if run.eval_tasks and (step in (0, config.steps) or (config.eval_every and step % config.eval_every == 0)):
            score = evaluate_held_out(run, step, on_record)
            curve.append((step, score.mean_reward))
        if step == config.steps:
            break
        lr = config.lr * lr_schedule(step, config.steps, schedule)
        log(run, grpo_step(run, step, lr), on_record)
    return curve


def next_tasks(run: GRPORun) -> list[Task]:
    """The next prompts_per_step training tasks: passes over the pool, each in a fresh random order."""
    picked = []
    while len(picked) < run.config.prompts_per_step:
        if not run.order:
            run.order = list(range(len(run.train_tasks)))
            run.rng.shuffle(run.order)
        picked.append(run.train_tasks[run.order.pop()])
    return picked


def grpo_step(run: GRPORun, step: int, lr: float, generate: Callable = generate_all) -> dict:
    """Roll out, score, update: the step's record."""
    batch = roll_out(run.engine, next_tasks(run), run.config, step, generate)
    stats = update(run.model, run.optimizers, teaching(batch.groups, run.config.kl_coef > 0), run.config, lr)
    return step_record(step + 1, batch, stats, lr, run.config.kl_coef > 0)


def teaching(groups: list[list[Rollout]], with_kl: bool) -> list[Rollout]:
    """The rollouts the update learns from: without a KL term, a group with zero reward spread has zero
    advantages and no gradient, so it is left out (as DAPO's dynamic sampling does, without resampling):
    it costs no forward pass, and the token normalisation counts only completions that teach."""
    return [r for g in groups if with_kl or max(r.reward for r in g) > min(r.reward for r in g) for r in g]


def step_record(step: int, batch: RolloutBatch, stats: dict, lr: float, with_kl: bool) -> dict:
    """What metrics.jsonl holds for one step."""
    rollouts = [r for g in batch.groups for r in g]
    record = {"step": step, "reward": sum(r.reward for r in rollouts) / len(rollouts),
              "zero_spread": zero_spread_share([[r.reward for r in g] for g in batch.groups]),
              "length": sum(len(r.completion_ids) for r in rollouts) / len(rollouts),
              "truncated": sum(r.truncated for r in rollouts) / len(rollouts),
              "rollout_tok_s": batch.tokens / max(batch.seconds, 1e-9),
              # training tokens: every position forwarded (prompt and completion) of the untruncated rollouts
              "train_tok_s": stats["train_tokens"] / stats["train_s"] if stats["train_s"] else 0.0,
              "rollout_s": batch.seconds, "train_s": stats["train_s"], "loss": stats["loss"], "lr": lr,
              "updated": stats["updated"]}
    if with_kl:
        record["kl"] = stats["kl"]
    return record


def evaluate_held_out(run: GRPORun, step: int, on_record) -> TaskScore:
    score = evaluate_tasks(run.engine, run.eval_tasks, run.config.max_new_tokens, run.config.rollout_batch)
    log(run, {"step": step, "eval_reward": score.mean_reward, "eval_s": score.seconds}, on_record)
    return score


def log(run: GRPORun, record: dict, on_record):
    run.records.append(record)
    run.metrics.write(json.dumps(record) + "\n")
    run.metrics.flush()
    if on_record is not None:
        on_record(record)


# ----------------------------------------------------------------------------- results
def save_weights(run: GRPORun) -> Path:
    """The trained weights as out_dir/adapter (a PEFT adapter folder) or, without LoRA, out_dir/model (a
    Hugging Face folder), written beside it first and renamed into place: a crash leaves the old folder or
    none, never half of one."""
    final = Path(run.config.out_dir) / ("adapter" if run.finetune.lora is not None else "model")
    tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    state = lora_state_dict(run.model) if run.finetune.lora is not None else run.model.state_dict()
    run.finetune.save_weights(tmp, state, run.engine.tokenizer)
    fsync_tree(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def reward_png(metrics_path: Path, png_path: Path) -> Path:
    """Mean rollout reward per step (a few prompts each: a noisy mean, smoothed) and the held-out reward."""
    return plot_curve(metrics_path, png_path, ("reward", "rollout reward (sampled)"),
                      ("eval_reward", "held-out reward (greedy)"), "mean reward", smoothing=0.8, ylim=(-0.02, 1.02))
