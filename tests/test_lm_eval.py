"""lm-evaluation-harness runs picochat (picochat/eval/lm_eval_plugin.py) on three local-file tasks — multiple choice,
perplexity (loglikelihood_rolling) and generate_until — through its Python API and its command line, offline.
The harness's numbers are LocalModel's, and those are transformers' for the same tiny random model."""
import json
import math
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch
import yaml

from picochat.engine.engine import Engine
from picochat.engine.sampling import SamplingParams
from picochat.backends import LocalModel, split_tokens
from picochat.eval.lm_eval_plugin import PicochatLM, cut_at_stops, sampling_params
from picochat.load import load

from helpers import save_tiny_folder

TEXT = ("The sun rises in the east and sets in the west. Water boils at one hundred degrees. "
        "Paris is the capital of France. Cats and dogs are animals; a rose is a flower.\n") * 20
QUESTIONS = [
    {"question": "Where does the sun rise?", "choices": ["east", "west", "north"], "answer": 0},
    {"question": "What is the capital of France?", "choices": ["Rome", "Paris", "a rose", "Berlin"], "answer": 1},
    {"question": "Which one is an animal?", "choices": ["water", "cats"], "answer": 1},
    {"question": "At what does water boil?", "choices": ["one hundred degrees", "zero", "ten"], "answer": 0},
]
DOCUMENTS = ["Cats and dogs are animals.", "The sun sets in the west; water boils at one hundred degrees.",
             "你好，世界。 A rose is a flower."]
PROMPTS = ["The sun rises", "Paris is", "Cats and"]
MAX_GEN = 12
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random picochat model with a trained tokenizer, saved as a HF folder."""
    return save_tiny_folder(tmp_path_factory.mktemp("tiny"), TEXT)


@pytest.fixture(scope="module")
def local(tiny_dir):
    """picochat's own evaluation model on the folder, as the plugin loads it."""
    loaded = load(str(tiny_dir), dtype="float32")
    return LocalModel(Engine(loaded.model, loaded.tokenizer), batch_size=4)


@pytest.fixture(scope="module")
def stop(local):
    """A stop string that cuts a greedy continuation short (an ASCII character after its first), which prompt that
    is, and the prompts' greedy continuations uncut."""
    full = [t for [t] in local.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_GEN))]
    for i, text in enumerate(full):
        cuts = [c for c in text[1:] if c.isascii() and c.isprintable() and not c.isspace()]
        if cuts:
            return cuts[0], i, full
    pytest.fail(f"no greedy continuation to cut: {full}")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, stop):
    """Three lm-eval tasks as YAML, each reading a JSONL file next to it (datasets' packaged json builder)."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    until, cut, full = stop
    answers = ["no"] * len(PROMPTS)
    answers[cut] = full[cut].split(until)[0]   # the generation that is cut matches its reference
    data = {"mc": QUESTIONS, "ppl": [{"text": t} for t in DOCUMENTS],
            "gen": [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers)]}
    configs = {
        "mc": {"output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
               "doc_to_choice": "choices", "doc_to_target": "answer",
               "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
        "ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                {"metric": "bits_per_byte"}]},
        "gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": [until], "max_gen_toks": MAX_GEN, "do_sample": False},
                "metric_list": [{"metric": "exact_match"}]},
    }
    for name, config in configs.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in data[name]))
        task = {"task": f"tiny_{name}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
                "test_split": "test", **config, "metadata": {"version": 1}}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, allow_unicode=True))
    return folder


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """No hub, and datasets' cache in a temporary folder, for this module's runs (and its subprocess)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**OFFLINE, "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("hf_datasets"))}.items():
            mp.setenv(key, value)
        yield dict(os.environ)


@pytest.fixture(scope="module")
def evaluated(tiny_dir, tasks_dir, offline_env):
    """lm_eval.simple_evaluate on the three tasks, samples logged."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    return lm_eval.simple_evaluate(model="picochat", model_args=f"pretrained={tiny_dir},dtype=float32,batch_size=4",
                                   tasks=["tiny_mc", "tiny_ppl", "tiny_gen"], log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    """The same folder as transformers loads it."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def transformers_logprob(hf_model, context_ids: list[int], continuation_ids: list[int]) -> float:
    """Σ log p(continuation | context) from transformers: log_softmax of the logits at the positions before each
    continuation token."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([context_ids + continuation_ids])).logits[0].double()
    logp = torch.log_softmax(logits[len(context_ids) - 1:-1], dim=-1)
    return logp.gather(1, torch.tensor(continuation_ids)[:, None]).sum().item()


def mc_requests(samples) -> tuple[list[tuple[str, str]], list[float]]:
    """The (context, continuation) pairs lm-eval asked about, and the log-likelihoods picochat answered."""
    pairs, lls = [], []
    for sample in samples:
        for args, [(ll, _greedy)] in zip(sample["arguments"], sample["resps"]):
            pairs.append(tuple(args))
            lls.append(float(ll))
    return pairs, lls


def test_the_entry_point_names_the_plugin_class():
    """pyproject.toml's entry point is installed (`pip install -e .`) and loads PicochatLM; importing the plugin
    keeps lm-eval's own models registered."""
    from lm_eval.api.registry import get_model, model_registry
    [entry_point] = [e for e in metadata.entry_points(group="lm_eval.models") if e.name == "picochat"]
    assert entry_point.load() is PicochatLM
    assert get_model("picochat") is PicochatLM and "hf" in model_registry


def test_simple_evaluate_gives_sane_results(evaluated):
    results = evaluated["results"]
    mc, ppl, gen = results["tiny_mc"], results["tiny_ppl"], results["tiny_gen"]
    assert 0 <= mc["acc,none"] <= 1 and 0 <= mc["acc_norm,none"] <= 1
    assert evaluated["n-samples"]["tiny_mc"]["effective"] == len(QUESTIONS)
    assert 1 < ppl["word_perplexity,none"] < math.inf and 0 < ppl["bits_per_byte,none"] < 20
    assert ppl["byte_perplexity,none"] == pytest.approx(2 ** ppl["bits_per_byte,none"])
    assert gen["exact_match,none"] == pytest.approx(1 / 3)
    assert evaluated["config"]["model_format"] == "hf" and evaluated["config"]["model_dtype"] == "float32"


def test_multiple_choice_loglikelihoods_are_picochats_and_transformers(evaluated, local, hf_model):
    samples = evaluated["samples"]["tiny_mc"]
    pairs, lls = mc_requests(samples)
    assert len(pairs) == sum(len(q["choices"]) for q in QUESTIONS)
    assert pairs[0] == ("Question: Where does the sun rise?\nAnswer:", " east")
    assert lls == pytest.approx([ll for ll, _ in local.loglikelihood(pairs)], abs=1e-6)
    want = [transformers_logprob(hf_model, *split_tokens(local.tokenizer, c, x)) for c, x in pairs]
    assert lls == pytest.approx(want, abs=1e-4)
    acc = sum(max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) == s["target"] for s in samples)
    assert evaluated["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc / len(samples))


def test_rolling_loglikelihoods_are_transformers(evaluated, local, hf_model):
    samples = evaluated["samples"]["tiny_ppl"]
    got = [float(s["resps"][0][0]) for s in samples]
    want = [transformers_logprob(hf_model, *split_tokens(local.tokenizer, "", t)) for t in DOCUMENTS]
    assert got == pytest.approx(want, abs=1e-4)


def test_generate_until_stops_at_until(evaluated, stop):
    until, cut, full = stop
    got = [s["resps"][0][0] for s in evaluated["samples"]["tiny_gen"]]
    assert got == [t.split(until)[0] for t in full]   # greedy, cut where the stop string first appears
    assert len(got[cut]) < len(full[cut]) and all(until not in g for g in got)


def test_the_lm_eval_command_line_runs_picochat(tiny_dir, tasks_dir, offline_env, evaluated, tmp_path):
    """lm-eval's own command line, as `python -m picochat.eval.lm_eval_plugin` runs it: `--model picochat` resolves
    through the installed entry point (lm-eval 0.4.x reads none by itself), same numbers as in-process."""
    command = [sys.executable, "-m", "picochat.eval.lm_eval_plugin", "--model", "picochat",
               "--model_args", f"pretrained={tiny_dir},dtype=float32", "--tasks", "tiny_mc",
               "--include_path", str(tasks_dir), "--output_path", str(tmp_path)]
    done = subprocess.run(command, env=offline_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = tmp_path.rglob("results_*.json")
    results = json.loads(path.read_text())["results"]["tiny_mc"]
    assert results["acc,none"] == evaluated["results"]["tiny_mc"]["acc,none"]
    assert results["acc_norm,none"] == evaluated["results"]["tiny_mc"]["acc_norm,none"]


def test_a_packaged_model_by_name(smollm2_path):
    """pretrained=smollm2 (the packaged default model) through lm-eval's registry: it prefers the right answer,
    and generate_until stops at its stop string."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    name = "smollm2" if "PICOCHAT_SMOLLM2_GGUF" not in os.environ else smollm2_path  # the name finds the cache's copy
    lm = get_model("picochat").create_from_arg_string(f"pretrained={name}", {"batch_size": 2})
    context = "The capital of France is"
    requests = [Instance("loglikelihood", {}, (context, choice), 0) for choice in (" Paris", " Rome")]
    [(paris, _), (rome, _)] = lm.loglikelihood(requests)
    assert paris > rome
    settings = {"until": ["."], "max_gen_toks": 24, "do_sample": False}
    [reply] = lm.generate_until([Instance("generate_until", {}, (context, settings), 0)])
    assert reply.strip() and "." not in reply
    assert lm.get_model_info()["model_format"] == "gguf"


def test_generation_settings_follow_lm_evals_reading():
    greedy = sampling_params({"until": ["\n\n", ""], "max_gen_toks": 5, "do_sample": False, "temperature": 0.8},
                             256, seed=1)
    assert (greedy.stop, greedy.max_new_tokens, greedy.temperature) == (["\n\n"], 5, 0.0)
    assert sampling_params({"until": "Q:"}, 256, seed=1).stop == ["Q:"]
    assert sampling_params({"do_sample": True}, 256, seed=1).temperature == 1.0
    sampled = sampling_params({"temperature": 0.5, "top_p": 0.9, "max_new_tokens": 7}, 256, seed=3)
    assert (sampled.temperature, sampled.top_p, sampled.max_new_tokens, sampled.seed) == (0.5, 0.9, 7, 3)
    with pytest.raises(ValueError, match="num_beams"):
        sampling_params({"num_beams": 4}, 256, seed=1)
    with pytest.raises(ValueError, match="min_p"):
        sampling_params({"min_p": 0.1}, 256, seed=1)
    assert cut_at_stops("a. b\nc", ["\n", ". "]) == "a"
