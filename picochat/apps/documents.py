"""Files → sections → passages: what the knowledge base (kb.py) indexes.

A Document is a title and a list of Sections, each a heading path ("Delivery › Returns") and its text:
Markdown splits at `#` headings, HTML at <h1>–<h6>, a PDF by page, plain text has one section.
`split_passages` cuts sections into passages of at most `max_chars` characters, at paragraph and then
sentence boundaries, never across a section (a passage is about one thing, and carries its heading), with
the end of one piece repeated at the start of the next so a fact cut in two is still whole in one of them.

Every Section and Passage records where its text starts in `Document.text` (the sections joined by blank
lines), and its text is exactly that slice: a passage can always be traced back to its place.

Files come from users and from folders nobody checked, so reading is bounded (reading.py: regular files
only, at most MAX_FILE_BYTES, decoded by byte order mark, binary refused; html_text.py and pdf_text.py keep
their own bounds); every pass over the text is linear (headings are parsed with string operations, no
regex backtracks over a long line), and a heading is cut to HEADING_MAX characters. Every problem is a
DocumentError naming the file.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .html_text import html_sections
from .pdf_text import pdf_pages
from .reading import (HEADING_MAX, HEADING_SEP, MAX_FILE_BYTES, DocumentError,  # noqa: F401 (the readers' API)
                      decode_text, read_bounded, read_stream_bounded, short_heading)

SUPPORTED = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")
SECTION_SEP = "\n\n"   # between sections in Document.text


@dataclass
class Section:
    heading: str        # heading path, "Delivery › Returns"; "" before the first heading or without any
    text: str
    start: int = 0      # offset of `text` in Document.text


@dataclass
class Document:
    source: str                                   # the file's absolute path
    title: str
    sections: list[Section] = field(default_factory=list)

    def __post_init__(self):
        self.sections = [s for s in self.sections if s.text.strip()]
        offset = 0
        for s in self.sections:
            s.start = offset
            offset += len(s.text) + len(SECTION_SEP)

    @property
    def text(self) -> str:
        return SECTION_SEP.join(s.text for s in self.sections)


@dataclass
class Passage:
    source: str
    section: str        # the section's heading path
    text: str
    start: int          # offset of `text` in Document.text


# ----------------------------------------------------------------------------- reading files
def read_document(path, data: bytes | None = None, max_bytes: int = MAX_FILE_BYTES) -> Document:
    """Read a .txt, .md/.markdown, .html/.htm or .pdf file (or any UTF-8 text file) into a Document.

    data: the file's bytes, when the caller has already read them (kb.py hashes them); otherwise the file is
    read with read_bounded(path, max_bytes). Raises DocumentError for a file it cannot read (binary, too
    large, not a regular file, encrypted or broken PDF), FileNotFoundError if absent."""
    path = Path(path).expanduser()
    if data is None:
        data = read_bounded(path, max_bytes)
    source = os.path.realpath(path)   # not Path.resolve(): it raises RuntimeError on a symbolic link loop
    ext = path.suffix.lower()
    if ext == ".pdf":
        return _read_pdf(data, source, path)
    text = decode_text(data, path, utf8_only=ext not in SUPPORTED, hint=_FORMATS_HINT)
    if ext in (".html", ".htm"):
        return _read_html(text, source, path)
    if ext in (".md", ".markdown"):
        return _read_markdown(text, source, path)
    return _read_text(text, source, path)


_FORMATS_HINT = f"; accepted formats are {', '.join(SUPPORTED)} and other UTF-8 text files"


# ----------------------------------------------------------------------------- formats
def _read_text(text: str, source: str, path: Path) -> Document:
    return Document(source, path.stem, [Section("", text.strip())])


FENCE = re.compile(r"^\s{0,3}(```|~~~)")
SETEXT_UNDERLINE = re.compile(r"^\s{0,3}(=+|-+)[ \t]*$")


def _atx_heading(line: str) -> tuple[int, str] | None:
    """(level, text) of a `#` heading line ("## Returns ##" → (2, "Returns")), or None. String operations,
    not a regex: the regex this replaced backtracked quadratically on a long line of spaces."""
    rest = line.lstrip()
    if len(line) - len(rest) > 3 or not rest.startswith("#"):
        return None
    body = rest.lstrip("#")
    level = len(rest) - len(body)
    if level > 6 or (body and body[0] not in " \t"):
        return None    # "#5" or "####### x" is text
    body = body.strip(" \t")
    unclosed = body.rstrip("#")
    if not unclosed or unclosed[-1] in " \t":   # a closing run of #s goes ("## Returns ##"); "C#" keeps its #
        body = unclosed
    return level, body.strip()


def _read_markdown(text: str, source: str, path: Path) -> Document:
    """Sections at headings — `#` lines, or a line underlined with `===` / `---` — never inside ``` or ~~~
    code fences; the title is the first level-1 heading. A heading over HEADING_MAX characters is cut, and
    kept whole as the first line of its section's text."""
    sections, lines, stack, fence, title = [], [], [], None, None

    def close():
        sections.append(Section(HEADING_SEP.join(h for _, h in stack), "\n".join(lines).strip()))
        lines.clear()

    for line in text.split("\n"):
        m = FENCE.match(line)
        if m:
            fence = m.group(1) if fence is None else (None if m.group(1) == fence else fence)
        h = _atx_heading(line) if fence is None and not m else None
        u = SETEXT_UNDERLINE.match(line) if fence is None and h is None and lines and lines[-1].strip() else None
        if h is None and u is None:
            lines.append(line)
            continue
        # the line above an underline is the heading: level 1 under "===", 2 under "---"
        level, heading = h if h is not None else ((1 if u.group(1)[0] == "=" else 2), lines.pop().strip())
        close()
        while stack and stack[-1][0] >= level:
            stack.pop()
        if heading:
            stack.append((level, short_heading(heading)))
            if level == 1 and title is None:
                title = stack[-1][1]
            if len(heading) > HEADING_MAX:
                lines.append(heading)
    close()
    return Document(source, title or path.stem, sections)


def _read_html(text: str, source: str, path: Path) -> Document:
    """Sections at <h1>–<h6>; paragraphs and list items become blocks; scripts, styles and navigation go."""
    title, sections = html_sections(text)
    return Document(source, title or path.stem, [Section(h, "\n\n".join(paras)) for h, paras in sections])


def _read_pdf(data: bytes, source: str, path: Path) -> Document:
    """One section per page with text ("page 3"); the title from the PDF's metadata, else the file name."""
    title, pages = pdf_pages(data, path)
    return Document(source, title or path.stem, [Section(heading, text) for heading, text in pages])


# ----------------------------------------------------------------------------- passages
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# a full stop after one of these is not a sentence's end ("Sat. 10 am", "Dr. Lee", "5 p.m. on Sundays"); after
# any other word it is, unless a digit follows ("No. 5")
ABBREVIATIONS = ("Mr Mrs Ms Dr Prof St Mt Mon Tue Tues Wed Thu Thur Thurs Fri Sat Sun Jan Feb Mar Apr Jun Jul Aug "
                 "Sep Sept Oct Nov Dec Tel Fig approx incl excl e.g i.e vs a.m p.m").split()
_NOT_ABBREVIATION = "".join(rf"(?<!\b{re.escape(a)}\.)" for a in ABBREVIATIONS)
_CLOSE = "\"'”’)\\]」』）"     # a closing quote or bracket after the stop stays with its sentence
# (?=\s) first: the abbreviations are looked behind for only where a space follows, not at every full stop
SENTENCE_END = re.compile(
    rf"(?=\s)(?:(?<=[!?…])|(?<=\.){_NOT_ABBREVIATION}|(?<=[.!?…][{_CLOSE}]))\s+(?!\d)"      # . ! ? … then a space
    rf"|(?:(?<=[。！？；])|(?<=[。！？；][{_CLOSE}]))(?![{_CLOSE}])\s*")                # 。！？； need none
# a line that starts one of these begins a new block; any other line continues the one above (a wrapped line)
BLOCK_START = re.compile(r"\s*(?:[-*+•]\s|\d{1,3}[.)]\s|#|>|\|)")
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# what Chinese and Japanese set without spaces: Han, kana, their punctuation and full-width forms
UNSPACED = re.compile(r"[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")


def sentences(text: str) -> list[str]:
    """The sentences of a text, each as it stands in the text except that a line break inside it reads as a
    space: a blank line, a list item, heading, quote or table row ends a sentence, a wrapped line does not
    (Markdown and PDF text break lines mid-sentence: "open from\n10 am to 4 pm" is one sentence)."""
    return [s.strip() for block in _blocks(text) for s in SENTENCE_END.split(block) if len(s.strip()) > 1]


def _blocks(text: str) -> list[str]:
    """The paragraphs and list items of a text, each on one line: wrapped lines joined with a space (with
    none between two Chinese characters or punctuation marks)."""
    blocks = []
    for paragraph in PARAGRAPH_BREAK.split(text):
        lines = [line.strip() for line in paragraph.split("\n") if line.strip()]
        for i, line in enumerate(lines):
            if i == 0 or BLOCK_START.match(line):
                blocks.append(line)
            else:
                unspaced = UNSPACED.match(blocks[-1][-1]) and UNSPACED.match(line[0])
                blocks[-1] += ("" if unspaced else " ") + line
    return blocks


def han_share(text: str) -> float:
    """How much of a text is Chinese: its Han characters over its Han characters plus its other words (a
    run of letters or digits counts once, as a word weighs about what a character does); 0 with neither."""
    han = len(HAN.findall(text))
    words = len(re.findall(r"[^\W\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff_]+", text))
    return han / (han + words) if han + words else 0.0


def mostly_chinese(text: str) -> bool:
    """Whether a text is Chinese: mostly Han characters, and no kana (Japanese writes Han characters too)."""
    return han_share(text) > 0.5 and not re.search(r"[\u3040-\u30ff]", text)


def split_passages(document: Document, max_chars: int = 800, overlap_chars: int = 150) -> list[Passage]:
    """Cut each section into passages of at most max_chars characters (see the module's docstring)."""
    if max_chars < 1 or overlap_chars < 0:
        raise ValueError("max_chars must be positive and overlap_chars not negative")
    overlap_chars = min(overlap_chars, max_chars // 2)   # every passage brings at least half new text
    out = []
    for s in document.sections:
        for a, b in _chunks(s.text, max_chars, overlap_chars):
            out.append(Passage(document.source, s.heading, s.text[a:b], s.start + a))
    return out


def _units(text: str, max_chars: int, piece: int) -> list[tuple[int, int, bool]]:
    """(start, end, starts_a_paragraph) spans of sentences in `text`; a sentence over max_chars is cut
    into pieces of words of at most `piece` characters."""
    units = []
    for pa, pb in _spans(text, PARAGRAPH_BREAK, 0, len(text)):
        first = True
        for sa, sb in _spans(text, SENTENCE_END, pa, pb):
            for wa, wb in _split_long(text, sa, sb, piece) if sb - sa > max_chars else [(sa, sb)]:
                units.append((wa, wb, first))
                first = False
    return units


def _spans(text: str, separator: re.Pattern, start: int, end: int) -> list[tuple[int, int]]:
    """The non-blank pieces of text[start:end] between matches of `separator`, stripped, as spans."""
    spans, a = [], start
    for m in separator.finditer(text, start, end):
        spans.append((a, m.start()))
        a = m.end()
    spans.append((a, end))
    out = []
    for a, b in spans:
        piece = text[a:b]
        stripped = piece.strip()
        if stripped:
            a += len(piece) - len(piece.lstrip())
            out.append((a, a + len(stripped)))
    return out


def _split_long(text: str, a: int, b: int, max_chars: int) -> list[tuple[int, int]]:
    """Cut text[a:b] into pieces of at most max_chars at spaces (or anywhere, for a run without any)."""
    out = []
    while b - a > max_chars:
        cut = text.rfind(" ", a + 1, a + max_chars + 1)
        cut = cut if cut > a else a + max_chars
        out.append((a, cut))
        a = cut
        while a < b and text[a].isspace():
            a += 1
    if b > a:
        out.append((a, b))
    return out


def _chunks(text: str, max_chars: int, overlap_chars: int) -> list[tuple[int, int]]:
    """Pack sentence units into spans of at most max_chars, cut at a paragraph end where one falls in the
    second half of the span; each next span starts with the previous one's last sentences that fit in
    overlap_chars."""
    # an over-long sentence is cut into pieces of overlap_chars, so that its chunks can overlap too
    units = _units(text, max_chars, overlap_chars or max_chars)
    if not units:
        return []
    if units[-1][1] - units[0][0] <= max_chars:
        return [(units[0][0], units[-1][1])]
    chunks, i = [], 0
    while i < len(units):
        j = i
        while j + 1 < len(units) and units[j + 1][1] - units[i][0] <= max_chars:
            j += 1
        # prefer ending at a paragraph: the last unit before a paragraph start, if the chunk stays half full
        for p in range(j, i, -1):
            if p + 1 < len(units) and units[p + 1][2] and units[p][1] - units[i][0] >= max_chars // 2:
                j = p
                break
        chunks.append((units[i][0], units[j][1]))
        if j + 1 >= len(units):
            break
        # overlap: back up over the last units that fit in overlap_chars, but keep room for new text
        k = j + 1
        while k - 1 > i and units[j][1] - units[k - 1][0] <= overlap_chars \
                and units[j + 1][1] - units[k - 1][0] <= max_chars:
            k -= 1
        i = k
    return chunks


def iter_files(path) -> list[Path]:
    """A file → [it]; a folder → its files with a supported extension, sorted, hidden ones left out.

    Nothing is opened here. A symbolic link to a folder is not walked into (os.walk's followlinks=False: no
    loops); a name that is a FIFO, or a link to a device or to nothing, is listed all the same, so that
    read_bounded refuses it by name ("b.md: a FIFO") rather than it vanishing from the report."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files)
                  if not f.startswith(".") and Path(f).suffix.lower() in SUPPORTED]
    return found
