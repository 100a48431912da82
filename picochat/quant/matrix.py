"""Weights kept as 4- or 8-bit integers: the packed layout, and float matrices into it.

A quantized matrix W [out, in] is stored per group of G consecutive inputs as

    W[n, k] = scale[n, g] · q[n, k] + min[n, g]        g = k // G,  q a 4-bit (0..15) or 8-bit (−128..127) code

with scale and min in float16, as GGUF stores them. That represents the GGUF types picochat keeps
quantized (Q4_0, Q4_1, Q4_K as 4-bit codes; Q8_0, Q6_K, Q5_0, Q5_1, Q5_K as 8-bit codes): exactly for
Q4_0, Q4_1, Q8_0 and Q5_0; for the K-quants, whose scale is a float16 times a 6- or 8-bit integer, and
Q5_1's shifted min, the value is rounded to float16 (a relative change of at most 2⁻¹¹ in a group's
scale). The codes are packed for the kernel (kernels/qmatmul.h) in blocks of 16 output rows, each group
of inputs in "VNNI" order: 4 consecutive codes of each of the 16 rows side by side, so that one 64-byte
load feeds one integer dot-product instruction for 16 rows at once (and is a row of an AMX tile).

GGUF's own blocks become such matrices in gguf_blocks.py; the layers that multiply by them are layers.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64     # the input dimension is padded to a multiple of this
ROWS = 16      # output rows per block: the 16 lanes of an AVX-512 register, the 16 columns of an AMX tile


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


def pack(codes, scale, mins, bits: int, group: int) -> torch.Tensor:
    """Integer codes [N, K] with float16 scale (and min) [N, ≥K/group] -> the kernel's packed uint8 blocks.

    Per block of ROWS rows and per group g of `group` inputs: scale[16] and min[16] as float16, then the
    codes as group/4 "B rows" of 64 bytes, B row j holding for each row n its codes of inputs g·G+4j..4j+3
    (byte 4n+i). 4-bit codes pair B rows 2t and 2t+1 in one 64 bytes: low and high nibbles.
    The codes are moved as bytes, straight into the output (a GGUF's matrices convert at memory speed).
    """
    codes = _code_bytes(torch.as_tensor(codes), bits)
    n, k = codes.shape
    lay = block_layout(bits, group, k, mins is not None)
    groups, blocks = lay["groups"], -(-n // ROWS)
    out = torch.empty(blocks, groups, lay["group_bytes"], dtype=torch.uint8)
    offset = 0
    for values in (scale, mins):
        if values is None:
            continue
        v = F.pad(torch.as_tensor(values).to(torch.float16), (0, groups - values.shape[1], 0, blocks * ROWS - n))
        out[:, :, offset:offset + 32] = v.view(blocks, ROWS, groups).transpose(1, 2).contiguous().view(torch.uint8)
        offset += 32
    if (n, k) != (blocks * ROWS, groups * group):
        codes = F.pad(codes, (0, groups * group - k, 0, blocks * ROWS - n))
    # (block, row, group, j, i) -> (block, group, j, row, i): B row j = the 4 codes (i) of every row
    brows = codes.view(blocks, ROWS, groups, group // 4, 4).permute(0, 2, 3, 1, 4)
    if bits == 4:
        pairs = brows.unflatten(2, (group // 8, 2))
        target = out[:, :, offset:].unflatten(2, (group // 8, ROWS, 4))
        target.copy_(pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4))
    else:
        out[:, :, offset:].unflatten(2, (group // 4, ROWS, 4)).copy_(brows)
    return out.view(blocks, -1)


def _code_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes as one byte each: 4-bit as uint8, 8-bit as the bytes of int8 (two's complement)."""
    if bits == 4:
        return codes if codes.dtype == torch.uint8 else codes.to(torch.uint8)
    return (codes if codes.dtype == torch.int8 else codes.to(torch.int8)).view(torch.uint8)


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
