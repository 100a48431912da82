"""Bits per byte on held-out text: the measure `picochat quantize` reports."""
import math

import torch
import torch.nn.functional as F

from picochat.model.config import ModelConfig
from picochat.eval.tasks import bits_per_byte, held_out_text
from picochat.model.gpt import GPT
from picochat.tokenizer.bpe import Tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 20


def test_bits_per_byte_is_the_loss_per_utf8_byte():
    tok = Tokenizer.train([TEXT], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                            intermediate_size=64, max_seq_len=64)).eval()
    ids = tok.encode(TEXT)
    got = bits_per_byte(model, tok, TEXT, window=40)
    nll, n, nbytes = 0.0, 0, 0
    lengths = tok.token_byte_lengths()
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 40):  # windows of 40 tokens, each predicted from its own window
            chunk = torch.tensor([ids[start:start + 41]])
            logits, _ = model(chunk[:, :-1])
            nll += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            n += chunk.shape[1] - 1
            nbytes += int(lengths[chunk[0, 1:]].sum())
    assert got.tokens == n == len(ids) - 1 and got.bytes == nbytes
    assert math.isclose(got.bits_per_byte, nll / (math.log(2) * nbytes), rel_tol=1e-6)
    assert 0 < got.bits_per_byte < 20


def test_held_out_text_takes_a_file_whole_and_caps_its_length(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(TEXT)
    assert held_out_text(str(path), chars=50) == TEXT[:50]


# ----------------------------------------------------------------------------- picochat eval
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from picochat.data.tokens import DataError  # noqa: E402
from picochat.engine.engine import Engine  # noqa: E402
from picochat.engine.sampling import SamplingParams  # noqa: E402
from picochat.backends import LocalModel, RemoteModel, split_tokens  # noqa: E402
from picochat.eval.tasks import (Question, read_questions, rouge_l, run_gen, run_humaneval, run_mc,  # noqa: E402
                                 validation_loss)
from picochat.formats.hf import save_hf_folder  # noqa: E402
from picochat.load import load

from helpers import LiveServer, tiny_engine  # noqa: E402

CHAT_TEXT = ("Question: What is the capital of France?\nAnswer: Paris\n\nQuestion: How many legs has a spider?\n"
             "Answer: eight\n\nThe sky is blue. Dogs bark. Cats purr. 1 2 3 4 5. ") * 20
PAIRS = [("Question: What is the capital of France?\nAnswer:", " Paris"),
         ("Question: What is the capital of France?\nAnswer:", " eight"),
         ("The sky is", " blue. Dogs bark."), ("", "Cats purr."), ("1 2 3 ", "4 5")]


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(CHAT_TEXT, vocab_size=320)


def test_loglikelihoods_equal_transformers(engine, tmp_path):
    """For a tiny random model, Σ log p(continuation | context) as transformers computes it, to 1e-4."""
    transformers = pytest.importorskip("transformers")
    save_hf_folder(engine.model, tmp_path, tokenizer=engine.tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    got = LocalModel(Engine(engine.model, engine.tokenizer)).loglikelihood(PAIRS)
    for (context, continuation), (logp, greedy) in zip(PAIRS, got):
        ctx, cont = split_tokens(engine.tokenizer, context, continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logits = hf(ids).logits[0].float().log_softmax(-1)
        rows = logits[len(ctx) - 1:-1]
        want = rows.gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert abs(logp - want) < 1e-4, (context, continuation)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())


def test_context_reuse_gives_the_same_scores(engine):
    """Scoring reuses the context's keys and values across choices: the numbers equal fresh ones."""
    fresh = [LocalModel(Engine(engine.model, engine.tokenizer)).loglikelihood([p])[0][0] for p in PAIRS]
    reused = LocalModel(Engine(engine.model, engine.tokenizer)).loglikelihood(PAIRS)
    assert [r[0] for r in reused] == pytest.approx(fresh, abs=1e-5)


def test_a_server_answers_the_same_questions_as_the_engine(engine):
    """RemoteModel through picochat's own server equals LocalModel on the same engine."""
    local = LocalModel(Engine(engine.model, engine.tokenizer), batch_size=1)   # one sequence at a time on
    with LiveServer(lambda: Engine(engine.model, engine.tokenizer), "tiny") as server:  # both sides, so that
        server.wait_loaded()                                                           # batching cannot flip a
        remote = RemoteModel(server.url, concurrency=1)                                # near-tie of a random model
        assert remote.name == "tiny"
        pairs = [p for p in PAIRS if p[0]]  # the server scores text; an empty context has nothing to score from
        for (a, ga), (b, gb) in zip(local.loglikelihood(pairs), remote.loglikelihood(pairs)):
            assert abs(a - b) < 1e-3 and ga == gb
        params = SamplingParams(temperature=0, max_new_tokens=8)
        prompts = ["The sky is", [{"role": "user", "content": "Hello"}]]
        assert remote.generate(prompts, params) == local.generate(prompts, params)


class Scripted:
    """An evaluation model whose scores and replies are fixed: checks the scoring, not a model."""
    name = "scripted"

    def __init__(self, scores=None, replies=None):
        self.scores, self.replies, self.asked = scores or {}, replies or [], []

    def loglikelihood(self, requests):
        self.asked += requests
        return [(self.scores.get(continuation.strip(), -10.0), False) for _, continuation in requests]

    def generate(self, prompts, params, n=1):
        return [[self.replies[i]] for i in range(len(prompts))]


def test_mc_accuracy_raw_normalised_and_chance():
    questions = [Question("Capital of France?", ["Paris", "London"], 0),
                 Question("Legs of a spider?", ["six", "eight and more"], 1),
                 Question("Colour of the sky?", ["blue", "green", "red"], 0)]
    # raw picks Paris (right), six (wrong: -5 > -9), blue (right); per byte, "eight and more" (-9/14) wins
    model = Scripted({"Paris": -1.0, "London": -3.0, "six": -5.0, "eight and more": -9.0, "blue": -2.0})
    rows = {r.metric: r.value for r in run_mc(model, questions, fewshot=1)}
    assert rows["accuracy"] == pytest.approx(2 / 3) and rows["accuracy_norm"] == pytest.approx(3 / 3)
    assert rows["chance"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
    context = model.asked[0][0]
    assert context.endswith("Question: Capital of France?\nAnswer:") and context.count("Question:") == 2


def test_gen_metrics():
    items = [("Q1", ["Paris"]), ("Q2", ["eight"]), ("Q3", ["the cat sat on the mat"])]
    model = Scripted(replies=["Paris.", "It has eight legs", "the cat sat on a mat"])
    rows = {r.metric: r.value for r in run_gen(model, items, SamplingParams(max_new_tokens=8))}
    assert rows["exact_match"] == pytest.approx(1 / 3) and rows["contains"] == pytest.approx(2 / 3)
    assert rows["rougeL"] == pytest.approx((1 + rouge_l("It has eight legs", ["eight"])
                                            + rouge_l("the cat sat on a mat", ["the cat sat on the mat"])) / 3)
    assert 0 < rouge_l("It has eight legs", ["eight"]) < 1


def test_bad_question_files_name_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "a", "choices": ["x", "y"], "answer": 1}\n{"question": "b", "choices": ["x"], '
                    '"answer": 0}\n')
    with pytest.raises(DataError, match="item 2"):
        read_questions(path)
    path.write_text('{"question": "a", "choices": ["x", "y"], "answer": 5}\n')
    with pytest.raises(DataError, match="answer"):
        read_questions(path)
    path.write_text('{"question": "a", "choices": ["x", "y"], "answer": "B"}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        read_questions(path)
    assert read_questions(path, limit=1)[0].answer == 1


def test_validation_loss_is_the_mean_loss_and_bits_per_byte(engine):
    tok = engine.tokenizer
    ids = torch.tensor([tok.encode(CHAT_TEXT)[:65]])
    x, y = ids[:, :-1], ids[:, 1:]
    lengths = torch.from_numpy(tok.token_byte_lengths())
    loss, bpb = validation_loss(engine.model, [(x, y)], lengths, torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        want = F.cross_entropy(engine.model(x)[0][0], y[0]).item()
    assert loss == pytest.approx(want, rel=1e-5)
    assert bpb == pytest.approx(want * 64 / (math.log(2) * int(lengths[y[0]].sum())), rel=1e-5)


def test_picochat_eval_command_writes_json(engine, tmp_path):
    folder = tmp_path / "model"
    save_hf_folder(engine.model, folder, tokenizer=engine.tokenizer)
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in [
        ("What is the capital of France?", ["Paris", "eight"], 0), ("How many legs has a spider?", ["Paris", "eight"], 1)]))
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "-m", "picochat", "eval", "-m", str(folder), "--task", "mc", "--data",
                          str(data), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert {r["metric"] for r in rows} == {"accuracy", "accuracy_norm", "chance"}
    assert all(r["task"] == "mc" and r["n"] == 2 and r["version"] for r in rows)
    assert "accuracy_norm" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "picochat", "eval", "-m", str(folder), "--task", "mc"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "needs --data" in bad.stderr and "Traceback" not in bad.stderr


def test_humaneval_task_through_an_evaluation_model():
    """run_humaneval asks the model for each problem and scores it in the sandbox: canonical answers pass,
    a wrong one fails; chat mode asks through messages and reads the fenced block."""
    from picochat.eval import humaneval
    problems = humaneval.load_problems(4)
    answers = {p.prompt: p.canonical_solution for p in problems}

    class Coder:
        name = "coder"

        def __init__(self, chat):
            self.chat, self.params = chat, None

        def generate(self, prompts, params, n=1):
            self.params = params
            out = []
            for prompt in prompts:
                text = prompt[0]["content"].split("\n\n", 1)[1] if self.chat else prompt
                body = answers[text] if "HumanEval/3" not in text and "below_zero" not in text else "    return None\n"
                out.append([f"```python\n{text}{body}```" if self.chat else body] * n)
            return out
    for chat in (False, True):
        coder = Coder(chat)
        rows = run_humaneval(coder, limit=4, chat=chat)
        assert [(r.metric, r.value, r.n) for r in rows] == [("pass@1", 0.75, 4)]
        assert (coder.params.stop == []) == chat and coder.params.temperature == 0


@pytest.mark.slow  # ~5 minutes on 2 cores, most of it transformers' generate
def test_humaneval_greedy_equals_transformers_generate(smollm2_path, limit=20):
    """The default model (float32 weights) writes the same greedy completions as transformers' generate with
    the same prompts, so pass@1 on the first 20 problems is the same."""
    transformers = pytest.importorskip("transformers")
    from picochat.eval import humaneval
    loaded = load(str(smollm2_path), dtype=torch.float32, quantized=False)
    ours = LocalModel(Engine(loaded.model, loaded.tokenizer), name="picochat")
    ours_rows = run_humaneval(ours, limit=limit, max_tokens=96)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                          torch_dtype=torch.float32).eval()

    class Transformers:
        name = "transformers"

        def generate(self, prompts, params, n=1):
            out = []
            for prompt in prompts:
                ids = torch.tensor([loaded.tokenizer.encode(prompt, add_special_tokens=True)])
                with torch.no_grad():
                    new = hf.generate(ids, max_new_tokens=params.max_new_tokens, do_sample=False)[0, ids.shape[1]:]
                text = loaded.tokenizer.decode(new.tolist(), skip_special_tokens=True)
                out.append([humaneval._cut_at_stop(text)])
            return out
    theirs_rows = run_humaneval(Transformers(), limit=limit, max_tokens=96)
    assert ours_rows[0].value == theirs_rows[0].value


def test_rolling_loglikelihood_uses_lm_eval_windows(engine, tmp_path):
    """A text several contexts long is scored in lm-evaluation-harness's windows: equal to transformers
    summing the same windows that lm_eval.utils builds."""
    transformers = pytest.importorskip("transformers")
    lm_utils = pytest.importorskip("lm_eval.utils")
    save_hf_folder(engine.model, tmp_path, tokenizer=engine.tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    text = CHAT_TEXT[:2500]
    prefix, ids = split_tokens(engine.tokenizer, "", text)
    assert len(ids) > 2 * engine.context_length
    want = 0.0
    for window in lm_utils.get_rolling_token_windows(ids, prefix[0], engine.context_length, 1):
        context, predicted = lm_utils.make_disjoint_window(window)
        full = torch.tensor([context + predicted])
        with torch.no_grad():
            logp = hf(full[:, :-1]).logits[0].float().log_softmax(-1)
        rows = logp[len(context) - 1:]
        want += rows.gather(1, torch.tensor(predicted)[:, None]).sum().item()
    got = LocalModel(Engine(engine.model, engine.tokenizer)).loglikelihood_rolling([text])[0]
    assert abs(got - want) < 1e-3
