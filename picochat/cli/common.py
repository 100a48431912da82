"""What several commands share: the model and sampling flags, opening a model, streaming a reply to the
terminal, knowledge-base and server flags, progress bars. Only the CLI prints; the library raises.

Module-level imports here stay light (no torch): `picochat --help` imports every command module.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

from ..apps.assistant import MIN_SIMILARITY
from ..apps.reading import MAX_FILE_BYTES, MAX_FILE_FLAG


# ----------------------------------------------------------------------------- flags
def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("-m", "--model", default=None,
                   help="a Hugging Face folder, a .gguf file, or a packaged model name (default: qwen2.5-coder-1.5b; smollm2 is small and quick); "
                        "or a LoRA adapter folder (its adapter_config.json names the base)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter folder (PEFT format, e.g. from `picochat sft --lora-rank`) to apply to -m")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="compute dtype; auto (default) picks what is fastest on this CPU (`picochat info --system`)")
    p.add_argument("--dequantize", action="store_true",
                   help="expand a GGUF's quantized weights to --dtype floats instead of running them as integers")
    p.add_argument("--prompt-bits", default="auto", choices=["auto", "8", "15"],
                   help="activations of a prompt against quantized weights: 8 (llama.cpp's precision, ~1.5× faster "
                        "prompts), 15 (float32's numbers, as decoding), auto (default): 8 where it was measured "
                        "to barely move the model's predictions (qwen2.5-coder), else 15")
    p.add_argument("--draft", default="auto", metavar="MODEL|ngram|off",
                   help="speculative decoding: guesses checked several at a time, the same output faster. auto "
                        "(default): the model's paired draft if installed (qwen2.5-coder-1.5b: the 0.5B) and "
                        "n-grams of the text so far; MODEL: another draft model (-m syntax, same tokenizer); "
                        "ngram: only n-grams; off: one token per step")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores other programs leave idle, checked every second)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print tokens/s, time to first token and how many drafted tokens were kept")


def add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--temperature", type=float, default=0.3, help="0 = greedy (default 0.3)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_kb_args(p: argparse.ArgumentParser, help_text: str):
    p.add_argument("--kb", default=None, metavar="NAME", help=help_text)
    p.add_argument("--top-k-passages", type=int, default=3, metavar="K", help="passages retrieved per question (3)")
    add_min_similarity(p)


def add_min_similarity(p: argparse.ArgumentParser):
    p.add_argument("--min-similarity", type=float, default=MIN_SIMILARITY, metavar="S",
                   help="passages below this cosine similarity do not count as relevant; none left: decline "
                        f"(default {MIN_SIMILARITY})")


def add_remote_args(p: argparse.ArgumentParser, use: str = "generate with"):
    p.add_argument("--base-url", default=None, metavar="URL",
                   help=f"{use} the OpenAI-compatible server at URL instead of a local model")
    p.add_argument("--remote-model", default=None, help="the model id to ask the server for (default: its first)")
    p.add_argument("--api-key", default=None, help="bearer key for --base-url")
    p.add_argument("--batch", type=int, default=8,
                   help="sequences decoded together, or requests in flight to --base-url (default 8)")


def count(text: str) -> int:
    """A whole number for the command line, with an optional K/M/G suffix: 20M = 20,000,000."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def sampling_from_args(args):
    from ..engine.sampling import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=list(args.stop))


# ----------------------------------------------------------------------------- the model
def open_engine(args):
    """picochat's engine over the model -m (and --adapter) name, on --threads threads."""
    import torch

    from .. import kernels
    from ..engine.engine import Engine
    from ..load import load
    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernels.is_built():
        print("[building picochat's CPU kernels for this machine: once, about 30 s ...]", file=sys.stderr)
    t0 = time.perf_counter()
    draft = getattr(args, "draft", "auto")
    prompt_bits = getattr(args, "prompt_bits", "auto")
    loaded = load(args.model, dtype=args.dtype, adapter=args.adapter, quantized=not args.dequantize,
                  draft=None if draft in ("ngram", "off") else draft,
                  prompt_bits=None if prompt_bits == "auto" else int(prompt_bits))
    if args.verbose:
        m = loaded.model
        drafting = f", drafts from {loaded.draft_path.name} and n-grams" if loaded.draft is not None else \
            {"off": ", no speculative decoding"}.get(draft, ", drafts from n-grams")
        print(f"[loaded {loaded.path} ({loaded.format}, {m.config.architecture}, {m.config.n_layer} layers, "
              f"{loaded.weights} weights, {str(loaded.dtype).removeprefix('torch.')} activations"
              f"{', from the cache' if loaded.from_cache else ''}{drafting}) in {time.perf_counter() - t0:.2f} s]",
              file=sys.stderr)
    return Engine(loaded.model, loaded.tokenizer, draft=loaded.draft, speculate=draft != "off",
                  adapt_threads=not args.threads)


def backend(args, progress=None, extra_body: dict | None = None):
    """The model a command asks (backends.py): the server at --base-url, else picochat's engine over -m."""
    from ..backends import LocalModel, RemoteModel
    if args.base_url:
        return RemoteModel(args.base_url, model=args.remote_model, api_key=args.api_key, concurrency=args.batch,
                           progress=progress, extra_body=extra_body)
    from ..hub import DEFAULT_MODEL
    return LocalModel(open_engine(args), name=args.model or DEFAULT_MODEL, batch_size=args.batch, progress=progress)


# ----------------------------------------------------------------------------- the terminal
def print_stats(gen):
    s = gen.stats
    cached = f" ({s.cached_tokens} cached)" if s.cached_tokens else ""
    print(f"[{s.prompt_tokens} prompt tokens{cached} at {s.prefill_tokens_per_s:.0f} tok/s, first token "
          f"{s.time_to_first_token:.2f} s | {s.completion_tokens} tokens at {s.tokens_per_s:.1f} tok/s"
          f"{drafts_line(s)} | finish: {gen.finish_reason}]", file=sys.stderr)


def drafts_line(stats) -> str:
    """', 2.1 tokens a pass (drafted: model 40/52 kept, ngram 10/31)' — what speculative decoding did."""
    if not stats.drafted:
        return ""
    kept = ", ".join(f"{source} {stats.accepted[source]}/{n} kept" for source, n in stats.drafted.items())
    return f", {stats.tokens_per_pass:.1f} tokens a pass (drafted: {kept})"


def stream(gen, verbose) -> bool:
    """Print a generation as it streams (Ctrl-C stops it). Returns whether it was interrupted."""
    interrupted = False
    try:
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    if verbose:
        print_stats(gen)
    return interrupted


def progress_bar(description: str, unit: str):
    """A tqdm bar on stderr (hidden when stderr is not a terminal) and a progress(done, total) callback for it."""
    from tqdm import tqdm
    bar = tqdm(desc=description, unit=unit, file=sys.stderr, disable=None)

    def progress(done: int, total: int):
        bar.total = total
        bar.n = done
        bar.refresh()
    return bar, progress


# ----------------------------------------------------------------------------- knowledge bases
def existing_kb(name: str):
    """The file of the knowledge base NAME (or a .sqlite path), which must exist."""
    from ..apps.kb import kb_path
    path = kb_path(name)
    if not path.exists():
        raise FileNotFoundError(f"no knowledge base '{name}' (looked for {path}); create it with "
                                f"`picochat kb add FILES... --kb {name}`")
    return path


def open_kb(name: str, must_exist: bool = True):
    """The knowledge base NAME (or a .sqlite path); it loads the default embedding model when it first
    needs it (listing and removing do not)."""
    from ..apps.kb import KnowledgeBase, kb_path
    return KnowledgeBase(existing_kb(name) if must_exist else kb_path(name))


def show_retrieval(grounding):
    print(f"[retrieval: {len(grounding.sources)} relevant passage(s) for {grounding.query!r}"
          f"{' -> declining' if grounding.declined else ''}]", file=sys.stderr)
    for s in grounding.sources:
        print(f"[  [{s.number}] {s.label}  similarity {s.similarity:.2f}]", file=sys.stderr)


def add_max_file_arg(p, what: str, default_bytes: int = MAX_FILE_BYTES):
    """--max-file-mb N: the bound on what documents.py reads (a FIFO or /dev/zero, too, is refused)."""
    p.add_argument(MAX_FILE_FLAG, type=float, default=default_bytes / 2**20, metavar="N",
                   help=f"refuse a {what} over N MB (MiB; default {default_bytes / 2**20:g}): what is read is "
                        f"held in memory")


def max_file_bytes(args) -> int:
    """--max-file-mb in bytes."""
    if not (math.isfinite(args.max_file_mb) and args.max_file_mb > 0):
        raise ValueError(f"{MAX_FILE_FLAG} must be a positive number of megabytes")
    return int(args.max_file_mb * 2**20)
