"""Where picochat keeps what it makes: one cache folder, and nothing written anywhere else by default.

    cache_dir()/models/     models fetched by `picochat pull` (hub.py)
    cache_dir()/packed/     GGUF files converted for the integer kernel, keyed by their hash (load.py)
    cache_dir()/kernels/    the compiled CPU kernels, keyed by source, torch and CPU (kernels/)
    cache_dir()/cpu/        what was measured on this CPU (quant/tuning.py)
    cache_dir()/kb/         knowledge bases by name (apps/kb.py)

The ground floor: it imports nothing of picochat.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """picochat's cache: $PICOCHAT_HOME, else $XDG_CACHE_HOME/picochat, else ~/.cache/picochat."""
    if os.environ.get("PICOCHAT_HOME"):
        return Path(os.environ["PICOCHAT_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "picochat"
