"""Our Transformer against transformers' reference implementations, on tiny random models."""
import pytest
import torch
import transformers

from picochat.model.config import ModelConfig
from picochat.formats.hf import load_hf_folder, save_hf_folder
from picochat.model.gpt import GPT

HF_CONFIGS = {
    "gpt2": transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                    resid_pdrop=0, embd_pdrop=0, attn_pdrop=0),
    "llama": transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=500.0, tie_word_embeddings=False),
    "qwen2": transformers.Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=64,
                                      rope_theta=10000.0, tie_word_embeddings=True),
}


def hf_model(arch, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[arch], attn_implementation="eager").eval()
    with torch.no_grad():  # make biases and norm weights non-trivial so a mapping mistake shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def load_ours(folder):
    config, sd = load_hf_folder(folder)
    model = GPT(config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def pair(request, tmp_path_factory):
    arch = request.param
    ref = hf_model(arch)
    folder = tmp_path_factory.mktemp(arch)
    ref.save_pretrained(folder)
    return arch, ref, load_ours(folder), folder


@torch.no_grad()
def test_logits_match_transformers(pair):
    arch, ref, ours, _ = pair
    idx = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    expected = ref(idx).logits
    got, _ = ours(idx)
    assert (got - expected).abs().max().item() <= 1e-4


@torch.no_grad()
def test_kv_cache_prompt_then_steps(pair):
    arch, ref, ours, _ = pair
    idx = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    expected = ref(idx).logits
    cache = ours.new_kv_cache(batch_size=1)
    prompt_logits, _ = ours(idx[:, :12], kv_cache=cache)          # prefill
    chunk_logits, _ = ours(idx[:, 12:15], kv_cache=cache)         # a chunk after cached positions
    steps = [ours(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(15, 20)]  # one token at a time
    got = torch.cat([prompt_logits, chunk_logits, *steps], dim=1)
    assert cache.length == 20
    assert (got - expected).abs().max().item() <= 1e-4


@torch.no_grad()
def test_save_then_transformers_loads_same_logits(pair, tmp_path):
    arch, ref, ours, _ = pair
    save_hf_folder(ours, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == type(ref).__name__
    idx = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))
    assert (reloaded(idx).logits - ours(idx)[0]).abs().max().item() <= 1e-4


def test_loss_is_mean_next_token_nll():
    config = ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32,
                         max_seq_len=16)
    torch.manual_seed(0)
    model = GPT(config)
    idx = torch.randint(0, 50, (2, 8))
    targets = torch.randint(0, 50, (2, 8))
    targets[0, :3] = -100  # ignored positions (e.g. a masked prompt)
    logits, loss = model(idx, targets)
    logp = torch.log_softmax(logits.float(), -1)
    keep = targets != -100
    nll = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    assert torch.allclose(loss, nll, atol=1e-6)


def test_context_overflow_is_a_clear_error():
    config = ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32,
                         max_seq_len=8)
    model = GPT(config)
    with pytest.raises(ValueError, match="exceeds the context length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@torch.no_grad()
def test_rows_of_different_lengths_decode_together(pair):
    """A server's batch: each row prefilled on its own, then one forward step for all rows at once."""
    arch, ref, ours, _ = pair
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (5, 11, 8)]
    steps = torch.randint(0, 97, (len(seqs), 4), generator=g)  # the next 4 tokens of each row
    cache = ours.new_kv_cache(batch_size=3, max_len=32)
    for i, s in enumerate(seqs):
        ours(s[None], kv_cache=cache.rows(i, i + 1))
    assert cache.lengths.tolist() == [5, 11, 8]
    batched = [ours(steps[:, t:t + 1], kv_cache=cache)[0][:, 0] for t in range(4)]  # (3, vocab) each
    for i, s in enumerate(seqs):
        full = torch.cat([s, steps[i]])[None]
        expected = ref(full).logits[0, len(s):]
        got = torch.stack([b[i] for b in batched])
        assert (got - expected).abs().max().item() <= 1e-4
