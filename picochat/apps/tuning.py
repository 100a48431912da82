"""From the users' feedback to a better model that an evaluation approved: `picochat tune --from-feedback`.

    feedback store (thumbs and edits from the chat page and POST /v1/feedback)
      -> DPO pairs (an edit over the original; an "up" reply over a "down" one to the same conversation)
         and SFT examples (edits and "up" replies); a fifth of the conversations held out for the gate
      -> one LoRA adapter: SFT on the examples, then DPO on the pairs from there (reference: the base)
      -> the gate (eval/gate.py) beside the model served now: wins on the held-out pairs, no fixed task worse
         than its margin -> gate.md and gate.json
      -> approved: served.json names it (apps/tuned.py), and `picochat serve` swaps it in
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..atomic import atomic_write_text
from ..data.feedback import Feedback, conversation_key, dpo_pairs, sft_examples
from ..data.preferences import normalize_pair
from ..eval.gate import GateReport, GateSettings, decide, measure
from ..model.lora import LoRAConfig
from ..train.dpo import dpo, dpo_defaults
from ..train.sft import sft
from .tuned import adapter_id, approve, new_run_folder, served_adapter

MIN_PAIRS = 4   # fewer, and neither the training nor the held-out set says anything


@dataclass
class TuneSettings:
    model: str | None = None                  # the base model that is served (-m)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=16, alpha=32))
    sft_steps: int = 40
    dpo_steps: int = 60
    lr: float = 5e-4
    beta: float = 0.1
    sft_weight: float = 1.0                   # RPO's α in the DPO stage: good replies stay likely
    batch_size: int = 4
    seq_len: int = 512
    held_out: float = 0.2                     # share of conversations kept for the gate
    seed: int = 0
    threads: int = 0
    gate: GateSettings = field(default_factory=GateSettings)


@dataclass
class TuneOutcome:
    run: Path                                 # tuned_dir/runs/NNN: data, adapter/, gate.md, gate.json
    adapter: Path
    report: GateReport
    counts: dict

    @property
    def approved(self) -> bool:
        return self.report.approved


def held_out(key: str, fraction: float) -> bool:
    """Whether a conversation is kept for the gate: by a hash of it, so every reply to it falls on one side."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) < fraction * 2**32


def split_feedback(entries: list[Feedback], fraction: float) -> tuple[list[dict], list[dict], list[dict]]:
    """(training pairs, SFT examples, held-out pairs); nothing of a held-out conversation is trained on."""
    pairs = dpo_pairs(entries)
    train = [p for p in pairs if not held_out(conversation_key(p["messages"]), fraction)]
    gate = [p for p in pairs if held_out(conversation_key(p["messages"]), fraction)]
    examples = [e for e in sft_examples(entries) if not held_out(conversation_key(e["messages"][:-1]), fraction)]
    if len(pairs) < MIN_PAIRS or not train or not gate:
        raise ValueError(f"the feedback gives {len(pairs)} preference pair(s) ({len(train)} to train on, {len(gate)} "
                         f"held out for the gate): at least {MIN_PAIRS}, with some on each side, are needed — "
                         f"rate or edit more replies (`picochat feedback ls` shows what is stored)")
    return train, examples, gate


def write_jsonl(path: Path, records: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def train_config(settings: TuneSettings, out_dir: Path, steps: int):
    return dataclasses.replace(dpo_defaults(True), out_dir=str(out_dir), max_steps=steps, lr=settings.lr,
                               batch_size=settings.batch_size, seq_len=settings.seq_len, warmup_steps=min(5, steps),
                               eval_interval=0, sample_interval=0, sample_tokens=0, checkpoint_interval=steps,
                               keep_last=1, seed=settings.seed, threads=settings.threads)


def train_adapter(settings: TuneSettings, run: Path, pairs: list[dict], examples: list[dict],
                  on_record: Callable[[dict], None] | None = None) -> Path:
    """SFT on the examples (if any), then DPO on the pairs from that adapter; returns run/adapter."""
    start = None
    if examples:
        result = sft(settings.model, str(write_jsonl(run / "sft.jsonl", examples)),
                     train_config(settings, run / "sft", settings.sft_steps), lora=settings.lora, val_fraction=0.0,
                     on_record=on_record)
        start = result.checkpoint
    result = dpo(settings.model, str(write_jsonl(run / "pairs.jsonl", pairs)),
                 train_config(settings, run / "dpo", settings.dpo_steps), lora=settings.lora, beta=settings.beta,
                 val_fraction=0.0, on_record=on_record, start_adapter=start, sft_weight=settings.sft_weight)
    adapter = run / "adapter"
    # the adapter and its tokenizer, without the training state (optimizer, RNG) that resuming needs
    shutil.copytree(result.checkpoint, adapter,
                    ignore=shutil.ignore_patterns("optimizer.safetensors", "rng.safetensors", "trainer_state.json"))
    return adapter


def gate_adapter(settings: TuneSettings, candidate: Path, gate_pairs: list[dict]) -> GateReport:
    """The candidate measured beside the model served now (the base, or its approved adapter), each as it is
    served — a quantized base on its integer kernel with the adapter beside it, prompts scored at decoding's
    precision — one at a time in memory, and the verdict."""
    from ..backends import LocalModel
    from ..engine.engine import Engine
    from ..load import load
    pairs = [normalize_pair(p) for p in gate_pairs]
    current = served_adapter(settings.model)
    names = (adapter_id(settings.model, current) or "base", adapter_id(settings.model, candidate))
    measured = []
    for adapter, name in zip((current, candidate), names):
        loaded = load(settings.model, dtype="float32", adapter=adapter, draft=None, prompt_bits=15)
        measured.append(measure(LocalModel(Engine(loaded.model, loaded.tokenizer), name=name), pairs, settings.gate))
        del loaded
    return decide(*measured, settings.gate, names=names)


def tune_from_feedback(settings: TuneSettings, entries: list[Feedback],
                       on_record: Callable[[dict], None] | None = None) -> TuneOutcome:
    """Train an adapter on the feedback, gate it, and serve it if it passes (`picochat tune --from-feedback`)."""
    pairs, examples, gate_pairs = split_feedback(entries, settings.held_out)
    run = new_run_folder(settings.model)
    write_jsonl(run / "held_out.jsonl", gate_pairs)
    adapter = train_adapter(settings, run, pairs, examples, on_record)
    report = gate_adapter(settings, adapter, gate_pairs)
    atomic_write_text(run / "gate.md", report.to_markdown())
    atomic_write_text(run / "gate.json", report.to_json())
    if report.approved:
        approve(settings.model, adapter)
    counts = {"feedback": len(entries), "pairs": len(pairs), "sft_examples": len(examples),
              "held_out_pairs": len(gate_pairs)}
    return TuneOutcome(run, adapter, report, counts)
