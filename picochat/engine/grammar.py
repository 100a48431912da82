"""Grammars that constrain what a generation may write: a JSON schema, a Lark grammar, a regex.

The engine is llguidance (Microsoft's grammar engine behind OpenAI's, llama.cpp's and vLLM's structured
outputs; a Rust library with CPU wheels and no torch dependency): it turns a grammar and the tokenizer's
vocabulary into, at each step, the set of tokens that keep the output inside the grammar — a few
microseconds per token for JSON on a 150k vocabulary (benchmarks/grammar.py).

One small interface, one Grammar per generation:

    grammar.fill_mask(buffer)   the allowed tokens as bits (int32 words), written into `buffer`
    grammar.allowed(vocab)      the same as a (vocab,) bool tensor: what the sampler masks with
    grammar.accept(tokens)      advance over tokens the generation kept
    grammar.rollback(n)         forget the last n accepted tokens
    grammar.is_done()           nothing more can follow but the end of the turn

A Grammar is the state of one generation and travels with it (generation.py): batch swaps and the prefix
cache move keys and values between rows, never the grammar. Grammars are compiled by a GrammarCompiler,
one per tokenizer (building llguidance's view of a 150k vocabulary takes ~1 s; it is made on first use).
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch

MAX_SCHEMA_BYTES = 64 * 1024     # a schema's JSON text; larger ones are refused before compiling
MAX_SCHEMA_DEPTH = 24            # nested objects and arrays in a schema
MAX_TOOLS_SCHEMA_BYTES = 256 * 1024   # all of a request's tools together (each within MAX_SCHEMA_BYTES)
# JSON the way json.dumps writes it (and the models read in their prompts): compact, no free whitespace,
# so a model cannot spend its tokens on blank lines inside an object
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_TEXT = "start: /(.|\\n)*/"   # free text: every token but the special ones (the chat markup, <tool_call>)
if sys.byteorder != "little":   # the masks' bits are read as little-endian bytes (Grammar.allowed)
    raise ImportError("picochat's grammar masks need a little-endian CPU")


class GrammarError(ValueError):
    """A grammar or schema that cannot be enforced: the message says what (names the keyword)."""


def schema_problem(schema, max_bytes: int = MAX_SCHEMA_BYTES) -> str | None:
    """Why a JSON schema is refused before compiling (its size or depth), or None."""
    if not isinstance(schema, dict):
        return f"a JSON schema must be an object, got {type(schema).__name__}"
    size = len(json.dumps(schema))
    if size > max_bytes:
        return f"the schema is {size} bytes; at most {max_bytes}"
    depth = nesting_depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        return f"the schema nests {depth} levels deep; at most {MAX_SCHEMA_DEPTH}"
    return None


def nesting_depth(value) -> int:
    """Nesting depth of objects and arrays, iteratively (a deep schema must not exhaust Python's stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack += [(v, level + 1) for v in (item.values() if isinstance(item, dict) else item)]
    return deepest


def strict_schema(schema: dict) -> dict:
    """OpenAI's strict mode: every object that lists `properties` and says nothing of others takes no
    keys beyond them (a copy; the caller's schema is untouched). An object without `properties` stays
    open: it is a free-form map."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) if k not in ("enum", "const", "default", "examples") else v
           for k, v in schema.items()}
    if "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


class GrammarCompiler:
    """Grammars for one tokenizer: compiles and checks them, and starts a Grammar per generation."""

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance   # (imported on first use: `picochat --help` and plain chat never load it)
        self._llg = llguidance
        self.vocab_size = vocab_size
        self.text_tokenizer = tokenizer
        self.end_ids = sorted(tokenizer.end_of_turn_ids)
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                eos_token=self.end_ids)

    def json_schema(self, schema: dict, strict: bool = False) -> str:
        """The grammar of JSON text valid under `schema` (written compactly, as json.dumps does)."""
        problem = schema_problem(schema)
        if problem:
            raise GrammarError(problem)
        try:
            grammar = self._llg.LLMatcher.grammar_from_json_schema(strict_schema(schema) if strict else schema,
                                                                   overrides=JSON_STYLE)
        except ValueError as e:
            raise GrammarError(f"the schema is not valid: {e}") from None
        return self.check(grammar)

    def lark(self, source: str) -> str:
        """A Lark grammar (llguidance's dialect: `%json{...}` embeds a schema, `<tool_call>` a special token)."""
        return self.check(self._llg.LLMatcher.grammar_from_lark(source))

    def embedded_json(self, schema: dict, max_bytes: int = MAX_SCHEMA_BYTES) -> str:
        """A schema inside a Lark grammar (`%json{...}`), written in the same compact style as json_schema's."""
        problem = schema_problem(schema, max_bytes)
        if problem:
            raise GrammarError(problem)
        return "%json" + json.dumps({**schema, "x-guidance": JSON_STYLE})

    def literal(self, text: str) -> str:
        """`text` as a Lark literal: a special token's own name where the vocabulary has one spelled so
        (Qwen's <tool_call>: as a quoted string llguidance would look for its characters, which that
        token does not spell to it), else the quoted string."""
        token = self.text_tokenizer.token_to_id(text)
        if token is not None and text.startswith("<") and text.endswith(">") and self.tokenizer.is_special_token(token):
            return text
        return json.dumps(text)

    def check(self, grammar: str) -> str:
        """The grammar, if llguidance can enforce it with this tokenizer; else GrammarError with its reason."""
        error = self._llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise GrammarError(error.strip().splitlines()[0])
        return grammar

    def start(self, grammar: str) -> "Grammar":
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Grammar(matcher, self.vocab_size)

    def tokenize(self, text: str) -> list[int]:
        """Tokens spelling `text` (to bring a grammar started mid-token up to the text written so far)."""
        return self.tokenizer.tokenize_str(text)


class Grammar:
    """The state of one generation under a grammar."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self.words = (vocab_size + 31) // 32
        self.accepted = 0   # tokens accepted so far (what rollback can undo)
        self.version = 0    # changes with every accept and rollback: a mask computed before is stale

    def fill_mask(self, buffer: torch.Tensor):
        """Write the allowed next tokens into `buffer`, a contiguous int32 tensor of (vocab + 31) // 32
        words: bit t % 32 of word t // 32 is set when token t may come next."""
        if buffer.dtype != torch.int32 or buffer.numel() != self.words or not buffer.is_contiguous():
            raise ValueError(f"a grammar mask needs a contiguous int32 buffer of {self.words} words")
        self.matcher.unsafe_compute_mask_ptr(buffer.data_ptr(), buffer.numel() * 4)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar failed: {self.matcher.get_error()}")

    def allowed(self, vocab: int) -> torch.Tensor:
        """(vocab,) bool: the tokens that may come next (the model's vocabulary may be padded past the
        tokenizer's; padding tokens are never allowed)."""
        words = torch.empty(self.words, dtype=torch.int32)
        self.fill_mask(words)
        # bit b of word w is token 32·w + b: on a little-endian CPU, bit t % 8 of byte t // 8 (numpy's
        # unpackbits: ~8× faster than shifts on torch's thread pool, and no threads to wait on)
        bits = torch.from_numpy(np.unpackbits(words.numpy().view(np.uint8), bitorder="little").view(np.bool_))
        if bits.numel() >= vocab:
            return bits[:vocab]
        return torch.cat([bits, torch.zeros(vocab - bits.numel(), dtype=torch.bool)])

    def accept(self, tokens: list[int]) -> bool:
        """Advance over `tokens`; False (and the grammar in an error state) if they break it."""
        ok = self.matcher.consume_tokens(list(tokens))
        self.version += 1
        if ok:
            self.accepted += len(tokens)
        return ok

    def rollback(self, n: int):
        """Forget the last n accepted tokens (a speculative guess the model did not keep)."""
        if not 0 <= n <= self.accepted:
            raise ValueError(f"cannot roll back {n} tokens of {self.accepted}")
        if n and not self.matcher.rollback(n):
            raise GrammarError(f"the grammar could not roll back {n} tokens: {self.matcher.get_error()}")
        self.accepted -= n
        self.version += 1

    def is_done(self) -> bool:
        """Whether the grammar is complete and nothing but the end of the turn may follow."""
        return self.matcher.is_stopped()

    def is_accepting(self) -> bool:
        """Whether the text so far is a complete sentence of the grammar (it may still go on)."""
        return self.matcher.is_accepting()
