"""GRPO with verifiable rewards on a small instruct model (CPU): does the held-out reward move, and what broke?

    python benchmarks/grpo.py                              # SmolLM2-135M-Instruct, arithmetic, ~10 min on 2 cores
    python benchmarks/grpo.py --steps 4 --eval-prompts 16  # a smoke run

1. The held-out mean reward (rl_tasks: prompts from other seeds than training's, none shared by text),
   greedy, before training, every --eval-every steps, and after.
2. Per step: mean rollout reward, the share of groups with zero reward spread, completion length, rollout
   and training tokens/s.
3. A fixed task before and after, to show nothing else broke: bits per byte of the base and of the trained
   model (its adapter folded in) on held-out ShareGPT text (eval/tasks.held_out_text).
Writes a Markdown report to --report (default out/bench/grpo.md) and prints it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line, log  # noqa: E402


def bits_per_byte_of(model_name: str, text: str, max_tokens: int):
    """eval/tasks.bits_per_byte of a model (an adapter folder: its base with the adapter folded in), float32."""
    import torch
    from picochat.eval.tasks import bits_per_byte
    from picochat.load import load
    loaded = load(model_name, dtype=torch.float32, quantized=False, draft=None)
    return bits_per_byte(loaded.model, loaded.tokenizer, text, window=512, max_tokens=max_tokens)


def curve_rows(records: list[dict]) -> list[str]:
    """One Markdown row per step (and per held-out evaluation)."""
    held_out = {r["step"]: r["eval_reward"] for r in records if "eval_reward" in r}
    rows = []
    for r in (r for r in records if "reward" in r):
        evaluated = f"{held_out[r['step']]:.3f}" if r["step"] in held_out else ""
        rows.append(f"| {r['step']} | {r['reward']:.3f} | {r['zero_spread']:.2f} | {r['length']:.1f} | "
                    f"{r['truncated']:.2f} | {r['rollout_tok_s']:.0f} | {r['train_tok_s']:.0f} | {evaluated} |")
    return rows


def report(args, result, bpb: tuple, seconds: float) -> str:
    steps = [r for r in result.records if "reward" in r]
    rollout_s, train_s = sum(r["rollout_s"] for r in steps), sum(r["train_s"] for r in steps)
    eval_s = sum(r["eval_s"] for r in result.records if "eval_s" in r)
    rollout_tok = sum(r["rollout_tok_s"] * r["rollout_s"] for r in steps)
    train_tok = sum(r["train_tok_s"] * r["train_s"] for r in steps)
    lines = [cpu_line(), "", f"## GRPO on {args.model}, task {args.task}", "",
             f"{args.steps} steps × {args.prompts} prompts × {args.group} completions (≤ {args.max_tokens} tokens, "
             f"temperature {args.temperature}), LoRA r={args.lora_rank}, lr {args.lr}, kl {args.kl}, "
             f"scale-by-std {args.scale_by_std}; held-out set: {args.eval_prompts} prompts, greedy.", "",
             "| measure | before | after |", "|---|---|---|",
             f"| held-out mean reward ({args.task}) | {result.reward_before:.3f} | {result.reward_after:.3f} |",
             f"| bits per byte, held-out ShareGPT text ({bpb[0].tokens:,} tokens) | {bpb[0].bits_per_byte:.4f} | "
             f"{bpb[1].bits_per_byte:.4f} |", "",
             "| time | seconds | tokens/s |", "|---|---|---|",
             f"| rollouts (sampling, through the Batcher) | {rollout_s:.0f} | {rollout_tok / max(rollout_s, 1e-9):.0f} |",
             f"| training (forward + backward + step) | {train_s:.0f} | {train_tok / max(train_s, 1e-9):.0f} |",
             f"| held-out evaluations | {eval_s:.0f} | |",
             f"| whole benchmark | {seconds:.0f} | |", "",
             "| step | rollout reward | zero-spread groups | length | truncated | rollout tok/s | train tok/s | "
             "held-out |", "|---|---|---|---|---|---|---|---|", *curve_rows(result.records), "",
             f"Adapter: `{result.adapter}`; curve: `{Path(result.metrics).parent / 'reward.png'}`."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default="arithmetic", choices=["arithmetic", "reverse", "code"])
    p.add_argument("--steps", type=int, default=30, help="GRPO steps (the size: ~10 minutes on 2 cores)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="default: the task's (rl_tasks.MAX_TOKENS)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--kl", type=float, default=0.0)
    p.add_argument("--scale-by-std", action="store_true")
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--text-tokens", type=int, default=4096, help="tokens of held-out text for bits per byte")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="out/bench/grpo-run")
    p.add_argument("--report", default="out/bench/grpo.md")
    args = p.parse_args()
    print(cpu_line(), flush=True)
    from picochat.eval.tasks import held_out_text
    from picochat.train.grpo import GRPOConfig, grpo
    from picochat.train.rl_tasks import MAX_TOKENS
    args.max_tokens = args.max_tokens or MAX_TOKENS[args.task]
    start = time.perf_counter()
    shutil.rmtree(args.out, ignore_errors=True)   # the benchmark's own run folder: each run starts afresh
    config = GRPOConfig(task=args.task, steps=args.steps, prompts_per_step=args.prompts, group_size=args.group,
                        max_new_tokens=args.max_tokens, temperature=args.temperature, lr=args.lr,
                        lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank, kl_coef=args.kl,
                        scale_by_std=args.scale_by_std, seed=args.seed, out_dir=args.out,
                        eval_prompts=args.eval_prompts, eval_every=args.eval_every, threads=args.threads)
    result = grpo(args.model, config, on_record=lambda r: log(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float)
                                                                          else v for k, v in r.items()})))
    text = held_out_text("sharegpt", chars=4 * args.text_tokens + 4000)
    bpb = (bits_per_byte_of(args.model, text, args.text_tokens), bits_per_byte_of(str(result.adapter), text,
                                                                                  args.text_tokens))
    markdown = report(args, result, bpb, time.perf_counter() - start)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
