"""What a JSON schema costs a generation: picochat's grammars (llguidance) against outlines-core, side by side.

    python benchmarks/grammar.py                      # qwen2.5-coder-1.5b, full repetitions
    python benchmarks/grammar.py --quick              # qwen2.5-coder-0.5b, fewer repetitions (< 2 minutes)
    python benchmarks/grammar.py -m smollm2 --json out/bench/grammar.json

Three tables, each printed as soon as it is measured, for eight schemas of the kinds real clients send
(an enum and an integer range, nested objects, bounded arrays, anyOf with null, string patterns,
$ref/$defs, a three-tool call, a 30-property object):

  1. compile ms      picochat's GrammarCompiler.json_schema + .start (llguidance: schema -> grammar, checked
                     against the tokenizer, a matcher made); outlines-core's build_regex_from_schema + Index
                     (the regex and its whole token-level automaton, built up front). Median of repeats; and,
                     once, each engine's one-off view of the vocabulary.
  2. mask µs/token   a valid document per schema (json.dumps style), tokenized by the model's tokenizer and
                     replayed token by token: the time to compute the allowed set before each token, then the
                     grammar advances over it. llguidance: Grammar.allowed (bits unpacked to the bool tensor
                     the sampler masks with) and the bare fill_mask; outlines-core: Guide.write_mask_into (its
                     bitmask, the same work as fill_mask). p50 and p99 over all steps of all replays; and the
                     model's own decode step at batch 1, so that mask p99 ÷ decode step p50 (target < 10 %)
                     says what the mask costs a token.
  3. decode tok/s    the same JSON-asking prompts, greedy, 64 new tokens, through the server's Batcher with 1
                     and 8 requests, free and under a schema (book, person, product in turn), the engine made
                     without speculative decoding so the difference is the mask's. tok/s = generated tokens /
                     wall time (prefill included, the same prompts both ways). The schema outputs that end with
                     "stop" are checked with jsonschema.

outlines-core writes JSON with optional single spaces (its default whitespace pattern); llguidance as
picochat configures it, compact with ", " and ": " (json.dumps): the documents fit both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
import torch
from common import cpu_line, finish_report, log


# ----------------------------------------------------------------------------- schemas and documents
def _tool(name: str, params: dict) -> dict:
    """One tool of a tool-call schema: its name fixed, its arguments an object of `params`."""
    arguments = {"type": "object", "properties": params, "required": list(params), "additionalProperties": False}
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def _obj(properties: dict, **extra) -> dict:
    """An object whose properties are all required (what OpenAI's strict mode asks of a schema)."""
    return {"type": "object", "properties": properties, "required": list(properties), **extra}


STR, INT, NUM, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
# 30 properties of a product record: (name, schema, the value the document holds)
WIDE_FIELDS = [
    ("id", INT, 1042), ("sku", STR, "KT-1042"), ("name", STR, "Electric kettle"), ("brand", STR, "Brewster"),
    ("category", {"enum": ["kitchen", "garden", "office", "toys"]}, "kitchen"), ("price", NUM, 39.9),
    ("currency", {"enum": ["EUR", "USD", "GBP"]}, "EUR"), ("in_stock", BOOL, True), ("quantity", INT, 17),
    ("weight_kg", NUM, 1.2), ("width_cm", NUM, 22.5), ("height_cm", NUM, 25.0), ("depth_cm", NUM, 16.0),
    ("color", STR, "steel"), ("material", STR, "stainless steel"), ("rating", NUM, 4.6), ("reviews", INT, 318),
    ("warranty_years", INT, 2), ("origin", STR, "Portugal"), ("supplier", STR, "Acme Trading"),
    ("created", STR, "2024-03-01"), ("updated", STR, "2024-11-20"), ("discontinued", BOOL, False),
    ("tax_rate", NUM, 0.23), ("discount", NUM, 0.1), ("barcode", STR, "5601234567890"),
    ("shipping_class", {"enum": ["standard", "bulky", "express"]}, "standard"), ("fragile", BOOL, False),
    ("min_order", INT, 1), ("max_order", INT, 50)]

ADDRESS = _obj({"street": STR, "city": STR, "postcode": STR})
# name -> (schema, a document valid under it; keys in the schema's order, as outlines-core's regex wants)
SCHEMAS = {
    "flat: enum + integer range": (
        _obj({"name": STR, "status": {"enum": ["active", "inactive", "banned"]},
              "age": {"type": "integer", "minimum": 0, "maximum": 150}}, additionalProperties=False),
        {"name": "Ada Lovelace", "status": "active", "age": 36}),
    "nested objects": (
        _obj({"name": STR, "address": _obj({"street": STR, "city": STR,
                                             "geo": _obj({"lat": NUM, "lon": NUM})}),
              "employer": _obj({"name": STR, "founded": INT})}),
        {"name": "Grace Hopper", "address": {"street": "12 Harbour Road", "city": "Arlington",
                                             "geo": {"lat": 38.88, "lon": -77.1}},
         "employer": {"name": "US Navy", "founded": 1775}}),
    "arrays: minItems/maxItems": (
        _obj({"title": STR, "tags": {"type": "array", "items": STR, "minItems": 1, "maxItems": 5},
              "scores": {"type": "array", "items": NUM, "minItems": 2, "maxItems": 4}}),
        {"title": "Weekly report", "tags": ["sales", "europe", "q3"], "scores": [0.91, 0.75, 0.6]}),
    "anyOf with null": (
        _obj({"user": STR, "nickname": {"anyOf": [STR, {"type": "null"}]},
              "manager_id": {"anyOf": [INT, {"type": "null"}]}, "note": {"anyOf": [STR, {"type": "null"}]}}),
        {"user": "jdoe", "nickname": None, "manager_id": 77, "note": "on leave until May"}),
    "string pattern": (
        _obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
              "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,3}$"},
              "phone": {"type": "string", "pattern": "^\\+[0-9]{2} [0-9]{3} [0-9]{3} [0-9]{3}$"}}),
        {"sku": "ABC-1234", "email": "jane.doe@example.com", "phone": "+44 207 946 096"}),
    "$ref / $defs": (
        {"$defs": {"address": ADDRESS, "line": _obj({"product": STR, "quantity": INT, "price": NUM})},
         **_obj({"order_id": STR, "billing": {"$ref": "#/$defs/address"}, "shipping": {"$ref": "#/$defs/address"},
                 "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}}})},
        {"order_id": "A-981", "billing": {"street": "1 Main St", "city": "Leeds", "postcode": "LS1 4AP"},
         "shipping": {"street": "9 Mill Lane", "city": "York", "postcode": "YO1 7HH"},
         "lines": [{"product": "kettle", "quantity": 1, "price": 39.9}, {"product": "mug", "quantity": 4,
                                                                         "price": 6.5}]}),
    "tool call: 3 tools in anyOf": (
        {"anyOf": [_tool("get_weather", {"city": STR, "unit": {"enum": ["celsius", "fahrenheit"]}}),
                   _tool("search_web", {"query": STR, "max_results": {"type": "integer", "minimum": 1,
                                                                       "maximum": 10}}),
                   _tool("send_email", {"to": STR, "subject": STR, "body": STR})]},
        {"name": "search_web", "arguments": {"query": "picochat structured outputs", "max_results": 5}}),
    "30-property object": (
        _obj({name: schema for name, schema, _ in WIDE_FIELDS}, additionalProperties=False),
        {name: value for name, _, value in WIDE_FIELDS}),
}

# table 3: the schemas the generations are held to (in turn), and prompts that ask for them
GENERATE = {
    "book": _obj({"title": {"type": "string", "maxLength": 60}, "author": {"type": "string", "maxLength": 40},
                  "year": {"type": "integer", "minimum": 0, "maximum": 2100},
                  "genres": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
                 additionalProperties=False),
    "person": _obj({"name": {"type": "string", "maxLength": 40}, "born": INT,
                    "occupation": {"type": "string", "maxLength": 40}, "alive": BOOL}, additionalProperties=False),
    "product": _obj({"name": {"type": "string", "maxLength": 40}, "price": NUM,
                     "currency": {"enum": ["EUR", "USD", "GBP"]}, "in_stock": BOOL}, additionalProperties=False),
}
PROMPTS = [("book", "the novel Dune"), ("person", "Marie Curie"), ("product", "a stainless steel kettle"),
           ("book", "the novel Pride and Prejudice"), ("person", "Alan Turing"), ("product", "a wireless mouse"),
           ("book", "the novel The Hobbit"), ("person", "Ada Lovelace")]


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile of xs, nearest rank (p99 of 100 steps is the second-largest, not an interpolation)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ----------------------------------------------------------------------------- outlines-core
def outlines_vocabulary(tokenizer):
    """outlines-core's Vocabulary of the same tokens: each token as the raw bytes it stands for (a byte-level
    BPE spells byte b as GPT-2's printable stand-in character), the special tokens left out (outlines-core
    takes only the end-of-sequence one, as its eos id). Built offline, from the tokenizer in hand."""
    from outlines_core import Vocabulary

    from picochat.tokenizer.bpe import bytes_to_unicode
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens: dict[bytes, list[int]] = {}
    for spelling, i in tokenizer.backend.get_vocab(with_added_tokens=False).items():
        if i not in added:
            raw = bytes(byte_of[c] for c in spelling) if set(spelling) <= byte_of.keys() else spelling.encode()
            tokens.setdefault(raw, []).append(i)
    return Vocabulary(tokenizer.eos_token_id, tokens)


def outlines_index(schema: dict, vocabulary):
    from outlines_core import Index
    from outlines_core.json_schema import build_regex_from_schema
    return Index(build_regex_from_schema(json.dumps(schema)), vocabulary)


# ----------------------------------------------------------------------------- 1. compile time
def timed(fn, repeats: int, slow_s: float = 3.0) -> tuple[float, object]:
    """Median seconds of fn() over `repeats` calls (one call when it takes over slow_s), and its last result."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
        if seconds[-1] > slow_s:
            break
    return statistics.median(seconds), result


def compile_table(m, repeats: int, record: dict):
    """Table 1; returns (GrammarCompiler, {schema: grammar text}, outlines Vocabulary, {schema: Index or error})."""
    from picochat.engine.grammar import GrammarCompiler
    vocab = m.model.config.vocab_size
    llg_setup, compiler = timed(lambda: GrammarCompiler(m.tokenizer, vocab), 1)
    oc_setup, vocabulary = timed(lambda: outlines_vocabulary(m.tokenizer), 1)
    rows, grammars, indexes = [], {}, {}
    for name, (schema, _) in SCHEMAS.items():
        log(f"compile: {name}")
        llg_s, grammars[name] = refusable(lambda s=schema: _llg_compile(compiler, s), repeats)
        oc_s, indexes[name] = refusable(lambda s=schema: outlines_index(s, vocabulary), repeats)
        rows.append(f"| {name} | {_ms_or_refusal(llg_s, grammars[name])} | {_ms_or_refusal(oc_s, indexes[name])} |")
        record["compile"][name] = {"llguidance_ms": llg_s and llg_s * 1000, "outlines_ms": oc_s and oc_s * 1000}
    record["setup"] = {"llguidance_s": llg_setup, "outlines_s": oc_setup}
    print("\n".join([
        f"\n## 1. compile time per schema (ms, median of up to {repeats})",
        "| schema | llguidance (json_schema + start) | outlines-core (regex + Index) |", "|---|---|---|", *rows,
        (f"one-off vocabulary setup ({vocab:,} tokens): llguidance LLTokenizer {llg_setup:.2f} s, "
         f"outlines-core Vocabulary {oc_setup:.2f} s (the byte-level spellings mapped in Python included)")]),
        flush=True)
    return compiler, grammars, vocabulary, indexes


def refusable(fn, repeats: int) -> tuple[float | None, object]:
    """timed(fn), or (None, the reason) for a schema the engine refuses: the table says so and goes on."""
    from picochat.engine.grammar import GrammarError
    try:
        return timed(fn, repeats)
    except (GrammarError, ValueError, RuntimeError) as e:   # (outlines-core raises ValueError)
        return None, f"refused: {type(e).__name__}: {str(e).splitlines()[0][:100]}"


def _ms_or_refusal(seconds: float | None, result) -> str:
    return result if seconds is None else f"{seconds * 1000:.1f}"


def _llg_compile(compiler, schema: dict) -> str:
    grammar = compiler.json_schema(schema)
    compiler.start(grammar)   # a matcher: what each request pays on top of the compiled text
    return grammar


# ----------------------------------------------------------------------------- 2. mask time per token
def replay_llguidance(compiler, grammar: str, ids: list[int], vocab: int, bare: bool):
    """Per-step seconds of the mask (allowed(), or fill_mask() when bare) and of accept over the document's
    tokens; and the step at which the grammar refused a token (None: all accepted)."""
    g = compiler.start(grammar)
    words = torch.empty(g.words, dtype=torch.int32)
    masks, advances = [], []
    for step, token in enumerate(ids):
        t0 = time.perf_counter()
        g.fill_mask(words) if bare else g.allowed(vocab)
        t1 = time.perf_counter()
        ok = g.accept([token])
        advances.append(time.perf_counter() - t1)
        masks.append(t1 - t0)
        if not ok:
            return masks, advances, step
    return masks, advances, None


def replay_outlines(index, ids: list[int], vocab: int):
    """The same for outlines-core: its Guide's bitmask (write_mask_into), then advance."""
    from outlines_core import Guide
    guide = Guide(index)
    words = torch.empty((vocab + 31) // 32, dtype=torch.int32)
    masks, advances = [], []
    for step, token in enumerate(ids):
        t0 = time.perf_counter()
        guide.write_mask_into(words.data_ptr(), words.numel(), 4)
        t1 = time.perf_counter()
        try:
            guide.advance(token, return_tokens=False)
            ok = True
        except ValueError:   # a token its automaton has no transition for
            ok = False
        advances.append(time.perf_counter() - t1)
        masks.append(t1 - t0)
        if not ok:
            return masks, advances, step
    return masks, advances, None


def _replays(engine, replay, repeats: int) -> tuple[list[float], list[float], int | None, float]:
    """All steps of `repeats` replays pooled (each a fresh grammar, as each request starts its own), and the
    median first step (a fresh llguidance matcher builds its lexer's states as masks ask for them). The
    unpacking in allowed() runs on torch's threads, so on the count the engine would pick."""
    masks, advances, refused, firsts = [], [], None, []
    for _ in range(repeats):
        engine.share_cores()
        m, a, refused = replay()
        masks += m
        advances += a
        firsts += m[:1]
    return masks, advances, refused, statistics.median(firsts) if firsts else float("nan")


@torch.inference_mode()
def decode_step_seconds(engine, prompt_ids: list[int], steps: int) -> list[float]:
    """Seconds of each plain greedy decode step at batch 1 (one forward pass with the KV cache + argmax), on
    the thread count the engine picks before each step (hw.IdleCores: on a shared machine, a thread whose
    core another process holds stalls every operation)."""
    model = engine.model
    cache = model.new_kv_cache(1, len(prompt_ids) + steps + 2)
    logits, _ = model(torch.tensor([prompt_ids]), kv_cache=cache, last_only=True)
    token, seconds = int(logits[0, -1].argmax()), []
    for _ in range(steps + 1):
        engine.share_cores()
        start = time.perf_counter()
        logits, _ = model(torch.tensor([[token]]), kv_cache=cache, last_only=True)
        token = int(logits[0, -1].argmax())
        seconds.append(time.perf_counter() - start)
    return seconds[1:]   # the first step warms up


def _us(xs: list[float], q: float) -> str:
    return f"{percentile(xs, q) * 1e6:.0f}" if xs else "-"


def mask_row(m, engine, compiler, name: str, grammar: str, index, repeats: int, step_p50: float, record: dict):
    """One schema's row of table 2: its document replayed through both engines."""
    import jsonschema
    schema, document = SCHEMAS[name]
    jsonschema.validate(document, schema)   # the documents are valid: a refusal is the engine's
    ids, vocab = m.tokenizer.encode(json.dumps(document)), m.model.config.vocab_size
    log(f"mask: {name} ({len(ids)} tokens)")
    if grammar.startswith("refused: "):
        return f"| {name} | {len(ids)} | {' | '.join(['-'] * 10)} | llguidance {grammar} |"
    allowed, accept, refused, first = _replays(engine, lambda: replay_llguidance(compiler, grammar, ids, vocab, False),
                                        repeats)
    bare, _, _, _ = _replays(engine, lambda: replay_llguidance(compiler, grammar, ids, vocab, True), repeats)
    notes = [] if refused is None else [f"llguidance refused token {refused}"]
    oc_mask = oc_advance = []
    if isinstance(index, str):
        notes.append(f"outlines-core {index}")
    else:
        oc_mask, oc_advance, refused, _ = _replays(engine, lambda: replay_outlines(index, ids, vocab), repeats)
        if refused is not None:
            seen = m.tokenizer.decode(ids[:refused + 1])[-20:]
            notes.append(f"outlines-core refused token {refused} (text ends {seen!r})")
    ratio = percentile(allowed, 0.99) / step_p50
    record["mask"][name] = {"tokens": len(ids), "ratio_p99_to_step": ratio, "notes": notes,
                            "llg_first_allowed_us": first * 1e6,
                            **{key: [percentile(xs, q) * 1e6 for q in (.5, .99)] if xs else None
                               for key, xs in (("llg_allowed_us", allowed), ("llg_fill_mask_us", bare),
                                               ("llg_accept_us", accept), ("outlines_mask_us", oc_mask),
                                               ("outlines_advance_us", oc_advance))}}
    return (f"| {name} | {len(ids)} | {first * 1e6:.0f} | {_us(allowed, .5)} | {_us(allowed, .99)} | "
            f"{_us(bare, .5)} | {_us(bare, .99)} | {_us(accept, .5)} | {_us(oc_mask, .5)} | {_us(oc_mask, .99)} | "
            f"{_us(oc_advance, .5)} | {ratio:.1%} | {'; '.join(notes) or 'all tokens accepted by both'} |")


def mask_table(m, engine, compiler, grammars: dict, indexes: dict, repeats: int, record: dict):
    decode = decode_step_seconds(engine, m.tokenizer.encode("Write a JSON object describing a book:"), 32)
    step_p50 = statistics.median(decode)
    record["decode_step_ms"] = step_p50 * 1000
    rows = [mask_row(m, engine, compiler, name, grammars[name], indexes[name], repeats, step_p50, record)
            for name in SCHEMAS]
    worst = max((r["ratio_p99_to_step"] for r in record["mask"].values()), default=float("nan"))
    print("\n".join([
        f"\n## 2. mask time per token (µs; p50/p99 over every step of {repeats} replays of each document)",
        ("| schema | tokens | llg first allowed | llg allowed p50 | llg allowed p99 | llg fill_mask p50 | "
         "llg fill_mask p99 | llg accept p50 | outlines mask p50 | outlines mask p99 | outlines advance p50 | "
         "llg allowed p99 ÷ decode step | notes |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows,
        (f"decode step at batch 1 (greedy, KV cache): p50 {step_p50 * 1000:.1f} ms over {len(decode)} steps; "
         f"llguidance mask p99 ÷ decode step p50: at most {worst:.1%} (target < 10 %)")]), flush=True)


# ----------------------------------------------------------------------------- 3. decode with and without a schema
def run_batch(engine, prompts: list[list[int]], grammars: list[str | None], new_tokens: int):
    """Greedy generations of all prompts at once through a fresh Batcher (no prefix cached from an earlier
    run); (their Generations, wall seconds from the first submit to the last token)."""
    from picochat.engine.batcher import Batcher
    from picochat.engine.sampling import SamplingParams
    batcher = Batcher(engine, max_batch=8, max_len=512, start=False)
    start = time.perf_counter()
    requests = [batcher.submit(ids, SamplingParams(max_new_tokens=new_tokens, temperature=0.0, grammar=g),
                               lambda gen, piece: None) for ids, g in zip(prompts, grammars)]
    batcher.run(until_idle=True)
    seconds = time.perf_counter() - start
    batcher.close()
    return [r.gen for r in requests], seconds


def check_outputs(gens, kinds: list[str]) -> tuple[int, int]:
    """(outputs valid under their schema, outputs that ended with finish_reason "stop")."""
    import jsonschema
    valid = stopped = 0
    for gen, kind in zip(gens, kinds):
        if gen.finish_reason != "stop":
            continue
        stopped += 1
        try:
            jsonschema.validate(json.loads(gen.text), GENERATE[kind])
            valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            log(f"invalid {kind} output ({type(e).__name__}): {gen.text!r}")
    return valid, stopped


def decode_runs(engine, prompts: list, grammars: list, kinds: list, batch: int, repeats: int, new_tokens: int):
    """tok/s, tokens generated and jsonschema checks of free and schema runs of the first `batch` prompts."""
    runs = {mode: {"tok_s": [], "tokens": [], "stream": []} for mode in ("free", "schema")}
    valid = stopped = 0
    for r in range(repeats):   # free and schema runs interleaved: a neighbour's load hits both alike
        for mode, run in runs.items():
            log(f"decode: batch {batch}, {mode}, run {r + 1}/{repeats}")
            gens, seconds = run_batch(engine, prompts[:batch],
                                      grammars[:batch] if mode == "schema" else [None] * batch, new_tokens)
            tokens = sum(len(g.token_ids) for g in gens)
            run["tok_s"].append(tokens / seconds)
            run["tokens"].append(tokens)
            run["stream"].append(statistics.mean(g.stats.tokens_per_s for g in gens))   # after each first token
            if mode == "schema":
                v, s = check_outputs(gens, kinds[:batch])
                valid, stopped = valid + v, stopped + s
    return {"free_tok_s": statistics.median(runs["free"]["tok_s"]),
            "schema_tok_s": statistics.median(runs["schema"]["tok_s"]),
            "free_stream_tok_s": statistics.median(runs["free"]["stream"]),
            "schema_stream_tok_s": statistics.median(runs["schema"]["stream"]),
            "free_tokens": statistics.median(runs["free"]["tokens"]),
            "schema_tokens": statistics.median(runs["schema"]["tokens"]),
            "valid": valid, "stopped": stopped, "requests": batch * repeats}


def decode_table(engine, repeats: int, new_tokens: int, record: dict) -> str:
    kinds = [kind for kind, _ in PROMPTS]
    prompts = [engine.chat_prompt([{"role": "user", "content": f"Describe {what} as a JSON object with the fields "
                                    f"{', '.join(GENERATE[kind]['properties'])}."}]) for kind, what in PROMPTS]
    compiled = {kind: engine.grammars.json_schema(schema) for kind, schema in GENERATE.items()}
    grammars = [compiled[kind] for kind in kinds]
    run_batch(engine, prompts[:2], [None, grammars[1]], 8)   # warm-up: kernels, the first matcher
    rows = []
    for batch in (1, 8):
        r = record["decode"][batch] = decode_runs(engine, prompts, grammars, kinds, batch, repeats, new_tokens)
        rows.append(f"| {batch} | {r['free_tok_s']:.1f} | {r['schema_tok_s']:.1f} | "
                    f"{r['schema_tok_s'] / r['free_tok_s']:.2f} | {r['free_stream_tok_s']:.1f} / "
                    f"{r['schema_stream_tok_s']:.1f} | {r['free_tokens']:.0f} / {r['schema_tokens']:.0f} | "
                    f"{r['valid']} of {r['stopped']} (of {r['requests']} requests) |")
    return "\n".join([
        (f"\n## 3. decode tok/s, free vs under a schema (Batcher, greedy, up to {new_tokens} new tokens, median "
         f"of {repeats} runs; engine without speculative decoding, so the difference is the mask's; grammar text "
         "compiled beforehand, each request's matcher started inside the timing)"),
        ("| batch | free tok/s | schema tok/s | schema ÷ free | per-stream decode tok/s free / schema | "
         "tokens generated free / schema | schema outputs valid (jsonschema) of those ended by stop |"),
        "|---|---|---|---|---|---|---|", *rows,
        ("tok/s = tokens generated / wall time from the first submit (prefill included): a schema's output that "
         "ends sooner (compact JSON, no prose) carries its prompt's prefill over fewer tokens. Per-stream decode: "
         "each request's tokens after its first ÷ the time after its first, the mean over requests")])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=None, help="default: qwen2.5-coder-1.5b (--quick: 0.5b)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and the 0.5B model (< 2 minutes)")
    args = parser.parse_args()
    from picochat.engine.engine import Engine
    from picochat.load import load
    began = time.perf_counter()
    print(cpu_line(), flush=True)
    print(f"# load average (1, 5, 15 min) at the start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
          flush=True)
    model = args.model or ("qwen2.5-coder-0.5b" if args.quick else "qwen2.5-coder-1.5b")
    m = load(model, draft=None)
    print(f"# model: {model} ({m.weights} weights, {m.dtype}), vocabulary {m.model.config.vocab_size:,} tokens",
          flush=True)
    record = {"cpu": cpu_line(), "model": model, "compile": {}, "mask": {}, "decode": {}}
    compile_repeats, mask_repeats, decode_repeats = (2, 2, 1) if args.quick else (5, 5, 3)
    compiler, grammars, _, indexes = compile_table(m, compile_repeats, record)
    engine = Engine(m.model, m.tokenizer, draft=None, speculate=False)   # threads: as many as cores are idle
    mask_table(m, engine, compiler, grammars, indexes, mask_repeats, record)
    finish_report(decode_table(engine, decode_repeats, 64, record), time.perf_counter() - began, args.json, record)


if __name__ == "__main__":
    main()
