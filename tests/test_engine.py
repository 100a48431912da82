"""The generation engine on a tiny random model: greedy equals a plain argmax loop, sampling rules, stops, streaming."""
import pytest
import torch

from picochat.model.config import ModelConfig
from picochat.engine.engine import Engine
from picochat.engine.sampling import SamplingParams, sample_next
from picochat.model.gpt import GPT
from picochat.tokenizer.bpe import Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. 自注意力机制使得模型能够捕捉长距离依赖关系。"
        "def f(x):\n    return x * 2  # 🎉\n") * 20


@pytest.fixture(scope="module")
def engine():
    tok = Tokenizer.train([TEXT], vocab_size=320)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                         intermediate_size=128, max_seq_len=96, initializer_range=0.3)
    return Engine(GPT(config), tok)


def prompt(engine):
    return engine.tokenizer.encode("The quick brown fox")


@torch.no_grad()
def reference_greedy(model, ids, n):
    ids = list(ids)
    for _ in range(n):  # no KV cache: the whole sequence every step
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids


def greedy(**kw):
    return SamplingParams(temperature=0, stop_token_ids=[], **kw)


def test_greedy_matches_plain_argmax_loop(engine):
    ids = prompt(engine)
    gen = engine.complete(ids, greedy(max_new_tokens=20))
    assert gen.token_ids == reference_greedy(engine.model, ids, 20)[len(ids):]
    assert gen.finish_reason == "length" and gen.stats.completion_tokens == 20


class ScriptedModel(torch.nn.Module):
    """Stands in for a GPT and always predicts the next token of a fixed script."""

    def __init__(self, config, script):
        super().__init__()
        self.config, self.script, self.prompt_len = config, script, None

    def new_kv_cache(self, batch_size=1, max_len=None):
        return GPT.new_kv_cache.__get__(GPT(self.config.replace(n_layer=1)))(batch_size, max_len)

    def forward(self, idx, kv_cache=None, last_only=False):
        if kv_cache.length == 0:
            self.prompt_len = idx.shape[1]
        T = idx.shape[1]
        kv_cache.lengths += T
        rows = 1 if last_only else T   # row j scores the position after fed token j
        logits = torch.zeros(1, rows, self.config.vocab_size)
        for j in range(rows):
            logits[0, j, self.script[kv_cache.length - rows + j + 1 - self.prompt_len]] = 1.0
        return logits, None


def test_streamed_pieces_join_to_the_text_and_never_split_a_character(engine):
    text = "自注意力机制 🎉👩‍👩‍👧 ok"
    script = engine.tokenizer.encode(text)
    assert len(script) > len(text) // 2  # multi-byte characters span several byte-level tokens
    scripted = Engine(ScriptedModel(engine.model.config, script + [0] * 5), engine.tokenizer)
    gen = scripted.generate(engine.tokenizer.encode("x"), greedy(max_new_tokens=len(script)))
    pieces = list(gen)
    assert "".join(pieces) == gen.text == text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 3
    # and random tokens (often invalid UTF-8) still join up to the full decode
    gen = engine.generate(engine.tokenizer.encode("自注意力"), greedy(max_new_tokens=40))
    assert "".join(gen) == engine.tokenizer.decode(gen.token_ids)


def test_seed_makes_sampling_reproducible(engine):
    ids = prompt(engine)
    p = dict(temperature=1.0, max_new_tokens=15, stop_token_ids=[])
    a = engine.complete(ids, SamplingParams(seed=7, **p)).token_ids
    b = engine.complete(ids, SamplingParams(seed=7, **p)).token_ids
    c = engine.complete(ids, SamplingParams(seed=8, **p)).token_ids
    assert a == b and a != c


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    ids = prompt(engine)
    want = engine.complete(ids, greedy(max_new_tokens=10)).token_ids
    for extra in (dict(top_k=1), dict(top_p=1e-6)):
        got = engine.complete(ids, SamplingParams(temperature=1.5, seed=3, max_new_tokens=10, stop_token_ids=[], **extra))
        assert got.token_ids == want


def test_top_k_and_top_p_keep_only_allowed_tokens():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(200)}
    assert seen == {0, 1}
    # probabilities ≈ .63 .23 .09 ...: top_p=0.8 keeps the first two only
    seen = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.8), g) for _ in range(200)}
    assert seen == {0, 1}


def test_repetition_penalty_changes_choice():
    logits = torch.tensor([2.0, 1.9, 0.0])
    assert sample_next(logits.clone(), SamplingParams(temperature=0), None) == 0
    assert sample_next(logits.clone(), SamplingParams(temperature=0, repetition_penalty=1.2), None,
                       context=torch.tensor([0])) == 1


def test_repetition_penalty_spares_the_end_of_turn_token(engine):
    # a model whose logits ignore the input: the stop token (in the prompt, as <|end|> is in every chat
    # prompt) scores 5, another token 4; a heavy penalty must not keep the reply from stopping
    config = ModelConfig(vocab_size=8, n_layer=1, n_head=2, n_kv_head=2, n_embd=8, intermediate_size=16,
                         max_seq_len=32, tie_word_embeddings=False)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.weight.fill_(1.0)           # every token's hidden state is all ones through the zeroed blocks
        for p in model.parameters():            # norm weights back to one
            if p.dim() == 1:
                p.fill_(1.0)
        model.lm_head.weight[5].fill_(5.0 / 8)
        model.lm_head.weight[4].fill_(4.0 / 8)
    e = Engine(model, engine.tokenizer)
    params = SamplingParams(temperature=0, max_new_tokens=3, stop_token_ids=[5], repetition_penalty=10.0)
    gen = e.complete([1, 5, 2, 5], params)
    assert gen.finish_reason == "stop" and gen.token_ids == []
    # ordinary tokens are still penalised (with no stop tokens, 5 is one)
    params = SamplingParams(temperature=0, max_new_tokens=1, stop_token_ids=[], repetition_penalty=10.0)
    assert e.complete([1, 4, 2], params).token_ids == [5]
    assert e.complete([1, 5, 2], params).token_ids == [4]


def test_stop_string_truncates_and_finishes(engine):
    ids = prompt(engine)
    full = engine.complete(ids, greedy(max_new_tokens=30)).text
    stop = full[8:11]
    assert len(stop) == 3
    gen = engine.complete(ids, greedy(max_new_tokens=30, stop=[stop]))
    assert gen.text == full[:full.index(stop)]
    assert gen.finish_reason == "stop"


def test_stop_token_ends_the_turn(engine):
    ids = prompt(engine)
    full = engine.complete(ids, greedy(max_new_tokens=10)).token_ids
    gen = engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[full[3]]))
    first = full.index(full[3])
    assert gen.token_ids == full[:first] and gen.finish_reason == "stop"


def test_stats_are_measured(engine):
    gen = engine.complete(prompt(engine), greedy(max_new_tokens=12))
    s = gen.stats
    assert s.prompt_tokens == len(prompt(engine)) and s.completion_tokens == 12
    assert s.time_to_first_token > 0 and s.tokens_per_s > 0 and s.decode_steps == 11


def test_generation_stops_at_the_context_length(engine):
    ids = engine.tokenizer.encode(TEXT)[:90]
    gen = engine.complete(ids, greedy(max_new_tokens=50))
    assert gen.stats.completion_tokens == 96 - 90 and gen.finish_reason == "length"


def test_bad_requests_are_clear_errors(engine):
    with pytest.raises(ValueError, match="context"):
        engine.generate(engine.tokenizer.encode(TEXT)[:200], greedy())
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], greedy())
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([1], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([1], SamplingParams(temperature=-1))


# ----------------------------------------------------------------------------- the batcher
import queue  # noqa: E402
import threading  # noqa: E402

from picochat.engine.batcher import Batcher, QueueFull  # noqa: E402


def collect(batcher, ids, params):
    """Submit and return (pieces, generation) once finished."""
    events, done = [], threading.Event()

    def on_event(gen, piece):
        if piece is None:
            done.set()
        else:
            events.append(piece)
    request = batcher.submit(ids, params, on_event)
    return events, done, request


def test_batched_generations_equal_one_at_a_time(engine):
    prompts = ["The quick", "自注意力", "def f(x):", "lazy dog. The quick brown", "fox", "x"]
    params = [greedy(max_new_tokens=n) for n in (12, 20, 5, 16, 9, 14)]
    params[1] = SamplingParams(temperature=0.9, seed=5, max_new_tokens=20, stop_token_ids=[])
    batcher = Batcher(engine, max_batch=3)
    runs = [collect(batcher, engine.tokenizer.encode(p), sp) for p, sp in zip(prompts, params)]
    for (events, done, request), p, sp in zip(runs, prompts, params):
        assert done.wait(60)
        want = engine.complete(engine.tokenizer.encode(p), sp)
        assert request.gen.token_ids == want.token_ids
        assert "".join(events) == request.gen.text == want.text
        assert request.gen.finish_reason == want.finish_reason
    assert batcher.tokens_generated > batcher.decode_steps  # some steps decoded several rows at once
    batcher.close()


def test_cancel_frees_the_row_and_ends_the_stream(engine):
    batcher = Batcher(engine, max_batch=1)
    ids = engine.tokenizer.encode("The quick")
    long_events, long_done, long_req = collect(batcher, ids, greedy(max_new_tokens=80))
    batcher.cancel(long_req)
    assert long_done.wait(30)
    assert long_req.gen.stats.completion_tokens < 80
    events, done, req = collect(batcher, ids, greedy(max_new_tokens=5))
    assert done.wait(30) and req.gen.stats.completion_tokens == 5
    batcher.close()


def test_full_queue_and_bad_requests_are_refused(engine):
    batcher = Batcher(engine, max_batch=1, max_queue=1, max_len=64)
    with pytest.raises(ValueError, match="context is 64"):
        batcher.submit(list(range(70)), greedy(), lambda g, e: None)
    gate = threading.Event()
    blocker = queue.Queue()
    # occupy the only row and the only queue place, then the next submit is refused
    batcher.submit(engine.tokenizer.encode("x"), greedy(max_new_tokens=60),
                   lambda g, e: gate.wait(10) if e is not None else blocker.put(1))
    with pytest.raises(QueueFull):
        for _ in range(3):
            batcher.submit(engine.tokenizer.encode("y"), greedy(max_new_tokens=2), lambda g, e: None)
    gate.set()
    batcher.close()
