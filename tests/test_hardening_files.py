"""Hostile and careless model files: every bad GGUF, Hugging Face folder, run folder or config must give
picochat's own error (GGUFError, CheckpointError, ConfigError: ValueErrors whose message names the file or
the field), refused before anything large is allocated -- never a traceback type, never a path outside the
folder, never a machine out of memory.

The fuzz tests at the end mutate tiny valid files with hypothesis, deterministically and briefly. A longer
session (new random mutations each run, more of them):

    PICOCHAT_FUZZ_EXAMPLES=5000 PICOCHAT_FUZZ_RANDOM=1 python -m pytest -q tests/test_hardening_files.py -k fuzz
"""
from __future__ import annotations

import json
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from picochat.apps import info  # noqa: E402
from picochat.model.config import MAX_CONTEXT, PRESETS, ConfigError, ModelConfig  # noqa: E402
from picochat import hw  # noqa: E402
from picochat.formats import gguf as gguf_format  # noqa: E402
from picochat.formats import gguf_reader  # noqa: E402
from picochat.formats.gguf import gguf_tensor_summary, load_gguf  # noqa: E402
from picochat.formats.gguf_reader import GGUFError, read_gguf_header  # noqa: E402
from picochat.formats.hf import CheckpointError, load_hf_folder, read_config, save_hf_folder  # noqa: E402
from picochat.model.gpt import GPT  # noqa: E402
from picochat.formats.packed import is_packed_folder  # noqa: E402
from picochat.tokenizer.bpe import Tokenizer  # noqa: E402
from picochat import hub
from picochat.load import build_model

OURS = (GGUFError, CheckpointError, ConfigError)  # picochat's own errors (all ValueErrors)
FUZZ_EXAMPLES = int(os.environ.get("PICOCHAT_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, derandomize=not os.environ.get("PICOCHAT_FUZZ_RANDOM"), database=None,
                deadline=None, suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------- tiny files
E, H, KV, F, V, CTX = 32, 2, 1, 64, 64, 32
TOKENS = [chr(33 + i) for i in range(V - 1)] + ["AB"]  # printable ASCII is its own byte-level spelling


def write_gguf(path, *, kv=None) -> Path:
    """A tiny but complete llama GGUF (one layer; Q8_0, Q4_0, F16 and F32 tensors) with a working tokenizer."""
    rng = np.random.default_rng(0)
    r = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)  # noqa: E731
    hd = E // H
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(CTX)
    w.add_embedding_length(E)
    w.add_block_count(1)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(["A B"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for k, (value, vtype) in (kv or {}).items():
        w.add_key_value(k, value, vtype)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(r(V, E), Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("blk.0.attn_norm.weight", 1 + r(E))
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(r(H * hd, E), Q.Q4_0), raw_dtype=Q.Q4_0)
    w.add_tensor("blk.0.attn_k.weight", r(KV * hd, E))
    w.add_tensor("blk.0.attn_v.weight", r(KV * hd, E).astype(np.float16))
    w.add_tensor("blk.0.attn_output.weight", gguf.quants.quantize(r(E, H * hd), Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("blk.0.ffn_norm.weight", 1 + r(E))
    w.add_tensor("blk.0.ffn_gate.weight", gguf.quants.quantize(r(F, E), Q.Q4_0), raw_dtype=Q.Q4_0)
    w.add_tensor("blk.0.ffn_up.weight", r(F, E).astype(np.float16))
    w.add_tensor("blk.0.ffn_down.weight", gguf.quants.quantize(r(E, F), Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("output_norm.weight", 1 + r(E))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def tensor_fields(path) -> dict[str, dict[str, int]]:
    """Byte positions of each tensor's info fields: {name: {"dims": pos, "n_dims": n, "offset": pos}}."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        end = t.field.offset + sum(int(part.nbytes) for part in t.field.parts)
        n_dims = len(t.shape)
        out[t.name] = {"dims": end - 12 - 8 * n_dims, "n_dims": n_dims, "type": end - 12, "offset": end - 8}
    return out


def field_positions(path) -> list[int]:
    """The byte position of every field of the header (counts, lengths, types, dims, offsets, values)."""
    reader = gguf.GGUFReader(path)
    positions = [4, 8, 16]  # version, tensor count, key/value count
    for fld in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        pos = fld.offset
        for part in fld.parts[:64]:  # (a long array's items are all alike: its first ones suffice)
            positions.append(pos)
            pos += int(part.nbytes)
    return sorted(set(p for p in positions if p >= 4))


def value_position(data: bytes, key: str) -> int:
    """Where the value type of metadata `key` is (its value follows)."""
    k = key.encode()
    return data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)


def with_kv(data: bytes, key: str, payload: bytes, pad_key: bool = True) -> bytes:
    """`data` with one more metadata entry (payload: value type and value), inserted first. Its length must be a
    multiple of the alignment so the tensor data section keeps its offsets: pad_key pads the key to get there."""
    while pad_key and (8 + len(key) + len(payload)) % 32:
        key += "_"
    entry = struct.pack("<Q", len(key)) + key.encode() + payload
    assert len(entry) % 32 == 0, len(entry)
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    return data[:16] + struct.pack("<Q", n_kv + 1) + entry + data[24:]


def patch(path, pos: int, fmt: str, value, out=None) -> Path:
    data = bytearray(Path(path).read_bytes())
    struct.pack_into(fmt, data, pos, value)
    out = Path(out or path)
    out.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=V, n_layer=1, n_head=H, n_kv_head=KV, n_embd=E, intermediate_size=F,
                                 max_seq_len=CTX), **changes})


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_hf_folder(GPT(tiny_config(bos_token_id=1, eos_token_id=2)), tmp_path_factory.mktemp("hf") / "tiny")


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def expect(error, fn, *args, fragments=()):
    with pytest.raises(error) as ei:
        fn(*args)
    for f in fragments:
        assert f in str(ei.value), f"{f!r} not in: {ei.value}"
    return str(ei.value)


# ----------------------------------------------------------------------------- GGUF tensor regions
def test_gguf_tensors_sharing_one_offset_are_refused_by_info_and_load(tiny_gguf, tmp_path):
    """The issue's file: every tensor at data offset 0. Each region alone lies inside the file, so only the
    overlap check catches it -- before `info` reports it and before loading reads the same bytes 11 times."""
    p = tmp_path / "same.gguf"
    p.write_bytes(tiny_gguf.read_bytes())
    for fields in tensor_fields(tiny_gguf).values():
        patch(p, fields["offset"], "<Q", 0)
    for fn in (read_gguf_header, gguf_tensor_summary, load_gguf, info.describe):
        expect(GGUFError, fn, p if fn is not info.describe else str(p), fragments=(str(p), "overlap"))


def test_gguf_declared_bytes_beyond_data_section(tiny_gguf, tmp_path):
    """Tensors that each fit but together claim more bytes than the data section holds."""
    h = read_gguf_header(tiny_gguf)
    p = tmp_path / "claims.gguf"
    p.write_bytes(tiny_gguf.read_bytes()[:h.data_offset + max(t.n_bytes for t in h.tensors.values())])
    for fields in tensor_fields(tiny_gguf).values():
        patch(p, fields["offset"], "<Q", 0)
    expect(GGUFError, read_gguf_header, p, fragments=(str(p), "declare", "data section"))


@pytest.mark.parametrize("case", ["zero dim", "misaligned", "unknown type"])
def test_gguf_tensor_info_lies(tiny_gguf, tmp_path, case):
    fields = tensor_fields(tiny_gguf)["output_norm.weight"]
    p = tmp_path / "lie.gguf"
    if case == "zero dim":  # a [0] tensor occupies no bytes, so no region check would see it
        patch(tiny_gguf, fields["dims"], "<Q", 0, out=p)
        expect(GGUFError, read_gguf_header, p, fragments=("'output_norm.weight'", "dimension"))
    elif case == "misaligned":
        h = read_gguf_header(tiny_gguf)
        offset = h.tensors["output_norm.weight"].offset - h.data_offset
        patch(tiny_gguf, fields["offset"], "<Q", offset + 4, out=p)
        expect(GGUFError, read_gguf_header, p, fragments=("'output_norm.weight'", "alignment"))
    else:
        patch(tiny_gguf, fields["type"], "<I", 77, out=p)
        expect(GGUFError, read_gguf_header, p, fragments=("'output_norm.weight'", "type id 77"))


# ----------------------------------------------------------------------------- GGUF metadata
def array_payload(itype: int, count: int, items: bytes = b"") -> bytes:
    return struct.pack("<IIQ", 9, itype, count) + items


@pytest.mark.parametrize("case", ["huge count", "too many items", "nested", "duplicate key", "wrong type",
                                  "unknown value type"])
def test_gguf_metadata_bounds(tiny_gguf, tmp_path, case):
    data = tiny_gguf.read_bytes()
    p = tmp_path / "meta.gguf"
    if case == "huge count":  # must fail at once, not after trying to read 2^60 items
        at = value_position(data, "tokenizer.ggml.token_type")
        p.write_bytes(data[:at + 4] + struct.pack("<Q", 1 << 60) + data[at + 12:])
        expect(GGUFError, read_gguf_header, p, fragments=("'tokenizer.ggml.token_type'",))
    elif case == "too many items":  # present in the file, but more than any real array
        n = gguf_reader.MAX_ARRAY_ITEMS + 1
        p.write_bytes(with_kv(data, "junk", array_payload(0, n, bytes(n))))
        expect(GGUFError, read_gguf_header, p, fragments=("'junk", f"{n:,} items"))
    elif case == "nested":  # arrays of arrays of arrays
        inner = array_payload(0, 1, b"\x07")[4:]
        middle = struct.pack("<IQ", 9, 1) + inner
        p.write_bytes(with_kv(data, "deep", struct.pack("<IIQ", 9, 9, 1) + middle))
        expect(GGUFError, read_gguf_header, p, fragments=("'deep", "nests arrays"))
    elif case == "duplicate key":  # which architecture would be meant?
        key = "general.architecture"
        value = "x" * ((-(8 + len(key) + 12)) % 32)
        p.write_bytes(with_kv(data, key, struct.pack("<IQ", 8, len(value)) + value.encode(), pad_key=False))
        expect(GGUFError, read_gguf_header, p, fragments=("'general.architecture'", "twice"))
    elif case == "wrong type":  # the tokenizer would get numbers for its token strings
        key, n = "tokenizer.ggml.tokens", 83  # (8 + 21 + 16 + 83 bytes: aligned)
        renamed = data.replace(key.encode(), b"tokenizer.ggml.tokenX")
        p.write_bytes(with_kv(renamed, key, array_payload(0, n, bytes(n)), pad_key=False))
        expect(GGUFError, read_gguf_header, p, fragments=("'tokenizer.ggml.tokens'", "array of int"))
    else:
        p.write_bytes(with_kv(data, "odd", struct.pack("<I", 13) + bytes(8)))
        expect(GGUFError, read_gguf_header, p, fragments=("'odd", "unknown value type 13"))


def test_gguf_context_length_is_bounded(tiny_gguf, tmp_path):
    """A context of 2^40 positions would size a KV cache no machine has."""
    at = value_position(tiny_gguf.read_bytes(), "llama.context_length")
    p = patch(tiny_gguf, at + 4, "<I", MAX_CONTEXT * 2, out=tmp_path / "ctx.gguf")
    expect(GGUFError, load_gguf, p, fragments=(str(p), "max_seq_len", f"{MAX_CONTEXT:,}"))
    assert gguf_tensor_summary(p)["config_error"]  # info names the problem instead of a shape


# ----------------------------------------------------------------------------- memory
def test_gguf_load_refused_when_memory_is_short(tiny_gguf, monkeypatch):
    """The float32 state dict is sized from the header and compared with free memory before any tensor is read."""
    need = sum(4 * t.n_elements for t in read_gguf_header(tiny_gguf).tensors.values())
    monkeypatch.setattr(hw, "available_memory", lambda: need // 2)
    with monkeypatch.context() as m:
        m.setattr(gguf_format, "read_tensor", lambda *a: pytest.fail("a tensor was read before the check"))
        expect(GGUFError, load_gguf, tiny_gguf, fragments=(str(tiny_gguf), "memory", "GiB"))
    assert gguf_tensor_summary(tiny_gguf)["config_error"] is None  # `info` reads no weights: still works
    monkeypatch.setattr(hw, "available_memory", lambda: 4 * need)
    assert load_gguf(tiny_gguf).config.n_layer == 1


def test_hf_load_refused_when_memory_is_short(tiny_hf, monkeypatch):
    monkeypatch.setattr(hw, "available_memory", lambda: 1000)
    expect(CheckpointError, load_hf_folder, tiny_hf, fragments=(str(tiny_hf), "memory"))


def test_available_memory_reads_cgroup_limits(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("1000000\n")
    (v2 / "memory.current").write_text("700000\n")
    (v2 / "memory.stat").write_text("anon 500000\ninactive_file 150000\nactive_file 50000\n")
    assert hw._cgroup_headroom(str(v2)) == 1000000 - 700000 + 150000
    (v2 / "memory.max").write_text("max\n")
    assert hw._cgroup_headroom(str(v2)) is None
    assert hw._cgroup_headroom(str(tmp_path / "none")) is None
    have = hw.available_memory()
    assert have is None or have > 0


# ----------------------------------------------------------------------------- HF folders
def sharded(tiny_hf: Path, folder: Path, shard_name: str) -> Path:
    """A copy of tiny_hf whose weights are listed by an index naming `shard_name`."""
    copy_folder(tiny_hf, folder)
    (folder / "model.safetensors").unlink()
    names = json.loads(json.dumps(list(load_hf_folder(tiny_hf)[1])))  # (any tensor names do for the map)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard_name for n in names}}))
    return folder


@pytest.mark.parametrize("how", ["dot-dot", "absolute", "symlink"])
def test_hf_shard_names_stay_inside_the_folder(tiny_hf, tmp_path, how):
    outside = tmp_path / "outside.safetensors"  # a readable safetensors file the index must not reach
    outside.write_bytes((tiny_hf / "model.safetensors").read_bytes())
    folder = tmp_path / "model"
    if how == "dot-dot":
        sharded(tiny_hf, folder, "../outside.safetensors")
    elif how == "absolute":
        sharded(tiny_hf, folder, str(outside))
    else:
        sharded(tiny_hf, folder, "model-00001-of-00001.safetensors")
        (folder / "model-00001-of-00001.safetensors").symlink_to(outside)
    for fn in (load_hf_folder, info.describe):
        expect(CheckpointError, fn, folder if fn is load_hf_folder else str(folder), fragments=("outside",))


def test_hf_hub_snapshot_links_still_load(tiny_hf, tmp_path):
    """A Hugging Face cache snapshot links each file to ../../blobs/: that stays inside the repository folder."""
    repo = tmp_path / "models--someone--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in tiny_hf.iterdir():
        (repo / "blobs" / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    config, sd = load_hf_folder(snapshot)
    assert config.n_embd == E and len(sd) == len(load_hf_folder(tiny_hf)[1])


@pytest.mark.parametrize("index", [[1, 2], {"weight_map": ["model.safetensors"]}, {"weight_map": {"a": 1}},
                                   {"weight_map": {"a": None}}, {"metadata": {}}, "[" * 100_000],
                         ids=["list", "map is a list", "int name", "null name", "no map", "deep nesting"])
def test_hf_index_must_map_names_to_files(tiny_hf, tmp_path, index):
    folder = sharded(tiny_hf, tmp_path / "model", "x.safetensors")
    text = index if isinstance(index, str) else json.dumps(index)
    (folder / "model.safetensors.index.json").write_text(text)
    expect(CheckpointError, load_hf_folder, folder, fragments=("model.safetensors.index.json",))


@pytest.mark.parametrize("latest", ["../elsewhere", "ABS", "symlink", "", "a/../../elsewhere"])
def test_run_folder_latest_names_a_child(tiny_hf, tmp_path, latest):
    elsewhere = copy_folder(tiny_hf, tmp_path / "elsewhere")
    run = tmp_path / "run"
    run.mkdir()
    copy_folder(tiny_hf, run / "step_000001")
    if latest == "symlink":
        (run / "step_000002").symlink_to(elsewhere)
        latest = "step_000002"
    (run / "latest").write_text(str(elsewhere) if latest == "ABS" else latest + "\n")
    expect(CheckpointError, hub.resolve, str(run), fragments=(str(run / "latest"), "inside"))
    (run / "latest").write_text("step_000001\n")  # the honest file still works
    assert hub.resolve(str(run)) == run / "step_000001"


def safetensors_bytes(header: dict, data: bytes, prefix: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if prefix is None else prefix) + raw + data


@pytest.mark.parametrize("case", ["offsets past the end", "overlapping", "shape product", "unknown dtype",
                                  "header length", "not json", "integer weights"])
def test_safetensors_headers_that_lie(tiny_hf, tmp_path, case):
    folder = copy_folder(tiny_hf, tmp_path / "model")
    target = folder / "model.safetensors"
    t = lambda dtype, shape, begin, end: {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}  # noqa: E731
    blob = {
        "offsets past the end": safetensors_bytes({"a": t("F32", [4], 0, 16), "b": t("F32", [4], 16, 4096)}, bytes(32)),
        "overlapping": safetensors_bytes({"a": t("F32", [4], 0, 16), "b": t("F32", [4], 8, 24)}, bytes(24)),
        "shape product": safetensors_bytes({"a": t("F32", [5], 0, 16)}, bytes(16)),
        "unknown dtype": safetensors_bytes({"a": t("F33", [4], 0, 16)}, bytes(16)),
        "header length": safetensors_bytes({"a": t("F32", [4], 0, 16)}, bytes(16), prefix=1 << 62),
        "not json": struct.pack("<Q", 8) + b"{{{{{{{{" + bytes(16),
        "integer weights": None,
    }[case]
    if blob is None:  # a well-formed file whose weights are integers: shapes match, the model would not
        from safetensors.torch import load_file, save_file
        sd = load_file(target)
        save_file({k: (v * 100).to(torch.int32) for k, v in sd.items()}, target)
    else:
        target.write_bytes(blob)
    for fn in (load_hf_folder,) + ((info.describe,) if blob is not None else ()):
        expect(CheckpointError, fn, folder if fn is load_hf_folder else str(folder), fragments=(str(target),))


def test_gpt2_folder_with_wrong_rank_tensor(tmp_path):
    """GPT-2's Conv1D weights are transposed on loading: a 3-D one must be a CheckpointError, not a RuntimeError."""
    from safetensors.torch import load_file, save_file
    config = ModelConfig(architecture="gpt2", vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=16,
                         intermediate_size=32, max_seq_len=CTX, norm="layernorm", mlp="gelu", position="learned",
                         qkv_bias=True, out_bias=True, mlp_bias=True)
    folder = save_hf_folder(GPT(config), tmp_path / "gpt2")
    sd = load_file(folder / "model.safetensors")
    sd["transformer.h.0.attn.c_attn.weight"] = torch.zeros(2, 3, 4)
    save_file(sd, folder / "model.safetensors")
    expect(CheckpointError, load_hf_folder, folder, fragments=(str(folder),))


def test_packed_marker_of_the_wrong_type(tiny_hf, tmp_path):
    folder = copy_folder(tiny_hf, tmp_path / "model")
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "quantization_config": ["picochat"]}))
    assert not is_packed_folder(folder)  # (was an AttributeError in every loader that asks)
    assert info.describe(str(folder))["architecture"] == "llama"


@pytest.mark.parametrize("text", ['["base"]', '{"base_model_name_or_path": 7}', '[' * 100_000],
                         ids=["list", "number", "deep nesting"])
def test_adapter_config_of_the_wrong_shape(tmp_path, text):
    (tmp_path / "adapter_config.json").write_text(text)
    expect(CheckpointError, hub.adapter_base, tmp_path, fragments=("adapter_config.json",))


# ----------------------------------------------------------------------------- configs
def write_config(tiny_hf: Path, folder: Path, change) -> Path:
    copy_folder(tiny_hf, folder)
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(hf)))
    return folder


def test_config_json_that_is_not_an_object(tiny_hf, tmp_path):
    folder = write_config(tiny_hf, tmp_path / "m", lambda hf: [hf])
    for fn in (read_config, load_hf_folder):
        expect(CheckpointError, fn, folder, fragments=("config.json", "JSON object"))
    expect(CheckpointError, info.describe, str(folder), fragments=("JSON object",))


@pytest.mark.parametrize("key, value", [
    ("num_attention_heads", 0), ("hidden_size", "32"), ("vocab_size", -1), ("num_hidden_layers", 2.5),
    ("intermediate_size", None), ("max_position_embeddings", 1 << 40), ("rms_norm_eps", float("nan")),
    ("rope_theta", -1.0), ("rope_scaling", "yes"), ("tie_word_embeddings", "false"), ("bos_token_id", "1"),
    ("eos_token_id", [2, "x"]), ("head_dim", 7), ("num_key_value_heads", 3), ("hidden_size", True),
    ("rope_scaling", {"rope_type": "llama3", "factor": 0, "original_max_position_embeddings": 8}),
])
def test_config_json_bad_values_name_the_field(tiny_hf, tmp_path, key, value):
    folder = write_config(tiny_hf, tmp_path / "m", lambda hf: {**hf, key: value})
    msg = expect(CheckpointError, read_config, folder, fragments=(str(folder / "config.json"),))
    names = {key, {"num_attention_heads": "n_head", "num_key_value_heads": "n_kv_head", "head_dim": "head_dim",
                   "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id"}.get(key, key)}
    assert any(n in msg for n in names), msg
    assert "\n" not in msg


def test_config_json_token_ids_outside_the_vocabulary_are_dropped(tiny_hf, tmp_path):
    """transformers' GPT2Config writes bos/eos 50256 whatever the vocabulary: such ids name no token, so they are
    ignored (a ModelConfig built directly refuses them, see below)."""
    folder = write_config(tiny_hf, tmp_path / "m", lambda hf: {**hf, "bos_token_id": 10 ** 6, "eos_token_id": [2, V]})
    config = read_config(folder)
    assert (config.bos_token_id, config.eos_token_id) == (None, [2])


def test_config_json_missing_field(tiny_hf, tmp_path):
    folder = write_config(tiny_hf, tmp_path / "m", lambda hf: {k: v for k, v in hf.items() if k != "hidden_size"})
    expect(CheckpointError, read_config, folder, fragments=("'hidden_size'", "missing"))


@pytest.mark.parametrize("changes, field", [
    (dict(n_layer=0), "n_layer"), (dict(vocab_size=0), "vocab_size"), (dict(n_head=0), "n_head"),
    (dict(n_embd=-32), "n_embd"), (dict(intermediate_size=0), "intermediate_size"),
    (dict(max_seq_len=MAX_CONTEXT + 1), "max_seq_len"), (dict(n_embd=33, n_head=2), "divisible"),
    (dict(n_kv_head=3, n_head=4, n_embd=32), "n_kv_head"), (dict(head_dim=7), "head_dim"),
    (dict(norm_eps=0.0), "norm_eps"), (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(rope_theta=float("inf")), "rope_theta"), (dict(norm="batchnorm"), "norm"), (dict(mlp="relu"), "mlp"),
    (dict(position="alibi"), "position"), (dict(bos_token_id=V), "bos_token_id"),
    (dict(eos_token_id=[1, -1]), "eos_token_id"), (dict(n_layer="2"), "n_layer"), (dict(n_layer=True), "n_layer"),
    (dict(n_layer=2.0), "n_layer"), (dict(qkv_bias="no"), "qkv_bias"),
    (dict(rope_scaling={"factor": 8.0, "original_max_position_embeddings": 0}), "original_max_position_embeddings"),
    (dict(rope_scaling={"factor": 8.0, "original_max_position_embeddings": 64, "low_freq_factor": 4.0,
                        "high_freq_factor": 4.0}), "high_freq_factor"),
])
def test_model_config_validates_every_field(changes, field):
    """ModelConfig itself checks: presets, training flags (dataclasses.replace), GGUF metadata and config.json
    all pass through __post_init__."""
    with pytest.raises(ConfigError) as ei:
        tiny_config(**changes)
    msg = str(ei.value)
    assert field in msg and "\n" not in msg, msg
    with pytest.raises(ConfigError):  # as `picochat train --n-embd ...` builds it (head_dim recomputed)
        tiny_config().replace(**{"head_dim": None, **changes})


def test_presets_and_exports_stay_valid():
    for name, preset in PRESETS.items():
        assert ModelConfig.from_hf(preset.to_hf()) == preset, name
    assert tiny_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}).head_dim == 16
    assert tiny_config(eos_token_id=[1, 2], bos_token_id=0).eos_token_ids == [1, 2]


# ----------------------------------------------------------------------------- fuzzing
U64 = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 32, 33, 255, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
       1 << 60, 1 << 63, (1 << 64) - 1]
U32 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 30, 250, 1 << 31, (1 << 32) - 1]


def mutations(size: int, header_end: int, fields: list[int]):
    """Up to 4 edits of a file, most of them in its header and on the header's fields: flip a bit, overwrite a
    byte, write an edge-case 32/64-bit number, insert or delete bytes, truncate, or append."""
    pos = st.one_of(st.sampled_from(fields), st.sampled_from(fields), st.integers(0, header_end - 1),
                    st.integers(0, size - 1))
    edit = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("byte"), pos, st.integers(0, 255)),
        st.tuples(st.just("u64"), pos, st.sampled_from(U64 + [size, header_end])),
        st.tuples(st.just("u32"), pos, st.sampled_from(U32)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 16)),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    )
    return st.lists(edit, min_size=1, max_size=4)


def mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for op, *args in edits:
        if op == "append":
            b += args[0]
            continue
        at = min(args[0], len(b))
        if op == "truncate":
            del b[at:]
        elif op == "insert":
            b[at:at] = args[1]
        elif op == "delete":
            del b[at:at + args[1]]
        elif op == "flip" and at < len(b):
            b[at] ^= 1 << args[1]
        elif op == "byte" and at < len(b):
            b[at] = args[1]
        elif op in ("u64", "u32"):
            fmt = "<Q" if op == "u64" else "<I"
            if at + struct.calcsize(fmt) <= len(b):
                struct.pack_into(fmt, b, at, args[1])
    return bytes(b)


def assert_ours(e: Exception, path: Path) -> None:
    """One of picochat's own errors, naming the file: not a bare ValueError from numpy or a library."""
    assert isinstance(e, OURS), f"{type(e).__name__}: {e}"
    assert str(path) in str(e), str(e)


def bounded_by_file(h, file_size: int) -> None:
    """What a header that parsed may make us allocate: only tensors whose bytes lie in the file, once each."""
    regions = sorted((t.offset, t.offset + t.n_bytes) for t in h.tensors.values())
    assert all(h.data_offset <= a < b <= file_size for a, b in regions)
    assert all(b <= c for (_, b), (c, _) in zip(regions, regions[1:]))  # disjoint
    # no ggml type holds more than ~3 values per byte (Q2_K: 2.6 bits each), so the float32 state dict is at
    # most a small multiple of the file
    assert sum(t.n_elements for t in h.tensors.values()) <= 4 * (file_size - h.data_offset)


def gguf_outcomes(path: Path) -> None:
    """Everything a GGUF file reaches -- the header, `picochat info`, loading as floats and as integer codes, the
    model and the tokenizer -- succeeds or raises one of our errors."""
    file_size = path.stat().st_size
    try:
        bounded_by_file(read_gguf_header(path), file_size)
    except OURS as e:
        return assert_ours(e, path)
    for step in (gguf_tensor_summary, lambda p: info.describe(str(p)), lambda p: load_gguf(p, keep_quantized=True)):
        try:
            step(path)
        except OURS as e:
            assert_ours(e, path)
    try:
        g = load_gguf(path)
    except OURS as e:
        return assert_ours(e, path)
    assert sum(t.nbytes for t in g.state_dict.values()) <= 16 * file_size
    build_model(g.config, g.state_dict)
    try:
        Tokenizer.from_gguf_metadata(g.metadata, source=str(path))
    except ValueError as e:  # the tokenizer's own refusals name the file
        assert str(path) in str(e), f"{type(e).__name__}: {e}"


def within_memory(fn, *args, limit: int = 64 << 20) -> None:
    """Run fn under tracemalloc (numpy's and Python's allocations): a corrupt tiny file must never cost more than
    a few MB, whatever its header claims."""
    tracemalloc.start()
    try:
        fn(*args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak:,} bytes"


@pytest.fixture(scope="module")
def gguf_seed(tiny_gguf):
    data = tiny_gguf.read_bytes()
    return data, read_gguf_header(tiny_gguf).data_offset, field_positions(tiny_gguf)


def test_fuzz_gguf(gguf_seed, tmp_path_factory):
    data, header_end, fields = gguf_seed
    path = tmp_path_factory.mktemp("fuzz") / "mutated.gguf"
    path.write_bytes(data)
    assert load_gguf(path).config.n_layer == 1  # the unmutated seed loads: every refusal below is the mutation's

    @FUZZ
    @given(mutations(len(data), header_end, fields))
    def check(edits):
        path.write_bytes(mutate(data, edits))
        within_memory(gguf_outcomes, path)

    check()


@pytest.fixture(scope="module")
def hf_seed(tiny_hf):
    data = (tiny_hf / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack_from("<Q", data)[0]
    header = data[8:header_end]
    fields = [0, 8] + [8 + i for i, c in enumerate(header) if c in b'[,:"']  # numbers and names start there
    return data, header_end, fields


def hf_outcomes(folder: Path) -> None:
    target = folder / "model.safetensors"
    for step in (load_hf_folder, lambda p: info.describe(str(p))):
        try:
            result = step(folder)
        except OURS as e:
            assert_ours(e, target)
            continue
        if step is load_hf_folder:
            config, sd = result
            assert sum(t.nbytes for t in sd.values()) <= target.stat().st_size  # never more than the file holds
            try:
                build_model(config, sd)
            except CheckpointError as e:  # names or shapes that do not fit the config
                assert "missing tensors" in str(e) or "shape" in str(e) or "unexpected" in str(e), str(e)


def test_fuzz_safetensors(tiny_hf, hf_seed, tmp_path_factory):
    data, header_end, fields = hf_seed
    folder = copy_folder(tiny_hf, tmp_path_factory.mktemp("fuzz") / "model")

    @FUZZ
    @given(mutations(len(data), header_end, fields))
    def check(edits):
        (folder / "model.safetensors").write_bytes(mutate(data, edits))
        within_memory(hf_outcomes, folder)

    check()


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-(1 << 70), 1 << 70),
                        st.sampled_from([0, 1, 2, 7, 16, 32, 64, MAX_CONTEXT + 1]), st.floats(allow_nan=True),
                        st.text(max_size=4), st.lists(st.integers(-1, 70), max_size=3),
                        st.dictionaries(st.sampled_from(["rope_type", "type", "factor", "low_freq_factor",
                                                         "high_freq_factor", "original_max_position_embeddings"]),
                                        st.one_of(st.sampled_from(["llama3", "default", "yarn"]),
                                                  st.floats(-2, 64), st.integers(-2, 64)), max_size=6))
HF_KEYS = ["model_type", "vocab_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "hidden_size", "head_dim", "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
           "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id",
           "eos_token_id", "hidden_act", "initializer_range", "n_embd", "n_layer", "n_head", "n_inner",
           "n_positions", "layer_norm_epsilon", "activation_function"]


@FUZZ
@given(st.sampled_from(["llama", "qwen2", "gpt2"]), st.dictionaries(st.sampled_from(HF_KEYS), JSON_VALUES, max_size=5),
       st.lists(st.sampled_from(HF_KEYS), max_size=2))
def test_fuzz_config_json(model_type, changes, dropped):
    """Any config.json: a ConfigError naming a field, or a config every part of which a model can be built from."""
    arch = ModelConfig(architecture="gpt2", vocab_size=V, n_layer=1, n_head=H, n_kv_head=H, n_embd=E,
                       intermediate_size=F, max_seq_len=CTX, norm="layernorm", mlp="gelu", position="learned",
                       qkv_bias=True, out_bias=True, mlp_bias=True) if model_type == "gpt2" else \
        tiny_config(architecture=model_type, bos_token_id=1, eos_token_id=2)
    hf = {k: v for k, v in {**arch.to_hf(), **changes}.items() if k not in dropped}
    try:
        config = ModelConfig.from_hf(hf)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert config.n_head % config.n_kv_head == 0 and config.max_seq_len <= MAX_CONTEXT
    assert config.position != "rope" or config.head_dim % 2 == 0
    with torch.device("meta"):
        GPT(config)
    assert ModelConfig.from_hf(config.to_hf()).n_embd == config.n_embd
