"""A LoRA adapter on a quantized model: kept beside the integer codes (now) against folded into float weights
(what picochat did before, and what a merged checkpoint gives), with the base model alone beside them.

    python benchmarks/adapter.py                              # SmolLM2-135M (Q4_1)
    python benchmarks/adapter.py --model qwen2.5-coder-1.5b   # the default model (needs ~8 GB for the float row)

The adapter is random (rank 16, alpha 32, on q/k/v/o as `picochat tune` trains it; B ~ N(0, 0.02)): what is
measured is its cost, not what it learnt. Each system runs in a fresh process (its own peak memory): the
second load (the first may convert the GGUF), prefill of a 512-token prompt, greedy decode of 128 tokens from a
chat prompt (plain decoding, no drafts), and its logits on a text, compared with the float32 fold's (exactly W + (alpha/r)·BA).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line, finish_report, log  # noqa: E402

SYSTEMS = {"base": "the base model alone (packed)",
           "kept": "adapter kept beside the packed weights (now)",
           "folded": "adapter folded into float weights (before)",
           "exact": "adapter folded into float32 weights"}
TEXT = "The shop opens at nine on Saturdays and closes at five. 书店周日休息。 def add(a, b):\n    return a + b\n"


def write_random_adapter(model: str, folder: Path, rank: int) -> Path:
    from picochat.formats.peft import write_adapter
    from picochat.load import load
    from picochat.model.lora import LoRAConfig
    config = load(model, draft=None).model.config
    kv = config.n_kv_head * config.head_dim
    shapes = {"q_proj": (config.n_embd, config.n_head * config.head_dim), "k_proj": (config.n_embd, kv),
              "v_proj": (config.n_embd, kv), "o_proj": (config.n_head * config.head_dim, config.n_embd)}
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(config.n_layer):
        for name, (n_in, n_out) in shapes.items():
            sd[f"layers.{i}.attn.{name}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
            sd[f"layers.{i}.attn.{name}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.02
    lora = LoRAConfig(r=rank, alpha=2.0 * rank, target_modules=tuple(shapes))
    return write_adapter(folder, lora, config, sd, model)


def run_one(system: str, model: str, adapter: str, threads: int, logits_out: str) -> dict:
    """Measured in this process (run as a child: its peak memory is its own)."""
    from picochat.engine.engine import Engine
    from picochat.engine.sampling import SamplingParams
    from picochat.load import load
    torch.set_num_threads(threads)
    kwargs = {"base": {}, "kept": {"adapter": adapter}, "folded": {"adapter": adapter, "quantized": False},
              "exact": {"adapter": adapter, "quantized": False, "dtype": "float32"}}[system]
    load(model, draft=None, **kwargs)
    t = time.perf_counter()
    lm = load(model, draft=None, **kwargs)
    load_s = time.perf_counter() - t
    engine = Engine(lm.model, lm.tokenizer, speculate=False, adapt_threads=False)
    prompt = (lm.tokenizer.encode(TEXT) * 100)[:512]
    chat = engine.chat_prompt([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    prefill, decode = [], []
    for _ in range(2):
        engine.reset()
        gen = engine.complete(prompt, SamplingParams(temperature=0, max_new_tokens=1, stop_token_ids=[]))
        prefill.append(len(prompt) / gen.stats.time_to_first_token)
        engine.reset()
        gen = engine.complete(chat, SamplingParams(temperature=0, max_new_tokens=128, stop_token_ids=[]))
        decode.append(gen.stats.tokens_per_s)
    with torch.inference_mode():
        logits = lm.model(torch.tensor([lm.tokenizer.encode(TEXT)]))[0].float()
    torch.save(logits, logits_out)
    return {"system": system, "weights": lm.weights, "dtype": str(lm.dtype).removeprefix("torch."),
            "load_s": load_s, "prefill_tok_s": max(prefill), "decode_tok_s": max(decode),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["system"] == "base")
    lines = [f"{'system':47} {'weights':>17} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} "
             f"{'× base':>7} {'peak RSS MB':>12} {'logits vs the float32 fold':>27}", "-" * 152]
    for r in rows:
        lines.append(f"{SYSTEMS[r['system']]:47} {r['weights'] + ', ' + r['dtype']:>17} {r['load_s']:7.2f} "
                     f"{r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} "
                     f"{r['decode_tok_s'] / base['decode_tok_s']:6.2f}× {r['peak_rss_mb']:12.0f} {r['vs_exact']:>27}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="runs of the base and the kept adapter, alternating")
    p.add_argument("--json", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)   # (a child's system)
    p.add_argument("--adapter", default=None, help=argparse.SUPPRESS)
    p.add_argument("--logits", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.adapter, args.threads, args.logits)))
        return
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = write_random_adapter(args.model, Path(tmp) / "adapter", args.rank)
        runs, logits = {}, {}
        # the quick systems alternate `--rounds` times (this VM's speed drifts by minutes); the float ones once
        order = ["base", "kept"] * args.rounds + ["folded", "exact"]
        for i, system in enumerate(order):
            log(f"{system} ({i + 1}/{len(order)}) ...")
            out = subprocess.run([sys.executable, __file__, "--one", system, "--model", args.model, "--adapter",
                                  str(adapter), "--threads", str(args.threads), "--logits", f"{tmp}/{system}.pt"],
                                 capture_output=True, text=True, check=True)
            runs.setdefault(system, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
            logits[system] = torch.load(f"{tmp}/{system}.pt")
    rows = [max(runs[s], key=lambda r: r["decode_tok_s"]) for s in SYSTEMS]   # each system's best run
    want = logits["exact"]
    for r in rows:  # relative distance of the logits, and the share of positions with the same top token
        got = logits[r["system"]]
        rel = float((got - want).norm() / want.norm())
        same = float((got.argmax(-1) == want.argmax(-1)).float().mean())
        r["vs_exact"] = "—" if r["system"] == "exact" else f"{rel:.4f}, top {same:.0%}"
    report = (f"{cpu_line()}\n{args.model}, LoRA r={args.rank} on q/k/v/o (random), {args.threads} threads, greedy, "
              f"plain decoding; prefill: 512 tokens; decode: 128 tokens; the base and the kept adapter: best of "
              f"{args.rounds} alternating runs\n\n{table(rows)}")
    finish_report(report, time.perf_counter() - start, args.json, {"rows": rows})


if __name__ == "__main__":
    main()
