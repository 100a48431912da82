"""Preference tuning on the shop (CPU): does DPO fix what the SFT LoRA gets wrong?

    python benchmarks/dpo_shop.py                      # SmolLM2-135M-Instruct, ~10 minutes on 2 cores
    python benchmarks/dpo_shop.py --json out/bench/dpo_shop.json

1. SFT: a LoRA on the shop's training questions (3 paraphrases of each of 42 facts), as the fine-tuning
   demonstration (benchmarks/sft_demo.py faq) trains it.
2. Its answers to the *training* questions, --samples of each at --temperature (greedy, it has learnt them
   nearly all): each distinct wrong one (no key string) becomes a preference pair, chosen = the fact's
   answer, rejected = what the model said (often a near neighbour: the refund question answered with the
   return window).
3. DPO: the SFT model (the adapter folded in) is the reference; a new LoRA on it is trained on the pairs,
   the reference being that same model with the new adapter switched off.
4. Held-out accuracy (the one held-out paraphrase of each fact) of the SFT LoRA alone and after DPO, side by
   side in this one run, and on the training questions (what the pairs were made from).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_line, log  # noqa: E402
from sft_demo import FACTS, SYSTEM, faq_conversations  # noqa: E402

from picochat.backends import LocalModel  # noqa: E402
from picochat.data.preferences import encode_reply  # noqa: E402
from picochat.engine.engine import Engine  # noqa: E402
from picochat.engine.sampling import SamplingParams  # noqa: E402
from picochat.formats.hf import save_hf_folder  # noqa: E402
from picochat.load import load  # noqa: E402
from picochat.model.lora import LoRAConfig  # noqa: E402
from picochat.train.dpo import dpo, dpo_defaults  # noqa: E402
from picochat.train.sft import sft, sft_defaults  # noqa: E402


def answers(engine: Engine, split: str, samples: int = 1, temperature: float = 0.0) -> list[dict]:
    """Replies to the held-out (1 per fact) or training (3 per fact) questions, checked by key strings: greedy,
    or `samples` draws at `temperature` of each (all through the engine's batcher)."""
    items = [(answer, keys, q) for answer, keys, questions in FACTS
             for q in (questions[3:] if split == "held_out" else questions[:3])]
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for _, _, q in items]
    params = SamplingParams(max_new_tokens=40, temperature=temperature, seed=0)
    replies = LocalModel(engine, batch_size=16).generate(prompts, params, n=samples)
    return [{"question": q, "answer": answer, "reply": reply, "correct": all(k in reply.lower() for k in keys)}
            for (answer, keys, q), texts in zip(items, replies) for reply in texts]


def likeliest_wrong_answers(engine: Engine) -> list[dict]:
    """For each training question, the other fact's answer the model itself finds likeliest (per token): its
    near neighbour, even where its greedy reply is right."""
    rows = []
    for i, (answer, keys, questions) in enumerate(FACTS):
        for q in questions[:3]:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
            scores = []
            for j, (other, _, _) in enumerate(FACTS):
                if j != i:
                    ids, mask = encode_reply(engine.tokenizer, messages, other)
                    start = int(mask.argmax())
                    logps = engine.continuation_logprobs([int(t) for t in ids[:start]], [int(t) for t in ids[start:]])
                    scores.append((sum(t.logprob for t in logps) / len(logps), other))
            rows.append({"question": q, "answer": answer, "reply": max(scores)[1], "correct": False})
    return rows


def accuracy(rows: list[dict]) -> float:
    return sum(r["correct"] for r in rows) / len(rows)


def engine_of(path: str, dtype) -> Engine:
    model = load(path, dtype=dtype, draft=None)
    return Engine(model.model, model.tokenizer)


def train_sft(args, out: Path) -> Path:
    if args.reuse_sft and (out / "sft" / "latest").is_file():   # tuning the DPO half: the same SFT adapter
        return out / "sft" / (out / "sft" / "latest").read_text().strip()
    shutil.rmtree(out / "sft", ignore_errors=True)
    data = out / "shop_train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in faq_conversations("train")))
    config = dataclasses.replace(sft_defaults(True), out_dir=str(out / "sft"), batch_size=4, seq_len=128,
                                 max_steps=args.sft_steps, lr=1e-3, warmup_steps=5, eval_interval=0,
                                 sample_interval=0, sample_tokens=0, checkpoint_interval=0, threads=args.threads)
    lora = LoRAConfig(r=16, alpha=32, target_modules=tuple(args.targets.split(",")))
    return sft("smollm2", str(data), config, lora=lora, val_fraction=0.0).checkpoint


def pairs_from_mistakes(sampled: list[dict]) -> list[dict]:
    """A pair for each distinct wrong reply the model sampled to a training question: the fact over it."""
    pairs, seen = [], set()
    for r in sampled:
        if not r["correct"] and (r["question"], r["reply"]) not in seen:
            seen.add((r["question"], r["reply"]))
            pairs.append({"messages": [{"role": "system", "content": SYSTEM},
                                       {"role": "user", "content": r["question"]}],
                          "chosen": r["answer"], "rejected": r["reply"]})
    return pairs


def train_dpo(args, out: Path, sft_adapter: Path, pairs: list[dict]) -> Path:
    shutil.rmtree(out / "dpo", ignore_errors=True)
    merged = out / "sft-merged"       # the SFT model as a plain model: DPO's base and (adapter off) its reference
    folded = load(str(sft_adapter), dtype=torch.float32, quantized=False, fuse=False, draft=None)
    save_hf_folder(folded.model, merged, tokenizer=folded.tokenizer)
    data = out / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    config = dataclasses.replace(dpo_defaults(True), out_dir=str(out / "dpo"), batch_size=4, seq_len=128,
                                 max_steps=args.dpo_steps, lr=args.lr, warmup_steps=5, eval_interval=0,
                                 sample_interval=0, sample_tokens=0, checkpoint_interval=0, threads=args.threads)
    lora = LoRAConfig(r=16, alpha=32, target_modules=tuple(args.targets.split(",")))
    return dpo(str(merged), str(data), config, lora=lora, beta=args.beta, loss_type=args.loss,
               val_fraction=0.0, sft_weight=args.sft_weight).checkpoint


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/dpo-shop")
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--dpo-steps", type=int, default=60)
    p.add_argument("--samples", type=int, default=4, help="replies sampled per training question for mistakes")
    p.add_argument("--temperature", type=float, default=1.0, help="of those samples")
    p.add_argument("--neighbours", action=argparse.BooleanOptionalAction, default=True,
                   help="also a pair per training question with the wrong answer the model finds likeliest")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo", "simpo"])
    p.add_argument("--sft-weight", type=float, default=1.0, help="RPO's α: the chosen reply's SFT loss added")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="of the measuring model (auto: what is fastest here)")
    p.add_argument("--reuse-sft", action="store_true", help="reuse --out's SFT adapter (to try DPO settings)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reused = args.reuse_sft and (out / "sft" / "latest").is_file()
    sft_adapter = train_sft(args, out)
    sft_s = f"{time.perf_counter() - t0:.0f} s" if not reused else "(an earlier run's)"
    cached = out / "sft_answers.json"   # with --reuse-sft: the SFT model's answers and pairs, as measured before
    if args.reuse_sft and cached.is_file():
        sft_held, sft_train, sampled, pairs = json.loads(cached.read_text())
    else:
        engine = engine_of(str(sft_adapter), args.dtype)
        sft_held, sft_train = answers(engine, "held_out"), answers(engine, "train")
        sampled = answers(engine, "train", args.samples, args.temperature)
        pairs = pairs_from_mistakes(sampled + (likeliest_wrong_answers(engine) if args.neighbours else []))
        cached.write_text(json.dumps([sft_held, sft_train, sampled, pairs]))
    log(f"SFT LoRA: held-out {accuracy(sft_held):.1%}, training questions {accuracy(sft_train):.1%} greedy, "
        f"{accuracy(sampled):.1%} sampled: {len(pairs)} pairs from its mistakes")
    t1 = time.perf_counter()
    dpo_adapter = train_dpo(args, out, sft_adapter, pairs)
    dpo_s = time.perf_counter() - t1
    engine = engine_of(str(dpo_adapter), args.dtype)
    dpo_held, dpo_train = answers(engine, "held_out"), answers(engine, "train")
    table = "\n".join([
        cpu_line(),
        "# SmolLM2-135M-Instruct, the shop's 42 facts: greedy replies that contain the fact's key string",
        "| model | held-out accuracy (42) | training questions (126) | training time |",
        "|---|---|---|---|",
        f"| SFT LoRA alone ({args.sft_steps} steps) | **{accuracy(sft_held):.1%}** | {accuracy(sft_train):.1%} "
        f"| {sft_s} |",
        f"| + DPO on {len(pairs)} pairs from its own mistakes ({args.dpo_steps} steps, β {args.beta}, "
        f"{args.loss}, SFT weight {args.sft_weight}) | **{accuracy(dpo_held):.1%}** | {accuracy(dpo_train):.1%} "
        f"| + {dpo_s:.0f} s |"])
    print(table)
    fixed = [r["question"] for a, b in zip(sft_held, dpo_held) if not a["correct"] and b["correct"] for r in [a]]
    broken = [r["question"] for a, b in zip(sft_held, dpo_held) if a["correct"] and not b["correct"] for r in [a]]
    print(f"\nheld-out fixed by DPO: {len(fixed)}; broken by DPO: {len(broken)}")
    record = {"table": table, "pairs": pairs, "sft_held_out": sft_held, "dpo_held_out": dpo_held,
              "fixed": fixed, "broken": broken, "settings": vars(args)}
    (out / "dpo_shop.json").write_text(json.dumps(record, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
