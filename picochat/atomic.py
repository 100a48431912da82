"""Atomic, durable file writes: write a temporary file beside the target, flush it to disk, rename it
into place, then flush the directory that holds the new name.

A crash, Ctrl-C or SIGKILL mid-write leaves the old file (or none), never a truncated one; the fsyncs
make that hold after a power loss too (without them, a rename can reach the disk before the data it
names). A killed process may leave a hidden `.NAME.*.tmp` beside the target; callers that own the
folder remove such leftovers at their next start.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def fsync_file(path):
    """Flush a file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path):
    """Flush a folder's entries (new names, renames, deletions) to disk."""
    if os.name != "posix":  # Windows cannot open a folder; NTFS journals its renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder):
    """Flush every file under `folder`, and the folders themselves, to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) to produce the file, then os.replace it onto `path`, durably."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
