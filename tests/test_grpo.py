"""GRPO (train/grpo.py) and its tasks (train/rl_tasks.py): advantages, the loss's masking and normalisation, the
KL term, the rewards (a hostile completion scores 0 in the sandbox), disjoint task sets, a scripted rollout's
record, and a tiny end-to-end run of `picochat rl`."""
import json
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from picochat import cli
from picochat.formats.hf import save_hf_folder
from picochat.load import load
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.model.lora import LoRAConfig, apply_lora, lora_state_dict
from picochat.tokenizer.bpe import Tokenizer
from picochat.train import rl_tasks
from picochat.train.config import TrainConfig
from picochat.train.grpo import (GRPOConfig, Rollout, accumulate_gradient, completion_of, group_advantages, pack,
                                 policy_loss, roll_out, step_record, teaching, update, zero_spread_share)
from picochat.train.loop import model_config_for
from picochat.train.optim import make_optimizers
from picochat.train.rl_tasks import AnswerTask, CodeTask


# ----------------------------------------------------------------------------- advantages
def test_advantages_by_hand_with_and_without_std_scaling():
    assert group_advantages([1.0, 0.0, 0.0, 1.0], scale_by_std=False) == [0.5, -0.5, -0.5, 0.5]
    # std of {1, 0, 0, 1} is 0.5 (over the group): A = ±0.5 / (0.5 + ε)
    assert group_advantages([1.0, 0.0, 0.0, 1.0], scale_by_std=True) == pytest.approx([1, -1, -1, 1], abs=1e-3)
    assert group_advantages([1.0, 0.0, 0.0, 0.0], scale_by_std=False) == [0.75, -0.25, -0.25, -0.25]
    for scale in (False, True):   # all equal: no advantage, and no division by zero
        assert group_advantages([1.0, 1.0, 1.0], scale) == [0.0, 0.0, 0.0]
        assert group_advantages([0.0, 0.0], scale) == [0.0, 0.0]
    assert zero_spread_share([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0.5, 0.5, 0.25]]) == 0.5


# ----------------------------------------------------------------------------- the loss
def tiny_lora_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32,
                            max_seq_len=32))
    return apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj", "o_proj")))


def rollout(completion, advantage, truncated=False, prompt=(1, 2, 3)) -> Rollout:
    return Rollout(list(prompt), list(completion), "", truncated, reward=0.0, advantage=advantage)


def gradient_of(batch, config=GRPOConfig(micro_batch=16)) -> dict:
    model = tiny_lora_model()
    accumulate_gradient(model, batch, config)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pack_scores_only_the_completion_tokens():
    x, y, a = pack([rollout([4, 5], 0.5), rollout([6, 7, 8, 9], -0.5, prompt=(1, 2))])
    assert x.tolist() == [[1, 2, 3, 4, 0], [1, 2, 6, 7, 8]]   # prompt + completion, less the last; right-padded
    assert y.tolist() == [[-100, -100, 4, 5, -100], [-100, 6, 7, 8, 9]]
    assert a.tolist() == [0.5, -0.5]


def test_truncated_completions_carry_no_loss():
    kept = [rollout([4, 5, 6], 0.5), rollout([7, 8], -0.5)]
    alone = gradient_of(kept)
    with_cut = gradient_of(kept + [rollout([9, 9, 9, 9], -0.7, truncated=True)])
    other_cut = gradient_of(kept + [rollout([10, 11, 12, 13, 14, 15], 0.9, truncated=True)])
    not_cut = gradient_of(kept + [rollout([9, 9, 9, 9], -0.7)])
    assert alone.keys() == with_cut.keys() and alone
    for name in alone:
        torch.testing.assert_close(with_cut[name], alone[name], rtol=0, atol=0)
        torch.testing.assert_close(other_cut[name], alone[name], rtol=0, atol=0)
    assert any(not torch.allclose(not_cut[n], alone[n]) for n in alone)   # the same completion, kept, counts


class ConstantNLL(nn.Module):
    """A stand-in policy: −log π = w at every scored position."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, y, reduction="none"):
        return None, self.w * (y != -100).float()


def test_token_level_normalisation_by_hand():
    # A = +1 on a 1-token reply, A = −1 on a 3-token one; log π = −w per token; Σ|y| = 4 tokens.
    # L = −Σ_i Σ_t A_i log π / 4 = −(1·(−w)·1 + (−1)·(−w)·3) / 4 = −w/2. (Averaging per sequence first, as
    # the original GRPO does, would give 0: the long reply would weigh as much as the short one.)
    model = ConstantNLL()
    loss, kl = policy_loss(model, [rollout([5], 1.0), rollout([6, 7, 8], -1.0)], n_tokens=4)
    assert float(loss.detach()) == pytest.approx(-0.5) and kl == 0.0
    loss.backward()
    assert float(model.w.grad) == pytest.approx(-0.5)


def test_micro_batches_add_up_to_the_whole_batch():
    batch = [rollout([4, 5, 6], 0.5), rollout([7, 8], -0.5), rollout([9], 0.25), rollout([3, 3, 3, 3], -0.25)]
    whole, split = gradient_of(batch, GRPOConfig(micro_batch=4)), gradient_of(batch, GRPOConfig(micro_batch=1))
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7)


def test_the_kl_term_is_zero_at_the_start_and_positive_after_a_step():
    model = tiny_lora_model()
    batch = [rollout([4, 5, 6], 0.5), rollout([7, 8], -0.5)]
    _, kl = policy_loss(model, batch, n_tokens=5, kl_coef=0.1)
    assert kl == 0.0   # B = 0: the adapted model computes exactly the base
    config = GRPOConfig(kl_coef=0.1, lr=1e-2)
    optimizers = make_optimizers(model, TrainConfig(lr=config.lr, weight_decay=0.0), "cpu", torch.float32)
    stats = update(model, optimizers, batch, config, config.lr)
    assert stats["updated"] and stats["kl"] == 0.0
    _, kl = policy_loss(model, batch, n_tokens=5, kl_coef=0.1)
    assert kl > 0


def test_an_all_equal_batch_without_kl_is_not_a_step():
    model = tiny_lora_model()
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    optimizers = make_optimizers(model, TrainConfig(lr=1e-2, weight_decay=0.0), "cpu", torch.float32)
    stats = update(model, optimizers, [rollout([4, 5], 0.0), rollout([6], 0.0)], GRPOConfig(), 1e-2)
    assert not stats["updated"]
    for k, v in lora_state_dict(model).items():
        assert torch.equal(v, before[k])


# ----------------------------------------------------------------------------- rewards
def test_arithmetic_and_string_checkers():
    task = AnswerTask("arithmetic", "What is 37 + 48? Reply with the number only.", "85")
    for reply, reward in [("85", 1), ("37 + 48 = 85", 1), ("The answer is 85.", 1), ("**85**", 1), ("84", 0),
                          ("85 + 1 = 86", 0), ("eighty-five", 0), ("", 0)]:
        assert task.reward(reply) == reward, reply
    assert AnswerTask("arithmetic", "What is 3 - 10?", "-7").reward("3 - 10 = -7") == 1
    assert AnswerTask("arithmetic", "What is 50 × 30?", "1500").reward("1,500") == 1
    word = AnswerTask("reverse", "Reverse the letters of 'kqzt'.", "tzqk")
    for reply, reward in [("tzqk", 1), ("'tzqk'.", 1), ("Reversed: tzqk", 1), ("The letters reversed:\ntzqk", 1),
                          ('Reversed, "kqzt" is "tzqk".', 1), ("tzq k", 0), ("TZQK", 0), ("kqzt", 0),
                          ("tzqk is kqzt reversed", 0), ("", 0)]:
        assert word.reward(reply) == reward, reply


ADD_3 = CodeTask("code", "Write a Python function `add_k(x)` that returns x plus 3.", "add_k", ("1", "-5", "10"),
                 ("4", "-2", "13"), timeout=1.0)


def test_a_right_function_scores_one_and_a_wrong_one_zero():
    assert ADD_3.reward("Here it is:\n```python\ndef add_k(x):\n    return x + 3\n```\nDone.") == 1.0
    assert ADD_3.reward("```python\ndef add_k(x):\n    return x + 3\n") == 1.0   # cut before the closing fence
    assert ADD_3.reward("def add_k(x):\n    return x + 3") == 1.0               # no fence: the reply is the code
    assert ADD_3.reward("```python\ndef add_k(x):\n    return x + 2\n```") == 0.0
    assert ADD_3.reward("```python\ndef add_k(x):\n    return float(x + 3)\n```") == 0.0   # 4.0 is not 4
    assert ADD_3.reward("I cannot do that.") == 0.0


HOSTILE = {
    "exits early": "import os\nos._exit(0)",
    "raises SystemExit": "raise SystemExit(0)",
    "exits from the function": "import sys\ndef add_k(x):\n    sys.exit(0)",
    "reads a file": "def add_k(x):\n    return int(open('/etc/hostname').read()) + 3",
    "loops forever": "def add_k(x):\n    while True:\n        pass",
    "patches the harness": "import sys\nsys.modules['__main__']._execute = lambda *a: True\n",
    "patches the harness, defines it wrong": "import sys\nsys.modules['__main__']._execute = lambda *a: True\n"
                                             "def add_k(x):\n    return 0",
    "equals everything": "class A:\n    def __eq__(self, other):\n        return True\n"
                         "    def __repr__(self):\n        return '4'\ndef add_k(x):\n    return A()",
    "an int that equals everything": "class I(int):\n    def __eq__(self, other):\n        return True\n"
                                     "def add_k(x):\n    return I(0)",
    "patches builtins": "import builtins\nbuiltins.repr = lambda o: '4'\nbuiltins.type = lambda o: int\n"
                        "def add_k(x):\n    return 0",
    "kills its parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef add_k(x):\n    return x + 3",
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_completion_scores_zero(kind):
    assert ADD_3.reward(f"```python\n{HOSTILE[kind]}\n```") == 0.0


@pytest.mark.parametrize("patch", ["import sys\nsys.modules['__main__']._execute = lambda *a: True\n",
                                   "import builtins\nbuiltins.exec = lambda *a, **k: None\n",
                                   "import builtins\nbuiltins.compile = lambda *a, **k: compile('', 'x', 'exec')\n"])
def test_patching_the_harness_does_not_fool_the_sandboxs_own_pass_flag(patch):
    # the reward does not trust `passed` anyway (it compares the printed results outside the sandbox); HumanEval does
    from picochat.sandbox import run_python
    assert not run_python(patch, "assert add_k(1) == 4", timeout=2).passed


def test_generated_tasks_are_checkable_and_the_two_sets_disjoint():
    for kind in rl_tasks.TASKS:
        train, held_out = rl_tasks.task_sets(kind, 150, 40, seed=0)
        assert len(train) == 150 and len(held_out) == 40
        assert not {t.prompt for t in train} & {t.prompt for t in held_out}
        assert len({t.prompt for t in train}) == 150
    assert "humaneval" not in rl_tasks.TASKS   # HumanEval stays an evaluation
    with pytest.raises(ValueError, match="--task"):
        rl_tasks.task_sets("humaneval", 10, 10)
    for task in rl_tasks.generate_tasks("arithmetic", 50, seed=3):   # the reward accepts the right answer
        assert task.reward(task.answer) == 1.0
    rng = random.Random(1)
    task = rl_tasks.code_task(rng)
    assert task.expected and len(task.arguments) == len(task.expected)


# ----------------------------------------------------------------------------- a scripted rollout
END = 0   # the stand-in tokenizer's end-of-turn token


def scripted_generator(script):
    """A stand-in for rl_tasks.generate_all: prompt i's completions are script[i], (text, finish) pairs."""
    seen = {}

    def generate(engine, prompts, choices, max_batch):
        seen.update(prompts=prompts, choices=choices, max_batch=max_batch)
        return [[SimpleNamespace(text=text, token_ids=[7] * len(text), finish_reason=finish, stop_string=None,
                                 last_token=END if finish == "stop" else 7)
                 for text, finish in script[i]] for i in range(len(prompts))]
    return generate, seen


def test_a_scripted_rollout_gives_rewards_advantages_and_the_logged_record():
    tasks = [AnswerTask("arithmetic", "What is 1 + 1?", "2"), AnswerTask("arithmetic", "What is 2 + 2?", "4"),
             AnswerTask("arithmetic", "What is 3 + 3?", "6")]
    script = [[("2", "stop"), ("2", "stop"), ("2", "stop"), ("2", "stop")],             # all right: no spread
              [("4", "stop"), ("5", "stop"), ("44", "stop"), ("4", "length")],          # mixed
              [("7", "stop"), ("8", "stop"), ("9", "stop"), ("10 + 1 =", "length")]]    # all wrong: no spread
    generate, seen = scripted_generator(script)
    engine = SimpleNamespace(chat_prompt=lambda messages: [1, 2, 3], tokenizer=SimpleNamespace(end_of_turn_ids=[END]))
    config = GRPOConfig(group_size=4, rollout_batch=2)
    batch = roll_out(engine, tasks, config, step=5, generate=generate)
    assert seen["max_batch"] == 4 and [len(c) for c in seen["choices"]] == [4, 4, 4]
    seeds = [p.seed for c in seen["choices"] for p in c]
    assert len(set(seeds)) == 12 and all(p.temperature == config.temperature for c in seen["choices"] for p in c)
    assert [[r.reward for r in g] for g in batch.groups] == [[1, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 0]]
    assert [r.advantage for r in batch.groups[1]] == [0.5, -0.5, -0.5, 0.5]
    assert all(r.advantage == 0 for g in (batch.groups[0], batch.groups[2]) for r in g)
    assert teaching(batch.groups, with_kl=False) == batch.groups[1]   # zero-spread groups teach nothing ...
    assert len(teaching(batch.groups, with_kl=True)) == 12              # ... but for their KL term
    first, cut = batch.groups[1][0], batch.groups[1][3]
    assert first.completion_ids == [7, END] and not first.truncated   # the end-of-turn token is trained on
    assert cut.completion_ids == [7] and cut.truncated
    record = step_record(6, batch, {"loss": 0.1, "train_tokens": 30, "train_s": 2.0, "updated": True, "kl": 0.0},
                         1e-4, with_kl=False)
    assert record["step"] == 6 and record["reward"] == pytest.approx(6 / 12)
    assert record["zero_spread"] == pytest.approx(2 / 3)
    assert record["truncated"] == pytest.approx(2 / 12) and record["train_tok_s"] == 15.0
    lengths = [len(r.completion_ids) for g in batch.groups for r in g]
    assert record["length"] == pytest.approx(sum(lengths) / 12) and "kl" not in record


def test_completion_of_a_reply_that_ended_on_a_stop_string_keeps_only_its_tokens():
    gen = SimpleNamespace(text="12", token_ids=[3, 4], finish_reason="stop", stop_string="\n", last_token=9)
    assert completion_of(gen, [1], {END}).completion_ids == [3, 4]


def test_bad_settings_name_their_flag():
    for change, flag in [({"group_size": 1}, "--group"), ({"task": "humaneval"}, "--task"),
                         ({"kl_coef": 0.1, "lora_rank": 0}, "--kl"), ({"steps": 0}, "--steps")]:
        with pytest.raises(ValueError, match=flag):
            GRPOConfig(**change).validate()


# ----------------------------------------------------------------------------- end to end
def test_a_tiny_rl_run_writes_metrics_and_a_loadable_adapter(tmp_path, capsys):
    tok = Tokenizer.train(["What is 12 + 7? Reply with the number only. 19 0123456789 the cat"] * 20, vocab_size=300)
    torch.manual_seed(0)
    shape = ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64, max_seq_len=96)
    base = tmp_path / "base"
    save_hf_folder(GPT(model_config_for(tok, shape, TrainConfig())), base, tok)
    out = tmp_path / "rl"
    argv = ["rl", "-m", str(base), "--task", "arithmetic", "--steps", "2", "--prompts", "2", "--group", "3",
            "--max-tokens", "4", "--eval-prompts", "3", "--lora-rank", "2", "--kl", "0.05", "--out-dir", str(out),
            "--threads", "1"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "step 2: reward" in captured.err and "held-out mean reward (3 arithmetic tasks, greedy)" in captured.err
    adapter = captured.out.strip()
    assert adapter == str(out / "adapter") and (out / "adapter" / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 2] and "eval_reward" in records[0] and "kl" in records[1]
    assert {"reward", "zero_spread", "length", "rollout_tok_s", "train_tok_s"} <= records[1].keys()
    assert (out / "reward.png").is_file()
    tuned = load(adapter, dtype=torch.float32)
    assert tuned.model.config.n_layer == 2
    assert cli.main(argv) == 1   # the run's folder is not overwritten
    assert "already holds an RL run" in capsys.readouterr().err
