"""GGUF files (llama.cpp's model format) into picochat: a ModelConfig plus a state dict in picochat's names.

The container itself (header, metadata, tensor records, raw tensor data) is read by gguf_reader.py.

How llama.cpp's convert_hf_to_gguf stores each family, and what we undo here:
  * dims are written fastest-varying first (ggml order): a tensor with GGUF dims [in, out] is the
    numpy/torch array of shape [out, in] -- exactly nn.Linear's layout, so no transposes for llama/qwen2.
  * llama arch: attn_q / attn_k rows are permuted per head from HF's "rotate_half" layout to the
    interleaved-pairs layout (LlamaModel.permute: reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)).
    We apply the inverse (reshape(n_head, hd/2, 2, ...).swapaxes(1, 2)), with n_kv_head for attn_k,
    to weights and biases -- as transformers' LlamaTensorProcessor does.  qwen2 arch is not permuted.
  * gpt2 arch: HF's Conv1D weights ([in, out]) are transposed on conversion, so the GGUF arrays are
    already [out, in]; attn_qkv is the fused c_attn ([3*n_embd, n_embd], rows q|k|v) which we split.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..hw import check_memory
from ..model.config import ConfigError, ModelConfig
from ..quant.gguf_blocks import EXACT_TYPES, decode
from .gguf_reader import SUPPORTED_TENSOR_TYPES, GGUFError, GGUFHeader, GGUFTensorInfo, read_gguf_header, read_tensor

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gpt2")

# ----------------------------------------------------------------------------- config
def _key(h: GGUFHeader, arch: str, name: str, default=None, required: bool = False):
    k = f"{arch}.{name}"
    if k not in h.metadata:
        if required:
            raise GGUFError(f"{h.path}: metadata key {k!r} is missing, so the model shape is unknown. "
                            f"The file is incomplete or was written by an incompatible tool; re-convert it.")
        return default
    v = h.metadata[k]
    if isinstance(v, list):  # some writers give per-layer arrays; picochat needs them uniform
        if not v or any(x != v[0] for x in v):
            raise GGUFError(f"{h.path}: metadata key {k!r} varies per layer ({v[:8]}...), "
                            f"which picochat's uniform layers do not support.")
        v = v[0]
    return v


def _llama3_rope_scaling(h: GGUFHeader, theta: float, head_dim: int) -> dict | None:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's `rope_freqs` tensor (per-frequency divisors)."""
    info = h.tensors.get("rope_freqs.weight")
    if info is None:
        return None
    if info.n_elements != head_dim // 2:  # checked before reading: the header alone may claim any size
        raise GGUFError(f"{h.path}: rope_freqs.weight has {info.n_elements:,} values, expected head_dim/2 = "
                        f"{head_dim // 2}. The file is inconsistent; re-convert it.")
    factors = read_tensor(h, info).astype(np.float64).ravel()
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    for orig in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low in (1.0, 0.5, 2.0):
            for high in (4.0, 2.0, 8.0):
                if high <= low:
                    continue
                smooth = (orig / wavelen - low) / (high - low)
                expected = np.where(wavelen < orig / high, 1.0,
                                    np.where(wavelen > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
                if np.allclose(expected, factors, rtol=1e-3, atol=1e-4):
                    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": orig}
    raise GGUFError(f"{h.path}: its rope_freqs tensor is not a Llama-3 RoPE scaling picochat recognizes, so "
                    f"positions would be encoded wrongly. Use a model without custom RoPE frequencies.")


def config_from_gguf(h: GGUFHeader) -> ModelConfig:
    """The ModelConfig a GGUF header describes (from metadata plus tensor shapes).  Raises GGUFError."""
    try:
        return _config_from_gguf(h)
    except GGUFError:
        raise
    except ConfigError as e:
        raise GGUFError(f"{h.path}: its hyper-parameters do not form a valid model: {e}. "
                        f"The file is corrupt or unusual; re-convert it.") from e
    except Exception as e:  # e.g. a corrupt value of the wrong type
        raise GGUFError(f"{h.path}: its hyper-parameters do not form a valid model config "
                        f"({type(e).__name__}: {e}). The file is corrupt or unusual; re-convert it.") from e


def _config_from_gguf(h: GGUFHeader) -> ModelConfig:
    arch = h.architecture
    if arch is None:
        raise GGUFError(f"{h.path} has no general.architecture key, so picochat cannot tell which model it is. "
                        f"Re-convert it with llama.cpp's convert_hf_to_gguf.py.")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{h.path}: architecture {arch!r} is not supported; picochat loads "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}. Pick a GGUF of one of those model families.")
    t = h.tensors
    n_layer = int(_key(h, arch, "block_count", required=True))
    n_embd = int(_key(h, arch, "embedding_length", required=True))
    n_head = int(_key(h, arch, "attention.head_count", required=True))
    n_ctx = int(_key(h, arch, "context_length", required=True))
    if "token_embd.weight" not in t:
        raise GGUFError(f"{h.path} is missing tensor 'token_embd.weight' (the token embeddings). "
                        f"The file is incomplete; get or convert it again.")
    vocab = t["token_embd.weight"].shape[0]
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > vocab:
        raise GGUFError(f"{h.path}: the tokenizer has {len(tokens)} tokens but the embedding only {vocab} rows. "
                        f"The file is inconsistent; get or convert it again.")
    ffn = _key(h, arch, "feed_forward_length")
    if ffn is None:
        ffn = t["blk.0.ffn_up.weight"].shape[0] if "blk.0.ffn_up.weight" in t else 4 * n_embd
    if n_layer > len(t):
        raise GGUFError(f"{h.path}: block_count is {n_layer} but the file holds only {len(t)} tensors; "
                        f"the file is corrupt or incomplete. Get or convert it again.")
    tied = "output.weight" not in t
    bos = h.metadata.get("tokenizer.ggml.bos_token_id")
    eos = h.metadata.get("tokenizer.ggml.eos_token_id")
    # end-of-turn / end-of-message ids (Llama 3 <|eot_id|>, <|eom_id|>) also end generation
    extra_eos = [h.metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    extra_eos = [e for e in dict.fromkeys(extra_eos) if isinstance(e, int) and e != eos]
    if extra_eos:
        eos = ([eos] if isinstance(eos, int) else []) + extra_eos
    common = dict(architecture=arch, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                  intermediate_size=int(ffn), max_seq_len=n_ctx, tie_word_embeddings=tied,
                  bos_token_id=bos, eos_token_id=eos)
    if n_head <= 0 or n_embd <= 0 or n_layer <= 0:
        raise GGUFError(f"{h.path}: nonsensical hyper-parameters (block_count={n_layer}, "
                        f"embedding_length={n_embd}, head_count={n_head}); the file is corrupt.")
    if arch == "gpt2":
        if n_embd % n_head:
            raise GGUFError(f"{h.path}: embedding_length {n_embd} is not divisible by head_count {n_head}.")
        return ModelConfig(**common, n_kv_head=n_head, head_dim=n_embd // n_head,
                           norm="layernorm", norm_eps=float(_key(h, arch, "attention.layer_norm_epsilon", 1e-5)),
                           mlp="gelu", position="learned", qkv_bias=True, out_bias=True, mlp_bias=True)
    # llama / qwen2
    n_kv = int(_key(h, arch, "attention.head_count_kv", n_head))
    head_dim = _key(h, arch, "attention.key_length")
    if head_dim is None and "blk.0.attn_q.weight" in t and t["blk.0.attn_q.weight"].shape[0] % n_head == 0:
        head_dim = t["blk.0.attn_q.weight"].shape[0] // n_head
    if head_dim is None:
        head_dim = _key(h, arch, "rope.dimension_count", n_embd // n_head)
    head_dim = int(head_dim)
    rot = _key(h, arch, "rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise GGUFError(f"{h.path}: rope.dimension_count {rot} differs from the head size {head_dim} "
                        f"(partial rotary embeddings), which picochat does not support.")
    value_length = _key(h, arch, "attention.value_length")
    if value_length is not None and int(value_length) != head_dim:
        raise GGUFError(f"{h.path}: attention key and value head sizes differ ({head_dim} vs {value_length}), "
                        f"which picochat does not support.")
    theta = float(_key(h, arch, "rope.freq_base", 10000.0))
    scaling_type = _key(h, arch, "rope.scaling.type", "none")
    if scaling_type == "linear" and float(_key(h, arch, "rope.scaling.factor", 1.0)) == 1.0:
        scaling_type = "none"
    if scaling_type not in ("none", None):
        raise GGUFError(f"{h.path}: RoPE scaling type {scaling_type!r} is not supported "
                        f"(picochat supports Llama-3 scaling only).")
    if n_kv <= 0 or n_head % n_kv:
        raise GGUFError(f"{h.path}: head_count {n_head} is not a multiple of head_count_kv {n_kv}; "
                        f"the file is corrupt.")
    has = lambda suffix: f"blk.0.{suffix}" in t  # noqa: E731
    is_qwen = arch == "qwen2"
    return ModelConfig(**common, n_kv_head=n_kv, head_dim=head_dim, norm="rmsnorm",
                       norm_eps=float(_key(h, arch, "attention.layer_norm_rms_epsilon", 1e-5)),
                       mlp="swiglu", position="rope", rope_theta=theta,
                       rope_scaling=_llama3_rope_scaling(h, theta, head_dim),
                       qkv_bias=True if is_qwen else has("attn_q.bias"),
                       out_bias=False if is_qwen else has("attn_output.bias"),
                       mlp_bias=False if is_qwen else (has("ffn_up.bias") or has("ffn_down.bias")))


# ----------------------------------------------------------------------------- tensor plan
def _tensor_plan(cfg: ModelConfig) -> list[tuple[str, str, tuple[int, ...], tuple]]:
    """(our state-dict name, GGUF tensor name, expected GGUF logical shape, transform) for every parameter."""
    E, V, F, hd = cfg.n_embd, cfg.vocab_size, cfg.intermediate_size, cfg.head_dim
    q_out, kv_out = cfg.n_head * hd, cfg.n_kv_head * hd
    plan = [("embed.weight", "token_embd.weight", (V, E), ())]
    if cfg.position == "learned":
        plan.append(("pos_embed.weight", "position_embd.weight", (cfg.max_seq_len, E), ()))
    ln = cfg.norm == "layernorm"
    permute = cfg.architecture == "llama"  # llama.cpp permutes q/k for llama arch only
    for i in range(cfg.n_layer):
        b, o = f"blk.{i}.", f"layers.{i}."
        plan.append((o + "attn_norm.weight", b + "attn_norm.weight", (E,), ()))
        if ln:
            plan.append((o + "attn_norm.bias", b + "attn_norm.bias", (E,), ()))
        if cfg.architecture == "gpt2":  # fused c_attn: rows are q | k | v
            for j, w in enumerate("qkv"):
                plan.append((o + f"attn.{w}_proj.weight", b + "attn_qkv.weight", (3 * E, E), ("split", j, 3)))
                plan.append((o + f"attn.{w}_proj.bias", b + "attn_qkv.bias", (3 * E,), ("split", j, 3)))
        else:
            for w, rows, heads in (("q", q_out, cfg.n_head), ("k", kv_out, cfg.n_kv_head), ("v", kv_out, None)):
                tf = ("unpermute", heads) if permute and heads else ()
                plan.append((o + f"attn.{w}_proj.weight", b + f"attn_{w}.weight", (rows, E), tf))
                if cfg.qkv_bias:
                    plan.append((o + f"attn.{w}_proj.bias", b + f"attn_{w}.bias", (rows,), tf))
        plan.append((o + "attn.o_proj.weight", b + "attn_output.weight", (E, q_out), ()))
        if cfg.out_bias:
            plan.append((o + "attn.o_proj.bias", b + "attn_output.bias", (E,), ()))
        plan.append((o + "mlp_norm.weight", b + "ffn_norm.weight", (E,), ()))
        if ln:
            plan.append((o + "mlp_norm.bias", b + "ffn_norm.bias", (E,), ()))
        mlp = (["gate"] if cfg.mlp == "swiglu" else []) + ["up"]
        for w in mlp:
            plan.append((o + f"mlp.{w}_proj.weight", b + f"ffn_{w}.weight", (F, E), ()))
            if cfg.mlp_bias:
                plan.append((o + f"mlp.{w}_proj.bias", b + f"ffn_{w}.bias", (F,), ()))
        plan.append((o + "mlp.down_proj.weight", b + "ffn_down.weight", (E, F), ()))
        if cfg.mlp_bias:
            plan.append((o + "mlp.down_proj.bias", b + "ffn_down.bias", (E,), ()))
    plan.append(("norm.weight", "output_norm.weight", (E,), ()))
    if ln:
        plan.append(("norm.bias", "output_norm.bias", (E,), ()))
    if not cfg.tie_word_embeddings:
        plan.append(("lm_head.weight", "output.weight", (V, E), ()))
    return plan


def _check_plan(h: GGUFHeader, cfg: ModelConfig, plan) -> None:
    missing = sorted({g for _, g, _, _ in plan if g not in h.tensors}, key=_natural)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
        raise GGUFError(f"{h.path} is missing {len(missing)} tensor(s) a {cfg.architecture} model with "
                        f"{cfg.n_layer} layers needs: {shown}. The file is incomplete or not a standard "
                        f"llama.cpp conversion; get or convert it again.")
    bad = []
    for _, g, shape, _ in plan:
        got = h.tensors[g].shape
        if got != shape and not (len(shape) == 1 and got == (1,) * (len(got) - 1) + shape):
            bad.append(f"{g!r} is {list(got)}, expected {list(shape)}")
    bad = list(dict.fromkeys(bad))
    if bad:
        raise GGUFError(f"{h.path}: tensor shapes do not match its metadata ({cfg.architecture}, n_embd={cfg.n_embd}, "
                        f"n_head={cfg.n_head}, n_kv_head={cfg.n_kv_head}, head_dim={cfg.head_dim}, "
                        f"ffn={cfg.intermediate_size}, vocab={cfg.vocab_size}): " + "; ".join(bad[:6])
                        + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
                        + ". The file is inconsistent; re-convert it.")
    unsupported = sorted({(g, h.tensors[g].type_name) for _, g, _, _ in plan
                          if h.tensors[g].type_name not in SUPPORTED_TENSOR_TYPES}, key=lambda x: _natural(x[0]))
    if unsupported:
        names = ", ".join(f"{g!r} ({tn})" for g, tn in unsupported[:6])
        raise GGUFError(f"{h.path}: picochat cannot dequantize tensor type(s) of {names}"
                        + (f" and {len(unsupported) - 6} more" if len(unsupported) > 6 else "")
                        + f". Supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}; use a GGUF quantized with one "
                        f"of those (e.g. Q4_K_M, Q8_0 or F16).")


def _natural(name: str):
    return [int(s) if s.isdigit() else s for s in name.replace(".", " . ").split()]


def _keeps_quantized(ours: str, info: GGUFTensorInfo) -> bool:
    """Matrices the model multiplies by (projections, the embedding / output head) in an exact integer type."""
    return (len(info.dims) == 2 and info.type_name in EXACT_TYPES
            and ours.endswith(("_proj.weight", "embed.weight", "lm_head.weight")) and ours != "pos_embed.weight")


def _read_quantized(h: GGUFHeader, info: GGUFTensorInfo, f, tf):
    """One matrix as a quant.QuantizedMatrix, with the row transform of the plan (unpermute, split) applied;
    None if its scales do not fit the packed format."""
    f.seek(info.offset)
    raw = f.read(info.n_bytes)
    if len(raw) != info.n_bytes:
        raise GGUFError(f"{h.path} is truncated: tensor {info.name!r} needs {info.n_bytes:,} bytes at offset "
                        f"{info.offset:,} but only {len(raw):,} could be read. Get the file again.")
    try:
        codes = decode(info.type_name, np.frombuffer(raw, dtype=np.uint8), info.shape)
    except Exception as e:
        raise GGUFError(f"{h.path}: could not read tensor {info.name!r} ({info.type_name}, shape "
                        f"{list(info.shape)}): {type(e).__name__}: {e}") from e
    if not codes.finite():
        return None  # scales beyond float16's range (or a corrupt tensor): read it as floats, which checks it
    n = info.shape[0]
    if tf and tf[0] == "unpermute":
        codes = codes.take_rows(_unpermute(np.arange(n)[:, None], tf[1])[:, 0])
    elif tf and tf[0] == "split":
        part = n // tf[2]
        codes = codes.take_rows(np.arange(tf[1] * part, (tf[1] + 1) * part))
    return codes.matrix()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's LlamaModel.permute: interleaved-pair rows back to HF rotate_half rows."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_size(h: GGUFHeader, plan, keep_quantized: bool) -> int:
    """Bytes load_gguf will hold: each tensor as float32 (or as its file bytes where it stays quantized), plus
    the largest tensor once more while it is being dequantized."""
    sizes = {}
    for ours, g, _, _ in plan:
        info = h.tensors[g]
        quantized = keep_quantized and _keeps_quantized(ours, info)
        sizes[g] = info.n_bytes if quantized else 4 * info.n_elements
    return sum(sizes.values()) + max(sizes.values(), default=0)


# ----------------------------------------------------------------------------- public API
@dataclass
class GGUFModel:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]     # float32, our names, loadable into picochat.model.GPT
    metadata: dict[str, Any]                # every key/value field (tokenizer.* included), plain Python values
    tensor_types: dict[str, int]            # {"Q4_1": 210, "Q8_0": 1, "F32": 61}: count of tensors per ggml type
    file_size: int
    path: str = ""

    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")


def load_gguf(path: str | os.PathLike, keep_quantized: bool = False) -> GGUFModel:
    """Load a llama / qwen2 / gpt2 GGUF file: config, float32 state dict (dequantized), metadata.

    The state dict uses picochat's names and loads into picochat.model.GPT(config) with strict=True.
    keep_quantized: matrices of the types quant.EXACT_TYPES lists (Q4_0, Q4_1, Q4_K, Q8_0, Q6_K, Q5_x)
    come as quant.QuantizedMatrix (the same values as integer codes, never expanded to float) instead.
    Raises GGUFError (a ValueError) naming the file and the problem for anything unreadable.
    """
    h = read_gguf_header(path)
    try:
        cfg = config_from_gguf(h)
        plan = _tensor_plan(cfg)
        _check_plan(h, cfg, plan)  # all names, shapes and types are checked before any dequantization
        check_memory(_load_size(h, plan, keep_quantized), f"loading {h.path}", GGUFError)
        sd: dict[str, torch.Tensor] = {}
        cache: dict[str, np.ndarray] = {}
        with open(h.path, "rb") as f:
            for ours, g, shape, tf in plan:
                if keep_quantized and _keeps_quantized(ours, h.tensors[g]):
                    matrix = _read_quantized(h, h.tensors[g], f, tf)
                    if matrix is not None:
                        sd[ours] = matrix
                        continue
                if g not in cache:
                    cache = {g: read_tensor(h, h.tensors[g], f)}  # a fused qkv is read once, used three times
                w = cache[g].reshape(shape)  # a 1-D norm stored as [1, n] comes out [n]
                if tf and tf[0] == "unpermute":
                    w = _unpermute(w, tf[1])
                elif tf and tf[0] == "split":
                    w = np.split(w, tf[2], axis=0)[tf[1]]
                sd[ours] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    except GGUFError:
        raise
    except OSError as e:
        raise GGUFError(f"{h.path} cannot be read: {e}") from e
    except Exception as e:  # never let a raw traceback type escape for a bad file
        raise GGUFError(f"{h.path}: could not load the model: {type(e).__name__}: {e}") from e
    counts = Counter(t.type_name for t in h.tensors.values())
    return GGUFModel(config=cfg, state_dict=sd, metadata=h.metadata,
                     tensor_types=dict(counts.most_common()), file_size=h.file_size, path=h.path)


def gguf_tensor_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What `picochat info` shows, from the header only (no dequantization).

    Keys: path, file_size, version, architecture, name, n_tensors, n_params, tensor_types, context_length,
    chat_template (bool), vocab_size, config (ModelConfig or None) and config_error (str or None).
    """
    h = read_gguf_header(path)
    arch = h.architecture
    cfg, err = None, None
    try:
        cfg = config_from_gguf(h)
        _check_plan(h, cfg, _tensor_plan(cfg))
    except GGUFError as e:
        err = str(e)
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    ctx = h.metadata.get(f"{arch}.context_length") if arch else None
    return {
        "path": h.path, "file_size": h.file_size, "version": h.version, "architecture": arch,
        "name": h.metadata.get("general.name"),
        "n_tensors": len(h.tensors),
        "n_params": sum(t.n_elements for t in h.tensors.values() if t.name != "rope_freqs.weight"),
        "tensor_types": dict(Counter(t.type_name for t in h.tensors.values()).most_common()),
        "file_type": h.metadata.get("general.file_type"),
        "context_length": ctx,
        "chat_template": bool(h.metadata.get("tokenizer.chat_template")),
        "vocab_size": cfg.vocab_size if cfg else (len(tokens) if isinstance(tokens, list) else None),
        "config": cfg, "config_error": err,
    }
