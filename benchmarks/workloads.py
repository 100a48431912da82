"""The requests speed is measured on (benchmarks/decode.py, serve.py): what people ask a local assistant.

Each workload is a list of chat conversations, rendered with the model's chat template by the caller:

  * chat       ordinary questions: stories, explanations, advice (nothing to copy)
  * grounded   the customer-service assistant's prompt (picochat.apps.assistant): numbered passages from
               the shop handbook and a question; the answer quotes them
  * summary    a summary of a page of text
  * code       a function to write
  * code-edit  a function to change (type hints, a docstring): most of the answer is the input again
"""
from __future__ import annotations

from picochat.apps.assistant import DEFAULT_PERSONA, Source, sources_prompt
from sft_demo import FACTS

PARAGRAPH = ("The history of computing is a story of people finding ways to make machines do work that once "
             "required careful human attention. Early mechanical calculators could add and multiply, but each "
             "step had to be set by hand. Later, programmable machines stored their instructions in memory, "
             "and the same hardware could solve many different problems. Today a small language model can run "
             "on an ordinary laptop, answering questions, summarising documents and writing short programs. ")

FUNCTION = '''def merge_intervals(intervals):
    if not intervals:
        return []
    intervals = sorted(intervals, key=lambda pair: pair[0])
    merged = [list(intervals[0])]
    for start, end in intervals[1:]:
        last = merged[-1]
        if start <= last[1]:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    return [tuple(pair) for pair in merged]


def total_covered(intervals):
    return sum(end - start for start, end in merge_intervals(intervals))
'''


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _grounded(question: str, facts: list[int]) -> list[dict]:
    sources = [Source(i + 1, "handbook.md", "", FACTS[f][0], 0.5) for i, f in enumerate(facts)]
    return [{"role": "system", "content": DEFAULT_PERSONA},
            {"role": "user", "content": sources_prompt(question, sources)}]


WORKLOADS: dict[str, list[list[dict]]] = {
    "chat": [_user("Write a short story about a robot who learns to paint."),
             _user("What are three good habits for learning to program? Explain each."),
             _user("Explain how a bicycle works to a ten-year-old.")],
    "grounded": [_grounded("When are you open on Saturdays, and when on weekdays? Quote the handbook.", [0, 1, 2, 3]),
                 _grounded("How can I return an item, and how long does a refund take? Quote the relevant "
                           "sentences.", [4, 5, 6, 7, 8]),
                 _grounded("What are all the ways to contact the shop? Quote the handbook for each.", [9, 10, 11, 12])],
    "summary": [_user("Summarise this text in three sentences:\n\n" + PARAGRAPH * 2),
                _user("Summarise in a short paragraph:\n\n" + " ".join(f[0] for f in FACTS[:12]))],
    "code": [_user("Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring."),
             _user("Write a Python function that checks whether a string is a palindrome, ignoring case and "
                   "punctuation.")],
    "code-edit": [_user("Add type hints and a docstring to each function, and return the whole code:\n\n```python\n"
                        + FUNCTION + "```"),
                  _user("Rename `intervals` to `spans` everywhere in this code and return the whole code:\n\n"
                        "```python\n" + FUNCTION + "```")],
}
