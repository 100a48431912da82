"""Work is never lost: `picochat train` and `picochat sft` processes SIGKILLed at random moments and at
each stage of writing a checkpoint resume from the newest complete checkpoint and continue the loss
curve of an uninterrupted run exactly, with no leftovers and no torn or repeated metrics.

The kills are real: each run is a `python -m picochat` subprocess, killed from outside after a seeded
random delay, or killing itself at a chosen stage of save_checkpoint ($PICOCHAT_TEST_KILL_IN_CHECKPOINT).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from picochat import cli
from picochat.model.config import ModelConfig
from picochat.data.prepare import PrepareConfig, prepare
from picochat.formats.hf import CheckpointError, save_hf_folder
from picochat.model.gpt import GPT
from picochat.tokenizer.bpe import Tokenizer
from picochat.formats.runs import CheckpointWarning
from picochat.formats.runs import checkpoint_folders
from picochat.load import load
from picochat.train.checkpoint import find_checkpoint
from picochat.train.checkpoint import load_checkpoint_state
from picochat.train.config import TrainConfig
from picochat.train.loop import model_config_for
from picochat.train.metrics import read_metrics

# A one-layer model and 2 passes of 4 × 32 tokens a step: a step takes a few milliseconds, a process
# ~2 s (importing torch). A checkpoint every 2 steps, the last 2 kept.
TRAIN_FLAGS = ["--preset", "tiny", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1",
               "--intermediate-size", "64", "--max-seq-len", "32", "--batch-size", "4", "--seq-len", "32",
               "--grad-accum", "2", "--warmup-steps", "2", "--lr", "1e-2", "--eval-interval", "0",
               "--eval-batches", "1", "--sample-interval", "0", "--sample-tokens", "0", "--checkpoint-interval", "2",
               "--keep-last", "2", "--threads", "1", "--seed", "7", "--dtype", "float32"]
KILL_HOOK = "PICOCHAT_TEST_KILL_IN_CHECKPOINT"  # "STAGE:STEP": save_checkpoint SIGKILLs its process there
SFT_FLAGS = ["--lora-rank", "2", "--max-steps", "8", "--batch-size", "2", "--seq-len", "32", "--eval-interval", "0",
             "--eval-batches", "1", "--sample-interval", "0", "--sample-tokens", "0", "--checkpoint-interval", "2",
             "--dtype", "float32", "--threads", "1", "--seed", "3", "--lr", "1e-2", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A prepared dataset of ~8k tokens of simple sentences."""
    root = tmp_path_factory.mktemp("kill-data")
    rng = random.Random(0)
    docs = [" ".join(f"{rng.choice(['The cat', 'A dog', 'My friend'])} {rng.choice(['sees', 'likes', 'finds'])} "
                     f"{rng.choice(['a red ball', 'the house', 'some bread'])}." for _ in range(6)) for _ in range(200)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare(PrepareConfig(sources=[str(root / "docs.jsonl")], out=root / "data", vocab_size=300, val_fraction=0.1,
                          workers=1))
    return root / "data"


def train_args(data_dir, out, max_steps: int) -> list[str]:
    return ["train", *TRAIN_FLAGS, "--max-steps", str(max_steps), "--data-dir", str(data_dir), "--out-dir", str(out)]


def reference(args: list[str]) -> dict[int, float]:
    """The losses of an uninterrupted run, made in this process by the same command line."""
    assert cli.main(args) == 0
    return losses(args[args.index("--out-dir") + 1])


# ----------------------------------------------------------------------------- running and killing
def start(args: list[str], log: Path, kill_at: str | None = None) -> subprocess.Popen:
    """`python -m picochat ARGS` with its stderr in `log`; kill_at="STAGE:STEP" makes it SIGKILL itself there."""
    env = {k: v for k, v in os.environ.items() if k != KILL_HOOK} | {"OMP_NUM_THREADS": "1"}
    if kill_at:
        env[KILL_HOOK] = kill_at
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "picochat", *args], stdout=subprocess.DEVNULL, stderr=err,
                                env=env)


def run(args: list[str], log: Path, kill_at: str | None = None) -> str:
    """Run to the end (or to its kill at kill_at); returns its stderr."""
    proc = start(args, log, kill_at)
    code = proc.wait(timeout=120)
    err = log.read_text()
    if kill_at:
        assert code == -signal.SIGKILL, f"not killed at {kill_at} (exit code {code}):\n{err[-2000:]}"
    else:
        assert code == 0, err[-2000:]
    return err


def kill_at_random(args: list[str], log: Path, metrics: Path, delay: float) -> bool:
    """Start a run, SIGKILL it `delay` seconds after it began training (after it rewrote metrics.jsonl);
    False if it finished first."""
    before = metrics.stat().st_ino if metrics.exists() else None
    proc = start(args, log)
    deadline = time.monotonic() + 120
    while proc.poll() is None and (not metrics.exists() or metrics.stat().st_ino == before):
        assert time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is not None:
        assert proc.returncode == 0, log.read_text()[-2000:]
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return True


# ----------------------------------------------------------------------------- what a run left
def records(out) -> dict[int, dict]:
    """The step records (with a loss) of a run's metrics.jsonl, by step."""
    return {r["step"]: r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r}


def losses(out) -> dict[int, float]:
    return {step: r["loss"] for step, r in records(out).items()}


def continued_from(before: dict, after: dict) -> int:
    """The step a resumed run continued from. It keeps the killed run's records up to its checkpoint
    as they were (timings and all) and writes new ones after it, so the kept records are a prefix."""
    kept = [step for step in sorted(after) if after[step] == before.get(step)]
    assert kept == list(range(1, len(kept) + 1)), f"kept records of steps {kept}: not a prefix"
    return len(kept)


def step_folders(out) -> list[str]:
    return sorted(p.name for p in Path(out).glob("step_*"))


def newest_complete(out) -> int:
    """Where the next --resume must continue, judged from the folder alone: the checkpoint `latest` names
    if that folder is there, else the newest step_* folder (a kill mid-save), else none (0)."""
    latest = Path(out) / "latest"
    named = latest.read_text().strip() if latest.is_file() else None
    if named and (Path(out) / named).is_dir():
        return int(named[5:])
    return int(step_folders(out)[-1][5:]) if step_folders(out) else 0


def assert_finished_cleanly(out, expected: dict[int, float], last_steps: list[str]):
    """The run's metrics hold each step once, whole, with the reference's loss; `latest` names the last
    checkpoint, which loads; only the kept checkpoints are left, and nothing hidden."""
    text = (Path(out) / "metrics.jsonl").read_text()
    lines = text.splitlines()
    assert text.endswith("\n") and all(json.loads(line) for line in lines)  # no torn line
    steps = [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)), "a step's record is repeated"
    assert losses(out) == expected  # float32 on one thread: bit for bit
    assert step_folders(out) == last_steps
    assert (Path(out) / "latest").read_text().strip() == last_steps[-1]
    assert [p.name for p in Path(out).iterdir() if p.name.startswith(".")] == []
    assert find_checkpoint(None, out) == Path(out) / last_steps[-1]
    load(str(out), dtype=torch.float32)  # what chat and serve load (a LoRA run: its base + adapter)


# ----------------------------------------------------------------------------- pre-training
def test_kills_at_every_stage_of_a_checkpoint_write_lose_nothing(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    expected = reference(train_args(data_dir, tmp_path / "reference", 12))
    args = train_args(data_dir, out, 12)
    resume = [*args, "--resume"]

    # 1. killed after step_000002/ was renamed into place, before the first `latest` was written
    run(args, tmp_path / "1.log", kill_at="after_rename:2")
    assert step_folders(out) == ["step_000002"] and not (out / "latest").exists()
    before = records(out)
    # a new run there would clobber that checkpoint: refused
    assert cli.main(args) == 1 and step_folders(out) == ["step_000002"]

    # 2. --resume continues from it, and says so; killed in the middle of writing step_000006 (its
    # weights written, not the rest)
    err = run(resume, tmp_path / "2.log", kill_at="after_weights:6")
    assert "has no 'latest' file" in err and "resuming from" in err and "step_000002" in err
    assert continued_from(before, records(out)) == 2
    assert step_folders(out) == ["step_000002", "step_000004"] and (out / ".step_000006.tmp").is_dir()
    assert newest_complete(out) == 4 and load_checkpoint_state(find_checkpoint(None, out))[3]["step"] == 4
    # the killed process was writing metrics too: a last line without its newline
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 3.9')
    before = records(out)

    # 3. resumed from the older step_000002 on purpose, and killed while replacing step_000004 with a
    # new save: `latest` names a folder that is not there
    run([*args, "--resume", str(out / "step_000002")], tmp_path / "3.log", kill_at="replacing:4")
    assert continued_from(before, records(out)) == 2
    assert not (out / ".step_000006.tmp").exists()  # its start removed the half-written checkpoint
    assert step_folders(out) == ["step_000002"] and (out / "latest").read_text() == "step_000004\n"
    before = records(out)

    # 4. --resume falls back to the newest complete checkpoint and says so; killed after the run's last
    # save, while deleting the old checkpoints
    with pytest.warns(CheckpointWarning, match="names step_000004, which is missing"):
        assert find_checkpoint(None, out) == out / "step_000002"
    err = run(resume, tmp_path / "4.log", kill_at="pruning:12")
    assert "names step_000004, which is missing" in err and "resuming from" in err
    assert continued_from(before, records(out)) == 2
    assert (out / "latest").read_text() == "step_000012\n" and (out / ".step_000008.old").is_dir()

    # 5. resuming the finished run trains nothing and reports how it ended
    capsys.readouterr()
    assert cli.main(resume) == 0
    assert capsys.readouterr().out.strip() == str(out / "step_000012")
    assert_finished_cleanly(out, expected, ["step_000010", "step_000012"])


def test_kills_at_random_moments_lose_nothing(data_dir, tmp_path):
    """Seeded delays; where they land (a step, a checkpoint write, the end) depends on the machine's speed."""
    expected = reference(train_args(data_dir, tmp_path / "reference", 40))
    out = tmp_path / "run"
    args = train_args(data_dir, out, 40)
    rng = random.Random(1234)
    kills = 0
    for attempt in range(2):
        resuming = bool(step_folders(out))
        before = records(out)
        step = newest_complete(out)
        if not kill_at_random([*args, "--resume"] if resuming else args, tmp_path / f"{attempt}.log",
                              out / "metrics.jsonl", rng.uniform(0.0, 0.3)):
            break
        kills += 1
        if resuming:  # it continued from the newest complete checkpoint, or was killed before it said where
            now = records(out)
            assert not now or max(now) <= step or continued_from(before, now) == step
        if newest_complete(out):  # what the next run will continue from is whole
            assert load_checkpoint_state(out / f"step_{newest_complete(out):06d}")[3]["step"] > 0
    assert kills > 0, "every run finished before its kill: the delays are too long for this machine"
    before, step = records(out), newest_complete(out)
    assert cli.main([*args, "--resume"] if step_folders(out) else args) == 0  # no kill: in this process
    assert continued_from(before, records(out)) == step
    assert_finished_cleanly(out, expected, ["step_000038", "step_000040"])


# ----------------------------------------------------------------------------- fine-tuning
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny random Llama-style model with picochat's chat tokenizer, as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("kill-sft") / "base"
    tok = Tokenizer.train(["the cat sat on the mat and the dog saw a red ball, hello how can I help?"] * 30,
                          vocab_size=330)
    torch.manual_seed(0)
    config = ModelConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64, max_seq_len=64)
    save_hf_folder(GPT(model_config_for(tok, config, TrainConfig())), folder, tok)
    return folder


def test_a_lora_fine_tuning_killed_mid_checkpoint_continues_exactly(base_dir, tmp_path):
    answers = ["the cat sat on the mat.", "the dog saw a red ball.", "hello, how can I help?"]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i % 3}"},
                                                     {"role": "assistant", "content": answers[i % 3]}]}) + "\n"
                            for i in range(30)))

    def args(out):
        return ["sft", "-m", str(base_dir), "--data", str(data), "--out-dir", str(out), *SFT_FLAGS]
    expected = reference(args(tmp_path / "reference"))
    out = tmp_path / "run"
    run(args(out), tmp_path / "1.log", kill_at="after_weights:6")  # the adapter written, not the optimizer
    assert (out / ".step_000006.tmp" / "adapter_model.safetensors").is_file()
    assert not (out / ".step_000006.tmp" / "optimizer.safetensors").exists()
    assert step_folders(out) == ["step_000002", "step_000004"] and newest_complete(out) == 4
    before = records(out)
    assert cli.main([*args(out), "--resume"]) == 0
    assert continued_from(before, records(out)) == 4
    assert_finished_cleanly(out, expected, ["step_000006", "step_000008"])
    assert (out / "step_000008" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- `latest` and damaged checkpoints
@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    """A run with checkpoints at steps 2, 4 and 6 (all kept)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main([*train_args(data_dir, out, 6), "--keep-last", "0"]) == 0
    return out


def test_latest_never_leads_outside_the_run(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    shutil.copytree(finished_run / "step_000006", tmp_path / "elsewhere")  # a complete checkpoint outside
    (run_dir / "step_000009").symlink_to(tmp_path / "elsewhere")
    for name in ["../elsewhere", str(tmp_path / "elsewhere"), "step_000006/../../elsewhere", "step_000009", ""]:
        (run_dir / "latest").write_text(name + "\n")
        with pytest.raises(CheckpointError, match="not a checkpoint folder inside"):
            find_checkpoint(None, run_dir)
    assert checkpoint_folders(run_dir) == [run_dir / f"step_00000{i}" for i in (2, 4, 6)]  # not the link


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    weights = run_dir / "step_000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # torn (a copy or a disk that lost its tail)
    with pytest.raises(CheckpointError, match="model.safetensors is missing or truncated"):
        find_checkpoint(run_dir / "step_000006")  # named explicitly: refused, not loaded
    with pytest.warns(CheckpointWarning, match="names step_000006, which is incomplete"):
        assert find_checkpoint(None, run_dir) == run_dir / "step_000004"
    shutil.rmtree(run_dir / "step_000002")
    shutil.rmtree(run_dir / "step_000004")
    with pytest.raises(CheckpointError, match="no other complete checkpoint"):
        find_checkpoint(None, run_dir)
