"""`picochat merge`: fold a LoRA adapter into its base and save a full Hugging Face folder."""
from __future__ import annotations

HELP = "fold a LoRA adapter into its base: a full Hugging Face folder"


def add_arguments(p):
    p.add_argument("adapter", help="the adapter folder (or a LoRA run's out dir)")
    p.add_argument("-m", "--model", default=None, help="the base (default: the one adapter_config.json names)")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged model's folder")


def run(args) -> int:
    import torch

    from ..formats.hf import save_hf_folder
    from ..load import load
    loaded = load(args.model, dtype=torch.float32, adapter=args.adapter, quantized=False, fuse=False)
    save_hf_folder(loaded.model, args.out, tokenizer=loaded.tokenizer)
    print(args.out)
    return 0
