"""Map-reduce summarization: pieces that fit the context, one batched generate call per round, termination."""
import math

import pytest

from picochat.backends import LocalModel
from picochat.apps.summarize import clean_summary, split_text, summarize

from helpers import tiny_engine


def words(text: str) -> int:
    return len(text.split())


class Scripted:
    """A model that records every generate call and answers reply(prompt text, running number from 1)."""

    def __init__(self, reply=lambda text, i: f"S{i}"):
        self.reply, self.calls, self.answered = reply, [], 0

    def generate(self, prompts, params, n=1):
        self.calls.append((prompts, params))
        out = []
        for prompt in prompts:
            assert isinstance(prompt, list) and prompt[-1]["role"] == "user"   # a chat prompt
            self.answered += 1
            out.append([self.reply(prompt[-1]["content"], self.answered)])
        return out


def content(prompt) -> str:
    return prompt[-1]["content"]


def body(prompt) -> str:
    """The text a prompt asks to summarize (after the instruction's blank line)."""
    return content(prompt).split("\n\n", 1)[1]


# 130 paragraphs of 31 words: about 4,000 words, 20 times a context of 200 "tokens"
LONG = "\n\n".join(" ".join(f"Paragraph {p} sentence {s} tells of the river, the hills and the old mill."
                            for s in range(2)) + " The end." for p in range(130))


def test_a_short_text_takes_one_call():
    model = Scripted(lambda text, i: "Summary: A fox jumps.")
    got = summarize(model, "The quick brown fox jumps over the lazy dog.", words=30, context_tokens=200,
                    count_tokens=words)
    assert (got.summary, got.pieces, got.rounds, got.calls) == ("A fox jumps.", 1, 1, 1)
    (prompts, params), = model.calls
    assert len(prompts) == 1 and "at most 30 words" in content(prompts[0])
    assert body(prompts[0]) == "The quick brown fox jumps over the lazy dog."
    assert params.temperature == 0 and params.max_new_tokens == 60


def test_the_summary_keeps_to_its_length():
    long_reply = "First sentence is here. Second one follows it. " + "word " * 50
    model = Scripted(lambda text, i: long_reply)
    assert summarize(model, "Some text.", words=8, context_tokens=200, count_tokens=words).summary == \
        "First sentence is here. Second one follows it."
    assert summarize(model, "Some text.", words=3, context_tokens=200, count_tokens=words).summary == "First sentence is"
    (prompts, _), _ = model.calls
    assert "one sentence of at most 8 words" in content(prompts[0])   # short summaries: one sentence
    long_model = Scripted(lambda text, i: "A. " * 10)
    summarize(long_model, "Some text.", words=40, context_tokens=200, count_tokens=words)
    assert "Summarize the following text in at most 40 words" in content(long_model.calls[0][0][0])


def test_a_long_text_is_mapped_in_one_call_then_reduced():
    model = Scripted()
    got = summarize(model, LONG, words=20, context_tokens=200, count_tokens=words)
    assert len(model.calls) == 2
    (mapped, params), (reduced, _) = model.calls
    assert len(mapped) == got.pieces > 20 and len(reduced) == 1
    for prompt in mapped + reduced:   # instruction + piece + answer fit the context
        assert words(content(prompt)) + params.max_new_tokens <= 200
    assert " ".join(body(p) for p in mapped).split() == LONG.split()   # nothing lost, nothing repeated
    assert body(reduced[0]) == "\n\n".join(f"S{i}" for i in range(1, got.pieces + 1))
    assert "summaries of consecutive parts" in content(reduced[0]) and "one sentence" in content(reduced[0])
    assert got.summary == f"S{got.pieces + 1}"
    assert (got.rounds, got.calls) == (2, got.pieces + 1)


def test_partial_summaries_that_do_not_fit_get_another_round():
    # each piece's summary is 30 words: together far more than a prompt holds, but less than the text
    model = Scripted(lambda text, i: " ".join(["word"] * 30) if "part of a longer text" in text else f"C{i}")
    got = summarize(model, LONG, words=20, context_tokens=200, count_tokens=words)
    assert len(model.calls) == 3
    mapped, combined, final = (prompts for prompts, _ in model.calls)
    assert len(mapped) == got.pieces and 1 < len(combined) < len(mapped) and len(final) == 1
    for prompt in combined + final:
        assert words(content(prompt)) + 40 <= 200
    assert body(final[0]).split() == [f"C{len(mapped) + i}" for i in range(1, len(combined) + 1)]
    assert (got.rounds, got.calls) == (3, len(mapped) + len(combined) + 1)


def test_a_round_that_does_not_shrink_is_cut_and_finishes():
    model = Scripted(lambda text, i: " ".join(["blah"] * 150))   # every answer longer than its piece
    got = summarize(model, LONG, words=20, context_tokens=200, count_tokens=words)
    assert got.rounds == 2 and len(model.calls[1][0]) == 1
    assert words(content(model.calls[1][0][0])) + 40 <= 200


def test_a_pathological_word_is_cut_and_fits():
    def chars(text):   # about 4 characters a token: a 5,000-character word is 1,250 tokens
        return math.ceil(len(text) / 4)
    word = "".join(chr(ord("a") + i % 26) for i in range(5000))
    model = Scripted()
    got = summarize(model, word, words=10, context_tokens=200, count_tokens=chars)
    mapped = model.calls[0][0]
    assert got.pieces == len(mapped) > 10
    assert "".join(body(p) for p in mapped) == word
    for prompt in mapped:
        assert chars(content(prompt)) + 20 <= 200


def test_split_text_prefers_paragraphs_then_sentences():
    sentence = " ".join(["w"] * 20) + "."
    small = "\n\n".join(" ".join(["p"] * 10) for _ in range(6))   # six 10-word paragraphs
    assert split_text(small, 35, words) == ["\n\n".join([" ".join(["p"] * 10)] * 3)] * 2
    big = " ".join([sentence] * 3)   # one 60-word paragraph of three sentences
    assert split_text(big, 45, words) == [sentence + " " + sentence, sentence]


def test_progress_is_reported_as_rounds_finish():
    seen = []
    model = Scripted(lambda text, i: " ".join(["word"] * 30) if "part of a longer text" in text else f"C{i}")
    got = summarize(model, LONG, words=20, context_tokens=200, count_tokens=words,
                    progress=lambda done, total: seen.append((done, total)))
    assert [done for done, _ in seen] == [1, 2, 3] == list(range(1, got.rounds + 1))
    assert seen[-1] == (3, 3) and all(total >= done for done, total in seen)


def test_the_title_is_in_every_prompt_and_chatter_is_stripped():
    model = Scripted(lambda text, i: f"Sure! Here is a summary of the text:\nS{i}")
    got = summarize(model, LONG, words=20, context_tokens=200, count_tokens=words, title="The Mill")
    assert all("Title: The Mill" in content(p) for prompts, _ in model.calls for p in prompts)
    assert got.summary == f"S{got.calls}"


def test_clean_summary():
    assert clean_summary("Summary: A fox.") == "A fox."
    assert clean_summary("**Summary:** A fox.") == "A fox."
    assert clean_summary("Here's a short summary of the passage:\n\nA fox.") == "A fox."
    assert clean_summary('"A fox jumps."') == "A fox jumps."
    assert clean_summary("Here is a town: it has a mill.") == "Here is a town: it has a mill."


def test_a_context_too_small_is_refused():
    with pytest.raises(ValueError, match="context_tokens=80"):
        summarize(Scripted(), LONG, words=20, context_tokens=80, count_tokens=words)


TINY_TEXT = ("The river runs past the old mill. The miller grinds wheat into flour. Children play on the hills. "
             "Summarize the following part of a longer text in at most words. Combine them into one summary. "
             ) * 10


def test_a_real_tiny_model_summarizes_a_text_longer_than_its_context():
    engine = tiny_engine(TINY_TEXT, max_seq_len=256)
    local = LocalModel(engine)
    prompts_seen = []

    class Recording:
        def generate(self, prompts, params, n=1):
            prompts_seen.append((prompts, params))
            return local.generate(prompts, params, n)

    def count(text):
        return len(engine.tokenizer.encode_text(text))
    text = "\n\n".join(TINY_TEXT for _ in range(3))
    assert count(text) > 3 * 256
    got = summarize(Recording(), text, words=10, context_tokens=engine.context_length, count_tokens=count)
    assert isinstance(got.summary, str)
    assert got.pieces > 1 and got.rounds >= 2 and got.calls >= got.pieces + 1
    assert len(prompts_seen) == got.rounds and len(prompts_seen[0][0]) == got.pieces
    for prompts, params in prompts_seen:   # the rendered chat, markup included, fits with the answer
        for prompt in prompts:
            assert len(engine.chat_prompt(prompt)) + params.max_new_tokens <= 256


def test_an_empty_text_is_refused():
    with pytest.raises(ValueError, match="no text"):
        summarize(Scripted(), " \n\n ", context_tokens=2048, count_tokens=words)


def test_many_texts_share_each_round():
    from picochat.apps.summarize import summarize_many
    model = Scripted()
    seen = []
    short, long = summarize_many(model, ["A fox jumps.", LONG], words=20, context_tokens=200, count_tokens=words,
                                 progress=lambda done, total: seen.append((done, total)))
    assert [len(prompts) for prompts, _ in model.calls] == [1 + long.pieces, 1]
    assert (short.summary, short.pieces, short.rounds, short.calls) == ("S1", 1, 1, 1)
    assert (long.pieces, long.rounds, long.calls) == (len(model.calls[0][0]) - 1, 2, long.pieces + 1)
    assert body(model.calls[1][0][0]).split() == [f"S{i}" for i in range(2, long.pieces + 2)]
    assert seen == [(1, 2), (2, 2)]
    with pytest.raises(ValueError, match="text 1 is empty"):
        summarize_many(model, ["A fox.", ""], context_tokens=200, count_tokens=words)


CHINESE = ("自注意力机制让模型在处理每个词时，关注同一序列中的所有其他词。它是Transformer的核心。"
           "生成式预训练用下一个词的预测作为目标，在大量文本上训练模型。")


def test_a_chinese_text_is_summarized_in_chinese_within_its_length():
    reply = "这段文字介绍了自注意力。它也讲了预训练的目标和方法。" + "还有很多很多其他的内容" * 5
    model = Scripted(lambda text, i: reply)
    got = summarize(model, CHINESE, words=20, context_tokens=400, count_tokens=len)
    (prompts, _), = model.calls
    assert content(prompts[0]).startswith("用一句不超过40个字的话说明下面的文字讲的是什么")
    assert body(prompts[0]) == CHINESE
    # whole sentences while they fit: two characters a word, 40 characters
    assert got.summary == "这段文字介绍了自注意力。它也讲了预训练的目标和方法。"
    long = summarize(Scripted(lambda text, i: "很长" * 100), CHINESE, words=30, context_tokens=400, count_tokens=len)
    assert long.summary == "很长" * 30   # no sentence end: the first 60 characters
    english = Scripted(lambda text, i: "About attention.")
    summarize(english, "Self-attention lets a model look at every word. 它很重要。", words=20, context_tokens=400,
              count_tokens=words)
    assert "at most 20 words" in content(english.calls[0][0][0])   # mostly English: asked in English
