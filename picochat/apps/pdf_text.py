"""PDF → a title and the text of each page (pypdf), within bounds on pages, text, drawing data and time.

A small PDF can hold a lot of work (1,000 pages drawing one long string from one compressed stream), so a
page's drawing instructions are measured before its text is extracted, compressed data only unpacked up to
the bound, and pypdf's many exception types (MemoryError and RecursionError included) become DocumentError.
"""
from __future__ import annotations

import io
import time
import zlib
from pathlib import Path

from .reading import DocumentError, megabytes, short_heading


# A PDF is read within these bounds. A page's text past PDF_PAGE_CHARS is cut (a page of a document holds
# a few thousand characters; the start of an odd one is index enough). Past the others the PDF is refused
# with a DocumentError naming the bound: a PDF indexed in part would answer about the rest with silence.
PDF_PAGE_CHARS = 100_000
PDF_DOC_CHARS = 8_000_000            # text extracted in all, before the cut (a book of ~3,000 pages)
PDF_MAX_PAGES = 10_000
PDF_PAGE_STREAM_BYTES = 4 * 2**20    # a page's drawing instructions, decoded: pypdf parses ~1 MB a second
PDF_SECONDS = 30.0                   # checked between pages


def pdf_pages(data: bytes, path: Path) -> tuple[str, list[tuple[str, str]]]:
    """(the title in the PDF's metadata, or ""; [("page 3", its text)]), within the bounds above."""
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
        sections = _pdf_pages(reader, path)
    except DocumentError:
        raise
    except MemoryError:
        raise DocumentError(f"{path}: the PDF needs more memory than there is to read") from None
    except (PyPdfError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError,
            NotImplementedError, OSError, ZeroDivisionError, AssertionError) as e:
        # pypdf meets damaged files with many exception types (fuzzing found an AssertionError in its content
        # stream parser too); the message says which file and why
        raise DocumentError(f"{path}: not a readable PDF ({type(e).__name__}: {e})") from None
    return short_heading(" ".join(title.split())), sections


def _pdf_pages(reader, path: Path) -> list[tuple[str, str]]:
    """A section per page, within the PDF_ bounds above."""
    pages = len(reader.pages)
    if pages > PDF_MAX_PAGES:
        raise DocumentError(f"{path}: {pages:,} pages, over the {PDF_MAX_PAGES:,} pages a PDF may have")
    deadline, extracted, sections = time.monotonic() + PDF_SECONDS, 0, []
    for i, page in enumerate(reader.pages, 1):
        if time.monotonic() > deadline:
            raise DocumentError(f"{path}: reading the PDF took over {PDF_SECONDS:g} s (stopped at page {i} of "
                                f"{pages}); split it, or save it as text")
        size = _page_stream_bytes(page, PDF_PAGE_STREAM_BYTES)
        if size > PDF_PAGE_STREAM_BYTES:
            raise DocumentError(f"{path}: page {i} holds more than {megabytes(PDF_PAGE_STREAM_BYTES)} of "
                                f"drawing instructions, over the limit for a page")
        text = page.extract_text() or ""
        extracted += len(text)
        if extracted > PDF_DOC_CHARS:
            raise DocumentError(f"{path}: more than {PDF_DOC_CHARS:,} characters of text by page {i}, over the "
                                f"limit for a PDF; split it")
        lines = text[:PDF_PAGE_CHARS].replace("\r\n", "\n").split("\n")
        sections.append((f"page {i}", "\n".join(line.rstrip(" \t") for line in lines).strip()))
    return sections


def _page_stream_bytes(page, limit: int) -> int:
    """The decoded size of the streams extract_text parses for a page — its contents and the forms it
    draws, each counted once — counted up to a little past `limit`."""
    seen, total = set(), 0
    todo = [page.get("/Contents"), page.get("/Resources")]
    while todo and total <= limit and len(seen) < 10_000:    # 10,000: a page's forms are a handful
        obj = _resolved(todo.pop())
        if obj is None or id(obj) in seen:    # pypdf caches what it resolves: a form drawing itself is seen
            continue
        seen.add(id(obj))
        if isinstance(obj, list):
            todo += obj
        elif hasattr(obj, "get_data"):      # a stream: contents, or a form with resources of its own
            total += _stream_bytes(obj, limit + 1 - total)
            todo.append(obj.get("/Resources"))
        elif hasattr(obj, "get"):           # resources: the forms among their XObjects
            xobjects = _resolved(obj.get("/XObject"))
            for x in xobjects.values() if hasattr(xobjects, "values") else ():
                if getattr(_resolved(x), "get", lambda key: None)("/Subtype") == "/Form":
                    todo.append(x)
    return total


def _resolved(obj):
    """A PDF object with an indirect reference followed; None for none."""
    return obj.get_object() if obj is not None else None


def _stream_bytes(stream, limit: int) -> int:
    """A stream's decoded size; a Flate stream is inflated only up to `limit` bytes, so a small file that
    inflates to gigabytes is measured without being held."""
    raw = getattr(stream, "_data", None)
    filters = stream.get("/Filter")
    if isinstance(filters, list) and len(filters) == 1:   # [/FlateDecode] is /FlateDecode
        filters = filters[0]
    if filters == "/FlateDecode" and isinstance(raw, bytes) and \
            getattr(stream, "decoded_self", None) is None:
        try:
            return len(zlib.decompressobj().decompress(raw, limit))
        except zlib.error:
            pass    # damaged: pypdf's own decoder tries harder
    return len(stream.get_data())
