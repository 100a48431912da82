"""Faults injected into the model, the sampler and the listeners of a running Batcher, at each stage
(admission, prefill, decode, finish, cancel): the failing request ends alone, with an error, and exactly
once; every other request finishes with the text it would have had without the fault."""
import collections
import threading

import pytest
import torch

from picochat.engine.batcher import Batcher
from picochat.engine.engine import Engine
from picochat.engine.sampling import SamplingParams

from helpers import WrappedModel, sampler_failing_on_seed, tiny_engine

TEXT = "The quick brown fox jumps over the lazy dog. Hello there, how are you today? " * 20
POISON_LENGTH = 40   # a prompt of this many tokens marks the request the injected model faults hit


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(TEXT, vocab_size=300, max_seq_len=128)


def greedy(n=12, **kw):
    return SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=[], **kw)


class Recorder:
    """on_event for one request: its pieces, and how many end events it got."""

    def __init__(self):
        self.pieces, self.ends, self.done = [], 0, threading.Event()

    def __call__(self, gen, piece):
        if piece is None:
            self.ends += 1
            self.done.set()
        else:
            self.pieces.append(piece)


def prompts(engine):
    """Three healthy prompts (shorter than POISON_LENGTH) and one poisoned prompt of POISON_LENGTH tokens."""
    healthy = [engine.tokenizer.encode(t) for t in ("The quick brown", "Hello there", "lazy dog.")]
    poisoned = engine.tokenizer.encode(TEXT)[:POISON_LENGTH]
    assert all(len(p) + 12 < POISON_LENGTH for p in healthy) and len(poisoned) == POISON_LENGTH
    return healthy, poisoned


def run_all(engine, batcher, healthy, poisoned, poisoned_params=None):
    """Submit the healthy prompts and the poisoned one together; wait; return their (request, recorder)s."""
    runs = []
    for ids, params in [(healthy[0], greedy()), (poisoned, poisoned_params or greedy()), *[(p, greedy()) for p in healthy[1:]]]:
        recorder = Recorder()
        runs.append((batcher.submit(ids, params, recorder), recorder))
    batcher.run(until_idle=True)
    for _, recorder in runs:
        assert recorder.done.is_set() and recorder.ends == 1, "every request gets exactly one end event"
    return runs


def assert_isolated(engine, runs, healthy):
    """The poisoned request (second) failed; the others equal an undisturbed generation."""
    (_, _), (bad, _), *_ = runs
    assert bad.gen.finish_reason.startswith("error: "), bad.gen.finish_reason
    good = [runs[0]] + runs[2:]
    for (request, recorder), ids in zip(good, healthy):
        want = engine.complete(ids, greedy())
        assert request.gen.token_ids == want.token_ids
        assert "".join(recorder.pieces) == request.gen.text == want.text
        assert request.gen.finish_reason == "length"


class FaultyModel(WrappedModel):
    """The real model, except that it raises (or returns NaN) on rows whose cache length says they belong
    to the poisoned request, at the chosen stage."""

    def __init__(self, model, stage: str, nan: bool = False):
        super().__init__(model)
        self.stage, self.nan = stage, nan

    def forward(self, idx, kv_cache=None, last_only=False, **kw):
        B, T = idx.shape
        lengths = kv_cache.lengths.tolist() if kv_cache is not None else [0] * B
        if self.stage == "prefill":
            poisoned = [T == POISON_LENGTH and lengths[b] == 0 for b in range(B)]
        else:  # decode: the poisoned row's cache is longer than any healthy row's
            poisoned = [T == 1 and lengths[b] >= POISON_LENGTH for b in range(B)]
        if any(poisoned) and not self.nan:
            raise RuntimeError(f"injected fault in {self.stage}")
        logits, loss = self.model(idx, kv_cache=kv_cache, last_only=last_only, **kw)
        for b, bad in enumerate(poisoned):
            if bad:
                logits[b] = float("nan")
        return logits, loss


@pytest.mark.parametrize("stage,nan", [("prefill", False), ("decode", False), ("decode", True)])
def test_a_model_fault_ends_only_its_request(engine, stage, nan):
    healthy, poisoned = prompts(engine)
    faulty = Engine(FaultyModel(engine.model, stage, nan), engine.tokenizer)
    batcher = Batcher(faulty, max_batch=4, start=False)
    runs = run_all(engine, batcher, healthy, poisoned)
    assert_isolated(engine, runs, healthy)
    if nan:
        assert "NaN" in runs[1][0].gen.finish_reason
    # the batcher goes on: a new request on the same batcher is served
    again = Recorder()
    request = batcher.submit(healthy[0], greedy(), again)
    batcher.run(until_idle=True)
    assert again.ends == 1 and request.gen.token_ids == engine.complete(healthy[0], greedy()).token_ids


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_a_sampler_fault_ends_only_its_request(engine, monkeypatch, stage):
    from picochat.engine import sampling as engine_module
    real = engine_module.sample_rows
    faulty = sampler_failing_on_seed(real, 666, after={"prefill": 0, "decode": 1}[stage])
    monkeypatch.setattr(engine_module, "sample_rows", faulty)
    healthy, poisoned = prompts(engine)
    batcher = Batcher(engine, max_batch=4, start=False)
    monkeypatch.setattr(engine_module, "sample_rows", real)   # the references below sample normally ...
    want = [engine.complete(ids, greedy()) for ids in healthy]
    monkeypatch.setattr(engine_module, "sample_rows", faulty)  # ... the batcher meets the fault
    runs = run_all(engine, batcher, healthy, poisoned, poisoned_params=greedy(seed=666))
    monkeypatch.setattr(engine_module, "sample_rows", real)
    assert "injected sampler fault" in runs[1][0].gen.finish_reason
    for (request, _), reference in zip([runs[0]] + runs[2:], want):
        assert request.gen.token_ids == reference.token_ids


def test_an_admission_fault_still_ends_the_request(engine, monkeypatch):
    """Today's hang: a request that fails while being admitted never got its end event."""
    healthy, poisoned = prompts(engine)
    batcher = Batcher(engine, max_batch=4, start=False)
    real = batcher.rows.take

    def faulty(prompt_ids, first, scoring=False):
        if len(prompt_ids) == POISON_LENGTH:
            raise MemoryError("injected admission fault")
        return real(prompt_ids, first, scoring)
    monkeypatch.setattr(batcher.rows, "take", faulty)
    runs = run_all(engine, batcher, healthy, poisoned)
    assert_isolated(engine, runs, healthy)


def test_a_finish_fault_still_ends_the_request(engine):
    healthy, poisoned = prompts(engine)
    batcher = Batcher(engine, max_batch=4, start=False)
    recorders, requests = [], []
    for ids in [healthy[0], poisoned, *healthy[1:]]:
        recorders.append(Recorder())
        requests.append(batcher.submit(ids, greedy(), recorders[-1]))

    def broken_finish():
        raise UnicodeError("injected finish fault")
    requests[1].gen.finish = broken_finish
    batcher.run(until_idle=True)
    assert [r.ends for r in recorders] == [1, 1, 1, 1]
    assert requests[1].gen.finish_reason.startswith("error: UnicodeError")
    assert_isolated(engine, list(zip(requests, recorders)), healthy)


def test_a_broken_listener_does_not_stop_the_batcher(engine):
    healthy, poisoned = prompts(engine)
    batcher = Batcher(engine, max_batch=4, start=False)

    def explode(gen, piece):
        raise ConnectionResetError("the client's socket is gone")
    batcher.submit(poisoned, greedy(), explode)
    runs = [(batcher.submit(ids, greedy(), rec := Recorder()), rec) for ids in healthy]
    batcher.run(until_idle=True)
    for (request, recorder), ids in zip(runs, healthy):
        assert recorder.ends == 1 and request.gen.token_ids == engine.complete(ids, greedy()).token_ids


@pytest.mark.parametrize("stage", ["waiting", "prefill", "decode"])
def test_cancel_at_each_stage_ends_exactly_once(engine, stage):
    healthy, poisoned = prompts(engine)
    batcher = Batcher(engine, max_batch=1, prefill_chunk=8, start=False)
    first, second = Recorder(), Recorder()
    running = batcher.submit(poisoned, greedy(n=30), first)
    queued = batcher.submit(healthy[0], greedy(), second)
    if stage == "waiting":
        batcher.cancel(queued)
    else:
        batcher.admit()
        batcher.prefill_step()   # one chunk of 8 in: still prefilling
        if stage == "decode":
            while batcher.prefilling is not None:
                batcher.prefill_step()
            batcher.decode_step()
        batcher.cancel(running)
    batcher.run(until_idle=True)
    assert first.ends == 1 and second.ends == 1
    survivor = running if stage == "waiting" else queued
    reference = engine.complete(survivor.gen.prompt_ids, survivor.gen.params)
    assert survivor.gen.token_ids == reference.token_ids


def test_every_request_ends_once_under_random_faults(engine):
    """Many requests, random cancels and model faults: the event count per request is always one."""
    rng = torch.Generator().manual_seed(7)
    healthy, poisoned = prompts(engine)
    faulty = Engine(FaultyModel(engine.model, "decode"), engine.tokenizer)
    batcher = Batcher(faulty, max_batch=3, max_queue=100, prefill_chunk=16, start=False)
    recorders, requests = [], []
    for i in range(24):
        ids = poisoned if torch.rand(1, generator=rng) < 0.3 else healthy[i % 3]
        recorders.append(Recorder())
        requests.append(batcher.submit(ids, greedy(n=int(torch.randint(1, 20, (1,), generator=rng))), recorders[-1]))
    steps = 0
    while batcher.waiting or batcher.busy:
        batcher.admit()
        if batcher.prefilling is not None:
            batcher.prefill_step()
        if batcher.active:
            batcher.decode_step()
        steps += 1
        if steps % 3 == 0:
            batcher.cancel(requests[int(torch.randint(0, 24, (1,), generator=rng))])
    counts = collections.Counter(r.ends for r in recorders)
    assert counts == {1: 24}
    for request in requests:
        if len(request.gen.prompt_ids) == POISON_LENGTH and not request.cancelled:
            assert request.gen.finish_reason.startswith("error")


def test_close_ends_every_request_in_flight_with_an_error(engine):
    healthy, poisoned = prompts(engine)
    batcher = Batcher(engine, max_batch=1, start=False)
    recorders = [Recorder() for _ in range(3)]
    requests = [batcher.submit(ids, greedy(n=50), rec) for ids, rec in zip(healthy, recorders)]
    batcher.admit()
    batcher.prefill_step()
    batcher.close()
    assert [r.ends for r in recorders] == [1, 1, 1]
    assert all("shutting down" in r.gen.finish_reason for r in requests)


def test_deadline_ends_a_request_with_a_timeout(engine):
    healthy, _ = prompts(engine)
    batcher = Batcher(engine, max_batch=1, start=False)
    slow, queued = Recorder(), Recorder()
    first = batcher.submit(healthy[0], greedy(n=50), slow, timeout=0)
    second = batcher.submit(healthy[1], greedy(n=5), queued, timeout=None)
    batcher.run(until_idle=True)
    assert slow.ends == 1 and first.gen.finish_reason.startswith("error: timed out")
    assert queued.ends == 1 and second.gen.finish_reason == "length"


def test_a_vanishing_temperature_is_greedy(engine):
    """logits / 1e-40 overflows to inf: below MIN_TEMPERATURE sampling is greedy instead of NaN."""
    healthy, _ = prompts(engine)
    want = engine.complete(healthy[0], greedy()).token_ids
    for temperature in (1e-40, 5e-324, 1e-6):
        got = engine.complete(healthy[0], SamplingParams(temperature=temperature, max_new_tokens=12,
                                                         stop_token_ids=[], seed=1))
        assert got.token_ids == want


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(top_p=float("inf")), dict(seed=1 << 64),
                                 dict(repetition_penalty=float("nan")), dict(max_new_tokens=0), dict(top_k=1.5),
                                 dict(stop=[3])])
def test_degenerate_settings_are_refused(engine, bad):
    healthy, _ = prompts(engine)
    params = SamplingParams(**{"max_new_tokens": 4, **bad})
    with pytest.raises(ValueError):
        engine.generate(healthy[0], params)
    with pytest.raises(ValueError):
        Batcher(engine, max_batch=1, start=False).submit(healthy[0], params, Recorder())


def test_prompt_scoring_is_chunked_and_exact(engine):
    """Prompt log-probabilities a chunk at a time equal one full forward pass, with (chunk × vocab) memory."""
    ids = engine.tokenizer.encode(TEXT)[:100]
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([ids]))[0][0].float(), -1)
    widest = []
    real_forward = engine.model.forward

    def spy(idx, *a, **kw):
        logits, loss = real_forward(idx, *a, **kw)
        widest.append(logits.shape[1])
        return logits, loss
    chunked = Engine(engine.model, engine.tokenizer, prefill_chunk=16)
    engine.model.forward = spy
    try:
        scored = chunked.prompt_logprobs(ids, top_n=2)
    finally:
        del engine.model.forward
    assert max(widest) == 16
    assert scored[0] is None and len(scored) == len(ids)
    for i in range(1, len(ids)):
        assert abs(scored[i].logprob - float(logp[i - 1, ids[i]])) < 1e-4
    # through the batcher: the same numbers, and generation continues after the prompt
    recorder = Recorder()
    batcher = Batcher(engine, max_batch=2, prefill_chunk=16, start=False)
    request = batcher.submit(ids, greedy(n=3, prompt_logprobs=2), recorder)
    batcher.run(until_idle=True)
    assert request.gen.prompt_logprobs[0] is None
    assert [lp.logprob for lp in request.gen.prompt_logprobs[1:]] == pytest.approx([lp.logprob for lp in scored[1:]],
                                                                                  abs=1e-4)
    assert len(request.gen.token_ids) == 3
