"""Preference tuning: the DPO / IPO / SimPO losses by hand, the gradient against its closed form on a tiny
model, the adapter-off reference against a frozen copy, pair files and batches, and tiny runs (LoRA and
full) through the one training loop and the command line."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from picochat import cli
from picochat.data.conversations import ConversationError
from picochat.data.preferences import PairStream, encode_reply, load_pairs, normalize_pair, prepare_pairs
from picochat.formats.hf import save_hf_folder
from picochat.load import load
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.model.lora import LoRAConfig, adapters_off, apply_lora
from picochat.tokenizer.bpe import Tokenizer
from picochat.train.config import TrainConfig
from picochat.train.dpo import DPO, dpo, dpo_defaults, preference_losses
from picochat.train.loop import model_config_for
from picochat.train.metrics import read_metrics

TINY = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160, max_seq_len=64)
TEXTS = ["the cat sat on the mat and the dog saw a red ball, hello how can I help you today?"] * 30
GOOD, BAD = "the cat sat on the mat.", "the dog saw a red ball."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=330)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tok) -> Path:
    folder = tmp_path_factory.mktemp("dpo") / "base"
    torch.manual_seed(0)
    save_hf_folder(GPT(model_config_for(tok, TINY, TrainConfig())), folder, tok)
    return folder


def write_pairs(path, n=24):
    """Each question's chosen reply is the cat sentence, its rejected one the dog sentence."""
    records = [{"prompt": f"question {i}", "chosen": GOOD, "rejected": BAD} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_config(out, **changes) -> TrainConfig:
    base = dataclasses.replace(dpo_defaults(True), out_dir=str(out), batch_size=4, seq_len=48, max_steps=12,
                               lr=1e-2, warmup_steps=2, eval_interval=6, eval_batches=4, sample_interval=0,
                               sample_tokens=0, checkpoint_interval=12, keep_last=0, dtype="float32", seed=3,
                               threads=1)
    return dataclasses.replace(base, **changes)


# ----------------------------------------------------------------------------- the losses by hand
def test_the_three_losses_on_hand_computed_numbers():
    logps, ref = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0])   # one pair: chosen, rejected
    lengths = torch.tensor([2, 3])
    loss, chosen, rejected = preference_losses(logps, ref, lengths, beta=0.5, loss_type="sigmoid")
    # r_c = 0.5·(−1 − −2) = 0.5, r_r = 0.5·(−3 − −2) = −0.5: margin 1, loss −log σ(1)
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    loss, _, _ = preference_losses(logps, ref, lengths, beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx((1 / 0.5 - 1 / (2 * 0.5)) ** 2)       # (h − 1/(2β))², h = 2
    loss, chosen, rejected = preference_losses(logps, None, lengths, beta=0.5, loss_type="simpo", gamma=0.5)
    # r_c = 0.5·(−1/2) = −0.25, r_r = 0.5·(−3/3) = −0.5; −log σ(0.25 − 0.5)
    assert (chosen.item(), rejected.item()) == (pytest.approx(-0.25), pytest.approx(-0.5))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(0.25)))


def manual_logp(model, x, y) -> torch.Tensor:
    """log π(reply) of one row, from the logits by hand: Σ log_softmax(logits)[target] over targets not -100."""
    logits, _ = model(x)
    logp = F.log_softmax(logits.float(), dim=-1)
    valid = y != -100
    return logp[valid, y[valid]].sum()


def test_the_dpo_gradient_is_its_closed_form_on_a_tiny_model():
    """∂L/∂θ = −β σ(−margin) (∇log π(y_c) − ∇log π(y_r)) for each pair, averaged over pairs."""
    torch.manual_seed(1)
    model = GPT(TINY.replace(vocab_size=50))
    x = torch.randint(0, 50, (4, 10))                        # 2 pairs: rows 0, 1 chosen; 2, 3 rejected
    y = torch.randint(0, 50, (4, 10))
    y[:, :4] = -100                                         # the prompt is not scored
    y[1, 8:] = -100
    ref = torch.tensor([-30.0, -25.0, -31.0, -24.0])
    objective = DPO(beta=0.3, reference=None, loss_type="sigmoid")
    objective.reference_logps = lambda forward, model, batch: ref   # fixed reference numbers
    loss, stats = objective.loss(model, model, (x, y))
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    rows = [manual_logp(model, x[i:i + 1], y[i:i + 1]) for i in range(4)]
    want_loss = 0.0
    for c, r in ((0, 2), (1, 3)):
        margin = 0.3 * ((rows[c] - ref[c]) - (rows[r] - ref[r]))
        want_loss = want_loss + F.softplus(-margin.detach()) / 2
        weight = -0.3 * torch.sigmoid(-margin.detach()) / 2             # the closed form, per pair
        (weight * (rows[c] - rows[r])).backward(retain_graph=True)
    assert loss.item() == pytest.approx(float(want_loss), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)
    assert 0 <= stats["accuracy"].item() <= 1


def test_the_sft_weight_adds_the_chosen_replys_own_loss():
    """RPO: L + α · (−log π(y_c) / |y_c|), averaged over pairs."""
    torch.manual_seed(3)
    model = GPT(TINY.replace(vocab_size=50))
    x, y = torch.randint(0, 50, (4, 8)), torch.randint(0, 50, (4, 8))
    y[:, :3] = -100
    y[0, 6:] = -100
    ref = torch.tensor([-20.0, -21.0, -22.0, -23.0])
    plain, rpo = DPO(beta=0.2), DPO(beta=0.2, sft_weight=0.5)
    for objective in (plain, rpo):
        objective.reference_logps = lambda forward, model, batch: ref
    with torch.no_grad():
        extra = sum(-manual_logp(model, x[i:i + 1], y[i:i + 1]) / int((y[i] != -100).sum()) for i in (0, 1)) / 2
        difference = rpo.loss(model, model, (x, y))[0] - plain.loss(model, model, (x, y))[0]
    assert difference.item() == pytest.approx(0.5 * float(extra), rel=1e-5)
    with pytest.raises(ValueError, match="--sft-weight"):
        DPO(sft_weight=-1)


def test_the_adapter_off_reference_equals_a_frozen_copy():
    torch.manual_seed(2)
    base = GPT(TINY.replace(vocab_size=50))
    frozen = GPT(TINY.replace(vocab_size=50))
    frozen.load_state_dict(base.state_dict())
    model = apply_lora(base, LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj")))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)                # a trained adapter changes the output
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        adapted = model(x)[0]
        with adapters_off(model):
            off = model(x)[0]
        reference = frozen(x)[0]
    torch.testing.assert_close(off, reference)
    assert (adapted - reference).abs().max() > 1e-3
    with pytest.raises(RuntimeError), adapters_off(model):  # the switch comes back on, even after an error
        raise RuntimeError
    torch.testing.assert_close(model(x)[0].detach(), adapted)


# ----------------------------------------------------------------------------- pairs and batches
def test_pair_records_in_their_shapes_and_their_errors():
    assert normalize_pair({"prompt": "Hi", "chosen": "a", "rejected": "b"}).messages == [
        {"role": "user", "content": "Hi"}]
    pair = normalize_pair({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                           "chosen": [{"role": "assistant", "content": "good"}],
                           "rejected": {"role": "assistant", "content": "bad"}, "source": "edit"})
    assert (pair.chosen, pair.rejected, len(pair.messages)) == ("good", "bad", 2)
    for record, named in [({"chosen": "a", "rejected": "b"}, "'prompt'"),
                          ({"prompt": "Q", "rejected": "b"}, "'chosen'"),
                          ({"prompt": "Q", "chosen": "a", "rejected": 3}, "'rejected'"),
                          ({"prompt": "Q", "chosen": "a", "rejected": "a"}, "same text"),
                          ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                            "chosen": "a", "rejected": "b"}, "end with the user"),
                          ({"messages": "Q", "chosen": "a", "rejected": "b"}, "'messages'")]:
        with pytest.raises(ValueError, match=named):
            normalize_pair(record)


def test_a_malformed_pair_file_names_its_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n{not json\n")
    with pytest.raises(ConversationError, match=r"pairs.jsonl:2: bad JSON"):
        load_pairs(path)


def test_only_the_final_reply_is_scored(tok):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the dog"},
                {"role": "user", "content": "the cat"}]
    ids, mask = encode_reply(tok, messages, GOOD)
    assert tok.decode([int(i) for i in ids[mask]], skip_special_tokens=True).strip() == GOOD
    assert mask[-1] and mask.sum() < len(mask) // 2       # the earlier reply is not scored


def test_batches_put_chosen_rows_first_count_each_pair_once_and_resume(tok, tmp_path):
    pairs = [normalize_pair({"prompt": f"q{i}", "chosen": GOOD, "rejected": BAD + " " * (i % 2)}) for i in range(7)]
    prepare_pairs(pairs, tok, tmp_path / "data", val_fraction=0.0)
    stream = PairStream(tmp_path / "data", "train", batch_size=4, seq_len=48)
    x, y = stream.next_batch()
    assert x.shape[0] == 8
    scored = lambda row: tok.decode([int(t) for t in row[row != -100]], skip_special_tokens=True).strip()  # noqa
    assert [scored(y[i]) for i in range(4)] == [GOOD] * 4
    assert all(scored(y[i]).startswith(BAD) for i in range(4, 8))
    _, y2 = stream.next_batch()                            # 7 pairs: the second batch has 3 and one top-up row
    assert DPO().weight((None, y2)) == 3
    state = stream.state_dict()
    again = PairStream(tmp_path / "data", "train", batch_size=4, seq_len=48)
    again.load_state_dict(state)
    torch.testing.assert_close(again.next_batch(), stream.next_batch())


# ----------------------------------------------------------------------------- runs
def test_a_tiny_lora_dpo_run_learns_the_preference_on_held_out_pairs(base_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    result = dpo(str(base_dir), str(data), run_config(tmp_path / "run"), lora=LoRAConfig(r=4, alpha=8),
                 beta=0.5, val_fraction=0.25)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in records if "val_accuracy" in r]
    assert evals[0]["val_margin"] == pytest.approx(0.0, abs=1e-5)   # the adapter starts as the reference
    assert evals[-1]["val_accuracy"] == 1.0 and evals[-1]["val_margin"] > 0.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert {"reward_margin", "accuracy", "chosen_reward", "rejected_reward"} <= set(records[-1])
    assert (result.checkpoint / "adapter_config.json").is_file()
    tuned = load(str(result.checkpoint), dtype="float32")          # a PEFT adapter on its base
    assert tuned.model.config.n_layer == 2


def test_a_full_dpo_run_keeps_its_reference_frozen(base_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=8)
    config = run_config(tmp_path / "run", max_steps=3, lr=1e-4, eval_interval=3, checkpoint_interval=3)
    result = dpo(str(base_dir), str(data), config, lora=None, beta=0.5, val_fraction=0.25)
    first = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_margin" in r][0]
    assert first["val_margin"] == pytest.approx(0.0, abs=1e-5) and result.step == 3
    assert (result.checkpoint / "model.safetensors").is_file()


def test_the_dpo_command(base_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", n=8)
    code = cli.main(["dpo", "-m", str(base_dir), "--data", str(data), "--out-dir", str(tmp_path / "run"),
                     "--lora-rank", "4", "--max-steps", "2", "--batch-size", "2", "--seq-len", "48",
                     "--eval-interval", "2", "--sample-interval", "0", "--dtype", "float32", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0 and "chosen wins" in err and Path(out.strip()).is_dir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q", "chosen": "same", "rejected": "same"}) + "\n")
    code = cli.main(["dpo", "-m", str(base_dir), "--data", str(bad), "--out-dir", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert code == 1 and "bad.jsonl:1" in err and "same text" in err and "Traceback" not in err
    code = cli.main(["dpo", "-m", str(base_dir), "--data", str(data), "--out-dir", str(tmp_path / "r3"),
                     "--beta", "0"])
    assert code == 1 and "--beta must be positive" in capsys.readouterr().err
