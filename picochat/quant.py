"""Weights kept as 4- or 8-bit integers: the packed layout, GGUF blocks and float matrices into it, the layers.

A quantized matrix W [out, in] is stored per group of G consecutive inputs as

    W[n, k] = scale[n, g] · q[n, k] + min[n, g]        g = k // G,  q a 4-bit (0..15) or 8-bit (−128..127) code

with scale and min in float16, as GGUF stores them. That represents the GGUF types picochat keeps
quantized (Q4_0, Q4_1, Q4_K as 4-bit codes; Q8_0, Q6_K, Q5_0, Q5_1, Q5_K as 8-bit codes): exactly for
Q4_0, Q4_1, Q8_0 and Q5_0; for the K-quants, whose scale is a float16 times a 6- or 8-bit integer, and
Q5_1's shifted min, the value is rounded to float16 (a relative change of at most 2⁻¹¹ in a group's
scale). The codes are packed for the kernel (kernels/qmatmul.h) in blocks of 16 output rows, each group
of inputs in "VNNI" order: 4 consecutive codes of each of the 16 rows side by side, so that one 64-byte
load feeds one integer dot-product instruction for 16 rows at once (and is a row of an AMX tile).

`QLinear` is the linear layer y = x·Wᵀ (+ b) over such a matrix; it runs on the compiled kernel, which
multiplies 8-bit activations by the integer codes without ever building W in floating point.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CHUNK = 64     # the input dimension is padded to a multiple of this
ROWS = 16      # output rows per block: the 16 lanes of an AVX-512 register, the 16 columns of an AMX tile
# GGUF types kept as integers, and the code width they become
EXACT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q8_0": 8, "Q6_K": 8, "Q5_0": 8, "Q5_1": 8, "Q5_K": 8}


def padded(k: int, multiple: int = CHUNK) -> int:
    return -(-k // multiple) * multiple


# ----------------------------------------------------------------------------- the packed layout
def block_layout(bits: int, group: int, in_features: int, has_min: bool) -> dict[str, int]:
    """Bytes of one block of ROWS rows: per group of inputs, the rows' scales, their mins (if any), then the
    codes in VNNI order (see kernels/qmatmul.h)."""
    groups = padded(in_features) // group
    code_bytes = group // 4 * 64 * bits // 8
    group_bytes = 32 * (2 if has_min else 1) + code_bytes
    return {"groups": groups, "group_bytes": group_bytes, "code_bytes": code_bytes,
            "block_bytes": groups * group_bytes}


def pack(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, bits: int, group: int) -> torch.Tensor:
    """Integer codes [N, K] with float16 scale (and min) [N, ≥K/group] -> the kernel's packed uint8 blocks.

    Per block of ROWS rows and per group g of `group` inputs: scale[16] and min[16] as float16, then the
    codes as group/4 "B rows" of 64 bytes, B row j holding for each row n its codes of inputs g·G+4j..4j+3
    (byte 4n+i). 4-bit codes pair B rows 2t and 2t+1 in one 64 bytes: low and high nibbles.
    """
    n, k = codes.shape
    lay = block_layout(bits, group, k, mins is not None)
    groups = lay["groups"]
    blocks = -(-n // ROWS)
    full = torch.zeros(blocks * ROWS, groups * group, dtype=torch.int16)
    full[:n, :k] = codes.to(torch.int16)
    # (block, row, group, j, i) -> (block, group, j, row, i): B row j = the 4 codes (i) of every row
    brows = full.view(blocks, ROWS, groups, group // 4, 4).permute(0, 2, 3, 1, 4).reshape(blocks, groups, group // 4, 64)
    if bits == 4:
        pairs = brows.view(blocks, groups, group // 8, 2, 64)
        code_part = (pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)).to(torch.uint8).reshape(blocks, groups, -1)
    else:
        code_part = brows.to(torch.int8).view(torch.uint8).reshape(blocks, groups, -1)
    parts = []
    for values in (scale, mins):
        if values is None:
            continue
        v = torch.zeros(blocks * ROWS, groups, dtype=torch.float16)
        v[:n, :values.shape[1]] = values.to(torch.float16)
        parts.append(v.view(blocks, ROWS, groups).transpose(1, 2).contiguous().view(torch.uint8))  # (b, g, 32)
    return torch.cat(parts + [code_part], dim=2).reshape(blocks, -1).contiguous()


def unpack(packed: torch.Tensor, bits: int, group: int, in_features: int, out_features: int,
           has_min: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of pack: (codes [N, K] int32, scale [N, Kp/group] float16, min or None)."""
    lay = block_layout(bits, group, in_features, has_min)
    groups, blocks = lay["groups"], packed.shape[0]
    g = packed.view(blocks, groups, lay["group_bytes"])

    def halves(offset):
        return g[:, :, offset:offset + 32].contiguous().view(torch.float16).transpose(1, 2) \
            .reshape(blocks * ROWS, groups)[:out_features]
    scale = halves(0)
    mins = halves(32) if has_min else None
    code_part = g[:, :, 32 * (2 if has_min else 1):]
    if bits == 4:
        b = code_part.reshape(blocks, groups, group // 8, 64).to(torch.int32)
        brows = torch.stack([b & 0x0F, b >> 4], dim=3).reshape(blocks, groups, group // 4, 64)
    else:
        brows = code_part.contiguous().view(torch.int8).to(torch.int32).reshape(blocks, groups, group // 4, 64)
    codes = brows.view(blocks, groups, group // 4, ROWS, 4).permute(0, 3, 1, 2, 4).reshape(blocks * ROWS, -1)
    return codes[:out_features, :in_features], scale, mins


# ----------------------------------------------------------------------------- the quantized matrix
class QuantizedMatrix:
    """One [out_features, in_features] matrix as packed tiles of integer codes with float16 scales (and mins)."""

    def __init__(self, packed: torch.Tensor, bits: int, group: int, in_features: int, out_features: int,
                 has_min: bool):
        if bits not in (4, 8) or group not in (16, 32, 64):
            raise ValueError(f"unsupported quantization: {bits}-bit codes in groups of {group}")
        lay = block_layout(bits, group, in_features, has_min)
        if tuple(packed.shape) != (-(-out_features // ROWS), lay["block_bytes"]) or packed.dtype != torch.uint8:
            raise ValueError(f"packed {bits}-bit matrix of {out_features}×{in_features} should be uint8 "
                             f"[{-(-out_features // ROWS)}, {lay['block_bytes']}], got {packed.dtype} "
                             f"{list(packed.shape)}")
        self.packed, self.bits, self.group, self.has_min = packed, bits, group, has_min
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_codes(cls, codes, scale, mins, bits: int, group: int) -> "QuantizedMatrix":
        """From integer codes [N, K] and per-group float16 scale (and min) [N, K/group] (tensors or arrays)."""
        codes, scale = torch.as_tensor(codes), torch.as_tensor(scale)
        mins = None if mins is None else torch.as_tensor(mins)
        n, k = codes.shape
        return cls(pack(codes, scale, mins, bits, group), bits, group, k, n, mins is not None)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def spec(self) -> dict:
        """What, besides the packed bytes, describes the matrix (saved in a packed folder's config)."""
        return {"bits": self.bits, "group": self.group, "in_features": self.in_features,
                "out_features": self.out_features, "has_min": self.has_min}

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return unpack(self.packed, self.bits, self.group, self.in_features, self.out_features, self.has_min)

    def dequantize(self, dtype=torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """W (or W[rows]) in floating point: scale · q + min (plain PyTorch; the kernel has its own)."""
        codes, scale, mins = self.unpack()
        if rows is not None:
            codes, scale, mins = codes[rows], scale[rows], (None if mins is None else mins[rows])
        n, k = codes.shape
        kp = padded(k)
        w = F.pad(codes.float(), (0, kp - k)).view(n, -1, self.group) * scale.float().view(n, -1, 1)
        if mins is not None:
            w = w + mins.float().view(n, -1, 1)
        return w.reshape(n, kp)[:, :k].to(dtype)

    def take_rows(self, rows: torch.Tensor) -> "QuantizedMatrix":
        """The matrix of the given output rows (in that order)."""
        codes, scale, mins = self.unpack()
        return QuantizedMatrix.from_codes(codes[rows], scale[rows], None if mins is None else mins[rows],
                                          self.bits, self.group)

    @classmethod
    def cat(cls, parts: list["QuantizedMatrix"]) -> "QuantizedMatrix":
        """Stack matrices along the output dimension (fused q/k/v or gate/up); they must share the format."""
        first = parts[0]
        if any((p.bits, p.group, p.in_features) != (first.bits, first.group, first.in_features) for p in parts):
            raise ValueError("matrices of different quantization formats cannot be fused")
        n = sum(p.out_features for p in parts)
        if all(p.has_min == first.has_min for p in parts) and all(p.out_features % ROWS == 0 for p in parts[:-1]):
            return cls(torch.cat([p.packed for p in parts]), first.bits, first.group, first.in_features, n,
                       first.has_min)  # whole blocks: the packed bytes simply follow each other
        unpacked = [p.unpack() for p in parts]
        has_min = any(m is not None for _, _, m in unpacked)
        mins = torch.cat([m if m is not None else torch.zeros_like(s) for _, s, m in unpacked]) if has_min else None
        return cls.from_codes(torch.cat([c for c, _, _ in unpacked]), torch.cat([s for _, s, _ in unpacked]), mins,
                              first.bits, first.group)


def quantize(weight: torch.Tensor, bits: int, group: int = 32) -> QuantizedMatrix:
    """Quantize a float matrix. 8-bit: symmetric (scale = max|w| / 127, no min), like GGUF Q8_0. 4-bit:
    min/max per group (q = round((w − min) / scale), scale = (max − min) / 15), like GGUF Q4_1.
    Scales and mins are rounded to float16 first, and the codes computed with the rounded values."""
    w = weight.detach().float()
    n, k = w.shape
    kp = padded(k)
    wp = F.pad(w, (0, kp - k)).view(n, kp // group, group)
    if bits == 8:
        scale = (wp.abs().amax(-1) / 127).half()
        s = scale.float()
        codes = torch.round(wp / torch.where(s > 0, s, 1)[..., None]).clamp(-127, 127)
        mins = None
    elif bits == 4:
        mins = wp.amin(-1).half()
        lo = mins.float()
        scale = ((wp.amax(-1) - lo) / 15).half()
        s = scale.float()
        codes = torch.round((wp - lo[..., None]) / torch.where(s > 0, s, 1)[..., None]).clamp(0, 15)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return QuantizedMatrix.from_codes(codes.reshape(n, kp)[:, :k].to(torch.int32), scale, mins, bits, group)


# ----------------------------------------------------------------------------- GGUF blocks, exactly
def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit scales and mins of Q4_K / Q5_K: 12 bytes -> 8 of each (llama.cpp's get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), dtype=np.float32)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def from_gguf(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> QuantizedMatrix:
    """A GGUF tensor's raw blocks (uint8, as in the file) -> the same values as 4/8-bit codes with scales.

    dequantize() of the result equals gguf's dequantization (to float16 rounding of the scales of K-quants).
    Only EXACT_TYPES are accepted.
    """
    n, k = shape
    blocks = raw.reshape(n, -1, raw.size // n // max(1, _blocks_per_row(type_name, k)))
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        return _from_legacy(type_name, blocks, n, k)
    if type_name in ("Q4_K", "Q5_K"):
        return _from_k4(type_name, blocks, n, k)
    if type_name == "Q6_K":
        return _from_q6_k(blocks, n, k)
    raise ValueError(f"GGUF type {type_name} is not kept quantized (it is dequantized instead)")


def _blocks_per_row(type_name: str, k: int) -> int:
    return k // (256 if type_name.endswith("_K") else 32)


def _from_legacy(t: str, b: np.ndarray, n: int, k: int) -> QuantizedMatrix:
    """Blocks of 32: Q8_0 (d, int8[32]), Q4_0 (d, nibbles[16]), Q4_1 (d, m, nibbles), Q5_0 (d, qh, nibbles),
    Q5_1 (d, m, qh, nibbles). In a nibble block, weight j is the low nibble of byte j, weight j+16 the high."""
    d = _f16(b[..., 0:2])[..., 0]                                   # (n, blocks)
    if t == "Q8_0":
        codes = b[..., 2:34].copy().view(np.int8).reshape(n, k)
        return QuantizedMatrix.from_codes(codes.astype(np.int32), d.astype(np.float16), None, 8, 32)
    has_min = t in ("Q4_1", "Q5_1")
    m = _f16(b[..., 2:4])[..., 0] if has_min else None
    pos = 4 if has_min else 2
    qh = None
    if t.startswith("Q5"):
        qh = b[..., pos:pos + 4].copy().view(np.uint32)[..., 0]
        pos += 4
    qs = b[..., pos:pos + 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)  # (n, blocks, 32)
    if qh is not None:
        q |= (((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)
    q = q.reshape(n, k)
    if t == "Q4_0":    # d·(q − 8)
        return QuantizedMatrix.from_codes(q, d.astype(np.float16), (-8 * d).astype(np.float16), 4, 32)
    if t == "Q4_1":    # d·q + m
        return QuantizedMatrix.from_codes(q, d.astype(np.float16), m.astype(np.float16), 4, 32)
    # 5-bit codes as signed 8-bit: d·(q − 16) [+ m + 16·d]
    mins = None if t == "Q5_0" else (m + 16 * d).astype(np.float16)
    return QuantizedMatrix.from_codes(q - 16, d.astype(np.float16), mins, 8, 32)


def _from_k4(t: str, b: np.ndarray, n: int, k: int) -> QuantizedMatrix:
    """Q4_K (d, dmin, scales[12], qs[128]) and Q5_K (the same plus qh[32] before qs): super-blocks of 256 in
    8 groups of 32; weight = d·sc·q − dmin·m. Each 64 weights are 32 bytes, low nibbles then high."""
    d, dmin = _f16(b[..., 0:2])[..., 0], _f16(b[..., 2:4])[..., 0]
    sc, mn = _k_scales(b[..., 4:16])
    scale = (d[..., None] * sc).reshape(n, -1)                    # (n, groups)
    mins = (-(dmin[..., None] * mn)).reshape(n, -1)
    if t == "Q4_K":
        qs = b[..., 16:144].reshape(n, -1, 4, 32)                 # 4 chunks of 64 weights per block
        q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k).astype(np.int32)
        return QuantizedMatrix.from_codes(q, scale.astype(np.float16), mins.astype(np.float16), 4, 32)
    qh, qs = b[..., 16:48], b[..., 48:176].reshape(n, -1, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1, 8, 32).astype(np.int32)
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1   # bit j of qh[l]: group j
    q = (low | (high.astype(np.int32) << 4)).reshape(n, k)
    # d·sc·(q − 16) + (16·d·sc − dmin·m)
    return QuantizedMatrix.from_codes(q - 16, scale.astype(np.float16), (mins + 16 * scale).astype(np.float16), 8, 32)


def _from_q6_k(b: np.ndarray, n: int, k: int) -> QuantizedMatrix:
    """Q6_K (ql[128], qh[64], int8 scales[16], d): super-blocks of 256 in 16 groups of 16; weight = d·sc·(q − 32)."""
    ql, qh = b[..., 0:128].reshape(n, -1, 2, 64), b[..., 128:192].reshape(n, -1, 2, 32)
    sc = b[..., 192:208].copy().view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])[..., 0]
    # each half of 128 weights: four runs of 32 from the low/high nibbles of ql and 2-bit fields of qh
    low = [ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4]
    q = np.stack([low[i].astype(np.int32) | (((qh >> (2 * i)) & 3).astype(np.int32) << 4) for i in range(4)],
                 axis=3)                                          # (n, blocks, half, run, 32)
    scale = (d[..., None] * sc).reshape(n, -1)                    # (n, groups of 16)
    return QuantizedMatrix.from_codes(q.reshape(n, k) - 32, scale.astype(np.float16), None, 8, 16)


# ----------------------------------------------------------------------------- the layers
class DenseRows:
    """Products of at least `rows` rows (a prompt being processed) expand the weights to `dtype` and run a
    dense matrix product; fewer rows (decoding) use the integer kernel. Set per CPU from cpu.dense_rows()."""
    rows: int | None = None
    dtype: torch.dtype = torch.float32
    configured: bool = False  # set once, by use_kernels


@contextlib.contextmanager
def integer_kernel_only():
    """Within this block every product runs on the integer kernel, as decoding does (for measurements)."""
    rows = DenseRows.rows
    DenseRows.rows = None
    try:
        yield
    finally:
        DenseRows.rows = rows


class QLinear(nn.Module):
    """y = x·Wᵀ + b with W kept as integer codes (a QuantizedMatrix); runs on the compiled kernel."""

    def __init__(self, matrix: QuantizedMatrix, bias: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.group, self.has_min = matrix.bits, matrix.group, matrix.has_min
        self.in_features, self.out_features = matrix.in_features, matrix.out_features
        self.register_buffer("qweight", matrix.packed)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def matrix(self) -> QuantizedMatrix:
        return QuantizedMatrix(self.qweight, self.bits, self.group, self.in_features, self.out_features, self.has_min)

    def forward(self, x):
        if DenseRows.rows is not None and x.numel() >= DenseRows.rows * self.in_features:
            w = torch.ops.picochat.dequantize(self.qweight, self.bits, self.group, self.in_features, self.out_features,
                                              self.has_min, DenseRows.dtype)
            y = F.linear(x.to(DenseRows.dtype), w).to(x.dtype)
        else:
            y = torch.ops.picochat.qlinear(x, self.qweight, self.bits, self.group, self.in_features,
                                           self.out_features, self.has_min)
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


def use_kernels() -> bool:
    """Load the compiled kernels (building them on a machine's first use), set DenseRows for this CPU and
    let model.py's RMSNorm and RoPE use them when generating. False where they are not available
    (kernels.status() says why)."""
    from . import cpu, kernels, model
    if not kernels.available():
        return False
    if not DenseRows.configured:
        DenseRows.rows, DenseRows.dtype = cpu.dense_rows()
        model.CPU_KERNELS = True
        DenseRows.configured = True
    return True


def quantize_model(model: nn.Module, bits: int, group: int = 32) -> nn.Module:
    """Quantize a float GPT in place: every projection of the blocks to `bits`-bit codes, the token
    embedding (and the output head, tied or not) to 8 bits, as llama.cpp's Q4 files keep them."""
    if not use_kernels():
        from . import kernels
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
    return model
