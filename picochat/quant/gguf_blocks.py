"""GGUF's quantized blocks, read exactly into picochat's packed matrices (matrix.py).

Q4_0, Q4_1 and Q4_K become 4-bit codes; Q8_0, Q6_K and the 5-bit types 8-bit codes, each with float16
scales (and mins) per group: `dequantize()` of the result equals gguf's dequantization (to float16
rounding of the K-quants' scales). The bit layouts follow llama.cpp's ggml-quants.c.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .matrix import QuantizedMatrix

# GGUF types kept as integers, and the code width they become
EXACT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q8_0": 8, "Q6_K": 8, "Q5_0": 8, "Q5_1": 8, "Q5_K": 8}


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


class Codes(NamedTuple):
    """A matrix as integer codes with per-group scales (and mins): W[n, k] = scale[n, k // group]·codes[n, k] + min.

    codes are uint8 (4-bit, 0..15) or int8 (8-bit): one byte a weight from the file's blocks to the packed
    layout, never a wider integer (a 1.5B model's codes are 1.5 GB as bytes, 6 GB as int32)."""
    codes: np.ndarray
    scale: np.ndarray           # float16 [n, groups]
    mins: np.ndarray | None     # float16 [n, groups], or None
    bits: int
    group: int

    def take_rows(self, rows: np.ndarray) -> "Codes":
        return Codes(self.codes[rows], self.scale[rows], None if self.mins is None else self.mins[rows],
                     self.bits, self.group)

    def finite(self) -> bool:
        """Whether every scale and min is a number (float16 overflows past 65504: such a tensor is read as floats)."""
        return bool(np.isfinite(self.scale).all() and (self.mins is None or np.isfinite(self.mins).all()))

    def matrix(self) -> QuantizedMatrix:
        return QuantizedMatrix.from_codes(self.codes, self.scale, self.mins, self.bits, self.group)


def from_gguf(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> QuantizedMatrix:
    """A GGUF tensor's raw blocks (uint8, as in the file) -> the same values as 4/8-bit codes with scales.

    dequantize() of the result equals gguf's dequantization (to float16 rounding of the scales of K-quants).
    Only EXACT_TYPES are accepted.
    """
    return decode(type_name, raw, shape).matrix()


def decode(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> Codes:
    """A GGUF tensor's raw blocks -> its codes and scales (see from_gguf), with array operations only."""
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


def _from_legacy(t: str, b: np.ndarray, n: int, k: int) -> Codes:
    """Blocks of 32: Q8_0 (d, int8[32]), Q4_0 (d, nibbles[16]), Q4_1 (d, m, nibbles), Q5_0 (d, qh, nibbles),
    Q5_1 (d, m, qh, nibbles). In a nibble block, weight j is the low nibble of byte j, weight j+16 the high."""
    d = _f16(b[..., 0:2])[..., 0]                                   # (n, blocks)
    if t == "Q8_0":
        codes = b[..., 2:34].copy().view(np.int8).reshape(n, k)
        return Codes(codes, d.astype(np.float16), None, 8, 32)
    has_min = t in ("Q4_1", "Q5_1")
    m = _f16(b[..., 2:4])[..., 0] if has_min else None
    pos = 4 if has_min else 2
    qh = None
    if t.startswith("Q5"):
        qh = b[..., pos:pos + 4].copy().view(np.uint32)[..., 0]
        pos += 4
    qs = b[..., pos:pos + 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)               # (n, blocks, 32) uint8
    if qh is not None:
        q |= (((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
    q = q.reshape(n, k)
    if t == "Q4_0":    # d·(q − 8)
        return Codes(q, d.astype(np.float16), (-8 * d).astype(np.float16), 4, 32)
    if t == "Q4_1":    # d·q + m
        return Codes(q, d.astype(np.float16), m.astype(np.float16), 4, 32)
    # 5-bit codes as signed 8-bit: d·(q − 16) [+ m + 16·d]
    mins = None if t == "Q5_0" else (m + 16 * d).astype(np.float16)
    return Codes(q.view(np.int8) - np.int8(16), d.astype(np.float16), mins, 8, 32)


def _from_k4(t: str, b: np.ndarray, n: int, k: int) -> Codes:
    """Q4_K (d, dmin, scales[12], qs[128]) and Q5_K (the same plus qh[32] before qs): super-blocks of 256 in
    8 groups of 32; weight = d·sc·q − dmin·m. Each 64 weights are 32 bytes, low nibbles then high."""
    d, dmin = _f16(b[..., 0:2])[..., 0], _f16(b[..., 2:4])[..., 0]
    sc, mn = _k_scales(b[..., 4:16])
    scale = (d[..., None] * sc).reshape(n, -1)                    # (n, groups)
    mins = (-(dmin[..., None] * mn)).reshape(n, -1)
    if t == "Q4_K":
        qs = b[..., 16:144].reshape(n, -1, 4, 32)                 # 4 chunks of 64 weights per block
        q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k)
        return Codes(q, scale.astype(np.float16), mins.astype(np.float16), 4, 32)
    qh, qs = b[..., 16:48], b[..., 48:176].reshape(n, -1, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1, 8, 32)
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1   # bit j of qh[l]: group j
    q = (low | (high << 4)).reshape(n, k)
    # d·sc·(q − 16) + (16·d·sc − dmin·m)
    return Codes(q.view(np.int8) - np.int8(16), scale.astype(np.float16), (mins + 16 * scale).astype(np.float16), 8, 32)


def _from_q6_k(b: np.ndarray, n: int, k: int) -> Codes:
    """Q6_K (ql[128], qh[64], int8 scales[16], d): super-blocks of 256 in 16 groups of 16; weight = d·sc·(q − 32)."""
    ql, qh = b[..., 0:128].reshape(n, -1, 2, 64), b[..., 128:192].reshape(n, -1, 2, 32)
    sc = b[..., 192:208].copy().view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])[..., 0]
    # each half of 128 weights: four runs of 32 from the low/high nibbles of ql and 2-bit fields of qh
    low = [ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4]
    q = np.stack([low[i] | (((qh >> (2 * i)) & 3) << 4) for i in range(4)], axis=3)  # (n, blocks, half, run, 32)
    scale = (d[..., None] * sc).reshape(n, -1)                    # (n, groups of 16)
    return Codes(q.reshape(n, k).view(np.int8) - np.int8(32), scale.astype(np.float16), None, 8, 16)
