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
