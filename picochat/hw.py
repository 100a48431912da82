"""What this machine is: its CPU (model, instruction sets) and how much memory is free.

Every choice picochat makes per machine starts here: the compiled kernels key their build by the CPU's
flags (kernels/), the measured profile decides precision and kernels (quant/tuning.py), and every load
that could exhaust memory asks `check_memory` first (formats/, engine/). The ground floor: it imports
nothing of picochat.
"""
from __future__ import annotations

import functools
import os
import platform
import time

import torch


# ----------------------------------------------------------------------------- the CPU
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
        return frozenset(line.split(":", 1)[1].split()) if line else frozenset()
    except OSError:
        return frozenset()


def features() -> dict[str, bool]:
    """The instruction-set features that matter here."""
    f = cpu_flags()
    return {"avx2": "avx2" in f, "avx512": "avx512f" in f, "avx512_vnni": "avx512_vnni" in f,
            "avx_vnni": "avx_vnni" in f, "avx512_bf16": "avx512_bf16" in f, "amx_bf16": "amx_bf16" in f,
            "amx_int8": "amx_int8" in f}


def native_bf16() -> bool:
    """Whether the CPU has bfloat16 arithmetic instructions (AVX-512 BF16 or AMX)."""
    feats = features()
    return feats["avx512_bf16"] or feats["amx_bf16"] or torch.backends.mkldnn.is_available() and _mkldnn_bf16()


def _mkldnn_bf16() -> bool:
    try:  # oneDNN's own check; on x86 it means AVX-512 (core) at least, not fast bf16
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and "avx512_bf16" in cpu_flags()
    except (AttributeError, RuntimeError):
        return False


def describe() -> str:
    """One line for the top of every benchmark and `info --system`: model, torch's capability, threads."""
    feats = [k for k, v in features().items() if v]
    return (f"{cpu_model()} | torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()} | "
            f"{', '.join(feats) or 'no AVX2'} | {torch.get_num_threads()} threads")


# ----------------------------------------------------------------------------- memory
def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping, or None where that cannot be read.

    Linux: MemAvailable, capped by the cgroup's limit (a container's memory.max) less what it uses
    beyond reclaimable page cache. Elsewhere: the free physical pages, where the OS reports them.
    """
    found = [n for n in (_meminfo_available(), _cgroup_headroom()) if n is not None]
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, OSError, ValueError):
            return None
    return min(found)


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom(root: str = "/sys/fs/cgroup") -> int | None:
    """cgroup v2 (memory.max) or v1 (memory/memory.limit_in_bytes): limit - usage + inactive page cache."""
    for limit, usage, stat, inactive in (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                          "memory/memory.stat", "total_inactive_file")):
        try:
            with open(os.path.join(root, limit)) as f:
                text = f.read().strip()
            if text == "max" or int(text) >= 1 << 60:  # unlimited (v1 writes a huge number)
                return None
            with open(os.path.join(root, usage)) as f:
                used = int(f.read().strip())
            cache = 0
            with open(os.path.join(root, stat)) as f:
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == inactive:
                        cache = int(value)
            return max(0, int(text) - used + cache)
        except (OSError, ValueError):
            continue
    return None


def check_memory(need: int, what: str, error: type[Exception] = ValueError) -> None:
    """Refuse, before allocating, a load that needs more memory than is available (`what`: "loading X")."""
    have = available_memory()
    if have is not None and need > have:
        raise error(f"{what} needs about {need / 2**30:.2f} GiB of memory but only {have / 2**30:.2f} GiB is "
                    f"available: close other programs, or use a smaller or more quantized model.")


# ----------------------------------------------------------------------------- sharing the CPU
class IdleCores:
    """How many threads to compute on: as many as there are cores not kept busy by other processes.

    PyTorch's threads wait for each other at every operation; when another process holds one of two cores,
    a thread that is not running holds up the one that is, and a step takes ~10× as long (measured), where
    computing on the free core alone loses ~1.3×. `update()` (cheap; it measures at most once a
    second) reads from /proc/stat how busy the CPU was since its last look, takes off this process's own
    time (/proc/self/stat), and sets torch's thread count to what is left (at least 1, at most `limit`).
    On a system without /proc it changes nothing."""

    INTERVAL = 1.0   # seconds between looks
    TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, limit: int | None = None):
        self.limit = limit or torch.get_num_threads()
        self._last: tuple[float, float, float] | None = self._sample()
        self._last_time = time.monotonic() if self._last else 0.0

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(seconds of busy CPU, all processes; of this process; now), or None without /proc."""
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
        busy = sum(fields[:8]) - idle                              # (guest time is already in user)
        return busy / IdleCores.TICKS, (int(own[11]) + int(own[12])) / IdleCores.TICKS, time.monotonic()

    def update(self) -> int:
        """The thread count now in use, changed if others' load has changed since the last look."""
        now = time.monotonic()
        if self._last is None or now - self._last_time < self.INTERVAL:
            return torch.get_num_threads()
        sample = self._sample()
        if sample is None:
            return torch.get_num_threads()
        busy, own, when = sample
        others = max(0.0, (busy - self._last[0]) - (own - self._last[1])) / max(when - self._last[2], 1e-3)
        self._last, self._last_time = sample, now
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, min(self.limit, cores - int(others + 0.5)))   # a core busy half the time or more counts
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads
