"""Hugging Face checkpoint folders <-> picochat state dicts.

A folder holds config.json, model.safetensors (or sharded model-0000x-of-0000y.safetensors with an
index), tokenizer files and generation_config.json. picochat reads GPT2LMHeadModel, LlamaForCausalLM
and Qwen2ForCausalLM folders, and writes its own models in that layout so transformers, vLLM and
llama.cpp's converters read them. Weights are safetensors only: pickle files are refused.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write
from ..hw import check_memory
from ..model.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and the problem."""


# --------------------------------------------------------------------------- name maps
# (picochat name prefix, HF name prefix) pairs; one list per direction because regex groups don't invert.
_LLAMA_TO_HF = [  # llama and qwen2
    (r"embed\.", "model.embed_tokens."),
    (r"layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
    (r"norm\.", "model.norm."),
    (r"lm_head\.", "lm_head."),
]
_LLAMA_FROM_HF = [
    (r"model\.embed_tokens\.", "embed."),
    (r"model\.layers\.(\d+)\.self_attn\.", r"layers.\1.attn."),
    (r"model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attn_norm."),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.mlp_norm."),
    (r"model\.layers\.(\d+)\.mlp\.", r"layers.\1.mlp."),
    (r"model\.norm\.", "norm."),
    (r"lm_head\.", "lm_head."),
]
_GPT2_TO_HF = [  # q/k/v are fused into c_attn separately
    (r"embed\.", "transformer.wte."),
    (r"pos_embed\.", "transformer.wpe."),
    (r"layers\.(\d+)\.attn_norm\.", r"transformer.h.\1.ln_1."),
    (r"layers\.(\d+)\.attn\.o_proj\.", r"transformer.h.\1.attn.c_proj."),
    (r"layers\.(\d+)\.mlp_norm\.", r"transformer.h.\1.ln_2."),
    (r"layers\.(\d+)\.mlp\.up_proj\.", r"transformer.h.\1.mlp.c_fc."),
    (r"layers\.(\d+)\.mlp\.down_proj\.", r"transformer.h.\1.mlp.c_proj."),
    (r"norm\.", "transformer.ln_f."),
    (r"lm_head\.", "lm_head."),
]
_GPT2_FROM_HF = [
    (r"wte\.", "embed."),
    (r"wpe\.", "pos_embed."),
    (r"h\.(\d+)\.ln_1\.", r"layers.\1.attn_norm."),
    (r"h\.(\d+)\.attn\.c_proj\.", r"layers.\1.attn.o_proj."),
    (r"h\.(\d+)\.ln_2\.", r"layers.\1.mlp_norm."),
    (r"h\.(\d+)\.mlp\.c_fc\.", r"layers.\1.mlp.up_proj."),
    (r"h\.(\d+)\.mlp\.c_proj\.", r"layers.\1.mlp.down_proj."),
    (r"ln_f\.", "norm."),
    (r"lm_head\.", "lm_head."),
]


def _rename(name: str, rules) -> str | None:
    for pattern, replacement in rules:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name, count=1)
    return None  # a buffer such as rotary_emb.inv_freq or GPT-2's attn.bias mask: recomputed, not loaded


def _is_conv1d(hf_name: str) -> bool:
    """GPT-2's Conv1D layers store weights as [in, out], the transpose of nn.Linear."""
    return ".c_" in hf_name and hf_name.endswith(".weight")


def hf_to_picochat(hf_sd: dict, config: ModelConfig) -> dict:
    """Rename (and for GPT-2 transpose and split) a HF state dict into picochat's names."""
    sd = {}
    for hf_name, t in hf_sd.items():
        if config.architecture != "gpt2":
            name = _rename(hf_name, _LLAMA_FROM_HF)
        else:
            hf_name = hf_name.removeprefix("transformer.")
            m = re.fullmatch(r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", hf_name)
            if m:  # fused q|k|v -> three projections
                i, kind = m.groups()
                parts = (t.t() if kind == "weight" else t).chunk(3, dim=0)
                for proj, part in zip("qkv", parts):
                    sd[f"layers.{i}.attn.{proj}_proj.{kind}"] = part.contiguous()
                continue
            name = _rename(hf_name, _GPT2_FROM_HF)
            if name is not None and _is_conv1d(hf_name):
                t = t.t().contiguous()
        if name is not None:
            sd[name] = t
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def picochat_to_hf(sd: dict, config: ModelConfig) -> dict:
    """picochat state dict -> the names (and layouts) transformers expects."""
    out = {}
    for name, t in sd.items():
        if config.architecture != "gpt2":
            out[_rename(name, _LLAMA_TO_HF)] = t
            continue
        m = re.fullmatch(r"layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)", name)
        if m:  # fuse q|k|v into c_attn, once, when we meet q
            i, proj, kind = m.groups()
            if proj == "q":
                qkv = torch.cat([sd[f"layers.{i}.attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)
                out[f"transformer.h.{i}.attn.c_attn.{kind}"] = qkv.t().contiguous() if kind == "weight" else qkv
            continue
        hf_name = _rename(name, _GPT2_TO_HF)
        out[hf_name] = t.t().contiguous() if _is_conv1d(hf_name) else t
    return out


# --------------------------------------------------------------------------- load
MAX_JSON_BYTES = 64 << 20  # config.json and the shard index are a few kB; refuse before reading a huge one


def _read_json(path: Path):
    """A small JSON file's value; CheckpointError for a missing, huge, undecodable or too deeply nested one."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path} is {path.stat().st_size:,} bytes, too large for a JSON settings file "
                                  f"(the limit is {MAX_JSON_BYTES:,})")
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {type(e).__name__}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None


def read_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a HF folder's config.json; CheckpointError naming the file and the field."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json: not a Hugging Face model folder")
    hf = _read_json(path)
    try:
        return ModelConfig.from_hf(hf)
    except ValueError as e:  # ConfigError: the message names the field
        raise CheckpointError(f"{path}: {e}") from None


def _inside(folder: Path, name, what: str) -> Path:
    """folder/name, refusing a name that leaves the folder: absolute, with '..', or a symlink pointing out.

    A Hugging Face hub cache snapshot (…/snapshots/REV/) links its files to ../../blobs/, so there the
    repository folder two levels up is the boundary.
    """
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise CheckpointError(f"{what} names the file {name!r}, which is not a file name inside {folder}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{what} names {name!r}, which is outside {folder}: a shard must be a file inside "
                              f"the model folder")
    root = folder.resolve()
    if root.parent.name == "snapshots":
        root = root.parent.parent
    target = (folder / rel).resolve()
    if not target.is_relative_to(root):
        raise CheckpointError(f"{what} names {name!r}, which leads outside {folder} (to {target}); "
                              f"a shard must be a file inside the model folder")
    return folder / rel


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder (single file or shards listed by an index), all inside the folder."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [_inside(folder, single.name, str(folder))]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = _shard_names(index)
        paths = [_inside(folder, n, str(index)) for n in names]
        missing = [n for n, p in zip(names, paths) if not p.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return paths
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt*")):
        raise CheckpointError(f"{folder} holds only pickle weights (*.bin/*.pt); picochat loads safetensors only — "
                              "convert with transformers: model.save_pretrained(dir, safe_serialization=True)")
    raise CheckpointError(f"{folder} has no model.safetensors")


def _shard_names(index: Path) -> list[str]:
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in weight_map.items()):
        raise CheckpointError(f"{index} is not a valid safetensors index: it needs a \"weight_map\" object "
                              f"mapping tensor names to shard file names")
    return sorted(set(weight_map.values()))


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; any refusal of the library (a header that lies about offsets, dtypes or shapes)
    becomes a CheckpointError naming the file."""
    try:
        tensors = load_file(path)
    except Exception as e:  # SafetensorError, OSError, and whatever a future version raises for a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name!r} holds {str(t.dtype).removeprefix('torch.')} values; "
                                  f"model weights must be floating point")
    return tensors


def load_hf_folder(folder) -> tuple[ModelConfig, dict]:
    """Read a HF model folder -> (ModelConfig, picochat state dict). Raises CheckpointError for a bad folder."""
    folder = Path(folder)
    config = read_config(folder)
    files = weight_files(folder)
    check_memory(sum(f.stat().st_size for f in files), f"loading {folder}", CheckpointError)
    hf_sd = {}
    for f in files:
        tensors = _load_weights(f)
        twice = sorted(set(tensors) & set(hf_sd))
        if twice:
            raise CheckpointError(f"{f}: tensor {twice[0]!r} is also in another shard; the folder is inconsistent")
        hf_sd.update(tensors)
    try:
        return config, hf_to_picochat(hf_sd, config)
    except RuntimeError as e:  # a tensor of the wrong rank (GPT-2's Conv1D transposes)
        raise CheckpointError(f"{folder}: a tensor does not have the shape {config.architecture} needs ({e})") from None


# --------------------------------------------------------------------------- save
def generation_config(config: ModelConfig, **sampling) -> dict:
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, **sampling}


def save_hf_folder(model, folder, tokenizer=None, sampling: dict | None = None) -> Path:
    """Write `model` (a picochat GPT) as a HF folder that transformers' from_pretrained loads.

    Every file is written to a temporary name and renamed, so an interrupted save never leaves a
    half-written checkpoint under the real name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    hf_sd = {k: v.detach().contiguous().cpu() for k, v in picochat_to_hf(model.state_dict(), config).items()}
    atomic_write(folder / "model.safetensors", lambda p: save_file(hf_sd, p, metadata={"format": "pt"}))
    atomic_write(folder / "config.json", lambda p: Path(p).write_text(json.dumps(config.to_hf(dtype), indent=2)))
    gen = generation_config(config, **(sampling or {}))
    atomic_write(folder / "generation_config.json", lambda p: Path(p).write_text(json.dumps(gen, indent=2)))
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def is_hf_folder(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
