"""Learning from feedback: which adapter is served (approve, roll back), the held-out split, the gate's
verdict (it refuses a deliberately bad adapter), and the whole `picochat tune --from-feedback` on a tiny model."""
import json
from pathlib import Path

import pytest
import torch

from picochat import cli
from picochat.apps import tuned
from picochat.apps.tuning import TuneSettings, held_out, split_feedback, tune_from_feedback
from picochat.data.feedback import Feedback, FeedbackStore, conversation_key
from picochat.eval.gate import GateSettings, decide
from picochat.formats.hf import save_hf_folder
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.model.lora import LoRAConfig, apply_lora, lora_state_dict
from picochat.tokenizer.bpe import Tokenizer
from picochat.train.config import TrainConfig
from picochat.train.loop import model_config_for

TINY = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160, max_seq_len=96)
TEXTS = ["the cat sat on the mat and the dog saw a red ball, hello how can I help you today?"] * 30
GOOD, BAD = "the cat sat on the mat.", "the dog saw a red ball."


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    tok = Tokenizer.train(TEXTS, vocab_size=330)
    folder = tmp_path_factory.mktemp("tune") / "base"
    torch.manual_seed(0)
    model = GPT(model_config_for(tok, TINY, TrainConfig()))
    ids = torch.tensor(tok.encode(" ".join(TEXTS[:3])))[None, :64]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):  # it learns the text, so that a bad adapter shows in the gate's bits per byte
        optimizer.zero_grad()
        model(ids[:, :-1], ids[:, 1:])[1].backward()
        optimizer.step()
    save_hf_folder(model, folder, tok)
    return folder


def feedback(n: int) -> list[Feedback]:
    """n conversations whose reply was the dog sentence: the user edited it into the cat sentence."""
    return [Feedback(f"chatcmpl-{i}", [{"role": "user", "content": f"question {i}"}], BAD, "down", GOOD, "tiny",
                     None, float(i), float(i)) for i in range(n)]


def settings(model: Path, **gate) -> TuneSettings:
    return TuneSettings(model=str(model), lora=LoRAConfig(r=4, alpha=8), sft_steps=10, dpo_steps=15, lr=1e-2,
                        beta=0.5, batch_size=4, seq_len=48, held_out=0.25, threads=1,
                        gate=GateSettings(**{"bpb_data": None, **gate}))


# ----------------------------------------------------------------------------- which adapter is served
def test_approve_and_roll_back_walk_the_history(base_dir):
    model = str(base_dir)
    assert tuned.served_adapter(model) is None
    first, second = tuned.new_run_folder(model), tuned.new_run_folder(model)
    assert (first.name, second.name) == ("001", "002")
    for run in (first, second):
        (run / "adapter").mkdir()
        tuned.approve(model, run / "adapter")
    assert tuned.served_adapter(model) == second / "adapter"
    assert tuned.adapter_id(model, tuned.served_adapter(model)) == "tuned-002"
    assert tuned.rollback(model) == first / "adapter"
    assert tuned.rollback(model) is None                     # back to the base model
    with pytest.raises(ValueError, match="nothing to roll back"):
        tuned.rollback(model)


def test_a_damaged_served_file_names_itself(base_dir):
    tuned.tuned_dir(str(base_dir)).mkdir(parents=True)
    (tuned.tuned_dir(str(base_dir)) / "served.json").write_text("{oops")
    with pytest.raises(ValueError, match="served.json is damaged"):
        tuned.served_adapter(str(base_dir))


# ----------------------------------------------------------------------------- the split
def test_held_out_conversations_are_never_trained_on():
    entries = feedback(40)
    train, examples, gate = split_feedback(entries, 0.25)
    keys = {conversation_key(p["messages"]) for p in gate}
    assert 4 <= len(gate) <= 20 and len(train) + len(gate) == 40
    assert not keys & {conversation_key(p["messages"]) for p in train}
    assert not keys & {conversation_key(e["messages"][:-1]) for e in examples}
    assert all(held_out(k, 0.25) for k in keys)


def test_too_little_feedback_says_what_to_do():
    with pytest.raises(ValueError, match="rate or edit more replies"):
        split_feedback(feedback(2), 0.25)


# ----------------------------------------------------------------------------- the gate
def test_the_gate_needs_a_win_on_feedback_and_no_regression():
    gate = GateSettings(max_bpb_rise=0.02, max_drop=0.02)
    current = {"feedback/margin": -1.0, "feedback/accuracy": 0.4, "bpb/bits_per_byte": 2.0, "mc/accuracy": 0.5}
    better = {"feedback/margin": 3.0, "feedback/accuracy": 0.9, "bpb/bits_per_byte": 2.03, "mc/accuracy": 0.49}
    assert decide(current, better, gate).approved
    worse_bpb = {**better, "bpb/bits_per_byte": 2.05}           # +2.5 %: past its margin
    report = decide(current, worse_bpb, gate)
    assert not report.approved and [r.task for r in report.rows if not r.passed] == ["bits per byte"]
    no_win = {**better, "feedback/margin": -1.0}
    assert not decide(current, no_win, gate).approved
    assert "**fail**" in decide(current, no_win, gate).to_markdown()
    assert json.loads(decide(current, better, gate).to_json())["approved"] is True


def test_tune_from_feedback_trains_gates_and_serves(base_dir, tmp_path):
    outcome = tune_from_feedback(settings(base_dir), feedback(24))
    assert outcome.approved, outcome.report.to_markdown()
    margin = next(r for r in outcome.report.rows if r.metric == "margin")
    assert margin.candidate > margin.current + 1.0             # the held-out edits are now preferred
    assert tuned.served_adapter(str(base_dir)) == outcome.adapter
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in outcome.adapter.iterdir()}
    assert not (outcome.adapter / "optimizer.safetensors").exists()
    report = json.loads((outcome.run / "gate.json").read_text())
    assert report["approved"] and report["candidate"] == "tuned-001" and report["current"] == "base"


def test_the_gate_refuses_an_adapter_that_regresses_a_fixed_task(base_dir, tmp_path):
    """Tuned too hard (lr 1e-2 on 24 edits), the adapter wins on the feedback but forgets the held-out text:
    refused, and the base model stays served."""
    text = tmp_path / "held-out.txt"
    text.write_text(" ".join(TEXTS[:3]))
    outcome = tune_from_feedback(settings(base_dir, bpb_data=str(text)), feedback(24))
    rows = {r.task: r for r in outcome.report.rows if r.metric != "accuracy"}
    assert rows["feedback (held out)"].passed and not rows["bits per byte"].passed
    assert not outcome.approved and tuned.served_adapter(str(base_dir)) is None
    assert "refused" in (outcome.run / "gate.md").read_text()


def test_the_gate_refuses_a_deliberately_bad_adapter(base_dir, tmp_path):
    from picochat.apps.tuning import gate_adapter
    from picochat.formats.peft import write_adapter
    from picochat.load import load
    text = tmp_path / "held-out.txt"
    text.write_text(" ".join(TEXTS[:3]))
    model = apply_lora(load(str(base_dir), dtype="float32").model, LoRAConfig(r=4, alpha=8))
    torch.manual_seed(0)
    bad = {k: torch.randn_like(v) for k, v in lora_state_dict(model).items()}   # a random update
    folder = write_adapter(tmp_path / "bad", model.lora_config, model.config, bad, str(base_dir))
    report = gate_adapter(settings(base_dir, bpb_data=str(text)), folder,
                          [{"messages": [{"role": "user", "content": "question 7"}], "chosen": GOOD, "rejected": BAD}])
    assert not report.approved
    assert any(r.task == "bits per byte" and not r.passed for r in report.rows), report.to_markdown()


def test_the_tune_command_and_rollback(base_dir, tmp_path, capsys):
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    for e in feedback(24):
        store.record(e.response_id, e.messages, e.reply, e.rating, e.edited, model="tiny")
    args = ["tune", "--from-feedback", "-m", str(base_dir), "--db", str(db), "--sft-steps", "10", "--dpo-steps",
            "15", "--lr", "1e-2", "--beta", "0.5", "--seq-len", "48", "--lora-rank", "4", "--held-out", "0.25",
            "--gate-text", "none", "--threads", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "| feedback (held out) | margin |" in out and "approved" in out
    assert tuned.adapter_id(str(base_dir), tuned.served_adapter(str(base_dir))) == "tuned-001"
    assert cli.main(["tune", "--rollback", "-m", str(base_dir)]) == 0
    assert "no adapter (the base model)" in capsys.readouterr().out
    assert cli.main(["tune", "--rollback", "-m", str(base_dir)]) == 1
    assert "nothing to roll back" in capsys.readouterr().err
