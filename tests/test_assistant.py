"""Grounded answers (assistant.py) and the server's knowledge-base and embeddings endpoints: citations,
the decline path, the retrieval field, streaming, and /v1/embeddings through the official openai client."""
import base64
import json
import httpx
import numpy as np
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from helpers import FakeEncoder, FakeHit, FakeKB, LiveServer, tiny_engine
from picochat.apps import assistant
from picochat.serve.app import Knowledge

TEXT = "Returns are accepted within 30 days. Parking is behind the shop. " * 20


# ----------------------------------------------------------------------------- assistant.py
def test_citations_name_the_cited_sources_or_all_given():
    sources = [assistant.Source(1, "/d/policies.md", "Returns", "r", 0.7),
               assistant.Source(2, "/d/faq.md", "", "p", 0.5)]
    assert sources[0].label == "policies.md § Returns" and sources[1].label == "faq.md"
    assert assistant.cited_numbers("See [2], and [1] and [2] again; [7] is not a source.", sources) == [2, 1]
    assert assistant.sources_footer("As [2] says.", sources) == "\n\nSources: [2] faq.md"
    assert assistant.sources_footer("No citation here.", sources) == \
        "\n\nSources: [1] policies.md § Returns; [2] faq.md"
    assert assistant.sources_footer("anything", []) == ""


def test_ground_keeps_relevant_passages_and_declines_without_any():
    kb = FakeKB()
    g = assistant.ground(kb, "How do returns work?")
    assert not g.declined and [s.section for s in g.sources] == ["Returns", "Refunds"]   # 0.12 < threshold
    assert g.quote in ("Returns are accepted within 30 days.", "Refunds take 5 days.")
    assert g.prompt.startswith("Information:\n[1] Returns are accepted within 30 days.\n[2] Refunds take 5 days.")
    assert "Question: How do returns work?" in g.prompt
    declined = assistant.ground(kb, "What is the capital of France?")
    assert declined.declined and not declined.sources and declined.decline_text == kb.settings["handoff"]
    # no hand-off configured: the default one
    assert assistant.ground(type("KB", (FakeKB,), {"setting": lambda self, k, d=None: d})(), "hi").decline_text \
        == assistant.DEFAULT_HANDOFF


def test_grounded_messages_put_the_persona_first_and_sources_in_the_last_turn():
    kb = FakeKB()
    kb.settings["persona"] = "You are Larkspur's assistant."
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
               {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "can I return boots?"}]
    g = assistant.ground(kb, assistant.question_of(history))
    messages = assistant.grounded_messages(history, g)
    assert messages[0] == {"role": "system", "content": "You are Larkspur's assistant.\n\nBe brief."}
    assert messages[1:3] == history[1:3]
    assert messages[3]["role"] == "user" and messages[3]["content"].startswith("Information:\n[1] ")
    assert "Question: can I return boots?" in messages[3]["content"]
    with pytest.raises(ValueError, match="no user message"):
        assistant.question_of([{"role": "system", "content": "x"}])


def test_relevance_needs_meaning_and_for_middling_similarity_a_shared_word():
    assert assistant.relevant(FakeHit("s", "", "t", 0.5, bm25_rank=None))           # close in meaning
    assert assistant.relevant(FakeHit("s", "", "t", 0.4, bm25_rank=4))              # fairly close, a word
    assert not assistant.relevant(FakeHit("s", "", "t", 0.4, bm25_rank=None))       # fairly close, no word
    assert not assistant.relevant(FakeHit("s", "", "t", 0.3, bm25_rank=1))          # far
    # the passage's sentence closest to the question counts where the search measured it
    assert assistant.relevant(FakeHit("s", "", "t", 0.3, bm25_rank=None, sentence_similarity=0.5))
    near = [FakeHit("a", "", "x", 0.6), FakeHit("b", "", "y", 0.55),
            FakeHit("c", "", "z", 0.4, sentence_similarity=0.45)]
    kb = type("KB", (FakeKB,), {"search": lambda self, q, k=5: near[:k]})()
    assert [s.source for s in assistant.retrieve(kb, "q")] == ["a", "b"]   # within 0.1 of the best only


def test_a_chinese_question_is_judged_by_its_words_not_the_cosine():
    """all-MiniLM-L6-v2 puts a Chinese question ~0.6 from any Chinese passage: only the word overlap tells."""
    unrelated = FakeHit("a", "", "x", 0.75, bm25_rank=3, overlap=0.1)
    answers = FakeHit("b", "", "y", 0.55, bm25_rank=1, overlap=0.6)
    assert not assistant.relevant(unrelated, chinese=True) and assistant.relevant(answers, chinese=True)
    assert assistant.relevant(unrelated)                                             # in English it would be
    assert not assistant.relevant(FakeHit("c", "", "z", 0.9, overlap=0.1), chinese=True)
    kb = type("KB", (FakeKB,), {"search": lambda self, q, k=5: [unrelated, answers][:k]})()
    assert [s.source for s in assistant.retrieve(kb, "你们的退货政策是什么？")] == ["b"]   # no near-best cut by cosine
    assert [s.source for s in assistant.retrieve(kb, "What is your returns policy?")] == ["a"]


def test_declines_and_prompts_come_in_the_questions_language():
    kb = type("KB", (FakeKB,), {"setting": lambda self, k, d=None: d})()          # no hand-off of its own
    assert assistant.ground(kb, "明天会下雨吗？").decline_text == assistant.DEFAULT_HANDOFF_ZH
    assert assistant.ground(kb, "Will it rain tomorrow?").decline_text == assistant.DEFAULT_HANDOFF
    assert assistant.ground(FakeKB(), "明天会下雨吗？").decline_text == FakeKB().settings["handoff"]  # its own wins
    assert "language of the question" in assistant.DEFAULT_PERSONA
    sources = [assistant.Source(1, "/d/退换货.md", "退货", "购书15天内凭小票可以退货。", 0.6)]
    assert assistant.sources_prompt("可以退货吗？", sources) == \
        "资料：\n[1] 购书15天内凭小票可以退货。\n\n问题：可以退货吗？\n请根据资料，用中文一句话回答。"
    assert assistant.sources_prompt("Can I return it?", sources).startswith("Information:\n[1] ")


def test_clip_keeps_most_of_a_chinese_passage():
    text = "请拨打0571-8865 2210。" + "购书十五天内凭小票可以退货，特价书不退不换。" * 40
    clipped = assistant._clip(text, 700)
    assert len(clipped) > 350 and clipped.endswith("。 …") and text.startswith(clipped[:-2])
    assert assistant._clip("short text", 700) == "short text"
    assert assistant._clip("word " * 200, 50) == ("word " * 10).strip() + " …"


def test_best_span_is_a_verbatim_sentence_of_a_source():
    sources = [assistant.Source(1, "/d/p.md", "Returns", "Returns are accepted within 30 days. Bring the receipt!", 0.7)]
    quote, source = assistant.best_span(FakeKB(), "return window?", "30 days", sources)
    assert quote in ("Returns are accepted within 30 days.", "Bring the receipt!") and source is sources[0]
    assert quote in sources[0].text


def test_the_chinese_evidence_is_the_sentence_holding_the_questions_words():
    text = "会员卡的年费是68元。会员购买新书一律享受9折优惠！每消费1元积1分；礼品卡自购买之日起3年内有效。"
    sources = [assistant.Source(1, "/d/会员.html", "会员", text, 0.6)]
    for question, expected in [("会员买新书打几折？", "会员购买新书一律享受9折优惠！"),
                               ("礼品卡的有效期是多久？", "礼品卡自购买之日起3年内有效。"),
                               ("办会员卡一年多少钱？", "会员卡的年费是68元。")]:
        assert assistant.best_span(FakeKB(), question, "", sources) == (expected, sources[0])


# ----------------------------------------------------------------------------- over a real knowledge base
HANDBOOK = {   # a bike shop's help pages: the contact passage says "Telephone number" and "call us", not "phone"
    "Opening hours": "Pennine Cycles is open Monday to Friday from 9 am to 6 pm. On Saturdays we are open from\n"
                     "10 am to 4 pm. We are closed on Sundays and bank holidays.",
    "Contact us": "Telephone number: call us on 0161 496 0734 during opening hours. Email: "
                  "hello@pennine.example, answered within a day.",
    "Finding us": "The shop is at 12 Canal Street, Manchester, five minutes' walk from Piccadilly station.",
    "Repairs": "Book a repair online or in the shop. A standard service costs 45 pounds and takes two days; "
               "we text your phone when the bike is ready.",
    "Orders": "Have your order number ready when you contact us about an order. Orders ship within two "
              "working days.",
    "Returns": "Unused items can be returned within 30 days with the receipt. Bikes must be returned with "
               "their frame number intact.",
    "Bike hire": "We hire out city bikes for 20 pounds a day. Bring photo ID and a mobile phone.",
    "Cycle to work": "We take part in the Cycle to Work scheme; ask your employer for a certificate number.",
}


@pytest.fixture(scope="module")
def handbook(tmp_path_factory):
    from picochat import hub
    from picochat.apps.kb import KnowledgeBase
    from picochat.load import load_encoder
    try:
        encoder = load_encoder()
    except hub.ModelNotFound:
        pytest.skip("all-MiniLM-L6-v2 not pulled (run `picochat pull minilm`): ranking needs the real model")
    folder = tmp_path_factory.mktemp("handbook")
    (folder / "help.md").write_text("# Pennine Cycles\n\n" + "".join(f"## {h}\n\n{t}\n\n" for h, t in HANDBOOK.items()))
    with KnowledgeBase(folder / "kb.sqlite", encoder) as kb:
        kb.add([folder / "help.md"])
        yield kb


def rrf_order(hits):
    """The hits as reciprocal rank fusion (Σ 1/(60 + rank) over the two rankings, search's rule before) ordered them."""
    return sorted(hits, key=lambda h: -(1 / (60 + h.vector_rank) + (1 / (60 + h.bm25_rank) if h.bm25_rank else 0)))


def test_the_passage_that_answers_by_meaning_is_not_pushed_out_by_common_words(handbook):
    """"phone" is in two other passages, "shop" in two and "number" in four: reciprocal rank fusion put each
    passage sharing a word above the contact passage (2nd by meaning, sharing none): 4th, out of the top 3."""
    hits = handbook.search("Can I phone the shop?", k=len(HANDBOOK))
    contact = next(h for h in hits if h.section.endswith("Contact us"))
    assert contact.vector_rank == 2 and contact.bm25_rank is None and rrf_order(hits).index(contact) == 3
    assert contact in hits[:3]
    for question in ("Can I phone the shop?", "What is your phone number?"):
        assert any("0161 496 0734" in s.text for s in assistant.retrieve(handbook, question)), question
    hits = handbook.search("What is your phone number?", k=3)          # "number" is worth ~0: in half of them
    assert [h.overlap < 0.01 for h in hits if h.section.endswith("Contact us")] == [True]
    g = assistant.ground(handbook, "What number do I call?")
    assert g.quote == "Telephone number: call us on 0161 496 0734 during opening hours."


def test_the_evidence_is_a_whole_sentence_across_a_wrapped_line(handbook):
    g = assistant.ground(handbook, "When are you open on Saturdays?")
    assert g.quote == "On Saturdays we are open from 10 am to 4 pm."      # was "On Saturdays we are open from"
    assert [s.section for s in g.sources] == ["Pennine Cycles › Opening hours"]


# ----------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def live():
    engine = tiny_engine(TEXT, max_seq_len=1024)   # room for the sources in the prompt
    kb = FakeKB()
    knowledge = Knowledge(["shop", "other"], open_kb=lambda name, encoder: kb, load_encoder=FakeEncoder)
    with LiveServer(lambda: engine, "tiny", knowledge=knowledge) as server:
        server.wait_loaded()
        server.kb = kb
        yield server


def stream_events(live, body) -> list[dict]:
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={"model": "tiny", "stream": True, **body},
                      timeout=60) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_server_grounds_a_reply_cites_its_sources_and_reports_the_retrieval(live):
    body = live.chat([{"role": "user", "content": "Can I return a tent?"}], max_tokens=8, temperature=0)
    content = body["choices"][0]["message"]["content"]
    assert content.endswith("Sources: [1] policies.md § Returns; [2] policies.md § Refunds") or \
        "Sources: [" in content.split("\n\n")[-1]
    retrieval = body["retrieval"]
    assert retrieval["kb"] == "shop" and not retrieval["declined"]
    assert [s["index"] for s in retrieval["sources"]] == [1, 2]
    assert retrieval["sources"][0]["label"] == "policies.md § Returns"
    assert body["usage"]["prompt_tokens"] > 60   # the sources were in the prompt

    events = stream_events(live, {"messages": [{"role": "user", "content": "Can I return a tent?"}],
                                  "max_tokens": 8, "temperature": 0})
    assert events[0]["retrieval"]["sources"][1]["section"] == "Refunds"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    assert "\n\nSources: [" in text and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_server_declines_without_generating_when_nothing_is_relevant(live):
    before = live.state.completion_tokens
    body = live.chat([{"role": "user", "content": "Who won the world cup?"}], max_tokens=8)
    assert body["choices"][0]["message"]["content"] == live.kb.settings["handoff"]
    assert body["retrieval"]["declined"] is True and body["retrieval"]["sources"] == []
    assert body["usage"]["completion_tokens"] == 0
    events = stream_events(live, {"messages": [{"role": "user", "content": "Who won the world cup?"}],
                                  "stream_options": {"include_usage": True}})
    assert events[0]["retrieval"]["declined"] is True
    assert events[1]["choices"][0]["delta"]["content"] == live.kb.settings["handoff"]
    assert events[2]["choices"][0]["finish_reason"] == "stop" and events[3]["usage"]["total_tokens"] == 0
    assert live.state.completion_tokens == before   # the model was never asked


def test_grounded_and_declined_replies_are_openai_chat_objects_plus_retrieval(live):
    """A decline is written by the same builders as a reply: the client's types validate both, and the only
    fields they do not know are picochat's `retrieval` (and `timings` on a generated reply)."""
    for question, extra in [("Can I return a tent?", {"retrieval", "timings"}),
                            ("Who won the world cup?", {"retrieval"})]:
        messages = [{"role": "user", "content": question}]
        parsed = ChatCompletion.model_validate(live.chat(messages, max_tokens=4, temperature=0))
        assert set(parsed.model_extra) == extra and parsed.choices[0].message.role == "assistant"
        events = stream_events(live, {"messages": messages, "max_tokens": 4, "temperature": 0,
                                      "stream_options": {"include_usage": True}})
        chunks = [ChatCompletionChunk.model_validate(e) for e in events]
        assert [set(c.model_extra) for c in chunks] == [{"retrieval"}] + [set()] * (len(chunks) - 1)
        assert len({c.id for c in chunks}) == 1 and chunks[-1].choices == [] and chunks[-1].usage is not None


def test_a_request_can_turn_the_knowledge_base_off_or_pick_one(live):
    searched = len(live.kb.searched)
    body = live.chat([{"role": "user", "content": "Can I return a tent?"}], max_tokens=4, kb=False)
    assert "retrieval" not in body and len(live.kb.searched) == searched
    assert live.chat([{"role": "user", "content": "returns?"}], max_tokens=4, kb="other")["retrieval"]["kb"] == "other"
    r = live.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "kb": "nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "kb" and "shop, other" in r.json()["error"]["message"]
    r = live.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "system", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(live.url + "/v1/kb").json()["data"] == [{"id": "shop", "object": "knowledge_base"},
                                                             {"id": "other", "object": "knowledge_base"}]


def test_embeddings_through_the_official_openai_client(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused")
    texts = ["where can I park?", "returns within 30 days", "a third text"]
    response = client.embeddings.create(model="fake-embedder", input=texts)   # the client asks for base64
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert np.allclose(got, FakeEncoder().encode(texts), atol=1e-6)
    assert [d.index for d in response.data] == [0, 1, 2] and response.model == "fake-embedder"
    assert response.usage.prompt_tokens == 4 + 4 + 3 == response.usage.total_tokens
    floats = client.embeddings.create(model="fake-embedder", input="one text", encoding_format="float")
    assert len(floats.data) == 1 and np.allclose(floats.data[0].embedding, FakeEncoder().encode(["one text"])[0])
    raw = live.post("/v1/embeddings", {"model": "fake-embedder", "input": "x", "encoding_format": "base64"}).json()
    assert np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4").shape == (8,)


@pytest.mark.parametrize("body, status, param", [
    ({"model": "fake-embedder", "input": [1, 2, 3]}, 400, "input"),          # token ids: another tokenizer's
    ({"model": "fake-embedder", "input": []}, 400, "input"),
    ({"model": "fake-embedder", "input": ["ok", ""]}, 400, "input"),
    ({"model": "fake-embedder", "input": "x", "dimensions": 3}, 400, "dimensions"),
    ({"model": "fake-embedder", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "text-embedding-3-small", "input": "x"}, 404, "model"),
    ({"input": "x"}, 400, "model"),
])
def test_embeddings_refuse_bad_requests_by_name(live, body, status, param):
    r = live.post("/v1/embeddings", body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_a_server_without_knowledge_base_answers_plainly_and_refuses_kb_requests():
    engine = tiny_engine(TEXT)
    with LiveServer(lambda: engine, "tiny") as server:
        server.wait_loaded()
        assert "retrieval" not in server.chat([{"role": "user", "content": "hi"}], max_tokens=2)
        r = server.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                 "kb": "shop"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "kb"
        r = server.post("/v1/embeddings", {"model": "x", "input": "x"})
        assert r.status_code == 503 and "embedding model" in r.json()["error"]["message"]
