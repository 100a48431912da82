"""The gate an adapter tuned from feedback must pass before it is served: measured beside the model served
now, it must win on held-out feedback pairs and not regress fixed tasks beyond stated margins.

    held-out feedback pairs   how often log π(chosen) > log π(rejected), and the mean margin   must win
    bits per byte             on a held-out text (lower is better)                             ≤ +2 % (relative)
    multiple choice           accuracy on a JSONL of questions (e.g. MMLU, benchmarks/eval_data.py)  ≥ −2 points
    generation                'contains' on a JSONL of prompts and references (e.g. shop questions)  ≥ −2 points

The report is a table (gate.md) and a JSON file (gate.json); `approved` is the verdict.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..data.preferences import Pair, encode_reply
from ..engine.sampling import SamplingParams
from . import tasks


@dataclass
class GateSettings:
    bpb_data: str | None = "sharegpt"   # a held-out text (file, folder or named corpus); None: not measured
    bpb_chars: int = 20_000
    mc: str | None = None               # multiple-choice JSONL; None: not measured
    mc_limit: int | None = None
    gen: str | None = None              # generation JSONL, scored by whether the reply contains a reference
    gen_max_tokens: int = 64
    max_bpb_rise: float = 0.02          # relative
    max_drop: float = 0.02              # absolute, of mc accuracy and gen 'contains'


@dataclass
class GateRow:
    task: str
    metric: str
    current: float
    candidate: float
    rule: str                           # what the candidate must do, in words
    passed: bool


@dataclass
class GateReport:
    current: str                        # the model served now (and its adapter)
    candidate: str
    rows: list[GateRow] = field(default_factory=list)

    @property
    def approved(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    def to_json(self) -> str:
        return json.dumps({"current": self.current, "candidate": self.candidate, "approved": self.approved,
                           "rows": [asdict(r) for r in self.rows]}, indent=1) + "\n"

    def to_markdown(self) -> str:
        lines = [f"| task | metric | {self.current} | {self.candidate} | rule | |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.task} | {r.metric} | {r.current:.4f} | {r.candidate:.4f} | {r.rule} | "
                  f"{'pass' if r.passed else '**fail**'} |" for r in self.rows]
        verdict = "approved: the candidate is served" if self.approved else "refused: the model served now stays"
        return "\n".join(lines) + f"\n\n**{verdict}**\n"


def pair_preferences(engine, pairs: list[Pair]) -> dict[str, float]:
    """How often the model puts more probability on the chosen reply than on the rejected one, and the mean
    log-probability margin log π(chosen) − log π(rejected) — over exactly the tokens DPO trains."""
    wins, margins = 0, []
    for pair in pairs:
        logps = []
        for reply in (pair.chosen, pair.rejected):
            ids, mask = encode_reply(engine.tokenizer, pair.messages, reply)
            start = int(mask.argmax())
            scored = engine.continuation_logprobs([int(i) for i in ids[:start]], [int(i) for i in ids[start:]])
            logps.append(sum(t.logprob for t in scored))
        margins.append(logps[0] - logps[1])
        wins += logps[0] > logps[1]
    return {"accuracy": wins / max(len(pairs), 1), "margin": sum(margins) / max(len(margins), 1)}


def measure(model, pairs: list[Pair], settings: GateSettings) -> dict[str, float]:
    """Every gate measurement of one model (a backends.LocalModel), by 'task/metric'."""
    out = {f"feedback/{k}": v for k, v in pair_preferences(model.engine, pairs).items()}
    if settings.bpb_data is not None:
        text, source = tasks.evaluation_text(settings.bpb_data, chars=settings.bpb_chars)
        out["bpb/bits_per_byte"] = tasks.run_bpb(model, text, source)[0].value
    if settings.mc is not None:
        rows = tasks.run_mc(model, tasks.read_questions(settings.mc, settings.mc_limit), source=settings.mc)
        out["mc/accuracy"] = rows[0].value
    if settings.gen is not None:
        params = SamplingParams(max_new_tokens=settings.gen_max_tokens, temperature=0.0)
        rows = tasks.run_gen(model, tasks.read_generation_items(settings.gen), params, source=settings.gen)
        out["gen/contains"] = next(r.value for r in rows if r.metric == "contains")
    return out


def decide(current: dict[str, float], candidate: dict[str, float], settings: GateSettings,
           names: tuple[str, str] = ("served now", "candidate")) -> GateReport:
    """The verdict: wins on the feedback pairs (a larger mean margin, and an accuracy no lower), and no fixed
    task worse than its margin."""
    report = GateReport(*names)
    c, n = current, candidate
    report.rows.append(GateRow("feedback (held out)", "margin", c["feedback/margin"], n["feedback/margin"],
                               "higher", n["feedback/margin"] > c["feedback/margin"]))
    report.rows.append(GateRow("feedback (held out)", "accuracy", c["feedback/accuracy"], n["feedback/accuracy"],
                               "not lower", n["feedback/accuracy"] >= c["feedback/accuracy"]))
    if "bpb/bits_per_byte" in c:
        limit = c["bpb/bits_per_byte"] * (1 + settings.max_bpb_rise)
        report.rows.append(GateRow("bits per byte", "bits_per_byte", c["bpb/bits_per_byte"],
                                   n["bpb/bits_per_byte"], f"≤ {limit:.4f} (+{settings.max_bpb_rise:.0%})",
                                   n["bpb/bits_per_byte"] <= limit))
    for key, task in (("mc/accuracy", "multiple choice"), ("gen/contains", "generation")):
        if key in c:
            limit = c[key] - settings.max_drop
            report.rows.append(GateRow(task, key.split("/")[1], c[key], n[key],
                                       f"≥ {limit:.4f} (−{settings.max_drop:.0%} points)", n[key] >= limit - 1e-9))
    return report
