"""Evaluation: what `picochat eval` and the training loop measure, in one place.

    bits per byte   Σ −log₂ p(token | the tokens before it) / the UTF-8 bytes those tokens spell. Unlike the
                    loss per token it does not depend on the tokenizer, so differently tokenized (or
                    quantized) models compare. The training loop's validation uses `validation_loss`.
    mc              multiple choice by log-likelihood: the choice the model finds most likely, raw and
                    normalised by the choice's length in bytes (ARC, HellaSwag and MMLU exports have
                    this question / choices / answer shape); optionally k examples before each question.
    gen             generation against references: exact match, contains, ROUGE-L (the rouge-score package).
    humaneval       code generation run against tests in a sandbox (humaneval.py): pass@k.

Each task takes an evaluation model (backends.py): picochat's engine, or any OpenAI-compatible server.
Results are `EvalResult` rows: model, task, metric, value, n, seconds, settings, picochat version.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import __version__
from ..data.prepare import split_hash
from ..data.sources import NAMED_SOURCES, iter_documents
from ..data.tokens import DataError, read_meta
from ..engine.sampling import SamplingParams
from ..tokenizer.bpe import Tokenizer
from . import humaneval


@dataclass
class EvalResult:
    """One measured number, with what it was measured on."""
    model: str
    task: str
    metric: str
    value: float
    n: int                   # items (questions, problems, texts) it averages over
    seconds: float
    settings: dict = field(default_factory=dict)
    version: str = ""

    def as_dict(self) -> dict:
        return {**asdict(self), "version": self.version or __version__}


# ----------------------------------------------------------------------------- bits per byte
def validation_loss(model, batches, token_bytes: torch.Tensor, autocast,
                    reduce: Callable[[torch.Tensor], None] | None = None) -> tuple[float, float]:
    """(mean loss in nats per token, bits per byte) over `batches` of (inputs, targets); targets -100 are
    not scored. `reduce` sums the totals across processes (the training loop's all-reduce)."""
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast:
                _, loss = model(x, y)   # the model's own loss: the mean −log p over the scored tokens
            valid = y != -100
            n = valid.sum()
            totals[0] += loss.double() * n if n else 0.0
            totals[1] += n
            totals[2] += token_bytes[y[valid]].sum()
    if reduce is not None:
        reduce(totals)
    nll, n, nbytes = totals.tolist()
    return nll / max(n, 1), nll / (math.log(2) * max(nbytes, 1))


@dataclass
class BitsPerByte:
    bits_per_byte: float
    nll_per_token: float        # nats
    tokens: int                 # scored tokens
    bytes: int
    seconds: float


@torch.inference_mode()
def bits_per_byte(model, tokenizer, text: str, window: int = 512, max_tokens: int | None = None) -> BitsPerByte:
    """Score `text` in consecutive windows of `window` tokens (each token predicted from the ones before it in
    its window). max_tokens caps how much of the text is read."""
    t0 = time.perf_counter()
    ids = tokenizer.encode(text)
    if max_tokens:
        ids = ids[:max_tokens]
    window = min(window, model.config.max_seq_len)
    if len(ids) < 2:
        raise ValueError("the evaluation text is too short: it needs at least two tokens")
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths())
    nll, n, nbytes = 0.0, 0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start:start + window + 1]])
        if chunk.shape[1] < 2:
            break
        x, y = chunk[:, :-1], chunk[:, 1:]
        _, loss = model(x, y)  # the model's own loss: the mean −log p over the window's tokens
        nll += loss.item() * y.numel()
        n += y.numel()
        nbytes += int(token_bytes[y[0].clamp(max=len(token_bytes) - 1)].sum())
    return BitsPerByte(nll / (math.log(2) * max(nbytes, 1)), nll / max(n, 1), n, nbytes, time.perf_counter() - t0)


def held_out_text(source: str = "sharegpt", chars: int = 40_000, val_fraction: float = 0.005) -> str:
    """About `chars` characters of held-out text. A file or folder is taken as it is (it is yours, held out by
    you); of a named corpus (sharegpt, python-stdlib, chatterbot) only the documents its hash puts in the
    validation split of `picochat data prepare` (at its default val_fraction), so that a model trained on
    the prepared training split has not seen them."""
    picked: list[str] = []
    total = 0
    cut = int(val_fraction * 2**64) if source in NAMED_SOURCES else 2**64
    docs: Iterable[str] = iter_documents(source)
    for doc in docs:
        if split_hash(doc) < cut:
            picked.append(doc)
            total += len(doc)
            if total >= chars:
                break
    if not picked:
        raise ValueError(f"{source}: no held-out documents found")
    return "\n\n".join(picked)[:chars]


def prepared_text(data_dir, split: str = "val", chars: int = 40_000) -> str:
    """About `chars` characters of a prepared dataset's split (`picochat data prepare`), decoded from its
    token shards with its own tokenizer: text any model can be scored on, whatever its tokenizer."""
    import numpy as np

    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise DataError(f"{data_dir} has no '{split}' split")
    tokenizer = Tokenizer.from_file(Path(data_dir) / "tokenizer")
    text, dtype = "", np.dtype(meta["dtype"])
    for name in meta["splits"][split]["shards"]:
        ids = np.memmap(Path(data_dir) / name, dtype=dtype, mode="r")
        text += tokenizer.decode(ids[:chars].tolist(), skip_special_tokens=True)  # a token spells ≥ 1 char
        if len(text) >= chars:
            break
    return text[:chars]


def evaluation_text(data: str | None, chars: int = 40_000) -> tuple[str, str]:
    """(text, where it came from) for `--task bpb --data DATA`: a prepared dataset folder (its validation
    split), a text file or folder, or a named corpus's held-out documents (default: sharegpt)."""
    data = data or "sharegpt"
    if Path(data).is_dir() and (Path(data) / "meta.json").is_file():
        return prepared_text(data, chars=chars), f"{data} (validation split)"
    return held_out_text(data, chars=chars), data


# ----------------------------------------------------------------------------- the tasks
def run_bpb(model, text: str, source: str = "") -> list[EvalResult]:
    """Bits per UTF-8 byte and perplexity (per token of this model's tokenizer) of `text`."""
    t0 = time.perf_counter()
    engine = getattr(model, "engine", None)
    if engine is not None:  # picochat's own model: the windows in one batched pass each
        measured = bits_per_byte(engine.model, engine.tokenizer, text, window=engine.context_length)
        bpb, nll, n = measured.bits_per_byte, measured.nll_per_token, measured.tokens
    else:                   # a server: the log-probabilities of the text's tokens
        logp, nbytes, n = model.score_text(text)
        bpb, nll = -logp / (math.log(2) * max(nbytes, 1)), -logp / max(n, 1)
    seconds = time.perf_counter() - t0
    settings = {"data": source, "characters": len(text)}
    return [EvalResult(model.name, "bpb", "bits_per_byte", bpb, 1, seconds, settings),
            EvalResult(model.name, "bpb", "perplexity", math.exp(nll), n, seconds, settings)]


@dataclass
class Question:
    """A multiple-choice item: the index of the right one of `choices`."""
    question: str
    choices: list[str]
    answer: int


def read_jsonl(path, limit: int | None = None) -> list[dict]:
    """The objects of a JSONL file (blank lines skipped); DataError naming the line that is not one."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may be in the text
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object")
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{path} holds no items")
    return rows


def read_questions(path, limit: int | None = None) -> list[Question]:
    """Multiple-choice items from JSONL: {"question", "choices": [...], "answer": index or "A"/"B"/...}."""
    questions = []
    for i, row in enumerate(read_jsonl(path, limit), 1):
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(row.get("question"), str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{path}, item {i}: needs a 'question' string and a 'choices' list of strings")
        if isinstance(answer, str) and len(answer) == 1 and answer.isalpha():
            answer = ord(answer.upper()) - ord("A")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise DataError(f"{path}, item {i}: 'answer' must index one of its {len(choices)} choices")
        questions.append(Question(row["question"], choices, answer))
    return questions


def mc_prompt(question: Question, shots: list[Question]) -> str:
    """"Question: …\\nAnswer:" after k solved examples; each choice is scored as " <choice>" after it."""
    solved = "".join(f"Question: {q.question}\nAnswer: {q.choices[q.answer]}\n\n" for q in shots)
    return f"{solved}Question: {question.question}\nAnswer:"


def run_mc(model, questions: list[Question], fewshot: int = 0, seed: int = 0, source: str = "") -> list[EvalResult]:
    """Accuracy by log-likelihood: raw (the most likely choice) and normalised by the choice's UTF-8 bytes
    (long choices are not penalised for being long), against chance."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    requests, owners = [], []
    for i, q in enumerate(questions):
        others = [o for j, o in enumerate(questions) if j != i]
        prompt = mc_prompt(q, rng.sample(others, min(fewshot, len(others))))
        for c in q.choices:
            requests.append((prompt, " " + c))
            owners.append(i)
    scores = model.loglikelihood(requests)
    raw = norm = 0
    k = 0
    for q in questions:
        logps = [scores[k + j][0] for j in range(len(q.choices))]
        normed = [lp / max(len(c.encode("utf-8")), 1) for lp, c in zip(logps, q.choices)]
        raw += max(range(len(logps)), key=logps.__getitem__) == q.answer
        norm += max(range(len(normed)), key=normed.__getitem__) == q.answer
        k += len(q.choices)
    n, seconds = len(questions), time.perf_counter() - t0
    settings = {"data": source, "fewshot": fewshot, "seed": seed}
    chance = sum(1 / len(q.choices) for q in questions) / n
    return [EvalResult(model.name, "mc", "accuracy", raw / n, n, seconds, settings),
            EvalResult(model.name, "mc", "accuracy_norm", norm / n, n, seconds, settings),
            EvalResult(model.name, "mc", "chance", chance, n, seconds, settings)]


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: what exact match compares."""
    return " ".join(text.lower().strip().strip(".!?\"'").split())


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F-measure of the prediction against its best reference (the rouge-score package)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def read_generation_items(path, limit: int | None = None) -> list[tuple[str | list[dict], list[str]]]:
    """(prompt, references) from JSONL: {"prompt": text} or {"messages": [...]} (a chat), and
    {"reference": text} or {"references": [...]} (or "answer")."""
    items = []
    for i, row in enumerate(read_jsonl(path, limit), 1):
        prompt = row.get("messages", row.get("prompt"))
        refs = row.get("references", row.get("reference", row.get("answer")))
        refs = [refs] if isinstance(refs, str) else refs
        if not (isinstance(prompt, str) or isinstance(prompt, list)) or not isinstance(refs, list) or not refs \
                or not all(isinstance(r, str) for r in refs):
            raise DataError(f"{path}, item {i}: needs 'prompt' (or 'messages') and 'reference' (or 'references')")
        items.append((prompt, refs))
    return items


def run_gen(model, items: list[tuple[str | list[dict], list[str]]], params: SamplingParams,
            source: str = "") -> list[EvalResult]:
    """Generate for each prompt; score exact match, contains and ROUGE-L against its references."""
    t0 = time.perf_counter()
    outputs = [o[0] for o in model.generate([p for p, _ in items], params)]
    exact = contains = rouge = 0.0
    for out, refs in zip(outputs, (r for _, r in items)):
        exact += any(normalize_answer(out) == normalize_answer(r) for r in refs)
        contains += any(normalize_answer(r) in normalize_answer(out) for r in refs)
        rouge += rouge_l(out, refs)
    n, seconds = len(items), time.perf_counter() - t0
    settings = {"data": source, "max_tokens": params.max_new_tokens, "temperature": params.temperature}
    return [EvalResult(model.name, "gen", m, v / n, n, seconds, settings)
            for m, v in (("exact_match", exact), ("contains", contains), ("rougeL", rouge))]


HUMANEVAL_CHAT_ASK = "Complete this Python function. Reply with the whole function in a ```python block.\n\n"


def run_humaneval(model, limit: int | None = None, samples: int = 1, ks: Iterable[int] = (1,),
                  temperature: float = 0.0, max_tokens: int = 384, chat: bool = False,
                  seed: int = 0) -> list[EvalResult]:
    """HumanEval's problems completed by the model and run against their tests in the sandbox: pass@k
    (greedy pass@1 with samples=1 and temperature 0). Raw prompts are continued as code and cut at the
    usual stop sequences; with chat=True each prompt is asked as a chat message and the reply's code block
    is taken."""
    t0 = time.perf_counter()
    problems = humaneval.load_problems(limit)

    def generate(prompts, n, temp):
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temp, top_p=0.95 if temp else 1.0,
                                stop=[] if chat else list(humaneval.STOP_SEQUENCES), seed=seed)
        asked = [[{"role": "user", "content": HUMANEVAL_CHAT_ASK + p}] for p in prompts] if chat else prompts
        return model.generate(asked, params, n=n)
    report = humaneval.evaluate(generate, problems, samples=samples, k=tuple(ks), temperature=temperature)
    seconds = time.perf_counter() - t0
    settings = {"samples": samples, "temperature": temperature, "max_tokens": max_tokens, "chat": chat,
                "generate_seconds": round(report["generate_seconds"], 1),
                "check_seconds": round(report["check_seconds"], 1)}
    return [EvalResult(model.name, "humaneval", f"pass@{k}", report[f"pass@{k}"], len(problems), seconds, settings)
            for k in ks]
