"""The default model, Qwen2.5-Coder-1.5B-Instruct, as `picochat pull` installs it: read right (float32 logits
equal transformers' own GGUF loader's), run right (the packed 4/8-bit path writes the same greedy text as
float32), and answering Chinese in Chinese. Needs the 1.1 GB model and ~14 GB of memory: run with
`python -m pytest tests/test_qwen.py --bigmodel` after `picochat pull`."""
import re

import pytest
import torch

from picochat import hub
from picochat.engine.engine import Engine
from picochat.engine.sampling import SamplingParams
from picochat.load import load

pytestmark = pytest.mark.bigmodel

PROMPTS = [  # the parity prompts: English, Chinese, code
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "用一句话解释什么是自注意力机制。"}],
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
]


@pytest.fixture(scope="module")
def path():
    try:
        return hub.find_packaged("qwen2.5-coder-1.5b")
    except hub.ModelNotFound as e:
        pytest.fail(f"{e} (the --bigmodel checks need it)")


@pytest.fixture(scope="module")
def float32(path):
    return load(str(path), dtype="float32", quantized=False, fuse=False)


def greedy(loaded, messages, n=24) -> str:
    engine = Engine(loaded.model, loaded.tokenizer)
    return "".join(engine.generate(engine.chat_prompt(messages), SamplingParams(max_new_tokens=n, temperature=0)))


def test_config_is_qwen2_1_5b(float32):
    c = float32.model.config
    assert (c.architecture, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == ("qwen2", 28, 1536, 12, 2, 128)
    assert (c.max_seq_len, c.vocab_size, c.qkv_bias, c.tie_word_embeddings) == (32768, 151936, True, False)
    assert float32.tensor_types == {"Q4_K": 169, "F32": 141, "Q6_K": 29}


def test_float32_logits_match_transformers(path, float32):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for messages in PROMPTS:
        ids = torch.tensor([float32.tokenizer.encode_chat(messages, add_generation_prompt=True)])
        with torch.no_grad():
            ours, _ = float32.model(ids)
            theirs = hf(ids).logits
        # ≤ 1e-4 of the logits' range: the same float32 weights, summed in another order
        assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()
        assert torch.equal(ours[0, -1].argmax(), theirs[0, -1].argmax())


def test_packed_path_writes_float32s_greedy_text(path, float32):
    """With ~15-bit activations everywhere (--prompt-bits 15) the packed path writes float32's text. By default
    its prompts use 8-bit activations (measured to barely move its predictions): llama.cpp's precision."""
    packed = load(str(path), prompt_bits=15)
    assert packed.weights == "quantized"
    for messages in PROMPTS:
        assert greedy(packed, messages) == greedy(float32, messages)
    default = load(str(path))
    assert default.model.lm_head.prompt_act_bits == 8
    ids = torch.tensor([default.tokenizer.encode_chat(PROMPTS[2] + [{"role": "assistant", "content": "def f(n):"}])])
    with torch.inference_mode():
        fast = torch.log_softmax(default.model(ids)[0][0].float(), -1)
        exact = torch.log_softmax(float32.model(ids)[0][0].float(), -1)
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9
    assert (exact.exp() * (exact - fast)).sum(-1).mean() < 0.02


def test_a_chinese_question_is_answered_in_chinese(path):
    loaded = load(str(path))
    reply = greedy(loaded, [{"role": "user", "content": "中国的首都是哪个城市？请用中文回答。"}], n=30)
    han = len(re.findall(r"[\u4e00-\u9fff]", reply))
    assert "北京" in reply and han >= 0.5 * len(reply.replace(" ", "")), reply


def test_speculative_decoding_writes_what_plain_decoding_writes(path):
    """Greedy with drafts from the paired 0.5B (forced every round) and from n-grams equals plain greedy, token
    for token, on answers that copy their prompt and answers that do not."""
    quantized = load(str(path))
    assert quantized.draft is not None, "pull qwen2.5-coder-0.5b too: it is the 1.5B's paired draft"
    engines = {"plain": Engine(quantized.model, quantized.tokenizer, speculate=False),
               "model": Engine(quantized.model, quantized.tokenizer, draft=quantized.draft, draft_tokens=4),
               "default": Engine(quantized.model, quantized.tokenizer, draft=quantized.draft)}
    code = "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n"
    prompts = PROMPTS + [[{"role": "user", "content": f"Add type hints to this code and return all of it:\n{code}"}]]
    params = SamplingParams(max_new_tokens=48, temperature=0)
    for messages in prompts:
        ids = engines["plain"].chat_prompt(messages)
        out = {name: e.complete(ids, params) for name, e in engines.items()}
        assert out["model"].token_ids == out["plain"].token_ids == out["default"].token_ids, messages
        assert out["model"].stats.drafted.get("model", 0) > 0
