"""The GGUF container (llama.cpp's file format), read with every field bounds-checked.

A GGUF file is: magic b"GGUF", version, tensor count, key/value count, the key/value metadata
(architecture hyper-parameters, tokenizer, chat template), one info record per tensor (name, dims,
ggml type, offset), then aligned tensor data.  We parse the header ourselves (bounds-checked, so a cut
or corrupt file gives a clear GGUFError instead of a numpy error) and use gguf-py only for the block
dequantizers (gguf.quants.dequantize) and the type tables. What the tensors mean to a picochat model
(names, shapes, the config) is formats/gguf.py.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
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


# ----------------------------------------------------------------------------- tensor data
def read_tensor(h: GGUFHeader, info: GGUFTensorInfo, f=None) -> np.ndarray:
    """Dequantize one tensor to a float32 numpy array of its logical shape (f: an open handle of h.path)."""
    import gguf
    qtype = gguf.GGMLQuantizationType(info.type_id)
    if info.type_name not in SUPPORTED_TENSOR_TYPES:
        raise GGUFError(f"{h.path}: tensor {info.name!r} has type {info.type_name}, which picochat cannot dequantize "
                        f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)}).")
    if f is None:
        with open(h.path, "rb") as f:
            return read_tensor(h, info, f)
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
