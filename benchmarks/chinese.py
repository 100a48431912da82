"""Chinese, measured: chat, summaries and code asked in Chinese, for each model side by side in one run.
(Questions over a Chinese knowledge base are `benchmarks/apps.py kb-zh`.)

    python benchmarks/chinese.py                                   # the default 1.5B and SmolLM2-135M
    python benchmarks/chinese.py -m qwen2.5-coder-1.5b -m qwen2.5-coder-0.5b --json out/zh.json

chat:      10 simple questions; right = the reply holds one of the answer's spellings (北京, 八 or 8 ...);
           in Chinese = at least half of the reply's letters are Han characters. Greedy, 80 new tokens.
summarize: 4 Chinese passages written for this benchmark (about 200 characters each), summarized in at most
           20 words (= 40 characters) by `picochat summarize`'s code; ROUGE-L F1 over characters against a
           one-sentence reference written with the passage, beside the lead-sentence baseline; how many
           summaries are in Chinese and keep to the length.
code:      6 small tasks described only in Chinese, each checked by its own tests in the sandbox, greedy,
           first attempt and with test-and-retry (up to 2 retries), as `picochat code --test` runs them.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line, cpu_model, finish_report, log, one_request  # noqa: E402

from picochat.apps.codegen import generate_code_batch  # noqa: E402
from picochat.apps.documents import han_share  # noqa: E402
from picochat.apps.summarize import summarize_many  # noqa: E402
from picochat.backends import LocalModel  # noqa: E402
from picochat.engine.engine import Engine  # noqa: E402
from picochat.engine.sampling import SamplingParams  # noqa: E402
from picochat.load import load  # noqa: E402

QUESTIONS = [  # (question, accepted spellings of the answer)
    ("中国的首都是哪个城市？", ["北京"]),
    ("一年有几个月？", ["12", "十二"]),
    ("水在标准大气压下多少摄氏度沸腾？", ["100", "一百"]),
    ("太阳从哪个方向升起？", ["东"]),
    ("《静夜思》的作者是谁？", ["李白"]),
    ("3加5等于几？", ["8", "八"]),
    ("一个星期有几天？", ["7", "七"]),
    ("地球上最大的海洋是什么？", ["太平洋"]),
    ("“谢谢”的英文是什么？", ["thank"]),
    ("Python 中用哪个关键字定义函数？", ["def"]),
]

PASSAGES = [  # (text, a reference summary)
    ("自注意力机制是Transformer模型的核心。它让序列中的每个词在计算表示时，都能直接关注序列中的所有其他词，"
     "并根据相关程度分配不同的权重。具体做法是把每个词映射成查询、键和值三个向量，用查询和键的点积衡量相关性，"
     "经过缩放和softmax归一化后，对值向量加权求和。与循环神经网络相比，自注意力可以并行计算，也更容易捕捉长距离的依赖关系，"
     "因此成为大语言模型的基础结构。", "自注意力让每个词关注序列中所有其他的词，是Transformer和大语言模型的核心。"),
    ("大熊猫是中国特有的哺乳动物，主要生活在四川、陕西和甘肃的山区竹林中。它们的食物几乎全部是竹子，"
     "每天要花十几个小时进食。大熊猫繁殖能力较低，幼崽出生时只有一百多克重。经过几十年的保护工作，"
     "包括建立自然保护区和人工繁育，野生大熊猫的数量已经有所回升，它的受威胁等级也从濒危调整为易危。",
     "大熊猫是中国特有、以竹子为食的动物，经过保护，野生数量已经回升。"),
    ("茶起源于中国，已有数千年的历史。按照加工方法的不同，茶可以分为绿茶、红茶、乌龙茶、白茶、黄茶和黑茶六大类。"
     "绿茶不经发酵，保留了较多的天然成分；红茶是全发酵茶，味道醇厚；乌龙茶介于两者之间，属于半发酵茶。"
     "喝茶在中国不仅是一种生活习惯，也是一种文化，茶馆曾经是人们聊天、交流消息的重要场所。",
     "茶起源于中国，分为六大类，喝茶也是中国的一种文化。"),
    ("高速铁路是指设计速度每小时二百五十公里以上的铁路。中国从二〇〇八年开通京津城际铁路开始大规模建设高铁，"
     "到今天已经拥有世界上最长的高铁网络。高铁大大缩短了城市之间的旅行时间，例如北京到上海只需要四个多小时。"
     "高铁的建设也带动了沿线城市的经济发展，改变了很多人的出行方式。",
     "中国从2008年起大规模建设高铁，拥有世界最长的高铁网络，缩短了城市间的旅行时间。"),
]

CODE_TASKS = [  # (task in Chinese, tests)
    ("写一个 Python 函数 is_palindrome(s)，判断字符串 s 是否是回文（忽略大小写），返回 True 或 False。",
     "assert is_palindrome('Level')\nassert not is_palindrome('hello')\nassert is_palindrome('')\n"),
    ("写一个 Python 函数 count_vowels(s)，返回字符串 s 中元音字母 a、e、i、o、u 的个数（不区分大小写）。",
     "assert count_vowels('Hello World') == 3\nassert count_vowels('') == 0\nassert count_vowels('AEIOU') == 5\n"),
    ("写一个 Python 函数 fib(n)，返回第 n 个斐波那契数，其中 fib(0) = 0，fib(1) = 1。",
     "assert fib(0) == 0\nassert fib(1) == 1\nassert fib(10) == 55\nassert fib(20) == 6765\n"),
    ("写一个 Python 函数 second_largest(nums)，返回列表中第二大的不同的数；如果不存在，返回 None。",
     "assert second_largest([3, 1, 4, 4, 2]) == 3\nassert second_largest([5]) is None\n"
     "assert second_largest([2, 2]) is None\n"),
    ("写一个 Python 函数 word_count(text)，统计英文文本中每个单词出现的次数（不区分大小写），返回一个字典。",
     "assert word_count('a b A') == {'a': 2, 'b': 1}\nassert word_count('') == {}\n"),
    ("写一个 Python 函数 flatten(items)，把任意层嵌套的列表展开成一个一维列表。",
     "assert flatten([1, [2, [3, 4]], 5]) == [1, 2, 3, 4, 5]\nassert flatten([]) == []\n"
     "assert flatten([[[]]]) == []\n"),
]

def run_chat(model: LocalModel) -> dict:
    t0 = time.perf_counter()
    replies = [r[0] for r in model.generate([[{"role": "user", "content": q}] for q, _ in QUESTIONS],
                                            SamplingParams(max_new_tokens=80, temperature=0.0))]
    right = [any(a.lower() in r.lower() for a in answers) for r, (_, answers) in zip(replies, QUESTIONS)]
    chinese = [han_share(r) >= 0.5 for r in replies]
    return {"n": len(QUESTIONS), "right": sum(right), "in_chinese": sum(chinese), "seconds": time.perf_counter() - t0,
            "examples": [{"question": q, "reply": r} for (q, _), r in zip(QUESTIONS, replies)]}


def rouge_l_chars(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over characters (Chinese has no spaces to split words at): the longest common subsequence."""
    a, b = [c for c in candidate if not c.isspace()], [c for c in reference if not c.isspace()]
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    lcs = row[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))


def run_summarize(model: LocalModel, words: int = 20) -> dict:
    t0 = time.perf_counter()
    tokenizer = model.tokenizer
    results = summarize_many(model, [p for p, _ in PASSAGES], words=words, context_tokens=2048,
                             count_tokens=lambda text: len(tokenizer.encode(text)))
    summaries = [r.summary for r in results]
    leads = [re.split(r"(?<=。)", p, maxsplit=1)[0] for p, _ in PASSAGES]

    def rouge(texts):
        return sum(rouge_l_chars(t, ref) for t, (_, ref) in zip(texts, PASSAGES)) / len(PASSAGES)
    return {"n": len(PASSAGES), "rougeL_chars": rouge(summaries), "rougeL_chars_lead": rouge(leads),
            "in_chinese": sum(han_share(s) >= 0.5 for s in summaries),
            "within_length": sum(len(s) <= 2 * words + 5 for s in summaries),   # 2 characters a word, punctuation
            "seconds": time.perf_counter() - t0, "examples": summaries}


def run_code(model: LocalModel) -> dict:
    t0 = time.perf_counter()
    results = generate_code_batch(model, CODE_TASKS, retries=2, params=SamplingParams(max_new_tokens=384, temperature=0.0))
    return {"n": len(CODE_TASKS), "first_attempt": sum(bool(r.attempts[0].passed) for r in results),
            "with_retry": sum(bool(r.passed) for r in results), "seconds": time.perf_counter() - t0}


def speed(engine: Engine) -> dict:
    """One request at a time, as one user waits: time to first token and decode tokens/s of a Chinese chat
    question (median of 3 runs)."""
    return one_request(engine, engine.chat_prompt([{"role": "user", "content": "请用三句话介绍一下长城。"}]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", action="append", help="repeatable (default: qwen2.5-coder-1.5b and smollm2)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(cpu_line())
    t_start, record = time.perf_counter(), {"cpu": cpu_model(), "threads": torch.get_num_threads(), "models": {}}
    for name in args.model or ["qwen2.5-coder-1.5b", "smollm2"]:
        loaded = load(name)
        engine = Engine(loaded.model, loaded.tokenizer, draft=loaded.draft)
        model = LocalModel(engine, name=name)
        log(f"{name}: chat ...")
        r = record["models"][name] = {"speed": speed(engine), "chat": run_chat(model)}
        log(f"{name}: summarize ...")
        r["summarize"] = run_summarize(model)
        log(f"{name}: code ...")
        r["code"] = run_code(model)
    rows = ["| model | chat: right | chat: in Chinese | summaries: ROUGE-L (chars; lead sentence) | "
            "summaries in Chinese, within length | "
            "code: first attempt | code: with retry | time to first token | decode tok/s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in record["models"].items():
        c, s, k, sp = r["chat"], r["summarize"], r["code"], r["speed"]
        rows.append(f"| {name} | {c['right']}/{c['n']} | {c['in_chinese']}/{c['n']} | {s['rougeL_chars']:.3f} "
                    f"({s['rougeL_chars_lead']:.3f}) | {s['in_chinese']}/{s['n']}, {s['within_length']}/{s['n']} | "
                    f"{k['first_attempt']}/{k['n']} | "
                    f"{k['with_retry']}/{k['n']} | {sp['ttft_s']:.2f} s ({sp['prompt_tokens']} tokens) | "
                    f"{sp['decode_tok_s']:.1f} |")
    finish_report("\n".join(rows), time.perf_counter() - t_start, args.json, record)
    for name, r in record["models"].items():
        print(f"\n{name}: " + " / ".join(f"{e['question']} → {e['reply'][:60]!r}" for e in r["chat"]["examples"][:3]))
        print(f"{name} summaries: " + " / ".join(r["summarize"]["examples"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
