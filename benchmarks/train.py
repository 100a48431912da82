"""Training benchmark: picochat's training loop against a nanoGPT-style reference loop, on the CPU.

    python benchmarks/train.py                                  # 5 runs of 120 s each (~11-12 minutes)
    python benchmarks/train.py --budget 60 --modes eager --json out.json

The reference is a compact GPT-2 written below the way nanoGPT writes it (LayerNorm, tanh-GELU MLP,
learned positions, one fused qkv Linear, F.scaled_dot_product_attention(is_causal=True), tied head;
AdamW with weight decay on every 2-D parameter) and trained by a plain loop. picochat trains the same
GPT-2 through its own `picochat.train.loop.train()` (ModelConfig(architecture="gpt2", ...)): same n_layer,
n_embd, n_head, vocabulary, seq_len, batch, bf16 autocast, AdamW hyper-parameters, gradient clip,
time-based cosine schedule, the same TokenStream batches from the demo corpus and (by default) the
same initial weights. Each run gets the same wall-clock budget (--budget s, compile time and the
step-0 validation included, as nanoGPT's loop and train() both evaluate at step 0), in a fresh process
with an empty torch.compile cache (--warm-cache keeps the usual one), so no row inherits another's
compiled kernels or imports and the order of the rows does not matter. Rows:

    reference        eager or torch.compile'd (--modes), in --dtype (auto: what picochat picks for this CPU)
    picochat-gpt2    eager or compiled, the same mode as the reference it is compared with
    reference fp32   the reference loop plain: eager, float32 (the yardstick of the speed target)
    picochat-demo    picochat's default recipe, TRAIN_PRESETS["demo"] + PRESETS["demo"]
                     (Llama-style model, Muon + AdamW, compiled, dtype auto): what `picochat train` gives a
                     user; the target is ≥ 2× the tokens/s of the plain float32 loop

Columns:
  * step tok/s   batch_size × seq_len / the median time of one optimizer step (batch fetch, forward,
                 backward, clip, optimizer, zero_grad), over the steps after the first --skip-steps
  * MFU %        model FLOPs/s at that rate ÷ a bf16 matmul peak measured in this run (median time of
                 torch.matmul on two 2048×2048 bf16 matrices, same thread count, measured before and after
                 the runs; the higher of the two, as either may have been slowed by other work). FLOPs per token
                 (nanoGPT's estimate_mfu): 6·N + 12·n_layer·n_embd·seq_len, N = parameters except the
                 position embedding (a tied embedding counts once: it is the head's matmul)
  * 1st step s   the first step's time (when compiled: torch.compile's whole cold compilation)
  * steps, M tok what the run did within the budget; budget tok/s = tokens / elapsed budget
  * val bpb      bits per byte on the same validation batches (picochat.eval.tasks.validation_loss, the start of
                 the val split) after the budget
  * ×ref         tok/s ÷ the reference's (same compile mode; higher is faster) and bpb ÷ the reference's
                 (lower is better)
  * other        cores that other processes kept busy during the run (/proc/stat less this process and its
                 children): a row with more than ~0.1 was measured on a shared CPU. A row with more than
                 --max-other is run again (--retries times at most) once the load average is low
The bf16 matmul peak, the load average (before the runs the script waits, up to --wait-max s, for the
1-minute load average to drop below --wait-load) and the versions head the table.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# torch.compile's kernels and graphs are cached on disk between processes: a fresh cache (one per row: each
# row runs in a process of its own) makes every compile cold, what a first `picochat train` gets, and the
# numbers independent of earlier runs
if "--warm-cache" not in sys.argv:
    _CACHE = tempfile.TemporaryDirectory(prefix="picochat-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE.name

import torch
import torch.nn as nn
import torch.nn.functional as F

import picochat
from common import busy_cpu_seconds, finish_report, log
from picochat.data.tokens import TokenStream
from picochat.eval.tasks import validation_loss
from picochat.model.config import PRESETS, ModelConfig
from picochat.model.gpt import GPT
from picochat.tokenizer.bpe import Tokenizer
from picochat.train.config import TRAIN_PRESETS, TrainConfig
from picochat.train.loop import model_config_for, train


# ----------------------------------------------------------------------------- the nanoGPT-style reference
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd), CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_embd, n_head):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        for name, p in self.named_parameters():
            if p.dim() == 2:  # N(0, 0.02); residual projections scaled by 1/sqrt(2·n_layer); biases 0
                residual = name.endswith(("c_proj.weight", "mlp.2.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer) if residual else 0.02)
            elif name.endswith("bias") and "ln_" not in name:
                nn.init.zeros_(p)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                                            ignore_index=-100)
        return logits, loss

    def configure_optimizers(self, weight_decay, lr, betas):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=False)


def copy_from_picochat(ref: RefGPT, sd: dict, n_layer: int):
    """Give the reference the exact initial weights picochat's train() starts from (same seed, same GPT)."""
    out = {"wte.weight": sd["embed.weight"], "wpe.weight": sd["pos_embed.weight"],
           "ln_f.weight": sd["norm.weight"], "ln_f.bias": sd["norm.bias"]}
    for i in range(n_layer):
        p, r = f"layers.{i}.", f"h.{i}."
        for kind in ("weight", "bias"):
            out[r + "attn.c_attn." + kind] = torch.cat([sd[p + f"attn.{n}_proj.{kind}"] for n in "qkv"])
            for a, b in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm"), ("attn.c_proj", "attn.o_proj"),
                         ("mlp.0", "mlp.up_proj"), ("mlp.2", "mlp.down_proj")):
                out[r + a + "." + kind] = sd[p + b + "." + kind]
    out["lm_head.weight"] = out["wte.weight"]
    ref.load_state_dict(out, strict=True)


def resolved_dtype(dtype: str) -> str:
    """--dtype as the reference loop runs it: auto becomes what picochat chooses on this CPU."""
    if dtype != "auto":
        return dtype
    from picochat.quant.tuning import compute_dtype
    return str(compute_dtype()[0]).removeprefix("torch.")


def cosine_lr(step, elapsed, args):
    """Linear warmup over --lr-warmup steps, then cosine to min_lr_frac·lr over the time budget."""
    if step < args.lr_warmup:
        return args.lr * (step + 1) / args.lr_warmup
    progress = min(max(elapsed / args.budget, 0.0), 1.0)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def run_reference(args, mc: ModelConfig, compiled: bool, val: list, token_bytes) -> dict:
    torch.manual_seed(args.seed)
    ref = RefGPT(mc.vocab_size, mc.max_seq_len, mc.n_layer, mc.n_embd, mc.n_head)
    if args.same_init:
        torch.manual_seed(args.seed)
        copy_from_picochat(ref, GPT(mc).state_dict(), mc.n_layer)
    ref.train()
    opt = ref.configure_optimizers(args.weight_decay, args.lr, (0.9, 0.95))
    model = torch.compile(ref) if compiled else ref
    data = TokenStream(args.data_dir, "train", args.batch_size, args.seq_len)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolved_dtype(args.dtype) == "bfloat16")
    times, step, loss_f = [], 0, float("nan")
    t_start = time.perf_counter()
    val_loss_0, _ = validation_loss(ref, iter(val), token_bytes, autocast)  # nanoGPT evaluates at step 0 too
    while True:
        t0 = time.perf_counter()
        lr = cosine_lr(step, t0 - t_start, args)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = data.next_batch()
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_f = loss.item()
        step += 1
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start >= args.budget:
            break
    elapsed = time.perf_counter() - t_start
    val_loss, val_bpb = validation_loss(ref, iter(val), token_bytes, autocast)
    return dict(step_times=times, steps=step, elapsed=elapsed, loss=loss_f, val_loss=val_loss, val_bpb=val_bpb,
                val_loss_0=val_loss_0, n_params=sum(p.numel() for p in ref.parameters()),
                n_pos=ref.wpe.weight.numel())


# ----------------------------------------------------------------------------- picochat through train()
def run_picochat(args, mc: ModelConfig, tc: TrainConfig) -> dict:
    times, first = [], {}

    def on_record(r):
        if r["step"] == 0:
            first["val_loss_0"] = r.get("val_loss")
        if "tokens_per_s" in r:
            times.append(tc.batch_size * tc.seq_len / r["tokens_per_s"])
            first["elapsed"] = r["elapsed"]  # at the end of the step (result.elapsed adds the final checkpoint)

    captured = io.StringIO()  # train()'s tqdm bar (it passes disable= itself, so TQDM_DISABLE cannot stop it)
    try:
        with tempfile.TemporaryDirectory(prefix="picochat-bench-") as out, contextlib.redirect_stderr(captured):
            result = train(dataclasses.replace(tc, out_dir=out), mc, on_record=on_record)
    except BaseException:
        log(captured.getvalue()[-4000:])
        raise
    final = model_config_for(Tokenizer.from_file(Path(args.data_dir) / "tokenizer"), mc, tc)
    with torch.device("meta"):
        model = GPT(final)
    n_pos = model.pos_embed.weight.numel() if final.position == "learned" else 0
    return dict(step_times=times, steps=result.step, elapsed=first.get("elapsed", result.elapsed),
                loss=result.loss, val_loss=result.val_loss, val_bpb=result.val_bpb,
                val_loss_0=first.get("val_loss_0"), n_params=model.num_params(), n_pos=n_pos,
                model_config=dataclasses.asdict(final))


def gpt2_config(args, vocab_size) -> ModelConfig:
    return ModelConfig(architecture="gpt2", vocab_size=vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                       n_kv_head=args.n_head, n_embd=args.n_embd, intermediate_size=4 * args.n_embd,
                       max_seq_len=args.seq_len, norm="layernorm", mlp="gelu", position="learned",
                       qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True)


def quiet(tc: TrainConfig, args) -> TrainConfig:
    """Validation only at step 0 and at the end, on the same batches; no samples; one checkpoint at the end."""
    return dataclasses.replace(tc, data_dir=args.data_dir, threads=args.threads, device="cpu", seed=args.seed,
                               max_time=args.budget, eval_interval=0, eval_batches=args.eval_batches,
                               sample_interval=0, sample_tokens=0, checkpoint_interval=0, keep_last=1)


def gpt2_train_config(args, compiled: bool) -> TrainConfig:
    return quiet(TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, max_steps=0, optimizer="adamw",
                             lr=args.lr, weight_decay=args.weight_decay, beta1=0.9, beta2=0.95, grad_clip=1.0,
                             schedule="cosine", warmup_steps=args.lr_warmup, min_lr_frac=args.min_lr_frac,
                             dtype=args.dtype, compile=compiled), args)


# ----------------------------------------------------------------------------- measurements
def matmul_peak(dtype, n=2048, repeats=9) -> float:
    """FLOP/s of torch.matmul on two n×n matrices: the median of `repeats` timed runs after three warm-ups."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


class OtherCPU:
    """How many cores other processes kept busy meanwhile: all busy CPU time (/proc/stat) less this
    process's and its children's (torch.compile's compiler runs), per second of wall-clock time."""

    def __init__(self):
        self.start = self._now()

    @staticmethod
    def _now():
        busy = busy_cpu_seconds()
        if busy is None:
            return None
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float | None:
        end = self._now()
        if self.start is None or end is None:
            return None
        (w0, b0, o0), (w1, b1, o1) = self.start, end
        return max(0.0, ((b1 - b0) - (o1 - o0)) / max(w1 - w0, 1e-9))


def wait_for_quiet(threshold, max_wait):
    """Poll the 1-minute load average every 10 s until it is below threshold (or max_wait s have passed)."""
    t0 = time.time()
    while os.getloadavg()[0] >= threshold and time.time() - t0 < max_wait:
        log(f"  load average {os.getloadavg()[0]:.2f} >= {threshold}: waiting ({time.time() - t0:.0f} s)")
        time.sleep(10)
    return time.time() - t0


def summarise(name, mode, r, args, peak):
    step_tokens = args.batch_size * args.seq_len
    warm = r["step_times"][args.skip_steps:] or r["step_times"]
    tok_s = step_tokens / statistics.median(warm) if warm else float("nan")  # no step: the budget was too short
    mc = r.get("model_config") or {}
    n_layer, n_embd = mc.get("n_layer", args.n_layer), mc.get("n_embd", args.n_embd)
    flops_per_token = 6 * (r["n_params"] - r["n_pos"]) + 12 * n_layer * n_embd * args.seq_len
    return dict(system=name, compile=mode, tok_s=tok_s, mfu=flops_per_token * tok_s / peak,
                flops_per_token=flops_per_token, first_step_s=r["step_times"][0] if r["step_times"] else float("nan"),
                steps=r["steps"], tokens=r["steps"] * step_tokens, elapsed=r["elapsed"],
                budget_tok_s=r["steps"] * step_tokens / r["elapsed"], loss=r["loss"], val_loss_0=r["val_loss_0"],
                val_loss=r["val_loss"], val_bpb=r["val_bpb"], n_params=r["n_params"], load_after=os.getloadavg()[0],
                step_times=[round(t, 5) for t in r["step_times"]])


def table(rows):
    refs = {r["compile"]: r for r in rows if r["system"] == "reference"}
    plain = next((r for r in rows if r["system"] == ROWS["reference-fp32"]), None)
    head = (f"{'system':<26} {'compile':<8} {'step tok/s':>10} {'MFU %':>6} {'1st step s':>10} {'steps':>6} "
            f"{'M tok':>6} {'budget tok/s':>12} {'val bpb':>8} {'tok/s ×ref':>10} {'bpb ×ref':>9} {'other':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ref = refs.get(r["compile"]) if r["system"] not in ("reference", ROWS["reference-fp32"]) else None
        if r["system"] == ROWS["demo"] and plain:
            ref = plain
        ratio_t = f"{r['tok_s'] / ref['tok_s']:.2f}×" if ref else "—"
        ratio_b = f"{r['val_bpb'] / ref['val_bpb']:.3f}×" if ref else "—"
        other = "?" if r.get("other_cores") is None else f"{r['other_cores']:.2f}"
        lines.append(f"{r['system']:<26} {r['compile']:<8} {r['tok_s']:>10.0f} {100 * r['mfu']:>6.1f} "
                     f"{r['first_step_s']:>10.1f} {r['steps']:>6d} {r['tokens'] / 1e6:>6.2f} "
                     f"{r['budget_tok_s']:>12.0f} "
                     f"{r['val_bpb']:>8.4f} {ratio_t:>10} {ratio_b:>9} {other:>5}")
    demo = next((r for r in rows if r["system"] == ROWS["demo"]), None)
    if demo and plain:
        for measure, key in (("step", "tok_s"), ("budget (compile included)", "budget_tok_s")):
            ratio = demo[key] / plain[key]
            lines.append(f"target: picochat-demo ÷ the plain eager float32 loop, {measure} tok/s: {ratio:.2f}× "
                         f"(goal ≥ 2×: {'met' if ratio >= 2 else 'NOT met'})")
    return "\n".join(lines)


def prepare_data(data_dir):
    if (Path(data_dir) / "meta.json").is_file():
        return
    log(f"preparing the demo corpus in {data_dir} ...")
    from picochat.data.prepare import PrepareConfig, prepare
    prepare(PrepareConfig(sources=["sharegpt"], out=data_dir, max_chars=20_000_000, vocab_size=8192))


ROWS = {"reference": "reference", "picochat-gpt2": "picochat-gpt2", "demo": "picochat-demo (llama+muon)",
        "reference-fp32": "reference fp32"}


def run_row(args, kind: str, mode: str) -> dict:
    """One row, in this (fresh) process: the model, data and validation batches, then the timed run."""
    tokenizer = Tokenizer.from_file(Path(args.data_dir) / "tokenizer")
    base = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len)
    mc = model_config_for(tokenizer, gpt2_config(args, 0), base)  # the vocabulary rounded as train() does it
    if kind in ("reference", "reference-fp32"):
        if kind == "reference-fp32":
            args = argparse.Namespace(**{**vars(args), "dtype": "float32"})
        val_stream = TokenStream(args.data_dir, "val", args.batch_size, args.seq_len)
        val = [val_stream.next_batch() for _ in range(n_val_batches(val_stream, args.eval_batches))]
        tb = torch.from_numpy(tokenizer.token_byte_lengths())  # UTF-8 bytes of each token, for bits per byte
        token_bytes = torch.cat([tb, torch.zeros(mc.vocab_size - len(tb), dtype=torch.int64)])
        return run_reference(args, mc, mode == "compiled", val, token_bytes)
    if kind == "picochat-gpt2":
        return run_picochat(args, mc, gpt2_train_config(args, mode == "compiled"))
    # the demo preset's batch and sequence are the defaults; other --batch-size/--seq-len apply to it too, so
    # that every row reads the same batches and is validated on the same tokens
    demo_tc = dataclasses.replace(quiet(TRAIN_PRESETS["demo"], args), batch_size=args.batch_size,
                                  seq_len=args.seq_len)
    demo_mc = PRESETS["demo"].replace(max_seq_len=max(PRESETS["demo"].max_seq_len, args.seq_len))
    return run_picochat(args, demo_mc, demo_tc)


def n_val_batches(stream, wanted: int) -> int:
    """How many validation batches train() evaluates on: eval_batches, capped by the split's size."""
    if hasattr(stream, "n_windows"):
        return min(wanted, stream.n_windows // stream.step_windows)
    return min(wanted, stream.n_tokens // stream.step_tokens)


def run_in_subprocess(args, kind: str, mode: str) -> dict:
    """Each row runs in a process of its own (and a compile cache of its own): no row inherits another's
    compiled kernels, imports or allocator state, so the order of the rows does not matter."""
    with tempfile.TemporaryDirectory(prefix="picochat-bench-row-") as tmp:
        out = Path(tmp) / "row.json"  # the child gets the same flags (it ignores --json) and its row
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--row", f"{kind}:{mode}",
               "--row-out", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/tmp/demo-data", help="a prepared dataset (made here if missing: "
                   "`picochat data prepare sharegpt --max-chars 20M --vocab-size 8192`)")
    p.add_argument("--budget", type=float, default=120.0, help="wall-clock seconds per run")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--demo", action=argparse.BooleanOptionalAction, default=True,
                   help="also run picochat's demo recipe (TRAIN_PRESETS['demo'], compiled as the preset says)")
    p.add_argument("--target-only", action="store_true",
                   help="only the speed target's two rows: the plain float32 loop and picochat's demo recipe")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="autocast dtype of the reference and picochat-gpt2 rows (auto: picochat's choice here)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (gpt2 rows)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--lr-warmup", type=int, default=50, help="learning-rate warmup steps (gpt2 rows)")
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches (4 × 16 × 256 = the whole "
                   "val split of the demo corpus)")
    p.add_argument("--same-init", action=argparse.BooleanOptionalAction, default=True,
                   help="start the reference from picochat's initial weights")
    p.add_argument("--skip-steps", type=int, default=10, help="steps left out of the median step time")
    p.add_argument("--warm-cache", action="store_true", help="use torch.compile's usual on-disk cache (default: "
                   "a fresh one, so compile times are those of a first run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--wait-load", type=float, default=1.5, help="wait until the 1-minute load average is below this")
    p.add_argument("--wait-max", type=float, default=600.0, help="... for at most this many seconds")
    p.add_argument("--max-other", type=float, default=0.25, help="a row during which other processes kept more "
                   "than this many cores busy is run again (after waiting for a quiet machine) ...")
    p.add_argument("--retries", type=int, default=1, help="... at most this many times")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)      # KIND:MODE, in a child process
    p.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.row:  # a child: run one row, write its result, exit
        kind, mode = args.row.split(":")
        Path(args.row_out).write_text(json.dumps(run_row(args, kind, mode)))
        return
    prepare_data(args.data_dir)

    waited = wait_for_quiet(args.wait_load, args.wait_max)
    load_start = os.getloadavg()
    t_total = time.perf_counter()
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    peak = peaks["bf16"]  # MFU's denominator; raised below if the end-of-run measurement is higher

    tokenizer = Tokenizer.from_file(Path(args.data_dir) / "tokenizer")
    mc = model_config_for(tokenizer, gpt2_config(args, 0), TrainConfig())
    n_eval = n_val_batches(TokenStream(args.data_dir, "val", args.batch_size, args.seq_len), args.eval_batches)
    runs = [(kind, mode) for mode in args.modes for kind in ("reference", "picochat-gpt2")]
    if args.target_only:
        runs = []
    if args.demo or args.target_only:
        runs.append(("reference-fp32", "eager"))
        runs.append(("demo", "compiled" if TRAIN_PRESETS["demo"].compile else "eager"))
    rows, peak_log = [], [peaks["bf16"]]
    for kind, mode in runs:
        for attempt in range(args.retries + 1):
            if attempt:
                log(f"  other processes kept {r['other_cores']:.2f} cores busy: running the row again")
                wait_for_quiet(args.wait_load, args.wait_max)
            peak_log.append(matmul_peak(torch.bfloat16))  # the machine between rows: contention only lowers it
            log(f"{ROWS[kind]} ({mode}), {args.budget:.0f} s ...")
            other = OtherCPU()
            r = summarise(ROWS[kind], mode, run_in_subprocess(args, kind, mode), args, peak)
            r["other_cores"], r["attempts"] = other.cores(), attempt + 1
            log(f"  {r['steps']} steps, {r['tok_s']:.0f} tok/s (median step), first step {r['first_step_s']:.1f} s, "
                f"val loss {r['val_loss_0']:.4f} -> {r['val_loss']:.4f}, bpb {r['val_bpb']:.4f}, other processes "
                f"{r['other_cores'] or 0:.2f} cores, load {r['load_after']:.2f}")
            if r["other_cores"] is None or r["other_cores"] <= args.max_other:
                break
        rows.append(r)
    peaks_end = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    peak_log.append(peaks_end["bf16"])
    peak = max(peak_log)  # the machine's peak: the best of the measurements (other work only lowers one)
    for r in rows:
        r["mfu"] = r["flops_per_token"] * r["tok_s"] / peak
    total = time.perf_counter() - t_total
    load_end = os.getloadavg()

    demo_shape = PRESETS["demo"]
    from picochat.hw import describe
    from picochat.quant.tuning import compute_dtype
    print(f"\n{describe()} | picochat {getattr(picochat, '__version__', 'dev')} | python {platform.python_version()}")
    print(f"dtype auto here: {str(compute_dtype()[0]).removeprefix('torch.')} ({compute_dtype()[1]})")
    print(f"bf16 matmul peak (2048³, median of 9; measured {len(peak_log)} times: at start, before each row, at "
          f"end): {peak / 1e9:.1f} GFLOP/s (the highest; all: {', '.join(f'{x / 1e9:.0f}' for x in peak_log)}); "
          f"fp32 {max(peaks['fp32'], peaks_end['fp32']) / 1e9:.1f} GFLOP/s; MFU is against the bf16 peak")
    print(f"load average (1/5/15 min): start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"(waited {waited:.0f} s for < {args.wait_load}), end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    print(f"gpt2 rows: n_layer {args.n_layer}, n_embd {args.n_embd}, n_head {args.n_head}, vocab {mc.vocab_size}, "
          f"seq {args.seq_len}, batch {args.batch_size}, {resolved_dtype(args.dtype)} autocast, AdamW lr {args.lr:g} wd "
          f"{args.weight_decay:g} betas (0.9, 0.95), clip 1.0, warmup {args.lr_warmup} then cosine over the time "
          f"budget to {args.min_lr_frac:g}·lr; {'same' if args.same_init else 'own'} initial weights; "
          f"{rows[0]['n_params'] / 1e6 if rows else 0:.2f}M parameters")
    print(f"demo row: TRAIN_PRESETS['demo'] (Muon {TRAIN_PRESETS['demo'].muon_lr:g} + AdamW "
          f"{TRAIN_PRESETS['demo'].lr:g}, compile {TRAIN_PRESETS['demo'].compile}) on PRESETS['demo'] "
          f"(llama, n_layer {demo_shape.n_layer}, n_embd {demo_shape.n_embd}, SwiGLU {demo_shape.intermediate_size}), "
          f"its max_time set to the budget")
    print(f"budget {args.budget:.0f} s per run (compile and the step-0 validation inside it); val bpb on "
          f"{n_eval} × {args.batch_size} × {args.seq_len} validation tokens; step tok/s from the median step after "
          f"{args.skip_steps} warm-up steps; FLOPs/token = 6·N(no position embedding) + 12·n_layer·n_embd·seq; "
          f"other = cores other processes kept busy during the row's run (> 0.1: measured on a shared CPU; rows over "
          f"{args.max_other} were run again, up to {args.retries} time(s))\n")
    finish_report(table(rows), total, args.json,
                  dict(torch=torch.__version__, threads=torch.get_num_threads(), peaks=peaks, peaks_end=peaks_end,
                       bf16_peak=peak, bf16_peaks=peak_log, load_start=load_start, load_end=load_end, waited_s=waited,
                       total_s=total, args=vars(args), results=rows))


if __name__ == "__main__":
    main()
