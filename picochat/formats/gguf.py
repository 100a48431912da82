"""Read GGUF files (llama.cpp's model format) into picochat: a ModelConfig plus a float32 state dict.

A GGUF file is: magic b"GGUF", version, tensor count, key/value count, the key/value metadata
(architecture hyper-parameters, tokenizer, chat template), one info record per tensor (name, dims,
ggml type, offset), then aligned tensor data.  We parse the header ourselves (bounds-checked, so a cut
or corrupt file gives a clear GGUFError instead of a numpy error) and use gguf-py only for the block
dequantizers (gguf.quants.dequantize) and the type tables.

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
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, ModelConfig

__all__ = ["GGUFError", "GGUFModel", "GGUFHeader", "GGUFTensorInfo", "load_gguf", "read_gguf_header",
           "read_gguf_metadata", "gguf_tensor_summary", "config_from_gguf", "SUPPORTED_ARCHITECTURES",
           "SUPPORTED_TENSOR_TYPES", "available_memory", "check_memory"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gpt2")
# ggml types we dequantize (all through gguf.quants.dequantize, which handles the block layouts).
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


class GGUFError(ValueError):
    """A GGUF file picochat cannot load; the message names the file, the problem and what to do."""


# ----------------------------------------------------------------------------- ggml type tables
def _ggml_types():
    import gguf  # imported lazily: only needed once a file is actually read
    return gguf.GGMLQuantizationType, gguf.GGML_QUANT_SIZES


def _type_name(type_id: int) -> str:
    qtype, _ = _ggml_types()
    try:
        return qtype(type_id).name
    except ValueError:
        return f"unknown type id {type_id}"


# ----------------------------------------------------------------------------- header parsing
@dataclass
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]        # as stored: ggml order, fastest-varying first
    type_id: int                 # ggml type (gguf.GGMLQuantizationType value)
    type_name: str               # "Q4_1", "F32", ...
    offset: int                  # absolute byte offset in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical numpy/torch shape (dims reversed): [out, in] for a weight matrix."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)


@dataclass
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]   # in file order
    alignment: int
    data_offset: int                     # where the tensor data section starts
    file_size: int

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")


_KV_STRUCT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_KV_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
             7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_VALUE_TYPES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY",
                "UINT64", "INT64", "FLOAT64")
_CHUNK = 1 << 20

# What a header may declare, checked before anything is allocated for it. Far beyond real files (SmolLM2's
# header is 1.8 MB with 147k array items; the largest vocabularies have ~260k tokens), so only a corrupt or
# hostile header meets them -- and then fails at once instead of after reading and allocating for 2^60 items.
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_ARRAY_ITEMS = 1 << 22            # in one array
MAX_METADATA_ITEMS = 1 << 24         # in all arrays together
MAX_ARRAY_DEPTH = 2                  # an array of arrays at most
MAX_NAME_BYTES = 1 << 10             # a key or a tensor name (llama.cpp allows 64-byte tensor names)
MAX_STRING_BYTES = 1 << 26           # a string value (an embedded tokenizer.json is a few MB)
MAX_HEADER_BYTES = 1 << 28           # everything before the tensor data


def _value_type_name(vtype: int) -> str:
    return _VALUE_TYPES[vtype] if 0 <= vtype < len(_VALUE_TYPES) else f"unknown value type {vtype}"


class _Cursor:
    """Reads the header from a file, growing an in-memory buffer on demand; every read is bounds-checked."""

    def __init__(self, f, path: str, file_size: int):
        self.f, self.path, self.file_size = f, path, file_size
        self.buf = b""
        self.pos = 0
        self.what = "the header"
        self.items = 0  # array items read so far (MAX_METADATA_ITEMS)

    def corrupt(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path} is corrupt: {problem}. The file is damaged or from an incompatible writer; "
                         f"get or convert it again.")

    def need(self, n: int) -> None:
        end = self.pos + n
        if end > self.file_size:
            raise GGUFError(
                f"{self.path} is truncated (or corrupt): reading {self.what} needs bytes up to {end:,} but the "
                f"file has only {self.file_size:,} bytes. The download or conversion was cut short; get the file again.")
        if end > MAX_HEADER_BYTES:
            raise self.corrupt(f"reading {self.what} goes past byte {end:,}, but a GGUF header is at most "
                               f"{MAX_HEADER_BYTES:,} bytes")
        if end > len(self.buf):
            want = max(end - len(self.buf), _CHUNK, len(self.buf))  # grow geometrically
            self.f.seek(len(self.buf))
            self.buf += self.f.read(min(want, MAX_HEADER_BYTES - len(self.buf)))
            if end > len(self.buf):  # the file shrank under us
                raise GGUFError(f"{self.path} is truncated: could not read bytes up to {end:,} while reading "
                                f"{self.what}. Get the file again.")

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self, limit: int = MAX_STRING_BYTES) -> str:
        n = self.unpack("<Q")
        if n > limit:
            raise self.corrupt(f"{self.what} declares a string of {n:,} bytes (the limit is {limit:,})")
        self.need(n)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b.decode("utf-8", errors="replace")

    def array(self, dtype, count: int) -> np.ndarray:
        n = np.dtype(dtype).itemsize * count
        self.need(n)
        a = np.frombuffer(self.buf, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=self.pos)
        self.pos += n
        return a

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype == _STRING:
            return self.string()
        if vtype in _KV_STRUCT:
            v = self.unpack(_KV_STRUCT[vtype])
            if vtype == 6:  # float32: give the shortest decimal that round-trips (1e-05, not 9.99999974e-06)
                v = float(str(np.float32(v)))
            return v
        if vtype == _ARRAY:
            return self.array_value(key, depth)
        raise self.corrupt(f"metadata key {key!r} has {_value_type_name(vtype)}")

    def array_value(self, key: str, depth: int) -> list:
        itype, count = self.unpack("<I"), self.unpack("<Q")
        if depth + 1 > MAX_ARRAY_DEPTH:
            raise self.corrupt(f"metadata key {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        self.items += count
        if count > MAX_ARRAY_ITEMS or self.items > MAX_METADATA_ITEMS:
            raise self.corrupt(f"metadata key {key!r} declares an array of {count:,} items (the limit is "
                               f"{MAX_ARRAY_ITEMS:,} per array and {MAX_METADATA_ITEMS:,} in all)")
        if itype == _STRING:
            self.need(count * 8)  # every string has at least its length: refuse a count the file cannot hold
            return [self.string() for _ in range(count)]
        if itype in _KV_NUMPY:
            return self.array(_KV_NUMPY[itype], count).tolist()
        if itype == _ARRAY:
            self.need(count * 12)  # every inner array has at least its type and count
            return [self.array_value(key, depth + 1) for _ in range(count)]
        raise self.corrupt(f"metadata key {key!r} is an array of {_value_type_name(itype)}")


def _not_gguf_hint(head: bytes) -> str:
    if head[:2] == b"PK":
        return " It looks like a zip archive (a .whl/.zip, or a PyTorch .bin): unzip it and point at the .gguf inside."
    if head[:1] in (b"<", b"{", b"[") or head[:4].lower() in (b"<!do", b"<htm"):
        return " It looks like a text/HTML/JSON file, e.g. an error page saved instead of the model: check the download URL."
    if len(head) >= 10 and head[8:10] == b'{"':
        return " It looks like a safetensors file: load it as a Hugging Face checkpoint instead."
    if head[:4] in (b"lmgg", b"fmgg", b"tjgg", b"ggml", b"ggmf", b"ggjt"):
        return " It is an old GGML-format file: convert it to GGUF with a current llama.cpp."
    if head[:4] == b"FUGG":
        return " It is a big-endian GGUF, which picochat does not read: use the little-endian file."
    return ""


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and validate the header: metadata, tensor infos, and that all tensor data lies inside the file.

    Reads only the header bytes (no tensor data).  Raises GGUFError for anything that is not a readable GGUF.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise GGUFError(f"{p} does not exist: check the path (or download the model first).")
    if os.path.isdir(p):
        raise GGUFError(f"{p} is a directory, not a GGUF file: pass the path of the .gguf file inside it.")
    try:
        file_size = os.path.getsize(p)
        f = open(p, "rb")
    except OSError as e:
        raise GGUFError(f"{p} cannot be read: {e}") from e
    try:
        with f:
            return _parse_header(f, p, file_size)
    except GGUFError:
        raise
    except (Exception, RecursionError) as e:  # a crafted/corrupt header must still give a GGUFError
        raise GGUFError(f"{p} has a corrupt GGUF header ({type(e).__name__}: {e}). "
                        f"Get or convert the file again.") from e


def _parse_header(f, p: str, file_size: int) -> GGUFHeader:
    if file_size == 0:
        raise GGUFError(f"{p} is empty (0 bytes), not a GGUF file: the download or conversion failed; "
                        f"get the file again.")
    head = f.read(16)
    if len(head) < 4 and GGUF_MAGIC.startswith(head):
        raise GGUFError(f"{p} is truncated: it has only {len(head)} bytes. The download or conversion was cut "
                        f"short; get the file again.")
    if head[:4] != GGUF_MAGIC:
        raise GGUFError(f"{p} is not a GGUF file (starts with {head[:4]!r} not {GGUF_MAGIC!r})."
                        + _not_gguf_hint(head))
    cur = _Cursor(f, p, file_size)
    cur.pos = 4
    cur.what = "the version"
    version = cur.unpack("<I")
    if version & 0xFFFF == 0 and version != 0:
        raise GGUFError(f"{p} is a big-endian GGUF file, which picochat does not read: "
                        f"use a little-endian (standard) GGUF.")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{p} is GGUF version {version}; picochat reads versions "
                        f"{', '.join(map(str, SUPPORTED_VERSIONS))}: re-convert it with a current llama.cpp.")
    cur.what = "the tensor and key/value counts"
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise cur.corrupt(f"the header declares {n_tensors:,} tensors and {n_kv:,} metadata entries (picochat "
                          f"reads at most {MAX_TENSORS:,} of each)")
    metadata = _read_metadata(cur, n_kv)
    infos = _read_tensor_infos(cur, n_tensors)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{p} is corrupt: general.alignment is {alignment!r}, not a power of two.")
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = _place_tensors(p, infos, alignment, data_offset, file_size)
    return GGUFHeader(p, version, metadata, tensors, alignment, data_offset, file_size)


def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        cur.what = f"metadata entry {i + 1} of {n_kv}"
        key = cur.string(MAX_NAME_BYTES)
        if key in metadata:  # which of the two values would be meant?
            raise cur.corrupt(f"metadata key {key!r} appears twice")
        cur.what = f"metadata key {key!r}"
        metadata[key] = cur.value(cur.unpack("<I"), key)
    _check_metadata_types(cur, metadata)
    return metadata


# Keys other code reads, and the Python type of their value (list: (list, item type)). Checked at parse time
# so that a wrong type is one clear error here, not a TypeError in the tokenizer or the config.
_METADATA_TYPES = {
    "general.architecture": str, "general.name": str, "general.alignment": int,
    "tokenizer.ggml.model": str, "tokenizer.ggml.pre": str, "tokenizer.chat_template": str,
    "tokenizer.ggml.add_bos_token": bool, "tokenizer.ggml.add_eos_token": bool,
    "tokenizer.ggml.tokens": (list, str), "tokenizer.ggml.merges": (list, str),
    "tokenizer.ggml.token_type": (list, int), "tokenizer.ggml.scores": (list, (int, float)),
}


def _check_metadata_types(cur: _Cursor, metadata: dict[str, Any]) -> None:
    for key, value in metadata.items():
        want = _METADATA_TYPES.get(key)
        if want is None and key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            want = int
        if want is None:
            continue
        if isinstance(want, tuple):
            ok = isinstance(value, list) and all(isinstance(x, want[1]) for x in value)
        else:
            ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
        if not ok:
            raise cur.corrupt(f"metadata key {key!r} holds {_describe_value(value)}, not the "
                              f"{'array' if isinstance(want, tuple) else 'value'} of the type it must have")


def _describe_value(value) -> str:
    if isinstance(value, list):
        kinds = sorted({type(x).__name__ for x in value[:1000]})
        return f"an array of {', '.join(kinds) or 'nothing'}"
    return f"a {type(value).__name__} ({value!r:.40})"


def _read_tensor_infos(cur: _Cursor, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    infos = []
    for i in range(n_tensors):
        cur.what = f"tensor info {i + 1} of {n_tensors}"
        name = cur.string(MAX_NAME_BYTES)
        cur.what = f"the info of tensor {name!r}"
        n_dims = cur.unpack("<I")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"{cur.path} is corrupt: tensor {name!r} has {n_dims} dimensions (GGUF allows 1-4). "
                            f"Get or convert the file again.")
        dims = tuple(int(d) for d in cur.array(np.uint64, n_dims))
        type_id, offset = cur.unpack("<I"), cur.unpack("<Q")
        infos.append((name, dims, type_id, offset))
    return infos


def _place_tensors(p: str, infos, alignment: int, data_offset: int, file_size: int) -> dict[str, GGUFTensorInfo]:
    """Check every tensor's type, dims and byte region: inside the data section, aligned, not overlapping."""
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, type_id, offset in infos:
        if name in tensors:
            raise GGUFError(f"{p} is corrupt: tensor {name!r} appears twice. Get or convert the file again.")
        tensors[name] = _tensor_info(p, name, dims, type_id, offset, alignment, data_offset, file_size)
    declared = sum(t.n_bytes for t in tensors.values())
    if declared > file_size - data_offset:
        raise GGUFError(f"{p} is corrupt: its {len(tensors)} tensors declare {declared:,} bytes of data but the "
                        f"data section holds only {file_size - data_offset:,} bytes, so some must share bytes. "
                        f"Get or convert the file again.")
    ordered = sorted(tensors.values(), key=lambda t: (t.offset, t.n_bytes))
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.n_bytes:
            raise GGUFError(f"{p} is corrupt: tensors {a.name!r} (bytes {a.offset:,}..{a.offset + a.n_bytes:,}) and "
                            f"{b.name!r} (bytes {b.offset:,}..{b.offset + b.n_bytes:,}) overlap. "
                            f"Get or convert the file again.")
    return tensors


def _tensor_info(p: str, name: str, dims: tuple[int, ...], type_id: int, offset: int, alignment: int,
                 data_offset: int, file_size: int) -> GGUFTensorInfo:
    qtypes, quant_sizes = _ggml_types()
    try:
        qtype = qtypes(type_id)
        block, type_size = quant_sizes[qtype]
    except (ValueError, KeyError):
        raise GGUFError(f"{p}: tensor {name!r} has ggml type id {type_id}, which this gguf library does not "
                        f"know (a newer llama.cpp type?); picochat supports {', '.join(SUPPORTED_TENSOR_TYPES)}. "
                        f"Use a file quantized with one of those.") from None
    if min(dims) < 1:
        raise GGUFError(f"{p} is corrupt: tensor {name!r} has dims {list(dims)}; every dimension must be at least 1. "
                        f"Get or convert the file again.")
    if dims[0] % block:
        raise GGUFError(f"{p} is corrupt: tensor {name!r} of type {qtype.name} has rows of {dims[0]} values, "
                        f"not a multiple of its block size {block}.")
    n_bytes = math.prod(dims) // block * type_size
    start = data_offset + offset
    if offset % alignment:
        raise GGUFError(f"{p} is corrupt: tensor {name!r} starts at data offset {offset}, not a multiple of "
                        f"the alignment {alignment}. Get or convert the file again.")
    if start + n_bytes > file_size:
        where = ("starts beyond the end of the file" if start >= file_size else "runs past the end of the file")
        raise GGUFError(
            f"{p} is truncated or corrupt: tensor {name!r} ({qtype.name}, shape {list(reversed(dims))}) "
            f"occupies bytes {start:,}..{start + n_bytes:,} and {where} ({file_size:,} bytes). "
            f"The download was probably interrupted; get the file again.")
    return GGUFTensorInfo(name, dims, type_id, qtype.name, start, n_bytes)


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values (str, int, float, bool, lists).

    Includes the tokenizer.* keys (tokens, merges, token_type, pre, bos/eos ids, chat_template).
    Fast: reads the header only.  Raises GGUFError for a bad file.
    """
    return read_gguf_header(path).metadata


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
    factors = _read_tensor(h, info).astype(np.float64).ravel()
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


# ----------------------------------------------------------------------------- tensor data
def _read_tensor(h: GGUFHeader, info: GGUFTensorInfo, f=None) -> np.ndarray:
    """Dequantize one tensor to a float32 numpy array of its logical shape (f: an open handle of h.path)."""
    import gguf
    qtype = gguf.GGMLQuantizationType(info.type_id)
    if info.type_name not in SUPPORTED_TENSOR_TYPES:
        raise GGUFError(f"{h.path}: tensor {info.name!r} has type {info.type_name}, which picochat cannot dequantize "
                        f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)}).")
    if f is None:
        with open(h.path, "rb") as f:
            return _read_tensor(h, info, f)
    f.seek(info.offset)
    raw = f.read(info.n_bytes)
    if len(raw) != info.n_bytes:
        raise GGUFError(f"{h.path} is truncated: tensor {info.name!r} needs {info.n_bytes:,} bytes at offset "
                        f"{info.offset:,} but only {len(raw):,} could be read. Get the file again.")
    shape = info.shape
    data = np.frombuffer(raw, dtype=np.uint8)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        if qtype == gguf.GGMLQuantizationType.F32:
            out = data.view(np.float32).reshape(shape).copy()
        else:
            byte_shape = (*shape[:-1], shape[-1] // block * type_size)
            out = gguf.quants.dequantize(data.reshape(byte_shape), qtype)
            out = np.asarray(out, dtype=np.float32).reshape(shape)
    except GGUFError:
        raise
    except Exception as e:  # any dequantizer failure is a bad file for the user
        raise GGUFError(f"{h.path}: could not dequantize tensor {info.name!r} ({info.type_name}, shape "
                        f"{list(shape)}): {type(e).__name__}: {e}") from e
    if not np.isfinite(out).all():
        raise GGUFError(f"{h.path}: tensor {info.name!r} contains NaN or infinite values; the file is corrupt. "
                        f"Get or convert it again.")
    return out


def _keeps_quantized(ours: str, info: GGUFTensorInfo) -> bool:
    """Matrices the model multiplies by (projections, the embedding / output head) in an exact integer type."""
    from ..quant import EXACT_TYPES
    return (len(info.dims) == 2 and info.type_name in EXACT_TYPES
            and ours.endswith(("_proj.weight", "embed.weight", "lm_head.weight")) and ours != "pos_embed.weight")


def _read_quantized(h: GGUFHeader, info: GGUFTensorInfo, f, tf):
    """One matrix as a quant.QuantizedMatrix, with the row transform of the plan (unpermute, split) applied;
    None if its scales do not fit the packed format."""
    from ..quant import from_gguf
    f.seek(info.offset)
    raw = f.read(info.n_bytes)
    if len(raw) != info.n_bytes:
        raise GGUFError(f"{h.path} is truncated: tensor {info.name!r} needs {info.n_bytes:,} bytes at offset "
                        f"{info.offset:,} but only {len(raw):,} could be read. Get the file again.")
    try:
        m = from_gguf(info.type_name, np.frombuffer(raw, dtype=np.uint8), info.shape)
    except Exception as e:
        raise GGUFError(f"{h.path}: could not read tensor {info.name!r} ({info.type_name}, shape "
                        f"{list(info.shape)}): {type(e).__name__}: {e}") from e
    _, scale, mins = m.unpack()
    if not (torch.isfinite(scale).all() and (mins is None or torch.isfinite(mins).all())):
        return None  # scales beyond float16's range (or a corrupt tensor): read it as floats, which checks it
    rows = None
    if tf and tf[0] == "unpermute":
        rows = torch.from_numpy(_unpermute(np.arange(m.out_features)[:, None], tf[1])[:, 0].copy())
    elif tf and tf[0] == "split":
        n = m.out_features // tf[2]
        rows = torch.arange(tf[1] * n, (tf[1] + 1) * n)
    return m.take_rows(rows) if rows is not None else m


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's LlamaModel.permute: interleaved-pair rows back to HF rotate_half rows."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- memory
def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping, or None where that cannot be read.

    Linux: MemAvailable, capped by the cgroup's limit (a container's memory.max) less what it uses
    beyond reclaimable page cache. Elsewhere: the free physical pages, where the OS reports them.
    """
    found = [n for n in (_meminfo_available(), _cgroup_headroom()) if n is not None]
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, OSError, ValueError):
            return None
    return min(found)


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom(root: str = "/sys/fs/cgroup") -> int | None:
    """cgroup v2 (memory.max) or v1 (memory/memory.limit_in_bytes): limit - usage + inactive page cache."""
    for limit, usage, stat, inactive in (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                          "memory/memory.stat", "total_inactive_file")):
        try:
            with open(os.path.join(root, limit)) as f:
                text = f.read().strip()
            if text == "max" or int(text) >= 1 << 60:  # unlimited (v1 writes a huge number)
                return None
            with open(os.path.join(root, usage)) as f:
                used = int(f.read().strip())
            cache = 0
            with open(os.path.join(root, stat)) as f:
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == inactive:
                        cache = int(value)
            return max(0, int(text) - used + cache)
        except (OSError, ValueError):
            continue
    return None


def check_memory(need: int, what: str, error: type[ValueError] = GGUFError) -> None:
    """Refuse, before allocating, a load that needs more memory than is available (`what`: "loading X")."""
    have = available_memory()
    if have is not None and need > have:
        raise error(f"{what} needs about {need / 2**30:.2f} GiB of memory but only {have / 2**30:.2f} GiB is "
                    f"available: close other programs, or use a smaller or more quantized model.")


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
        check_memory(_load_size(h, plan, keep_quantized), f"loading {h.path}")
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
                    cache = {g: _read_tensor(h, h.tensors[g], f)}  # a fused qkv is read once, used three times
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
