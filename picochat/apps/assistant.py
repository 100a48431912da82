"""Answers grounded in a knowledge base: retrieval, the prompt that carries the passages, citations, and
the honest "I don't know" — shared by `picochat chat --kb`, `picochat ask`, the server's `--kb` and the
benchmarks, so each of them answers the same way.

One turn:
  1. retrieve: the knowledge base's hybrid search (kb.py) for the user's message; a passage counts as
     relevant when its sentence closest to the question is close in meaning (cosine similarity at least
     STRONG_SIMILARITY), or fairly close (at least `min_similarity`) and the passage shares a word with
     the question (it is in the keyword ranking) — "Do you sell kayaks?" is fairly close to a page of
     product prices, but no passage says "kayak". A Chinese question (mostly Han characters) is judged
     by its words alone: all-MiniLM-L6-v2 reads most Han characters as [UNK], so that a Chinese question
     is as close to an unrelated Chinese passage (cosine ~0.6) as to the one that answers it; a passage
     is relevant when it holds at least MIN_OVERLAP of the question's words, weighted by rarity;
  2. nothing relevant -> decline: the knowledge base's hand-off text (by default in the question's
     language), and no generation at all (a small model told "say you don't know" still invents; not
     asking it is the reliable way);
  3. otherwise the user's message is sent with the passages numbered [1], [2], ... (only those close to
     the best one: a small model mixes up near neighbours it is given) under the knowledge base's
     persona (system prompt), and the reply is followed by the sources it cites (all of them when it
     cites none), each as file § section, and by the evidence: the one sentence of the sources closest
     to the question (in meaning; for a Chinese question, in words), verbatim — what the customer can
     trust even when a small model's own sentence goes wrong (benchmarks/apps.py measures both).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .documents import mostly_chinese, sentences
from .terms import query_terms

MIN_SIMILARITY = 0.35     # all-MiniLM-L6-v2 cosine of the question and a passage's closest sentence: below
STRONG_SIMILARITY = 0.45  # it, not relevant; from STRONG on, relevant; between, only with a word of the
                          # question in the passage (chosen on the shop benchmark's training paraphrases
                          # and its calibration questions: benchmarks/apps.py)
MIN_OVERLAP = 0.20        # a Chinese question: the share of its words (by rarity) a passage must hold
                          # (chosen on the Chinese handbook's calibration questions: benchmarks/shop_zh.py)
TOP_K = 3               # passages per question, at most
NEAR_BEST = 0.10        # ... and only those within this similarity of the best one
DEFAULT_PERSONA = ("You are a helpful customer-service assistant. Answer the customer's question using only "
                   "the numbered sources you are given, briefly, in the language of the question, and cite "
                   "them like [1].")
DEFAULT_HANDOFF = ("I'm sorry, I don't know the answer to that from our documents. Would you like me to pass "
                   "your question to a member of our team?")
DEFAULT_HANDOFF_ZH = "抱歉，我们的资料里没有这个问题的答案。需要我把您的问题转给我们的工作人员吗？"
SOURCE_CHARS = 700      # of each passage in the prompt (passages are ~800 characters; keeps 3 within 1K tokens)
_CITATION = re.compile(r"\[(\d{1,2})\]")


@dataclass
class Source:
    """One passage given to the model, under the number it is cited by."""
    number: int
    source: str         # the document's path
    section: str        # its heading path ("Delivery › Returns"), or "" for none
    text: str
    similarity: float   # cosine similarity to the question

    @property
    def label(self) -> str:
        name = Path(self.source).name
        return f"{name} § {self.section}" if self.section else name

    def as_dict(self, root: str | None = None) -> dict:
        """The source as the API shows it: its path relative to `root` (the knowledge base's folder), or its
        file name without one — never the server's own absolute path."""
        return {"index": self.number, "source": relative_source(self.source, root), "section": self.section,
                "label": self.label, "similarity": round(self.similarity, 4), "text": self.text}


def relative_source(source: str, root: str | None) -> str:
    """`source` relative to the folder `root` when it is under it, else its file name."""
    path = Path(source)
    if root is not None and path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    return path.name


@dataclass
class Grounding:
    """What retrieval decided for one user message."""
    query: str
    sources: list[Source] = field(default_factory=list)
    declined: bool = False
    decline_text: str = ""
    prompt: str = ""            # the user message to send: the question with its numbered sources
    persona: str = DEFAULT_PERSONA
    kb: str = ""                # the knowledge base's name, where it has one
    root: str | None = None     # its documents' folder: the API shows sources relative to it (as_dict)
    quote: str | None = None    # the evidence: the sources' sentence closest to the question, verbatim
    quote_source: int | None = None   # ... and the number of the source it is from

    def as_dict(self) -> dict:  # the API's `retrieval` field (OpenAI clients ignore it)
        return {"query": self.query, "declined": self.declined,
                "sources": [s.as_dict(self.root) for s in self.sources],
                "quote": self.quote, "quote_source": self.quote_source}


def closeness(hit) -> float:
    """A hit's cosine to the question: its closest sentence's where the search measured it, else the
    passage's (a passage of several facts is as close as the one that answers)."""
    return hit.similarity if hit.sentence_similarity is None else hit.sentence_similarity


def relevant(hit, min_similarity: float = MIN_SIMILARITY, strong: float = STRONG_SIMILARITY,
             chinese: bool = False) -> bool:
    """Whether a search hit is evidence for the question: close in meaning, or fairly close and sharing
    one of its words (bm25_rank is None for a passage the keyword search did not find); for a Chinese
    question, holding enough of its words."""
    if chinese:
        return hit.overlap >= MIN_OVERLAP
    return closeness(hit) >= strong or (closeness(hit) >= min_similarity and hit.bm25_rank is not None)


def retrieve(kb, query: str, k: int = TOP_K, min_similarity: float = MIN_SIMILARITY,
             near_best: float = NEAR_BEST) -> list[Source]:
    """The passages for `query`: hybrid search's top k, keeping the relevant ones that are close to the
    best (within near_best of its closeness; for a Chinese question, whose cosines say little, all
    relevant ones), numbered from 1 in the search's order."""
    chinese = mostly_chinese(query)
    strong = max(min_similarity, STRONG_SIMILARITY)
    hits = [h for h in kb.search(query, k=k) if relevant(h, min_similarity, strong, chinese)]
    if not chinese:
        best = max((closeness(h) for h in hits), default=0.0)
        hits = [h for h in hits if closeness(h) >= best - near_best]
    return [Source(i + 1, h.source, h.section, h.text, h.similarity) for i, h in enumerate(hits)]


def sources_prompt(question: str, sources: list[Source]) -> str:
    """The user message the model sees: the numbered passages, then the question and what to do (a
    135M-parameter model answers best with the material right before a one-sentence instruction: of six
    layouts compared on the shop benchmark, this one was first on its held-out questions and on its 126
    training paraphrases, 45% against 37-44%)."""
    blocks = "\n".join(f"[{s.number}] {_clip(s.text, SOURCE_CHARS)}" for s in sources)
    if mostly_chinese(question):   # the same layout in Chinese: an English instruction draws English replies
        return f"资料：\n{blocks}\n\n问题：{question}\n请根据资料，用中文一句话回答。"
    return f"Information:\n{blocks}\n\nQuestion: {question}\nAnswer in one sentence using the information."


def ground(kb, question: str, k: int = TOP_K, min_similarity: float = MIN_SIMILARITY) -> Grounding:
    """Retrieve for one user message and decide: a prompt with sources (and the evidence sentence), or
    a decline with the hand-off."""
    persona = kb.setting("persona", DEFAULT_PERSONA) or DEFAULT_PERSONA
    sources = retrieve(kb, question, k, min_similarity)
    if not sources:
        return Grounding(question, declined=True, persona=persona, decline_text=handoff(kb, question))
    quote, source = best_span(kb, question, "", sources)
    return Grounding(question, sources, prompt=sources_prompt(question, sources), persona=persona, quote=quote,
                     quote_source=source.number if source else None)


def handoff(kb, question: str) -> str:
    """What a decline says: the knowledge base's own hand-off, else the default one in the question's
    language (Chinese for a question of mostly Han characters, English otherwise)."""
    return kb.setting("handoff") or (DEFAULT_HANDOFF_ZH if mostly_chinese(question) else DEFAULT_HANDOFF)


def grounded_messages(messages: list[dict], grounding: Grounding) -> list[dict]:
    """The conversation to send: the persona as system prompt (a client's own system prompt comes after
    it), earlier turns as they were, the last user message replaced by its prompt with sources."""
    system = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    rest = [m for m in messages if m["role"] != "system"]
    persona = "\n\n".join([grounding.persona] + system)
    return [{"role": "system", "content": persona}] + rest[:-1] + [{"role": "user", "content": grounding.prompt}]


def cited_numbers(reply: str, sources: list[Source]) -> list[int]:
    """The source numbers the reply cites ([2], [1]...), in order of first mention, valid ones only."""
    valid = {s.number for s in sources}
    seen = []
    for m in _CITATION.finditer(reply):
        n = int(m.group(1))
        if n in valid and n not in seen:
            seen.append(n)
    return seen


def sources_footer(reply: str, sources: list[Source], quote: str | None = None,
                   quote_source: int | None = None) -> str:
    """The lines appended to a reply: the sources it cites (all that it was given if it cites none), and
    the evidence sentence quoted with its source number."""
    if not sources:
        return ""
    numbers = cited_numbers(reply, sources) or [s.number for s in sources]
    by_number = {s.number: s for s in sources}
    footer = "\n\nSources: " + "; ".join(f"[{n}] {by_number[n].label}" for n in numbers)
    if quote:
        footer += f"\n> \u201c{quote}\u201d [{quote_source}]"
    return footer


def footer_of(reply: str, grounding: Grounding) -> str:
    """sources_footer for a grounded reply."""
    return sources_footer(reply, grounding.sources, grounding.quote, grounding.quote_source)


def question_of(messages: list[dict]) -> str:
    """The retrieval query of a conversation: its last user message."""
    users = [m["content"] for m in messages if m["role"] == "user" and m.get("content")]
    if not users:
        raise ValueError("the conversation has no user message to answer")
    return users[-1]


def _clip(text: str, chars: int) -> str:
    """`text` on one line, cut to about `chars` characters at a sentence end or space in its second half
    (Chinese has no spaces: cutting at the last one could keep a few characters of a long passage)."""
    text = " ".join(text.split())
    if len(text) <= chars:
        return text
    head = text[:chars]
    ends = [m.end() for m in re.finditer(r"[.!?。！？；]\s*|\s", head) if m.end() > chars // 2]
    return head[:ends[-1]].rstrip() + " …" if ends else head + "…"


# ----------------------------------------------------------------------------- question answering
@dataclass
class Answer:
    """`picochat ask`'s result: the reply, the sources it was given, and the evidence (the exact span)."""
    question: str
    text: str
    grounding: Grounding

    @property
    def sources(self) -> list[Source]:
        return self.grounding.sources

    @property
    def quote(self) -> str | None:
        return self.grounding.quote

    @property
    def quote_source(self) -> Source | None:
        return next((s for s in self.sources if s.number == self.grounding.quote_source), None)


def answer(model, kb, question: str, params, k: int = TOP_K, min_similarity: float = MIN_SIMILARITY,
           generate: bool = True) -> Answer:
    """Answer `question` from the knowledge base through `model.generate` (the engine or a server), with
    the evidence sentence; generate=False gives only the evidence (an extractive answer, no model call)."""
    grounding = ground(kb, question, k, min_similarity)
    if grounding.declined or not generate:
        return Answer(question, grounding.decline_text if grounding.declined else "", grounding)
    messages = grounded_messages([{"role": "user", "content": question}], grounding)
    return Answer(question, model.generate([messages], params)[0][0].strip(), grounding)


def best_span(kb, question: str, reply: str, sources: list[Source]) -> tuple[str | None, Source | None]:
    """The extractive answer: of all sentences in the sources, the one whose embedding is closest to the
    question (and the model's reply, if given) — an exact span of a document, never generated text. On
    the shop benchmark the question alone picks the right sentence more often than with the reply. For
    a Chinese question, the sentence holding most of its words (bigrams weigh two, characters one), the
    cosine only breaking ties: all-MiniLM-L6-v2's cosine picks almost at random among Chinese sentences."""
    spans = [(s, sentence) for s in sources for sentence in sentences(s.text)]
    if not spans:
        return None, None
    vectors = kb.embed([(question + " " + reply).strip()] + [sentence for _, sentence in spans])
    scores = vectors[1:] @ vectors[0]
    if mostly_chinese(question):
        terms = query_terms(question)
        scores = scores + 2 * np.array([sum(len(t) for t in terms if t in sentence.lower()) for _, sentence in spans])
    source, sentence = spans[int(scores.argmax())]
    return sentence, source
