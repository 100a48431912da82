"""The four uses, measured on real data with the default model (SmolLM2-135M-Instruct, `picochat pull`).

    python benchmarks/apps.py kb          # customer service: retrieval recall@3, answer accuracy with and
                                          # without retrieval, decline rate on out-of-scope questions
    python benchmarks/apps.py summarize   # ROUGE-L on 100 Debian man pages (apt-get install manpages)
    python benchmarks/apps.py code        # HumanEval pass@1 with and without the test-and-retry loop
    python benchmarks/apps.py all --json out/apps.json

kb: the fictional shop of benchmarks/sft_demo.py (42 facts, 4 questions each) written as five pages with
    headings (four Markdown, one HTML), added to a knowledge base. The held-out question of each fact (the
    4th, never trained on by the LoRA demonstration) is searched: recall@k = the passage holding the fact is
    among the top k. Accuracy = the reply contains the fact's key strings (sft_demo's rule), greedy, for
    the model alone (the shop's system prompt, as sft_demo's "before") and grounded (assistant.py: sources
    in the prompt; a decline counts as wrong). Decline rate: 20 questions the pages do not answer (10 off
    topic, 10 about the shop) must get the hand-off. The similarity threshold is also calibrated on other
    questions (the 3 training paraphrases of each fact and 10 other unanswerable ones) and reported.
summarize: man pages of the `manpages` package rendered by man(1); the reference is the NAME line's
    description ("ls - list directory contents" -> "list directory contents"), the input the DESCRIPTION
    section; all pages are summarized together (each map-reduce round of every page in one batch). The
    baseline is the lead sentence of the DESCRIPTION (the usual extractive baseline).
code: HumanEval's 164 problems as chat tasks (evaluation.HUMANEVAL_CHAT_ASK); the tests are the problem's
    check(); greedy first attempt, then up to --retries attempts fed the error. pass@1 without retry is
    the first attempts' pass rate (the same greedy run a plain evaluation makes).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, log  # noqa: E402
from sft_demo import FACTS, SYSTEM  # noqa: E402

from picochat.apps import assistant  # noqa: E402
from picochat.backends import LocalModel  # noqa: E402
from picochat.engine.engine import Engine  # noqa: E402
from picochat.engine.sampling import SamplingParams  # noqa: E402
from picochat.hub import DEFAULT_MODEL  # noqa: E402
from picochat.load import load  # noqa: E402

# ----------------------------------------------------------------------------- the shop's pages
PAGES = [  # file, title, [(section, [fact indices])]
    ("visiting-the-shop.md", "Visiting the shop", [
        ("Opening hours", [0, 1, 2]), ("Finding us", [3, 36]), ("In the shop", [37, 38]),
        ("Contact us", [4, 5, 41])]),
    ("orders-and-delivery.md", "Orders and delivery", [
        ("Shipping costs", [10, 11]), ("Delivery times", [12, 13, 15]), ("Where we deliver", [14]),
        ("Click and collect", [32]), ("Tracking an order", [40]), ("Paying", [33])]),
    ("returns-and-guarantees.md", "Returns, refunds and guarantees", [
        ("Returns", [6, 7]), ("Refunds", [8, 9]), ("Guarantees", [34, 35]), ("Repairs", [30]),
        ("Price match", [39])]),
    ("products.md", "Products and prices", [
        ("Tents", [16, 31]), ("Packs and sleeping bags", [17, 18]), ("Clothing and footwear", [19, 20]),
        ("Cooking", [21, 22]), ("Walking gear", [23, 24])]),
    ("club-and-gift-cards.html", "Larkspur Club, discounts and gift cards", [
        ("Larkspur Club", [27, 28]), ("Student discount", [29]), ("Gift cards", [25, 26])]),
]
OUT_OF_SCOPE = [  # the pages answer none of these
    "What is the capital of Australia?", "Who wrote Pride and Prejudice?", "How do I bake sourdough bread?",
    "What is the weather forecast for tomorrow?", "Can you explain how a car engine works?",
    "What is the square root of 144?", "Who won the football world cup in 2018?",
    "How do I reset my Wi-Fi router?", "What is a good name for a cat?", "How many planets are in the solar system?",
    "Do you sell kayaks?", "Is there a cafe inside the shop?", "Do you run climbing courses?",
    "Can I get my bike serviced with you?", "Do you have a shop in London?", "Are you hiring staff at the moment?",
    "Do you sell fishing rods?", "Can I book a guided mountain walk with you?",
    "Do you have a loyalty app for my phone?", "Do you offer gift wrapping?",
]
DEV_OUT_OF_SCOPE = [  # for calibrating the threshold only
    "How tall is Mount Everest?", "What is the best programming language?", "How do I cook rice?",
    "Who painted the Mona Lisa?", "What time is it in Tokyo?", "Do you sell surfboards?",
    "Do you offer ski lessons?", "Is there a children's play area?", "Do you sell camera equipment?",
    "Can I rent a campervan from you?",
]


def write_shop(folder: Path) -> list[Path]:
    """The five pages: each section a few facts with a sentence of context, as a shop's help pages read."""
    paths = []
    for name, title, sections in PAGES:
        path = folder / name
        if name.endswith(".html"):
            body = "".join(f"<h2>{section}</h2>\n<p>{' '.join(FACTS[i][0] for i in facts)}</p>\n"
                           for section, facts in sections)
            path.write_text(f"<html><head><title>{title}</title><script>var x = 1;</script></head>\n"
                            f"<body><nav>Home | Shop | Help</nav><h1>{title}</h1>\n{body}</body></html>\n")
        else:
            body = "".join(f"## {section}\n\n{' '.join(FACTS[i][0] for i in facts)}\n\n" for section, facts in sections)
            path.write_text(f"# {title}\n\nLarkspur Outfitters, the outdoor gear shop.\n\n{body}")
        paths.append(path)
    return paths


def squash(text: str) -> str:
    return " ".join(text.split()).lower()


def calibrate(in_scope: list[float], out_scope: list[float]) -> tuple[float, float]:
    """The threshold that best separates the two similarity lists (balanced accuracy), and that accuracy."""
    best = (0.0, 0.0)
    for t in sorted(set(in_scope + out_scope)):
        accuracy = (sum(s >= t for s in in_scope) / len(in_scope) + sum(s < t for s in out_scope) / len(out_scope)) / 2
        if accuracy > best[1]:
            best = (t, accuracy)
    return best


def run_kb(args, model: LocalModel) -> dict:
    from picochat.apps.kb import KnowledgeBase
    from picochat.load import load_encoder
    tmp = Path(tempfile.mkdtemp(prefix="picochat-apps-"))
    t0 = time.perf_counter()
    kb = KnowledgeBase(tmp / "shop.sqlite", encoder=load_encoder())
    report = kb.add(write_shop(tmp))
    ingest_s = time.perf_counter() - t0
    log(f"kb: {report.added} pages, {report.passages} passages in {ingest_s:.1f} s")

    held_out = [(answer, keys, questions[3]) for answer, keys, questions in FACTS]
    t0 = time.perf_counter()
    ranks = []
    for answer, _, question in held_out:
        hits = kb.search(question, k=10)
        ranks.append(next((i + 1 for i, h in enumerate(hits) if squash(answer) in squash(h.text)), None))
    search_ms = (time.perf_counter() - t0) / len(held_out) * 1000
    recall = {k: sum(r is not None and r <= k for r in ranks) / len(ranks) for k in (1, 3, 5)}

    def top_similarity(question):  # what decides a decline: the best similarity among the top k passages
        return max((h.similarity for h in kb.search(question, k=assistant.TOP_K)), default=0.0)
    train_sims = [top_similarity(q) for _, _, questions in FACTS for q in questions[:3]]
    dev_out_sims = [top_similarity(q) for q in DEV_OUT_OF_SCOPE]
    held_sims = [top_similarity(q) for _, _, q in held_out]
    out_sims = [top_similarity(q) for q in OUT_OF_SCOPE]

    params = SamplingParams(max_new_tokens=60, temperature=0.0)

    def correct(text, keys):
        return text is not None and all(k in text.lower() for k in keys)
    t0 = time.perf_counter()
    alone = model.generate([[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
                            for _, _, q in held_out], params)
    alone_s = time.perf_counter() - t0
    rows = {"model alone (no retrieval)": [correct(r[0], keys) for r, (_, keys, _) in zip(alone, held_out)]}
    if args.lora_model:   # the fine-tuning demonstration's number, measured again in this run
        tuned_alone = args.lora_model.generate([[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
                                                for _, _, q in held_out], params)
        rows["LoRA model alone (no retrieval)"] = [correct(r[0], keys) for r, (_, keys, _) in zip(tuned_alone, held_out)]
    declines = {}
    plain_calibrated, _ = calibrate(train_sims, dev_out_sims)

    def declined_plain(question, t):  # a plain cosine threshold, for comparison
        return all(h.similarity < t for h in kb.search(question, k=assistant.TOP_K))
    for label, t in ((f"plain cosine >= {assistant.MIN_SIMILARITY + 0.05:.2f}", assistant.MIN_SIMILARITY + 0.05),
                     ("plain cosine, calibrated", plain_calibrated)):
        declines[label] = {"in_scope": sum(declined_plain(q, t) for _, _, q in held_out) / len(held_out),
                           "out_of_scope": sum(declined_plain(q, t) for q in OUT_OF_SCOPE) / len(OUT_OF_SCOPE),
                           "threshold": t}
    for label, threshold in (("shipped", assistant.MIN_SIMILARITY),):
        groundings = [assistant.ground(kb, q, min_similarity=threshold) for _, _, q in held_out]
        declines[f"shipped: cosine >= {assistant.STRONG_SIMILARITY}, or >= {threshold} and a shared word"] = {
            "threshold": threshold, "in_scope": sum(g.declined for g in groundings) / len(groundings),
            "out_of_scope": sum(assistant.ground(kb, q, min_similarity=threshold).declined
                                for q in OUT_OF_SCOPE) / len(OUT_OF_SCOPE)}
        if label != "shipped":
            continue
        for name, tuned in [("", model)] + ([(" (LoRA model)", args.lora_model)] if args.lora_model else []):
            asked = [i for i, g in enumerate(groundings) if not g.declined]
            t0 = time.perf_counter()
            replies = tuned.generate([assistant.grounded_messages([{"role": "user", "content": held_out[i][2]}],
                                                                  groundings[i]) for i in asked], params)
            log(f"grounded{name}: {len(asked)} replies in {time.perf_counter() - t0:.1f} s")
            reply = dict(zip(asked, (r[0] for r in replies)))
            seen = {i: reply[i] + assistant.footer_of(reply[i], groundings[i]) for i in asked}
            rows[f"grounded{name}: the model's sentence"] = [correct(reply.get(i), held_out[i][1])
                                                             for i in range(len(held_out))]
            rows[f"grounded{name}: reply + quoted evidence"] = [correct(seen.get(i), held_out[i][1])
                                                                for i in range(len(held_out))]
        rows["grounded: the evidence sentence alone (ask --quote)"] = [
            correct(g.quote, keys) for g, (_, keys, _) in zip(groundings, held_out)]
        examples = [{"question": held_out[i][2], "reply": reply.get(i), "quote": groundings[i].quote}
                    for i in range(len(held_out))]
    kb.close()
    return {"pages": report.added, "passages": report.passages, "ingest_s": ingest_s, "search_ms": search_ms,
            "recall": recall, "ranks": ranks, "similarity": {
                "held_out_min": min(held_sims), "held_out_median": sorted(held_sims)[len(held_sims) // 2],
                "out_of_scope_max": max(out_sims), "out_of_scope_median": sorted(out_sims)[len(out_sims) // 2]},
            "accuracy": {name: sum(v) / len(v) for name, v in rows.items()}, "declines": declines,
            "alone_s": alone_s, "examples": examples}


# ----------------------------------------------------------------------------- man pages
def render_man(path: Path) -> str:
    env = {**os.environ, "MANWIDTH": "2000", "MAN_KEEP_FORMATTING": "0", "LC_ALL": "C.UTF-8"}
    out = subprocess.run(["man", "--nh", "--nj", "-l", str(path)], capture_output=True, text=True, env=env,
                         timeout=60)
    return re.sub(r".\x08", "", out.stdout)


def man_sections(text: str) -> dict[str, str]:
    """{heading: body} of a rendered page: headings are unindented capitalised lines."""
    sections, heading, lines = {}, None, []
    for line in text.splitlines():
        if line and not line[0].isspace() and line.strip().upper() == line.strip() and heading is not None or (
                heading is None and line.strip() == "NAME"):
            if heading is not None:
                sections[heading] = "\n".join(lines).strip()
            heading, lines = line.strip(), []
        elif heading is not None:
            lines.append(line.strip())
    if heading is not None:
        sections[heading] = "\n".join(lines).strip()
    return sections


def man_pairs(limit: int) -> list[dict]:
    """(page, DESCRIPTION text, NAME description) for the first `limit` pages of the manpages package, in
    name order, that have both and a description of at least 200 characters."""
    files = subprocess.run(["dpkg", "-L", "manpages"], capture_output=True, text=True).stdout.split()
    pages = sorted(Path(f) for f in files if re.search(r"/man/man\d/[^/]+\.\d\w*\.gz$", f))
    pairs = []
    for path in pages:
        with gzip.open(path, "rt", errors="replace") as f:
            if f.read(200).startswith(".so "):  # an alias of another page
                continue
        sections = man_sections(render_man(path))
        name, description = sections.get("NAME", ""), sections.get("DESCRIPTION", "")
        reference = re.split(r"\s[-\u2010-\u2014]\s", " ".join(name.split()), maxsplit=1)
        if len(reference) == 2 and len(description) >= 200:
            pairs.append({"page": path.name, "text": description, "reference": reference[1]})
        if len(pairs) == limit:
            break
    return pairs


def lead_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", " ".join(text.split()), maxsplit=1)[0]


def run_summarize(args, model: LocalModel) -> dict:
    from rouge_score import rouge_scorer

    from picochat.apps.summarize import summarize_many
    t0 = time.perf_counter()
    pairs = man_pairs(args.pages)
    log(f"summarize: {len(pairs)} man pages ({sum(len(p['text']) for p in pairs)} characters of DESCRIPTION) "
        f"read in {time.perf_counter() - t0:.0f} s")
    tokenizer = model.tokenizer
    params = SamplingParams(max_new_tokens=2 * args.words + 16, temperature=0.0)
    t0 = time.perf_counter()
    results = summarize_many(model, [p["text"] for p in pairs], words=args.words, context_tokens=args.ctx,
                             count_tokens=lambda text: len(tokenizer.encode(text)), params=params)
    seconds = time.perf_counter() - t0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def rouge(predictions):
        return sum(scorer.score(p["reference"], s)["rougeL"].fmeasure for p, s in zip(pairs, predictions)) / len(pairs)
    summaries = [r.summary for r in results]
    return {"pages": len(pairs), "words": args.words, "context_tokens": args.ctx,
            "rougeL": rouge(summaries), "rougeL_lead_sentence": rouge([lead_sentence(p["text"]) for p in pairs]),
            "seconds": seconds, "multi_piece_pages": sum(r.pieces > 1 for r in results),
            "max_pieces": max(r.pieces for r in results), "calls": sum(r.calls for r in results),
            "examples": [{"page": p["page"], "reference": p["reference"], "summary": s}
                         for p, s in list(zip(pairs, summaries))[:10]]}


# ----------------------------------------------------------------------------- code
def run_code(args, model: LocalModel) -> dict:
    from picochat.apps.codegen import generate_code_batch
    from picochat.eval import humaneval
    from picochat.eval.tasks import HUMANEVAL_CHAT_ASK
    problems = humaneval.load_problems(args.limit)
    tasks = [(HUMANEVAL_CHAT_ASK + p.prompt, f"{p.test}\n\ncheck({p.entry_point})\n") for p in problems]
    params = SamplingParams(max_new_tokens=384, temperature=0.0)
    t0 = time.perf_counter()
    # the task goes out as the evaluation asks it (instruction=None), and a reply is read as the evaluation
    # reads it (completion_code: a block that defines the function keeps the prompt's imports)
    results = generate_code_batch(model, tasks, retries=args.retries, params=params, instruction=None,
                                  retry_temperature=args.retry_temperature, timeout=10.0,
                                  extract=lambda i, reply: humaneval.completion_code(problems[i], reply))
    seconds = time.perf_counter() - t0
    first = sum(bool(r.attempts[0].passed) for r in results) / len(results)
    final = sum(bool(r.passed) for r in results) / len(results)
    return {"problems": len(problems), "retries": args.retries, "retry_temperature": args.retry_temperature,
            "pass@1_no_retry": first, "pass@1_with_retry": final, "seconds": seconds,
            "attempts": sum(len(r.attempts) for r in results),
            "fixed_by_retry": [p.task_id for p, r in zip(problems, results) if r.passed and not r.attempts[0].passed]}


# ----------------------------------------------------------------------------- report
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["kb", "summarize", "code", "all"])
    parser.add_argument("-m", "--model", default=None, help="default: smollm2")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pages", type=int, default=100)
    parser.add_argument("--words", type=int, default=12, help="summary length asked for (the references are ~6 words)")
    parser.add_argument("--ctx", type=int, default=2048, help="context the summarizer splits for")
    parser.add_argument("--limit", type=int, default=None, help="HumanEval problems (default all 164)")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--retry-temperature", type=float, default=None)
    parser.add_argument("--lora", default=None, metavar="DIR",
                        help="kb: also the LoRA shop model of `benchmarks/sft_demo.py faq` (its run folder), grounded")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# CPU: {cpu_model()} | torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()} "
          f"| {torch.get_num_threads()} threads")
    loaded = load(args.model)
    model = LocalModel(Engine(loaded.model, loaded.tokenizer), name=args.model or DEFAULT_MODEL)
    print(f"# model: {loaded.path} ({loaded.weights} weights, {str(loaded.dtype).removeprefix('torch.')})")
    record = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "model": str(loaded.path)}
    args.lora_model = None
    if args.lora:
        tuned = load(args.lora, dtype=torch.bfloat16)   # as sft_demo.py measured it
        args.lora_model = LocalModel(Engine(tuned.model, tuned.tokenizer), name="lora")
    if args.what in ("kb", "all"):
        r = record["kb"] = run_kb(args, model)
        print(f"\n## customer service ({r['pages']} pages, {r['passages']} passages, ingested in {r['ingest_s']:.1f} s; "
              f"search {r['search_ms']:.1f} ms/query)")
        print(f"retrieval recall@1 {r['recall'][1]:.1%}  recall@3 {r['recall'][3]:.1%}  recall@5 {r['recall'][5]:.1%}"
              f"  ({len(r['ranks'])} held-out questions)")
        s = r["similarity"]
        print(f"top similarity: held-out min {s['held_out_min']:.3f} median {s['held_out_median']:.3f}; "
              f"out-of-scope median {s['out_of_scope_median']:.3f} max {s['out_of_scope_max']:.3f}")
        print(f"{'answer accuracy (42 held-out questions)':<58} {'accuracy':>9}")
        for name, value in r["accuracy"].items():
            print(f"{name:<58} {value:>9.1%}")
        print(f"\n{'relevance rule':<62} {'declined: in scope':>19} {'out of scope':>13}")
        for label, d in r["declines"].items():
            name = label + (f" ({d['threshold']:.3f})" if "calibrated" in label else "")
            print(f"{name:<62} {d['in_scope']:>19.1%} {d['out_of_scope']:>13.1%}")
    if args.what in ("summarize", "all"):
        r = record["summarize"] = run_summarize(args, model)
        print(f"\n## summarization ({r['pages']} man pages, {r['multi_piece_pages']} longer than one "
              f"{r['context_tokens']}-token piece, up to {r['max_pieces']} pieces; {r['calls']} model calls, "
              f"{r['seconds']:.0f} s)")
        print(f"ROUGE-L F1 vs the NAME line: picochat summarize {r['rougeL']:.4f}; lead sentence {r['rougeL_lead_sentence']:.4f}")
    if args.what in ("code", "all"):
        r = record["code"] = run_code(args, model)
        print(f"\n## code generation (HumanEval, {r['problems']} problems, {r['attempts']} attempts, {r['seconds']:.0f} s)")
        print(f"pass@1 without retry {r['pass@1_no_retry']:.1%}; with test-and-retry (up to {r['retries']} retries) "
              f"{r['pass@1_with_retry']:.1%}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
