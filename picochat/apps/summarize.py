"""Summarize text longer than the model's context: split it, summarize the pieces, combine the summaries.

    text ──split──▶ pieces ──map (one batched call)──▶ partial summaries ──fit?──▶ combine ──▶ summary
                                                              ▲                │ no
                                                              └── combine groups (one batched call) ◀┘

The text is cut on its own structure (paragraphs, then sentences of a paragraph too long alone, then a hard
cut for a run of text with no sentence end) and the cuts are packed greedily into pieces, each as large as
fits a prompt: instruction + piece + the answer's max_new_tokens <= context_tokens, less a margin for the
chat template's markup. Every round sends all its prompts in ONE generate call, so a LocalModel decodes
them together in its Batcher and a RemoteModel sends them concurrently.

The model is anything with `generate(prompts, params, n=1) -> [[text], ...]` where a prompt that is a list
of chat messages is a chat (backends.LocalModel and RemoteModel). Tokens are counted with the caller's
`count_tokens`, so the same code serves a local engine (its tokenizer) and a server (an estimate).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from ..backends import Generator
from ..engine.sampling import SamplingParams
from .documents import HAN, mostly_chinese, sentences


@dataclass
class Summary:
    """A summary and what it took."""
    summary: str
    pieces: int     # pieces the text was split into (1: it fitted one prompt)
    rounds: int     # generate calls made (each one batch of prompts)
    calls: int      # prompts sent, over all rounds


WHOLE = "Summarize the following text in at most {words} words. Reply with the summary only."
PART = ("Summarize the following part of a longer text in at most {words} words. "
        "Reply with the summary only.")
COMBINE = ("The following are summaries of consecutive parts of one text, in order. Combine them into a "
           "single summary of at most {words} words. Reply with the summary only.")
# a short summary is asked for as one sentence (a 135M model then says what the text is about, instead of
# retelling its start; measured on man pages, benchmarks/apps.py)
SHORT_WORDS = 25
WHOLE_SHORT = "Say in one sentence of at most {words} words what the following text is about. Reply with that sentence only."
COMBINE_SHORT = ("The following are summaries of consecutive parts of one text, in order. Say in one sentence of at "
                 "most {words} words what the whole text is about. Reply with that sentence only.")
# a Chinese text is summarized in Chinese, its length in characters: about two characters a word
WHOLE_ZH = "用不超过{chars}个字概括下面的文字。只回复概括本身。"
PART_ZH = "用不超过{chars}个字概括下面这段长文中的一部分。只回复概括本身。"
COMBINE_ZH = "下面是同一篇文字各个连续部分的概括，按原文顺序排列。把它们合并成一段不超过{chars}个字的概括。只回复概括本身。"
WHOLE_SHORT_ZH = "用一句不超过{chars}个字的话说明下面的文字讲的是什么。只回复这句话。"
COMBINE_SHORT_ZH = ("下面是同一篇文字各个连续部分的概括，按原文顺序排列。用一句不超过{chars}个字的话说明整篇文字讲的是什么。"
                    "只回复这句话。")
CHARS_PER_WORD = 2
MIN_PIECE_TOKENS = 16
# what a reply may start with before the summary itself: "Sure! Here is a summary of the text:", "**Summary:**"
_CHATTER = re.compile(r"^\s*(?:(?:sure|okay|ok|certainly)\b[!,.]?\s*)?"
                      r"(?:here(?:'s| is) [^:\n]{0,40}\bsummary\b[^:\n]{0,40}:\s*"
                      r"|[*_#\s]*(?:summary|tl;?dr)[*_\s]*:[*_\s]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|(?<=[。！？；])|\n")


def summary_tokens(words: int) -> int:
    """max_new_tokens for a summary of `words` words: about 2 tokens a word (room for punctuation and
    sub-word pieces), at least 16."""
    return max(16, 2 * words)


def summary_params(words: int = 60, **overrides) -> SamplingParams:
    """The default sampling for summaries: greedy, max_new_tokens from `words`; `overrides` replace fields
    (e.g. temperature from a command line)."""
    return SamplingParams(**{"max_new_tokens": summary_tokens(words), "temperature": 0.0, **overrides})


def context_margin(context_tokens: int) -> int:
    """Tokens held back from each prompt for what count_tokens does not see: the chat template's markup
    (some add a default system prompt) and tokens merging differently across the joins."""
    return 24 + context_tokens // 32


def summarize(model: Generator, text: str, *, words: int = 60, context_tokens: int,
              count_tokens: Callable[[str], int], params: SamplingParams | None = None,
              progress: Callable[[int, int], None] | None = None, title: str | None = None) -> Summary:
    """Summarize `text` in about `words` words with a model whose context holds `context_tokens` tokens.

    params: sampling (default summary_params(words): greedy); its max_new_tokens is the room each answer gets.
    progress(done, total): called as each round finishes with rounds done and the rounds expected in all
    (an estimate from the longest answers, refined each round; the last call has done == total).
    title: named in every instruction (helps a model with pieces that start mid-way).
    Raises ValueError for an empty text, or a context too small to hold an instruction, a piece and an answer.
    """
    return summarize_many(model, [text], words=words, context_tokens=context_tokens, count_tokens=count_tokens,
                          params=params, progress=progress, titles=[title])[0]


def summarize_many(model: Generator, texts: list[str], *, words: int = 60, context_tokens: int,
                   count_tokens: Callable[[str], int], params: SamplingParams | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   titles: list[str | None] | None = None) -> list[Summary]:
    """summarize() for many texts at once: each round sends the prompts of every text not yet summarized in
    ONE generate call (a text that fits one prompt is done after the first). progress counts these rounds;
    each Summary counts the rounds its text took part in and its own prompts."""
    if words < 1:
        raise ValueError(f"words must be at least 1, got {words}")
    titles = titles or [None] * len(texts)
    if len(titles) != len(texts):
        raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError("there is no text to summarize" + (f" (text {i} is empty)" if len(texts) > 1 else ""))
    params = params or summary_params(words)
    jobs = [_Job(text, title, words, context_tokens, count_tokens, params.max_new_tokens)
            for text, title in zip(texts, titles)]
    rounds = 0
    while active := [job for job in jobs if job.result is None]:
        prompts = [prompt for job in active for prompt in job.prompts()]
        replies = model.generate(prompts, params)
        if len(replies) != len(prompts):
            raise ValueError(f"the model answered {len(replies)} of {len(prompts)} prompts")
        rounds, start = rounds + 1, 0
        for job in active:
            end = start + len(job.texts)
            job.advance([clean_summary(reply[0]) for reply in replies[start:end]])
            start = end
        if progress is not None:
            progress(rounds, rounds + max((job.rounds_left() for job in jobs), default=0))
    return [job.result for job in jobs]


class _Job:
    """One text's way through the rounds: what to send next (texts, under an instruction) and, once the
    final answer is in, its Summary."""

    def __init__(self, text: str, title: str | None, words: int, context_tokens: int,
                 count_tokens: Callable[[str], int], answer_tokens: int):
        text = text.strip()
        short = words <= SHORT_WORDS
        templates = ((WHOLE_SHORT_ZH if short else WHOLE_ZH, PART_ZH, COMBINE_SHORT_ZH if short else COMBINE_ZH)
                     if mostly_chinese(text) else (WHOLE_SHORT if short else WHOLE, PART, COMBINE_SHORT if short else COMBINE))
        self.instructions = {name: _instruction(template, words, title)
                             for name, template in zip(("whole", "part", "combine"), templates)}
        self.budget = (context_tokens - max(count_tokens(i) for i in self.instructions.values()) - answer_tokens
                       - context_margin(context_tokens))
        if self.budget < MIN_PIECE_TOKENS:
            raise ValueError(f"context_tokens={context_tokens} leaves {self.budget} tokens of text per prompt "
                             f"after the instruction, a {answer_tokens}-token answer and the template's margin; "
                             f"ask for fewer words or use a model with a longer context")
        self.count_tokens, self.answer_tokens, self.words = count_tokens, answer_tokens, words
        self.size = count_tokens(text)   # of what the coming round summarizes: each round must shrink it
        if self.size <= self.budget:
            self.texts, self.instruction, self.last = [text], self.instructions["whole"], True
        else:
            self.texts = split_text(text, self.budget, count_tokens)
            self.instruction, self.last = self.instructions["part"], False
        self.pieces, self.rounds, self.calls = len(self.texts), 0, 0
        self.result: Summary | None = None

    def prompts(self) -> list[list[dict]]:
        return [_prompt(self.instruction, text) for text in self.texts]

    def advance(self, summaries: list[str]) -> None:
        """Take this round's answers and set up the next round (or the result)."""
        self.rounds, self.calls = self.rounds + 1, self.calls + len(summaries)
        if self.last:
            self.result = Summary(fit_words(summaries[0], self.words), self.pieces, self.rounds, self.calls)
            return
        joined = "\n\n".join(s for s in summaries if s)
        joined_size = self.count_tokens(joined)
        self.instruction = self.instructions["combine"]
        if joined_size <= self.budget:
            self.texts, self.last = [joined], True
        elif joined_size >= self.size:   # this round did not shrink the text: cut it to fit, and finish
            self.texts, self.last = [cut_to_fit(summaries, self.budget, self.count_tokens)], True
        else:
            self.size = joined_size
            self.texts = split_text(joined, self.budget, self.count_tokens)

    def rounds_left(self) -> int:
        """Rounds still to come, if every answer to come were as long as it may be."""
        if self.result is not None:
            return 0
        rounds, size, texts = 1, self.size, len(self.texts)   # 1: the round set up now
        while not self.last:
            answers = texts * self.answer_tokens
            if answers <= self.budget or answers >= size:   # they fit, or will be cut: the final round
                return rounds + 1
            rounds, size, texts = rounds + 1, answers, math.ceil(answers / self.budget)
        return rounds


def _instruction(template: str, words: int, title: str | None) -> str:
    instruction = template.format(words=words, chars=CHARS_PER_WORD * words)
    return f"{instruction}\nTitle: {title}" if title else instruction


def _prompt(instruction: str, text: str) -> list[dict]:
    return [{"role": "user", "content": f"{instruction}\n\n{text}"}]


def count_words(text: str) -> float:
    """Words of a text: its space-separated words outside Han script, and a word per CHARS_PER_WORD Han
    characters (Chinese has no spaces; a Chinese word is one to three characters)."""
    han = len(HAN.findall(text))
    return len(HAN.sub(" ", text).split()) + han / CHARS_PER_WORD


def fit_words(text: str, words: int) -> str:
    """`text` within about `words` words: its whole sentences while they fit (small models overrun the
    length they are asked for), or, when even the first one is longer, its first `words` words."""
    kept, count = [], 0.0
    for sentence in sentences(text):
        n = count_words(sentence)
        if count + n > words:
            break
        kept.append(sentence)
        count += n
    if kept:
        return ("" if mostly_chinese(text) else " ").join(kept)
    if mostly_chinese(text):
        return text.strip()[:CHARS_PER_WORD * words]
    return " ".join(text.split()[:words])


def clean_summary(reply: str) -> str:
    """The summary in a reply, without chatter before it ("Sure! Here is a summary:", "Summary:") or
    quotes around it."""
    text = _CHATTER.sub("", reply.strip(), count=1).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text or reply.strip()


# ----------------------------------------------------------------------------- splitting

def split_text(text: str, budget: int, count_tokens: Callable[[str], int]) -> list[str]:
    """`text` in pieces of at most `budget` tokens, cut between paragraphs (blank lines) where it can, else
    between sentences (or lines), else anywhere (preferably at white space); the cuts are packed greedily."""
    units: list[tuple[str, str]] = []     # (text, the separator that joins it to the one before)
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if count_tokens(paragraph) <= budget:
            units.append((paragraph, "\n\n"))
            continue
        separator = "\n\n"
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = sentence.strip()
            if not sentence:
                continue
            parts = [sentence] if count_tokens(sentence) <= budget else hard_cut(sentence, budget, count_tokens)
            for part in parts:
                units.append((part, separator))
                separator = " "
    return _pack(units, budget, count_tokens)


def _pack(units: list[tuple[str, str]], budget: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Greedy packing: sizes are added up (each unit counted once), and each piece is measured whole once
    more, since tokens can merge differently across a join."""
    sizes = [count_tokens(u) for u, _ in units]
    pieces, start = [], 0
    while start < len(units):
        end, total = start + 1, sizes[start]
        while end < len(units) and total + sizes[end] <= budget:
            total += sizes[end]
            end += 1
        piece = _join(units[start:end])
        while end - start > 1 and count_tokens(piece) > budget:
            end -= 1
            piece = _join(units[start:end])
        pieces.append(piece)
        start = end
    return pieces


def _join(units: list[tuple[str, str]]) -> str:
    return "".join((separator if i else "") + text for i, (text, separator) in enumerate(units))


def hard_cut(text: str, budget: int, count_tokens: Callable[[str], int]) -> list[str]:
    """`text` cut into runs of at most `budget` tokens, at white space where there is some."""
    parts = []
    while text:
        part = truncate(text, budget, count_tokens) or text[:1]   # a character over budget still moves on
        parts.append(part.strip())
        text = text[len(part):].lstrip()
    return [p for p in parts if p]


def truncate(text: str, limit: int, count_tokens: Callable[[str], int]) -> str:
    """The longest start of `text` with at most `limit` tokens, ending at white space if that keeps at least
    half of it. Found by doubling, then bisection, so a long text costs few count_tokens calls of about the
    answer's length."""
    if count_tokens(text) <= limit:
        return text
    good, bad = 0, min(len(text), max(1, 4 * limit))   # count_tokens(text[:good]) <= limit < ...[:bad]
    while bad < len(text) and count_tokens(text[:bad]) <= limit:
        good, bad = bad, min(len(text), 2 * bad)
    while bad - good > 1:
        middle = (good + bad) // 2
        if count_tokens(text[:middle]) <= limit:
            good = middle
        else:
            bad = middle
    space = max(text.rfind(" ", 0, good + 1), text.rfind("\n", 0, good + 1))
    return text[:space] if space >= good // 2 and space > 0 else text[:good]


def cut_to_fit(summaries: list[str], budget: int, count_tokens: Callable[[str], int]) -> str:
    """The summaries joined, each cut to an equal share of `budget` tokens (the whole cut again if the join
    still does not fit): how a round that failed to shrink the text ends."""
    summaries = [s for s in summaries if s]
    share = max(1, budget // max(1, len(summaries)))
    joined = "\n\n".join(truncate(s, share, count_tokens) for s in summaries)
    return truncate(joined, budget, count_tokens)
