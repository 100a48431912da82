"""`picochat tune --from-feedback | --rollback`: learn from the chat page's feedback, behind a gate (apps/tuning.py)."""
from __future__ import annotations

import sys

from .sft import lora_config

HELP = "train an adapter on the users' feedback; serve it only if an evaluation approves it (or roll back)"
DESCRIPTION = ("--from-feedback: DPO pairs (edited reply over the original, up over down) and SFT examples from "
               "the feedback store train a LoRA adapter, which is measured beside the model served now on held-out "
               "feedback pairs and fixed tasks. Approved (exit 0), it is served: a running `picochat serve` of the "
               "same -m swaps it in for new requests. Refused (exit 2), the model served now stays. --rollback "
               "serves what was served before.")


def add_arguments(p):
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--from-feedback", action="store_true", help="tune on the stored feedback, gate, serve")
    what.add_argument("--rollback", action="store_true", help="serve the adapter served before (or the base)")
    p.add_argument("-m", "--model", default=None, help="the served base model (default: the default model)")
    p.add_argument("--db", default=None, metavar="PATH", help="the feedback file (default: picochat's)")
    p.add_argument("--sft-steps", type=int, default=40, help="steps of SFT on edited and up-rated replies")
    p.add_argument("--dpo-steps", type=int, default=60, help="steps of DPO on the pairs")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1, help="DPO's β (default 0.1)")
    p.add_argument("--sft-weight", type=float, default=1.0, help="the chosen reply's SFT loss added to DPO's "
                                                                  "(RPO's α, default 1.0)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--held-out", type=float, default=0.2, help="share of conversations kept for the gate")
    p.add_argument("--lora-rank", type=int, default=16, metavar="R")
    p.add_argument("--lora-alpha", type=float, default=None, help="default 2 × rank")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", metavar="NAMES")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    gate = p.add_argument_group("the gate")
    gate.add_argument("--gate-text", default="sharegpt", metavar="SOURCE",
                      help="held-out text for bits per byte: a file, folder or named corpus (default sharegpt; "
                           "'none' skips it)")
    gate.add_argument("--gate-chars", type=int, default=20_000, help="characters of it (default 20K)")
    gate.add_argument("--gate-mc", default=None, metavar="FILE",
                      help="a multiple-choice JSONL (as picochat eval --task mc reads)")
    gate.add_argument("--gate-mc-limit", type=int, default=None, metavar="N")
    gate.add_argument("--gate-gen", default=None, metavar="FILE",
                      help="a generation JSONL (prompt, references), scored by 'contains' (e.g. shop questions)")
    gate.add_argument("--max-bpb-rise", type=float, default=0.02, help="relative (default 0.02: +2 %%)")
    gate.add_argument("--max-drop", type=float, default=0.02,
                      help="of multiple-choice and generation scores, absolute (default 0.02: 2 points)")


def settings_from(args):
    from ..apps.tuning import TuneSettings
    from ..eval.gate import GateSettings
    args.lora_dropout = 0.0
    gate = GateSettings(bpb_data=None if args.gate_text == "none" else args.gate_text, bpb_chars=args.gate_chars,
                        mc=args.gate_mc, mc_limit=args.gate_mc_limit, gen=args.gate_gen,
                        max_bpb_rise=args.max_bpb_rise, max_drop=args.max_drop)
    return TuneSettings(model=args.model, lora=lora_config(args), sft_steps=args.sft_steps, dpo_steps=args.dpo_steps,
                        lr=args.lr, beta=args.beta, sft_weight=args.sft_weight, batch_size=args.batch_size,
                        seq_len=args.seq_len, held_out=args.held_out, seed=args.seed, threads=args.threads, gate=gate)


def run(args) -> int:
    from ..apps import tuned
    if args.rollback:
        now = tuned.rollback(args.model)
        print(f"now serving {tuned.model_key(args.model)} with "
              f"{tuned.adapter_id(args.model, now) or 'no adapter (the base model)'}")
        return 0
    from ..apps.tuning import tune_from_feedback
    from ..data.feedback import FeedbackStore
    if args.lora_rank < 1:
        raise ValueError("--lora-rank must be at least 1: feedback tunes an adapter, never the base's weights")
    outcome = tune_from_feedback(settings_from(args), FeedbackStore(args.db).entries())
    counts = outcome.counts
    print(f"{counts['feedback']} ratings -> {counts['pairs']} pairs and {counts['sft_examples']} SFT examples "
          f"trained on, {counts['held_out_pairs']} pairs held out for the gate", file=sys.stderr)
    print(outcome.report.to_markdown())
    print(f"gate report: {outcome.run / 'gate.md'} and gate.json; adapter: {outcome.adapter}", file=sys.stderr)
    return 0 if outcome.approved else 2
