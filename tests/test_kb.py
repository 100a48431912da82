"""The knowledge base (picochat/kb.py) and the document reader (picochat/documents.py).

Ranking is checked with the real all-MiniLM-L6-v2 (skipped, with the reason, where it has not been pulled);
the rest uses it when present and a tiny random-weight encoder otherwise.
"""
import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from picochat.apps.documents import (Document, DocumentError, Section, mostly_chinese, read_document, sentences,
                                     split_passages)
from picochat import hub
from picochat.load import load_encoder
from picochat.model.encoder import Bert, BertConfig, SentenceEncoder
from picochat.apps.kb import EncoderMismatch, KnowledgeBase, RemovesEverything, kb_path
from picochat.apps.terms import index_grams, match_query, query_terms


def tiny_encoder(name="tiny-random", dim=32, seed=0) -> SentenceEncoder:
    """A random-weight BERT over a small lowercasing WordPiece vocabulary (unknown words share [UNK])."""
    from tokenizers import Tokenizer, models as tm, normalizers, pre_tokenizers, processors
    words = ("the a car park parking visitors refund money back open hours wifi password office page "
             "one two three alpha beta gamma delta new old text section heading document").split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words)}
    tok = Tokenizer(tm.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.enable_truncation(64)
    torch.manual_seed(seed)
    model = Bert(BertConfig(vocab_size=len(vocab), hidden_size=dim, num_layers=1, num_heads=2,
                            intermediate_size=2 * dim, max_position=64))
    return SentenceEncoder(model, tok, name, 64)


def real_encoder():
    try:
        return load_encoder()
    except hub.ModelNotFound:
        return None


@pytest.fixture(scope="module")
def encoder():
    return real_encoder() or tiny_encoder()


@pytest.fixture(scope="module")
def minilm():
    enc = real_encoder()
    if enc is None:
        pytest.skip("all-MiniLM-L6-v2 not pulled (run `picochat pull minilm`): ranking needs the real model")
    return enc


def make_pdf(path: Path, pages: list[list[str]]) -> Path:
    """A minimal PDF, one page per list of lines, written by hand (pypdf cannot write text)."""
    n = len(pages)
    objects = ["<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, lines in enumerate(pages):
        ops = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) Tj T*" for line in lines) + " ET"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {5 + 2 * i} 0 R "
                       f"/Resources << /Font << /F1 3 0 R >> >> >>")
        objects.append(f"<< /Length {len(ops)} >>\nstream\n{ops}\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)
    return path


MARKDOWN = """# Office guide

Everything about the office.

## Parking

Visitors use the car park behind building B.

```
# a comment in code, not a heading
```

### Bicycles

Bicycle racks are next to the main door.

## Wi-Fi

The guest network password is on your badge.
"""

HTML = """<html><head><title>Returns policy</title><script>var secret = "xyzzy";</script>
<style>p { color: red }</style></head><body><nav><a href="/">Home</a> navigationword</nav>
<h1>Returns</h1><p>You can return an item within 30 days.</p>
<h2>Refunds</h2><p>Refunds reach your card within   14 days.</p><ul><li>Keep the receipt</li><li>Keep the box</li></ul>
</body></html>"""


def corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "guide.md").write_text(MARKDOWN)
    (folder / "returns.html").write_text(HTML)
    (folder / "notes.txt").write_text("First paragraph about alpha.\n\nSecond paragraph about beta.\n")
    make_pdf(folder / "manual.pdf", [["The printer is on the second floor."], ["Toner is in cupboard 3."]])
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")   # not a supported extension: not walked
    return folder


# ----------------------------------------------------------------------------- reading documents
def test_read_formats(tmp_path):
    folder = corpus(tmp_path / "docs")
    md = read_document(folder / "guide.md")
    assert md.title == "Office guide"
    assert [s.heading for s in md.sections] == ["Office guide", "Office guide › Parking",
                                                "Office guide › Parking › Bicycles", "Office guide › Wi-Fi"]
    assert "# a comment in code" in md.sections[1].text

    html = read_document(folder / "returns.html")
    assert html.title == "Returns policy"
    assert [s.heading for s in html.sections] == ["Returns", "Returns › Refunds"]
    assert html.sections[1].text == "Refunds reach your card within 14 days.\n\n- Keep the receipt\n\n- Keep the box"
    assert "xyzzy" not in html.text and "color" not in html.text and "navigationword" not in html.text

    pdf = read_document(folder / "manual.pdf")
    assert [s.heading for s in pdf.sections] == ["page 1", "page 2"]
    assert "printer is on the second floor" in pdf.sections[0].text and "cupboard 3" in pdf.sections[1].text

    txt = read_document(folder / "notes.txt")
    assert txt.title == "notes" and [s.heading for s in txt.sections] == [""]

    (tmp_path / "script.py").write_text("print('hello')\n")      # other UTF-8 text: read as text
    assert "hello" in read_document(tmp_path / "script.py").text
    with pytest.raises(DocumentError, match=r"image\.png.*\.pdf"):
        read_document(folder / "image.png")


def test_markdown_underlined_headings(tmp_path):
    (tmp_path / "setext.md").write_text("Shop guide\n==========\n\nIntro text.\n\nOpening hours\n-------------\n"
                                        "Open 9 to 5.\n\n---\n\nAfter a rule.\n\n```\nnot a heading\n---\n```\n")
    doc = read_document(tmp_path / "setext.md")
    assert doc.title == "Shop guide"
    assert [s.heading for s in doc.sections] == ["Shop guide", "Shop guide › Opening hours"]
    assert doc.sections[0].text == "Intro text."
    assert "Open 9 to 5." in doc.sections[1].text and "After a rule." in doc.sections[1].text
    assert "not a heading\n---" in doc.sections[1].text   # inside a code fence: text


def test_bad_pdfs(tmp_path):
    import pypdf
    writer = pypdf.PdfWriter()
    writer.add_blank_page(100, 100)
    writer.encrypt("secret")
    with open(tmp_path / "locked.pdf", "wb") as f:
        writer.write(f)
    with pytest.raises(DocumentError, match="locked.pdf.*password"):
        read_document(tmp_path / "locked.pdf")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Cat")
    with pytest.raises(DocumentError, match="broken.pdf"):
        read_document(tmp_path / "broken.pdf")


def test_split_passages():
    sentences = [f"Sentence number {i} says something about topic {i % 7}." for i in range(60)]
    paragraphs = [" ".join(sentences[i:i + 6]) for i in range(0, 60, 6)]
    doc = Document("/x.txt", "x", [Section("A", "short one"), Section("B", "\n\n".join(paragraphs)),
                                   Section("C", "w" * 2000)])
    passages = split_passages(doc, max_chars=300, overlap_chars=80)
    assert [p.section for p in passages][:2] == ["A", "B"] and passages[-1].section == "C"
    for p in passages:   # within one section, at most max_chars, exactly where `start` says
        assert len(p.text) <= 300 and doc.text[p.start:p.start + len(p.text)] == p.text
    b = [p for p in passages if p.section == "B"]
    assert all(p.text.endswith(".") and p.text[0].isupper() for p in b)     # cut at sentence boundaries
    assert any(q.start < p.start + len(p.text) for p, q in zip(b, b[1:]))   # consecutive pieces overlap
    covered = "".join(doc.text[p.start:p.start + len(p.text)] for p in b)
    assert all(s in covered for s in sentences)                             # nothing lost


def test_sentences_are_not_cut_at_wrapped_lines_or_abbreviations_and_chinese_stops_end_them():
    text = ("We are open Mon. to Fri. from 9 am to 6 pm. On Saturdays we are open from\n"
            "10 am to 4 pm. We close at 5 p.m. on holidays. Dr. Lee says \"call us.\" Tel. 0161 496 0734.\n"
            "- Bikes: 20 pounds a day\n- Helmets: free\n\n"
            "营业时间：周一至周五9:30至21:00。周六呢？照常营业！周日休息；“欢迎光临。”节假日另行通知\n"
            "（见公告）。")
    assert sentences(text) == [
        "We are open Mon. to Fri. from 9 am to 6 pm.", "On Saturdays we are open from 10 am to 4 pm.",
        "We close at 5 p.m. on holidays.", "Dr. Lee says \"call us.\"", "Tel. 0161 496 0734.",
        "- Bikes: 20 pounds a day", "- Helmets: free",
        "营业时间：周一至周五9:30至21:00。", "周六呢？", "照常营业！", "周日休息；", "“欢迎光临。”", "节假日另行通知（见公告）。"]
    # a passage is cut at sentence ends only: never between "Sat." and "10 am"
    doc = Document("/x.md", "x", [Section("Hours", "Open Mon. to Fri. 9 am to 6 pm and Sat. 10 am to 4 pm. " * 8)])
    assert all(p.text.endswith("4 pm.") for p in split_passages(doc, max_chars=200, overlap_chars=60))


def test_html_line_breaks_stay_inside_their_paragraph(tmp_path):
    (tmp_path / "hours.html").write_text("<h1>Hours</h1><p>Saturday:<br>\n 10 am to 4 pm</p><p>Sunday: closed</p>")
    doc = read_document(tmp_path / "hours.html")
    assert doc.sections[0].text == "Saturday:\n10 am to 4 pm\n\nSunday: closed"
    assert sentences(doc.sections[0].text) == ["Saturday: 10 am to 4 pm", "Sunday: closed"]


def test_chinese_is_told_from_english_and_japanese():
    assert mostly_chinese("你们几点关门？") and mostly_chinese("Kindle多少钱？")   # a Latin word counts once
    assert not mostly_chinese("What does 退货 mean?") and not mostly_chinese("営業時間は何時ですか")
    assert not mostly_chinese("") and not mostly_chinese("0571-8865 2210")


# ----------------------------------------------------------------------------- the store
def test_kb_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    assert kb_path("shop-faq_2.v1") == tmp_path / "kb" / "shop-faq_2.v1.sqlite"
    assert kb_path("x/y") == Path("x/y") and kb_path("faq.db") == Path("faq.db")
    for bad in ("", "with space", "ü", ".."):
        with pytest.raises(ValueError):
            kb_path(bad)


def test_add_update_remove_reopen(tmp_path, encoder):
    folder = corpus(tmp_path / "docs")
    calls = []
    with KnowledgeBase(tmp_path / "kb.sqlite", encoder) as kb:
        report = kb.add([folder, tmp_path / "missing.txt"], progress=lambda i, n: calls.append((i, n)))
        assert (report.added, report.updated, report.unchanged) == (4, 0, 0)
        assert report.skipped == [(str(tmp_path / "missing.txt"), "no such file or folder")]
        assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
        docs = {Path(d.source).name: d for d in kb.documents()}
        assert set(docs) == {"guide.md", "returns.html", "notes.txt", "manual.pdf"}
        assert report.passages == sum(d.passages for d in docs.values()) and docs["manual.pdf"].passages == 2

        again = kb.add([folder])
        assert (again.added, again.updated, again.unchanged, again.passages) == (0, 0, 4, 0)

        notes = folder / "notes.txt"
        notes.write_text("First paragraph about gamma.\n\nSecond paragraph about delta.\n")
        changed = kb.add([notes])
        assert (changed.added, changed.updated) == (0, 1)
        texts = [h.text for h in kb.search("paragraph about", k=20) if h.source == str(notes)]
        assert texts == ["First paragraph about gamma.\n\nSecond paragraph about delta."]   # replaced, once
        assert not any("alpha" in h.text for h in kb.search("alpha", k=20))
        assert {Path(d.source).name: d.passages for d in kb.documents()}["notes.txt"] == 1

        kb.set_setting("persona", "You are the office assistant.")
        kb.set_setting("handoff", "Ask at reception.")

    with KnowledgeBase(tmp_path / "kb.sqlite", encoder) as kb:   # everything persisted
        assert len(kb.documents()) == 4 and kb.encoder_name == encoder.name
        assert kb.setting("persona") == "You are the office assistant." and kb.setting("nope", "d") == "d"
        (folder / "notes.txt").unlink()
        assert kb.remove(folder / "notes.txt")                   # gone from disk: removed by its path
        assert not kb.remove(folder / "notes.txt")
        (folder / "manual.pdf").unlink()
        assert kb.sync() == [str(folder / "manual.pdf")]
        assert sorted(Path(d.source).name for d in kb.documents()) == ["guide.md", "returns.html"]
        assert not any(h.source.endswith((".txt", ".pdf")) for h in kb.search("printer paragraph", k=20))
        with pytest.raises(RemovesEverything, match="holds all 2 documents"):   # a folder of them all ...
            kb.remove(folder)
        assert len(kb.documents()) == 2
        assert kb.remove(folder, everything=True) and kb.documents() == []   # ... only when asked to
        rows = sqlite3.connect(tmp_path / "kb.sqlite").execute(
            "SELECT (SELECT COUNT(*) FROM passages), (SELECT COUNT(*) FROM passages_fts)").fetchone()
        assert rows == (0, 0)


class CountingEncoder:
    """An encoder that records each call's number of texts, and whether the knowledge base's write lock was
    free during it (another connection could take it at once)."""

    def __init__(self, encoder, path: Path):
        self.encoder, self.path, self.calls, self.lock_free = encoder, path, [], []
        self.name, self.dim = encoder.name, encoder.dim

    def encode(self, texts, batch_size=32):
        self.calls.append(len(texts))
        other = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            self.lock_free.append(True)
        except sqlite3.OperationalError:
            self.lock_free.append(False)
        finally:
            other.close()
        return self.encoder.encode(texts, batch_size)


def test_add_embeds_the_passages_of_many_files_in_few_calls(tmp_path, encoder, monkeypatch):
    """One encoder call for many small files (not one per file), outside any write transaction, with the
    per-file outcomes, progress and the rows the same whatever the batch size."""
    from picochat.apps import kb as kb_module
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(12):
        (folder / f"note{i:02d}.md").write_text(f"# Note {i}\n\nThe car park note number {i}, alpha.\n")
    (folder / "empty.md").write_text("\n")
    rows = {}
    for batch in (256, 5):
        monkeypatch.setattr(kb_module, "ENCODE_BATCH", batch)
        path = tmp_path / f"kb{batch}.sqlite"
        counting, calls = CountingEncoder(encoder, path), []
        with KnowledgeBase(path, counting) as kb:
            report = kb.add([folder, folder / "note03.md"], progress=lambda i, n: calls.append((i, n)))
            assert (report.added, report.passages, len(report.skipped)) == (12, 12, 1)   # note03 once
            assert calls == [(i, 13) for i in range(1, 14)]
            assert counting.calls == ([12] if batch == 256 else [5, 5, 2]) and all(counting.lock_free)
            rows[batch] = sorted((Path(h.source).name, h.text) for h in kb.search("car park note", k=20))
            (folder / "note05.md").write_text("# Note 5\n\nChanged: the bicycle racks.\n")
            again = kb.add([folder])
            assert (again.added, again.updated, again.unchanged, again.passages) == (0, 1, 11, 1)
            (folder / "note05.md").write_text("# Note 5\n\nThe car park note number 5, alpha.\n")
            kb.add([folder / "note05.md"])
        assert all(counting.lock_free)
    assert rows[256] == rows[5] and len(rows[5]) == 12


def test_hostile_queries(tmp_path, encoder):
    with KnowledgeBase(tmp_path / "kb.sqlite", encoder) as kb:
        assert kb.search("anything") == []                       # empty knowledge base
        kb.add([corpus(tmp_path / "docs")])
        for q in ['"', "*", "AND OR NOT", ")(", "", "   ", "?!", 'car" OR "x', "NEAR(a b)", "col:val", "^x-y"]:
            assert isinstance(kb.search(q), list)
        assert kb.search("") == [] and kb.search(")(") == []
        assert match_query('a "b" AND (c*') == '"b" OR "c"' and match_query("AND OR NOT") == '"and" OR "or" OR "not"'


def test_different_encoder_refused(tmp_path):
    with KnowledgeBase(tmp_path / "kb.sqlite", tiny_encoder("tiny-one")) as kb:
        kb.add([corpus(tmp_path / "docs")])
    for other in (tiny_encoder("tiny-two"), tiny_encoder("tiny-one", dim=16)):
        with KnowledgeBase(tmp_path / "kb.sqlite", other) as kb:
            with pytest.raises(EncoderMismatch, match="tiny-one"):
                kb.add([tmp_path / "docs"])
            with pytest.raises(EncoderMismatch):
                kb.search("car park")
            assert kb.encoder_name == "tiny-one" and len(kb.documents()) == 4


PASSAGES = {
    "Parking": "Staff and guests may use the car park behind building B; spaces by the entrance are reserved.",
    "Opening hours": "The office is open from 8am to 6pm, Monday to Friday, and closed on public holidays.",
    "Wi-Fi": "The guest wireless network is called Visitors; its password is printed on your badge.",
    "Refunds": "Refunds are paid back to the original card within 14 days of receiving the returned item.",
    "Delivery": "Orders are shipped within two working days and usually arrive three to five days later.",
    "Canteen": "The canteen on the ground floor serves breakfast and lunch; hot meals until 2pm.",
    "Printing": "Printers are on every floor; collect your printouts by tapping your badge on the printer.",
    "Lost badge": "If you lose your access badge, report it to security at once so that it can be blocked.",
}


def rrf(hit) -> float:
    """The reciprocal rank fusion score search used before (Σ 1/(60 + rank) over the two rankings)."""
    return 1 / (60 + hit.vector_rank) + (1 / (60 + hit.bm25_rank) if hit.bm25_rank else 0)


def test_ranking(tmp_path, minilm):
    doc = tmp_path / "faq.md"
    doc.write_text("# FAQ\n\n" + "".join(f"## {h}\n\n{t}\n\n" for h, t in PASSAGES.items()))
    with KnowledgeBase(tmp_path / "kb.sqlite", minilm) as kb:
        assert kb.add([doc]).passages == 8
        for query, section in [("where can I leave my car", "Parking"), ("what time do you close", "Opening hours"),
                               ("how do I get online", "Wi-Fi"), ("I want my money back", "Refunds"),
                               ("how long until my parcel comes", "Delivery"), ("where can I eat", "Canteen"),
                               ("my access badge is gone", "Lost badge")]:
            hits = kb.search(query, k=3)
            assert hits[0].section == f"FAQ › {section}", (query, [(h.section, h.similarity) for h in hits])
            assert hits[0].vector_rank == 1 and hits[0].score >= hits[1].score
        # "card" also occurs in the refunds passage ("the original card"): its word rank is 1, but the word is
        # one of the question's three, so its overlap is partial and the meaning wins (reciprocal rank fusion,
        # which counts ranks only, put the refunds passage first)
        hits = kb.search("I misplaced my ID card", k=3)
        refunds = next(h for h in hits if h.section == "FAQ › Refunds")
        assert hits[0].section == "FAQ › Lost badge" and hits[0].vector_rank == 1 and hits[0].bm25_rank is None
        assert refunds.bm25_rank == 1 and 0 < refunds.overlap < 1
        assert rrf(refunds) > rrf(hits[0])
        # similarity is an absolute signal: about 0.2 and up for an answer, under 0.1 for an unrelated question
        relevant = [kb.search(q, k=1)[0].similarity for q in ("where can I leave my car", "how do I get online")]
        unrelated = [kb.search(q, k=1)[0].similarity
                     for q in ("the mating habits of deep-sea octopuses", "what is the capital of France")]
        assert min(relevant) > 0.2 and max(unrelated) < 0.12
        assert kb.embed(["car park"]).shape == (1, 384)


BOOKSHOP = """# 书店指南

## 退货

购书15天内凭小票可以退货，特价书不退不换。

## 营业时间

每天上午10点至晚上9点营业，春节闭店三天。

## 无线网络

店内免费上网，密码是wutong2024。

## Parking

Visitors park behind building B.
"""


def test_chinese_words_are_searched_as_bigrams_and_characters(tmp_path, encoder):
    assert query_terms("你们的退货政策是什么？") == ["退货", "货政", "政策", "退", "货", "政", "策"]  # 的 是 什么 out
    assert match_query("密码是wutong2024吗") == '"密码" OR "密" OR "码" OR "wutong2024"'
    assert index_grams("指南 › 退货", "可以退货。Bring the receipt.") == "指南 指 南 退货 退 货 可以 以退 退货 可 以 退 货"
    assert index_grams("Parking", "Visitors park behind building B.") == ""   # English: indexed as before
    (tmp_path / "shop.md").write_text(BOOKSHOP)
    with KnowledgeBase(tmp_path / "kb.sqlite", encoder) as kb:
        kb.add([tmp_path / "shop.md"])
        # unicode61 reads 购书15天内凭小票可以退货 as one word: these found nothing by words before
        for question, section in [("可以退货吗？", "退货"), ("退货", "退货"), ("几点营业？", "营业时间"),
                                  ("无线网的密码是多少？", "无线网络"), ("wutong2024", "无线网络")]:
            hits = kb.search(question, k=5)
            best = max(hits, key=lambda h: h.overlap)
            assert best.section == f"书店指南 › {section}" and best.bm25_rank == 1 and best.overlap > 0.3, question
            assert hits[0].section == best.section
            assert (hits[0].sentence_similarity is None) == mostly_chinese(question)   # Chinese: not reranked
        assert kb.search("where do visitors park", k=1)[0].section == "书店指南 › Parking"
        assert all(h.bm25_rank is None for h in kb.search("红烧肉怎么做？", k=5))   # none of its words


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (id INTEGER PRIMARY KEY, source TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL,
    title TEXT NOT NULL, added_at REAL NOT NULL, passages INTEGER NOT NULL);
CREATE TABLE passages (id INTEGER PRIMARY KEY, document_id INTEGER NOT NULL REFERENCES documents(id),
    ord INTEGER NOT NULL, section TEXT NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL, vector BLOB NOT NULL);
CREATE INDEX passages_document ON passages(document_id);
CREATE VIRTUAL TABLE passages_fts USING fts5(
    text, section, content='passages', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER passages_ai AFTER INSERT ON passages BEGIN
    INSERT INTO passages_fts(rowid, text, section) VALUES (new.id, new.text, new.section);
END;
CREATE TRIGGER passages_ad AFTER DELETE ON passages BEGIN
    INSERT INTO passages_fts(passages_fts, rowid, text, section) VALUES ('delete', old.id, old.text, old.section);
END;
"""


def test_a_schema_1_file_is_upgraded_on_opening(tmp_path, encoder):
    """A knowledge base written before Chinese was indexed gets its word index rebuilt, once, in place."""
    path = tmp_path / "old.sqlite"
    passages = [("指南 › 政策", "购书15天内凭小票可以退货。"), ("指南 › Parking", "Visitors park behind building B.")]
    vectors = encoder.encode([f"{section}\n{text}" for section, text in passages])
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
        db.executemany("INSERT INTO meta VALUES (?, ?)", [("schema_version", "1"), ("generation", "1"),
                       ("embedding_model", encoder.name), ("embedding_dim", str(encoder.dim))])
        db.execute("INSERT INTO documents VALUES (1, '/docs/guide.md', 'x', '指南', 0, 2)")
        rows = [(i, section, text, v.tobytes()) for i, ((section, text), v) in enumerate(zip(passages, vectors))]
        db.executemany("INSERT INTO passages (document_id, ord, section, text, start, vector) "
                       "VALUES (1, ?, ?, ?, 0, ?)", rows)
        assert db.execute("SELECT COUNT(*) FROM passages_fts WHERE passages_fts MATCH '\"退货\"'").fetchone() == (0,)
    with KnowledgeBase(path, encoder) as kb:
        assert kb.search("退货", k=1)[0].bm25_rank == 1
        assert kb.search("where do visitors park", k=1)[0].text.startswith("Visitors park")
        assert [d.source for d in kb.documents()] == ["/docs/guide.md"]
        (tmp_path / "more.md").write_text("# 更多\n\n会员买书打9折。\n")
        kb.add([tmp_path / "more.md"])                        # the new triggers write the new column
        assert kb.search("会员打折", k=1)[0].section == "更多"
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
        grams = dict(db.execute("SELECT id, grams FROM passages").fetchall())
        assert "退货" in grams[1].split() and grams[2] == "指南 指 南"      # the heading's Chinese too
    KnowledgeBase(path, encoder).close()                    # opening an upgraded file changes nothing


def test_readers_during_writes(tmp_path, encoder):
    """A writer adds documents one transaction each while readers search: no errors, no half documents,
    and a long-lived reader sees the new documents."""
    folder = tmp_path / "docs"
    folder.mkdir()
    n_docs = 24
    for i in range(n_docs):   # three sections → exactly three passages each
        (folder / f"doc{i:02d}.md").write_text(
            "".join(f"# Part {j}\n\nDocument {i} part {j}: the car park, alpha and beta, note {i}-{j}.\n\n"
                    for j in range(3)))
    path = tmp_path / "kb.sqlite"
    KnowledgeBase(path, encoder).close()
    errors, searches, done = [], [0], threading.Event()

    def reader():
        try:
            with KnowledgeBase(path, encoder) as kb:
                check = sqlite3.connect(path)
                while not done.is_set():
                    for h in kb.search("car park alpha", k=10):
                        number = int(Path(h.source).stem[3:])
                        assert h.text.startswith(f"Document {number} part"), h
                    counts = check.execute("SELECT d.passages, (SELECT COUNT(*) FROM passages p "
                                           "WHERE p.document_id = d.id) FROM documents d").fetchall()
                    assert all(c == (3, 3) for c in counts), counts
                    searches[0] += 1
                check.close()
        except BaseException as e:   # noqa: B902 — reported by the main thread
            errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    with KnowledgeBase(path, encoder) as watcher:
        assert watcher.search("car park") == []
        for t in readers:
            t.start()
        try:
            with KnowledgeBase(path, encoder) as writer:
                report = writer.add(sorted(folder.iterdir()))
        finally:
            done.set()
            for t in readers:
                t.join(60)
        assert not errors, errors
        assert report.added == n_docs and report.passages == 3 * n_docs and searches[0] > 0
        hits = watcher.search(f"note {n_docs - 1}-2", k=3 * n_docs)   # the cached vectors were reloaded
        assert len(hits) == 3 * n_docs and any(h.text.endswith(f"note {n_docs - 1}-2.") for h in hits)


def test_not_a_knowledge_base(tmp_path):
    from picochat.apps.kb import KnowledgeBaseError
    (tmp_path / "notes.sqlite").write_text("just text, " * 100)
    with pytest.raises(KnowledgeBaseError, match="notes.sqlite"):
        KnowledgeBase(tmp_path / "notes.sqlite")
    KnowledgeBase(tmp_path / "new.sqlite").close()
    with sqlite3.connect(tmp_path / "new.sqlite") as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(KnowledgeBaseError, match="newer picochat"):
        KnowledgeBase(tmp_path / "new.sqlite")
