"""The four uses, measured on real data with the default model (Qwen2.5-Coder-1.5B-Instruct) or any -m.

    python benchmarks/apps.py kb          # customer service: retrieval recall@3, answer accuracy with and
                                          # without retrieval, decline rate on out-of-scope questions
    python benchmarks/apps.py kb-zh       # the same over a Chinese bookshop's handbook (shop_zh.py)
    python benchmarks/apps.py summarize   # ROUGE-L on 100 Debian man pages (apt-get install manpages)
    python benchmarks/apps.py code        # HumanEval pass@1 with and without the test-and-retry loop
    python benchmarks/apps.py speed       # time to first token and decode tokens/s of one request of each use
    python benchmarks/apps.py all --json out/apps.json

kb: the fictional shop of benchmarks/sft_demo.py (42 facts, 4 questions each) written as five pages with
    headings (four Markdown, one HTML), added to a knowledge base. The held-out question of each fact (the
    4th, never trained on by the LoRA demonstration) is searched: recall@k = the passage holding the fact is
    among the top k. Accuracy = the reply contains the fact's key strings (sft_demo's rule), greedy, for
    the model alone (the shop's system prompt, as sft_demo's "before") and grounded (assistant.py: sources
    in the prompt; a decline counts as wrong). Decline rate: 20 questions the pages do not answer (10 off
    topic, 10 about the shop) must get the hand-off. The similarity threshold is also calibrated on other
    questions (the 3 training paraphrases of each fact and 10 other unanswerable ones) and reported.
    Recall is also given for each side of the search alone (cosine ranking; word ranking), and how often the
    passage holding the fact is among the sources the model is given.
kb-zh: the same for a Chinese bookshop (benchmarks/shop_zh.py: 30 facts on five pages, a calibration and a
    held-out question each, 10 + 10 unanswerable questions), no hand-off set (the default one must come in
    Chinese); also the share of replies and hand-offs in Chinese (mostly Han characters), and the word-overlap
    threshold calibrated as assistant.MIN_OVERLAP was.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line, cpu_model, log, one_request  # noqa: E402
from sft_demo import FACTS, SYSTEM  # noqa: E402
import shop_zh  # noqa: E402

from picochat.apps import assistant  # noqa: E402
from picochat.apps.documents import mostly_chinese  # noqa: E402
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


@dataclass
class Shop:
    """A knowledge-base benchmark: pages, facts (answer, key strings, questions), which question of each
    fact is held out (the rest calibrate), and questions the pages do not answer."""
    name: str
    facts: list
    held: int
    out_of_scope: list[str]
    dev_out_of_scope: list[str]
    system: str
    write: Callable[[Path], list[Path]]

    def held_out(self) -> list[tuple[str, list[str], str]]:
        return [(answer, keys, questions[self.held]) for answer, keys, questions in self.facts]

    def calibration(self) -> list[str]:
        return [q for _, _, questions in self.facts for i, q in enumerate(questions) if i != self.held]


ENGLISH_SHOP = Shop("kb", FACTS, 3, OUT_OF_SCOPE, DEV_OUT_OF_SCOPE, SYSTEM, write_shop)
CHINESE_SHOP = Shop("kb-zh", shop_zh.FACTS, 1, shop_zh.OUT_OF_SCOPE, shop_zh.DEV_OUT_OF_SCOPE, shop_zh.SYSTEM,
                    shop_zh.write_shop)


def holds(passage: str, answer: str) -> bool:
    """Whether a passage holds a fact's sentence (white space aside: Chinese pages run sentences together)."""
    return "".join(answer.split()).lower() in "".join(passage.split()).lower()


def calibrate(in_scope: list[float], out_scope: list[float]) -> tuple[float, float]:
    """The threshold that best separates the two similarity lists (balanced accuracy), and that accuracy."""
    best = (0.0, 0.0)
    for t in sorted(set(in_scope + out_scope)):
        accuracy = (sum(s >= t for s in in_scope) / len(in_scope) + sum(s < t for s in out_scope) / len(out_scope)) / 2
        if accuracy > best[1]:
            best = (t, accuracy)
    return best


def recall_by_side(kb, shop: Shop, n_passages: int) -> tuple[dict, list, float]:
    """recall@1/3/5 of the search (fused and reranked), and of its two sides alone: the cosine ranking and
    the word ranking (a passage without a query word is never found by words); the fused ranks; ms/search
    (of the top 3, as the assistant asks, once the passages' sentences are embedded)."""
    ranks = {"search": [], "vector side alone": [], "word side alone": []}
    for answer, _, question in shop.held_out():
        hits = kb.search(question, k=n_passages)   # every passage, with both its ranks
        right = [h for h in hits if holds(h.text, answer)]
        ranks["search"].append(next((i + 1 for i, h in enumerate(hits) if holds(h.text, answer)), None))
        ranks["vector side alone"].append(min(h.vector_rank for h in right) if right else None)
        ranks["word side alone"].append(min((h.bm25_rank for h in right if h.bm25_rank), default=None))
    t0 = time.perf_counter()
    for _, _, question in shop.held_out():
        kb.search(question, k=assistant.TOP_K)
    search_ms = (time.perf_counter() - t0) / len(shop.facts) * 1000
    recall = {side: {k: sum(r is not None and r <= k for r in rs) / len(rs) for k in (1, 3, 5)}
              for side, rs in ranks.items()}
    return recall, ranks["search"], search_ms


def decline_rates(kb, shop: Shop) -> tuple[dict, dict, list]:
    """How often each relevance rule declines the held-out questions and the unanswerable ones: plain cosine
    thresholds against picochat's rule (assistant.ground); the similarity distributions; the groundings."""
    def top(question):    # the best cosine (closest sentence) among the top k passages: what a plain rule uses
        return max((assistant.closeness(h) for h in kb.search(question, k=assistant.TOP_K)), default=0.0)
    held = shop.held_out()
    held_sims, out_sims = [top(q) for _, _, q in held], [top(q) for q in shop.out_of_scope]
    calibrated, _ = calibrate([top(q) for q in shop.calibration()], [top(q) for q in shop.dev_out_of_scope])
    declines = {}
    for label, t in ((f"plain cosine >= {assistant.STRONG_SIMILARITY}", assistant.STRONG_SIMILARITY),
                     ("plain cosine >= 0.30", 0.30), ("plain cosine, calibrated", calibrated)):  # closest sentence
        declines[label] = {"threshold": t, "in_scope": sum(s < t for s in held_sims) / len(held),
                           "out_of_scope": sum(s < t for s in out_sims) / len(out_sims)}
    groundings = [assistant.ground(kb, q) for _, _, q in held]
    outside = [assistant.ground(kb, q) for q in shop.out_of_scope]
    rule = (f"picochat's: overlap >= {assistant.MIN_OVERLAP} (a Chinese question)" if shop is CHINESE_SHOP else
            f"picochat's: cosine >= {assistant.STRONG_SIMILARITY}, or >= {assistant.MIN_SIMILARITY} and a shared word")
    declines[rule] = {"threshold": None, "in_scope": sum(g.declined for g in groundings) / len(held),
                      "out_of_scope": sum(g.declined for g in outside) / len(outside)}
    similarity = {"held_out_min": min(held_sims), "held_out_median": sorted(held_sims)[len(held) // 2],
                  "out_of_scope_max": max(out_sims), "out_of_scope_median": sorted(out_sims)[len(out_sims) // 2]}
    return declines, similarity, groundings + outside


def overlap_calibration(kb, shop: Shop) -> dict:
    """The best word overlap among the top k passages: its calibrated threshold (as MIN_OVERLAP was chosen)."""
    def top(question):
        return max((h.overlap for h in kb.search(question, k=assistant.TOP_K)), default=0.0)
    threshold, accuracy = calibrate([top(q) for q in shop.calibration()], [top(q) for q in shop.dev_out_of_scope])
    return {"threshold": threshold, "balanced_accuracy": accuracy}


def grounded_rows(args, model, shop: Shop, groundings: list) -> tuple[dict, list, dict]:
    """Accuracy of the model alone and grounded (its sentence; with the quoted evidence; the evidence
    alone), examples, and which replies and hand-offs are in Chinese."""
    held = shop.held_out()
    params = SamplingParams(max_new_tokens=60, temperature=0.0)

    def correct(text, keys):
        return text is not None and all(k in text.lower() for k in keys)
    alone = model.generate([[{"role": "system", "content": shop.system}, {"role": "user", "content": q}]
                            for _, _, q in held], params)
    rows = {"model alone (no retrieval)": [correct(r[0], keys) for r, (_, keys, _) in zip(alone, held)]}
    models = [("", model)] + ([(" (LoRA model)", args.lora_model)] if args.lora_model and shop is ENGLISH_SHOP else [])
    for name, tuned in models:
        asked = [i for i, g in enumerate(groundings[:len(held)]) if not g.declined]
        t0 = time.perf_counter()
        replies = tuned.generate([assistant.grounded_messages([{"role": "user", "content": held[i][2]}],
                                                              groundings[i]) for i in asked], params)
        log(f"{shop.name}: grounded{name}: {len(asked)} replies in {time.perf_counter() - t0:.1f} s")
        reply = dict(zip(asked, (r[0] for r in replies)))
        seen = {i: reply[i] + assistant.footer_of(reply[i], groundings[i]) for i in asked}
        rows[f"grounded{name}: the model's sentence"] = [correct(reply.get(i), held[i][1]) for i in range(len(held))]
        rows[f"grounded{name}: reply + quoted evidence"] = [correct(seen.get(i), held[i][1]) for i in range(len(held))]
    rows["grounded: the evidence sentence alone (ask --quote)"] = [
        correct(g.quote, keys) for g, (_, keys, _) in zip(groundings, held)]
    examples = [{"question": held[i][2], "reply": reply.get(i), "quote": groundings[i].quote}
                for i in range(len(held))]
    handoffs = [g.decline_text for g in groundings if g.declined]
    chinese = {"replies": sum(map(mostly_chinese, reply.values())) / max(1, len(reply)), "replies_n": len(reply),
               "hand-offs": sum(map(mostly_chinese, handoffs)) / max(1, len(handoffs)), "hand-offs_n": len(handoffs)}
    return {name: sum(v) / len(v) for name, v in rows.items()}, examples, chinese


def run_kb(args, model: LocalModel, shop: Shop = ENGLISH_SHOP) -> dict:
    from picochat.apps.kb import KnowledgeBase
    from picochat.load import load_encoder
    tmp = Path(tempfile.mkdtemp(prefix="picochat-apps-"))
    t0 = time.perf_counter()
    kb = KnowledgeBase(tmp / "shop.sqlite", encoder=load_encoder())
    report = kb.add(shop.write(tmp))
    ingest_s = time.perf_counter() - t0
    log(f"{shop.name}: {report.added} pages, {report.passages} passages in {ingest_s:.1f} s")
    recall, ranks, search_ms = recall_by_side(kb, shop, report.passages)
    declines, similarity, groundings = decline_rates(kb, shop)
    held = groundings[:len(shop.facts)]
    given = [any(holds(s.text, answer) for s in g.sources) for g, (answer, _, _) in zip(held, shop.held_out())]
    accuracy, examples, chinese = grounded_rows(args, model, shop, groundings)
    record = {"pages": report.added, "passages": report.passages, "ingest_s": ingest_s, "search_ms": search_ms,
              "recall": recall, "ranks": ranks, "similarity": similarity, "accuracy": accuracy,
              "declines": declines, "examples": examples, "right_passage_given": sum(given) / len(given),
              "passages_per_answer": sum(len(g.sources) for g in held) / max(1, sum(not g.declined for g in held))}
    if shop is CHINESE_SHOP:
        record["overlap_calibration"] = overlap_calibration(kb, shop)
        record["chinese"] = chinese
    kb.close()
    return record


def print_kb(r: dict, shop: Shop):
    n = len(shop.facts)
    print(f"\n## {shop.name}: customer service ({r['pages']} pages, {r['passages']} passages, ingested in "
          f"{r['ingest_s']:.1f} s; search {r['search_ms']:.1f} ms/query)")
    for side, recall in r["recall"].items():
        print(f"{'retrieval recall, ' + side:<42} @1 {recall[1]:6.1%}  @3 {recall[3]:6.1%}  @5 {recall[5]:6.1%}"
              f"  ({n} held-out questions)")
    print(f"the right passage among the sources given: {r['right_passage_given']:.1%}; "
          f"{r['passages_per_answer']:.2f} passages per answered question")
    s = r["similarity"]
    print(f"top similarity: held-out min {s['held_out_min']:.3f} median {s['held_out_median']:.3f}; "
          f"out-of-scope median {s['out_of_scope_median']:.3f} max {s['out_of_scope_max']:.3f}")
    print(f"{f'answer accuracy ({n} held-out questions)':<58} {'accuracy':>9}")
    for name, value in r["accuracy"].items():
        print(f"{name:<58} {value:>9.1%}")
    print(f"\n{'relevance rule':<66} {'declined: in scope':>19} {'out of scope':>13}")
    for label, d in r["declines"].items():
        name = label + (f" ({d['threshold']:.3f})" if "calibrated" in label else "")
        print(f"{name:<66} {d['in_scope']:>19.1%} {d['out_of_scope']:>13.1%}")
    if "chinese" in r:
        c, o = r["chinese"], r["overlap_calibration"]
        print(f"word overlap threshold calibrated on the calibration questions: {o['threshold']:.3f} "
              f"(balanced accuracy {o['balanced_accuracy']:.1%})")
        print(f"in Chinese (mostly Han characters): {c['replies']:.1%} of {c['replies_n']} replies, "
              f"{c['hand-offs']:.1%} of {c['hand-offs_n']} hand-offs")


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


# ----------------------------------------------------------------------------- speed of each use
def run_speed(engine: Engine) -> dict:
    """Time to first token and decode tokens/s of one request at a time (as one user waits), for a prompt of
    each use: a chat question, a grounded question with its sources (the shop), a man page to summarize, a
    HumanEval task. Median of 3 runs; the engine's prefix cache is cleared before each."""
    from picochat.apps.kb import KnowledgeBase
    from picochat.apps.summarize import WHOLE_SHORT
    from picochat.eval import humaneval
    from picochat.load import load_encoder
    from picochat.eval.tasks import HUMANEVAL_CHAT_ASK
    tmp = Path(tempfile.mkdtemp(prefix="picochat-speed-"))
    kb = KnowledgeBase(tmp / "shop.sqlite", encoder=load_encoder())
    kb.add(write_shop(tmp))
    grounding = assistant.ground(kb, FACTS[10][2][3])
    kb.close()
    page = man_pairs(1)[0]["text"]
    problem = humaneval.load_problems(1)[0]
    prompts = {"chat": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
               "ask (grounded)": assistant.grounded_messages([{"role": "user", "content": grounding.query}], grounding),
               "summarize": [{"role": "user", "content": WHOLE_SHORT.format(words=12) + "\n\n" + page}],
               "code": [{"role": "user", "content": HUMANEVAL_CHAT_ASK + problem.prompt}]}
    return {use: one_request(engine, engine.chat_prompt(messages)) for use, messages in prompts.items()}


# ----------------------------------------------------------------------------- report
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["kb", "kb-zh", "summarize", "code", "speed", "all"])
    parser.add_argument("-m", "--model", default=None, help="default: qwen2.5-coder-1.5b")
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
    print(cpu_line())
    loaded = load(args.model)
    model = LocalModel(Engine(loaded.model, loaded.tokenizer, draft=loaded.draft), name=args.model or DEFAULT_MODEL)
    print(f"# model: {loaded.path} ({loaded.weights} weights, {str(loaded.dtype).removeprefix('torch.')})")
    record = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "model": str(loaded.path)}
    args.lora_model = None
    if args.lora:
        tuned = load(args.lora, dtype=torch.bfloat16)   # as sft_demo.py measured it
        args.lora_model = LocalModel(Engine(tuned.model, tuned.tokenizer), name="lora")
    for shop in (ENGLISH_SHOP, CHINESE_SHOP):
        if args.what in (shop.name, "all"):
            record[shop.name] = run_kb(args, model, shop)
            print_kb(record[shop.name], shop)
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
    if args.what in ("speed", "all"):
        r = record["speed"] = run_speed(model.engine)
        print("\n## speed, one request at a time (median of 3; 64 new tokens, greedy)")
        print(f"{'use':<16} {'prompt tokens':>13} {'first token':>12} {'prompt tok/s':>13} {'decode tok/s':>13}")
        for use, s in r.items():
            print(f"{use:<16} {s['prompt_tokens']:>13} {s['ttft_s']:>10.2f} s {s['prefill_tok_s']:>13.1f} "
                  f"{s['decode_tok_s']:>13.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
