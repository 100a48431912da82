"""Chat fine-tuning (SFT): teach a pretrained model to answer in its chat format, with the loss on the
assistant's words only — on the one training loop (loop.py), with the conversations of data/conversations.py.

    picochat sft -m out/demo --data chats.jsonl --out-dir out/demo-sft
    picochat sft -m smollm2 --data faq.jsonl --out-dir out/faq --lora-rank 8     # a PEFT-format adapter

Full fine-tuning checkpoints are Hugging Face folders; LoRA checkpoints are PEFT adapter folders
(adapter_config.json + adapter_model.safetensors) that `picochat chat -m DIR` loads with their base.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.conversations import LoadStats, SFTStream, load_conversations, prepare_sft
from ..formats.hf import load_hf_folder, save_hf_folder
from ..formats.peft import load_adapter_weights, read_adapter, write_adapter
from ..hub import DEFAULT_MODEL
from ..load import build_model, load
from ..model.config import ModelConfig
from ..model.gpt import GPT
from ..model.lora import LoRAConfig, apply_lora
from ..tokenizer.bpe import Tokenizer
from .config import TrainConfig
from .loop import train
from ..formats.runs import holds_run


@dataclass
class FineTune:
    """What train.train needs to fine-tune a pretrained model (full or LoRA) instead of training from scratch."""
    model_config: ModelConfig
    base_state: dict                      # the base model's weights (picochat names, float32)
    base_name: str                        # how the base was given (-m), recorded in adapters
    lora: LoRAConfig | None = None
    start: dict | None = None             # LoRA weights to begin from (an SFT adapter that DPO goes on with)

    def build_model(self) -> GPT:
        model = build_model(self.model_config, {k: v.clone() for k, v in self.base_state.items()},
                            torch.float32, self.base_name)
        if self.lora is not None:
            apply_lora(model, self.lora)
        if self.start is not None:
            load_adapter_weights(model, self.start, "the adapter to start from")
        return model

    def save_weights(self, folder, state_dict: dict, tokenizer: Tokenizer):
        folder = Path(folder)
        if self.lora is None:
            with torch.device("meta"):
                holder = GPT(self.model_config)
            holder.load_state_dict(state_dict, strict=True, assign=True)
            save_hf_folder(holder, folder, tokenizer=tokenizer)
            return
        write_adapter(folder, self.lora, self.model_config, state_dict, self.base_name)
        # config.json (the base's) and the tokenizer: for resuming, and for reading the run without the base
        (folder / "config.json").write_text(json.dumps(self.model_config.to_hf("float32"), indent=2))
        tokenizer.save(folder)

    def load_weights(self, folder) -> dict:
        if self.lora is None:
            return load_hf_folder(folder)[1]
        return read_adapter(folder, self.model_config)[1]


# ----------------------------------------------------------------------------- the entry point
def sft_defaults(lora: bool):
    """Training settings for chat fine-tuning (flags override them)."""
    return TrainConfig(batch_size=8, seq_len=512, max_steps=300, lr=2e-3 if lora else 3e-4, weight_decay=0.0,
                       warmup_steps=20, schedule="cosine", min_lr_frac=0.1, eval_interval=50, eval_batches=8,
                       sample_interval=100, sample_tokens=48, checkpoint_interval=100, keep_last=2,
                       sample_prompt="")  # "": a chat prompt rendered with the model's template


def sft(base: str, data, config, lora: LoRAConfig | None = None, packing: str = "pack",
        val_fraction: float = 0.05, skip_malformed: bool = False, max_conversations: int = 0, resume=None,
        on_record: Callable[[dict], None] | None = None, stats: LoadStats | None = None):
    """Fine-tune the model `base` (-m argument) on conversations; `picochat sft` is this function.

    config: a train.TrainConfig (out_dir, batch, schedule, dtype, ...); its data_dir is set to
    out_dir/data, where the encoded conversations are written (and reused by a resumed run).
    Returns train.TrainResult.
    """
    loaded, config, finetune = start_finetune(base, config, lora, resume)
    if needs_data(config, resume):
        conversations = load_conversations(data, skip_malformed, max_conversations, stats)
        prepare_sft(conversations, loaded.tokenizer, config.data_dir, val_fraction, packing, config.seed,
                    [data] if isinstance(data, str) else list(data))
    del loaded
    return train(config, finetune.model_config, resume=resume, on_record=on_record, stream=SFTStream,
                 finetune=finetune)


def start_finetune(base: str, config, lora: LoRAConfig | None, resume):
    """What every fine-tuning (SFT, DPO) does first: check the run, load the base as float weights to train.
    Returns (the loaded base, config with data_dir = out_dir/data and a chat sample prompt, FineTune)."""
    if lora is not None:
        lora.validate()
    out_dir = Path(config.out_dir)
    if resume in (None, False) and holds_run(out_dir):  # refused before its data/ is rewritten
        raise ValueError(f"{out_dir} already holds a training run (its checkpoints and 'latest'): pass --resume "
                         f"to continue it, or choose another --out-dir")
    loaded = load(base, dtype=torch.float32, quantized=False, fuse=False, draft=None)  # float weights to train
    model_config = loaded.model.config
    if lora is not None and model_config.architecture == "gpt2":
        raise ValueError("LoRA fine-tuning of GPT-2 models is not supported (PEFT adapters need Hugging Face's "
                         "separate q/k/v projections, which GPT-2 fuses): fine-tune it fully (no --lora-rank)")
    if loaded.tokenizer.chat_template is None:
        raise ValueError(f"{base}: the model's tokenizer has no chat template to render conversations with")
    # the adapter names its base: the exact checkpoint (a run folder's `latest` may move on), or a packaged name
    base_name = str(loaded.path.resolve()) if base is not None and Path(base).exists() else (base or DEFAULT_MODEL)
    messages = [{"role": "user", "content": "Hello! What can you do?"}]
    config = dataclasses.replace(config, data_dir=str(out_dir / "data"), seq_len=min(config.seq_len,
                                                                                     model_config.max_seq_len),
                                 sample_prompt=config.sample_prompt or loaded.tokenizer.apply_chat_template(messages))
    return loaded, config, FineTune(model_config, loaded.model.state_dict(), base_name, lora)


def needs_data(config, resume) -> bool:
    """A new run prepares its data folder; a resumed one reuses it when it is there."""
    return not (resume not in (None, False) and (Path(config.data_dir) / "meta.json").is_file())
