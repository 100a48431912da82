"""Files → sections → passages: what the knowledge base (kb.py) indexes.

A Document is a title and a list of Sections, each a heading path ("Delivery › Returns") and its text:
Markdown splits at `#` headings, HTML at <h1>–<h6>, a PDF by page, plain text has one section.
`split_passages` cuts sections into passages of at most `max_chars` characters, at paragraph and then
sentence boundaries, never across a section (a passage is about one thing, and carries its heading), with
the end of one piece repeated at the start of the next so a fact cut in two is still whole in one of them.

Every Section and Passage records where its text starts in `Document.text` (the sections joined by blank
lines), and its text is exactly that slice: a passage can always be traced back to its place.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

SUPPORTED = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")
HEADING_SEP = " › "
SECTION_SEP = "\n\n"   # between sections in Document.text


class DocumentError(ValueError):
    """A file that cannot be read as a document; the message names the file and the problem."""


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
def read_document(path, data: bytes | None = None) -> Document:
    """Read a .txt, .md/.markdown, .html/.htm or .pdf file (or any UTF-8 text file) into a Document.

    data: the file's bytes, when the caller has already read them (kb.py hashes them). Raises
    DocumentError for a file it cannot read (binary, encrypted or broken PDF), FileNotFoundError if absent."""
    path = Path(path).expanduser()
    source = str(path.resolve())
    if data is None:
        data = path.read_bytes()
    ext = path.suffix.lower()
    if ext == ".pdf":
        return _read_pdf(data, source, path)
    if ext in (".html", ".htm"):
        return _read_html(_decode(data), source, path)
    if ext not in SUPPORTED:
        if b"\0" in data[:8192]:
            raise DocumentError(f"{path}: a binary file; accepted formats are {', '.join(SUPPORTED)} "
                                f"and other UTF-8 text files")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DocumentError(f"{path}: not UTF-8 text; accepted formats are {', '.join(SUPPORTED)} "
                                f"and other UTF-8 text files") from None
        return _read_text(text, source, path)
    if ext in (".md", ".markdown"):
        return _read_markdown(_decode(data), source, path)
    return _read_text(_decode(data), source, path)


def _decode(data: bytes) -> str:
    """UTF-8 (with or without a BOM); otherwise Windows-1252, what most other old text files are."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_text(text: str, source: str, path: Path) -> Document:
    return Document(source, path.stem, [Section("", text.replace("\r\n", "\n").strip())])


FENCE = re.compile(r"^\s{0,3}(```|~~~)")
SETEXT_UNDERLINE = re.compile(r"^\s{0,3}(=+|-+)[ \t]*$")
ATX_HEADING = re.compile(r"^\s{0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$|^\s{0,3}(#{1,6})[ \t]*$")


def _read_markdown(text: str, source: str, path: Path) -> Document:
    """Sections at headings — `#` lines, or a line underlined with `===` / `---` — never inside ``` or ~~~
    code fences; the title is the first level-1 heading."""
    sections, lines, stack, fence, title = [], [], [], None, None

    def close():
        sections.append(Section(HEADING_SEP.join(h for _, h in stack), "\n".join(lines).strip()))
        lines.clear()

    for line in text.split("\n"):
        m = FENCE.match(line)
        if m:
            fence = m.group(1) if fence is None else (None if m.group(1) == fence else fence)
        h = ATX_HEADING.match(line) if fence is None and not m else None
        u = SETEXT_UNDERLINE.match(line) if fence is None and h is None and lines and lines[-1].strip() else None
        if h is None and u is None:
            lines.append(line)
            continue
        if h is not None:
            level, heading = len(h.group(1) or h.group(3)), (h.group(2) or "").strip()
        else:   # the line above is the heading: level 1 under "===", 2 under "---"
            level, heading = (1 if u.group(1)[0] == "=" else 2), lines.pop().strip()
        close()
        while stack and stack[-1][0] >= level:
            stack.pop()
        if heading:
            stack.append((level, heading))
            if level == 1 and title is None:
                title = heading
    close()
    return Document(source, title or path.stem, sections)


class _HTMLSections(HTMLParser):
    """Collects sections from HTML: headings open sections, block elements end paragraphs."""

    SKIP = {"script", "style", "nav", "noscript", "template", "svg", "head"}
    BLOCKS = {"p", "div", "li", "ul", "ol", "tr", "table", "blockquote", "pre", "dd", "dt", "dl",
              "section", "article", "main", "header", "footer", "aside", "figure", "figcaption", "hr",
              "form", "fieldset", "address", "details", "summary", "body"}
    HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[tuple[str, list[str]]] = [("", [])]
        self.stack: list[tuple[int, str]] = []
        self.skip = 0            # depth inside elements whose text is not content
        self.pre = 0
        self.words: list[str] = []   # the paragraph being collected
        self.heading: list[str] | None = None
        self.heading_level = 0
        self.title = ""
        self.in_title = False
        self.first_h1 = ""

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag == "body":
            self.skip = 0        # a <head> left open ends here
        if tag in self.SKIP:
            self.skip += 1
        elif self.skip:
            return
        elif tag == "br":
            self.line_break()
        elif tag in self.HEADINGS:
            self.end_paragraph()
            self.heading, self.heading_level = [], self.HEADINGS[tag]
        elif tag in self.BLOCKS:
            self.end_paragraph()
            if tag == "li":
                self.words.append("- ")
            if tag == "pre":
                self.pre += 1

    def handle_startendtag(self, tag, attrs):
        if tag == "br" and not self.skip:
            self.line_break()
        elif tag in self.BLOCKS and not self.skip:
            self.end_paragraph()

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif self.skip:
            return
        elif tag in self.HEADINGS and self.heading is not None:
            heading = " ".join("".join(self.heading).split())
            self.heading = None
            while self.stack and self.stack[-1][0] >= self.heading_level:
                self.stack.pop()
            if heading:
                self.stack.append((self.heading_level, heading))
                if self.heading_level == 1 and not self.first_h1:
                    self.first_h1 = heading
            self.sections.append((HEADING_SEP.join(h for _, h in self.stack), []))
        elif tag in self.BLOCKS:
            self.end_paragraph()
            if tag == "pre":
                self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        if self.skip:
            return
        if self.heading is not None:
            self.heading.append(data)
        else:
            self.words.append(data if self.pre else data.replace("\n", " "))   # a newline in HTML is a space

    def line_break(self):
        """<br>: a line break inside the paragraph ("Saturday:<br>10 am to 4 pm" is one sentence, not two
        paragraphs)."""
        if self.heading is not None:
            self.heading.append(" ")
        else:
            self.words.append("\n")

    def end_paragraph(self):
        raw = "".join(self.words)
        self.words = []
        if self.pre:
            text = raw.strip("\n")
        else:   # the line breaks left are <br>s: each line's white space collapsed
            text = "\n".join(" ".join(line.split()) for line in raw.split("\n") if line.strip())
        if text.strip() and text.strip() != "-":
            self.sections[-1][1].append(text)


def _read_html(text: str, source: str, path: Path) -> Document:
    """Sections at <h1>–<h6>; paragraphs and list items become blocks; scripts, styles and navigation go."""
    p = _HTMLSections()
    p.feed(text)
    p.close()
    p.end_paragraph()
    title = " ".join(p.title.split()) or p.first_h1 or path.stem
    return Document(source, title, [Section(h, "\n\n".join(paras)) for h, paras in p.sections])


def _read_pdf(data: bytes, source: str, path: Path) -> Document:
    """One section per page with text ("page 3"); the title from the PDF's metadata, else the file name."""
    import pypdf
    from pypdf.errors import PyPdfError
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):  # many PDFs are "encrypted" with an empty password
            raise DocumentError(f"{path}: the PDF is encrypted with a password; decrypt it first")
        title = ""
        try:
            title = str((reader.metadata or {}).get("/Title") or "").strip()
        except (PyPdfError, ValueError, TypeError, KeyError):
            pass  # unreadable metadata is no reason to refuse the text
        sections = []
        for i, page in enumerate(reader.pages, 1):
            text = page.extract_text() or ""
            text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n")).strip()
            sections.append(Section(f"page {i}", text))
    except DocumentError:
        raise
    except (PyPdfError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError,
            NotImplementedError, OSError, ZeroDivisionError) as e:
        # pypdf meets damaged files with many exception types; the message says which file and why
        raise DocumentError(f"{path}: not a readable PDF ({type(e).__name__}: {e})") from None
    return Document(source, title or path.stem, sections)


# ----------------------------------------------------------------------------- passages
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# a full stop after one of these is not a sentence's end ("Sat. 10 am", "Dr. Lee", "5 p.m. on Sundays"); after
# any other word it is, unless a digit follows ("No. 5")
ABBREVIATIONS = ("Mr Mrs Ms Dr Prof St Mt Mon Tue Tues Wed Thu Thur Thurs Fri Sat Sun Jan Feb Mar Apr Jun Jul Aug "
                 "Sep Sept Oct Nov Dec Tel Fig approx incl excl e.g i.e vs a.m p.m").split()
_NOT_ABBREVIATION = "".join(rf"(?<!\b{re.escape(a)}\.)" for a in ABBREVIATIONS)
_CLOSE = "\"'”’)\\]」』）"     # a closing quote or bracket after the stop stays with its sentence
SENTENCE_END = re.compile(
    rf"(?:(?<=[!?…])|(?<=\.){_NOT_ABBREVIATION}|(?<=[.!?…][{_CLOSE}]))\s+(?!\d)"      # . ! ? … then a space
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
    """A file → [it]; a folder → its files with a supported extension, sorted, hidden ones left out."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files)
                  if not f.startswith(".") and Path(f).suffix.lower() in SUPPORTED]
    return found
