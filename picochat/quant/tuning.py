"""What this CPU is good at, decided at run time — never hard-coded from one machine.

picochat runs on whatever CPU the user has: one with AMX or AVX-512 bf16 multiplies bfloat16 matrices
several times faster than float32, an AVX2-only one several times slower. So `--dtype auto` (the default
everywhere) asks this module, which looks at the CPU's flags and, once per machine, times a few matrix
products (about a second; the result is cached in picochat's cache folder):

  * `compute_dtype()`   float32 or bfloat16 for float weights and training autocast: bfloat16 only where
                        its matrix products are measured clearly faster (and the CPU has native bf16);
  * `dense_rows()`      for quantized weights, from how many rows (tokens) on a product is faster as
                        "expand the weights, then a dense bfloat16/float32 matrix product" (prompt
                        processing on AMX) than the integer kernel (decoding), and in which dtype.

`picochat info --system` prints the CPU, these choices and the measurements behind them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .. import kernels
from ..atomic import atomic_write_text
from ..hw import cpu_flags, cpu_model, features, native_bf16
from ..paths import cache_dir
from .matrix import quantize

PROFILE_VERSION = 2
BF16_MIN_SPEEDUP = 1.3   # bfloat16 must beat float32 by this much to be chosen (it costs accuracy)


# ----------------------------------------------------------------------------- the measured profile
def _profile_path() -> Path:
    # what the measurements depend on: the CPU, torch, threads, and the instruction sets torch and oneDNN may use
    key = hashlib.sha256(f"{PROFILE_VERSION}|{cpu_model()}|{sorted(cpu_flags())}|{torch.__version__}|"
                         f"{torch.get_num_threads()}|{torch.backends.cpu.get_cpu_capability()}|"
                         f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '')}".encode()).hexdigest()[:16]
    return cache_dir() / "cpu" / f"{key}.json"


def _time(fn, min_seconds: float = 0.08) -> float:
    """Seconds per call: the best of a few batches, after a warm-up."""
    fn()
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        calls += 1
        if calls >= 50:
            break
    return best


def measure() -> dict:
    """Time float32 and bfloat16 matrix products, and the integer kernel against expanding the weights."""
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(256, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    flops = 2 * 256 * 1024 * 1024
    result = {"fp32_gflops": flops / _time(lambda: a32 @ b32) / 1e9,
              "bf16_gflops": flops / _time(lambda: a16 @ b16) / 1e9 if native_bf16() else None}
    if kernels.available():
        dense = torch.bfloat16 if _bf16_wins(result) else torch.float32
        w = quantize(torch.randn(1536, 576, generator=gen), 4, 32)
        shape = (w.bits, w.group, w.in_features, w.out_features, w.has_min)
        rows = {}
        for m in (4, 16, 64, 256):
            x = torch.randn(m, 576, generator=gen)
            kernel = _time(lambda: torch.ops.picochat.qlinear(x, w.packed, *shape))
            expand = _time(lambda: torch.nn.functional.linear(
                x.to(dense), torch.ops.picochat.dequantize(w.packed, *shape, dense)))
            rows[str(m)] = {"kernel_us": kernel * 1e6, "dense_us": expand * 1e6}
        result["quantized_rows"] = rows
        result["dense_dtype"] = str(dense).removeprefix("torch.")
    return result


def _bf16_wins(m: dict) -> bool:
    return bool(m.get("bf16_gflops")) and m["bf16_gflops"] >= BF16_MIN_SPEEDUP * m["fp32_gflops"]


@functools.cache
def profile() -> dict:
    """The measured profile of this machine (measured once, then read from the cache)."""
    path = _profile_path()
    try:
        data = json.loads(path.read_text())
        if data.get("version") == PROFILE_VERSION:
            return data
    except (OSError, json.JSONDecodeError):
        pass
    data = {"version": PROFILE_VERSION, "cpu": cpu_model(), "threads": torch.get_num_threads(), **measure()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1))
    except OSError:
        pass  # a read-only cache: measure again next time
    return data


# ----------------------------------------------------------------------------- the choices
def compute_dtype() -> tuple[torch.dtype, str]:
    """(dtype, why) for float weights and training autocast on this CPU."""
    if os.environ.get("PICOCHAT_DTYPE") in ("float32", "bfloat16"):
        return getattr(torch, os.environ["PICOCHAT_DTYPE"]), "set by PICOCHAT_DTYPE"
    if not native_bf16():
        return torch.float32, "no native bfloat16 instructions (AVX-512 BF16 / AMX) on this CPU"
    p = profile()
    ratio = (p["bf16_gflops"] or 0) / p["fp32_gflops"]
    if _bf16_wins(p):
        return torch.bfloat16, f"bfloat16 matrix products measured {ratio:.1f}× faster than float32"
    return torch.float32, f"bfloat16 matrix products measured {ratio:.2g}× float32 here (needs {BF16_MIN_SPEEDUP}×)"


def resolve_dtype(dtype) -> torch.dtype:
    """A --dtype value ("auto", "float32", "bfloat16" or a torch.dtype) as a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return compute_dtype()[0]
    if dtype in ("float32", "bfloat16"):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be auto, float32 or bfloat16, not {dtype!r}")


def dense_rows() -> tuple[int | None, torch.dtype]:
    """(rows, dtype): products of at least `rows` rows expand quantized weights to `dtype` and multiply
    densely; fewer rows use the integer kernel. rows None: the kernel always wins (or is not there)."""
    p = profile()
    rows = p.get("quantized_rows")
    if not rows:
        return None, torch.float32
    dense = getattr(torch, p["dense_dtype"])
    threshold = None
    for m, t in sorted(rows.items(), key=lambda kv: -int(kv[0])):  # the smallest size from which dense always wins
        if t["dense_us"] >= t["kernel_us"]:
            break
        threshold = int(m)
    return threshold, dense


def report() -> dict[str, str]:
    """What `picochat info --system` prints: the CPU, what picochat chose for it and the measurements why."""
    p = profile()
    dtype, why = compute_dtype()
    feats = [k for k, v in features().items() if v]
    out = {"cpu": f"{cpu_model()}, {torch.get_num_threads()} threads",
           "torch": f"{torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}",
           "features": ", ".join(feats) or "none of AVX2 / AVX-512 / VNNI / bf16 / AMX"}
    bf16 = f", bfloat16 {p['bf16_gflops']:.0f} GFLOP/s" if p.get("bf16_gflops") else " (no native bfloat16)"
    out["matrix products"] = f"float32 {p['fp32_gflops']:.0f} GFLOP/s{bf16} (256×1024 · 1024×1024, measured once)"
    out["float weights"] = f"{str(dtype).removeprefix('torch.')}: {why}"
    out["training autocast"] = str(dtype).removeprefix("torch.")
    k = kernels.status()
    if k["loaded"]:
        out["quantized kernel"] = f"{k['isa']} (built for this CPU: {k['path']})"
        rows, dense = dense_rows()
        table = p.get("quantized_rows", {})
        if rows is None:
            out["prompts"] = "the integer kernel at every length (expanding the weights never won)"
        else:
            t = table[str(rows)]
            out["prompts"] = (f"from {rows} tokens: weights expanded to {str(dense).removeprefix('torch.')} and "
                              f"a dense product ({t['dense_us']:.0f} µs vs the kernel's {t['kernel_us']:.0f} µs "
                              f"for {rows} rows of 1536×576)")
        out["decoding"] = ("the integer kernel: 4/8-bit weights × activations as two 8-bit planes (~15 bits), "
                           "float32 in between")
    else:
        out["quantized kernel"] = f"not available ({k.get('error', '')[:200]}): quantized weights are expanded to floats"
    out["profile"] = str(_profile_path())
    return out
