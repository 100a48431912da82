"""Bits per byte on held-out text: the measure `picochat quantize` reports."""
import math

import torch
import torch.nn.functional as F

from picochat.config import ModelConfig
from picochat.evaluation import bits_per_byte, held_out_text
from picochat.model import GPT
from picochat.tokenizer import Tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 20


def test_bits_per_byte_is_the_loss_per_utf8_byte():
    tok = Tokenizer.train([TEXT], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                            intermediate_size=64, max_seq_len=64)).eval()
    ids = tok.encode(TEXT)
    got = bits_per_byte(model, tok, TEXT, window=40)
    nll, n, nbytes = 0.0, 0, 0
    lengths = tok.token_byte_lengths()
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 40):  # windows of 40 tokens, each predicted from its own window
            chunk = torch.tensor([ids[start:start + 41]])
            logits, _ = model(chunk[:, :-1])
            nll += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            n += chunk.shape[1] - 1
            nbytes += int(lengths[chunk[0, 1:]].sum())
    assert got.tokens == n == len(ids) - 1 and got.bytes == nbytes
    assert math.isclose(got.bits_per_byte, nll / (math.log(2) * nbytes), rel_tol=1e-6)
    assert 0 < got.bits_per_byte < 20


def test_held_out_text_takes_a_file_whole_and_caps_its_length(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(TEXT)
    assert held_out_text(str(path), chars=50) == TEXT[:50]
