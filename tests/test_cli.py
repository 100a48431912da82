"""The `picochat` command: generate, chat, info, and clear one-line errors for bad input."""
import io
import subprocess
import sys

import pytest
import torch

from picochat import cli
from picochat.engine.engine import Engine
from picochat.engine.sampling import SamplingParams
from picochat import hub
from picochat.load import load

from helpers import save_tiny_folder

TEXT = "Hello there! How are you today? I am fine, thank you. 你好，世界。\n" * 30


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random picochat model with a trained tokenizer, saved as a HF folder."""
    return save_tiny_folder(tmp_path_factory.mktemp("tiny"), TEXT)


def run(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_the_engines_greedy_text(tiny_dir, capsys):
    code, out, err = run(["generate", "Hello there", "-m", str(tiny_dir), "--temperature", "0",
                          "--max-new-tokens", "12", "--dtype", "float32"], capsys)
    assert code == 0
    loaded = load(str(tiny_dir), dtype=torch.float32)
    engine = Engine(loaded.model, loaded.tokenizer)
    ids = loaded.tokenizer.encode("Hello there", add_special_tokens=True)
    want = engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=12)).text
    assert out == want + "\n"


def test_generate_reads_stdin_and_verbose_reports_speed(tiny_dir, capsys, monkeypatch):
    code, out, err = run(["generate", "-", "-m", str(tiny_dir), "--chat", "--max-new-tokens", "5", "-v",
                          "--seed", "1"], capsys, stdin="How are you?", monkeypatch=monkeypatch)
    assert code == 0
    assert "tok/s" in err and "first token" in err and "prompt tokens" in err


def test_chat_repl_commands_and_turns(tiny_dir, capsys, monkeypatch):
    script = "\n".join(["/help", "/set temperature 0", "/set top_p 2", "/set", "/system Be brief.",
                        "Hello!", "How are you?", "/clear", "/bogus", "/exit"]) + "\n"
    code, out, err = run(["chat", "-m", str(tiny_dir), "--max-new-tokens", "4"], capsys, stdin=script,
                         monkeypatch=monkeypatch)
    assert code == 0
    assert "/system TEXT" in out                       # help
    assert "[temperature = 0.0]" in out
    assert "not changed: top_p must be in (0, 1]" in out
    assert "temperature=0.0" in out                    # /set alone lists the settings
    assert "[system prompt set; conversation cleared]" in out
    assert "[conversation cleared]" in out
    assert "unknown command /bogus" in out


def test_chat_ends_cleanly_at_end_of_input(tiny_dir, capsys, monkeypatch):
    code, _, _ = run(["chat", "-m", str(tiny_dir)], capsys, stdin="", monkeypatch=monkeypatch)
    assert code == 0


def test_chat_history_reaches_the_prompt_and_reuses_the_cache(tiny_dir, monkeypatch, capsys):
    seen = []
    real = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, ids, params=None: seen.append((self, list(ids)))
                        or real(self, ids, params))
    code, _, err = run(["chat", "-m", str(tiny_dir), "--max-new-tokens", "3", "--system", "S", "-v"], capsys,
                       stdin="first\nsecond\n", monkeypatch=monkeypatch)
    assert code == 0 and len(seen) == 2
    engine, (_, first_ids), (_, second_ids) = seen[0][0], seen[0], seen[1]
    text = engine.tokenizer.decode(second_ids)
    assert text.index("S") < text.index("first") < text.index("second")
    assert second_ids[:len(first_ids)] == first_ids       # the second prompt extends the first ...
    assert err.count("cached)") == 1                      # ... so its first turn's tokens were not computed again


def test_info_on_a_folder(tiny_dir, capsys):
    code, out, _ = run(["info", str(tiny_dir)], capsys)
    assert code == 0
    assert "llama" in out and "chat template      yes" in out and "context length     128" in out


def test_info_on_the_default_gguf(smollm2_path, capsys):
    code, out, _ = run(["info", str(smollm2_path)], capsys)
    assert code == 0
    assert "210 × Q4_1" in out and "134.5M" in out and "context length     8192" in out


@pytest.mark.parametrize("content,expect", [
    (b"", "empty"),
    (b"PK\x03\x04 not a gguf", "not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00", "truncated"),
])
def test_bad_files_give_one_clear_line(tmp_path, capsys, content, expect):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    code, out, err = run(["generate", "hi", "-m", str(bad)], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.startswith("picochat: error:") and str(bad) in err and expect in err


def test_bad_folders_give_one_clear_line(tmp_path, capsys, tiny_dir):
    code, _, err = run(["info", str(tmp_path)], capsys)
    assert code == 1 and "no config.json" in err
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run(["generate", "x", "-m", str(tmp_path)], capsys)
    assert code == 1 and "not valid JSON" in err
    code, _, err = run(["chat", "-m", str(tmp_path / "missing")], capsys)
    assert code == 1 and "no model at" in err


def test_missing_default_model_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "_installed_part", lambda part: None)
    code, _, err = run(["generate", "hi"], capsys)
    assert code == 1 and "picochat pull" in err


def test_smollm2_answers_paris_through_the_command(smollm2_path):
    """The default model end to end, as a user runs it (bfloat16, greedy)."""
    result = subprocess.run([sys.executable, "-m", "picochat.cli", "generate", "--chat", "--temperature", "0",
                             "-m", str(smollm2_path), "What is the capital of France?"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_a_training_run_folder_opens_its_newest_checkpoint(tiny_dir, tmp_path, capsys):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_dir, run_dir / "step_000010")
    (run_dir / "latest").write_text("step_000010\n")
    assert hub.resolve(str(run_dir)) == run_dir / "step_000010"
    code, out, _ = run(["info", str(run_dir)], capsys)
    assert code == 0 and "step_000010" in out


def test_info_system_says_what_was_chosen_for_this_cpu(capsys):
    code, out, _ = run(["info", "--system"], capsys)
    assert code == 0
    for key in ("cpu", "torch", "features", "matrix products", "float weights", "training autocast",
                "quantized kernel"):
        assert key in out, key
    assert ("float32" in out or "bfloat16" in out) and "GFLOP/s" in out


def test_quantize_writes_a_packed_model_and_measures_its_cost(tiny_dir, tmp_path, capsys):
    from picochat import kernels
    if not kernels.available():
        pytest.skip(f"no compiled kernel: {kernels.status()}")
    text = tmp_path / "held-out.txt"
    text.write_text(TEXT * 4)
    out_dir = tmp_path / "q4"
    code, out, err = run(["quantize", str(tiny_dir), "--to", "int4", "--out", str(out_dir), "--eval", str(text)],
                         capsys)
    assert code == 0 and out.strip() == str(out_dir)
    assert "bits per byte" in err and "float32" in err and "int4" in err
    loaded = load(str(out_dir))
    assert loaded.format == "packed" and loaded.weights == "quantized"
    ids = loaded.tokenizer.encode("Hello there!")
    assert Engine(loaded.model, loaded.tokenizer).complete(ids, SamplingParams(temperature=0, max_new_tokens=5)).token_ids
    code, out, _ = run(["info", str(out_dir)], capsys)
    assert code == 0 and "packed folder" in out and "4-bit" in out


def test_draft_and_prompt_bits_flags(tiny_dir, tmp_path, capsys):
    """--draft off|ngram|MODEL write what plain greedy decoding writes; a draft that is not there, or has
    another tokenizer, and a --prompt-bits out of its choices get one clear line."""
    args = ["generate", "Hello there", "-m", str(tiny_dir), "--temperature", "0", "--max-new-tokens", "12"]
    outs = [run(args + ["--draft", d], capsys)[:2] for d in ("off", "ngram", str(tiny_dir))]
    assert outs[0][0] == 0 and outs[0] == outs[1] == outs[2]
    code, _, err = run(args + ["--draft", str(tmp_path / "missing")], capsys)
    assert code == 1 and err.startswith("picochat: error:") and "no model at" in err and "Traceback" not in err
    other = save_tiny_folder(tmp_path / "other", "a completely different text about boats and rivers " * 50)
    code, _, err = run(args + ["--draft", str(other)], capsys)
    assert code == 1 and "another tokenizer" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        cli.main(args + ["--prompt-bits", "4"])
    assert exit_.value.code == 2 and "--prompt-bits" in capsys.readouterr().err
