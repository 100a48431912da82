"""The four uses from the command line: `picochat kb`, `chat --kb`, `ask`, `summarize` and `code`, end to
end on a tiny random model (and the real embedding model, when `picochat pull` has fetched it)."""

import pytest

from helpers import run_cli, save_tiny_folder
from picochat import hub

TEXT = ("Returns are accepted within 30 days of purchase. Parking is behind the shop on Mill Lane. "
        "Sources: Information: Question: Answer in one sentence using the information. ") * 20
POLICIES = """# Shop policies

## Returns

Returns are accepted within 30 days of purchase. Items must be unused and come with the receipt.

## Parking

Our free car park is behind the shop on Mill Lane.
"""
FAQ_HTML = """<html><head><title>FAQ</title><style>p {color: red}</style></head><body>
<h1>Frequently asked questions</h1><h2>Gift cards</h2><p>Gift cards are valid for two years.</p>
<h2>Dogs</h2><p>Dogs on a lead are welcome in the shop.</p></body></html>"""


def encoder_pulled() -> bool:
    try:
        hub.find_embedding()
        return True
    except FileNotFoundError:
        return False


needs_encoder = pytest.mark.skipif(not encoder_pulled(), reason="the embedding model is not pulled "
                                                                "(picochat pull minilm)")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("tiny"), TEXT, max_seq_len=512)


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "policies.md").write_text(POLICIES)
    (folder / "faq.html").write_text(FAQ_HTML)
    return folder


@needs_encoder
def test_kb_add_search_ls_rm(docs, tmp_path, capsys):
    kb = tmp_path / "shop.sqlite"
    code, out, _ = run_cli(["kb", "add", docs, "--kb", kb, "--handoff", "Ask Sam at the till."], capsys)
    assert code == 0 and "2 added, 0 updated, 0 unchanged" in out
    code, out, _ = run_cli(["kb", "add", docs, "--kb", kb], capsys)
    assert code == 0 and "0 added, 0 updated, 2 unchanged" in out
    code, out, _ = run_cli(["kb", "search", "where do I leave my car?", "--kb", kb, "-k", "2"], capsys)
    first = out.splitlines()[0]
    assert code == 0 and first.startswith("1. score") and "policies.md § Shop policies › Parking" in first
    assert "similarity" in first and "Mill Lane" in out.splitlines()[1]
    code, out, _ = run_cli(["kb", "ls", "--kb", kb], capsys)
    assert "2 document(s)" in out and "faq.html" in out and "policies.md" in out
    code, out, _ = run_cli(["kb", "rm", docs / "policies.md", "--kb", kb], capsys)
    assert code == 0 and "1 document(s) removed" in out
    code, out, err = run_cli(["kb", "rm", docs / "policies.md", "--kb", kb], capsys)
    assert code == 1 and "is not in" in err
    assert "1 document(s)" in run_cli(["kb", "ls", "--kb", kb], capsys)[1]


def test_kb_commands_explain_a_missing_knowledge_base(tmp_path, capsys):
    code, _, err = run_cli(["kb", "search", "x", "--kb", tmp_path / "none.sqlite"], capsys)
    assert code == 1 and "no knowledge base" in err and "picochat kb add" in err and "Traceback" not in err
    code, _, err = run_cli(["kb", "add", tmp_path, "--kb", "bad name!"], capsys)
    assert code == 1 and "picochat: error:" in err


@needs_encoder
def test_chat_with_a_knowledge_base_cites_its_sources_and_declines(tiny_dir, docs, tmp_path, capsys, monkeypatch):
    kb = tmp_path / "shop.sqlite"
    run_cli(["kb", "add", docs, "--kb", kb, "--handoff", "Ask Sam at the till."], capsys)
    script = "How many days do I have to return something?\nWho won the world cup in 1966?\n/exit\n"
    code, out, err = run_cli(["chat", "-m", tiny_dir, "--kb", kb, "-v", "--max-new-tokens", "4", "--temperature", "0"],
                         capsys, stdin=script, monkeypatch=monkeypatch)
    assert code == 0
    assert "Sources: [1] policies.md § Shop policies › Returns" in out
    assert "\u201cReturns are accepted within 30 days of purchase.\u201d [1]" in out   # the evidence, verbatim
    assert "Ask Sam at the till." in out                                              # the hand-off
    assert "[retrieval: 1 relevant passage(s)" in err and "-> declining" in err


@needs_encoder
def test_ask_quote_answers_with_the_texts_own_sentence(docs, capsys):
    code, out, _ = run_cli(["ask", "How long can I bring things back?", "--file", docs / "policies.md", "--quote"], capsys)
    assert code == 0
    assert out.splitlines()[0] == "\u201cReturns are accepted within 30 days of purchase.\u201d"
    assert "policies.md § Shop policies › Returns" in out
    code, out, _ = run_cli(["ask", "What is the boiling point of mercury?", "--file", docs / "policies.md", "--quote"],
                       capsys)
    assert code == 0 and "I don't know" in out


@needs_encoder
def test_ask_generates_an_answer_with_its_sources(tiny_dir, docs, capsys):
    code, out, _ = run_cli(["ask", "Are dogs allowed?", "--file", docs / "faq.html", "-m", tiny_dir,
                        "--max-new-tokens", "6"], capsys)
    assert code == 0 and "Sources: [1] faq.html § Frequently asked questions › Dogs" in out


def test_summarize_a_text_longer_than_the_context(tiny_dir, tmp_path, capsys):
    path = tmp_path / "long.txt"
    path.write_text("\n\n".join(f"Paragraph {i}. " + "Returns are accepted within 30 days of purchase. " * 8
                                for i in range(30)))
    code, out, err = run_cli(["summarize", path, "-m", tiny_dir, "--words", "8", "-v"], capsys)
    assert code == 0 and out.strip()
    pieces = int(err.split("[")[-1].split(" pieces")[0])
    assert pieces > 1 and "round(s)" in err
    code, _, err = run_cli(["summarize", tmp_path / "missing.txt", "-m", tiny_dir], capsys)
    assert code == 1 and "missing.txt" in err


def test_code_runs_the_tests_and_retries(tiny_dir, tmp_path, capsys):
    tests = tmp_path / "test_add.py"
    tests.write_text("assert add(2, 3) == 5\n")
    code, out, err = run_cli(["code", "a function add(a, b) returning the sum", "-m", tiny_dir, "--test", tests,
                          "--retries", "1", "--max-new-tokens", "8"], capsys)
    assert code == 2   # a random model's code fails, and the command says so
    assert "[attempt 1: tests failed]" in err and "[attempt 2: tests failed]" in err
    assert "after 2 attempt(s)" in err
    code, _, err = run_cli(["code", "x", "-m", tiny_dir, "--test", tests, "--lang", "javascript"], capsys)
    assert code == 1 and "python" in err.lower()


def test_pull_names_the_models_it_knows(capsys):
    code, _, err = run_cli(["pull", "gpt-5"], capsys)
    assert code == 1 and "unknown model 'gpt-5'" in err and "smollm2" in err and "minilm" in err


@needs_encoder
def test_serve_with_a_real_knowledge_base_and_embeddings(docs, tmp_path, capsys):
    """The server's path with the real store and encoder: retrieval on its engine thread, citations, and
    /v1/embeddings equal to the encoder's own vectors."""
    import numpy as np
    import openai

    from helpers import LiveServer, tiny_engine
    from picochat.load import load_encoder
    from picochat.apps.kb import KnowledgeBase
    from picochat.serve.app import Knowledge
    kb = tmp_path / "shop.sqlite"
    run_cli(["kb", "add", docs, "--kb", kb], capsys)
    knowledge = Knowledge([str(kb)], open_kb=lambda name, encoder: KnowledgeBase(name, encoder=encoder),
                          load_encoder=load_encoder)
    engine = tiny_engine(TEXT, max_seq_len=1024)
    with LiveServer(lambda: engine, "tiny", knowledge=knowledge) as server:
        server.wait_loaded()
        body = server.chat([{"role": "user", "content": "Where is the car park?"}], max_tokens=4)
        sources = body["retrieval"]["sources"]
        assert sources[0]["label"] == "policies.md § Shop policies › Parking"
        assert body["retrieval"]["quote"] == "Our free car park is behind the shop on Mill Lane."
        assert body["choices"][0]["message"]["content"].endswith(
            "\u201cOur free car park is behind the shop on Mill Lane.\u201d [1]")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        texts = ["Where is the car park?", "Gift cards last two years."]
        got = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
        vectors = np.array([d.embedding for d in got.data])
        assert vectors.shape == (2, 384) and np.allclose(vectors, load_encoder().encode(texts), atol=1e-5)
