"""Serving benchmark: picochat's OpenAI-compatible server against llama-cpp-python's, same GGUF, same load.

    python benchmarks/serve.py                              # 1, 4 and 8 clients, 3 requests each, 2 threads
    python benchmarks/serve.py --build-llama --json out.json   # build llama-cpp-python[server] first if missing
    python benchmarks/serve.py --systems picochat --concurrency 1 8 --requests 5

Each system is started as a subprocess on 127.0.0.1 with a free port (loopback traffic only), waited on
until ready (picochat: GET /health 200; llama_cpp.server: GET /v1/models 200), warmed up with one
request, loaded at each concurrency level, then stopped (SIGTERM to its pid, then wait).

  * picochat                        python -m picochat serve -m GGUF --parallel 8 --threads 2 (dtype auto:
                                    the quantized weights on the integer kernel)
  * picochat-float                  the same with --dequantize (weights expanded to floats, dtype auto)
  * llama-cpp-python                python -m llama_cpp.server --model GGUF --n_threads 2 --n_ctx 4096
                                    --interrupt_requests False (its default True ends a streaming reply
                                    early with [DONE] as soon as another request is waiting)

Load: C concurrent clients (asyncio + httpx), each sending R streaming chat requests one after another
(temperature 0, max_tokens 64, distinct short prompts). Per request: time to first content token (from
sending the request), completion tokens (the stream's usage from stream_options.include_usage when the
server sends it, else the number of non-empty content chunks), end time.
  aggregate tok/s  all completion tokens of the level / wall time of the whole level
  TTFT p50 / p95   over all requests of the level (linear interpolation)
  × llama          picochat's aggregate tok/s / llama-cpp-python's at the same concurrency

Before each measured level the benchmark waits (up to --max-wait s, polling every 10 s, and --wait-budget s
in all) until the 1-minute
load average, less what this benchmark's own processes add to it, is below --max-load: a background
thread samples CPU time every 5 s (/proc) and keeps the kernel's 1-minute average of our own CPU use.
A level during which other processes used more than --max-others CPU cores is measured again (at most
--retries times) and the least disturbed attempt is kept; the table shows the load average when each
kept level began and the other processes' CPU use during it.
"""
import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

import httpx

from common import busy_cpu_seconds, cpu_model, finish_report, log

SYSTEMS = ["picochat", "picochat-float", "llama-cpp-python"]
LLAMA = "llama-cpp-python"
DEFAULT_LLAMA_VENV = Path.home() / ".cache" / "picochat" / "bench" / "llama-venv"
PROMPTS = [  # distinct, short, and each asks for more than 64 tokens of answer
    "Explain how a rainbow forms.",
    "Write a short story about a robot who learns to paint.",
    "What are the main causes of climate change?",
    "Describe how a computer stores numbers in memory.",
    "Give me some tips for learning a new language.",
    "Why is the sky blue? Explain in detail.",
    "Write a short poem about the ocean and the moon.",
    "How does a bicycle stay upright while moving?",
]


def version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- load: ours and the machine's
class LoadMonitor:
    """Samples every 5 s: CPU used by our own processes (this one, the server and its children) and by all
    others, and keeps a 1-minute exponential average of our own use the way the kernel keeps the load
    average, so `others()` ~ the 1-minute load average less what this benchmark adds."""

    PERIOD = 5.0

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.wait_budget = math.inf  # seconds of waiting left for the whole run
        self.server_pid = None
        self.own_ema = 0.0       # our 1-minute average, in cores (comparable to the load average)
        self.others_ema = 0.0    # the others' 1-minute average of CPU use, in cores
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._last = self._sample()
        self._thread = threading.Thread(target=self._run, name="load-monitor", daemon=True)
        self._thread.start()

    @staticmethod
    def _proc_jiffies(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            return int(rest[11]) + int(rest[12])                    # utime + stime, all threads
        except (OSError, IndexError, ValueError):
            return None

    def own_pids(self):
        pids = {os.getpid()}
        if self.server_pid:
            parents = {}
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        with open(f"/proc/{entry}/stat") as f:
                            parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                    except (OSError, IndexError, ValueError):
                        pass
            frontier = {self.server_pid}
            while frontier:
                pids |= frontier
                frontier = {p for p, pp in parents.items() if pp in frontier and p not in pids}
        return pids

    def _sample(self):
        own = {}
        for pid in self.own_pids():
            j = self._proc_jiffies(pid)
            if j is not None:
                own[pid] = j
        return time.monotonic(), busy_cpu_seconds(), own

    def _run(self):
        while not self._stop.wait(self.PERIOD):
            t, busy, own = self._sample()
            t0, busy0, own0 = self._last
            dt = max(t - t0, 1e-3)
            own_cores = sum(j - own0.get(pid, 0) for pid, j in own.items()) / self.hz / dt
            all_cores = (busy - busy0) / dt
            decay = math.exp(-dt / 60)
            with self.lock:
                self.own_ema = self.own_ema * decay + own_cores * (1 - decay)
                self.others_ema = self.others_ema * decay + max(all_cores - own_cores, 0) * (1 - decay)
            self._last = (t, busy, own)

    def snapshot(self):
        load1, load5, load15 = os.getloadavg()
        with self.lock:
            own = self.own_ema
        return dict(load1=load1, load5=load5, load15=load15, own=own, others=max(load1 - own, 0.0))

    def window_start(self):
        return self._sample()

    def window_others(self, start):
        """Cores used by other processes since `start` (from window_start)."""
        t0, busy0, own0 = start
        t, busy, own = self._sample()
        dt = max(t - t0, 1e-3)
        own_cores = sum(j - own0.get(pid, 0) for pid, j in own.items()) / self.hz / dt
        return max((busy - busy0) / dt - own_cores, 0.0), own_cores

    def wait_quiet(self, max_load, max_wait, poll=10.0):
        """Wait until the 1-minute load average less our own share is below max_load (or max_wait passes,
        and never longer than what is left of the run's waiting budget)."""
        max_wait = min(max_wait, self.wait_budget)
        t0 = time.monotonic()
        while True:
            s = self.snapshot()
            waited = time.monotonic() - t0
            line = (f"    load avg {s['load1']:.2f} {s['load5']:.2f} {s['load15']:.2f}; ours ~{s['own']:.2f}, "
                    f"others ~{s['others']:.2f}")
            if s["others"] < max_load:
                log(line + (f" -> go (waited {waited:.0f} s)" if waited >= 1 else " -> go"))
                self.wait_budget -= waited
                return dict(s, waited_s=waited, quiet=True)
            if waited >= max_wait:
                log(line + f" -> still busy after {waited:.0f} s (waiting budget left "
                    f"{max(self.wait_budget - waited, 0):.0f} s), measuring anyway")
                self.wait_budget -= waited
                return dict(s, waited_s=waited, quiet=False)
            log(line + f" -> waiting for others < {max_load}")
            time.sleep(poll)

    def close(self):
        self._stop.set()


# ----------------------------------------------------------------------------- servers
class Server:
    """One server subprocess: start, wait until ready, stop by its pid."""

    def __init__(self, name, argv, ready_path, logdir, env=None):
        self.name, self.argv, self.ready_path = name, argv, ready_path
        self.log_path = Path(logdir) / f"{name}.log"
        self.env = env
        self.proc = None
        self.base = None

    def start(self, monitor, timeout=600):
        port = free_port()
        argv = [a.replace("{port}", str(port)) for a in self.argv]
        self.base = f"http://127.0.0.1:{port}"
        self._log = open(self.log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env)
        monitor.server_pid = self.proc.pid  # its CPU counts as ours from now on
        log(f"  started {self.name} (pid {self.proc.pid}): {' '.join(argv)}")
        with httpx.Client(timeout=5, trust_env=False) as client:
            while time.perf_counter() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(self.base + self.ready_path).status_code == 200:
                        self.ready_s = time.perf_counter() - t0
                        log(f"  {self.name} ready in {self.ready_s:.1f} s at {self.base}")
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready after {timeout} s:\n{self.log_tail()}")

    def model_id(self):
        r = httpx.get(self.base + "/v1/models", timeout=10, trust_env=False)
        r.raise_for_status()
        return r.json()["data"][0]["id"]

    def check_alive(self, what):
        """Raise if the server has died (a crash shows up as failed requests first)."""
        time.sleep(0.2)
        code = self.proc.poll() if self.proc else None
        if code is not None:
            sig = f" = {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else ""
            raise RuntimeError(f"{self.name} died during the {what} (exit code {code}{sig})\n{self.log_tail()}")

    def log_tail(self, n=20):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()
        log(f"  stopped {self.name} (exit code {self.proc.returncode})")
        self.proc = None


def llama_python_info(python):
    """(llama_cpp.__version__, None) for an interpreter that has llama_cpp.server, else (None, why not)."""
    if not python or not Path(python).exists():
        return None, f"no interpreter at {python}"
    r = subprocess.run([python, "-c", "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return None, (r.stderr.strip().splitlines() or ["import failed"])[-1]
    return r.stdout.strip(), None


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    except (OSError, StopIteration):
        return set()


def default_cmake_args():
    """llama.cpp's default CPU build (-march=native) segfaults in ggml_backend_amx_mul_mat on prompts of more
    than one token on AMX-INT8 CPUs (seen with llama-cpp-python 0.3.36 on a Xeon VM); build without it there."""
    if "amx_int8" in cpu_flags():
        return "-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
    return ""


def build_llama(venv: Path, cmake_args: str, timeout):
    """Create a venv and `pip install 'llama-cpp-python[server]'` (compiles llama.cpp). Returns a record."""
    t0 = time.perf_counter()
    logfile = venv.parent / "llama-build.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    log(f"building llama-cpp-python[server] into {venv} with CMAKE_ARGS={cmake_args!r} (log: {logfile}) ...")
    record = dict(venv=str(venv), log=str(logfile), cmake_args=cmake_args)
    try:
        with open(logfile, "w") as out:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=subprocess.STDOUT)
            env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2), CMAKE_ARGS=cmake_args)
            r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-cache-dir",
                                "llama-cpp-python[server]"], stdout=out, stderr=subprocess.STDOUT, env=env,
                               timeout=timeout)
        ok = r.returncode == 0
        reason = None if ok else last_error(logfile)
    except subprocess.TimeoutExpired:
        ok, reason = False, f"pip install timed out after {timeout} s"
    except (OSError, subprocess.CalledProcessError) as e:
        ok, reason = False, str(e)
    record.update(ok=ok, seconds=time.perf_counter() - t0, reason=reason)
    (venv.parent / "llama-build.json").write_text(json.dumps(record, indent=2))
    log(f"  build {'succeeded' if ok else 'failed: ' + str(reason)} in {record['seconds']:.0f} s")
    return record


def last_error(logfile, n=3):
    lines = [line.strip() for line in Path(logfile).read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return " | ".join((errors or lines)[-n:])[:400]


# ----------------------------------------------------------------------------- load generator
async def one_request(client, url, model, prompt, max_tokens, timeout):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "temperature": 0, "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    st = dict(first=None, chunks=0, usage=None, finish=None, chars=0)

    async def stream():
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                obj = json.loads(data)
                if "error" in obj:
                    raise RuntimeError(f"in-stream error: {obj['error']}")
                if obj.get("usage"):
                    st["usage"] = obj["usage"]
                for choice in obj.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if st["first"] is None:
                            st["first"] = time.perf_counter()
                        st["chunks"] += 1
                        st["chars"] += len(content)
                    st["finish"] = choice.get("finish_reason") or st["finish"]

    t0 = time.perf_counter()
    error = None
    try:
        await asyncio.wait_for(stream(), timeout)  # the whole request, not just each read
    except asyncio.TimeoutError:
        error = f"timed out after {timeout} s"
    except Exception as e:  # recorded, never raised: one failed request must not stop the level
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    usage = st["usage"]
    usage_tokens = usage.get("completion_tokens") if usage else None
    return dict(prompt=prompt, start=t0, end=end, ttft=None if st["first"] is None else st["first"] - t0,
                chunks=st["chunks"], usage_tokens=usage_tokens,
                tokens=usage_tokens if usage_tokens is not None else st["chunks"], finish=st["finish"],
                error=error, chars=st["chars"])


async def run_level(base, model, clients, requests, max_tokens, timeout):
    url = base + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10), limits=limits,
                                 trust_env=False) as client:
        async def one_client(i):
            out = []
            for j in range(requests):
                prompt = PROMPTS[(i * requests + j) % len(PROMPTS)]  # the first round: all distinct
                out.append(await one_request(client, url, model, prompt, max_tokens, timeout))
            return out

        t0 = time.perf_counter()
        # every request has its own timeout; this bounds the level as a whole as well
        per_client = await asyncio.wait_for(asyncio.gather(*(one_client(i) for i in range(clients))),
                                            timeout=timeout * requests + 60)
        wall = time.perf_counter() - t0
    return [r for rs in per_client for r in rs], wall


def summarize(system, clients, reqs, wall, load, others_during, own_during):
    ok = [r for r in reqs if r["error"] is None]
    ttfts = [r["ttft"] * 1000 for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    counted = "usage" if ok and all(r["usage_tokens"] is not None for r in ok) else "chunks"
    return dict(system=system, clients=clients, requests=len(reqs), errors=len(reqs) - len(ok), tokens=tokens,
                wall_s=wall, tok_s=tokens / wall if wall > 0 else 0.0,
                ttft_p50_ms=percentile(ttfts, 50), ttft_p95_ms=percentile(ttfts, 95),
                mean_tokens=tokens / len(ok) if ok else 0.0, counted_by=counted,
                finish_reasons={f: sum(r["finish"] == f for r in ok) for f in {r["finish"] for r in ok}},
                chunks=sum(r["chunks"] for r in ok), load=load, others_cores_during=others_during,
                own_cores_during=own_during, first_error=next((r["error"] for r in reqs if r["error"]), None),
                per_request=reqs)


def bench_system(system, server, args, monitor):
    rows = []
    try:
        server.start(monitor, timeout=args.start_timeout)
        model = server.model_id()
        log(f"  model id: {model!r}; warm-up request")
        warm, _ = asyncio.run(run_level(server.base, model, 1, 1, args.max_tokens, args.request_timeout))
        if warm[0]["error"]:
            server.check_alive("warm-up request")
            raise RuntimeError(f"warm-up failed: {warm[0]['error']}\n{server.log_tail()}")
        for clients in args.concurrency:
            attempts = []
            for attempt in range(1, args.retries + 2):
                log(f"  {system}: {clients} client(s) x {args.requests} requests" +
                    (f" (attempt {attempt})" if attempt > 1 else ""))
                load = monitor.wait_quiet(args.max_load, args.max_wait)
                start = monitor.window_start()
                reqs, wall = asyncio.run(run_level(server.base, model, clients, args.requests, args.max_tokens,
                                                   args.request_timeout))
                others, own = monitor.window_others(start)
                server.check_alive(f"{clients}-client level")
                row = summarize(system, clients, reqs, wall, load, others, own)
                row.update(model_id=model, attempt=attempt)
                attempts.append(row)
                log(f"    {row['tokens']} tokens in {wall:.1f} s = {row['tok_s']:.1f} tok/s, TTFT p50 "
                    f"{row['ttft_p50_ms']:.0f} ms p95 {row['ttft_p95_ms']:.0f} ms, errors {row['errors']}, "
                    f"others' CPU during {others:.2f} cores, ours {own:.2f}")
                if others <= args.max_others or monitor.wait_budget < 10:
                    break
                log(f"    other processes used {others:.2f} cores (> {args.max_others}) during the level"
                    + ("; measuring it again" if attempt <= args.retries and monitor.wait_budget >= 10
                       else "; keeping the least disturbed attempt"))
            row = min(attempts, key=lambda r: r["others_cores_during"])  # the least disturbed attempt
            row["other_attempts"] = [{k: v for k, v in r.items() if k != "per_request"}
                                     for r in attempts if r is not row]
            rows.append(row)
    finally:
        server.stop()
        monitor.server_pid = None
    return rows


# ----------------------------------------------------------------------------- output
def table(rows, status):
    llama = {r["clients"]: r for r in rows if r["system"] == LLAMA}
    head = (f"{'system':<17} {'clients':>7} {'requests':>8} {'tokens':>6} {'wall s':>7} {'agg tok/s':>9} "
            f"{'p50 TTFT ms':>11} {'p95 TTFT ms':>11} {'× llama':>8} {'load1':>5} {'others':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ref = llama.get(r["clients"])
        ratio = f"{r['tok_s'] / ref['tok_s']:.2f}×" if r["system"] != LLAMA and ref and ref["tok_s"] else "-"
        req = f"{r['requests']}" + (f" ({r['errors']} err)" if r["errors"] else "")
        lines.append(f"{r['system']:<17} {r['clients']:>7} {req:>8} {r['tokens']:>6} {r['wall_s']:>7.1f} "
                     f"{r['tok_s']:>9.1f} {r['ttft_p50_ms']:>11.0f} {r['ttft_p95_ms']:>11.0f} {ratio:>8} "
                     f"{r['load']['load1']:>5.2f} {r['others_cores_during']:>6.2f}")
    for system, note in status.items():
        if note:
            lines.append(f"{system:<17} {note}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the packaged smollm2)")
    p.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8], help="concurrent clients per level")
    p.add_argument("--requests", type=int, default=3, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=8, help="picochat's --parallel (batch rows)")
    p.add_argument("--n-ctx", type=int, default=4096, help="context of both servers")
    p.add_argument("--llama-python", default=None,
                   help=f"interpreter with llama-cpp-python[server] (default: {DEFAULT_LLAMA_VENV}/bin/python "
                        "if it has it, else this one)")
    p.add_argument("--build-llama", action="store_true",
                   help="if llama-cpp-python is missing, pip install it (compiles llama.cpp) into --llama-venv")
    p.add_argument("--llama-venv", type=Path, default=DEFAULT_LLAMA_VENV)
    p.add_argument("--llama-cmake-args", default=None,
                   help="CMAKE_ARGS for --build-llama (default: without AMX-INT8 on CPUs that have it, see above)")
    p.add_argument("--build-timeout", type=int, default=3600)
    p.add_argument("--max-load", type=float, default=1.5,
                   help="wait before each level until the 1-min load average, less our own share, is below this")
    p.add_argument("--max-others", type=float, default=0.25,
                   help="measure a level again when other processes used more CPU cores than this during it")
    p.add_argument("--retries", type=int, default=2, help="at most this many re-measurements per level")
    p.add_argument("--max-wait", type=float, default=600, help="longest wait for a quiet machine, seconds")
    p.add_argument("--wait-budget", type=float, default=900,
                   help="seconds of waiting for the whole run; once spent, levels are measured (and not measured "
                        "again) without waiting, the load average still shown")
    p.add_argument("--request-timeout", type=float, default=300, help="seconds, per request")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds for a server to become ready")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    t_start = time.perf_counter()

    if args.model is None:
        from picochat.hub import find_packaged
        model = find_packaged("smollm2")
    else:
        model = Path(args.model)
    if not model.is_file():
        sys.exit(f"no model file at {model}")

    status, llama_version, build = {}, None, None
    llama_py = None
    if LLAMA in args.systems:
        candidates = [args.llama_python] if args.llama_python else [str(args.llama_venv / "bin" / "python"),
                                                                    sys.executable]
        for py in candidates:
            llama_version, err = llama_python_info(py)
            if llama_version:
                llama_py = py
                break
        if llama_version is None and args.build_llama and not args.llama_python:
            cmake_args = default_cmake_args() if args.llama_cmake_args is None else args.llama_cmake_args
            build = build_llama(args.llama_venv, cmake_args, args.build_timeout)
            if build["ok"]:
                llama_py = str(args.llama_venv / "bin" / "python")
                llama_version, err = llama_python_info(llama_py)
                if llama_version is None:
                    build.update(ok=False, reason=f"built but does not import: {err}")
            if not build["ok"]:
                status[LLAMA] = f"did not build: {build['reason']}"
        elif llama_version is None:
            status[LLAMA] = (f"not installed ({err}); run with --build-llama, or pip install "
                             "'llama-cpp-python[server]'")
        record = args.llama_venv.parent / "llama-build.json"
        if build is None and llama_py and record.is_file() and llama_py.startswith(str(args.llama_venv)):
            build = json.loads(record.read_text())  # how long the earlier build took

    logdir = tempfile.mkdtemp(prefix="picochat-serve-bench-")
    picochat_env = dict(os.environ)
    servers = {}
    for extra, name in (([], "picochat"), (["--dequantize"], "picochat-float")):
        servers[name] = Server(name, [sys.executable, "-m", "picochat", "serve", "-m", str(model), "--host",
                                      "127.0.0.1", "--port", "{port}", "--parallel", str(args.parallel),
                                      "--threads", str(args.threads), *extra,
                                      "--ctx-size", str(args.n_ctx)], "/health", logdir, env=picochat_env)
    if llama_py:
        servers[LLAMA] = Server(LLAMA, [llama_py, "-m", "llama_cpp.server", "--model", str(model), "--host",
                                        "127.0.0.1", "--port", "{port}", "--n_threads", str(args.threads),
                                        "--n_threads_batch", str(args.threads), "--n_ctx", str(args.n_ctx),
                                        "--interrupt_requests", "False"], "/v1/models", logdir)

    monitor = LoadMonitor()
    monitor.wait_budget = args.wait_budget
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    start_load = monitor.snapshot()
    rows = []
    for system in args.systems:
        if system not in servers:
            continue
        log(f"{system} ...")
        try:
            rows += bench_system(system, servers[system], args, monitor)
        except Exception as e:  # one system failing still leaves the others' rows
            status[system] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"  {system} failed: {e}")
    monitor.close()
    total = time.perf_counter() - t_start
    end_load = os.getloadavg()
    shutil.rmtree(logdir, ignore_errors=True)

    import picochat
    machine = dict(cpu=cpu_model(), cores=os.cpu_count(), threads=args.threads, python=platform.python_version(),
                   picochat=getattr(picochat, "__version__", "dev"), torch=version("torch"),
                   fastapi=version("fastapi"), uvicorn=version("uvicorn"), httpx=version("httpx"),
                   llama_cpp_python=llama_version, llama_python=llama_py)
    from picochat.hw import describe
    print(f"\n{model.name} | {describe()} | {args.threads} threads per server | python {machine['python']}")
    built = ""
    if build and build.get("ok"):
        built = f" (built from PyPI in {build['seconds']:.0f} s, CMAKE_ARGS={build.get('cmake_args')!r}"
        built += f"; {build['note']})" if build.get("note") else ")"
    print(f"picochat {machine['picochat']} (torch {machine['torch']}, fastapi {machine['fastapi']}, uvicorn "
          f"{machine['uvicorn']}, --parallel {args.parallel}) | llama-cpp-python {llama_version or 'n/a'}{built}")
    print(f"load: {', '.join(map(str, args.concurrency))} concurrent clients x {args.requests} streaming chat "
          f"requests each, one after another; temperature 0, max_tokens {args.max_tokens}, {len(PROMPTS)} distinct "
          f"prompts; one warm-up request per server")
    print(f"load avg at start {start_load['load1']:.2f} {start_load['load5']:.2f} {start_load['load15']:.2f}, "
          f"at end {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}; before each level: wait until 1-min load "
          f"avg less ours < {args.max_load}")
    counted = {r["system"]: r["counted_by"] for r in rows}
    print("tokens: " + ", ".join(f"{s} from {'usage' if c == 'usage' else 'content chunks'}"
                                 for s, c in counted.items()))
    if LLAMA in servers:
        print("llama-cpp-python's server has no parallel slots: one request at a time behind a lock (the others "
              "wait); run with --interrupt_requests False")
    print("load1 = 1-min load average when the level began; others = CPU cores used by other processes during it\n")
    finish_report(table(rows, status), total, args.json,
                  dict(machine=machine, args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                       model=str(model), prompts=PROMPTS, total_s=total, llama_build=build, status=status,
                       load_start=start_load, load_end=end_load, results=rows))


if __name__ == "__main__":
    main()
