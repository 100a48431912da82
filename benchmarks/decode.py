"""Chat speed on this CPU: picochat against llama-cpp-python, both on the same GGUF, side by side in one run.

    python benchmarks/decode.py                       # SmolLM2-135M-Instruct Q4_1, 2 threads, medians of 3
    python benchmarks/decode.py --systems picochat llama-cpp-python picochat-float --json out.json

llama-cpp-python is a benchmark extra (`pip install ".[bench]"`; it compiles llama.cpp: on a CPU with
AMX-INT8 build it with CMAKE_ARGS="-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8", its AMX
kernel crashes on prompts there). Measured for each system, in this process, batch 1, greedy:

  * load s           loading the model ready to generate, median of --repeats. picochat's is a second start:
                     its packed conversion of the GGUF is already in the cache; the first start (converting
                     and caching) is timed once, with an empty cache, and shown under the table
  * prefill tok/s    a 512-token prompt: time to its first new token, nothing cached
  * decode tok/s     128 new tokens after a short chat prompt (end of turn ignored): tokens after the first /
                     seconds after the first
  * turn-2 TTFT      the second turn of a chat (first turn: a question and its 64-token reply) until its first
                     token, each reusing what the engine kept of the first turn; and, for picochat, the same
                     new tokens sent as a fresh prompt (the target: reuse ≤ 1.2× that)
  * peak RSS         of a chat process (`picochat chat`; llama-cpp-python's in a script that loads and answers
                     the same two questions), from /proc: the whole process, Python and torch included
  * batch 8          picochat's Batcher (the server's engine): 8 requests of 128 tokens at once, all tokens over
                     the wall time, against the same Batcher with one request

Ratios are picochat ÷ llama-cpp-python (for load and time to first token, llama's ÷ picochat's: > 1 means
picochat is faster). The machine line (CPU, torch capability, threads, kernel build) heads the report.
"""
import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
import torch

import picochat
from common import finish_report, log
from workloads import WORKLOADS
from picochat import hw, kernels
from picochat.engine.batcher import Batcher
from picochat.engine.engine import Engine
from picochat.engine.sampling import SamplingParams
from picochat.engine.session import ChatSession
from picochat.hub import MODELS, find_packaged
from picochat.load import load
from picochat.quant.tuning import compute_dtype

PARAGRAPH = ("The history of computing is a story of people finding ways to make machines do work that once "
             "required careful human attention. Early mechanical calculators could add and multiply, but each "
             "step had to be set by hand. Later, programmable machines stored their instructions in memory, "
             "and the same hardware could solve many different problems. Today a small language model can run "
             "on an ordinary laptop, answering questions, summarising documents and writing short programs. ")
CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
TURNS = ["What are three good habits for learning to program?", "Which of them matters most, and why?"]
BATCH_PROMPTS = ["Write a poem about the sea.", "Explain how a bicycle works.", "Give me a recipe for soup.",
                 "Describe the city of Paris.", "What is machine learning?", "Tell me about volcanoes.",
                 "How do I learn to swim?", "Summarise the story of Cinderella."]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- picochat
class Picochat:
    def __init__(self, path, args, float_weights=False, draft="auto"):
        self.path, self.args, self.float_weights, self.draft = path, args, float_weights, draft

    def load(self):
        self.engine = None
        gc.collect()
        lm = load(str(self.path), quantized=not self.float_weights, draft=None if self.draft in ("ngram", "off") else "auto")
        self.engine = Engine(lm.model, lm.tokenizer, draft=lm.draft, speculate=self.draft != "off",
                             adapt_threads=self.args.adapt_threads)
        self.loaded = lm

    def answer(self, ids, n):
        """(tokens after the first, seconds after the first, tokens per pass) of one greedy answer."""
        self.engine.reset()
        gen = self.engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=n))
        return gen.stats.decode_steps, gen.stats.decode_seconds, gen.stats.tokens_per_pass

    def prefill(self, ids):
        self.engine.reset()
        gen = self.engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=1, stop_token_ids=[]))
        return len(ids) / gen.stats.time_to_first_token

    def decode(self, ids, n):
        self.engine.reset()
        gen = self.engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=[]))
        assert gen.stats.completion_tokens == n, gen.stats
        return gen.stats.tokens_per_s

    def second_turn(self):
        """(time to the second turn's first token, the same new tokens as a fresh prompt, new tokens)."""
        self.engine.reset()
        chat = ChatSession(self.engine)
        first = chat.ask(TURNS[0], SamplingParams(temperature=0, max_new_tokens=64))
        for _ in first:
            pass
        chat.record(first)
        second = chat.ask(TURNS[1], SamplingParams(temperature=0, max_new_tokens=1))
        for _ in second:
            pass
        new = second.prompt_ids[second.stats.cached_tokens:]
        self.engine.reset()
        fresh = self.engine.complete(new, SamplingParams(temperature=0, max_new_tokens=1))
        return second.stats.time_to_first_token, fresh.stats.time_to_first_token, len(new)

    def batch(self, tokenizer, n_requests, n_tokens):
        """Aggregate tokens/s of n_requests generated together by the Batcher, its loop on this thread (as
        `picochat serve` runs it on its one engine thread)."""
        batcher = Batcher(self.engine, max_batch=8, start=False)
        prompts = [self.engine.chat_prompt([{"role": "user", "content": BATCH_PROMPTS[i % len(BATCH_PROMPTS)]}])
                   for i in range(n_requests)]
        t0 = time.perf_counter()
        requests = [batcher.submit(p, SamplingParams(temperature=0, max_new_tokens=n_tokens, stop_token_ids=[]),
                                   lambda g, piece: None) for p in prompts]
        batcher.run(until_idle=True)
        elapsed = time.perf_counter() - t0
        batcher.close()
        return sum(r.gen.stats.completion_tokens for r in requests) / elapsed


# ----------------------------------------------------------------------------- llama-cpp-python
class LlamaCpp:
    def __init__(self, path, args):
        self.path, self.args = path, args

    def load(self):
        from llama_cpp import Llama
        self.llm = None
        gc.collect()
        self.llm = Llama(model_path=str(self.path), n_ctx=2048, n_batch=512, n_threads=self.args.threads,
                         n_threads_batch=self.args.threads, verbose=False)

    def prefill(self, ids):
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - t0)

    def decode(self, ids, n):
        times = []
        for i, _ in enumerate(self.llm.generate(ids, temp=0.0, reset=True)):
            times.append(time.perf_counter())
            if i + 1 == n:
                break
        return (n - 1) / (times[-1] - times[0])

    def answer(self, ids, n):
        """(tokens after the first, seconds after the first, 1.0) of one greedy answer, to its end of turn."""
        times = []
        for tok in self.llm.generate(ids, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if tok in self.stop or len(times) == n:
                break
        return len(times) - 1, times[-1] - times[0], 1.0

    @property
    def stop(self):
        return {self.llm.token_eos(), *(self.llm.tokenize(t.encode(), special=True)[0]
                                        for t in ("<|im_end|>", "<|endoftext|>"))}

    def second_turn(self, tokenizer):
        """Time to the first token of the second turn, llama-cpp-python reusing its matching prefix."""
        self.llm.reset()
        prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": TURNS[0]}],
                                                                add_generation_prompt=True))
        reply = []
        for tok in self.llm.generate(prompt, temp=0.0, reset=True):
            if tok == self.llm.token_eos() or len(reply) == 64:
                break
            reply.append(tok)
        messages = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": tokenizer.decode(reply)},
                    {"role": "user", "content": TURNS[1]}]
        second = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        t0 = time.perf_counter()
        next(iter(self.llm.generate(second, temp=0.0, reset=True)))
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- peak memory of a chat process
RSS_LLAMA = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=int(sys.argv[2]), verbose=False)
messages = []
for q in {turns!r}:
    messages.append({{"role": "user", "content": q}})
    out = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=64)
    messages.append(out["choices"][0]["message"])
"""


def peak_rss_mb(cmd, stdin=None) -> float:
    """The peak resident memory of a child process (GNU time's %M, in kB), in MB."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as out:
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", out.name, *cmd], input=stdin, text=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return int(out.read().strip().splitlines()[-1]) / 1024


# ----------------------------------------------------------------------------- the run
def bench(name, system, args, prompt_ids, chat_ids, tokenizer):
    loads = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        system.load()
        loads.append(time.perf_counter() - t0)
        log(f"  {name}: load {i + 1}/{args.repeats} {loads[-1]:.2f} s")
    system.prefill(prompt_ids[:64])  # warm-up
    system.decode(chat_ids, 16)
    prefills, decodes = [], []
    for i in range(args.repeats):
        prefills.append(system.prefill(prompt_ids))
        decodes.append(system.decode(chat_ids, args.new_tokens))
        log(f"  {name}: run {i + 1}/{args.repeats} prefill {prefills[-1]:.1f} tok/s, decode {decodes[-1]:.1f} tok/s")
    row = dict(system=name, load_s=median(loads), prefill_tok_s=median(prefills), decode_tok_s=median(decodes),
               loads=loads, prefills=prefills, decodes=decodes)
    if isinstance(system, Picochat):
        turns = [system.second_turn() for _ in range(args.repeats)]
        row.update(turn2_ttft_s=median([t[0] for t in turns]), fresh_ttft_s=median([t[1] for t in turns]),
                   turn2_new_tokens=turns[0][2])
        if args.batch and not system.float_weights:
            one = median([system.batch(tokenizer, 1, args.new_tokens) for _ in range(args.repeats)])
            eight = median([system.batch(tokenizer, 8, args.new_tokens) for _ in range(args.repeats)])
            row.update(batch1_tok_s=one, batch8_tok_s=eight)
    else:
        row["turn2_ttft_s"] = median([system.second_turn(tokenizer) for _ in range(args.repeats)])
    return row


def workloads(systems: dict, tokenizer, args) -> list[dict]:
    """Decode speed on what people ask (workloads.py): each system answers every conversation of each workload
    greedily (to its end of turn, at most --new-tokens); tokens after the first over seconds after the first,
    all answers of a workload together, best of --repeats."""
    rows = []
    for name, make in systems.items():
        system = make()
        system.load()
        row = {"system": name}
        for workload, conversations in WORKLOADS.items():
            best = (0.0, 1.0)
            for _ in range(args.repeats):
                tokens = seconds = passes = 0.0
                for conversation in conversations:
                    ids = tokenizer.encode(tokenizer.apply_chat_template(conversation, add_generation_prompt=True))
                    n, t, per_pass = system.answer(ids, args.new_tokens)
                    tokens, seconds, passes = tokens + n, seconds + t, passes + n / per_pass
                if tokens / seconds > best[0]:
                    best = (tokens / seconds, tokens / passes)
            row[workload], row[workload + "_per_pass"] = best
            log(f"  {name} {workload}: {best[0]:.1f} tok/s, {best[1]:.2f} tokens a pass")
        rows.append(row)
        del system
        gc.collect()
    return rows


def workload_table(rows) -> str:
    ref = next((r for r in rows if r["system"] == "llama-cpp-python"), None)
    names = list(WORKLOADS)
    head = f"{'decode tok/s':<26}" + "".join(f"{w:>18}" for w in names)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for w in names:
            ratio = f" {r[w] / ref[w]:.2f}×" if ref and r is not ref else ""
            cells.append(f"{r[w]:.1f}{ratio}")
        lines.append(f"{r['system']:<26}" + "".join(f"{c:>18}" for c in cells))
        if r.get("chat_per_pass", 1.0) != 1.0 or any(r.get(w + "_per_pass", 1.0) != 1.0 for w in names):
            lines.append(f"{'  tokens per model pass':<26}" + "".join(f"{r[w + '_per_pass']:>18.2f}" for w in names))
    return "\n".join(lines)


def busy_machine(systems: dict, chat_ids, args) -> list[dict]:
    """Decode speed while another process keeps one core busy (a Python busy loop), against the same idle."""
    rows = []
    for name, make in systems.items():
        system = make()
        system.load()
        system.decode(chat_ids, 16)
        idle = system.decode(chat_ids, args.new_tokens)
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.5)   # (picochat looks at the cores at most once a second)
            busy = system.decode(chat_ids, args.new_tokens)
        finally:
            hog.kill()
            hog.wait()
        rows.append(dict(system=name, idle=idle, busy=busy))
        log(f"  {name}: idle {idle:.1f} tok/s, one core busy {busy:.1f} tok/s")
        del system
        gc.collect()
    return rows


def busy_table(rows) -> str:
    lines = [f"{'one core kept busy':<26}{'idle tok/s':>12}{'busy tok/s':>12}{'slowdown':>10}"]
    for r in rows:
        lines.append(f"{r['system']:<26}{r['idle']:>12.1f}{r['busy']:>12.1f}{r['idle'] / r['busy']:>9.1f}×")
    return "\n".join(lines)


def first_start(path) -> float:
    """picochat's load with an empty cache: convert the GGUF and write the packed folder."""
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, PICOCHAT_HOME=home)
        from picochat.paths import cache_dir
        for part in ("kernels", "cpu"):  # the compiled kernel and the CPU profile are not what is timed
            if (cache_dir() / part).exists():
                os.symlink(cache_dir() / part, Path(home) / part)
        code = ("import time, sys; t0 = time.perf_counter(); from picochat.load import load; "
                f"load({str(path)!r}); print(time.perf_counter() - t0)")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])


def table(rows):
    by = {r["system"]: r for r in rows}
    ref = by.get("llama-cpp-python")
    head = (f"{'system':<18} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'turn-2 TTFT ms':>15} "
            f"{'peak RSS MB':>12}   {'vs llama-cpp-python (load / prefill / decode)'}")
    lines = [head, "-" * len(head)]
    for r in rows:
        rss = f"{r['rss_mb']:.0f}" if r.get("rss_mb") else "-"
        line = (f"{r['system']:<18} {r['load_s']:>7.2f} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} "
                f"{1000 * r['turn2_ttft_s']:>15.1f} {rss:>12}")
        if ref and r is not ref:
            line += (f"   {ref['load_s'] / r['load_s']:.2f}× / {r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}× / "
                     f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}×")
        lines.append(line)
    return "\n".join(lines)


def targets(rows, first_start_s) -> str:
    by = {r["system"]: r for r in rows}
    p, ref = by.get("picochat"), by.get("llama-cpp-python")
    if not p:
        return ""
    out = ["", "target                                           measured                   goal      met"]

    def row(what, measured, goal, ok):
        out.append(f"{what:<48} {measured:<26} {goal:<9} {'yes' if ok else 'NO'}")
    if ref:
        r = p["decode_tok_s"] / ref["decode_tok_s"]
        row("decode tok/s, batch 1 ÷ llama-cpp-python", f"{r:.2f}×", "≥ 1.1×", r >= 1.1)
        r = p["prefill_tok_s"] / ref["prefill_tok_s"]
        row("prefill tok/s (512 tokens) ÷ llama-cpp-python", f"{r:.2f}×", "≥ 2×", r >= 2)
    row("second start to ready (warm cache)", f"{p['load_s']:.2f} s" + (f" (llama {ref['load_s']:.2f} s)" if ref else ""),
        "≤ 0.5 s", p["load_s"] <= 0.5)
    r = p["turn2_ttft_s"] / p["fresh_ttft_s"]
    row(f"turn-2 TTFT ÷ its {p['turn2_new_tokens']} new tokens as a fresh prompt",
        f"{r:.2f}× ({1000 * p['turn2_ttft_s']:.0f} / {1000 * p['fresh_ttft_s']:.0f} ms)", "≤ 1.2×", r <= 1.2)
    if p.get("rss_mb"):
        row("peak RSS of `picochat chat`", f"{p['rss_mb']:.0f} MB", "≤ 400 MB", p["rss_mb"] <= 400)
    if p.get("batch8_tok_s"):
        r = p["batch8_tok_s"] / p["batch1_tok_s"]
        row("8 concurrent streams ÷ batch 1 (aggregate tok/s)",
            f"{r:.2f}× ({p['batch8_tok_s']:.0f} / {p['batch1_tok_s']:.0f})", "≥ 4×", r >= 4)
    if first_start_s is not None:
        out.append(f"(picochat's first start, converting the GGUF into its cache: {first_start_s:.2f} s)")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .gguf file or a packaged name (default: the packaged smollm2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--systems", nargs="+", default=["picochat", "llama-cpp-python"],
                   choices=["picochat", "picochat-plain", "picochat-float", "llama-cpp-python"])
    p.add_argument("--workloads", action="store_true",
                   help="also decode speed on chat, grounded, summary, code and code-edit answers: picochat plain, "
                        "with n-gram drafts, with its default drafts (the paired draft model), and llama-cpp-python")
    p.add_argument("--busy", action="store_true", help="also decode speed with another process keeping one core busy")
    p.add_argument("--only-extra", action="store_true", help="skip the main table (with --workloads / --busy)")
    p.add_argument("--fixed-threads", dest="adapt_threads", action="store_false",
                   help="picochat on --threads whatever the load (default: the cores other processes leave idle)")
    p.add_argument("--no-batch", dest="batch", action="store_false", help="skip the batch-8 measurement")
    p.add_argument("--no-rss", dest="rss", action="store_false", help="skip the chat processes' peak memory")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = find_packaged(args.model or "smollm2") if (args.model or "smollm2") in MODELS else Path(args.model)
    tokenizer = load(str(path)).tokenizer
    text_ids = tokenizer.encode(PARAGRAPH)
    prompt_ids = (text_ids * (args.prompt_tokens // len(text_ids) + 1))[:args.prompt_tokens]
    chat_ids = tokenizer.encode(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True))
    machine = dict(cpu=hw.describe(), kernel=kernels.status().get("isa"), torch=torch.__version__,
                   picochat=picochat.__version__, float_dtype=str(compute_dtype()[0]).removeprefix("torch."))
    try:
        import llama_cpp
        machine["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        if "llama-cpp-python" in args.systems:
            sys.exit("llama-cpp-python is not installed: pip install '.[bench]' (see the docstring for its build)")

    t0 = time.perf_counter()
    first = first_start(path) if "picochat" in args.systems and not args.only_extra else None
    rows = []
    for name in [] if args.only_extra else args.systems:
        log(f"{name} ...")
        system = {"picochat": lambda: Picochat(path, args), "picochat-float": lambda: Picochat(path, args, True),
                  "picochat-plain": lambda: Picochat(path, args, draft="off"),
                  "llama-cpp-python": lambda: LlamaCpp(path, args)}[name]()
        rows.append(bench(name, system, args, prompt_ids, chat_ids, tokenizer))
        del system
        gc.collect()
    if args.rss:
        turns = "\n".join(TURNS) + "\n"
        for r in rows:
            if r["system"] == "picochat":
                r["rss_mb"] = peak_rss_mb([sys.executable, "-m", "picochat.cli", "chat", "-m", str(path),
                                           "--threads", str(args.threads), "--temperature", "0",
                                           "--max-new-tokens", "64"], stdin=turns)
            elif r["system"] == "llama-cpp-python":
                r["rss_mb"] = peak_rss_mb([sys.executable, "-c", RSS_LLAMA.format(turns=TURNS), str(path),
                                           str(args.threads)])
    extra = ""
    llama = {"llama-cpp-python": lambda: LlamaCpp(path, args)} if "llama-cpp-python" in args.systems else {}
    if args.workloads:
        log("workloads ...")
        spec = workloads({"picochat, no drafts": lambda: Picochat(path, args, draft="off"),
                          "picochat --draft ngram": lambda: Picochat(path, args, draft="ngram"),
                          "picochat (default drafts)": lambda: Picochat(path, args), **llama}, tokenizer, args)
        extra += "\n\n" + workload_table(spec)
    if args.busy:
        log("busy machine ...")
        busy = busy_machine({"picochat, no drafts": lambda: Picochat(path, args, draft="off"), **llama}, chat_ids, args)
        extra += "\n\n" + busy_table(busy)
    total = time.perf_counter() - t0
    print(f"\n{machine['cpu']} | picochat kernel {machine['kernel']} | torch {machine['torch']} | "
          f"llama-cpp-python {machine.get('llama_cpp_python', '-')}")
    print(f"{path.name}, batch 1, {args.threads} threads, greedy; prefill: {args.prompt_tokens}-token prompt; decode: "
          f"{args.new_tokens} new tokens from a {len(chat_ids)}-token chat prompt; medians of {args.repeats}\n")
    report = (table(rows) + "\n" + targets(rows, first) if rows else "") + extra
    finish_report(report, total, args.json,
                  dict(machine=machine, args=vars(args), model=str(path), first_start_s=first, total_s=total,
                       results=rows, workloads=spec if args.workloads else None,
                       busy=busy if args.busy else None))


if __name__ == "__main__":
    main()
