"""What the hardening costs and buys, side by side in one run.

    python benchmarks/hardening.py sandbox [--problems 40]   # seconds per HumanEval problem checked
    python benchmarks/hardening.py stream [-m MODEL]          # a stream's largest gap under a big embeddings call

sandbox: HumanEval's canonical solutions with their tests, one after the other, through
    - picochat's sandbox (kernel namespaces, its own root file system, uid, cgroup; the harness's report),
    - the previous sandbox (git's HEAD~ version of picochat/sandbox.py, if given with --old FILE: network and
      read-only mounts, in-process guards),
    - a bare `python -c` subprocess (what the HumanEval reference harness costs at least);
    every run must pass. Reported: mean and p90 seconds per problem and the ratio to the bare subprocess.
stream: a live server (the model given, MiniLM for embeddings) streams one greedy chat answer while a client
    sends one embeddings request of `--inputs` texts of ~1,900 characters (the encoder reads 256 tokens of
    each); the largest and the median gap between the stream's chunks, and the embeddings request's time,
    with the embeddings in slices between decode steps (now) and in one call (as before, --slice-tokens 0).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time

from common import cpu_line, log


def time_runs(run, programs: list[tuple[str, str]]) -> list[float]:
    seconds = []
    for code, tests in programs:
        start = time.perf_counter()
        if not run(code, tests):
            raise SystemExit(f"a canonical solution failed:\n{code[:300]}")
        seconds.append(time.perf_counter() - start)
    return seconds


def bare_subprocess(code: str, tests: str) -> bool:
    done = subprocess.run([sys.executable, "-I", "-S", "-c", f"{code}\n\n{tests}"], capture_output=True,
                          timeout=30)
    return done.returncode == 0


def old_sandbox(path: str):
    spec = importlib.util.spec_from_file_location("old_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = module   # its dataclasses look their module up
    spec.loader.exec_module(module)
    return lambda code, tests: module.run_python(f"{code}\n\n{tests}").passed


def sandbox_table(problems: int, old: str | None) -> str:
    from picochat.eval.humaneval import load_problems
    from picochat.sandbox import run_python
    chosen = load_problems(limit=problems)
    programs = [(p.prompt + p.canonical_solution, f"{p.test}\n\ncheck({p.entry_point})\n") for p in chosen]
    systems = {"bare python subprocess": bare_subprocess,
               "picochat sandbox (kernel-enforced)": lambda code, tests: run_python(code, tests).passed}
    if old:
        systems["previous sandbox (in-process guards)"] = old_sandbox(old)
    results = {}
    for name, run in systems.items():
        log(f"{name}: {len(programs)} problems")
        results[name] = time_runs(run, programs)
    base = statistics.mean(results["bare python subprocess"])
    rows = [f"| {name} | {statistics.mean(s) * 1000:.0f} ms | {sorted(s)[int(0.9 * len(s))] * 1000:.0f} ms "
            f"| {statistics.mean(s) / base:.2f}× |" for name, s in results.items()]
    return "\n".join([f"HumanEval canonical solutions, {len(programs)} problems, all passed",
                      "| checked by | mean per problem | p90 | ÷ bare subprocess |", "|---|---|---|---|", *rows])


def serve_in_thread(model: str | None):
    """The server app on 127.0.0.1 in this process (so the slicing can be switched off for the 'before' row)."""
    import socket
    import threading
    import uvicorn
    from picochat.engine.engine import Engine
    from picochat.load import load, load_encoder
    from picochat.serve.app import Knowledge, create_app
    loaded = load(model)
    engine = Engine(loaded.model, loaded.tokenizer, draft=loaded.draft)   # as `picochat serve` builds it
    app = create_app(lambda: engine, "bench", max_len=4096, knowledge=Knowledge([], load_encoder=load_encoder))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    app.state.picochat.loaded.wait(600)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.picochat


def gaps_under_embeddings(url: str, texts: list[str], max_tokens: int) -> tuple[list[float], float]:
    """The stream's gaps between chunks while one embeddings request runs; and that request's seconds."""
    import threading
    import httpx
    stamps, started, stop = [], threading.Event(), threading.Event()

    def stream():
        body = {"model": "bench", "messages": [{"role": "user", "content": "Write a long story about a cat."}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter())
                    started.set()
                if stop.is_set():   # closing the connection cancels the rest
                    return
    streamer = threading.Thread(target=stream)
    streamer.start()
    started.wait(600)
    time.sleep(1.0)
    begin = time.perf_counter()
    response = httpx.post(url + "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": texts}, timeout=900)
    end = time.perf_counter()
    time.sleep(0.5)
    stop.set()
    response.raise_for_status()
    streamer.join()
    during = [b - a for a, b in zip(stamps, stamps[1:]) if b > begin and a < end]
    return during, end - begin


def stream_table(model: str | None, inputs: int) -> str:
    import math
    import random
    from picochat.engine import batcher
    from picochat.serve import openai
    url, state = serve_in_thread(model)
    words = "the shop opens at ten and closes at six returns are accepted within thirty days".split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(380))[:1900] for _ in range(inputs)]
    gaps_under_embeddings(url, texts[:8], 4000)   # loads the encoder, warms the caches
    rows = []
    for name, slice_tokens, call_seconds in (("one call (before)", 10**9, math.inf),
                                             ("slices between steps (now)", openai.EMBEDDING_SLICE_TOKENS,
                                              batcher.CALL_SECONDS)):
        openai.EMBEDDING_SLICE_TOKENS, batcher.CALL_SECONDS = slice_tokens, call_seconds
        log(f"{name}: {inputs} texts")
        gaps, seconds = gaps_under_embeddings(url, texts, 4000)
        rows.append(f"| {name} | {inputs} | {seconds:.1f} s | {max(gaps):.2f} s | "
                    f"{statistics.median(gaps) * 1000:.0f} ms | {len(gaps)} |")
    return "\n".join([f"a greedy chat stream while one embeddings request of {inputs} texts x 1,900 characters runs",
                      "| embeddings | texts | request took | largest gap | median gap | chunks meanwhile |",
                      "|---|---|---|---|---|---|", *rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sandbox", "stream"])
    parser.add_argument("--problems", type=int, default=40)
    parser.add_argument("--old", default=None, help="the previous sandbox.py, for the side-by-side row")
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--inputs", type=int, default=512)
    args = parser.parse_args()
    print(cpu_line())
    if args.what == "sandbox":
        print(sandbox_table(args.problems, args.old))
    else:
        print(stream_table(args.model, args.inputs))


if __name__ == "__main__":
    main()
