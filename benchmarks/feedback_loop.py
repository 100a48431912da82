"""The feedback loop end to end, as a user plays it in the chat page (a real headless Chromium):
thumbs and edits -> `picochat tune --from-feedback` -> the gate's table -> the running server swaps the
adapter in -> the next request is answered by it -> `picochat tune --rollback`.

    python benchmarks/feedback_loop.py                       # SmolLM2-135M-Instruct, ~10 minutes on 2 cores
    python benchmarks/feedback_loop.py --questions 42 --out out/bench/feedback_loop.md

The user is the shop's owner (benchmarks/sft_demo.py's 42 facts): with the shop's system prompt set in
the page, they ask one question per fact, press 👍 on a right reply and correct a wrong one with "Edit
this reply". Picochat runs in its own home ($PICOCHAT_HOME: a fresh feedback file and tuned folder; the
models, packed cache and kernels linked from the real one). Measured: the share of held-out paraphrases
(never asked in the page) answered right before and after, the gate's verdict, and how long each step took.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_line, log  # noqa: E402
from sft_demo import FACTS, SYSTEM  # noqa: E402

from picochat.paths import cache_dir  # noqa: E402

SHARED = ("models", "packed", "kernels", "cpu")   # what the fresh home borrows from the real one


def fresh_home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="picochat-loop-"))
    for name in SHARED:
        if (cache_dir() / name).exists():
            (home / name).symlink_to(cache_dir() / name)
    return home


def start_server(home: Path, port: int, model: str) -> subprocess.Popen:
    env = {**os.environ, "PICOCHAT_HOME": str(home)}
    server = subprocess.Popen([sys.executable, "-m", "picochat.cli", "serve", "-m", model, "--port", str(port)],
                              env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not come up: " + server.stderr.read()[-2000:])


def ask(url: str, question: str, model: str) -> tuple[str, str]:
    """(the greedy reply, the adapter that wrote it) through the API, with the shop's system prompt."""
    body = {"model": model, "temperature": 0, "max_tokens": 40,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}
    reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
    return reply["choices"][0]["message"]["content"], reply["system_fingerprint"]


def held_out_accuracy(url: str, facts, model: str) -> tuple[float, str]:
    """Right replies to the held-out paraphrase (question 4) of the facts the user gave feedback on."""
    right, adapter = 0, "?"
    for _, keys, questions in facts:
        reply, adapter = ask(url, questions[3], model)
        right += all(k in reply.lower() for k in keys)
    return right / len(facts), adapter


def play_the_user(url: str, facts) -> dict:
    """In the page: the shop's system prompt, then per fact a new chat, its first question, 👍 or an edit."""
    from playwright.sync_api import expect, sync_playwright
    chromium = os.environ.get("PICOCHAT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    counts = {"up": 0, "edited": 0}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless=new", "--no-sandbox"])
        page = browser.new_context().new_page()
        page.set_default_timeout(120_000)
        page.goto(url + "/")
        page.click("#open-settings")
        page.fill("#system", SYSTEM)
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "48")   # the shop's answers are one sentence; a rambling reply stops there
        page.click("#close-settings")
        for answer, keys, questions in facts:
            page.click("#new-chat")
            page.fill("#input", questions[0])
            page.press("#input", "Enter")
            page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length > 0"
                                   " && !document.querySelector('.msg.streaming')")
            reply = page.locator(".msg.assistant").last
            text = reply.locator(".content").inner_text()
            if all(k in text.lower() for k in keys):
                reply.get_by_role("button", name="Good reply").click()
                expect(reply.get_by_role("button", name="Good reply")).to_have_attribute("aria-pressed", "true")
                counts["up"] += 1
            else:
                reply.get_by_role("button", name="Edit this reply").click()
                reply.locator(".editor textarea").fill(answer)
                reply.get_by_role("button", name="Save").click()
                expect(reply.locator(".edited-mark")).to_have_text("edited")
                counts["edited"] += 1
        browser.close()
    return counts


def gate_files(folder: Path) -> list[str]:
    """The gate's fixed tasks: the shop's held-out questions (generation) and MMLU when its wheel is at hand."""
    shop = folder / "shop_held_out.jsonl"
    shop.write_text("".join(json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                                     {"role": "user", "content": q[3]}], "references": keys}) + "\n"
                            for _, keys, q in FACTS))
    args = ["--gate-gen", str(shop)]
    mmlu = folder / "mmlu.jsonl"
    made = subprocess.run([sys.executable, str(Path(__file__).parent / "eval_data.py"), "--limit", "228", "--out",
                           str(mmlu)], capture_output=True, text=True)
    if made.returncode == 0:
        args += ["--gate-mc", str(mmlu)]
    else:
        log(f"no MMLU for the gate: {made.stderr.strip()[-200:]}")
    return args


def tune(home: Path, model: str, flags: list[str], rollback: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PICOCHAT_HOME": str(home)}
    what = ["--rollback"] if rollback else ["--from-feedback", *flags]
    return subprocess.run([sys.executable, "-m", "picochat.cli", "tune", *what, "-m", model], env=env,
                          capture_output=True, text=True)


def wait_for_adapter(url: str, wanted, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    while httpx.get(url + "/health", timeout=5).json().get("adapter") != wanted:
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"the server did not swap to {wanted}: {httpx.get(url + '/health').json()}")
        time.sleep(0.2)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--questions", type=int, default=42, help="facts the user asks about in the page")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--tune", default="--lr 1e-4 --sft-steps 30 --dpo-steps 30",
                   help="flags for `picochat tune --from-feedback` (its training settings)")
    p.add_argument("--fixed-tasks", action=argparse.BooleanOptionalAction, default=True,
                   help="gate on the shop's held-out questions and MMLU too (--no-fixed-tasks: only what --tune "
                        "names, e.g. --gate-text none for the feedback pairs alone)")
    p.add_argument("--out", default="out/bench/feedback_loop.md")
    args = p.parse_args()
    home, url, facts = fresh_home(), f"http://127.0.0.1:{args.port}", FACTS[:args.questions]
    timings = {}
    server = start_server(home, args.port, args.model)
    try:
        before, fingerprint_before = held_out_accuracy(url, facts, args.model)
        t0 = time.perf_counter()
        counts = play_the_user(url, facts)
        timings["the user in the page"] = time.perf_counter() - t0
        log(f"feedback given: {counts}; held-out before: {before:.1%}")
        t0 = time.perf_counter()
        tuned = tune(home, args.model, (gate_files(home) if args.fixed_tasks else []) + args.tune.split())
        timings["tune + gate"] = time.perf_counter() - t0
        log(tuned.stderr[-3000:])
        approved = tuned.returncode == 0
        after, fingerprint_after = before, fingerprint_before
        if approved:
            timings["swap seen by /health"] = wait_for_adapter(url, "tuned-001")
            after, fingerprint_after = held_out_accuracy(url, facts, args.model)
        rolled = tune(home, args.model, [], rollback=True)
        timings["rollback swap"] = wait_for_adapter(url, None) if rolled.returncode == 0 else float("nan")
    finally:
        server.terminate()
        server.wait(timeout=60)
    report = "\n".join([
        cpu_line(), f"# {args.model}: {len(facts)} shop questions asked in the page; "
        f"{counts['up']} 👍, {counts['edited']} edited", "",
        "| held-out paraphrases of those facts (greedy, via the API) | right | answered by |", "|---|---|---|",
        f"| before | {before:.1%} | {fingerprint_before} |",
        f"| after `picochat tune --from-feedback` | {after:.1%} | {fingerprint_after} |", "",
        f"The gate (`picochat tune --from-feedback {args.tune}` output):", "", tuned.stdout.strip(), "",
        "| step | seconds |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in timings.items()]])
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
