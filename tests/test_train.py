"""The training loop: loss falls, exact resume, checkpoints that load everywhere, schedules, optimizer
groups, Muon, DDP and FSDP2 over 2 CPU processes, and bad input that writes nothing."""
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from picochat import cli
from picochat.model.config import PRESETS, ModelConfig
from picochat.data.prepare import PrepareConfig, prepare, split_hash
from picochat.data.tokens import DataError, DataWarning, read_meta
from picochat.formats.hf import CheckpointError, save_hf_folder
from picochat.model.gpt import GPT
from picochat.train.config import TrainConfig
from picochat.cli.train import configs_from_args
from picochat.load import load
from picochat.train.config import TRAIN_PRESETS
from picochat.train.dist import DistInfo
from picochat.train.loop import NextToken, accumulate_gradients
from picochat.train.loop import train
from picochat.tokenizer.bpe import Tokenizer
from picochat.train.metrics import read_metrics
from picochat.train.optim import lr_schedule
from picochat.train.optim import make_optimizers
from picochat.train.optim import param_groups

# A model small enough that a step takes milliseconds.
TINY = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160, max_seq_len=64)
TINY_GPT2 = ModelConfig(architecture="gpt2", n_layer=1, n_head=4, n_kv_head=4, n_embd=64, intermediate_size=256,
                        max_seq_len=64, norm="layernorm", mlp="gelu", position="learned", qkv_bias=True,
                        out_bias=True, mlp_bias=True)


def sentences(rng: random.Random, n: int) -> str:
    """n English-like sentences from a small grammar: easy to learn, so the loss falls fast."""
    subjects = ["the cat", "a dog", "my friend", "the teacher", "our team", "the robot", "a little bird"]
    verbs = ["likes", "sees", "finds", "wants", "builds", "reads", "carries", "paints"]
    objects = ["a red ball", "the green house", "some fresh bread", "a long story", "the blue sky"]
    ends = [".", "!", "?", ". Then it rains.", ", and everyone smiles."]
    return " ".join(f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(ends)}"
                    for _ in range(n))


def corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Short documents of a few sentences each."""
    rng = random.Random(seed)
    return [sentences(rng, rng.randint(3, 8)) for _ in range(n_docs)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A prepared dataset (data.prepare: meta.json, tokenizer/, uint16 shards) of ~30k training tokens."""
    root = tmp_path_factory.mktemp("train-data")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(660)))
    prepare(PrepareConfig(sources=[str(docs)], out=root / "data", vocab_size=400, val_fraction=0.1, workers=1))
    return root / "data"


def tiny_config(data_dir, out_dir, **changes) -> TrainConfig:
    base = TrainConfig(data_dir=str(data_dir), out_dir=str(out_dir), batch_size=8, seq_len=32, max_steps=12,
                       lr=1e-2, warmup_steps=3, eval_interval=6, eval_batches=2, sample_interval=6,
                       sample_prompt="The cat", sample_tokens=8, checkpoint_interval=6, keep_last=0,
                       dtype="float32", seed=7, threads=1)  # one thread: tiny matrices gain nothing from two
    return dataclasses.replace(base, **changes)


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss" in r}


def tree(folder: Path) -> dict:
    """Every file under folder with its bytes, to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- a run
def test_a_tiny_run_learns_and_writes_its_outputs(data_dir, tmp_path):
    out = tmp_path / "run"
    records = []
    result = train(tiny_config(data_dir, out, max_steps=60, eval_interval=30, sample_interval=30,
                                      checkpoint_interval=20, keep_last=2), TINY, on_record=records.append)
    loss = losses(out)
    assert sorted(loss) == list(range(1, 61))
    assert loss[60] < 0.5 * loss[1], f"loss fell only from {loss[1]:.3f} to {loss[60]:.3f}"
    metrics = read_metrics(out / "metrics.jsonl")
    assert metrics == records  # on_record sees what metrics.jsonl gets
    val = [r for r in metrics if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 30, 60]
    assert val[-1]["val_loss"] < 0.5 * val[0]["val_loss"]
    # bits per byte = nats per token / ln 2 / bytes per token: this corpus has a few bytes per token
    assert 0 < val[-1]["val_bpb"] < val[-1]["val_loss"] / math.log(2)
    assert {"lr", "tokens_per_s", "elapsed", "tokens", "grad_norm"} <= set(metrics[-1])
    assert [r["step"] for r in metrics if "sample" in r] == [30, 60]
    assert metrics[-1]["sample"].startswith("The cat")
    # checkpoints: the last two kept, `latest` names the newest, no temporary folder left behind
    assert sorted(p.name for p in out.iterdir()) == ["latest", "loss.png", "metrics.jsonl", "step_000040",
                                                     "step_000060"]
    assert (out / "latest").read_text().strip() == "step_000060" and result.checkpoint == out / "step_000060"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = {p.name for p in result.checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "optimizer.safetensors", "rng.safetensors", "trainer_state.json"} == files
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 60 and state["data"]["position"] > 0 and state["train_config"]["lr"] == 1e-2
    assert result.step == 60 and result.val_loss == val[-1]["val_loss"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_an_interrupted_and_resumed_run_repeats_the_uninterrupted_one_exactly(data_dir, tmp_path, optimizer):
    config = tiny_config(data_dir, tmp_path / "straight", optimizer=optimizer)
    train(config, TINY)

    class Crash(Exception):
        pass

    def crash_at_step_8(record):  # after the checkpoint of step 6, mid-way to the next one
        if record["step"] == 8:
            raise Crash

    resumed = dataclasses.replace(config, out_dir=str(tmp_path / "resumed"))
    with pytest.raises(Crash):
        train(resumed, TINY, on_record=crash_at_step_8)
    assert max(losses(resumed.out_dir)) == 8
    train(resumed, TINY, resume=True)

    straight, again = losses(config.out_dir), losses(resumed.out_dir)
    assert sorted(again) == list(range(1, 13))  # the crashed tail (7, 8) was replaced, not duplicated
    assert again == straight  # float32 on one process: bit for bit
    val = [read_metrics(Path(d) / "metrics.jsonl")[-1]["val_loss"] for d in (config.out_dir, resumed.out_dir)]
    assert val[0] == val[1]
    a = load_file(tmp_path / "straight" / "step_000012" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "step_000012" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_the_command_line_takes_the_checkpoints_configuration(data_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    common = ["--data-dir", str(data_dir), "--out-dir", str(out)]
    code = cli.main(["train", "--preset", "tiny", *common, "--max-steps", "4", "--batch-size", "4", "--seq-len", "32",
                     "--n-layer", "1", "--eval-interval", "2", "--eval-batches", "1", "--sample-interval", "4",
                     "--sample-tokens", "4", "--checkpoint-interval", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == str(out / "step_000004")
    assert "val loss" in captured.err and "sample at step 4" in captured.err
    # no --preset: the run continues with the checkpoint's settings (n_layer 1, batch 4), for more steps
    code = cli.main(["train", "--resume", "--out-dir", str(out), "--max-steps", "6"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == str(out / "step_000006")
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "step_000006" / "config.json").read_text())["num_hidden_layers"] == 1


# ----------------------------------------------------------------------------- small validation splits
def reported_corpus() -> list[str]:
    """The issue's corpus in miniature: ten files, nine of ~50,000 characters and one of three sentences
    whose hash is the lowest, so that the hashed split gives validation that short document alone."""
    rng = random.Random(1)
    long_docs = [sentences(rng, 1200) for _ in range(9)]
    short = min((sentences(rng, 3) for _ in range(40)), key=split_hash)
    assert split_hash(short) < min(map(split_hash, long_docs))
    return long_docs[:4] + [short] + long_docs[4:]


def split_ids(data_dir: Path, split: str) -> list[list[int]]:
    """The split's documents as token ids, each without its leading boundary token."""
    meta = read_meta(data_dir)
    ids = np.concatenate([np.fromfile(data_dir / n, dtype=meta["dtype"]) for n in meta["splits"][split]["shards"]])
    starts = np.flatnonzero(ids == meta["boundary_token_id"]).tolist()
    assert starts[0] == 0
    return [ids[a + 1:b].tolist() for a, b in zip(starts, starts[1:] + [len(ids)])]


def test_a_corpus_whose_hashed_validation_is_one_short_document_trains_with_the_demo_batch(tmp_path, capsys):
    """The issue: validation of one short document, too few tokens for one batch of `--preset demo`
    (16 × 256), made `picochat train` refuse to start."""
    docs = reported_corpus()
    for i, doc in enumerate(docs):
        (tmp_path / "corpus").mkdir(exist_ok=True)
        (tmp_path / "corpus" / f"page_{i}.txt").write_text(doc)
    for name, workers in (("data", "1"), ("again", "1"), ("workers", "2")):
        assert cli.main(["data", "prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / name), "--vocab-size",
                         "400", "--workers", workers, "-q"]) == 0
    data = tmp_path / "data"
    assert tree(data) == tree(tmp_path / "again") == tree(tmp_path / "workers")  # deterministic, any workers
    # `picochat train --preset demo` (its batch, with a tiny model) starts and validates
    code = cli.main(["train", "--preset", "demo", "--data-dir", str(data), "--out-dir", str(tmp_path / "run"),
                     "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--intermediate-size", "64", "--max-steps",
                     "2", "--no-compile", "--dtype", "float32", "--sample-tokens", "0", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "step 0: val loss" in captured.err and "step 2: val loss" in captured.err
    assert "warning" not in captured.err.lower()  # whole batches: nothing to warn about
    assert "val topped up from" in captured.out
    meta = read_meta(data)
    tok = Tokenizer.from_file(data / "tokenizer")
    assert meta["val_top_up"]["hashed_val_tokens"] == len(tok.encode_text(docs[4])) + 1 < 100  # the short one
    assert meta["splits"]["val"]["tokens"] >= PrepareConfig([], "").min_val_tokens == 16 * 512 + 1
    # no token is in both splits: the short document in validation, and one long one cut in two
    train, val = split_ids(data, "train"), split_ids(data, "val")
    cut = meta["val_top_up"]["cut_document"]
    assert len(val) == 2 and docs[4] in [tok.decode(d) for d in val]
    [(h, t)] = [(h, t) for h in range(len(train)) for t in range(len(val))
                if tok.decode(train[h] + val[t]) == docs[cut["document"]]]
    assert sorted(tok.decode(d) for d in train[:h] + train[h + 1:]) == sorted(
        d for i, d in enumerate(docs) if i not in (4, cut["document"]))
    assert sum(map(len, train + val)) == sum(len(tok.encode_text(d)) for d in docs)


def shrink_validation(data_dir: Path, out: Path, tokens: int) -> Path:
    """A copy of a prepared dataset as one prepared before the top-up wrote it, with `tokens` validation tokens."""
    shutil.copytree(data_dir, out)
    meta = json.loads((out / "meta.json").read_text())
    meta.pop("val_top_up", None)
    meta["settings"].pop("min_val_tokens", None)
    val = meta["splits"]["val"]
    ids = np.concatenate([np.fromfile(out / n, dtype=meta["dtype"]) for n in val["shards"]])[:tokens]
    for name in val["shards"]:
        (out / name).unlink()
    ids.tofile(out / "val_000.bin")
    val.update(shards=["val_000.bin"], tokens=tokens, documents=int((ids == meta["boundary_token_id"]).sum()))
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


@pytest.mark.parametrize("tokens, says", [(80, "validating on batches of 2 × 32 tokens"),
                                          (20, "validating on batches of 1 × 19 tokens"),
                                          (1, "training without validation")])
def test_an_old_dataset_with_a_tiny_validation_split_still_trains(data_dir, tmp_path, tokens, says):
    small = shrink_validation(data_dir, tmp_path / "data", tokens)
    with pytest.warns(DataWarning, match=f"the validation split has {tokens} tokens, fewer than one batch "
                                         rf"\(1 × 8 × 32 \+ 1\): {says}"):
        result = train(tiny_config(small, tmp_path / "run", max_steps=2, eval_interval=1, sample_interval=0), TINY)
    val = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert sorted(losses(tmp_path / "run")) == [1, 2]
    if tokens > 1:
        assert val == [0, 1, 2] and math.isfinite(result.val_loss)
    else:
        assert val == [] and result.val_loss is None


# ----------------------------------------------------------------------------- checkpoints load elsewhere
def test_a_checkpoint_loads_with_models_load_and_transformers(data_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    result = train(tiny_config(data_dir, tmp_path / "run", max_steps=6, sample_interval=0), TINY)
    loaded = load(str(result.checkpoint), dtype=torch.float32)
    ids = torch.tensor([loaded.tokenizer.encode("The cat sees a red ball.", add_special_tokens=True)])
    ours, _ = loaded.model(ids)
    hf = transformers.LlamaForCausalLM.from_pretrained(result.checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(result.checkpoint)
    assert hf_tok("The cat")["input_ids"] == loaded.tokenizer.encode("The cat", add_special_tokens=True)
    # and the CLI generates from it
    assert cli.main(["generate", "The cat", "-m", str(result.checkpoint), "--max-new-tokens", "5",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out.endswith("\n")


# ----------------------------------------------------------------------------- schedule and optimizers
def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(warmup_steps=10, schedule="cosine", min_lr_frac=0.1)
    lrs = [lr_schedule(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[4] == pytest.approx(0.5) and lrs[9] == 1.0 and lrs[10] == 1.0
    assert lrs[99] == pytest.approx(0.1)
    assert lrs[54] == pytest.approx(0.55, abs=0.01)  # half way through the decay: half way down
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    wsd = dataclasses.replace(cfg, schedule="wsd", decay_frac=0.2, min_lr_frac=0.0)
    lrs = [lr_schedule(s, 100, wsd) for s in range(100)]
    assert all(x == 1.0 for x in lrs[10:81]) and lrs[99] == 0.0
    assert lrs[90] == pytest.approx((99 - 90) / (99 - 81.2), abs=0.02)  # linear from the stable phase to 0
    const = dataclasses.replace(cfg, schedule="constant")
    assert [lr_schedule(s, 100, const) for s in (10, 50, 99)] == [1.0, 1.0, 1.0]
    # a time budget: the decay follows the clock when it is further along than the steps
    timed = dataclasses.replace(cfg, warmup_steps=0, max_time=60.0)
    assert lr_schedule(5, 0, timed, elapsed=30.0) == pytest.approx(0.55)
    assert lr_schedule(5, 0, timed, elapsed=60.0) == pytest.approx(0.1)


def test_adamw_decays_matrices_only_and_muon_takes_the_hidden_matrices():
    model = GPT(TINY.replace(tie_word_embeddings=False, vocab_size=128))
    groups = {k: [n for n, _ in v] for k, v in param_groups(model, TrainConfig()).items()}
    assert groups["muon"] == []
    assert "lm_head.weight" in groups["decay"] and "layers.0.attn.q_proj.weight" in groups["decay"]
    assert all(not n.endswith("norm.weight") and n != "embed.weight" for n in groups["decay"])
    assert {"embed.weight", "norm.weight", "layers.0.attn_norm.weight", "layers.1.mlp_norm.weight"} <= set(
        groups["no_decay"])
    (adamw,) = make_optimizers(model, TrainConfig(weight_decay=0.1), "cpu")
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in adamw.param_groups}
    params = dict(model.named_parameters())
    assert id(params["embed.weight"]) in by_decay[0.0] and id(params["norm.weight"]) in by_decay[0.0]
    assert id(params["layers.1.mlp.down_proj.weight"]) in by_decay[0.1]
    # GPT-2: biases, LayerNorm weights and the position embedding are not decayed either
    gpt2 = GPT(PRESETS["gpt2-124m"].replace(n_layer=1, n_embd=32, n_head=2, n_kv_head=2, intermediate_size=64,
                                            vocab_size=64, max_seq_len=16, head_dim=None))
    g2 = {k: [n for n, _ in v] for k, v in param_groups(gpt2, TrainConfig()).items()}
    assert all(n.endswith(".weight") and "norm" not in n for n in g2["decay"])
    assert {"pos_embed.weight", "layers.0.attn.q_proj.bias", "layers.0.attn_norm.bias"} <= set(g2["no_decay"])
    # Muon: the 2-D matrices inside the blocks; AdamW keeps the embedding, the head and the norms
    muon_cfg = TrainConfig(optimizer="muon")
    gm = {k: [n for n, _ in v] for k, v in param_groups(model, muon_cfg).items()}
    assert set(gm["muon"]) == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2}
    assert gm["decay"] == ["lm_head.weight"]
    adamw, muon = make_optimizers(model, muon_cfg, "cpu")
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    # frozen parameters (LoRA trains a few matrices) get no optimizer state at all
    model.embed.weight.requires_grad_(False)
    assert "embed.weight" not in sum((list(dict(v)) for v in param_groups(model, muon_cfg).values()), [])


def test_muon_trains(data_dir, tmp_path):
    train(tiny_config(data_dir, tmp_path / "muon", optimizer="muon", max_steps=40, eval_interval=0,
                            sample_interval=0, checkpoint_interval=0), TINY)
    loss = losses(tmp_path / "muon")
    assert loss[40] < 0.5 * loss[1], f"loss fell only from {loss[1]:.3f} to {loss[40]:.3f}"


def test_bits_per_byte_counts_the_bytes_of_unmasked_targets(data_dir):
    from picochat.eval.tasks import validation_loss
    from picochat.tokenizer.bpe import Tokenizer
    tok = Tokenizer.from_file(data_dir / "tokenizer")
    token_bytes = torch.from_numpy(tok.token_byte_lengths())
    text = "The cat sees a red ball. 你好"
    assert int(token_bytes[tok.encode(text, add_special_tokens=True)].sum()) == len(text.encode("utf-8"))
    torch.manual_seed(0)
    model = GPT(TINY.replace(vocab_size=tok.vocab_size)).eval()
    x = torch.tensor([tok.encode(text, add_special_tokens=True)])
    y = torch.roll(x, -1, dims=1)
    y[0, :3] = -100  # masked targets count neither in the loss nor in the bytes
    loss, bpb = validation_loss(model, [(x, y)], token_bytes, torch.autocast("cpu", enabled=False))
    logits, _ = model(x)
    nll = torch.nn.functional.cross_entropy(logits[0], y[0], ignore_index=-100, reduction="sum").item()
    n_bytes = int(token_bytes[y[0, 3:]].sum())
    assert loss == pytest.approx(nll / int((y != -100).sum()), rel=1e-5)
    assert bpb == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)


def test_gradient_accumulation_weights_each_pass_by_its_unmasked_targets():
    """Chat fine-tuning masks prompts with -100: the step must still be the mean over valid targets."""
    torch.manual_seed(0)
    model = GPT(TINY.replace(vocab_size=64))
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    y[0, :12] = -100
    y[3] = -100  # a pass with nothing to learn from
    _, loss = model(x, y)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    passes = [(x[:1], y[:1]), (x[1:3], y[1:3]), (x[3:], y[3:])]
    run = SimpleNamespace(info=DistInfo(), objective=NextToken(), forward=model, model=model, wrapped=model,
                          autocast=torch.autocast("cpu", enabled=False))
    got = accumulate_gradients(run, passes)
    assert got == {"loss": pytest.approx(loss.item(), rel=1e-6)}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- torch.distributed on CPU
def torchrun(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "picochat.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def distributed_args(data_dir, out_dir, mode) -> list[str]:
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--preset", "tiny", "--n-layer", "2",
            "--n-embd", "64", "--n-head", "4", "--n-kv-head", "2", "--intermediate-size", "160",
            "--max-seq-len", "64", "--batch-size", "4", "--seq-len", "32", "--grad-accum", "2", "--max-steps", "6",
            "--lr", "1e-2", "--warmup-steps", "2", "--eval-interval", "3", "--eval-batches", "2",
            "--sample-interval", "6", "--sample-tokens", "4", "--checkpoint-interval", "3", "--dtype", "float32",
            "--distributed", mode, "--seed", "7"]


@pytest.fixture(scope="module")
def single_process_reference(data_dir, tmp_path_factory) -> Path:
    """One process with the global batch of the 2-process runs: 2 × 4 sequences per pass, 2 passes a step."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(tiny_config(data_dir, out, batch_size=8, grad_accum=2, max_steps=6, warmup_steps=2,
                            eval_interval=3, checkpoint_interval=3, sample_interval=6, sample_tokens=4), TINY)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(mode, data_dir, tmp_path,
                                                                    single_process_reference):
    out = tmp_path / mode
    torchrun(distributed_args(data_dir, out, mode), tmp_path)
    ref, got = losses(single_process_reference), losses(out)
    assert sorted(got) == list(range(1, 7))
    # Tolerance: relative 1e-5, in float32. The runs add the same numbers in different orders (one big
    # batch vs. an all-reduce of two halves), so they agree to float32 rounding, which 6 optimizer steps
    # amplify a little (measured: at most 1e-6 relative, 0 at step 1).
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got[step], ref[step])
    val = lambda d: [r["val_loss"] for r in read_metrics(Path(d) / "metrics.jsonl") if "val_loss" in r]
    assert val(out) == pytest.approx(val(single_process_reference), rel=1e-5)
    # only rank 0 wrote: one metrics file, the checkpoints, the PNG; the weights match the single run's
    assert sorted(p.name for p in out.iterdir()) == ["latest", "loss.png", "metrics.jsonl", "step_000003",
                                                     "step_000006"]
    a = load_file(single_process_reference / "step_000006" / "model.safetensors")
    b = load_file(out / "step_000006" / "model.safetensors")  # FSDP2: gathered whole onto rank 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
    if mode == "fsdp":  # resume a sharded run: the optimizer state is sharded again on load
        torchrun([*distributed_args(data_dir, out, mode), "--resume", str(out / "step_000003")], tmp_path)
        again = losses(out)
        assert sorted(again) == list(range(1, 7))
        for step in again:
            assert again[step] == pytest.approx(got[step], rel=1e-5)


def test_muon_under_fsdp2_orthogonalizes_the_whole_sharded_matrices(data_dir, tmp_path):
    """torch.optim.Muon works on FSDP2's sharded DTensor parameters: the result matches one process."""
    single = tmp_path / "single"
    train(tiny_config(data_dir, single, batch_size=8, grad_accum=2, max_steps=6, warmup_steps=2,
                            eval_interval=3, checkpoint_interval=3, sample_interval=6, sample_tokens=4,
                            optimizer="muon"), TINY)
    out = tmp_path / "fsdp"
    torchrun([*distributed_args(data_dir, out, "fsdp"), "--optimizer", "muon"], tmp_path)
    ref, got = losses(single), losses(out)
    # Muon's Newton-Schulz iteration runs in bfloat16, which turns float32 rounding differences into
    # ~1e-5 relative ones (measured: at most 6e-5 over 6 steps)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-3), (step, got[step], ref[step])


# ----------------------------------------------------------------------------- bad input
def test_a_folder_without_meta_json_is_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no meta.json"):
        train(tiny_config(tmp_path / "empty", out), TINY)
    assert not out.exists()
    assert cli.main(["train", "--preset", "tiny", "--data-dir", str(tmp_path / "empty"), "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("picochat: error:") and "meta.json" in err and err.count("\n") == 1
    assert not out.exists()


def test_resume_from_another_architecture_names_the_mismatch_and_writes_nothing(data_dir, tmp_path, capsys):
    other = train(tiny_config(data_dir, tmp_path / "other", max_steps=3, checkpoint_interval=3,
                                    eval_interval=0, sample_interval=0), TINY_GPT2)  # GPT-2 trains too
    before = tree(tmp_path / "other")
    out = tmp_path / "new"
    with pytest.raises(CheckpointError, match=r"architecture: checkpoint 'gpt2', this run 'llama'"):
        train(tiny_config(data_dir, out), TINY, resume=other.checkpoint)
    with pytest.raises(CheckpointError, match=r"n_layer: checkpoint 1, this run 2"):
        train(tiny_config(data_dir, out), TINY_GPT2.replace(n_layer=2), resume=other.checkpoint)
    capsys.readouterr()
    code = cli.main(["train", "--preset", "tiny", "--data-dir", str(data_dir), "--out-dir", str(out),
                     "--resume", str(other.checkpoint)])
    err = capsys.readouterr().err
    assert code == 1 and "architecture: checkpoint 'gpt2', this run 'llama'" in err and err.count("\n") == 1
    # a Hugging Face folder that is not a training checkpoint
    hf = tmp_path / "hf"
    save_hf_folder(GPT(TINY.replace(vocab_size=64)), hf)
    with pytest.raises(CheckpointError, match="neither a training checkpoint"):
        train(tiny_config(data_dir, out), TINY, resume=hf)
    # a new run into a folder that holds one
    with pytest.raises(ValueError, match="already holds a training run"):
        train(tiny_config(data_dir, tmp_path / "other"), TINY_GPT2)
    assert not out.exists()
    assert tree(tmp_path / "other") == before


def test_flags_override_the_preset_and_bad_values_are_refused(data_dir, tmp_path):
    args = cli.build_parser().parse_args(["train", "--preset", "demo", "--lr", "3e-4", "--n-layer", "3",
                                          "--no-compile", "--n-head", "8", "--seq-len", "512"])
    model_config, config = configs_from_args(args)
    assert config.lr == 3e-4 and config.compile is False and config.batch_size == TRAIN_PRESETS["demo"].batch_size
    assert model_config.n_layer == 3 and model_config.n_head == 8 and model_config.n_kv_head == 8
    assert model_config.head_dim == model_config.n_embd // 8 and model_config.max_seq_len == 512
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--optimizer", "sgd"])
    with pytest.raises(ValueError, match="cannot be saved as a Hugging Face llama folder"):
        train(tiny_config(data_dir, tmp_path / "x"), TINY.replace(norm="layernorm"))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        train(tiny_config(data_dir, tmp_path / "x", seq_len=128), TINY)
    assert not (tmp_path / "x").exists()
