"""The training loop: one loop for pretraining and chat fine-tuning (sft.py: masked targets, LoRA).

Each optimizer step:

    (x, y) batches -> forward under bfloat16 autocast -> loss -> backward (gradient accumulation)
    -> clip the gradient norm -> AdamW (or Muon for hidden matrices) at the scheduled learning rate

and every N steps: validation loss and bits per byte, a text sample, and a checkpoint (a Hugging Face
folder plus optimizer state, step, data position and RNG states) that `--resume` continues exactly —
from the newest complete checkpoint, however the last process died (even SIGKILLed mid-save).

    picochat train --preset demo --data-dir data/demo --out-dir out/demo
    torchrun --nproc_per_node=2 -m picochat.cli train ... --distributed ddp     # or fsdp (FSDP2)

Read it top to bottom as nanochat's base_train.py: `train` checks, `set_up` builds a Run (the model, its
optimizers, the data and where the run stands), then each step is `train_step`, `evaluate_and_sample`,
`log_record` and `maybe_checkpoint`. Targets equal to -100 are ignored, and only parameters with
requires_grad are trained, so the same loop serves chat fine-tuning (masked prompts) and LoRA. What a
step minimises is its objective: the next-token loss here (NextToken), preference pairs in dpo.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..atomic import atomic_write_text
from ..data.tokens import DataError, DataWarning, SplitTooSmall, TokenStream, read_meta
from ..engine.engine import Engine
from ..engine.sampling import SamplingParams
from ..eval.tasks import validation_loss
from ..formats.hf import CheckpointError
from ..formats.runs import holds_run
from ..load import build_model
from ..model.config import ModelConfig
from ..model.gpt import GPT
from ..tokenizer.bpe import Tokenizer
from .checkpoint import (check_resumable, find_checkpoint, load_checkpoint_state, remove_leftovers,
                         save_checkpoint, set_rng_state)
from .config import TrainConfig, check_exportable, validate
from .dist import (DistInfo, all_reduce_sum, full_model_state, init_distributed, load_optimizer_state,
                   optimizer_state, wrap_model)
from .metrics import plot_losses, read_metrics
from .optim import lr_schedule, make_optimizers, training_dtype


@dataclass
class TrainResult:
    """What a run ended with. Only rank 0's copy has the metrics of the whole run."""
    out_dir: Path
    checkpoint: Path | None
    step: int
    tokens: int
    elapsed: float
    loss: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    tokens_per_s: float | None = None
    sample: str | None = None
    rank: int = 0


@dataclass
class Run:
    """A training run in progress: what set_up builds, and what every step reads or moves on."""
    config: TrainConfig
    model_config: ModelConfig
    tokenizer: Tokenizer
    info: DistInfo
    model: nn.Module                      # the model itself: its state dict, its samples
    wrapped: nn.Module                    # the model as the processes share it: DDP replicas or FSDP2 shards
    forward: Callable                     # `wrapped`, compiled if asked: what each pass calls
    optimizers: list
    autocast: torch.autocast
    train_data: object                    # a TokenStream (or the fine-tuning's stream)
    val_data: object | None               # None: a dataset without validation (or too small for any)
    n_eval: int                           # validation batches per evaluation
    token_bytes: torch.Tensor             # UTF-8 bytes of each token id, for bits per byte
    grad_accum: int
    step_tokens: int                      # tokens of one optimizer step, all processes together
    total_steps: int                      # 0: the run is bounded by time only
    result: TrainResult
    finetune: object | None = None
    objective: object = None              # NextToken() or dpo.DPO(...): the loss of a batch, validation
    step: int = 0
    tokens: int = 0
    elapsed_before: float = 0.0           # seconds of the runs this one resumes
    started: float = field(default_factory=time.perf_counter)
    last_saved: int = -1
    metrics_file: object | None = None

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def finished(self) -> bool:
        c = self.config
        by_steps = self.total_steps > 0 and self.step >= self.total_steps
        return by_steps or (c.max_time > 0 and self.elapsed() >= c.max_time)

    def due(self, interval: int, final: bool) -> bool:
        return final or (interval > 0 and self.step % interval == 0)


class NextToken:
    """The objective of pretraining and SFT: L(θ) = E[−log p_θ(y|x)] over the targets that are not -100.

    An objective is what the loop asks of a batch: weight(batch) (how many units its mean is over),
    loss(forward, model, batch) -> (mean loss, {statistic: mean tensor}), and validate(model, batches, run,
    reduce) -> the record's val_* entries (val_loss at least).
    """

    def weight(self, batch) -> int:
        return int((batch[1] != -100).sum())

    def loss(self, forward, model, batch):
        x, y = batch
        logits, loss = forward(x, y)
        if not (y != -100).any():  # nothing to learn from this pass, but every process must still run backward
            loss = logits.float().sum() * 0.0
        return loss, {}

    def validate(self, model, batches, run, reduce) -> dict:
        val_loss, val_bpb = validation_loss(model, batches, run.token_bytes, run.autocast, reduce=reduce)
        return {"val_loss": val_loss, "val_bpb": val_bpb}


# ----------------------------------------------------------------------------- the run
def train(config: TrainConfig, model_config: ModelConfig, resume=None,
          on_record: Callable[[dict], None] | None = None, stream=TokenStream, finetune=None,
          objective=None) -> TrainResult:
    """Train a model on a prepared dataset; `picochat train` is this function.

    resume: None (a new run: out_dir must not hold one), True (the newest complete checkpoint in out_dir:
    latest_checkpoint) or a checkpoint / out-dir path. on_record(record) is called on rank 0 with each step's
    metrics (the same dicts metrics.jsonl gets: step, loss, lr, tokens/s, elapsed, and val_loss, val_bpb,
    sample when those were computed). stream(data_dir, split, batch_size, seq_len, rank, world_size) gives
    the batches (TokenStream's interface: next_batch() -> (x, y) with -100 for targets to ignore,
    state_dict(), load_state_dict(), n_windows, step_windows; a `read_meta(data_dir)` attribute, if it has
    one, reads its dataset's meta.json instead of data.tokens.read_meta). finetune, for fine-tuning a
    pretrained model (sft.FineTune), gives the model instead of a random one: .model_config, .build_model(),
    and the checkpoint weights: .save_weights(folder, state_dict, tokenizer), .load_weights(folder) -> state
    dict (for LoRA: only the adapter). objective (default NextToken()): what each batch's loss is and how a
    validation scores (see NextToken for its interface). Bad input raises before anything is written.
    """
    tokenizer, model_config, ckpt = check_run(config, model_config, resume, stream, finetune)
    threads_before = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    info = init_distributed(config)
    try:
        run = set_up(config, model_config, tokenizer, ckpt, info, stream, finetune, objective or NextToken())
        return run_steps(run, on_record, resumed=ckpt is not None)
    finally:
        torch.set_num_threads(threads_before)  # a library call leaves the process as it found it
        if info.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def check_run(config: TrainConfig, model_config: ModelConfig, resume, stream, finetune):
    """Everything that can be checked before a file is written or a process group joined: (the dataset's
    tokenizer, the model config to train, the checkpoint to resume from or None)."""
    validate(config)
    data_dir, out_dir = Path(config.data_dir), Path(config.out_dir)
    getattr(stream, "read_meta", read_meta)(data_dir)
    try:
        tokenizer = Tokenizer.from_file(data_dir / "tokenizer")
    except (OSError, ValueError) as e:
        raise DataError(f"{data_dir}/tokenizer: the dataset's tokenizer does not load ({e})") from None
    if finetune is not None:  # the pretrained model's shape and vocabulary, as they are
        model_config = finetune.model_config
    else:
        model_config = model_config_for(tokenizer, model_config, config)
    check_exportable(model_config)
    if config.seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len {config.seq_len} exceeds the model's context (max_seq_len "
                         f"{model_config.max_seq_len}): raise --max-seq-len or lower --seq-len")
    ckpt = None
    if resume is not None and resume is not False:
        ckpt = find_checkpoint(None if resume is True else resume, out_dir)
        check_resumable(ckpt, model_config, config, tokenizer)
    elif holds_run(out_dir):
        raise ValueError(f"{out_dir} already holds a training run (its checkpoints and 'latest'): pass --resume "
                         f"to continue it, or choose another --out-dir")
    return tokenizer, model_config, ckpt


def model_config_for(tokenizer: Tokenizer, model_config: ModelConfig, config: TrainConfig) -> ModelConfig:
    """The model config with the vocabulary (rounded up to vocab_multiple) and special ids of the tokenizer."""
    m = config.vocab_multiple
    vocab = (tokenizer.vocab_size + m - 1) // m * m
    ends = [i for i in (tokenizer.eos_token_id, tokenizer.token_to_id("<|end|>")) if i is not None]
    eos = ends[0] if len(set(ends)) == 1 else (sorted(set(ends), key=ends.index) or None)
    return model_config.replace(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos)


def set_up(config: TrainConfig, model_config: ModelConfig, tokenizer: Tokenizer, ckpt: Path | None,
           info: DistInfo, stream, finetune=None, objective=None) -> Run:
    """The model (fresh and seeded, so every rank starts identical, or the checkpoint's), its optimizers, the
    data, and where the run stands — all restored exactly when resuming."""
    grad_accum, step_tokens, total_steps = step_sizes(config, info)
    # Each process reads its own rows of every global batch; together they read what one process would.
    train_data = stream(Path(config.data_dir), "train", config.batch_size, config.seq_len, info.rank, info.world_size)
    val_data, n_eval = validation_data(config, info, stream)
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths())
    token_bytes = torch.cat([token_bytes, torch.zeros(model_config.vocab_size - len(token_bytes),
                                                      dtype=torch.int64)]).to(info.device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model = GPT(model_config) if finetune is None else finetune.build_model()
    saved = load_checkpoint_state(ckpt, finetune) if ckpt is not None else None
    if saved is not None:
        load_weights(model, saved[0], ckpt, finetune)
        train_data.load_state_dict(saved[3]["data"])
    model.to(info.device).train()
    wrapped = wrap_model(model, info)
    dtype = training_dtype(config, info.device)
    run = Run(config, model_config, tokenizer, info, model, wrapped,
              forward=torch.compile(wrapped) if config.compile else wrapped,
              optimizers=make_optimizers(model, config, info.device.type, dtype),
              autocast=torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16),
              train_data=train_data, val_data=val_data, n_eval=n_eval, token_bytes=token_bytes,
              grad_accum=grad_accum, step_tokens=step_tokens, total_steps=total_steps,
              result=TrainResult(Path(config.out_dir), ckpt, 0, 0, 0.0, rank=info.rank), finetune=finetune,
              objective=objective or NextToken())
    if saved is not None:
        restore_optimizers(run, saved)
    open_metrics(run, resumed=ckpt is not None)
    return run


def step_sizes(config: TrainConfig, info: DistInfo) -> tuple[int, int, int]:
    """(passes per step, tokens per step, steps in the run: 0 when only a time or token budget bounds it)."""
    B, T, grad_accum = config.batch_size, config.seq_len, config.grad_accum
    if config.total_batch_tokens:
        per_pass = info.world_size * B * T
        if config.total_batch_tokens % per_pass:
            raise ValueError(f"total_batch_tokens {config.total_batch_tokens} is not a multiple of "
                             f"world_size × batch_size × seq_len = {per_pass}")
        grad_accum = config.total_batch_tokens // per_pass
    step_tokens = info.world_size * grad_accum * B * T
    total_steps = config.max_steps
    if config.max_tokens > 0:
        by_tokens = math.ceil(config.max_tokens / step_tokens)
        total_steps = min(total_steps, by_tokens) if total_steps > 0 else by_tokens
    return grad_accum, step_tokens, total_steps


def validation_data(config: TrainConfig, info: DistInfo, stream) -> tuple[object | None, int]:
    """The validation split's batches and how many of them one evaluation reads (None, 0: no validation).

    A split smaller than one batch (a small corpus, or a dataset prepared before `data prepare` topped
    validation up) is read in fewer rows, or in one shorter row per process; one too small even for that
    is left out. Either way a DataWarning says so, and training runs as long as its own split holds a step.
    """
    data_dir = Path(config.data_dir)
    if "val" not in getattr(stream, "read_meta", read_meta)(data_dir)["splits"]:
        return None, 0
    try:
        val_data = stream(data_dir, "val", config.batch_size, config.seq_len, info.rank, info.world_size)
    except SplitTooSmall as e:
        shape = smaller_batch(e.tokens, config.seq_len, info.world_size)
        if info.is_main:
            what = ("training without validation" if shape is None
                    else f"validating on batches of {shape[0]} × {shape[1]} tokens")
            warnings.warn(f"the validation split has {e.tokens:,} tokens, fewer than one batch ({info.world_size} × "
                          f"{config.batch_size} × {config.seq_len} + 1): {what}", DataWarning, stacklevel=1)
        if shape is None:
            return None, 0
        val_data = stream(data_dir, "val", *shape, info.rank, info.world_size)
    return val_data, min(config.eval_batches, val_data.n_windows // val_data.step_windows)


def smaller_batch(tokens: int, seq_len: int, world_size: int) -> tuple[int, int] | None:
    """(rows, tokens per row) for each of world_size processes that a split of `tokens` tokens fills, short of
    a whole batch: whole rows if it has one per process, else one shorter row; None if not even one
    token each to predict."""
    rows = (tokens - 1) // seq_len // world_size
    if rows >= 1:
        return rows, seq_len
    shorter = (tokens - 1) // world_size
    return (1, shorter) if shorter >= 1 else None


def load_weights(model: nn.Module, model_sd: dict, ckpt: Path, finetune):
    if finetune is None:
        model.load_state_dict(model_sd, strict=True)
        return
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # all of them, or a LoRA adapter's
    if set(model_sd) != trainable:
        raise CheckpointError(f"{ckpt}: its weights do not match this run's trainable parameters "
                              f"(a different --lora-rank or target modules?)")
    model.load_state_dict(model_sd, strict=False)


def restore_optimizers(run: Run, saved: tuple):
    """The checkpoint's optimizer state, step, tokens, time and random generators (after the optimizers exist)."""
    _, osd, rng, state = saved
    load_optimizer_state(run.model, run.optimizers, osd)
    for opt in run.optimizers:  # the peak learning rates are this run's (they may be changed on resume)
        for group in opt.param_groups:
            group["base_lr"] = run.config.muon_lr if isinstance(opt, torch.optim.Muon) else run.config.lr
    set_rng_state(rng, state["rng"])
    run.step, run.tokens, run.elapsed_before = state["step"], state["tokens"], state["elapsed"]
    run.last_saved = run.step
    run.result.step, run.result.tokens, run.result.elapsed = run.step, run.tokens, run.elapsed_before


def open_metrics(run: Run, resumed: bool):
    """metrics.jsonl, open for appending (rank 0 only). Resuming drops the records of steps after the
    checkpoint (a crashed tail) and what a killed process left half-written."""
    if not run.info.is_main:
        return
    out_dir = Path(run.config.out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir)
    kept = [r for r in read_metrics(metrics_path) if r["step"] <= run.step] if resumed else []
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    run.metrics_file = open(metrics_path, "a")
    result = run.result
    for r in kept:  # a run resumed at its end (killed after its last save) has these
        result.loss = r.get("loss", result.loss)
        result.val_loss, result.val_bpb = r.get("val_loss", result.val_loss), r.get("val_bpb", result.val_bpb)


def run_steps(run: Run, on_record, resumed: bool) -> TrainResult:
    """Step until a budget runs out, evaluating, sampling and saving when due; then the loss curve."""
    from tqdm import tqdm
    pbar = tqdm(total=run.total_steps or None, initial=run.step, unit="step", dynamic_ncols=True,
                disable=not run.info.is_main, desc="train")
    run.started = time.perf_counter()
    try:
        if not resumed:  # the validation loss of the untrained model: the curve's start
            record = {}
            evaluate_and_sample(run, record, final=False)
            log_record(run, record, on_record)
        final = run.finished()  # already, when resuming a run that had finished
        while not final:
            record = train_step(run)
            final = run.finished()
            evaluate_and_sample(run, record, final)
            log_record(run, record, on_record)
            maybe_checkpoint(run, final)
            pbar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
            pbar.update(1)
    finally:
        pbar.close()
        if run.metrics_file is not None:
            run.metrics_file.close()
    if run.info.is_main:
        plot_losses(Path(run.config.out_dir) / "metrics.jsonl", Path(run.config.out_dir) / "loss.png")
    run.result.step, run.result.tokens, run.result.elapsed = run.step, run.tokens, run.elapsed()
    return run.result


# ----------------------------------------------------------------------------- one step
def train_step(run: Run) -> dict:
    """One optimizer step at the scheduled learning rate; its record for metrics.jsonl."""
    config, t0 = run.config, time.perf_counter()
    lr_factor = lr_schedule(run.step, run.total_steps, config, run.elapsed())
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor
    batches = [run.train_data.next_batch() for _ in range(run.grad_accum)]
    stats = accumulate_gradients(run, batches)
    loss = stats.pop("loss")
    grad_norm = None
    if config.grad_clip > 0:
        norm = nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], config.grad_clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    for opt in run.optimizers:
        opt.step()
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens += run.step_tokens
    dt = time.perf_counter() - t0
    if not math.isfinite(loss):
        raise RuntimeError(f"the loss became {loss} at step {run.step}: lower --lr or check the data")
    run.result.loss, run.result.tokens_per_s = loss, run.step_tokens / dt
    record = {"loss": loss, **stats, "lr": lr_factor * config.lr, "grad_norm": grad_norm, "tokens": run.tokens,
              "tokens_per_s": run.step_tokens / dt, "elapsed": run.elapsed()}
    if config.optimizer == "muon":
        record["muon_lr"] = lr_factor * config.muon_lr
    return record


def accumulate_gradients(run: Run, batches: list) -> dict:
    """Forward and backward over one step's passes; returns the step's loss and the objective's statistics.

    The gradient is that of the mean loss over every unit the objective counts (valid targets, pairs) of
    the global batch, wherever they fall among passes and processes: each pass's mean loss is weighted by
    its share of the units. The gradient all-reduce is held back until the last pass.
    """
    info, objective = run.info, run.objective
    counts = [objective.weight(batch) for batch in batches]
    n_valid = int(all_reduce_sum(torch.tensor([sum(counts)], dtype=torch.float64, device=info.device), info).item())
    sums = {}
    for i, (batch, n) in enumerate(zip(batches, counts)):
        batch = tuple(t.to(info.device, non_blocking=True) for t in batch)
        with sync_gradients(run, i == len(batches) - 1):
            with run.autocast:
                loss, stats = objective.loss(run.forward, run.model, batch)
            # DDP and FSDP average gradients over processes: scaling by world_size makes that a sum
            (loss * (n * info.world_size / max(n_valid, 1))).backward()
        for name, value in {"loss": loss.detach(), **stats}.items():
            sums[name] = sums.get(name, 0.0) + value.double() * n
    totals = all_reduce_sum(torch.stack(list(sums.values())), info) / max(n_valid, 1)
    return dict(zip(sums, totals.tolist()))


def sync_gradients(run: Run, last: bool):
    """A context for one pass of gradient accumulation: processes all-reduce gradients on the last pass only."""
    if run.info.mode == "ddp" and not last:
        return run.wrapped.no_sync()
    if run.info.mode == "fsdp":
        run.model.set_requires_gradient_sync(last)
    return nullcontext()


# ----------------------------------------------------------------------------- every N steps
def evaluate_and_sample(run: Run, record: dict, final: bool):
    """Validation loss and bits per byte (at the start too), and a text sample, when due: into `record`."""
    config, result = run.config, run.result
    if run.val_data is not None and (run.step == 0 or run.due(config.eval_interval, final)):
        run.val_data.load_state_dict({"position": 0, "epoch": 0})  # the same validation data every time
        record.update(run.objective.validate(run.model, [run.val_data.next_batch() for _ in range(run.n_eval)],
                                             run, reduce=lambda totals: all_reduce_sum(totals, run.info)))
        result.val_loss, result.val_bpb = record["val_loss"], record.get("val_bpb")
    if run.step > 0 and run.due(config.sample_interval, final) and config.sample_tokens > 0:
        sampler = sampling_model(run)
        if run.info.is_main:
            record["sample"] = result.sample = sample_text(sampler, run.tokenizer, config)


def sampling_model(run: Run) -> GPT | None:
    """A model rank 0 can generate from alone: the model itself, or a CPU copy of the gathered weights."""
    info = run.info
    if info.mode != "fsdp" and info.device.type == "cpu":
        return run.model if info.is_main else None
    sd = full_model_state(run.model, info)  # collective under FSDP2
    if not info.is_main:
        return None
    return build_model(run.model_config, {k: v.detach().cpu() for k, v in sd.items()}, torch.float32, "training")


def sample_text(model: GPT, tokenizer: Tokenizer, config: TrainConfig) -> str:
    """The sample prompt and what the model writes after it (through the Engine, on the CPU)."""
    ids = tokenizer.encode(config.sample_prompt, add_special_tokens=True)
    params = SamplingParams(max_new_tokens=config.sample_tokens, temperature=config.sample_temperature,
                            top_k=50 if config.sample_temperature > 0 else 0, seed=config.seed)
    gen = Engine(model, tokenizer).complete(ids, params)  # its own seeded generator: training RNG untouched
    model.train()
    return config.sample_prompt + gen.text


def log_record(run: Run, record: dict, on_record):
    """The step's record into metrics.jsonl (flushed) and to the caller's on_record (rank 0)."""
    if run.info.is_main and record:
        run.metrics_file.write(json.dumps({"step": run.step, **record}) + "\n")
        run.metrics_file.flush()
        if on_record is not None:
            on_record({"step": run.step, **record})


def maybe_checkpoint(run: Run, final: bool):
    """A checkpoint when due (and not already saved at this step); every rank takes part in gathering it."""
    config, info = run.config, run.info
    if run.step == 0 or run.step == run.last_saved or not run.due(config.checkpoint_interval, final):
        return
    if info.is_main:  # the checkpoint's metrics are on disk before it is: a resume keeps them
        os.fsync(run.metrics_file.fileno())
    model_sd = full_model_state(run.model, info)
    osd = optimizer_state(run.model, run.optimizers)
    if info.is_main:
        state = {"step": run.step, "tokens": run.tokens, "elapsed": run.elapsed(),
                 "data": run.train_data.state_dict(), "world_size": info.world_size,
                 "train_config": dataclasses.asdict(config), "model_config": dataclasses.asdict(run.model_config)}
        run.result.checkpoint = save_checkpoint(Path(config.out_dir), run.step, model_sd, run.model_config,
                                                run.tokenizer, osd, state, config.keep_last, run.finetune)
    run.last_saved = run.step
    if info.world_size > 1:
        dist.barrier()
