"""The terms a passage is found by in the word index, and a question searched by: English words (function
words left out), and Chinese as overlapping character pairs plus single characters — Chinese has no spaces,
and SQLite FTS5's tokenizer would take a whole run of Han characters as one word (kb.py measured the
choice: pairs + characters found the right passage in the top 3 for every held-out question of the
Chinese shop, FTS5's trigram tokenizer for 27 %, since most Chinese words are two characters).
"""
from __future__ import annotations

import re

# English function words: left out of the word search (FTS5 has no stop list). In a small knowledge base
# a question's "until" or "how" matching one passage would otherwise outweigh the meaning of the question.
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves
""".split())


# Chinese function characters and question words: left out of a question's terms like the English ones, so
# that 什么 or 你们 neither count as a shared word nor dilute the share of the question a passage holds
STOP_HAN = frozenset("的了吗呢吧啊呀嘛么我你您他她它们是这那哪谁什怎几")
STOP_HAN_WORDS = frozenset("多少 多久 多长 可以 请问 一下 没有 有没 如何 是否 能否 时候".split())
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def _pieces(text: str) -> list[tuple[str, bool]]:
    """(piece, is_cjk) for the words of a text, lowercased, a word with Chinese in it cut into its Chinese runs
    and the rest ("密码是wutong2024" → 密码是, wutong2024)."""
    out = []
    for word in re.findall(r"\w+", text.lower()):
        at = 0
        for m in _CJK_RUN.finditer(word):
            out += [(word[at:m.start()], False)] * (m.start() > at) + [(m.group(), True)]
            at = m.end()
        out += [(word[at:], False)] * (at < len(word))
    return out


def cjk_terms(run: str) -> list[str]:
    """A run of Chinese characters as its overlapping bigrams, then its characters: 退货政策 → 退货 货政 政策
    退 货 政 策 (most Chinese words are two characters; the single ones match what no bigram does)."""
    return [run[i:i + 2] for i in range(len(run) - 1)] + list(run)


def index_grams(section: str, text: str) -> str:
    """The `grams` column of a passage: the terms of every word with Chinese in it (its heading's too), space-
    separated for the word index; '' for a passage without Chinese, whose search is then as before."""
    terms = []
    for word in re.findall(r"\w+", f"{section}\n{text}"):
        if _CJK_RUN.search(word):
            terms += [t for piece, cjk in _pieces(word) for t in (cjk_terms(piece) if cjk else [piece])]
    return " ".join(terms)


def query_terms(query: str) -> list[str]:
    """The terms a query is searched by: its words but function words, and its Chinese as bigrams and
    characters but those with a function character (all of them if only function words are left)."""
    terms = []
    for piece, cjk in _pieces(query):
        terms += cjk_terms(piece) if cjk else [piece]
    terms = list(dict.fromkeys(terms))
    kept = [t for t in terms if t not in STOPWORDS and t not in STOP_HAN_WORDS and not STOP_HAN.intersection(t)]
    return kept or terms


def quoted(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


def match_query(query: str) -> str | None:
    """An FTS5 MATCH expression for any user text: its terms (query_terms), each quoted, OR-ed; None if it
    has no words at all.

    Quoting makes every word a plain term, so punctuation, `*`, `AND`/`OR`/`NOT` and unbalanced quotes or
    parentheses in the user's text can never be read as FTS syntax."""
    return match_terms(query_terms(query)) or None


def match_terms(terms: list[str]) -> str:
    """Terms, each quoted, OR-ed: an FTS5 MATCH expression."""
    return " OR ".join(quoted(t) for t in terms)
