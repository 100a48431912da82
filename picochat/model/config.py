"""ModelConfig: one dataclass describes every model family picochat runs.

GPT-2 (LayerNorm, GELU, learned positions, biases, tied head) and the Llama family
(RMSNorm, SwiGLU, RoPE, grouped-query attention; Qwen2 adds q/k/v biases) differ only
in the switches below, so one model class in model.py covers them all.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

ARCHITECTURES = ("gpt2", "llama", "qwen2")
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned")
# Upper bounds on sizes: far beyond any released model, low enough that a corrupt or hostile value is refused
# before it sizes a weight matrix or a KV cache (a context of 2^40 positions would allocate until out of memory).
MAX_CONTEXT = 1 << 20
MAX_SIZE = {"vocab_size": 1 << 24, "n_layer": 4096, "n_head": 4096, "n_kv_head": 4096, "n_embd": 1 << 18,
            "head_dim": 1 << 14, "intermediate_size": 1 << 20, "max_seq_len": MAX_CONTEXT}


class ConfigError(ValueError):
    """A model configuration that describes no working model; the message names the field and the problem."""


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not 1 <= value <= MAX_SIZE[name]:
        raise ConfigError(f"{name} must be between 1 and {MAX_SIZE[name]:,}, got {value!r}")
    return int(value)


def _check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def _check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_token_id(name: str, value, vocab_size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value < vocab_size:
        raise ConfigError(f"{name} must be a token id in the vocabulary (0..{vocab_size - 1}) or null, got {value!r}")


def _check_rope_scaling(s) -> None:
    """Llama 3 scaling: the numbers model.rope_frequencies divides by must be finite and positive."""
    if not isinstance(s, dict):
        raise ConfigError(f"rope_scaling must be an object (Llama 3 scaling) or null, got {s!r}")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in s:
            raise ConfigError(f"rope_scaling lacks {key!r}")
    for key in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"):
        if key in s:
            _check_positive_float(f"rope_scaling.{key}", s[key])
    if s.get("high_freq_factor", 4.0) <= s.get("low_freq_factor", 1.0):
        raise ConfigError(f"rope_scaling.high_freq_factor must exceed low_freq_factor, got "
                          f"{s.get('high_freq_factor')!r} and {s.get('low_freq_factor')!r}")


_REQUIRED = object()


def _hf_value(hf: dict, key: str, default):
    """hf[key]; a missing or null field gives `default` (an error where the field is required)."""
    v = hf.get(key)
    if v is None:
        if default is _REQUIRED:
            raise ConfigError(f"the required field {key!r} is missing")
        return default
    return v


def _hf_size(hf: dict, key: str, default=_REQUIRED) -> int:
    v = _hf_value(hf, key, default)
    if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
        raise ConfigError(f"{key!r} must be a positive integer, got {v!r}")
    return int(v)


def _hf_number(hf: dict, key: str, default: float, positive: bool = False) -> float:
    v = _hf_value(hf, key, default)
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or (positive and v <= 0):
        raise ConfigError(f"{key!r} must be a finite{' positive' if positive else ''} number, got {v!r}")
    return float(v)


def _hf_token_id(hf: dict, key: str, vocab_size: int):
    """A token id field (an id, a list of ids, or null). Ids outside the vocabulary are dropped, not refused:
    transformers' own defaults write them (GPT2Config's 50256 whatever the vocabulary), and no such token can
    ever be read or produced. Anything but integers is refused."""
    v = hf.get(key)
    ids = v if isinstance(v, list) else [v]
    if any(i is not None and (isinstance(i, bool) or not isinstance(i, Integral)) for i in ids):
        raise ConfigError(f"{key!r} must be a token id, a list of them, or null; got {v!r}")
    kept = [int(i) for i in ids if i is not None and 0 <= i < vocab_size]
    if isinstance(v, list):
        return kept or None
    return kept[0] if kept else None


def _hf_bool(hf: dict, key: str, default: bool) -> bool:
    v = _hf_value(hf, key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{key!r} must be true or false, got {v!r}")
    return v


# picochat's field -> the config.json key it comes from, for messages about a file the user has
_LLAMA_NAMES = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads",
                "n_embd": "hidden_size", "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps"}
_GPT2_NAMES = {"intermediate_size": "n_inner", "max_seq_len": "n_positions", "norm_eps": "layer_norm_epsilon"}


def _with_hf_names(cls, fields: dict, names: dict):
    """cls(**fields), with a validation message that starts with picochat's field name naming the HF key too."""
    try:
        return cls(**fields)
    except ConfigError as e:
        field, _, rest = str(e).partition(" ")
        if field not in names:
            raise
        raise ConfigError(f"{names[field]!r} ({field}) {rest}") from None


@dataclass
class ModelConfig:
    architecture: str = "llama"          # "gpt2" | "llama" | "qwen2": which HF family this maps to
    vocab_size: int = 32768
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 6                   # < n_head means grouped-query attention
    n_embd: int = 384
    head_dim: int | None = None          # default n_embd // n_head
    intermediate_size: int = 1536        # MLP hidden width
    max_seq_len: int = 1024              # context length
    norm: str = "rmsnorm"                # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"                  # "swiglu" | "gelu" (GPT-2's tanh-approximated GELU)
    position: str = "rope"               # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # Llama 3 "llama3" frequency scaling, as in HF config.json
    qkv_bias: bool = False               # Qwen2 and GPT-2 have q/k/v biases
    out_bias: bool = False               # GPT-2: attention output and MLP biases
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # HF config keys we carry but do not use

    def __post_init__(self):
        """Validate every field, so presets, flags, GGUF metadata and config.json files all pass one gate."""
        if not isinstance(self.architecture, str) or self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {self.architecture!r}; picochat supports "
                              f"{', '.join(ARCHITECTURES)}")
        self._check_shape()
        self._check_switches()
        self._check_token_ids()

    def _check_shape(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "max_seq_len"):
            setattr(self, name, _check_size(name, getattr(self, name)))
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), "
                                  f"or head_dim must be given")
            self.head_dim = self.n_embd // self.n_head
        self.head_dim = _check_size("head_dim", self.head_dim)
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")

    def _check_switches(self):
        _check_choice("norm", self.norm, NORMS)
        _check_choice("mlp", self.mlp, MLPS)
        _check_choice("position", self.position, POSITIONS)
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary positions (RoPE rotates pairs), got {self.head_dim}")
        self.norm_eps = _check_positive_float("norm_eps", self.norm_eps)
        self.rope_theta = _check_positive_float("rope_theta", self.rope_theta)
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        for name in ("qkv_bias", "out_bias", "mlp_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        ir = self.initializer_range
        if isinstance(ir, bool) or not isinstance(ir, Real) or not math.isfinite(ir) or ir < 0:
            raise ConfigError(f"initializer_range must be a finite number >= 0, got {ir!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a dict, got {self.extra!r}")

    def _check_token_ids(self):
        if self.bos_token_id is not None:
            _check_token_id("bos_token_id", self.bos_token_id, self.vocab_size)
        eos = self.eos_token_id
        for token in (eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]):
            _check_token_id("eos_token_id", token, self.vocab_size)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (GPT2, Llama, Qwen2). Raises ConfigError naming the field."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json must be a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type == "gpt2":
            n_embd, vocab_size = _hf_size(hf, "n_embd"), _hf_size(hf, "vocab_size")
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
                raise ConfigError(f"unsupported GPT-2 activation {act!r}")
            fields = dict(
                architecture="gpt2", vocab_size=vocab_size, n_layer=_hf_size(hf, "n_layer"),
                n_head=_hf_size(hf, "n_head"), n_kv_head=_hf_size(hf, "n_head"), n_embd=n_embd,
                intermediate_size=_hf_size(hf, "n_inner", 4 * n_embd), max_seq_len=_hf_size(hf, "n_positions", 1024),
                norm="layernorm", norm_eps=_hf_number(hf, "layer_norm_epsilon", 1e-5, positive=True), mlp="gelu",
                position="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                tie_word_embeddings=_hf_bool(hf, "tie_word_embeddings", True),
                bos_token_id=_hf_token_id(hf, "bos_token_id", vocab_size),
                eos_token_id=_hf_token_id(hf, "eos_token_id", vocab_size),
                initializer_range=_hf_number(hf, "initializer_range", 0.02),
                extra={"activation_function": act} if act != "gelu_new" else {},
            )
            return _with_hf_names(cls, fields, _GPT2_NAMES)
        if model_type in ("llama", "qwen2"):
            n_head, hidden = _hf_size(hf, "num_attention_heads"), _hf_size(hf, "hidden_size")
            vocab_size = _hf_size(hf, "vocab_size")
            act = hf.get("hidden_act", "silu")
            if act != "silu":
                raise ConfigError(f"unsupported {model_type} activation {act!r} (picochat supports silu)")
            rope_theta = hf.get("rope_theta")
            rope_scaling = hf.get("rope_scaling")
            rp = hf.get("rope_parameters")  # newer transformers nest theta and scaling here
            if isinstance(rp, dict):
                rope_theta = rp.get("rope_theta", rope_theta)
                if rp.get("rope_type", "default") != "default":
                    rope_scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
            if rope_scaling is not None:
                if not isinstance(rope_scaling, dict):
                    raise ConfigError(f"'rope_scaling' must be an object or null, got {rope_scaling!r}")
                kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
                if kind == "default":
                    rope_scaling = None
                elif kind != "llama3":
                    raise ConfigError(f"unsupported rope_scaling type {kind!r} (picochat supports llama3)")
            is_qwen = model_type == "qwen2"
            attention_bias = _hf_bool(hf, "attention_bias", False)
            fields = dict(
                architecture=model_type, vocab_size=vocab_size,
                n_layer=_hf_size(hf, "num_hidden_layers"), n_head=n_head,
                n_kv_head=_hf_size(hf, "num_key_value_heads", n_head), n_embd=hidden,
                head_dim=_hf_size(hf, "head_dim", hidden // n_head),
                intermediate_size=_hf_size(hf, "intermediate_size"),
                max_seq_len=_hf_size(hf, "max_position_embeddings", 2048),
                norm="rmsnorm", norm_eps=_hf_number(hf, "rms_norm_eps", 1e-6, positive=True), mlp="swiglu",
                position="rope", rope_scaling=rope_scaling,
                rope_theta=_hf_number({"rope_theta": rope_theta}, "rope_theta", 10000.0, positive=True),
                qkv_bias=True if is_qwen else attention_bias,
                out_bias=False if is_qwen else attention_bias,
                mlp_bias=False if is_qwen else _hf_bool(hf, "mlp_bias", False),
                tie_word_embeddings=_hf_bool(hf, "tie_word_embeddings", False),
                bos_token_id=_hf_token_id(hf, "bos_token_id", vocab_size),
                eos_token_id=_hf_token_id(hf, "eos_token_id", vocab_size),
                initializer_range=_hf_number(hf, "initializer_range", 0.02),
            )
            return _with_hf_names(cls, fields, _LLAMA_NAMES)
        raise ConfigError(f"unknown model_type {model_type!r} in config.json; picochat loads gpt2, llama and qwen2")

    def to_hf(self, torch_dtype: str = "float32") -> dict:
        """The Hugging Face config.json dict that transformers loads as the same model."""
        common = {"architectures": [HF_CLASS[self.architecture]], "vocab_size": self.vocab_size,
                  "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
                  "eos_token_id": self.eos_token_id, "initializer_range": self.initializer_range,
                  "torch_dtype": torch_dtype, "dtype": torch_dtype, "use_cache": True}
        if self.architecture == "gpt2":
            return {**common, "model_type": "gpt2", "n_layer": self.n_layer, "n_head": self.n_head,
                    "n_embd": self.n_embd, "n_inner": self.intermediate_size, "n_positions": self.max_seq_len,
                    "n_ctx": self.max_seq_len, "layer_norm_epsilon": self.norm_eps,
                    "activation_function": self.extra.get("activation_function", "gelu_new"),
                    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        hf = {**common, "model_type": self.architecture, "num_hidden_layers": self.n_layer,
              "num_attention_heads": self.n_head, "num_key_value_heads": self.n_kv_head,
              "hidden_size": self.n_embd, "head_dim": self.head_dim, "intermediate_size": self.intermediate_size,
              "max_position_embeddings": self.max_seq_len, "rms_norm_eps": self.norm_eps, "hidden_act": "silu",
              "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling, "attention_dropout": 0.0}
        if self.architecture == "llama":
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        return hf


# Presets for models picochat trains itself; train.TRAIN_PRESETS holds the matching training settings.
# vocab_size is a placeholder: training takes it from the dataset's tokenizer.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                        intermediate_size=192, max_seq_len=128),
    # ~10 minutes on 2 CPU cores (Llama-style: RMSNorm, SwiGLU, RoPE, tied head)
    "demo": ModelConfig(vocab_size=8192, n_layer=4, n_head=4, n_kv_head=4, n_embd=256,
                        intermediate_size=768, max_seq_len=256),
    # ~1 hour on 2 CPU cores
    "small": ModelConfig(vocab_size=8192, n_layer=6, n_head=6, n_kv_head=6, n_embd=384,
                         intermediate_size=1024, max_seq_len=512),
    # GPT-2 small, GPT-2's own architecture (LayerNorm, GELU, learned positions, biases, tied head)
    "gpt2-124m": ModelConfig(architecture="gpt2", vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12,
                             n_embd=768, intermediate_size=3072, max_seq_len=1024, norm="layernorm", mlp="gelu",
                             position="learned", qkv_bias=True, out_bias=True, mlp_bias=True),
    # nanochat's depth-20 model: width 64·depth, 128-wide heads, untied head; SwiGLU sized to its MLP's params
    "d20": ModelConfig(vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280,
                       intermediate_size=3456, max_seq_len=2048, tie_word_embeddings=False),
}
