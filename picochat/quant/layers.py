"""Layers over quantized matrices: QLinear (y = x·Wᵀ + b on the integer kernel), QEmbedding, fused
projections, and `quantize_model`, which turns a float model's projections into them.

QLinear runs on the compiled kernel, which multiplies 8-bit activations by the integer codes without
ever building W in floating point — what decoding wants (one token: bound by reading the weights). A
prompt of many tokens may be faster as "expand W to bfloat16/float32, then one dense product" (with AMX
from ~256 tokens); from how many rows, and in which dtype, is measured per CPU (tuning.dense_rows) and set
on a model's layers by `use_dense_rows`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..kernels import DECODE_TOKENS
from .matrix import QuantizedMatrix, quantize
from .tuning import dense_rows


# A product of more than DECODE_TOKENS rows (a prompt) may quantize its activations to one 8-bit plane, as
# llama.cpp does for every product: such products are bound by arithmetic, and the second plane doubles it
# (a 512-token prompt of Qwen2.5-Coder-1.5B: 150 vs 97 tok/s on 2 Zen 4 cores). Whether a model tolerates it
# is measured once per model (choose_prompt_bits: Qwen2.5-Coder yes, SmolLM2-135M no); the default is
# both planes. Decoding, and checking drafted tokens, always keep both (~15 bits): bound by memory, they
# get the precision for free.
PROMPT_ACT_BITS = 15


class QLinear(nn.Module):
    """y = x·Wᵀ + b with W kept as integer codes (a QuantizedMatrix); runs on the compiled kernel."""

    def __init__(self, matrix: QuantizedMatrix, bias: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.group, self.has_min = matrix.bits, matrix.group, matrix.has_min
        self.in_features, self.out_features = matrix.in_features, matrix.out_features
        self.register_buffer("qweight", matrix.packed)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dense_rows: int | None = None      # products of at least this many rows go dense (None: never)
        self.dense_dtype = torch.float32        # ... expanding the weights to this dtype (see use_dense_rows)
        self.prompt_act_bits = PROMPT_ACT_BITS  # activation bits of products of many rows (see above)

    @property
    def matrix(self) -> QuantizedMatrix:
        return QuantizedMatrix(self.qweight, self.bits, self.group, self.in_features, self.out_features, self.has_min)

    def forward(self, x):
        rows = x.numel() // self.in_features
        # (up to DECODE_TOKENS rows — decoding, checking drafted tokens — always the kernel: the same numbers)
        if self.dense_rows is not None and rows >= max(self.dense_rows, DECODE_TOKENS + 1):
            w = torch.ops.picochat.dequantize(self.qweight, self.bits, self.group, self.in_features, self.out_features,
                                              self.has_min, self.dense_dtype)
            y = F.linear(x.to(self.dense_dtype), w).to(x.dtype)
        else:  # decoding: ~15-bit activations (free: bound by memory); a prompt: 8-bit, half the arithmetic
            act_bits = 15 if rows <= DECODE_TOKENS else self.prompt_act_bits
            y = torch.ops.picochat.qlinear(x, self.qweight, self.bits, self.group, self.in_features,
                                           self.out_features, self.has_min, act_bits)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.bits}-bit, group={self.group}"


class QEmbedding(nn.Module):
    """A token-embedding table kept as integer codes: looking up a token dequantizes its row only."""

    def __init__(self, matrix: QuantizedMatrix, dtype=torch.float32):
        super().__init__()
        self.dtype = dtype
        self.bits, self.group, self.has_min = matrix.bits, matrix.group, matrix.has_min
        self.num_embeddings, self.embedding_dim = matrix.out_features, matrix.in_features
        self.register_buffer("qweight", matrix.packed)

    @property
    def matrix(self) -> QuantizedMatrix:
        return QuantizedMatrix(self.qweight, self.bits, self.group, self.embedding_dim, self.num_embeddings,
                               self.has_min)

    def forward(self, idx):
        rows = torch.ops.picochat.dequantize(self.qweight, self.bits, self.group, self.embedding_dim,
                                             self.num_embeddings, self.has_min, torch.float32, idx.reshape(-1))
        return rows.to(self.dtype).view(*idx.shape, self.embedding_dim)


def fuse_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing all of `layers` (same input) as consecutive slices of its output: fewer, larger
    matrix products. nn.Linear or QLinear of one format; None where they cannot be fused."""
    biases = [layer.bias for layer in layers]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    if all(type(layer) is nn.Linear for layer in layers):
        weight = torch.cat([layer.weight.detach() for layer in layers])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        return fused
    if all(isinstance(layer, QLinear) for layer in layers):
        try:
            return QLinear(QuantizedMatrix.cat([layer.matrix for layer in layers]), bias)
        except ValueError:  # different formats (e.g. a Q4_K_M file's Q6_K attn_v beside Q4_K attn_q)
            return None
    return None


def quantize_model(model: nn.Module, bits: int, group: int = 32) -> nn.Module:
    """Quantize a float GPT in place: every projection of the blocks to `bits`-bit codes, the token
    embedding (and the output head, tied or not) to 8 bits, as llama.cpp's Q4 files keep them."""
    if not kernels.available():
        raise RuntimeError(f"quantized models need picochat's compiled kernel: {kernels.status().get('error')}")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("layers."):
            parent, _, attr = name.rpartition(".")
            bias = None if module.bias is None else module.bias.detach().float()
            setattr(model.get_submodule(parent), attr, QLinear(quantize(module.weight, bits, group), bias))
    if isinstance(model.embed, nn.Embedding):
        model.embed = QEmbedding(quantize(model.embed.weight, 8, group))
    if model.lm_head is None:  # tied: the head multiplies by the embedding's codes
        model.lm_head = QLinear(model.embed.matrix)
    elif isinstance(model.lm_head, nn.Linear):
        model.lm_head = QLinear(quantize(model.lm_head.weight, 8, group))
    return use_dense_rows(model, *dense_rows())


def use_dense_rows(model: nn.Module, rows: int | None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Products of at least `rows` rows (a prompt being processed) expand the weights to `dtype` and run a
    dense matrix product; fewer rows (decoding) use the integer kernel. rows None: always the kernel."""
    for module in model.modules():
        if isinstance(module, QLinear):
            module.dense_rows, module.dense_dtype = rows, dtype
    return model


def use_prompt_activation_bits(model: nn.Module, bits: int) -> nn.Module:
    """Quantize the activations of prompt-sized products (more than DECODE_TOKENS rows) to 8 bits (llama.cpp's
    precision, half the arithmetic) or 15 (two planes: what decoding uses, dequantize-then-multiply's numbers)."""
    if bits not in (8, 15):
        raise ValueError(f"prompt activation bits must be 8 or 15, got {bits}")
    for module in model.modules():
        if isinstance(module, QLinear):
            module.prompt_act_bits = bits
    return model


@torch.inference_mode()
def choose_prompt_bits(model: nn.Module, ids: list[int], max_kl: float = 0.01) -> int:
    """8 if the model's next-token distributions over the prompt `ids` with 8-bit activations stay within
    `max_kl` nats (mean KL divergence) of those with ~15 bits, else 15. Measured once per model when it is
    converted (on PRECISION_SAMPLE: Qwen2.5-Coder-1.5B 0.004, its 0.5B 0.0007, SmolLM2-135M 0.024)."""
    x = torch.tensor([ids])
    logp = {}
    for bits in (15, 8):
        use_prompt_activation_bits(model, bits)
        logp[bits] = torch.log_softmax(model(x)[0][0].float(), dim=-1)
    use_prompt_activation_bits(model, PROMPT_ACT_BITS)
    kl = (logp[15].exp() * (logp[15] - logp[8])).sum(-1).mean().item()   # KL(p15 ‖ p8), per position
    return 8 if kl <= max_kl else 15


@contextlib.contextmanager
def integer_kernel_only(model: nn.Module):
    """Within this block every product of `model` runs on the integer kernel, as decoding does (for measurements)."""
    layers = [m for m in model.modules() if isinstance(m, QLinear)]
    saved = [m.dense_rows for m in layers]
    for m in layers:
        m.dense_rows = None
    try:
        yield model
    finally:
        for m, rows in zip(layers, saved):
            m.dense_rows = rows
