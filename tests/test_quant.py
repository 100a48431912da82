"""Quantized weights kept quantized: the packed layout, GGUF blocks repacked, and the compiled kernel checked
against an exact emulation of its arithmetic and against dequantize-then-matmul, on every instruction-set path."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from picochat import kernels
from picochat.quant import gguf_blocks as gguf_quant
from picochat.quant import layers, matrix
from picochat.quant.matrix import QuantizedMatrix

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"no compiled kernel: {kernels.status()}")
SHAPES = [(1, 37, 576), (3, 64, 100), (5, 130, 1536), (9, 9, 64), (1, 4, 40)]  # (tokens, out, in)


def random_matrix(n, k, bits, group, has_min, seed=0) -> QuantizedMatrix:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g) if bits == 4 else torch.randint(-128, 128, (n, k), generator=g)
    groups = -(-k // group)
    scale = (torch.rand(n, groups, generator=g) * 0.02 + 1e-3).half()
    mins = (torch.randn(n, groups, generator=g) * 0.05).half() if has_min else None
    return QuantizedMatrix.from_codes(codes, scale, mins, bits, group)


def emulate(x: torch.Tensor, m: QuantizedMatrix, act_bits: int = 15) -> torch.Tensor:
    """What the kernel computes, written out: x as two 8-bit planes per group, x ≈ xs·(xq + xr/254), integer
    dot products with the codes, then Σ_g scale·xs/254·Σ(254·xq + xr)·q + min·Σx (act_bits 8: xr = 0)."""
    codes, scale, mins = m.unpack()
    n, k = codes.shape
    kp, g = matrix.padded(k), m.group
    xp = F.pad(x.float(), (0, kp - k)).view(x.shape[0], -1, g)
    xs = xp.abs().amax(-1) / 127
    f = xp * torch.where(xs > 0, 1 / xs, 0)[..., None]
    xq = torch.round(f)
    xr = torch.round((f - xq) * 254) if act_bits == 15 else torch.zeros_like(xq)
    cp = F.pad(codes, (0, kp - k)).view(n, -1, g).double()
    dots = torch.einsum("mgk,ngk->mng", (254 * xq + xr).double(), cp)      # exact integers
    y = (dots * scale.double()[None] * (xs.double() / 254)[:, None]).sum(-1)
    if mins is not None:
        y += (mins.double()[None] * xp.double().sum(-1)[:, None]).sum(-1)
    return y.float()


def run_kernel(x, m: QuantizedMatrix, act_bits: int = 15):
    return torch.ops.picochat.qlinear(x, m.packed, m.bits, m.group, m.in_features, m.out_features, m.has_min,
                                      act_bits)


# ----------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [16, 32, 64])
def test_pack_and_unpack_round_trip(bits, group):
    for n, k in [(1, 64), (5, 100), (13, 576)]:
        m = random_matrix(n, k, bits, group, has_min=bits == 4, seed=n)
        codes, scale, mins = m.unpack()
        again = QuantizedMatrix.from_codes(codes, scale, mins, bits, group)
        assert torch.equal(again.packed, m.packed) and m.shape == (n, k)
        assert m.packed.shape[0] == -(-n // matrix.ROWS)


def test_cat_and_take_rows_keep_the_values():
    parts = [random_matrix(n, 100, 4, 32, True, seed=n) for n in (8, 4, 6)]
    fused = QuantizedMatrix.cat(parts)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    odd = QuantizedMatrix.cat([parts[2], parts[0]])  # 6 rows first: not whole tiles, repacked
    assert torch.equal(odd.dequantize(), torch.cat([parts[2].dequantize(), parts[0].dequantize()]))
    rows = torch.tensor([5, 0, 3])
    assert torch.equal(parts[2].take_rows(rows).dequantize(), parts[2].dequantize()[rows])
    with pytest.raises(ValueError, match="different quantization formats"):
        QuantizedMatrix.cat([parts[0], random_matrix(4, 100, 8, 32, False)])


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rounds_each_weight_to_its_nearest_code(bits):
    w = torch.randn(40, 200) * 0.05
    m = matrix.quantize(w, bits, 32)
    err = (m.dequantize() - w).abs()
    _, scale, _ = m.unpack()
    step = scale.float().repeat_interleave(32, dim=1)[:, :200]
    assert bool((err <= step * 0.5 + 1e-6).all())   # half a step (plus float16 rounding of the scale)
    assert (err.norm() / w.norm()) < (0.01 if bits == 8 else 0.12)


# ----------------------------------------------------------------------------- GGUF blocks
def gguf_blocks(qtype, rows, cols, rng):
    """A GGUF tensor's raw bytes: gguf-py quantizes the legacy types; K-quants are random well-scaled blocks."""
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        block, size = GGML_QUANT_SIZES[qtype]
        b = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        if qtype == Q.Q6_K:
            b[..., 208:210] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
        else:  # d, dmin lead the block
            b[..., 0:2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
            b[..., 2:4] = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
        return b.reshape(rows, -1)
    return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_gguf_blocks_become_the_same_values(qtype):
    rows, cols = 6, 512
    raw = gguf_blocks(qtype, rows, cols, np.random.default_rng(int(qtype)))
    want = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(rows, cols))
    m = gguf_quant.from_gguf(qtype.name, raw.reshape(-1), (rows, cols))
    assert m.bits == gguf_quant.EXACT_TYPES[qtype.name]
    got = m.dequantize()
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0):
        assert torch.equal(got, want)                      # their scales are float16: exact
    else:  # scale and min: a float16 times a 6- or 8-bit integer, rounded back to float16 (2⁻¹¹ relative)
        assert ((got - want).abs() <= 1e-3 * want.abs().amax(dim=1, keepdim=True)).all()


# ----------------------------------------------------------------------------- the kernel
@needs_kernel
@pytest.mark.parametrize("bits,has_min", [(4, True), (8, False), (8, True)])
@pytest.mark.parametrize("group", [16, 32, 64])
def test_kernel_equals_an_exact_emulation_of_its_arithmetic(bits, has_min, group):
    for i, (tokens, n, k) in enumerate(SHAPES):
        m = random_matrix(n, k, bits, group, has_min, seed=i)
        x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(i))
        for act_bits in (15, 8):   # two activation planes, or one (a prompt, where a model allows it)
            want = emulate(x, m, act_bits)
            got = run_kernel(x, m, act_bits)
            assert ((got - want).norm() / want.norm()).item() < 1e-5, (tokens, n, k, act_bits)
        assert not torch.equal(run_kernel(x, m, 8), run_kernel(x, m, 15))


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_is_close_to_dequantize_then_matmul(bits):
    for i, (tokens, n, k) in enumerate(SHAPES):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(i)) * 0.05
        m = matrix.quantize(w, bits, 32)
        x = torch.randn(2, tokens, k)                        # any leading dimensions
        want = x @ m.dequantize().T
        got = run_kernel(x, m)
        assert got.shape == want.shape
        assert ((got - want).norm() / want.norm()).item() < 5e-4  # ~15-bit activations (cancellation: 4 outputs)
        assert run_kernel(x.bfloat16(), m).dtype == torch.bfloat16


@needs_kernel
def test_kernel_dequantize_equals_plain_pytorch():
    for bits, group, has_min in [(4, 32, True), (8, 16, False), (8, 64, True)]:
        m = random_matrix(13, 200, bits, group, has_min)
        spec = (m.bits, m.group, m.in_features, m.out_features, m.has_min)
        assert torch.equal(torch.ops.picochat.dequantize(m.packed, *spec, torch.float32), m.dequantize())
        rows = torch.tensor([12, 0, 7, 7])
        assert torch.equal(torch.ops.picochat.dequantize(m.packed, *spec, torch.float32, rows), m.dequantize()[rows])
        assert torch.equal(torch.ops.picochat.dequantize(m.packed, *spec, torch.bfloat16), m.dequantize().bfloat16())
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.picochat.dequantize(m.packed, *spec, torch.float32, torch.tensor([13]))
    with pytest.raises(RuntimeError, match="packed weight must be uint8"):
        torch.ops.picochat.qlinear(torch.randn(1, 200), m.packed[:-1], *spec)


@needs_kernel
def test_qlinear_and_qembedding_layers():
    m = matrix.quantize(torch.randn(48, 64) * 0.1, 8, 32)
    layer = layers.QLinear(m, bias=torch.randn(48))
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), x @ m.dequantize().T + layer.bias, rtol=0.02, atol=0.02)
    emb = layers.QEmbedding(m)
    idx = torch.tensor([[3, 47], [0, 3]])
    assert torch.equal(emb(idx), m.dequantize()[idx])


SCRIPT = """
import torch, sys
sys.path.insert(0, {tests!r})
from picochat import kernels
from test_quant import random_matrix, emulate, run_kernel
assert kernels.available(), kernels.status()
print(torch.ops.picochat.isa())
for i, (bits, group, has_min) in enumerate([(4, 32, True), (8, 16, False), (8, 32, True), (4, 64, True)]):
    m = random_matrix(19, 300, bits, group, has_min, seed=i)
    x = torch.randn(5, 300)
    for act_bits in (15, 8):
        want, got = emulate(x, m, act_bits), run_kernel(x, m, act_bits)
        assert ((got - want).norm() / want.norm()).item() < 1e-5, (bits, group, act_bits)
    spec = (m.bits, m.group, m.in_features, m.out_features, m.has_min)
    assert torch.equal(torch.ops.picochat.dequantize(m.packed, *spec, torch.float32), m.dequantize())
print("ok")
"""


def _cpu_has(flag: str) -> bool:
    from picochat.hw import cpu_flags
    return flag in cpu_flags()


@needs_kernel
@pytest.mark.parametrize("march,isa,flag", [("haswell", "avx2", "avx2"), ("alderlake", "avx-vnni", "avx_vnni"),
                                            ("x86-64", "scalar", "avx2")])
def test_every_instruction_set_path_computes_the_same(march, isa, flag, tmp_path):
    """Build the kernel for other CPUs (AVX2 without VNNI, AVX-VNNI, no vector instructions) and check it."""
    if not _cpu_has(flag):
        pytest.skip(f"this CPU cannot run the {isa} build (no {flag})")
    env = dict(os.environ, PICOCHAT_MARCH=march, PICOCHAT_HOME=str(tmp_path))
    script = SCRIPT.format(tests=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [isa, "ok"]


# ----------------------------------------------------------------------------- whole models
from picochat.load import PRECISION_SAMPLE, load  # noqa: E402
from picochat.engine.engine import Engine  # noqa: E402
from picochat.engine.sampling import SamplingParams  # noqa: E402
from picochat.formats.packed import save_packed  # noqa: E402
from test_gguf import write_tiny_gguf  # noqa: E402


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def tiny_vocabulary(monkeypatch):
    """The tiny test GGUFs name tokens <t0>..<t255> without a real BPE vocabulary: read them as whole words."""
    import tokenizers

    from picochat.tokenizer.bpe import Tokenizer
    real = Tokenizer.from_gguf_metadata.__func__

    def from_gguf_metadata(cls, meta, source="GGUF metadata"):
        tokens = meta.get("tokenizer.ggml.tokens") or []
        if tokens[:1] != ["<t0>"]:
            return real(cls, meta, source)
        backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
        backend.add_tokens([tokenizers.AddedToken(t, normalized=False) for t in tokens])
        return cls(backend, bos_token="<t1>", eos_token="<t2>", chat_template=meta.get("tokenizer.chat_template"))
    monkeypatch.setattr(Tokenizer, "from_gguf_metadata", classmethod(from_gguf_metadata))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-gguf")
    files = {}
    for arch in ("llama", "qwen2", "gpt2"):
        files[arch] = root / f"{arch}.gguf"
        write_tiny_gguf(files[arch], arch)
    return files


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_a_quantized_gguf_model_computes_what_its_float_twin_does(tiny_files, arch):
    q = load(str(tiny_files[arch]), cache=False)
    f = load(str(tiny_files[arch]), dtype="float32", quantized=False, fuse=False)
    assert q.weights == "quantized" and f.weights == "float"
    assert any(isinstance(m, layers.QLinear) for m in q.model.modules())
    assert not any(isinstance(m, layers.QLinear) for m in f.model.modules())
    idx = torch.randint(0, q.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, _ = f.model(idx)
        layers.use_prompt_activation_bits(q.model, 8)
        fast, _ = q.model(idx)            # a prompt's products with 8-bit activations: llama.cpp's precision
        assert relative_error(fast, want) < 0.1 and (fast.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
        layers.use_prompt_activation_bits(q.model, 15)
        got, _ = q.model(idx)             # two planes, as decoding: dequantize-then-multiply's numbers
        assert relative_error(got, want) < 1e-3
        cache = q.model.new_kv_cache(2, 32)           # the same with a KV cache, a token at a time at the end
        q.model(idx[:, :20], kv_cache=cache)
        for t in range(20, 24):
            step, _ = q.model(idx[:, t:t + 1], kv_cache=cache)
            assert relative_error(step[:, 0], want[:, t]) < 1e-3


@needs_kernel
def test_a_converted_gguf_is_cached_and_converted_again_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, "qwen2", seed=1)
    first = load(str(path))
    second = load(str(path))
    assert not first.from_cache and second.from_cache and second.weights == "quantized"
    idx = torch.tensor([[5, 9, 31, 2, 77]])
    with torch.inference_mode():
        assert torch.equal(first.model(idx)[0], second.model(idx)[0])
        assert first.tokenizer.encode("<t5><t9>") == second.tokenizer.encode("<t5><t9>")
        write_tiny_gguf(path, "qwen2", seed=2)          # a different file at the same path
        third = load(str(path))
        assert not third.from_cache and not torch.equal(third.model(idx)[0], first.model(idx)[0])


@needs_kernel
def test_a_packed_folder_loads_back_the_same_model(tiny_files, tmp_path):
    q = load(str(tiny_files["llama"]), cache=False)
    folder = save_packed(q.model, q.tokenizer, tmp_path / "packed")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    back = load(str(folder))
    assert back.format == "packed" and back.weights == "quantized"
    idx = torch.tensor([[1, 2, 3, 50, 60]])
    with torch.inference_mode():
        assert torch.equal(back.model(idx)[0], q.model(idx)[0])


@needs_kernel
def test_smollm2_quantized_and_fused_answers_like_float32(smollm2_path):
    q = load(str(smollm2_path), cache=False)
    f = load(str(smollm2_path), dtype="float32", quantized=False, fuse=False)
    block = q.model.layers[0]
    assert isinstance(block.attn.qkv_proj, layers.QLinear) and isinstance(block.mlp.gate_up_proj, layers.QLinear)
    assert isinstance(q.model.embed, layers.QEmbedding) and q.model.lm_head.qweight is q.model.embed.qweight
    params = SamplingParams(temperature=0, max_new_tokens=12)
    for question, answer in [("What is the capital of France?", "Paris"), ("What is 12 times 12?", None)]:
        ids = Engine(q.model, q.tokenizer).chat_prompt([{"role": "user", "content": question}])
        a = Engine(q.model, q.tokenizer).complete(ids, params)
        b = Engine(f.model, f.tokenizer).complete(ids, params)
        assert a.token_ids == b.token_ids and (answer is None or answer in a.text)
        with torch.inference_mode():
            la, lb = q.model(torch.tensor([ids]))[0][0], f.model(torch.tensor([ids]))[0][0]
        assert relative_error(la, lb) < 1e-3                    # the same weights, ~15-bit activations
        assert (la.argmax(-1) == lb.argmax(-1)).float().mean() > 0.99


@needs_kernel
def test_prompt_precision_is_chosen_per_model_by_measurement(smollm2_path):
    """8-bit activations for prompts only where the model's next-token distributions barely move: SmolLM2-135M
    moves too much (KL ~0.02 nats) and keeps ~15 bits; the choice is stored with the cached conversion."""
    q = load(str(smollm2_path), cache=False)
    assert q.model.lm_head.prompt_act_bits == 15
    ids = q.tokenizer.encode(PRECISION_SAMPLE)
    assert layers.choose_prompt_bits(q.model, ids) == 15
    assert layers.choose_prompt_bits(q.model, ids, max_kl=1.0) == 8     # a tolerance it meets
    assert all(m.prompt_act_bits == 15 for m in q.model.modules() if isinstance(m, layers.QLinear))


# ----------------------------------------------------------------------------- the decoder's other kernels
from picochat.model import gpt as model_module  # noqa: E402
from picochat.model.config import ModelConfig  # noqa: E402
from picochat.model.gpt import GPT, rotate_half  # noqa: E402


@needs_kernel
def test_rms_norm_and_rope_kernels_compute_the_model_formulas():
    x, w = torch.randn(3, 5, 96), torch.rand(96) + 0.5
    want = w * F.rms_norm(x, (96,), eps=1e-5)
    assert torch.allclose(torch.ops.picochat.rms_norm(x, w, 1e-5), want, rtol=1e-5, atol=1e-6)
    qkv = torch.randn(2, 7, 10, 32)          # (B, heads, T, D); rotate a strided slice, as the fused path does
    qk = qkv[:, :5]
    cos, sin = torch.randn(1, 1, 10, 32), torch.randn(1, 1, 10, 32)
    want = qk * cos + rotate_half(qk) * sin
    assert torch.allclose(torch.ops.picochat.rope(qk, cos, sin), want, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_decode_attention_appends_and_attends_each_row_over_its_own_length():
    B, H, KV, L, D = 3, 6, 2, 40, 32
    kc, vc = torch.randn(B, KV, L, D), torch.randn(B, KV, L, D)
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, KV, 1, D), torch.randn(B, KV, 1, D)
    pos = torch.tensor([0, 17, 39])
    want_k, want_v = kc.clone(), vc.clone()
    got = torch.ops.picochat.decode_attention(q, k, v, kc, vc, pos)
    for b in range(B):
        want_k[b, :, pos[b]], want_v[b, :, pos[b]] = k[b, :, 0], v[b, :, 0]
        n = int(pos[b]) + 1
        ref = F.scaled_dot_product_attention(q[b:b + 1], want_k[b:b + 1, :, :n], want_v[b:b + 1, :, :n], enable_gqa=True)
        assert torch.allclose(got[b:b + 1], ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    with pytest.raises(RuntimeError, match="full"):
        torch.ops.picochat.decode_attention(q, k, v, kc, vc, torch.tensor([0, 1, 40]))


@needs_kernel
def test_generation_with_and_without_the_kernels_agrees(monkeypatch):
    config = ModelConfig(vocab_size=101, n_layer=2, n_head=6, n_kv_head=2, n_embd=48, intermediate_size=80,
                         max_seq_len=64, initializer_range=0.2)
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, 101, (2, 12))
    outputs, kernel_calls = [], []
    real = model_module._kernel_ok
    monkeypatch.setattr(model_module, "_kernel_ok", lambda x, enabled: kernel_calls.append(real(x, enabled))
                        or kernel_calls[-1])
    for on in (False, True):
        model.use_cpu_kernels(on)
        kernel_calls.clear()
        with torch.inference_mode():
            cache = model.new_kv_cache(2, 32)
            cache.lengths[1] = 0
            logits = [model(idx[:, :8], kv_cache=cache)[0]]
            cache.lengths[0] -= 2  # rows of different lengths: one token each, as the server's batch steps
            for t in range(8, 12):
                logits.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
        outputs.append(torch.cat(logits, dim=1))
        assert any(kernel_calls) == on  # RMSNorm, RoPE and the one-token attention ran on the kernels, or none did
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
