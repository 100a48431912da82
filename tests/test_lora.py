"""LoRA: the parameters it adds, that it starts as the base model, merging, and PEFT-format adapters
(checked against PEFT itself on transformers' Llama when peft is installed)."""
import json

import pytest
import torch

from picochat.model.config import ModelConfig
from picochat.formats.hf import CheckpointError, save_hf_folder
from picochat.model.gpt import GPT
from picochat import hub
from picochat.formats import peft as peft_format
from picochat.load import load
from picochat.model import lora

TINY = ModelConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=80, max_seq_len=32)
ALL = lora.TARGET_MODULES


def tiny_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY).eval()


def adapted(targets=ALL, r=4, alpha=8.0, seed=0, randomize=True) -> GPT:
    model = lora.apply_lora(tiny_model(seed), lora.LoRAConfig(r=r, alpha=alpha, target_modules=targets))
    if randomize:  # a trained-looking adapter (B starts at zero)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


X = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("r", [1, 4])
def test_rank_r_adds_exactly_r_times_in_plus_out_per_adapted_matrix_and_freezes_the_rest(r):
    base_params = tiny_model().num_params()
    model = adapted(r=r, randomize=False)
    kv = TINY.n_kv_head * TINY.head_dim
    shapes = {"q_proj": (32, 32), "k_proj": (32, kv), "v_proj": (32, kv), "o_proj": (32, 32),
              "gate_proj": (32, 80), "up_proj": (32, 80), "down_proj": (80, 32)}  # (in, out)
    expected = TINY.n_layer * sum(r * (i + o) for i, o in shapes.values())
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == expected
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert model.num_params() == base_params + expected
    assert model.layers[0].attn.q_proj.lora_A.weight.shape == (r, 32)
    assert model.layers[1].mlp.down_proj.lora_B.weight.shape == (32, r)


def test_lora_starts_equal_to_the_base_model():
    base, model = tiny_model(), adapted(randomize=False)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if ".lora_B." in n)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if ".lora_A." in n)
    with torch.no_grad():
        assert torch.equal(base(X)[0], model(X)[0])


def test_only_the_named_targets_are_adapted():
    model = adapted(targets=("q_proj", "v_proj"))
    names = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert names == {f"layers.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    with pytest.raises(ValueError, match="unknown LoRA target modules nope"):
        lora.apply_lora(tiny_model(), lora.LoRAConfig(target_modules=("nope",)))


def test_merging_gives_the_same_logits_as_base_plus_adapter():
    model = adapted()
    with torch.no_grad():
        before = model(X)[0]
        assert not torch.allclose(before, tiny_model()(X)[0], atol=1e-4)
        merged = lora.merge_lora(model)
        assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
        assert set(merged.state_dict()) == set(tiny_model().state_dict())
        torch.testing.assert_close(merged(X)[0], before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [ALL, ("q_proj", "v_proj", "up_proj")])
def test_an_adapter_kept_beside_fused_projections_computes_what_the_lora_model_does(targets):
    # q|k|v and gate|up fused as for generation: each part's update stacked (a part left alone gets zeros)
    from picochat.load import attach_adapter, fuse_projections
    model = adapted(targets=targets)
    fused = fuse_projections(tiny_model())
    assert fused.layers[0].attn.qkv_proj is not None and fused.layers[0].mlp.gate_up_proj is not None
    attach_adapter(fused, model.lora_config, lora.lora_state_dict(model))
    assert isinstance(fused.layers[1].attn.qkv_proj, lora.LowRankAdded)
    with torch.no_grad():
        torch.testing.assert_close(fused(X)[0], model(X)[0], atol=1e-5, rtol=1e-5)


def test_an_adapter_that_does_not_fit_the_model_is_refused_by_name():
    from picochat.load import attach_adapter, fuse_projections
    model = adapted(targets=("q_proj", "down_proj"))
    tensors = lora.lora_state_dict(model)
    wrong = dict(tensors, **{"layers.1.mlp.down_proj.lora_B.weight": torch.zeros(31, 4)})
    with pytest.raises(CheckpointError, match="layers.1.mlp.down_proj has shapes"):
        attach_adapter(fuse_projections(tiny_model()), model.lora_config, wrong)
    extra = dict(tensors, **{"layers.7.attn.q_proj.lora_A.weight": torch.zeros(4, 32),
                             "layers.7.attn.q_proj.lora_B.weight": torch.zeros(32, 4)})
    with pytest.raises(CheckpointError, match="layers.7.attn.q_proj names no layer"):
        attach_adapter(fuse_projections(tiny_model()), model.lora_config, extra)
    half = {k: v for k, v in tensors.items() if k != "layers.0.attn.q_proj.lora_B.weight"}
    with pytest.raises(CheckpointError, match="layers.0.attn.q_proj lacks lora_A/lora_B"):
        attach_adapter(fuse_projections(tiny_model()), model.lora_config, half)


@pytest.mark.parametrize("fuse", [True, False])
def test_an_adapter_on_a_quantized_model_keeps_its_integer_codes_and_the_adapters_numbers(smollm2_path, tmp_path, fuse):
    from picochat import kernels
    from picochat.quant.layers import QLinear
    if not kernels.available():
        pytest.skip("picochat's kernel is not built here")
    base = load(str(smollm2_path), quantized=False, fuse=False, dtype="float32", draft=None).model
    model = lora.apply_lora(base, lora.LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    peft_format.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(smollm2_path))
    kept = load(str(smollm2_path), adapter=str(tmp_path / "adapter"), fuse=fuse, draft=None)
    folded = load(str(smollm2_path), adapter=str(tmp_path / "adapter"), quantized=False, dtype="float32", draft=None)
    plain = load(str(smollm2_path), fuse=fuse, draft=None)
    assert kept.weights == "quantized"
    layer = kept.model.layers[3].mlp.down_proj
    assert isinstance(layer, lora.LowRankAdded) and isinstance(layer.base, QLinear)
    ids = torch.tensor([kept.tokenizer.encode("The shop opens at nine on Saturdays and closes at five; on Sundays")])
    with torch.inference_mode():
        got, want, before = kept.model(ids)[0], folded.model(ids)[0], plain.model(ids)[0]
    def rel(a, b):
        return float((a - b).norm() / b.norm())
    assert rel(got, want) < 2e-3 < rel(before, want)   # the adapter's numbers, to the kernel's ~float precision
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9


def test_a_peft_format_adapter_round_trips(tmp_path):
    model = adapted(targets=("q_proj", "k_proj", "down_proj"))
    peft_format.save_adapter(model, tmp_path / "adapter", base_model_name_or_path="base")
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 3 * TINY.n_layer
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == ("LORA", 4, 8.0, "base")
    config, tensors, base = peft_format.read_adapter(tmp_path / "adapter", TINY)
    again = lora.apply_lora(tiny_model(), config)
    peft_format.load_adapter_weights(again, tensors)
    with torch.no_grad():
        torch.testing.assert_close(again(X)[0], model(X)[0])


def test_models_load_applies_an_adapter_that_names_its_base(tmp_path):
    from picochat.tokenizer.bpe import Tokenizer
    save_hf_folder(tiny_model(), tmp_path / "base", Tokenizer.train(["hello world, the cat"] * 5, vocab_size=300))
    model = adapted()
    peft_format.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    loaded = load(str(tmp_path / "adapter"), dtype=torch.float32).model
    explicit = load(str(tmp_path / "base"), dtype=torch.float32, adapter=str(tmp_path / "adapter")).model
    with torch.no_grad():
        torch.testing.assert_close(loaded(X)[0], model(X)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(explicit(X)[0], model(X)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(hub.ModelNotFound, match="not a LoRA adapter folder"):
        load(str(tmp_path / "base"), adapter=str(tmp_path / "base"))


def test_peft_loads_our_adapter_onto_transformers_llama_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    save_hf_folder(tiny_model(), tmp_path / "base")
    model = adapted()
    peft_format.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(X).logits, model(X)[0], atol=1e-4, rtol=1e-4)
    # and PEFT's own save is what we read
    hf.save_pretrained(tmp_path / "peft-saved")
    config, tensors, _ = peft_format.read_adapter(tmp_path / "peft-saved", TINY)
    again = lora.apply_lora(tiny_model(), config)
    peft_format.load_adapter_weights(again, tensors)
    with torch.no_grad():
        torch.testing.assert_close(again(X)[0], model(X)[0], atol=1e-5, rtol=1e-5)


def test_dropout_acts_only_in_training():
    model = lora.apply_lora(tiny_model(), lora.LoRAConfig(r=4, dropout=0.5, target_modules=("q_proj",)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.fill_(0.1)
        model.eval()
        assert torch.equal(model(X)[0], model(X)[0])
        model.train()
        torch.manual_seed(0)
        assert not torch.equal(model(X)[0], model(X)[0])
