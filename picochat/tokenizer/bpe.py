"""Tokenizer: text <-> token ids, chat templates, and streaming detokenization.

One class wraps a `tokenizers.Tokenizer` (the Rust library behind Hugging Face's fast tokenizers) and
can come from three places:

    Tokenizer.from_file("path/to/hf_model_dir")       # tokenizer.json (+ tokenizer_config.json)
    Tokenizer.from_gguf_metadata(meta)                # the tokenizer.* keys of a GGUF file
    Tokenizer.train(iter(texts), vocab_size=32768)    # picochat's own byte-level BPE

encode() turns special-token strings (e.g. "<|im_start|>") into their single special ids, so it is for
trusted text. Chat prompts go through encode_chat: the Jinja chat template renders the conversation with
special-token strings inside the messages escaped, so only the template's own markup becomes special ids
and message text is always tokenized as text (a user cannot forge a turn or a system prompt). Templates
come from model files, i.e. untrusted code: they run in a sandbox with a time and size budget (chat_template.py).

picochat's own chat format (DEFAULT_CHAT_TEMPLATE) writes every message as

    <|system|>You are terse.<|end|><|user|>Hi!<|end|><|assistant|>Hello.<|end|>

with no newlines, and a generation prompt is a bare `<|assistant|>`. `<|endoftext|>` separates
pretraining documents (it is bos and eos); `<|end|>` ends a chat turn.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import tokenizers
from jinja2.exceptions import TemplateError
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

from ..atomic import atomic_write_text
from .chat_template import TemplateLimitError, compile_chat_template, render_bounded, text_size
from .gguf_vocab import gguf_tokenizer_settings
from .pretokenize import LLAMA3_SPLIT, bytes_to_unicode

# ----------------------------------------------------------------------------- picochat's chat format

ENDOFTEXT = "<|endoftext|>"
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_ROLES = ("system", "user", "assistant")

# <|role|>content<|end|> per message, no separators; `<|assistant|>` as the generation prompt.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('picochat chat roles are system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Special-token strings inside message text are escaped before the template renders it: each becomes
# _ESCAPE and one code character (private-use characters of plane 15), _ESCAPE itself too.
_ESCAPE = "\U000F0000"
_FIRST_CODE = 0xF0001

# Tokens that end an assistant turn in common chat formats (llama.cpp auto-detects the same list).
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>",
                      "<|endoftext|>", "<EOT>")

# ----------------------------------------------------------------------------- helpers


def _token_content(value) -> str | None:
    """A special token from tokenizer_config.json: a string, or a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _pick_chat_template(value) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates (take "default")."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _training_texts(items) -> Iterator[str]:
    """Training text from an iterable of texts and file paths (see Tokenizer.train)."""
    for item in items:
        is_path = isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item
                                                    and os.path.isfile(item))
        if not is_path:
            if not isinstance(item, str):
                raise ValueError(f"training input must be str texts or file paths, got {type(item).__name__}")
            yield item
            continue
        if not os.path.isfile(item):
            raise ValueError(f"{item}: training file not found")
        # yield ~1 MB of whole lines at a time: runs of newlines stay together, memory stays bounded
        try:
            with open(item, encoding="utf-8") as f:
                chunk, size = [], 0
                for line in f:
                    chunk.append(line)
                    size += len(line)
                    if size >= 1 << 20:
                        yield "".join(chunk)
                        chunk, size = [], 0
                if chunk:
                    yield "".join(chunk)
        except UnicodeDecodeError as e:
            raise ValueError(f"{item}: training file is not UTF-8 text ({e})") from e


def _normalize_messages(messages) -> list[dict]:
    """Copy chat messages, turning OpenAI-style content parts into one string (picochat is text-only)."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"chat message {i} must be a dict with a 'role', got {message!r}")
        message = dict(message)
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            texts = []
            for part in content:
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, dict) and part.get("type", "text") == "text":
                    texts.append(part.get("text", ""))
                else:
                    raise ValueError(f"chat message {i}: only text content parts are supported, got {part!r}")
            message["content"] = "".join(texts)
        out.append(message)
    return out


# ----------------------------------------------------------------------------- Tokenizer


class Tokenizer:
    """A byte-level BPE (or any tokenizer.json) tokenizer plus the chat settings a model needs."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 model_max_length: int | None = None, add_bos_token: bool = False,
                 extra_end_of_turn_tokens: Iterable[str] = ()):
        """Wrap `backend`. Special tokens are given as strings and must be in its vocabulary.

        add_bos_token only records the setting (it is saved to tokenizer_config.json); BOS is actually
        added by the backend's post-processor when encode(..., add_special_tokens=True) is called.
        """
        self.backend = backend
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.add_bos_token = add_bos_token
        self._extra_end_of_turn_tokens = tuple(extra_end_of_turn_tokens)
        self._compiled_template = None  # compiled on first apply_chat_template
        self._text_backend: tokenizers.Tokenizer | None = None  # made on first encode_text
        self._escapes: tuple | None = None                       # made on first escape_special

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a Hugging Face tokenizer: a folder with tokenizer.json, or a tokenizer.json file.

        tokenizer_config.json (and chat_template.jinja, as newer transformers save it) next to the
        tokenizer.json supply the chat template, bos/eos/pad tokens and model_max_length when present.
        """
        path = Path(path)
        if path.is_dir():
            folder, tokenizer_json = path, path / "tokenizer.json"
            if not tokenizer_json.is_file():
                raise ValueError(f"{path}: folder has no tokenizer.json")
        elif path.is_file():
            folder, tokenizer_json = path.parent, path
        else:
            raise ValueError(f"{path}: no such tokenizer file or folder")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the Rust side raises a bare Exception for bad JSON or unknown fields
            raise ValueError(f"{tokenizer_json}: not a valid tokenizer.json ({e})") from e

        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        chat_template = _pick_chat_template(config.get("chat_template"))
        jinja_path = folder / "chat_template.jinja"
        if chat_template is None and jinja_path.is_file():
            chat_template = jinja_path.read_text(encoding="utf-8")
        max_len = config.get("model_max_length")
        if not isinstance(max_len, int) or max_len >= 10**12:  # transformers writes 1e30 for "unknown"
            max_len = None
        try:
            return cls(backend, bos_token=_token_content(config.get("bos_token")),
                       eos_token=_token_content(config.get("eos_token")),
                       pad_token=_token_content(config.get("pad_token")), chat_template=chat_template,
                       model_max_length=max_len, add_bos_token=bool(config.get("add_bos_token", False)),
                       extra_end_of_turn_tokens=[t for t in config.get("picochat_end_of_turn_tokens") or []
                                                 if isinstance(t, str) and backend.token_to_id(t) is not None])
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from e

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "GGUF metadata") -> "Tokenizer":
        """Build the tokenizer a GGUF file describes from its metadata (GGUF key -> plain Python value): byte-level
        BPE with llama.cpp's word split for its `tokenizer.ggml.pre` (gguf_vocab.py). `source` (e.g. the file
        path) is used in error messages."""
        return cls(**gguf_tokenizer_settings(meta, source))

    @classmethod
    def train(cls, files_or_iterator, vocab_size: int, special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS,
              min_frequency: int = 2, model_max_length: int | None = None,
              show_progress: bool = False) -> "Tokenizer":
        """Train a byte-level BPE tokenizer with picochat's special tokens and chat template.

        files_or_iterator: a path to a UTF-8 text file, or an iterable whose items are texts or files:
        a Path (os.PathLike) item is a file, a str item is a file if it names an existing one, else text.
        vocab_size is an upper bound: tiny corpora may yield fewer merges. Special tokens get the first
        ids, then the 256 byte tokens (so any UTF-8 text round-trips), then the merges.
        """
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special_tokens has duplicates: {special_tokens}")
        if vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size {vocab_size} is too small: it must hold the 256 byte tokens plus "
                             f"{len(special_tokens)} special tokens, i.e. be at least {256 + len(special_tokens)}")

        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=special_tokens, show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

        if isinstance(files_or_iterator, (str, os.PathLike)):  # a single argument is a file path
            files_or_iterator = [Path(files_or_iterator)]
        n_chars = 0  # counted on the way through, to reject empty input

        def texts() -> Iterator[str]:
            nonlocal n_chars
            for text in _training_texts(files_or_iterator):
                n_chars += len(text)
                yield text

        backend.train_from_iterator(texts(), trainer)
        if n_chars == 0:
            raise ValueError("training input is empty: no text in the given files or iterator")

        bos = eos = ENDOFTEXT if ENDOFTEXT in special_tokens else None
        if bos is not None:  # encode(doc, add_special_tokens=True) starts the document with <|endoftext|>
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))])
        has_chat_tokens = all(f"<|{r}|>" in special_tokens for r in (*CHAT_ROLES, "end"))
        return cls(backend, bos_token=bos, eos_token=eos,
                   chat_template=DEFAULT_CHAT_TEMPLATE if has_chat_tokens else None,
                   model_max_length=model_max_length, add_bos_token=bos is not None)

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for `text`. Special-token strings in the text become their special ids: for trusted
        text only (see encode_text and encode_chat).

        add_special_tokens=True adds BOS where this tokenizer's config says to (add_bos_token).
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_text(self, text: str) -> list[int]:
        """Token ids for `text` as plain text: special-token strings in it become ordinary tokens (the ones
        their characters spell), never special ids. For text from users, documents or models."""
        if self._text_backend is None:  # a copy that does not look for special tokens, made once
            backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
            backend.encode_special_tokens = True
            self._text_backend = backend
        return self._text_backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """encode() for many texts at once, in parallel threads (for data preparation)."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for `ids`; bytes that do not form complete UTF-8 characters decode to U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string as spelled in the vocabulary (e.g. "<|end|>", "Ġthe"), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's spelling of a token id, or None if out of range."""
        return self.backend.id_to_token(token_id)

    def token_byte_lengths(self):
        """np.ndarray (vocab_size,) int64: how many UTF-8 bytes each token id stands for; special tokens 0.

        Used for bits per byte, a loss that does not depend on the vocabulary. A byte-level BPE token
        is spelled one character per byte (GPT-2's alphabet), so its length is its spelling's length;
        decoding it alone could give U+FFFD for a token that holds part of a multi-byte character.
        """
        import numpy as np  # local: the rest of the tokenizer has no use for numpy

        byte_alphabet = set(bytes_to_unicode().values())
        byte_level = isinstance(self.backend.decoder, decoders.ByteLevel)
        added = self.backend.get_added_tokens_decoder()
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i in added:  # special tokens are 0; user-defined ones (<think>) are their text
                lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
                continue
            token = self.backend.id_to_token(i)
            if token is None:
                continue
            if byte_level and set(token) <= byte_alphabet:
                lengths[i] = len(token)
            else:
                lengths[i] = len(self.backend.decode([i], skip_special_tokens=False).encode("utf-8"))
        return lengths

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def end_of_turn_ids(self) -> set[int]:
        """Ids that end an assistant turn: eos plus the known end-of-turn tokens this vocabulary has."""
        ids = {self.eos_token_id} if self.eos_token_id is not None else set()
        added = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()}
        for token in (*END_OF_TURN_TOKENS, *self._extra_end_of_turn_tokens):
            if token in added:  # only added tokens: a plain BPE piece spelled "<|end|>" is just text
                ids.add(added[token])
        return ids

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render a conversation to prompt text with this tokenizer's Jinja chat template.

        messages: [{"role": ..., "content": str or [{"type": "text", "text": ...}, ...]}, ...].
        Extra kwargs (e.g. tools) are passed to the template, as transformers does. Any failure of the
        template (syntax, raise_exception, sandbox violation, its time or size budget) raises ValueError.
        This is the text to show; to tokenize a conversation use encode_chat, not encode(this text).
        """
        return self._render(messages, add_generation_prompt, kwargs, escape=False)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of a conversation rendered with the chat template: only the template's own markup
        becomes special ids; the messages' text (and kwargs' strings) is tokenized as text."""
        return self.encode_rendered(self.render_chat(messages, add_generation_prompt, **kwargs))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """apply_chat_template's text with the special-token strings inside the messages (and kwargs)
        escaped (see escape_special): text for encode_rendered, in which the template's own markup is the
        only markup. A rendering that extends another can be encoded a suffix at a time (ChatSession)."""
        return self._render(messages, add_generation_prompt, kwargs, escape=True)

    def encode_rendered(self, rendered: str) -> list[int]:
        """Token ids for text from render_chat (or a stretch of it, cut outside escapes): special-token
        strings become special ids, escaped ones are encoded as plain text."""
        *_, escaped, hazards = self._escaping()
        parts = escaped.split(rendered)  # template text, code, template text, code, ...
        ids, plain = [], ""
        for i, part in enumerate(parts):
            if i % 2:
                plain += hazards[ord(part) - _FIRST_CODE]
            elif part:  # neighbouring escapes are encoded together, as the text they spell
                ids += (self.encode_text(plain) if plain else []) + self.encode(part)
                plain = ""
        return ids + (self.encode_text(plain) if plain else [])

    def escape_special(self, text: str) -> str:
        """`text` with every special-token string (and the escape character itself) replaced by an escape:
        private-use characters that render_chat's output carries for encode_rendered to encode as text."""
        find, codes, *_ = self._escaping()
        return find.sub(lambda m: codes[m.group()], text)

    def unescape_special(self, rendered: str) -> str:
        """The text escape_special (or render_chat) escaped: unescape_special(render_chat(m)) is
        apply_chat_template(m) for any template that treats message text as opaque."""
        *_, escaped, hazards = self._escaping()
        return escaped.sub(lambda m: hazards[ord(m.group(1)) - _FIRST_CODE], rendered)

    @property
    def special_tokens(self) -> list[str]:
        """The special (control) tokens' strings, e.g. "<|im_start|>": markup only a chat template writes."""
        return [t.content for _, t in sorted(self.backend.get_added_tokens_decoder().items()) if t.special]

    def _escaping(self) -> tuple:
        """(pattern finding what to escape, {string: its escape}, pattern finding escapes, [escaped strings])."""
        if self._escapes is None:
            hazards = [_ESCAPE, *sorted(set(self.special_tokens), key=len, reverse=True)]  # longest match first
            if _FIRST_CODE + len(hazards) > 0x10FFFF:
                raise ValueError(f"too many special tokens to escape ({len(hazards) - 1})")
            codes = {h: _ESCAPE + chr(_FIRST_CODE + i) for i, h in enumerate(hazards)}
            find = re.compile("|".join(map(re.escape, hazards)))
            escaped = re.compile(f"{_ESCAPE}([{chr(_FIRST_CODE)}-{chr(_FIRST_CODE + len(hazards) - 1)}])")
            self._escapes = (find, codes, escaped, hazards)
        return self._escapes

    def _escape_all(self, value):
        """escape_special applied to every string inside `value` (dict values, list and tuple items)."""
        if isinstance(value, str):
            return self.escape_special(value)
        if isinstance(value, dict):
            return {k: self._escape_all(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._escape_all(v) for v in value]
        return value

    def _render(self, messages: list[dict], add_generation_prompt: bool, kwargs: dict, escape: bool) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        messages = _normalize_messages(messages)
        try:
            input_chars = text_size([messages, kwargs])
            if escape:
                messages, kwargs = self._escape_all(messages), self._escape_all(kwargs)
            if self._compiled_template is None:
                self._compiled_template = compile_chat_template(self.chat_template)
            variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                         "pad_token": self.pad_token or "", **kwargs}
            return render_bounded(self._compiled_template, input_chars, messages=messages,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except TemplateLimitError as e:
            raise ValueError(f"chat template stopped: {e}") from None
        except TemplateError as e:
            raise ValueError(f"chat template error: {type(e).__name__}: {e}") from e
        except (TypeError, KeyError, IndexError, AttributeError, ValueError, ArithmeticError, MemoryError,
                RecursionError) as e:  # e.g. str + None in a template, an integer too long to print
            raise ValueError(f"chat template failed to render: {type(e).__name__}: {e}") from e

    # ------------------------------------------------------------------ saving

    def save(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json so transformers.AutoTokenizer can load the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        added = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token,
            "clean_up_tokenization_spaces": False,  # else transformers' decode edits spaces before punctuation
            "added_tokens_decoder": added,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if self._extra_end_of_turn_tokens:  # e.g. Llama 3's <|eot_id|> from a GGUF's eot_token_id
            config["picochat_end_of_turn_tokens"] = list(self._extra_end_of_turn_tokens)
        atomic_write_text(folder / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")


# ----------------------------------------------------------------------------- streaming detokenization


class StreamDecoder:
    """Turns generated token ids into text incrementally, never emitting half a UTF-8 character.

    A multi-byte character (Chinese, emoji) is often split across tokens; decoding such a prefix gives
    U+FFFD. So, as vLLM and TGI do, we decode a short window ids[prefix_offset:] and emit only the text
    beyond what ids[prefix_offset:read_offset] already produced, and only once it does not end in
    U+FFFD. Decoding the window (not just the new id) also keeps context-dependent decoders (e.g. a
    sentencepiece leading space) right. The window restarts at every emission, so work per token is O(1)
    for normal text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: text before it has been emitted
        self.read_offset = 0    # ids[prefix_offset:read_offset] decode to text that has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text (possibly "")."""
        self.ids.append(token_id)
        emitted = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(emitted):]
        return ""

    def flush(self) -> str:
        """Return any held-back text (an incomplete character comes out as U+FFFD) and reset."""
        emitted = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.ids, self.prefix_offset, self.read_offset = [], 0, 0
        return text[len(emitted):]
