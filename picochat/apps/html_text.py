"""HTML → a title and sections (a heading path and its paragraphs), in one linear pass over the page.

Headings open sections and block elements end paragraphs; scripts, styles and navigation are not content.
Not html.parser: before Python 3.13.4 it rescans the rest of the page at every unclosed tag (quadratic).
"""
from __future__ import annotations

import html
import re

from .reading import HEADING_MAX, HEADING_SEP, short_heading


class _HTMLSections:
    """Collects sections from the events of _html_events: headings open sections, block elements end
    paragraphs. A heading ends at its end tag, or, left open, at the next block or heading tag after its
    text or once its text passes HEADING_MAX characters: the rest of the page stays body text."""

    SKIP = {"script", "style", "nav", "noscript", "template", "svg", "head"}
    BLOCKS = {"p", "div", "li", "ul", "ol", "tr", "table", "blockquote", "pre", "dd", "dt", "dl",
              "section", "article", "main", "header", "footer", "aside", "figure", "figcaption", "hr",
              "form", "fieldset", "address", "details", "summary", "body"}
    HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}

    def __init__(self):
        self.sections: list[tuple[str, list[str]]] = [("", [])]
        self.stack: list[tuple[int, str]] = []
        self.skip = 0            # depth inside elements whose text is not content
        self.pre = 0
        self.words: list[str] = []   # the paragraph being collected
        self.heading: list[str] | None = None
        self.heading_level = 0
        self.heading_chars = 0       # the heading's characters but white space, so far
        self.title = ""
        self.in_title = False
        self.first_h1 = ""

    def start(self, tag: str, self_closing: bool):
        if tag == "title" and not self_closing:
            self.in_title = True
        if tag == "body":
            self.skip, self.in_title = 0, False      # a <head> or <title> left open ends here
        if (self.skip and tag not in self.SKIP) or (self_closing and tag not in ("br", *self.BLOCKS)):
            return      # inside a skipped element, or <svg/>, <h1/>: nothing to open
        if tag in self.SKIP:
            self.skip += 1
        elif tag == "br":
            self.line_break()
        elif self_closing:      # <p/>: a paragraph's end, and nothing opened
            self.end_paragraph()
        elif tag in self.HEADINGS or tag in self.BLOCKS:
            if self.heading_chars:
                self.end_heading()
            self.end_paragraph()
            if tag in self.HEADINGS:
                self.heading, self.heading_level, self.heading_chars = [], self.HEADINGS[tag], 0
            elif tag == "li":
                self.words.append("- ")
            elif tag == "pre":
                self.pre += 1

    def end(self, tag: str):
        if tag == "title":
            self.in_title = False
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif self.skip:
            return
        elif tag in self.HEADINGS:
            self.end_heading()
        elif tag in self.BLOCKS:
            self.end_paragraph()
            if tag == "pre":
                self.pre = max(0, self.pre - 1)

    def data(self, data: str):
        if self.in_title and len(self.title) < 4 * HEADING_MAX:
            self.title += data[:4 * HEADING_MAX]
        if self.skip:
            return
        if self.heading is not None:
            self.heading.append(data)
            self.heading_chars += len(data) - data.count(" ") - data.count("\n") - data.count("\t")
            if self.heading_chars > HEADING_MAX:
                self.end_heading()
        else:
            self.words.append(data if self.pre else data.replace("\n", " "))   # a newline in HTML is a space

    def end_heading(self):
        """The heading collected so far opens a section (cut to HEADING_MAX, and then kept whole as text)."""
        if self.heading is None:
            return
        heading = " ".join("".join(self.heading).split())
        self.heading, self.heading_chars = None, 0
        while self.stack and self.stack[-1][0] >= self.heading_level:
            self.stack.pop()
        if heading:
            self.stack.append((self.heading_level, short_heading(heading)))
            if self.heading_level == 1 and not self.first_h1:
                self.first_h1 = self.stack[-1][1]
        self.sections.append((HEADING_SEP.join(h for _, h in self.stack), []))
        if len(heading) > HEADING_MAX:
            self.sections[-1][1].append(heading)

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


_HTML_MARKUP = re.compile(r"<[a-zA-Z/!?]")         # what may open a tag, comment or declaration
_HTML_TAG_NAME = re.compile(r"[a-zA-Z][^\t\n\f\r />]*")
_HTML_TAG_PART = re.compile(r"[>=]")
_HTML_RAW_END = {tag: re.compile(rf"</{tag}[\t\n\f\r />]", re.IGNORECASE) for tag in ("script", "style")}
_CHAR_REF_NUMBER = re.compile(r"&#(?:[xX]([0-9a-fA-F]+)|([0-9]+));?")


def _html_events(text: str):
    """The ("start", tag, self_closing), ("end", tag) and ("data", text) events of an HTML page, in one
    pass that reads each character once: a construct left open ends with the page (as in browsers). Not
    html.parser: before Python 3.13.4 it rescans the rest of the page at every unclosed tag (quadratic,
    e.g. "<a " repeated)."""
    i, n = 0, len(text)
    while i < n:
        m = _HTML_MARKUP.search(text, i)
        start = n if m is None else m.start()
        if start > i:
            yield "data", _unescape(text[i:start])
        if m is None:
            return
        name = _HTML_TAG_NAME.match(text, start + (2 if text[start + 1] == "/" else 1))
        if text.startswith("<!--", start):
            close = text.find("-->", start + 4)
            i = n if close < 0 else close + 3
        elif name is None:          # <!DOCTYPE …>, <?xml …?>, </ …>: up to the next >
            close = text.find(">", start + 2)
            i = n if close < 0 else close + 1
        else:
            i = _tag_end(text, name.end())
            if i < 0:
                return              # a tag left open at the end of the page shows nothing
            tag = name.group().lower()
            if text[start + 1] == "/":
                yield "end", tag
                continue
            yield "start", tag, text[i - 2] == "/"
            if tag in _HTML_RAW_END:     # a script's text is not HTML: "<" in it opens nothing
                close = _HTML_RAW_END[tag].search(text, i)
                raw_end = n if close is None else close.start()
                yield "data", text[i:raw_end]
                i = raw_end


def _tag_end(text: str, i: int) -> int:
    """The index after the ">" that ends a tag whose attributes start at i, a ">" inside a quoted value not
    counting; -1 for a tag the page leaves open. Each character is looked at once."""
    n = len(text)
    while True:
        m = _HTML_TAG_PART.search(text, i)
        if m is None:
            return -1
        if m.group() == ">":
            return m.end()
        i = m.end()
        while i < n and text[i] in " \t\n\f":
            i += 1
        if i < n and text[i] in "\"'":      # ="…" or ='…': up to the closing quote
            close = text.find(text[i], i + 1)
            if close < 0:
                return -1
            i = close + 1


def _unescape(text: str) -> str:
    """html.unescape, safe with a numeric reference too long for int() ("&#999…9", "&#000…065;"): its
    digits are rewritten without leading zeros first, and any over 7 digits is past the last code point, so
    U+FFFD, as html.unescape makes of the others past it."""
    if "&" not in text:
        return text
    return html.unescape(_CHAR_REF_NUMBER.sub(_short_reference, text))


def _short_reference(m: re.Match) -> str:
    hexadecimal = m.group(1) is not None
    digits = (m.group(1) if hexadecimal else m.group(2)).lstrip("0") or "0"
    if len(digits) > 7:
        return "\ufffd"
    return f"&#{'x' if hexadecimal else ''}{digits}" + (";" if m.group().endswith(";") else "")


def html_sections(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """(the page's title, or its first <h1>, or ""; [(heading path, paragraphs)]) of an HTML page."""
    p = _HTMLSections()
    for event in _html_events(text):
        if event[0] == "start":
            p.start(event[1], event[2])
        elif event[0] == "end":
            p.end(event[1])
        else:
            p.data(event[1])
    p.end_heading()
    p.end_paragraph()
    return short_heading(" ".join(p.title.split())) or p.first_h1, p.sections
