"""picochat's compiled CPU kernels (ops.cpp, qmatmul.h): built once per machine, cached, loaded in milliseconds.

The kernel is compiled with `-march=native`, so it uses the best integer dot-product instructions this
CPU has (AVX-512 VNNI, AVX-VNNI, AVX2, or plain C++). The build is keyed by the source, torch's version
and the CPU's flags, and kept in picochat's cache (`~/.cache/picochat/kernels/KEY/`): the first start on a
machine compiles it (about 30 s with gcc), later starts only load the library.

Where no compiler is found (or PICOCHAT_NO_KERNELS=1 is set) `available()` is False and picochat keeps
weights in floating point (a GGUF's quantized tensors are expanded when it loads).
PICOCHAT_MARCH overrides `-march=native` (e.g. `haswell` builds the AVX2 path, `x86-64` the plain C++
one): the tests use it to check every path on one machine.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

from ..hw import cpu_flags
from ..paths import cache_dir

# Passes of at most this many tokens per row (decoding, checking drafted tokens) compute as decoding does:
# the integer kernel for every product, the decode attention kernel a query at a time, so a token's
# numbers do not depend on what else the pass holds.
DECODE_TOKENS = 16

SOURCE = Path(__file__).with_name("ops.cpp")
HEADER = Path(__file__).with_name("qmatmul.h")  # the integer kernel's arithmetic, included by ops.cpp
_lock = threading.Lock()
_state: dict = {}   # "loaded": bool, "error": str, "path": Path


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled; the message holds the compiler's complaint."""


def compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else g++, else c++, else clang++ (None if there is none)."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def march() -> str:
    """The -march the kernel is built for: this CPU (native) unless PICOCHAT_MARCH says otherwise."""
    return os.environ.get("PICOCHAT_MARCH") or "native"


def build_key() -> str:
    """What the compiled library depends on: the source, torch, the Python ABI and this CPU's flags."""
    h = hashlib.sha256(b"".join(p.read_bytes() for p in (SOURCE, HEADER, Path(__file__))))  # source + build
    for part in (torch.__version__, sysconfig.get_config_var("SOABI") or "", " ".join(sorted(cpu_flags())), compiler() or "", march()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    return cache_dir() / "kernels" / build_key() / "picochat_kernels.so"


def build(out: Path) -> None:
    """Compile ops.cpp into `out` (written to a temporary name, then renamed: never half a library)."""
    from torch.utils import cpp_extension
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (install g++, or set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        cmd = [cxx, "-O3", f"-march={march()}", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-w",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *[f"-I{p}" for p in cpp_extension.include_paths()], str(SOURCE), "-o", str(target),
               *[f"-L{p}" for p in cpp_extension.library_paths()],
               *[f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()], "-lc10", "-ltorch_cpu", "-ltorch"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"compiling {SOURCE.name} failed:\n{result.stderr.strip()[-3000:]}")
        os.replace(target, out)


def is_built() -> bool:
    """Whether this machine already has the compiled library (else the first load builds it, ~20-30 s)."""
    try:
        return bool(os.environ.get("PICOCHAT_NO_KERNELS")) or library_path().is_file() or compiler() is None
    except OSError:
        return True


def load() -> bool:
    """Load the kernel library (building it first if this machine has none). True if it is usable."""
    with _lock:
        if "loaded" in _state:
            return _state["loaded"]
        _state["loaded"] = False
        if os.environ.get("PICOCHAT_NO_KERNELS"):
            _state["error"] = "disabled by PICOCHAT_NO_KERNELS"
            return False
        try:
            path = library_path()
            if not path.is_file():
                build(path)
            torch.ops.load_library(str(path))
            _state.update(loaded=True, path=path)
        except (OSError, RuntimeError) as e:
            _state["error"] = str(e)
        return _state["loaded"]


def available() -> bool:
    """Whether the compiled kernel is loaded (loading, and if need be building, it on first call)."""
    return load()


def status() -> dict:
    """What `picochat info --system` shows: loaded or not, why not, the instruction set, where it lives."""
    ok = load()
    info = {"loaded": ok}
    if ok:
        info["isa"] = torch.ops.picochat.isa()
        info["path"] = str(_state["path"])
    else:
        info["error"] = _state.get("error", "")
    return info
