"""Files → documents ready to embed, for KnowledgeBase.add: which files, each read within bounds (reading.py)
and cut into passages (documents.py), every problem a reason in the AddReport rather than an exception."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .documents import Passage, iter_files, read_document, split_passages
from .reading import DocumentError, read_bounded


@dataclass
class AddReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    passages: int = 0                                          # passages written
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)


@dataclass
class Prepared:
    """A file read and cut into passages, waiting for its passages' vectors (KnowledgeBase.add)."""
    source: str                 # its absolute path
    sha: str
    title: str
    passages: list[Passage]


def files_under(paths, report: AddReport) -> list[Path]:
    """The files to index under `paths`, each once (a file given twice, or also through its folder,
    would otherwise be written twice in one batch); paths that do not exist go to report.skipped."""
    files, seen = [], set()
    for p in paths:
        if not Path(p).expanduser().exists():
            broken_link = os.path.islink(Path(p).expanduser())   # a loop, or a link to nothing
            report.skipped.append((str(p), "a symbolic link that leads nowhere (a loop, or its target is "
                                           "gone)" if broken_link else "no such file or folder"))
            continue
        for path in iter_files(p):
            real = os.path.realpath(path)   # Path.resolve() raises on a link loop inside the folder
            if real not in seen:
                seen.add(real)
                files.append(path)
    return files



def read_file(path: Path, report: AddReport, max_bytes: int) -> tuple[str, bytes, str] | None:
    """(its real path, its bytes, their SHA-256), or None with the reason in report.skipped."""
    try:
        data = read_bounded(path, max_bytes)
    except DocumentError as e:      # a FIFO, a device, a file over the size limit, a symlink loop
        report.skipped.append((os.path.abspath(path), str(e)))   # the link's name, not /dev/zero
        return None
    except OSError as e:
        report.skipped.append((os.path.abspath(path), f"unreadable: {e.strerror or e}"))
        return None
    return os.path.realpath(path), data, hashlib.sha256(data).hexdigest()


def cut_into_passages(path: Path, source: str, data: bytes, sha: str, report: AddReport) -> Prepared | None:
    """The file's document cut into passages, or None with the reason in report.skipped."""
    try:
        doc = read_document(path, data)
    except DocumentError as e:
        report.skipped.append((source, str(e)))
        return None
    except Exception as e:   # a reader's bug met by one odd file must not stop the other files
        report.skipped.append((source, f"could not be read ({type(e).__name__}: {e})"))
        return None
    passages = split_passages(doc)
    if not passages:
        scanned = " (a scanned PDF?)" if path.suffix.lower() == ".pdf" else ""
        report.skipped.append((source, "no text found" + scanned))
        return None
    return Prepared(source, sha, doc.title, passages)
