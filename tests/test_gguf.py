"""GGUF loading: tiny llama/qwen2/gpt2 files written here (llama.cpp layout, several quant types) must give the
same logits as transformers' own GGUF loader; the real SmolLM2 file must give the known config; every bad file
must give a GGUFError naming the file and the problem."""
from __future__ import annotations

import os
import struct
import zipfile

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from picochat.formats.gguf import gguf_tensor_summary, load_gguf  # noqa: E402
from picochat.formats.gguf_reader import GGUFError, read_gguf_header, read_gguf_metadata  # noqa: E402

DIMS = {"llama": dict(n_layer=2, n_embd=64, n_head=4, n_kv=2, ffn=256, vocab=256, ctx=128),
        "qwen2": dict(n_layer=2, n_embd=64, n_head=4, n_kv=1, ffn=256, vocab=256, ctx=128),
        # transformers sizes GPT-2's position table from n_positions (default 1024), not the GGUF context length
        "gpt2": dict(n_layer=2, n_embd=64, n_head=4, n_kv=4, ffn=256, vocab=256, ctx=1024)}

# Quantization per tensor (full name first, then name without "blk.N."); anything else is F32.
TYPES = {
    "llama": {"token_embd.weight": Q.Q8_0, "attn_v.weight": Q.Q8_0, "attn_output.weight": Q.Q4_0,
              "ffn_gate.weight": Q.Q4_1, "ffn_up.weight": Q.Q5_0, "blk.0.ffn_down.weight": Q.Q4_K,
              "blk.1.ffn_down.weight": Q.Q6_K, "output.weight": Q.BF16},
    "qwen2": {"token_embd.weight": Q.Q4_0, "attn_q.weight": Q.Q8_0, "attn_v.weight": Q.F16,
              "ffn_gate.weight": Q.Q8_0, "ffn_up.weight": Q.Q4_0, "ffn_down.weight": Q.Q6_K},
    "gpt2": {"token_embd.weight": Q.Q8_0, "attn_qkv.weight": Q.Q8_0, "attn_output.weight": Q.Q4_0,
             "ffn_up.weight": Q.F16, "ffn_down.weight": Q.Q4_K, "output.weight": Q.Q8_0},
}
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf (LlamaModel.permute) does to HF q/k rows for llama-arch files."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random but well-scaled Q4_K / Q6_K bytes (gguf-py has no K-quant quantizer): random nibbles and scales,
    small fixed super-block scales so every value is finite and modest."""
    block, size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:    # d, dmin (f16) lead the block
        b[..., 0:2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
        b[..., 2:4] = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
    elif qtype == Q.Q6_K:  # ql[128] qh[64] scales[16] d(f16)
        b[..., 208:210] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
    else:
        raise ValueError(qtype)
    return b.reshape(rows, -1)


def write_tiny_gguf(path, arch="llama", *, seed=0, tied=None, drop=(), kv=None, arch_name=None, types=None,
                    extra_tensors=()):
    """Write a tiny random model the way llama.cpp's converter lays it out; return its HF-layout weights
    (GGUF names, numpy [out, in], before the llama q/k permutation, after quantization round-trip)."""
    d = DIMS[arch]
    L, E, H, KV, F, V = d["n_layer"], d["n_embd"], d["n_head"], d["n_kv"], d["ffn"], d["vocab"]
    hd = E // H
    tied = (arch == "qwen2") if tied is None else tied
    types = TYPES[arch] if types is None else types
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {"token_embd.weight": r(V, E, scale=1.0)}
    if arch == "gpt2":
        t["position_embd.weight"] = r(d["ctx"], E, scale=0.5)
    for i in range(L):
        b = f"blk.{i}."
        t[b + "attn_norm.weight"] = 1 + r(E, scale=0.1)
        if arch == "gpt2":
            t[b + "attn_norm.bias"] = r(E, scale=0.1)
            t[b + "attn_qkv.weight"], t[b + "attn_qkv.bias"] = r(3 * E, E), r(3 * E, scale=0.1)
        else:
            t[b + "attn_q.weight"], t[b + "attn_k.weight"], t[b + "attn_v.weight"] = r(H * hd, E), r(KV * hd, E), r(KV * hd, E)
            if arch == "qwen2":
                t[b + "attn_q.bias"], t[b + "attn_k.bias"], t[b + "attn_v.bias"] = r(H * hd), r(KV * hd), r(KV * hd)
        t[b + "attn_output.weight"] = r(E, H * hd)
        t[b + "ffn_norm.weight"] = 1 + r(E, scale=0.1)
        if arch == "gpt2":
            t[b + "attn_output.bias"], t[b + "ffn_norm.bias"] = r(E, scale=0.1), r(E, scale=0.1)
            t[b + "ffn_up.bias"], t[b + "ffn_down.bias"] = r(F, scale=0.1), r(E, scale=0.1)
        else:
            t[b + "ffn_gate.weight"] = r(F, E)
        t[b + "ffn_up.weight"], t[b + "ffn_down.weight"] = r(F, E), r(E, F)
    t["output_norm.weight"] = 1 + r(E, scale=0.1)
    if arch == "gpt2":
        t["output_norm.bias"] = r(E, scale=0.1)
    if not tied:
        t["output.weight"] = r(V, E)

    w = gguf.GGUFWriter(str(path), arch_name or arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(d["ctx"])
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    if arch == "gpt2":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_head_count_kv(KV)
        w.add_rope_freq_base(5000.0)
        w.add_layer_norm_rms_eps(1e-6)
        if arch == "llama":
            w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<t{i}>" for i in range(V)])
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(["< t", "<t 1"])  # (an empty array would be dropped by the writer)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    for k, v in (kv or {}).items():
        w.add_key_value(k, v[0], v[1])

    ref = {}
    for name, x in t.items():
        if name in drop:
            continue
        short = name.split(".", 2)[2] if name.startswith("blk.") else name
        qtype = types.get(name, types.get(short, Q.F32)) if x.ndim == 2 else Q.F32
        stored = x
        if arch == "llama" and short in ("attn_q.weight", "attn_k.weight"):
            stored = llama_cpp_permute(x, H if short == "attn_q.weight" else KV)
        if qtype in (Q.Q4_K, Q.Q6_K):
            data = k_quant_blocks(*x.shape, qtype, rng)
            deq = gguf.quants.dequantize(data, qtype).reshape(x.shape)  # its value is what the test expects
            ref[name] = deq if stored is x else None
            w.add_tensor(name, data, raw_dtype=qtype)
            continue
        if qtype == Q.F32:
            w.add_tensor(name, stored)
        elif qtype == Q.F16:
            w.add_tensor(name, stored.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        ref[name] = x if qtype == Q.F32 else None  # exact reference only for lossless tensors
    for name, data, qtype in extra_tensors:
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def picochat_model(g):
    from picochat.model.gpt import GPT
    model = GPT(g.config)
    model.load_state_dict(g.state_dict, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny file per architecture: {arch: (path, reference weights)}."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for variant in (*DIMS, "gpt2-tied", "llama-tied"):
        folder = root / variant
        folder.mkdir()
        path = folder / f"tiny-{variant}.gguf"
        arch = variant.split("-")[0]
        out[variant] = (path, write_tiny_gguf(path, arch, tied=True if variant.endswith("-tied") else None))
    return out


# ----------------------------------------------------------------------------- good files
@pytest.mark.parametrize("arch", list(DIMS))
def test_config_and_metadata(tiny, arch):
    path, _ = tiny[arch]
    g = load_gguf(path)
    d, c = DIMS[arch], g.config
    assert (c.architecture, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.intermediate_size, c.vocab_size,
            c.max_seq_len) == (arch, d["n_layer"], d["n_embd"], d["n_head"], d["n_kv"], d["ffn"], d["vocab"], d["ctx"])
    assert c.head_dim == d["n_embd"] // d["n_head"]
    assert c.tie_word_embeddings == (arch == "qwen2")
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    if arch == "gpt2":
        assert (c.norm, c.mlp, c.position, c.norm_eps) == ("layernorm", "gelu", "learned", 1e-5)
        assert c.qkv_bias and c.out_bias and c.mlp_bias
    else:
        assert (c.norm, c.mlp, c.position, c.rope_theta, c.norm_eps) == ("rmsnorm", "swiglu", "rope", 5000.0, 1e-6)
        assert c.qkv_bias == (arch == "qwen2") and not c.out_bias and not c.mlp_bias
    assert all(v.dtype == torch.float32 for v in g.state_dict.values())
    assert sum(g.tensor_types.values()) == len(read_gguf_header(path).tensors)
    assert g.file_size == os.path.getsize(path)
    meta = g.metadata
    assert meta["general.architecture"] == arch and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.tokens"][:2] == ["<t0>", "<t1>"] and meta["tokenizer.ggml.merges"] == ["< t", "<t 1"]
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1] and meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert read_gguf_metadata(path) == meta
    # the same values gguf-py's own reader sees
    reader = gguf.GGUFReader(path)
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        ours = meta[key]
        theirs = fld.contents()
        assert ours == pytest.approx(theirs, rel=1e-6) if isinstance(ours, float) else ours == theirs, key


def test_weights_mapped_exactly(tiny):
    """Lossless (F32) tensors come back bit-exact under our names; llama q/k are un-permuted, qwen2 q/k are not."""
    for arch in ("llama", "qwen2"):
        path, ref = tiny[arch]
        sd = load_gguf(path).state_dict
        assert torch.equal(sd["layers.0.attn.k_proj.weight"], torch.from_numpy(ref["blk.0.attn_k.weight"]))
        assert torch.equal(sd["layers.1.attn_norm.weight"], torch.from_numpy(ref["blk.1.attn_norm.weight"]))
        if arch == "llama":
            q = ref["blk.1.attn_q.weight"]
            assert torch.equal(sd["layers.1.attn.q_proj.weight"], torch.from_numpy(q))
            assert not np.array_equal(q, llama_cpp_permute(q, DIMS[arch]["n_head"]))  # the test is not vacuous
        else:
            assert torch.equal(sd["layers.0.attn.q_proj.bias"], torch.from_numpy(ref["blk.0.attn_q.bias"]))
        assert torch.equal(sd["layers.0.mlp.down_proj.weight"],
                           torch.from_numpy(ref["blk.0.ffn_down.weight"]))  # K-quant values, [out, in]
    path, ref = tiny["gpt2"]
    sd = load_gguf(path).state_dict
    E = DIMS["gpt2"]["n_embd"]
    bias = torch.from_numpy(ref["blk.0.attn_qkv.bias"])
    for j, w in enumerate("qkv"):
        assert torch.equal(sd[f"layers.0.attn.{w}_proj.bias"], bias[j * E:(j + 1) * E])
    assert sd["layers.0.mlp.up_proj.weight"].shape == (DIMS["gpt2"]["ffn"], E)
    assert torch.equal(sd["pos_embed.weight"], torch.from_numpy(ref["position_embd.weight"]))


@pytest.mark.parametrize("variant", [*DIMS, "gpt2-tied", "llama-tied"])
def test_logits_match_transformers(tiny, variant):
    transformers = pytest.importorskip("transformers")
    path, _ = tiny[variant]
    arch = variant.split("-")[0]
    g = load_gguf(path)
    assert g.config.tie_word_embeddings == (variant.endswith("-tied") or arch == "qwen2")
    ours = picochat_model(g)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    idx = torch.randint(0, DIMS[arch]["vocab"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = ours(idx)
        b = hf(idx).logits
    assert a.shape == b.shape
    assert b.std() > 0.3  # logits are not trivially small, so 1e-4 is a real tolerance
    assert (a - b).abs().max().item() <= 1e-4


def test_summary(tiny):
    path, _ = tiny["llama"]
    s = gguf_tensor_summary(path)
    d = DIMS["llama"]
    assert s["architecture"] == "llama" and s["name"] == "tiny-llama" and s["version"] == 3
    assert s["context_length"] == d["ctx"] and s["chat_template"] is True and s["config_error"] is None
    assert s["n_params"] == picochat_model(load_gguf(path)).num_params()
    assert s["tensor_types"]["F32"] == 2 * 2 + 1 + 2 * 2  # norms + output_norm + exact q/k
    assert s["tensor_types"]["Q4_K"] == 1 and s["tensor_types"]["BF16"] == 1
    assert s["file_size"] == os.path.getsize(path)


def llama3_rope_factors(theta, hd, factor=8.0, low=1.0, high=4.0, orig=8192):
    """The rope_freqs tensor llama.cpp's converter writes for a Llama 3 rope_scaling."""
    import math
    out = []
    for f in 1.0 / theta ** (np.arange(0, hd, 2) / hd):
        wl = 2 * math.pi / f
        smooth = (orig / wl - low) / (high - low)
        out.append(1.0 if wl < orig / high else factor if wl > orig / low else 1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_eot_and_rope_freqs(tmp_path):
    """Llama 3 files: the eot id joins eos; a rope_freqs tensor becomes HF's llama3 rope_scaling."""
    d = DIMS["llama"]
    hd = d["n_embd"] // d["n_head"]
    factors = llama3_rope_factors(5000.0, hd)
    assert 1.0 in factors and 8.0 in factors and len(set(factors.tolist())) > 2  # all three regimes occur
    path = tmp_path / "l3.gguf"
    write_tiny_gguf(path, "llama", kv={"tokenizer.ggml.eot_token_id": (7, gguf.GGUFValueType.UINT32)},
                    extra_tensors=[("rope_freqs.weight", factors, None)])
    g = load_gguf(path)
    assert g.config.eos_token_id == [2, 7]
    assert g.config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    from picochat.model.gpt import rope_frequencies  # our model then divides each frequency by exactly those factors
    inv = 1.0 / 5000.0 ** (np.arange(0, hd, 2) / hd)
    np.testing.assert_allclose(rope_frequencies(g.config).numpy(), inv / factors, rtol=1e-5)
    odd = tmp_path / "odd.gguf"
    write_tiny_gguf(odd, "llama", extra_tensors=[("rope_freqs.weight", factors[::-1].copy(), None)])
    expect_error(odd, "rope_freqs")


# ----------------------------------------------------------------------------- the real SmolLM2 file
@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return smollm2_path, load_gguf(smollm2_path)


def test_smollm2_config(smollm2):
    path, g = smollm2
    c = g.config
    assert (c.architecture, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == ("llama", 30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (1536, 49152, 100000.0, True)
    assert (c.max_seq_len, c.norm_eps, c.bos_token_id, c.eos_token_id, c.rope_scaling) == (8192, 1e-5, 1, 2, None)
    assert g.tensor_types == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152 and g.metadata["tokenizer.ggml.pre"] == "smollm"
    assert g.metadata["tokenizer.chat_template"].startswith("{% for message in messages %}")
    assert "lm_head.weight" not in g.state_dict and len(g.state_dict) == 272
    s = gguf_tensor_summary(path)
    assert s["n_params"] == sum(v.numel() for v in g.state_dict.values()) == 134_515_008
    assert s["chat_template"] and s["context_length"] == 8192 and s["file_size"] == g.file_size


def test_smollm2_knows_paris(smollm2):
    """The real model, loaded through our mapping, answers correctly (a wrong q/k un-permutation gives garbage)."""
    _, g = smollm2
    model = picochat_model(g)
    vocab = {s: i for i, s in enumerate(g.metadata["tokenizer.ggml.tokens"])}

    def greedy(pieces: str, n: int) -> list[str]:  # prompts spelled in the GGUF's own byte-level BPE pieces
        ids = [vocab[p] for p in pieces.split()]
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        return [g.metadata["tokenizer.ggml.tokens"][i] for i in ids[-n:]]

    assert greedy("The Ġcapital Ġof ĠFrance Ġis", 1) == ["ĠParis"]
    chat = "<|im_start|> user Ċ What Ġis Ġthe Ġcapital Ġof ĠFrance ? <|im_end|> Ċ <|im_start|> ass istant Ċ"
    assert greedy(chat, 8) == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ".", "<|im_end|>"]


def test_smollm2_logits_match_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    path, g = smollm2
    ours = picochat_model(g)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    idx = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 2, 198, 1, 4093, 198]])
    with torch.no_grad():
        a, _ = ours(idx)
        b = hf(idx).logits
    assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item()


# ----------------------------------------------------------------------------- bad files
def expect_error(path, *fragments, loader=load_gguf):
    with pytest.raises(GGUFError) as ei:
        loader(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in: {msg}"
    return msg


def test_not_gguf(tmp_path):
    z = tmp_path / "model.gguf"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.txt", "hello")
    expect_error(z, "not a GGUF file", "b'PK", "b'GGUF'", "zip")
    expect_error(z, "not a GGUF file", loader=read_gguf_metadata)
    txt = tmp_path / "page.gguf"
    txt.write_text("<!DOCTYPE html><html>Not Found</html>")
    expect_error(txt, "not a GGUF file", "HTML")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    expect_error(empty, "empty")
    expect_error(empty, "empty", loader=gguf_tensor_summary)
    tiny = tmp_path / "gg.gguf"
    tiny.write_bytes(b"GG")
    expect_error(tiny, "truncated")
    expect_error(tmp_path / "nope.gguf", "does not exist")
    expect_error(tmp_path, "directory")


def test_bad_version(tmp_path, tiny):
    data = bytearray(tiny["llama"][0].read_bytes())
    p = tmp_path / "v9.gguf"
    p.write_bytes(bytes(data[:4] + struct.pack("<I", 9) + data[8:]))
    expect_error(p, "version 9")


def test_truncated_header(tmp_path, tiny):
    data = tiny["llama"][0].read_bytes()
    for n, where in ((6, "version"), (20, "counts"), (200, "metadata"), (read_gguf_header(tiny["llama"][0]).data_offset - 40, "tensor")):
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(data[:n])
        expect_error(p, "truncated", where)
        expect_error(p, "truncated", loader=read_gguf_metadata)


def test_truncated_tensor_data(tmp_path, tiny):
    src = tiny["llama"][0]
    last = list(read_gguf_header(src).tensors)[-1]
    p = tmp_path / "cut.gguf"
    p.write_bytes(src.read_bytes()[:-10])
    msg = expect_error(p, "truncated", repr(last), "runs past the end")
    assert "get the file again" in msg
    expect_error(p, "truncated", loader=read_gguf_metadata)  # even the metadata reader refuses a cut file


def test_tensor_offset_beyond_eof(tmp_path, tiny):
    src = tiny["llama"][0]
    reader = gguf.GGUFReader(src)
    t = reader.tensors[3]
    info_end = t.field.offset + sum(int(part.nbytes) for part in t.field.parts)
    data = bytearray(src.read_bytes())
    data[info_end - 8:info_end] = struct.pack("<Q", 1 << 40)  # the tensor's data offset is the record's last field
    p = tmp_path / "offset.gguf"
    p.write_bytes(bytes(data))
    expect_error(p, repr(t.name), "beyond the end of the file")


def test_unknown_architecture(tmp_path):
    p = tmp_path / "mamba.gguf"
    write_tiny_gguf(p, "llama", arch_name="mamba")
    msg = expect_error(p, "architecture 'mamba' is not supported; picochat loads llama, qwen2, gpt2")
    assert gguf_tensor_summary(p)["config_error"] == msg  # info still works on it
    assert read_gguf_metadata(p)["general.architecture"] == "mamba"


def test_missing_tensor(tmp_path):
    p = tmp_path / "missing.gguf"
    write_tiny_gguf(p, "llama", drop=("blk.1.ffn_down.weight", "output_norm.weight"))
    expect_error(p, "missing 2 tensor", "'blk.1.ffn_down.weight'", "'output_norm.weight'")


def test_shape_mismatch(tmp_path):
    p = tmp_path / "shape.gguf"
    ref = write_tiny_gguf(p, "qwen2")
    data = bytearray(p.read_bytes())
    # rewrite feed_forward_length (256) in place as 192
    key = b"qwen2.feed_forward_length"
    at = data.index(key) + len(key) + 4  # skip the uint32 value type
    assert struct.unpack_from("<I", data, at)[0] == 256 and ref
    data[at:at + 4] = struct.pack("<I", 192)
    p.write_bytes(bytes(data))
    expect_error(p, "shapes do not match", "'blk.0.ffn_gate.weight' is [256, 64], expected [192, 64]")


def test_unsupported_tensor_type(tmp_path):
    p = tmp_path / "iq.gguf"
    d = DIMS["llama"]
    block, size = GGML_QUANT_SIZES[Q.IQ4_NL]
    junk = np.zeros((d["ffn"], d["n_embd"] // block * size), dtype=np.uint8)
    write_tiny_gguf(p, "llama", drop=("blk.0.ffn_gate.weight",),
                    extra_tensors=[("blk.0.ffn_gate.weight", junk, Q.IQ4_NL)])
    expect_error(p, "'blk.0.ffn_gate.weight' (IQ4_NL)", "cannot dequantize")
    # an unknown ggml type id (a newer llama.cpp) is refused at header time
    data = bytearray(p.read_bytes())
    reader = gguf.GGUFReader(p)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
    end = t.field.offset + sum(int(part.nbytes) for part in t.field.parts)
    data[end - 12:end - 8] = struct.pack("<I", 250)
    p2 = tmp_path / "newtype.gguf"
    p2.write_bytes(bytes(data))
    expect_error(p2, "'blk.0.ffn_gate.weight'", "type id 250")


def test_corruption_never_escapes_as_another_error(tmp_path, tiny):
    """Cut anywhere or flip header bytes: the loader either loads or raises GGUFError, never anything else."""
    src = tiny["gpt2"][0]
    data = src.read_bytes()
    header_end = read_gguf_header(src).data_offset
    rng = np.random.default_rng(0)
    p = tmp_path / "fuzz.gguf"
    cuts = sorted(set(rng.integers(1, len(data), 25).tolist()) | set(rng.integers(1, header_end, 25).tolist()))
    for n in cuts:
        p.write_bytes(data[:n])
        with pytest.raises(GGUFError):
            load_gguf(p)
    for _ in range(150):
        b = bytearray(data)
        for pos in rng.integers(4, header_end, 2):
            b[pos] = rng.integers(0, 256)
        p.write_bytes(bytes(b))
        try:
            load_gguf(p)
        except GGUFError as e:
            assert str(p) in str(e)
