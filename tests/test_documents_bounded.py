"""Reading documents within bounds (apps/documents.py, and `ask --file` / `summarize` over it): every attack
that was reproduced on picochat's readers, scaled down where the original would be slow, and fuzzing of
the readers. On the code before the fix the attacks hung, ran for minutes or hours, or grew without bound."""
import io
import os
import random
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import run_cli
from picochat.apps import pdf_text
from picochat.apps.documents import (HEADING_MAX, MAX_FILE_BYTES, Document, DocumentError, Section, decode_text,
                                     iter_files, read_bounded, read_document, read_stream_bounded, split_passages)

needs_posix = pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                                 reason="FIFOs, sockets and /dev/zero are POSIX")
LINEAR_SECONDS = 2.0     # a 1 MB line takes ~0.1-1 s on a slow core; the quadratic code took hours


def within(seconds: float, fn, *args, **kwargs):
    """fn(*args, **kwargs) run in a thread: (finished in time, its result or the exception it raised)."""
    box = {}

    def call():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:   # noqa: BLE001 - handed to the test to assert on
            box["result"] = e
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), box.get("result")


def assert_traceable(document: Document, max_chars: int = 800, overlap_chars: int = 150):
    """The module's invariant: each passage is exactly its slice of Document.text."""
    text = document.text
    for p in split_passages(document, max_chars, overlap_chars):
        assert text[p.start:p.start + len(p.text)] == p.text and len(p.text) <= max_chars


# ----------------------------------------------------------------------------- what is read at all
@needs_posix
def test_dev_zero_is_refused_by_name_directly_and_through_a_link_in_a_folder(tmp_path):
    done, result = within(5, read_document, "/dev/zero")
    assert done and isinstance(result, DocumentError) and "/dev/zero: a character device" in str(result)
    (tmp_path / "zero.md").symlink_to("/dev/zero")
    (tmp_path / "ok.md").write_text("# Fine\n\nText.")
    files = iter_files(tmp_path)
    assert [f.name for f in files] == ["ok.md", "zero.md"]     # listed, so that the reader names it
    done, result = within(5, read_document, files[1])
    assert done and isinstance(result, DocumentError) and "zero.md: a character device" in str(result)


@needs_posix
def test_a_fifo_named_md_never_blocks(tmp_path):
    fifo = tmp_path / "b.md"
    os.mkfifo(fifo)
    assert iter_files(tmp_path) == [fifo]
    done, result = within(5, read_document, fifo)
    if not done:   # release the blocked open (a reader waits in it) before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert done, "opening a FIFO blocked"
    assert isinstance(result, DocumentError) and "b.md: a FIFO" in str(result)


@needs_posix
def test_a_folder_and_a_socket_are_named(tmp_path):
    import socket
    with pytest.raises(DocumentError, match="a folder"):
        read_bounded(tmp_path)
    path = f"/tmp/picochat-test-{os.getpid()}.sock"      # a socket's path must be short
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        try:
            with pytest.raises(DocumentError, match=r"\.sock: a socket"):
                read_bounded(path)
        finally:
            os.unlink(path)


def test_symbolic_link_loops(tmp_path, capsys):
    loop = tmp_path / "loop.md"
    loop.symlink_to(loop)
    with pytest.raises(DocumentError, match=r"loop\.md: a symbolic link loop"):
        read_document(loop)
    with pytest.raises(FileNotFoundError, match="missing.md"):   # a missing file stays a missing file
        read_document(tmp_path / "missing.md")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to(tmp_path)             # a folder loop: not walked into
    (tmp_path / "sub" / "a.txt").write_text("text")
    done, files = within(5, iter_files, tmp_path)
    assert done and sorted(f.name for f in files) == ["a.txt", "loop.md"]
    for argv in (["summarize", loop], ["ask", "q", "--file", loop, "--quote"]):
        code, _, err = run_cli(argv, capsys)
        assert code == 1 and "symbolic link loop" in err and "no such file" not in err.lower()


def test_a_file_over_the_limit_names_its_size_the_limit_and_the_flag(tmp_path):
    page = tmp_path / "page.html"
    with open(page, "wb") as f:    # the 50 MB one-line page, sparse: refused from its size, never read
        f.truncate(50 * 2**20)
    with pytest.raises(DocumentError, match=r"page\.html: 50 MB is over the 32 MB limit.*--max-file-mb"):
        read_document(page)
    (tmp_path / "notes.txt").write_bytes(b"word " * 300_000)   # 1.4 MB
    with pytest.raises(DocumentError, match=r"1\.4 MB is over the 1 MB limit"):
        read_document(tmp_path / "notes.txt", max_bytes=2**20)
    assert len(read_document(tmp_path / "notes.txt", max_bytes=2 * 2**20).text) == 1_499_999


def test_a_file_larger_than_its_size_says_is_still_read_within_the_limit():
    proc = Path("/proc/self/status")     # st_size 0, but holds text: the read itself must stop
    if not proc.exists():
        pytest.skip("no /proc")
    with pytest.raises(DocumentError, match="more than 100 bytes is over the 100 bytes limit"):
        read_bounded(proc, max_bytes=100)


class Endless(io.RawIOBase):
    """/dev/zero as a stream: counts what is read from it."""
    given = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        buffer[:] = b"a" * len(buffer)
        self.given += len(buffer)
        return len(buffer)


def test_standard_input_is_bounded(monkeypatch, capsys):
    endless = Endless()
    with pytest.raises(DocumentError, match=r"standard input: more than 1 MB.*--max-file-mb"):
        read_stream_bounded(endless, 2**20)
    assert endless.given <= 2**20 + 1
    assert read_stream_bounded(io.StringIO("héllo"), 100) == "héllo".encode()
    # `summarize -` with 2 MB on standard input and a 1 MB limit: refused before any model loads
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"word " * 400_000)))
    code, _, err = run_cli(["summarize", "-", "--max-file-mb", "1"], capsys)
    assert code == 1 and "picochat: error: standard input: more than 1 MB" in err and "--max-file-mb" in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x00\x01\x02binary")))
    code, _, err = run_cli(["summarize", "-"], capsys)
    assert code == 1 and "standard input: looks like a binary file" in err


@needs_posix
def test_ask_file_refuses_a_device_and_a_bad_limit_before_loading_anything(capsys):
    done, result = within(10, run_cli, ["ask", "q", "--file", "/dev/zero", "--quote"], capsys)
    assert done and result[0] == 1 and "picochat: error: /dev/zero: a character device" in result[2]
    code, _, err = run_cli(["ask", "q", "--file", "/dev/null", "--quote", "--max-file-mb", "0"], capsys)
    assert code == 1 and "--max-file-mb must be a positive number" in err


def test_summarize_reads_files_within_the_limit(tmp_path):
    from picochat.cli.summarize import read_input
    (tmp_path / "a.md").write_text("# Title\n\n" + "Some text. " * 200_000)    # 2.2 MB
    with pytest.raises(DocumentError, match="over the 1 MB limit"):
        read_input(str(tmp_path / "a.md"), 2**20)
    assert read_input(str(tmp_path / "a.md"), 3 * 2**20).startswith("Title\nSome text.")


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("encoding, bom", [("utf-8", "\ufeff"), ("utf-16-le", "\ufeff"), ("utf-16-be", "\ufeff"),
                                           ("utf-32-le", "\ufeff"), ("utf-32-be", "\ufeff"),
                                           ("utf-16-le", ""), ("utf-16-be", "")])
def test_byte_order_marks_and_utf16_without_one(tmp_path, encoding, bom):
    text = bom + "# Café\n\nThe menu costs 5 € — 中文 too.\n"
    (tmp_path / "menu.md").write_bytes(text.encode(encoding))
    doc = read_document(tmp_path / "menu.md")
    assert doc.title == "Café" and doc.sections[0].text == "The menu costs 5 € — 中文 too."
    (tmp_path / "menu.html").write_bytes((bom + "<h1>Café</h1><p>5 €</p>").encode(encoding))
    assert read_document(tmp_path / "menu.html").text == "5 €"


def test_binary_is_refused_whatever_its_name(tmp_path):
    noise = random.Random(0).randbytes(20_000)
    for name in ("data.md", "data.txt", "data.html", "data.bin"):
        (tmp_path / name).write_bytes(noise)
        with pytest.raises(DocumentError, match=f"{name}: looks like a binary file"):
            read_document(tmp_path / name)
    controls = bytes(range(1, 9)) * 1000 + b"some text"         # no NUL, but no text either
    (tmp_path / "controls.md").write_bytes(controls)
    with pytest.raises(DocumentError, match="control characters"):
        read_document(tmp_path / "controls.md")
    (tmp_path / "old.txt").write_bytes("Café crème, 5 €\f\nnext page\x1b[0m".encode("cp1252"))  # still text
    assert read_document(tmp_path / "old.txt").text == "Café crème, 5 €\f\nnext page\x1b[0m"
    with pytest.raises(DocumentError, match="not valid UTF-16-LE"):
        decode_text(b"\xff\xfe\x00\xd8", "lone-surrogate")


# ----------------------------------------------------------------------------- linear time
ADVERSARIAL = {   # 1 MB lines aimed at each pattern the readers run: name → (extension, text)
    "spaces": (".md", " " * 2**20), "tabs": (".md", "\t" * 2**20), "hashes": (".md", "#" * 2**20),
    "heading spaces": (".md", "# a" + " " * 2**20 + "b"), "closing hashes": (".md", "# x " + "#" * 2**20 + " y"),
    "underline": (".md", "x\n" + "=" * 2**20 + "x"), "dashes": (".md", "-" * 2**20),
    "newlines with spaces": (".txt", "\n \t" * (2**20 // 3)), "dots": (".txt", "." * 2**20),
    "full stops": (".txt", "a. " * (2**20 // 3)), "abbreviations": (".txt", "Dr. " * (2**20 // 4)),
    "open tags": (".html", "<a " * (2**20 // 3)), "open attributes": (".html", "<a b='" * (2**20 // 6)),
    "end tags": (".html", "</" * (2**20 // 2)), "declarations": (".html", "<![CDATA[" * (2**20 // 9)),
    "char ref": (".html", "&#" + "9" * 2**20), "open heading": (".html", "<h1>" + "x " * (2**20 // 2)),
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_a_1mb_adversarial_line_is_read_and_split_in_linear_time(name):
    ext, text = ADVERSARIAL[name]
    start = time.perf_counter()
    doc = read_document(f"/adversarial{ext}", data=text.encode())
    read = time.perf_counter() - start
    passages = split_passages(doc)
    split = time.perf_counter() - start - read
    assert read < LINEAR_SECONDS and split < LINEAR_SECONDS, (name, read, split)
    assert all(len(p.section) <= 6 * (HEADING_MAX + 3) for p in passages)


def test_the_reported_heading_line():
    start = time.perf_counter()
    doc = read_document("/x.md", data=("# a" + " " * 16000 + "b\n\ntext").encode())
    assert time.perf_counter() - start < 0.5                     # it took 5.5 s
    assert doc.title == "a…" and doc.sections[0].heading == "a…"  # cut: 16,002 characters
    assert doc.sections[0].text == "a" + " " * 16000 + "b\n\ntext"


# ----------------------------------------------------------------------------- headings
def test_headings_are_cut_and_their_text_kept():
    heading = " ".join(f"word{i}" for i in range(40_000))        # 200 KB, in Markdown and in HTML
    for name, data in [("/x.md", f"# {heading}\n\n" + "Body sentence. " * 100),
                       ("/x.html", f"<h1>{heading}</h1><p>" + "Body sentence. " * 100 + "</p>")]:
        doc = read_document(name, data=data.encode())
        passages = split_passages(doc)
        assert len(passages) > 200 and all(len(p.section) <= HEADING_MAX for p in passages)
        assert passages[0].section.endswith("…") and doc.title == passages[0].section
        assert heading in doc.text and "Body sentence." in doc.text          # nothing lost
        assert len({p.text for p in passages}) == len(passages)              # not one heading 294 times
        assert_traceable(doc)


def test_an_unclosed_html_heading_keeps_the_text_after_it():
    doc = read_document("/x.html", data=b"<h1>Shop<p>We open at 9.</p><p>We close at 5.</p><h2>Parking</h2>"
                                        b"<p>Behind the shop.</p>")
    assert [(s.heading, s.text) for s in doc.sections] == [
        ("Shop", "We open at 9.\n\nWe close at 5."), ("Shop › Parking", "Behind the shop.")]
    doc = read_document("/y.html", data=("<h1>Title " + "then a whole page of text " * 100).encode())
    assert len(doc.sections[0].heading) == HEADING_MAX and doc.sections[0].text.count("whole page of text") == 100
    doc = read_document("/z.html", data=b"<h1><div>Inside a div</div></h1><p>Body.</p>")
    assert [(s.heading, s.text) for s in doc.sections] == [("Inside a div", "Body.")]


def test_html_tokenizer_reads_the_usual_constructs():
    page = (b"<!DOCTYPE html><html><head><title>T &amp; C</title><script>if (a<b) x='</p>';</script></head>"
            b"<body><!-- a comment <h1>no</h1> --><h1 class=\"x>y\">Terms</h1><p>One&nbsp;&#233;&#x41;"
            b"&#99999999999999999999;<br/>two</p><p/><pre>  kept\n  as is</pre><a href=it's>link</a></body>")
    doc = read_document("/t.html", data=page)
    assert doc.title == "T & C"
    assert [(s.heading, s.text) for s in doc.sections] == [
        ("Terms", "One éA\ufffd\ntwo\n\n  kept\n  as is\n\nlink")]


# ----------------------------------------------------------------------------- PDF
def build_pdf(pages: int, content: bytes, form: bytes | None = None, text_per_page: list | None = None) -> bytes:
    """A hand-written PDF whose `pages` pages share one Flate content stream (the attack's shape); with
    `form`, the content draws a form XObject holding that stream."""
    objects = {1: b"<< /Type /Catalog /Pages 2 0 R >>",
               3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"}
    kids = " ".join(f"{10 + i} 0 R" for i in range(pages)).encode()
    objects[2] = b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages
    packed = zlib.compress(content, 9)
    objects[4] = b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(packed) + packed + b"\nendstream"
    xobjects = b""
    if form is not None:
        packed = zlib.compress(form, 9)
        objects[5] = (b"<< /Type /XObject /Subtype /Form /BBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> "
                      b">> /Length %d /Filter /FlateDecode >>\nstream\n" % len(packed) + packed + b"\nendstream")
        xobjects = b" /XObject << /Fm1 5 0 R >>"
    for i in range(pages):
        objects[10 + i] = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
                           b"/Resources << /Font << /F1 3 0 R >>" + xobjects + b" >> >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for n in sorted(objects):
        offsets[n] = len(out)
        out += b"%d 0 obj\n" % n + objects[n] + b"\nendobj\n"
    xref, size = len(out), max(objects) + 1
    out += b"xref\n0 %d\n" % size
    out += b"".join(b"%010d 00000 n \n" % offsets[n] if n in offsets else b"0000000000 65535 f \n"
                    for n in range(size))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)


def show(text: bytes) -> bytes:
    return b"BT /F1 12 Tf 72 720 Td (" + text + b") Tj ET"


def test_the_reported_pdf_a_thousand_pages_sharing_one_long_string_is_refused_at_once():
    data = build_pdf(1000, show(b"A long string. " * 350_000))          # 5 MB of text a page, 1000 times
    assert len(data) < 200_000
    done, result = within(10, read_document, "/attack.pdf", data)
    assert done and isinstance(result, DocumentError)
    assert "page 1 holds more than 4 MB of drawing instructions" in str(result)


def test_a_pdf_flate_bomb_and_a_form_are_measured_without_being_inflated():
    bomb = build_pdf(1, show(b" " * (64 * 2**20)))
    start = time.perf_counter()
    with pytest.raises(DocumentError, match="drawing instructions"):
        read_document("/bomb.pdf", data=bomb)
    assert time.perf_counter() - start < 2
    form = build_pdf(2, b"/Fm1 Do", form=show(b"Hidden in a form. " * 300_000))
    with pytest.raises(DocumentError, match="page 1 holds more than"):
        read_document("/form.pdf", data=form)
    small_form = build_pdf(1, b"/Fm1 Do", form=show(b"Hidden in a form."))
    assert "Hidden in a form." in read_document("/ok.pdf", data=small_form).text


def test_pdf_text_is_bounded_per_page_and_per_document(monkeypatch):
    data = build_pdf(3, show(b"x" + b" " * 200_000 + b"word " * 30_000))   # spaces, then 150 K of words
    start = time.perf_counter()
    doc = read_document("/long.pdf", data=data)
    assert time.perf_counter() - start < 5       # the tidying regex was quadratic on the spaces
    assert [len(s.text) <= pdf_text.PDF_PAGE_CHARS for s in doc.sections] == [True] * 3
    monkeypatch.setattr(pdf_text, "PDF_DOC_CHARS", 500_000)
    with pytest.raises(DocumentError, match=r"more than 500,000 characters of text by page 2"):
        read_document("/long.pdf", data=data)
    monkeypatch.setattr(pdf_text, "PDF_MAX_PAGES", 2)
    with pytest.raises(DocumentError, match="3 pages, over the 2 pages"):
        read_document("/long.pdf", data=data)


def test_a_slow_pdf_stops_at_its_time_budget(monkeypatch):
    data = build_pdf(400, show(b"Some words on every page. " * 2000))
    monkeypatch.setattr(pdf_text, "PDF_SECONDS", 0.3)
    start = time.perf_counter()
    with pytest.raises(DocumentError, match=r"took over 0.3 s \(stopped at page \d+ of 400\)"):
        read_document("/slow.pdf", data=data)
    assert time.perf_counter() - start < 3


@pytest.mark.parametrize("error", [MemoryError, RecursionError])
def test_pypdf_running_out_of_memory_or_stack_is_a_document_error(monkeypatch, error):
    import pypdf

    def fail(*args, **kwargs):
        raise error()
    monkeypatch.setattr(pypdf.PageObject, "extract_text", fail)
    with pytest.raises(DocumentError, match="ok.pdf"):
        read_document("/ok.pdf", data=build_pdf(1, show(b"Fine.")))


# ----------------------------------------------------------------------------- fuzzing
PIECES = list("ab #=-.!?\n\t <>/&;x9'\"`~|*1。？」\x00\u00a0") + ["<h1>", "</h1>", "<p>", "<!--", "-->", "```", "&#"]
MARKUP = st.lists(st.sampled_from(PIECES), max_size=120).map("".join)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
BASE_PDF = build_pdf(2, show(b"The printer (A) is on floor 2."))


@FUZZ
@given(data=st.one_of(st.binary(max_size=400), MARKUP.map(str.encode),
                      st.text(max_size=200).map(lambda t: t.encode("utf-16"))),
       ext=st.sampled_from([".md", ".html", ".txt", ".pdf", ".py"]))
def test_fuzzed_bytes_give_a_traceable_document_or_a_document_error(data, ext):
    try:
        doc = read_document(f"/fuzz{ext}", data=data)
    except DocumentError:
        return
    assert_traceable(doc, 60, 20)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(BASE_PDF) - 1), st.binary(max_size=12)), min_size=1,
                      max_size=6))
def test_fuzzed_pdfs_give_a_document_or_a_document_error(edits):
    data = bytearray(BASE_PDF)
    for at, new in edits:
        data[at:at + len(new)] = new
    try:
        doc = read_document("/fuzz.pdf", data=bytes(data))
    except DocumentError:
        return
    assert_traceable(doc)


@FUZZ
@given(sections=st.lists(st.tuples(MARKUP, MARKUP), max_size=4), max_chars=st.integers(1, 120),
       overlap=st.integers(0, 60))
def test_fuzzed_sections_split_into_traceable_passages(sections, max_chars, overlap):
    assert_traceable(Document("/x", "x", [Section(h, t) for h, t in sections]), max_chars, overlap)


def test_the_flags_default_is_the_readers_limit_and_less_for_a_summary():
    from picochat.cli import build_parser
    from picochat.cli.summarize import SUMMARY_MAX_BYTES
    assert build_parser().parse_args(["ask", "q", "--file", "x"]).max_file_mb * 2**20 == MAX_FILE_BYTES
    assert build_parser().parse_args(["summarize", "x"]).max_file_mb * 2**20 == SUMMARY_MAX_BYTES
    assert SUMMARY_MAX_BYTES < 30 * 10**6   # the reported 30 MB on standard input is refused by default
