"""Turning a model file into a ready model: a -m argument -> (GPT, tokenizer), set up for this CPU.

    load("smollm2")          a packaged GGUF: its quantized matrices stay integer codes on the compiled
                             kernel, q/k/v and gate/up fused, the conversion cached (a second start maps it)
    load("out/demo")         a Hugging Face folder or a training run (its newest checkpoint), float weights
    load("out/faq")          a LoRA adapter folder: its base, with the adapter folded in

Where the file comes from is hub.py; how each format is read is formats/; what runs fastest on this
CPU (precision, integer kernel or dense products) is quant/tuning.py. This module decides, per load,
and sets the choice on the model it returns: nothing here changes another module's state.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, kernels
from .atomic import atomic_write
from .formats.bert import load_sentence_encoder
from .formats.gguf import load_gguf
from .formats.hf import CheckpointError, load_hf_folder
from .formats.packed import FORMAT, assemble, fill, is_packed_folder, load_packed, save_packed, split_state_dict
from .formats.peft import merge_into_state_dict, read_adapter
from .hub import (DEFAULT_EMBEDDING, EMBEDDING_MODELS, ModelNotFound, embedding_name, find_embedding,
                  paired_draft, resolve_with_adapter)
from .model.config import ModelConfig
from .model.encoder import SentenceEncoder
from .model.gpt import GPT
from .model.lora import LoRAConfig, LowRankAdded
from .paths import cache_dir
from .quant.layers import (PROMPT_ACT_BITS, choose_prompt_bits, fuse_linears, use_dense_rows,
                           use_prompt_activation_bits)
from .quant.tuning import compute_dtype, dense_rows, resolve_dtype
from .tokenizer.bpe import Tokenizer


CONVERSION = 2   # what a cached conversion holds (2: its prompt precision); a new one converts again

# Text whose prompt logits decide, once per converted model, whether its prompts may use 8-bit activations
# (quant.layers.choose_prompt_bits): prose, code and Chinese, ~150 tokens.
PRECISION_SAMPLE = ("The history of computing is a story of people finding ways to make machines do work that once "
                    "required careful human attention. Early calculators could add and multiply, but each step had "
                    "to be set by hand.\n\ndef merge(intervals):\n    intervals = sorted(intervals)\n    out = "
                    "[list(intervals[0])]\n    for start, end in intervals[1:]:\n        if start <= out[-1][1]:\n"
                    "            out[-1][1] = max(out[-1][1], end)\n        else:\n            out.append([start, end])"
                    "\n    return out\n\n自注意力机制使得模型能够捕捉长距离依赖关系，书店位于杭州市西湖区文三路。")


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
    draft: GPT | None = None                      # a smaller model of the same tokenizer, for speculative decoding
    draft_path: Path | None = None


def load(model: str | None = None, dtype="auto", adapter=None, quantized: bool = True, fuse: bool = True,
         cache: bool = True, draft: str | None = "auto", prompt_bits: int | None = None) -> LoadedModel:
    """Load a model and its tokenizer from a -m argument (see hub.resolve), ready to generate.

    dtype: "auto" (what is fastest on this CPU, see quant.tuning.compute_dtype), "float32", "bfloat16" or a
    torch.dtype: the dtype of float weights and activations. A quantized model keeps float32 activations
    under "auto" (its kernel multiplies 8-bit activations by integer weights either way).
    quantized: a GGUF's Q4_0/Q4_1/Q4_K/Q8_0/Q6_K/Q5_x matrices stay integer codes (quant/) where the
    compiled kernel is available; False expands them to float. fuse: q/k/v and gate/up become one matrix
    each (for generation; pass fuse=False, quantized=False to train, merge or save the model).
    cache: a converted GGUF is kept in picochat's cache as a packed folder, so the next start maps it.
    prompt_bits: quantized weights multiply a prompt's activations as 8-bit integers (llama.cpp's precision,
    1.5× faster prompts) or 15-bit (what decoding uses: float32's numbers); None: what was measured for this
    model when it was converted (quant.layers.choose_prompt_bits).
    draft: the model that drafts tokens for speculative decoding (LoadedModel.draft; Engine(..., draft=)):
    "auto" is the known model's paired draft when it is installed (Qwen2.5-Coder-1.5B: the 0.5B), a -m
    argument names one, None loads none.

    adapter: a LoRA adapter folder (PEFT format: adapter_config.json + adapter_model.safetensors): folded
    into float weights, or kept beside quantized ones (`attach_adapter`), which stay on the integer kernel.
    A -m pointing at an adapter folder (or none, with an adapter) loads the base the adapter names
    (base_model_name_or_path: a path, relative to the adapter folder or not, or a packaged name).
    """
    path, adapter = resolve_with_adapter(model, adapter)
    has_codes = path.is_file() or is_packed_folder(path)  # only GGUF files and packed folders hold integer codes
    keep_quantized = quantized and has_codes and kernels.available()
    act, why = _activation_dtype(dtype, keep_quantized)
    fold = None if keep_quantized else adapter   # an adapter is folded into float weights, else kept beside
    if is_packed_folder(path):
        loaded = _load_packed_folder(path, act, why)
    else:
        cached = _load_cached(path, fuse, act, why) if keep_quantized and cache and path.is_file() else None
        loaded = cached or _convert(path, fold, keep_quantized, act, why, fuse, cache)
    if adapter is not None and fold is None:
        attach_adapter(loaded.model, *read_adapter(adapter, loaded.model.config)[:2])
    loaded = _set_up_for_this_cpu(loaded, fuse)
    if prompt_bits is not None and loaded.weights == "quantized":
        use_prompt_activation_bits(loaded.model, prompt_bits)
    if draft == "auto":  # (the base's paired draft guesses for an adapted model too: the check keeps it exact)
        draft = paired_draft(path) if fuse else None
    if draft is not None:
        drafter = load(draft, dtype, quantized=quantized, cache=cache, draft=None, prompt_bits=prompt_bits)
        if drafter.model.config.vocab_size != loaded.model.config.vocab_size or \
                drafter.tokenizer.backend.get_vocab() != loaded.tokenizer.backend.get_vocab():
            raise ValueError(f"the draft model {drafter.path} has another tokenizer than {loaded.path}: a draft "
                             "must share the model's vocabulary (--draft ngram or off to go without one)")
        loaded.draft, loaded.draft_path = drafter.model, drafter.path
    return loaded


def _activation_dtype(dtype, keep_quantized: bool) -> tuple[torch.dtype, str]:
    if dtype not in (None, "auto"):
        return resolve_dtype(dtype), "given"
    if keep_quantized:
        return torch.float32, "quantized weights: float32 activations into the integer kernel"
    return compute_dtype()


def _set_up_for_this_cpu(loaded: LoadedModel, fuse: bool) -> LoadedModel:
    """The per-CPU choices, set on this model: generation's RMSNorm, RoPE and attention on the compiled kernels
    (for float weights too), and from how many rows a quantized product expands its weights (tuning)."""
    if (fuse or loaded.weights == "quantized") and kernels.available():
        loaded.model.use_cpu_kernels()
    if loaded.weights == "quantized":
        use_dense_rows(loaded.model, *dense_rows())
    return loaded


def _load_packed_folder(path: Path, act, why) -> LoadedModel:
    if not kernels.available():
        raise RuntimeError(f"{path} is a packed (quantized) model, which needs picochat's compiled kernel: "
                           f"{kernels.status().get('error', '')}")
    net, tokenizer, gen, qc = load_packed(path, act)
    use_prompt_activation_bits(net, qc.get("prompt_act_bits", PROMPT_ACT_BITS))
    return LoadedModel(net, tokenizer, path, "packed", qc.get("tensor_types", {}), gen, "quantized", act, why)


def _load_cached(path: Path, fuse: bool, act, why) -> LoadedModel | None:
    """A GGUF file's packed conversion from the cache (None when there is none)."""
    cached = _cached_conversion(path, fuse)
    if cached is None or not cached.is_dir():
        return None
    try:
        net, tokenizer, gen, qc = load_packed(cached, act)
    except (CheckpointError, ValueError, OSError):
        shutil.rmtree(cached, ignore_errors=True)  # a stale or damaged entry: convert again
        return None
    use_prompt_activation_bits(net, qc.get("prompt_act_bits", PROMPT_ACT_BITS))
    return LoadedModel(net, tokenizer, path, "gguf", qc.get("tensor_types", {}), gen, "quantized", act, why,
                       from_cache=True)


def _convert(path: Path, adapter, keep_quantized: bool, act, why, fuse: bool, cache: bool) -> LoadedModel:
    """Read a Hugging Face folder or a GGUF file (folding in an adapter), build the model, cache a conversion."""
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
        lora_config, tensors, _ = read_adapter(adapter, config)
        sd = merge_into_state_dict(sd, lora_config, tensors)
    tensors, specs = split_state_dict(sd, config)
    net = assemble(config, tensors, specs, act, str(path)) if specs else build_model(config, sd, act, str(path))
    if fuse:
        fuse_projections(net)
    extra = {"tensor_types": types}
    if specs and kernels.available():
        extra["prompt_act_bits"] = choose_prompt_bits(net, tokenizer.encode(PRECISION_SAMPLE))
        use_prompt_activation_bits(net, extra["prompt_act_bits"])
    if specs and fuse and cache and path.is_file():
        try:
            save_packed(net, tokenizer, _cached_conversion(path, fuse, create=True), gen, extra)
        except OSError:
            pass  # a read-only cache: convert again next time
    return LoadedModel(net, tokenizer, path, fmt, types, gen, "quantized" if specs else "float", act, why)


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
    for block in model.layers:
        a, m = block.attn, block.mlp
        if a.qkv_proj is None and (fused := fuse_linears([a.q_proj, a.k_proj, a.v_proj])) is not None:
            a.qkv_proj = fused
            del a.q_proj, a.k_proj, a.v_proj
        if m.swiglu and m.gate_up_proj is None and (fused := fuse_linears([m.gate_proj, m.up_proj])) is not None:
            m.gate_up_proj = fused
            del m.gate_proj, m.up_proj
    return model


# the projections fuse_projections joins, and their parts in the order they are joined
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def attach_adapter(model: GPT, config: LoRAConfig, tensors: dict) -> GPT:
    """A LoRA adapter (picochat-named tensors, formats.peft.read_adapter) beside the model's weights as they
    are: quantized layers keep their codes and their kernel (model.lora.LowRankAdded). A projection fused for
    generation gets its parts' updates stacked: W_qkv x + B A x with A = [A_q; A_k; A_v] and B block-diagonal
    (zero rows for a part the adapter leaves alone), which is q, k and v each with its own update."""
    updates = {}
    for name in sorted({k.partition(".lora_")[0] for k in tensors}):
        A, B = tensors.get(name + ".lora_A.weight"), tensors.get(name + ".lora_B.weight")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointError(f"the adapter's {name} lacks lora_A/lora_B or their shapes do not fit each other")
        updates[name] = (A.float(), B.float() * config.scaling)
    for i, block in enumerate(model.layers):
        for owner, prefix in ((block.attn, f"layers.{i}.attn."), (block.mlp, f"layers.{i}.mlp.")):
            for attr, layer in list(owner.named_children()):
                parts = FUSED_PARTS.get(attr, (attr,))
                found = {p: updates.pop(prefix + p) for p in parts if prefix + p in updates}
                if found:
                    setattr(owner, attr, _stacked_update(layer, parts, found, model.config, prefix))
    if updates:
        raise CheckpointError(f"the adapter's {next(iter(updates))} names no layer of this model: "
                              f"is it for this base model?")
    return model


def _stacked_update(layer, parts: tuple, found: dict, config: ModelConfig, prefix: str) -> LowRankAdded:
    """One LowRankAdded for a layer holding `parts` (one, or the parts of a fused projection) side by side."""
    kv = config.n_kv_head * config.head_dim
    sizes = {"q_proj": config.n_head * config.head_dim, "k_proj": kv, "v_proj": kv,
             "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size}
    outs = [sizes[p] for p in parts] if len(parts) > 1 else [layer.out_features]
    A = torch.cat([a for a, _ in found.values()])
    B = torch.zeros(layer.out_features, A.shape[0])
    row, col = 0, 0
    for part, out in zip(parts, outs):
        if part in found:
            a, b = found[part]
            if a.shape[1] != layer.in_features or b.shape[0] != out:
                raise CheckpointError(f"the adapter's {prefix + part} has shapes A {tuple(a.shape)}, B "
                                      f"{tuple(b.shape)}, which do not fit the base layer ({layer.in_features} "
                                      f"in, {out} out): is it for this base model?")
            B[row:row + out, col:col + a.shape[0]] = b
            col += a.shape[0]
        row += out
    return LowRankAdded(layer, A, B)


def _cached_conversion(path: Path, fuse: bool, create: bool = False) -> Path | None:
    """The cache folder for a GGUF file's packed conversion: named by the file's SHA-256 and picochat's version.

    The hash of a file is computed once and remembered by (path, size, modification time), so a second
    start does not read the whole file to find its conversion."""
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
    return cache_dir() / "packed" / f"{digest}-{FORMAT}-v{__version__}-c{CONVERSION}{'' if fuse else '-unfused'}"


# ----------------------------------------------------------------------------- the sentence encoder
def load_encoder(path: str | None = None) -> SentenceEncoder:
    """Load a sentence encoder from a Hugging Face BERT folder; None → the default embedding model.

    Raises hub.ModelNotFound (a FileNotFoundError) when there is no model, saying to run
    `picochat pull minilm`, and formats.bert.EncoderFormatError (a ValueError) for a folder that is not
    a BERT model."""
    if path is None or (str(path) in EMBEDDING_MODELS and not Path(path).exists()):  # a name: minilm
        folder = find_embedding(DEFAULT_EMBEDDING if path is None else str(path))
    else:
        folder = Path(path).expanduser()
        if not folder.exists():
            raise ModelNotFound(f"no embedding model at {folder}: give a Hugging Face BERT folder, or run "
                                f"`picochat pull {DEFAULT_EMBEDDING}` for the default one")
    return load_sentence_encoder(folder, embedding_name(folder))
