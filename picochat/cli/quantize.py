"""`picochat quantize`: a model's weights to 8 or 4 bits, as a packed folder that loads by memory map —
with what it costs measured: bits per byte on held-out text, before and after."""
from __future__ import annotations

import sys
import time

from .common import count

HELP = "quantize a model's weights to 8 or 4 bits (a packed folder picochat loads)"
DESCRIPTION = ("Quantize every projection to --to bits (groups of --group inputs; the embedding and output head to "
               "8 bits), fuse q/k/v and gate/up, and write a packed folder that loads by memory map. The quality "
               "cost is measured: bits per byte on held-out text, before and after.")


def add_arguments(p):
    p.add_argument("model", help="a Hugging Face folder, training run, .gguf file or packaged name")
    p.add_argument("--to", required=True, choices=["int8", "int4"])
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--group", type=int, default=32, choices=[16, 32, 64], help="inputs per scale (default 32)")
    p.add_argument("--eval", default="sharegpt", metavar="SOURCE",
                   help="held-out text to measure bits per byte on: a file, folder or named source (default sharegpt)")
    p.add_argument("--eval-chars", type=count, default=40_000, metavar="N", help="characters of it (default 40K)")
    p.add_argument("--eval-tokens", type=count, default=None, metavar="N", help="score at most N tokens")
    p.add_argument("--no-eval", action="store_true", help="skip the quality measurement")


def run(args) -> int:
    import torch

    from ..eval.tasks import bits_per_byte, held_out_text
    from ..formats.packed import save_packed
    from ..load import fuse_projections, load
    from ..quant.layers import quantize_model
    t0 = time.perf_counter()
    loaded = load(args.model, dtype=torch.float32, quantized=False, fuse=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    float_bytes = unique_bytes(model)
    text = None if args.no_eval else held_out_text(args.eval, args.eval_chars)
    before = bits_per_byte(model, tokenizer, text, max_tokens=args.eval_tokens) if text is not None else None
    quantize_model(model, {"int8": 8, "int4": 4}[args.to], args.group)
    fuse_projections(model).use_cpu_kernels()  # as a loaded packed model generates
    extra = {"source": str(loaded.path), "quantized_to": args.to, "group": args.group}
    lines = [] if before is None else measure_after(model, tokenizer, text, before, args, extra)
    out = save_packed(model, tokenizer, args.out, loaded.generation_config, extra)
    print(f"quantized {loaded.path} to {args.to} (groups of {args.group}) in {time.perf_counter() - t0:.1f} s: "
          f"{float_bytes / 1e6:.0f} MB of float32 weights -> {unique_bytes(model) / 1e6:.0f} MB", file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr)
    print(out)
    return 0


def measure_after(model, tokenizer, text: str, before, args, extra: dict) -> list[str]:
    """Bits per byte of the quantized model as decoding runs it (the integer kernel) and, where this CPU
    expands the weights for long prompts, as prompts run; into extra["eval"], and as lines to print."""
    from ..eval.tasks import bits_per_byte
    from ..quant.layers import integer_kernel_only
    from ..quant.tuning import dense_rows
    with integer_kernel_only(model):  # what decoding computes: 8-bit activations
        after = bits_per_byte(model, tokenizer, text, max_tokens=args.eval_tokens)
    extra["eval"] = {"text": args.eval, "tokens": after.tokens, "float32_bits_per_byte": before.bits_per_byte,
                     "bits_per_byte": after.bits_per_byte}
    lines = [f"bits per byte on {after.tokens:,} held-out tokens of {args.eval}: float32 "
             f"{before.bits_per_byte:.4f}, {args.to} {after.bits_per_byte:.4f} "
             f"({100 * (after.bits_per_byte / before.bits_per_byte - 1):+.2f}%) on the integer kernel "
             f"(as decoding runs)"]
    rows, dtype = dense_rows()
    if rows is not None:  # prompts of many tokens take the dense path on this CPU
        dense = bits_per_byte(model, tokenizer, text, max_tokens=args.eval_tokens)
        extra["eval"]["prompt_path_bits_per_byte"] = dense.bits_per_byte
        lines.append(f"  and {dense.bits_per_byte:.4f} ({100 * (dense.bits_per_byte / before.bits_per_byte - 1):+.2f}%) "
                     f"as prompts of {rows}+ tokens run here (weights expanded to "
                     f"{str(dtype).removeprefix('torch.')})")
    return lines


def unique_bytes(model) -> int:
    """Bytes of a model's tensors, each shared storage (a tied head) counted once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total
