"""Bytes in, within bounds: what every document reader (documents.py, html_text.py, pdf_text.py) reads.

Files come from users and from folders nobody checked, so `read_bounded` reads regular files only (a FIFO,
/dev/zero or a symbolic link loop is refused by name, and never blocks) and at most MAX_FILE_BYTES of them
(`--max-file-mb` raises it); `read_stream_bounded` does the same for standard input; `decode_text` decodes
by byte order mark (UTF-8/16/32) and refuses binary data; a heading is cut to HEADING_MAX characters.
Every problem is a DocumentError naming the file.
"""
from __future__ import annotations

import codecs
import errno
import functools
import os
import re
import stat
from pathlib import Path

HEADING_SEP = " › "
HEADING_MAX = 200      # characters of a heading kept in heading paths: every passage of a section carries it


class DocumentError(ValueError):
    """A file that cannot be read as a document; the message names the file and the problem."""



# The largest file read (`--max-file-mb` raises it). Memory and time after the read grow with the text, so a
# bound here bounds them all: /dev/zero, a 50 MB one-line page or 30 MB on standard input is refused by name.
MAX_FILE_BYTES = 32 * 2**20
MAX_FILE_FLAG = "--max-file-mb"
_READ_CHUNK = 2**20
# O_NONBLOCK: opening a FIFO waits for a writer otherwise; O_NOCTTY: a terminal does not become ours;
# O_BINARY: Windows would translate line ends (it has none of the others)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | \
    getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_bounded(path, max_bytes: int = MAX_FILE_BYTES, advice: str = f"raise it with {MAX_FILE_FLAG} N") -> bytes:
    """The bytes of a regular file of at most max_bytes, symbolic links resolved (`advice`: what the error
    for a larger one tells the user to do).

    Raises DocumentError, naming the path, for a symbolic link loop, anything but a regular file (a FIFO,
    a device, a socket, a folder) and a file over max_bytes; FileNotFoundError for a missing file. It never
    blocks on a FIFO and never reads more than max_bytes + 1 bytes, even from a file that grows meanwhile."""
    path = Path(path).expanduser()
    real = _real_path(path)
    _check_regular(path, _mode_or_zero(real))   # before opening: opening some devices does something
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path)) from None
    except OSError as e:   # a socket cannot be opened (ENXIO): name it from its mode
        _check_regular(path, _mode_or_zero(real))
        raise DocumentError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        info = os.fstat(fd)   # the descriptor opened, not the name: the file cannot be swapped in between
        _check_regular(path, info.st_mode)
        _check_size(path, info.st_size, max_bytes, advice=advice)
        data = _read_at_most(functools.partial(os.read, fd), max_bytes + 1)
    except OSError as e:
        raise DocumentError(f"{path}: cannot read it ({e.strerror or e})") from None
    finally:
        os.close(fd)
    _check_size(path, len(data), max_bytes, read_stopped=True, advice=advice)   # it grew while read
    return data


def read_stream_bounded(stream, max_bytes: int = MAX_FILE_BYTES, name: str = "standard input") -> bytes:
    """At most max_bytes bytes from a stream (sys.stdin: its binary buffer), or DocumentError naming
    `--max-file-mb` when it holds more; text streams are encoded as UTF-8."""
    stream = getattr(stream, "buffer", stream)
    data = _read_at_most(stream.read, max_bytes + 1)
    _check_size(name, len(data), max_bytes, read_stopped=True)
    return data


def _real_path(path: Path) -> str:
    """The path with every symbolic link resolved; DocumentError for a loop, FileNotFoundError if missing."""
    try:
        return os.path.realpath(path, strict=True)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path)) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DocumentError(f"{path}: a symbolic link loop (the link points back to itself)") from None
        raise DocumentError(f"{path}: cannot read it ({e.strerror or e})") from None


def _mode_or_zero(real: str) -> int:
    try:
        return os.stat(real).st_mode
    except OSError:
        return 0


def _check_regular(path, mode: int):
    for is_kind, kind in _NOT_REGULAR:
        if is_kind(mode):
            raise DocumentError(f"{path}: {kind}, not a regular file; only files are read")


def _check_size(path, size: int, max_bytes: int, read_stopped: bool = False,
                advice: str = f"raise it with {MAX_FILE_FLAG} N"):
    """DocumentError if size is over max_bytes (read_stopped: a read that stopped at max_bytes + 1, the
    whole size unknown)."""
    if size > max_bytes:
        held = f"more than {megabytes(max_bytes)}" if read_stopped else megabytes(size)
        raise DocumentError(f"{path}: {held} is over the {megabytes(max_bytes)} limit for one file; {advice}")


def megabytes(n: int) -> str:
    """32 MB, 1.5 MB, 0.12 MB; a size under a kilobyte in bytes."""
    mb = n / 2**20
    return f"{n} bytes" if n < 1024 else f"{mb:.0f} MB" if mb >= 10 else f"{mb:.2g} MB"


def _read_at_most(read, limit: int) -> bytes:
    """At most `limit` bytes from read(n) (os.read of a descriptor, a stream's read), in chunks; a text
    stream's str is encoded as UTF-8."""
    pieces, size = [], 0
    while size < limit:
        piece = read(min(_READ_CHUNK, limit - size))
        if not piece:
            break
        if isinstance(piece, str):
            piece = piece.encode("utf-8", errors="surrogateescape")
        pieces.append(piece)
        size += len(piece)
    return b"".join(pieces)


# ----------------------------------------------------------------------------- bytes → text
SNIFF_BYTES = 8192          # how much of a file decides its encoding and whether it is binary
CONTROL_SHARE_MAX = 0.05    # text with more control characters than this is binary read as text
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),   # before UTF-16: FF FE 00 00
         (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
# C0 controls but tab, newlines and form feeds; DEL, C1 controls; U+FFFD, what undecodable bytes become
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")


def decode_text(data: bytes, name, utf8_only: bool = False, hint: str = "") -> str:
    """Text from bytes, line ends as "\n": by its byte order mark (UTF-8, UTF-16 or UTF-32), as UTF-16 when
    every other byte is NUL, else as UTF-8, else (unless utf8_only) as Windows-1252, what most other old
    text files are. DocumentError, naming `name` (and adding `hint`), for binary data: NUL bytes, or
    control characters past CONTROL_SHARE_MAX, in its first SNIFF_BYTES."""
    encoding, skip = _sniff_encoding(data)
    if encoding is None and b"\0" in data[:SNIFF_BYTES]:
        raise DocumentError(f"{name}: looks like a binary file, not text (it holds NUL bytes){hint}")
    try:
        text = data[skip:].decode(encoding or "utf-8")
    except UnicodeDecodeError:
        if encoding not in (None, "utf-8"):
            raise DocumentError(f"{name}: not valid {encoding.upper()} text{hint}") from None
        if utf8_only:
            raise DocumentError(f"{name}: not UTF-8 text{hint}") from None
        text = data[skip:].decode("cp1252", errors="replace")
    sample = text[:SNIFF_BYTES]
    if len(_CONTROL.findall(sample)) > CONTROL_SHARE_MAX * len(sample):
        raise DocumentError(f"{name}: looks like a binary file, not text (it holds control characters){hint}")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _sniff_encoding(data: bytes) -> tuple[str | None, int]:
    """(encoding, bytes to skip) from a byte order mark, or for BOM-less UTF-16: text mostly in ASCII has
    a NUL in every other byte (odd bytes for little-endian, even for big-endian); (None, 0) otherwise."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return encoding, len(bom)
    sample = data[:SNIFF_BYTES - SNIFF_BYTES % 2]
    pairs = len(sample) // 2
    if pairs >= 2:
        even, odd = sample[0::2].count(0), sample[1::2].count(0)
        if odd >= 0.3 * pairs and even <= 0.02 * pairs:
            return "utf-16-le", 0
        if even >= 0.3 * pairs and odd <= 0.02 * pairs:
            return "utf-16-be", 0
    return None, 0


def short_heading(heading: str) -> str:
    """A heading of at most HEADING_MAX characters: every passage of its section carries it."""
    return heading if len(heading) <= HEADING_MAX else heading[:HEADING_MAX - 1].rstrip() + "…"
