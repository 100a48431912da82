"""What the benchmark scripts share: logging, the machine's description, CPU accounting, the report's end."""
from __future__ import annotations

import json
import platform
import sys


def log(msg):
    """Progress goes to stderr, so stdout holds only the report."""
    print(msg, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have kept the machine's cores busy since boot (/proc/stat: user, nice,
    system, irq, softirq, steal; guest time is inside user), or None where there is no /proc/stat."""
    import os
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def finish_report(table: str, total_s: float, json_path: str | None, record: dict):
    """Print the table and the run's total time; write the record as JSON when asked (--json)."""
    print(table)
    print(f"\ntotal {total_s:.0f} s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(record, f, indent=2)


def one_request(engine, ids: list[int], runs: int = 3, new_tokens: int = 64) -> dict:
    """Time to first token, prompt and decode tokens/s of one request at a time, as one user waits: the
    median of `runs` greedy runs, the engine's prefix cache cleared before each."""
    from picochat.engine.sampling import SamplingParams
    ttft, decode = [], []
    for _ in range(runs):
        engine.reset()
        gen = engine.generate(ids, SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
        "".join(gen)
        ttft.append(gen.stats.time_to_first_token)
        decode.append(gen.stats.completion_tokens / max(1e-9, gen.stats.decode_seconds))
    first = sorted(ttft)[len(ttft) // 2]
    return {"prompt_tokens": len(ids), "ttft_s": first, "prefill_tok_s": len(ids) / first,
            "decode_tok_s": sorted(decode)[len(decode) // 2]}



def cpu_line() -> str:
    """The machine line every benchmark report starts with: CPU model, torch's capability, threads."""
    import torch
    return (f"# CPU: {cpu_model()} | torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()} "
            f"| {torch.get_num_threads()} threads")
