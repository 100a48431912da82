"""The grammar engine behind JSON-schema answers and tool calls (engine/grammar.py): its interface, every
constrained output validated with `jsonschema`, constrained and free rows sharing a batch, the grammar
kept across batch swaps and the prefix cache, and speculative decoding under a grammar."""
import json

import jsonschema
import pytest
import torch

from picochat.engine.batcher import Batcher
from picochat.engine.engine import Engine
from picochat.engine.grammar import MAX_SCHEMA_DEPTH, GrammarError, schema_problem, strict_schema
from picochat.engine.sampling import SamplingParams

from helpers import run_cli, save_tiny_folder, tiny_tool_engine

TEXT = ('Hello there! {"name": "Ada", "age": 36, "tags": ["x", "y"], "ok": true, "score": 0.5} '
        "What is the weather in Paris? London, Tokyo. 2024-01-01 abc-123 null, false. ") * 40

# Schemas clients send; strings are bounded so a random model's answer ends within max_tokens
SCHEMAS = {
    "flat enum and range": {"type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["colour", "n"], "additionalProperties": False},
    "nested objects": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                   "required": ["name", "age"], "additionalProperties": False}},
        "required": ["person"], "additionalProperties": False},
    "array with min and max items": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False},
    "number range": {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
                     "required": ["x"], "additionalProperties": False},
    "anyOf with null": {"type": "object", "properties": {
        "maybe": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0, "maximum": 9}]}},
        "required": ["maybe"], "additionalProperties": False},
    "string pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{3}$"}},
                       "required": ["code"], "additionalProperties": False},
    "$ref": {"type": "object", "$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}},
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def engine():
    return tiny_tool_engine(TEXT)


def prompt(engine, text="Answer in JSON."):
    return engine.chat_prompt([{"role": "user", "content": text}])


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_sampled_answer_is_valid_under_its_schema(engine, name):
    schema = SCHEMAS[name]
    grammar = engine.grammars.json_schema(schema)
    finished = 0
    for seed in range(4):
        gen = engine.complete(prompt(engine), SamplingParams(max_new_tokens=120, temperature=1.0, seed=seed,
                                                             grammar=grammar))
        if gen.finish_reason == "stop":
            jsonschema.validate(json.loads(gen.text), schema)
            finished += 1
        else:   # cut by max_tokens: what there is, is a prefix of a valid answer
            assert gen.finish_reason == "length"
    assert finished >= 3, f"{name}: only {finished} of 4 answers finished"


def test_json_object_mode_and_compact_style(engine):
    gen = engine.complete(prompt(engine), SamplingParams(max_new_tokens=60, temperature=0,
                                                         grammar=engine.grammars.json_schema({"type": "object"})))
    assert gen.text.startswith("{")
    if gen.finish_reason == "stop":
        assert isinstance(json.loads(gen.text), dict)
        assert "\n" not in gen.text and "  " not in gen.text   # json.dumps' style: no free whitespace


def test_the_interface_accept_rollback_mask_done(engine):
    compiler, vocab = engine.grammars, engine.model.config.vocab_size
    schema = SCHEMAS["flat enum and range"]
    grammar = compiler.start(compiler.json_schema(schema))
    text = json.dumps({"colour": "red", "n": 3})
    tokens = engine.tokenizer.encode(text)
    masks = []
    for t in tokens:
        allowed = grammar.allowed(vocab)
        assert allowed[t], f"token {t} ({engine.tokenizer.decode([t])!r}) of a valid answer was masked"
        masks.append(allowed)
        assert grammar.accept([t])
    assert grammar.is_accepting()
    ends = grammar.allowed(vocab)
    assert all(ends[i] for i in engine.tokenizer.end_of_turn_ids) and grammar.is_done()
    grammar.rollback(3)
    assert torch.equal(grammar.allowed(vocab), masks[-3])   # the state three tokens back
    words = torch.empty((vocab + 31) // 32, dtype=torch.int32)
    grammar.fill_mask(words)
    assert bool(words.ne(0).any())
    with pytest.raises(ValueError):
        grammar.rollback(len(tokens) + 1)
    bad = compiler.start(compiler.json_schema(schema))
    assert not bad.accept(engine.tokenizer.encode("[1]"))   # an array where an object must be


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "foo"}, "foo"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"type": "string", "pattern": "(("}, "regex"),
    ({"$ref": "#/$defs/missing"}, "missing"),
])
def test_schemas_it_cannot_enforce_are_refused_naming_the_keyword(engine, schema, keyword):
    with pytest.raises(GrammarError, match=keyword):
        engine.grammars.json_schema(schema)


def test_schema_limits():
    deep = {"type": "object"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}}
    assert "levels deep" in schema_problem(deep)
    assert schema_problem({"type": "object", "description": "x" * 100_000}).startswith("the schema is")
    assert schema_problem(["not", "an", "object"])
    assert schema_problem({"type": "object", "properties": {"a": {"type": "integer"}}}) is None
    assert MAX_SCHEMA_DEPTH < 40   # a refused schema still fits in a request body (protocol.MAX_JSON_DEPTH)


def test_strict_closes_every_object():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"enum": [{"c": 1}]}}}}}
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False and strict["properties"]["a"]["additionalProperties"] is False
    assert strict["properties"]["a"]["properties"]["b"] == {"enum": [{"c": 1}]}   # values are left alone
    assert "additionalProperties" not in schema   # the caller's copy is untouched


def run_batch(engine, requests, max_batch=4):
    batcher = Batcher(engine, max_batch=max_batch, start=False)
    handles = [batcher.submit(ids, params, lambda g, p: None) for ids, params in requests]
    batcher.run(until_idle=True)
    return [h.gen for h in handles]


def test_constrained_and_free_rows_share_a_batch_and_swaps_keep_each_grammar(engine):
    """Rows of different lengths finish at different steps, so rows swap (Batcher._leave); each request's
    output equals its run alone: the masks stay with their requests. (Greedy: a batched pass and a pass
    alone may differ in the last bits, which can move a sampled token but not a clear argmax.)"""
    grammars = [engine.grammars.json_schema(SCHEMAS[n]) for n in ("nested objects", "$ref", "anyOf with null")]
    requests = []
    for i, grammar in enumerate([None, *grammars, None]):
        params = SamplingParams(max_new_tokens=[5, 60, 60, 60, 40][i], temperature=0, grammar=grammar)
        requests.append((prompt(engine, f"Question {i}?"), params))
    together = run_batch(engine, requests)
    for (ids, params), gen in zip(requests, together):
        alone = engine.complete(ids, params)
        assert gen.token_ids == alone.token_ids
        if params.grammar and gen.finish_reason == "stop":
            json.loads(gen.text)


def test_grammar_survives_prefix_cache_reuse(engine):
    """The second request reuses the first one's row (the same prompt); its grammar starts afresh."""
    grammar = engine.grammars.json_schema(SCHEMAS["flat enum and range"])
    ids = prompt(engine)
    params = SamplingParams(max_new_tokens=40, temperature=0, grammar=grammar)
    first = run_batch(engine, [(ids, params)])
    batcher = Batcher(engine, max_batch=2, start=False)
    handles = [batcher.submit(ids, params, lambda g, p: None)]
    batcher.run(until_idle=True)
    handles.append(batcher.submit(ids, params, lambda g, p: None))
    batcher.run(until_idle=True)
    second = handles[1].gen
    assert second.stats.cached_tokens > 0
    assert second.token_ids == handles[0].gen.token_ids == first[0].token_ids


def test_speculative_decoding_keeps_the_grammar(engine):
    """Drafts (a draft model, prompt lookup) are checked under the mask: greedy output equals plain decoding."""
    grammar = engine.grammars.json_schema(SCHEMAS["array with min and max items"])
    plain = Engine(engine.model, engine.tokenizer, speculate=False)
    drafted = Engine(engine.model, engine.tokenizer, draft=engine.model, draft_tokens=4)
    params = SamplingParams(max_new_tokens=60, temperature=0, grammar=grammar)
    ids = prompt(engine, 'Tags? {"tags": ["a", "b"]} {"tags": ["a", "b"]}')
    want = plain.complete(ids, params)
    got = drafted.complete(ids, params)
    assert got.token_ids == want.token_ids
    assert sum(got.stats.drafted.values()) > 0


def test_a_grammar_started_by_its_trigger(engine):
    """grammar_triggers: free text until the output holds a trigger, then the grammar from there."""
    ids = prompt(engine)
    free = engine.complete(ids, SamplingParams(max_new_tokens=6, temperature=0))
    trigger = engine.tokenizer.decode(free.token_ids[:2])
    grammar = engine.grammars.lark('start: "XYZ"')
    gen = engine.complete(ids, SamplingParams(max_new_tokens=20, temperature=0, grammar=grammar,
                                              grammar_triggers=(trigger,)))
    assert gen.text == trigger + "XYZ" and gen.finish_reason == "stop"
    never = engine.complete(ids, SamplingParams(max_new_tokens=6, temperature=0, grammar=grammar,
                                                grammar_triggers=("\u2603never",)))
    assert never.token_ids == free.token_ids and never.grammar is None


# ----------------------------------------------------------------------------- picochat generate --json-schema
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("tiny"), TEXT, max_seq_len=512)


def test_generate_json_schema_answers_valid_json(tiny_folder, tmp_path, capsys):
    schema = SCHEMAS["flat enum and range"]
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    for extra in ([], ["--chat"]):
        code, out, err = run_cli(["generate", "Pick a colour.", "-m", tiny_folder, "--json-schema", path,
                                  "--temperature", "0", "--max-new-tokens", "120", *extra], capsys)
        assert code == 0, err
        jsonschema.validate(json.loads(out), schema)


@pytest.mark.parametrize("content, message", [
    ('{"type": "foo"}', "cannot be enforced: Invalid type: foo"),
    ("[1, 2]", "must be a JSON object"),
    ("{not json", "not a JSON schema"),
    ('{"description": "' + "x" * 70_000 + '"}', "a JSON schema holds at most that much"),
], ids=["unknown type", "not an object", "not json", "too large"])
def test_generate_refuses_a_bad_schema_file_in_one_line(tiny_folder, tmp_path, capsys, content, message):
    path = tmp_path / "schema.json"
    path.write_text(content)
    code, out, err = run_cli(["generate", "hi", "-m", tiny_folder, "--json-schema", path], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1 and not out


def test_generate_refuses_a_device_or_missing_schema_file(tiny_folder, tmp_path, capsys):
    for path in ("/dev/zero", tmp_path / "missing.json"):
        code, _, err = run_cli(["generate", "hi", "-m", tiny_folder, "--json-schema", path], capsys)
        assert code == 1 and err.startswith("picochat: error:") and len(err.strip().splitlines()) == 1
