"""ModelConfig: one dataclass describes every model family picochat runs.

GPT-2 (LayerNorm, GELU, learned positions, biases, tied head) and the Llama family
(RMSNorm, SwiGLU, RoPE, grouped-query attention; Qwen2 adds q/k/v biases) differ only
in the switches below, so one model class in model.py covers them all.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ARCHITECTURES = ("gpt2", "llama", "qwen2")
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


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
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; picochat supports {', '.join(ARCHITECTURES)}")
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")

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
        """Build from a Hugging Face config.json dict (GPT2, Llama, Qwen2)."""
        model_type = hf.get("model_type")
        if model_type == "gpt2":
            n_embd = hf["n_embd"]
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
                raise ValueError(f"unsupported GPT-2 activation {act!r}")
            return cls(
                architecture="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                n_head=hf["n_head"], n_kv_head=hf["n_head"], n_embd=n_embd,
                intermediate_size=hf.get("n_inner") or 4 * n_embd, max_seq_len=hf.get("n_positions", 1024),
                norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu",
                position="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                initializer_range=hf.get("initializer_range", 0.02),
                extra={"activation_function": act} if act != "gelu_new" else {},
            )
        if model_type in ("llama", "qwen2"):
            n_head = hf["num_attention_heads"]
            act = hf.get("hidden_act", "silu")
            if act != "silu":
                raise ValueError(f"unsupported {model_type} activation {act!r} (picochat supports silu)")
            rope_theta = hf.get("rope_theta")
            rope_scaling = hf.get("rope_scaling")
            rp = hf.get("rope_parameters")  # newer transformers nest theta and scaling here
            if isinstance(rp, dict):
                rope_theta = rp.get("rope_theta", rope_theta)
                if rp.get("rope_type", "default") != "default":
                    rope_scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
            if rope_scaling is not None:
                kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
                if kind == "default":
                    rope_scaling = None
                elif kind != "llama3":
                    raise ValueError(f"unsupported rope_scaling type {kind!r} (picochat supports llama3)")
            is_qwen = model_type == "qwen2"
            return cls(
                architecture=model_type, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
                head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                intermediate_size=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", position="rope",
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0), rope_scaling=rope_scaling,
                qkv_bias=True if is_qwen else bool(hf.get("attention_bias", False)),
                out_bias=False if is_qwen else bool(hf.get("attention_bias", False)),
                mlp_bias=False if is_qwen else bool(hf.get("mlp_bias", False)),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                initializer_range=hf.get("initializer_range", 0.02),
            )
        raise ValueError(f"unknown model_type {model_type!r} in config.json; picochat loads gpt2, llama and qwen2")

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
