"""`picochat rl`: reinforcement learning with verifiable rewards, GRPO (train/grpo.py)."""
from __future__ import annotations

import sys

HELP = "reinforcement learning (GRPO) on generated tasks whose answers a checker verifies"
DESCRIPTION = ("GRPO: for each prompt a group of completions is sampled, each scored by a checker (exact match for "
               "arithmetic and reversed letters; unit tests run in the sandbox for code), and the model moves "
               "towards the completions that beat their group's mean. Trains a LoRA adapter (PEFT format) and "
               "reports the mean reward on held-out generated tasks before and after.")


def add_arguments(p):
    p.add_argument("-m", "--model", default=None, help="the base model: folder, .gguf or packaged name")
    p.add_argument("--task", choices=["arithmetic", "reverse", "code"], default="arithmetic",
                   help="the generated tasks to train on (default arithmetic)")
    p.add_argument("--steps", type=int, default=30, help="GRPO steps (default 30)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (default 8)")
    p.add_argument("--group", type=int, default=8, help="completions sampled per prompt, G (default 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="longest completion; longer ones are cut off and "
                                                                 "left out of the loss (default: 32 for arithmetic, "
                                                                 "24 for reverse, 128 for code)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of rollouts (default 0.7)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16; 0 = every weight)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 × rank)")
    p.add_argument("--kl", type=float, default=0.0, help="KL coefficient β to the base model (default 0: off)")
    p.add_argument("--scale-by-std", action="store_true", help="divide advantages by their group's std")
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out tasks measured before and after "
                                                                 "(default 64; 0 = none)")
    p.add_argument("--eval-every", type=int, default=0, help="also measure every N steps (default 0: no)")
    p.add_argument("--out-dir", default="out/rl", help="metrics.jsonl, reward.png and adapter/ (default out/rl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: the cores others leave idle)")


def run(args) -> int:
    from ..train.grpo import GRPOConfig, grpo
    from ..train.rl_tasks import MAX_TOKENS
    config = GRPOConfig(task=args.task, steps=args.steps, prompts_per_step=args.prompts, group_size=args.group,
                        max_new_tokens=args.max_tokens or MAX_TOKENS[args.task], temperature=args.temperature,
                        lr=args.lr, lora_rank=args.lora_rank,
                        lora_alpha=float(args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank),
                        kl_coef=args.kl, scale_by_std=args.scale_by_std, seed=args.seed, out_dir=args.out_dir,
                        eval_prompts=args.eval_prompts, eval_every=args.eval_every, threads=args.threads)
    result = grpo(args.model, config, on_record=show_record)
    if result.reward_before is not None:
        print(f"held-out mean reward ({args.eval_prompts} {args.task} tasks, greedy): "
              f"{result.reward_before:.3f} -> {result.reward_after:.3f}", file=sys.stderr)
    print(f"{result.steps} steps in {result.seconds:.0f} s; metrics in {result.metrics}", file=sys.stderr)
    print(result.adapter)
    return 0


def show_record(record: dict):
    """One line per step (and per held-out evaluation), on stderr: stdout holds only the adapter's path."""
    if "eval_reward" in record:
        print(f"step {record['step']}: held-out reward {record['eval_reward']:.3f}", file=sys.stderr)
        return
    kl = f"  kl {record['kl']:.4f}" if "kl" in record else ""
    print(f"step {record['step']}: reward {record['reward']:.3f}  zero-spread {record['zero_spread']:.2f}  "
          f"length {record['length']:.1f}  rollout {record['rollout_tok_s']:.0f} tok/s  "
          f"train {record['train_tok_s']:.0f} tok/s{kl}", file=sys.stderr, flush=True)
