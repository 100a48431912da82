"""Decode benchmark: picochat against transformers, both loading the same SmolLM2 GGUF, on the CPU.

    python benchmarks/decode.py                      # all four systems, 2 threads, medians of 3
    python benchmarks/decode.py --systems picochat-bf16 transformers-bf16 --json out.json

For each system, in this one process and measured the same way (batch 1):
  * load s        picochat.models.load(path, dtype) / AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)
  * prefill tok/s one forward over a 512-token prompt with a KV cache, up to the last position's logits
                  (picochat: Engine time_to_first_token with max_new_tokens=1; transformers: forward with
                  use_cache=True, logits_to_keep=1, which is what generate() does for its prefill)
  * decode tok/s  greedy generation of exactly 128 new tokens (EOS ignored) from a short chat prompt:
                  tokens after the first / seconds after the first
Medians of --repeats runs, after one warm-up. Both systems get the same token ids (picochat's tokenizer).
"""
import argparse
import gc
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on the hub
os.environ.setdefault("TQDM_DISABLE", "1")    # transformers' GGUF de-quantizing bar ignores its own switch
import torch

import picochat
from common import cpu_model, finish_report, log
from picochat.engine import Engine, SamplingParams
from picochat.models import find_packaged, load

SYSTEMS = ["picochat-bf16", "picochat-fp32", "transformers-bf16", "transformers-fp32"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PARAGRAPH = ("The history of computing is a story of people finding ways to make machines do work that once "
             "required careful human attention. Early mechanical calculators could add and multiply, but each "
             "step had to be set by hand. Later, programmable machines stored their instructions in memory, "
             "and the same hardware could solve many different problems. Today a small language model can run "
             "on an ordinary laptop, answering questions, summarising documents and writing short programs. ")
CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- picochat
class Picochat:
    def __init__(self, path, dtype):
        self.path, self.dtype = path, dtype

    def load(self):
        self.engine = None
        lm = load(str(self.path), dtype=self.dtype)
        self.engine = Engine(lm.model, lm.tokenizer)

    def prefill(self, ids):
        gen = self.engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=1, stop_token_ids=[]))
        return len(ids) / gen.stats.time_to_first_token

    def decode(self, ids, n):
        gen = self.engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=[]))
        assert gen.stats.completion_tokens == n, gen.stats
        return gen.stats.tokens_per_s


# ----------------------------------------------------------------------------- transformers
class FirstTokenTimer:
    """A generate() streamer: the first put() gets the prompt, the second the first new token."""
    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self):
        self.last = time.perf_counter()


class Transformers:
    def __init__(self, path, dtype):
        self.path, self.dtype = path, dtype

    def load(self):
        from transformers import AutoModelForCausalLM
        self.model = None
        self.model = AutoModelForCausalLM.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                          dtype=self.dtype).eval()

    @torch.inference_mode()
    def prefill(self, ids):
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        logits = self.model(x, use_cache=True, logits_to_keep=1).logits
        int(logits[0, -1].argmax())
        return len(ids) / (time.perf_counter() - t0)

    @torch.inference_mode()
    def decode(self, ids, n):
        x = torch.tensor([ids])
        timer = FirstTokenTimer()
        out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, pad_token_id=0, streamer=timer)
        assert out.shape[1] - x.shape[1] == n, out.shape
        return (n - 1) / (timer.last - timer.first)


# ----------------------------------------------------------------------------- benchmark
def bench(name, path, args, prompt_ids, chat_ids):
    kind, dt = name.split("-")
    system = (Picochat if kind == "picochat" else Transformers)(path, DTYPES[dt])
    loads = []
    for i in range(args.repeats):
        _, s = timed(system.load)
        gc.collect()
        loads.append(s)
        log(f"  {name}: load {i + 1}/{args.repeats} {s:.2f} s")
    system.prefill(prompt_ids)  # warm-up
    system.decode(chat_ids, min(16, args.new_tokens))
    prefills, decodes = [], []
    for i in range(args.repeats):
        prefills.append(system.prefill(prompt_ids))
        decodes.append(system.decode(chat_ids, args.new_tokens))
        log(f"  {name}: run {i + 1}/{args.repeats} prefill {prefills[-1]:.1f} tok/s, decode {decodes[-1]:.1f} tok/s")
    del system
    gc.collect()
    return dict(system=name, load_s=statistics.median(loads), prefill_tok_s=statistics.median(prefills),
                decode_tok_s=statistics.median(decodes), loads=loads, prefills=prefills, decodes=decodes)


def table(results):
    by_name = {r["system"]: r for r in results}
    head = f"{'system':<18} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13}   {'× transformers same dtype (load / prefill / decode)'}"
    lines = [head, "-" * len(head)]
    for r in results:
        row = f"{r['system']:<18} {r['load_s']:>7.2f} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f}"
        ref = by_name.get(r["system"].replace("picochat", "transformers"))
        if r["system"].startswith("picochat") and ref:
            row += (f"   {ref['load_s'] / r['load_s']:.2f}× / {r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}×"
                    f" / {r['decode_tok_s'] / ref['decode_tok_s']:.2f}×")
        lines.append(row)
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the packaged smollm2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = find_packaged("smollm2") if args.model is None else Path(args.model)

    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tok = load(str(path), dtype=torch.float32).tokenizer  # the same token ids go to every system
    text_ids = tok.encode(PARAGRAPH)
    prompt_ids = (text_ids * (args.prompt_tokens // len(text_ids) + 1))[:args.prompt_tokens]
    chat_ids = tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=True))
    gc.collect()

    machine = dict(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                   transformers=transformers.__version__, picochat=getattr(picochat, "__version__", "dev"),
                   python=platform.python_version())
    t0 = time.perf_counter()
    results = []
    for name in args.systems:
        log(f"{name} ...")
        results.append(bench(name, path, args, prompt_ids, chat_ids))
    total = time.perf_counter() - t0

    print(f"\n{path.name}, batch 1, {machine['threads']} threads | {machine['cpu']} | torch {machine['torch']}, "
          f"transformers {machine['transformers']}, python {machine['python']}")
    print(f"load: median of {args.repeats} loads; prefill: {args.prompt_tokens}-token prompt; decode: "
          f"{args.new_tokens} new tokens from a {len(chat_ids)}-token chat prompt; medians of {args.repeats}, "
          f"after one warm-up. Ratios: how many times faster than transformers of the same dtype.\n")
    finish_report(table(results), total, args.json,
                  dict(machine=machine, args=vars(args), model=str(path), total_s=total, results=results))


if __name__ == "__main__":
    main()
