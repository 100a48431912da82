"""Speculative decoding on tiny random models: greedy output equals plain decoding token for token (drafts from
a model that agrees, one that mostly disagrees, and n-grams), sampling keeps the model's distribution, the KV
cache rolls back, the server's Batcher speculates for a lone request, and threads follow the idle cores."""
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from picochat import kernels
from picochat.engine.batcher import Batcher
from picochat.engine.engine import Engine
from picochat.engine.sampling import SamplingParams
from picochat.engine.speculative import NgramIndex, best_length, choose
from picochat.hw import IdleCores
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.serve.openai import timings_of
from picochat.tokenizer.bpe import Tokenizer

TEXT = ("def add(a, b):\n    return a + b\n\nThe cat sat on the mat. The dog sat on the log. "
        "自注意力机制使得模型能够捕捉长距离依赖关系。") * 20


def random_gpt(tok, seed: int, layers: int = 2) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=layers, n_head=4, n_kv_head=2, n_embd=64,
                         intermediate_size=128, max_seq_len=256, initializer_range=0.3)
    model = GPT(config).eval()
    return model.use_cpu_kernels() if kernels.available() else model


@pytest.fixture(scope="module")
def models():
    tok = Tokenizer.train([TEXT], vocab_size=320)
    return tok, random_gpt(tok, 0), random_gpt(tok, 1, layers=1)


def engines(models):
    tok, model, other = models
    return {"plain": Engine(model, tok, speculate=False),
            "ngram": Engine(model, tok),
            "same model as draft": Engine(model, tok, draft=model, draft_tokens=4),   # every guess right
            "disagreeing draft": Engine(model, tok, draft=other, draft_tokens=3)}     # guesses mostly wrong


PROMPTS = ["The cat sat on the mat. The cat sat on", "def add(a, b):\n    return a + b\n\ndef add(", "自注意力机制"]


def greedy(**kw):
    return SamplingParams(**{"temperature": 0, "stop_token_ids": [], "max_new_tokens": 40, **kw})


def test_greedy_speculation_equals_plain_decoding_token_for_token(models):
    tok = models[0]
    runs = {name: [e.complete(tok.encode(p), greedy()) for p in PROMPTS] for name, e in engines(models).items()}
    for name, gens in runs.items():
        assert [g.token_ids for g in gens] == [g.token_ids for g in runs["plain"]], name
        assert [g.text for g in gens] == [g.text for g in runs["plain"]], name
    same = runs["same model as draft"]
    assert sum(g.stats.drafted.get("model", 0) for g in same) > 0
    assert all(g.stats.accepted.get(s, 0) == n for g in same for s, n in g.stats.drafted.items() if s == "model")
    assert sum(g.stats.model_passes for g in same) < sum(g.stats.decode_steps for g in same)  # several per pass
    wrong = runs["disagreeing draft"]
    drafted = sum(sum(g.stats.drafted.values()) for g in wrong)
    assert drafted > 0 and sum(sum(g.stats.accepted.values()) for g in wrong) < drafted   # rejections happened


def test_penalty_stops_logprobs_and_streaming_behave_as_plain(models):
    tok = models[0]
    params = dict(repetition_penalty=1.3, stop=["mat."], logprobs=2)
    out = {}
    for name, engine in engines(models).items():
        gens = [engine.generate(tok.encode(p), greedy(**params)) for p in PROMPTS]
        pieces = [list(g) for g in gens]
        out[name] = gens
        assert ["".join(p) for p in pieces] == [g.text for g in gens]
    for name, gens in out.items():
        for g, ref in zip(gens, out["plain"]):
            assert (g.token_ids, g.text, g.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason), name
            assert [x.token for x in g.logprobs] == [x.token for x in ref.logprobs]
            assert torch.allclose(torch.tensor([x.logprob for x in g.logprobs]),
                                  torch.tensor([x.logprob for x in ref.logprobs]), atol=1e-4)


def test_kv_cache_rolls_back_across_turns(models):
    """A chat's next turn reuses the cache a speculative turn left (rejected guesses cut off): the same
    tokens as a plain engine."""
    tok = models[0]
    results = {}
    for name in ("plain", "disagreeing draft", "ngram"):
        engine = engines(models)[name]
        ids, outs = tok.encode(PROMPTS[0]), []
        for _ in range(3):
            gen = engine.complete(ids, greedy(max_new_tokens=15))
            outs.append(gen.token_ids)
            ids = ids + gen.token_ids + tok.encode(" The dog")
        results[name] = outs
    assert results["disagreeing draft"] == results["plain"] == results["ngram"]


def test_sampled_speculation_is_reproducible_with_a_seed(models):
    tok = models[0]
    engine = engines(models)["disagreeing draft"]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=30, stop_token_ids=[])
    a = engine.complete(tok.encode(PROMPTS[1]), params).token_ids
    b = engine.complete(tok.encode(PROMPTS[1]), params).token_ids
    assert a == b and len(a) == 30


@pytest.mark.parametrize("draft_is_model", [True, False])
def test_accept_reject_keeps_the_models_distribution(draft_is_model):
    """Whatever the draft proposes, the token kept is distributed as p: min(1, p/q) acceptance and the
    residual norm(max(0, p − q)); for a one-hot (n-gram) guess, p(d) and p without d."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1])
    gen = SimpleNamespace(params=SamplingParams(temperature=1.0), generator=torch.Generator().manual_seed(0),
                          penalty_mask=lambda vocab: None, grammar_mask=lambda vocab: None)
    counts = torch.zeros(5)
    n = 20000
    draws = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(1))
    for i in range(n):
        guess = int(draws[i]) if draft_is_model else 1
        token, kept = choose(gen, p.log(), guess, q if draft_is_model else None)
        assert kept == (token == guess)
        counts[token] += 1
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 18.5, (counts / n, chi2)   # 4 degrees of freedom: p = 0.001


def test_ngram_index_proposes_what_followed_the_latest_match():
    index = NgramIndex()
    index.extend([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2, 3])
    assert index.propose(2) == [7, 8]          # the latest earlier "1 2 3" was followed by 7 8
    index.extend([7])
    assert index.propose(3) == [8, 1, 2]
    assert NgramIndex().propose(4) == []


def test_draft_length_follows_acceptance_and_cost():
    flat = lambda tokens: 1.0 + 0.05 * (tokens - 1)  # noqa: E731
    assert best_length(0.9, 8, flat, 0.0) == 8            # free, good guesses: as many as allowed
    assert best_length(0.05, 8, flat, 0.0) == 0           # bad guesses: a plain step
    assert 0 < best_length(0.8, 8, flat, 0.3) < 8         # a costly drafter stops earlier
    assert best_length(0.9, 8, lambda t: float(t), 0.0) == 0   # a pass as dear as its tokens: no gain


def test_a_lone_request_in_the_batcher_speculates_with_the_same_output(models):
    tok, model, _ = models
    plain = Engine(model, tok, speculate=False).complete(tok.encode(PROMPTS[1]), greedy())
    batcher = Batcher(Engine(model, tok, draft=model, draft_tokens=4), max_batch=4, start=False)
    request = batcher.submit(tok.encode(PROMPTS[1]), greedy(), lambda gen, piece: None)
    batcher.run(until_idle=True)
    batcher.close()
    gen = request.gen
    assert gen.token_ids == plain.token_ids
    assert gen.stats.model_passes < gen.stats.decode_steps and batcher.tokens_generated == len(gen.token_ids) - 1
    timings = timings_of(gen)
    assert timings.draft_n == sum(gen.stats.drafted.values()) > 0 and timings.tokens_per_pass > 1


def test_a_draft_with_another_vocabulary_is_refused(models):
    tok, model, _ = models
    config = model.config.replace(vocab_size=model.config.vocab_size + 16)
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(model, tok, draft=GPT(config))


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not os.path.exists("/proc/stat"), reason="needs 2 cores and /proc")
def test_threads_follow_the_cores_other_processes_leave_idle():
    limit = min(2, os.cpu_count())
    torch.set_num_threads(limit)
    cores = IdleCores(limit)
    cores.INTERVAL = 0.5
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.5)
        assert cores.update() == limit - 1 == torch.get_num_threads()
    finally:
        busy.kill()
        busy.wait()
    time.sleep(1.0)
    assert cores.update() == limit == torch.get_num_threads()


def test_sampled_speculation_draws_from_the_models_distribution(models):
    """End to end: the first three tokens sampled with a draft model that mostly disagrees (top-3, T = 1)
    follow the model's own joint distribution, computed exactly (chi-square over the 27 outcomes)."""
    tok, model, other = models
    engine = Engine(model, tok, draft=other, draft_tokens=2)
    prompt = tok.encode(PROMPTS[0])

    @torch.inference_mode()
    def top3(ids):
        logits = model(torch.tensor([ids]))[0][0, -1].float()
        values, index = logits.topk(3)
        return index.tolist(), torch.softmax(values, -1).tolist()

    exact = {}
    for a, pa in zip(*top3(prompt)):
        for b, pb in zip(*top3(prompt + [a])):
            for c, pc in zip(*top3(prompt + [a, b])):
                exact[(a, b, c)] = pa * pb * pc
    n, counts = 1500, {}
    for seed in range(n):
        gen = engine.complete(prompt, SamplingParams(temperature=1.0, top_k=3, seed=seed, max_new_tokens=3,
                                                     stop_token_ids=[]))
        key = tuple(gen.token_ids)
        assert key in exact, key
        counts[key] = counts.get(key, 0) + 1
    assert sum(gen.stats.drafted.values()) > 0
    chi2 = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in exact.items())
    assert chi2 < 54.1, chi2   # 26 degrees of freedom: p = 0.001
