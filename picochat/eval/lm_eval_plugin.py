"""picochat as a model of EleutherAI's lm-evaluation-harness: `lm_eval --model picochat --model_args pretrained=M`.

lm-eval asks its three questions as Instance objects (loglikelihood: (context, continuation); loglikelihood_rolling:
(text,); generate_until: (context, generation settings)). PicochatLM unpacks them and answers with
backends.LocalModel on picochat's Engine, so the harness scores exactly what `picochat eval` scores.

model_args: pretrained (a HF folder, a .gguf file or a packaged name; default qwen2.5-coder-1.5b), batch_size (sequences
decoded together by generate_until), dtype (auto | float32 | bfloat16), max_gen_toks (default 256), seed (of
sampled generations).

How lm-eval finds it. pyproject.toml declares the entry point `picochat` in the group "lm_eval.models", the group
lm-eval's plugin discovery reads (EleutherAI/lm-evaluation-harness PR #4013): with such an lm-eval, `lm_eval
--model picochat` works once picochat is installed. lm-eval up to 0.4.13 reads no entry points, so there use

    python -m picochat.eval.lm_eval_plugin --model picochat --model_args pretrained=smollm2 --tasks ...

(lm-eval's own command line, run after registering the installed entry points), or `import picochat.eval.lm_eval_plugin`
before `lm_eval.simple_evaluate(model="picochat", ...)`.
"""
from __future__ import annotations

import contextlib
import sys
from importlib import metadata

from lm_eval.api.model import LM
from tqdm import tqdm

from .. import __version__
from ..backends import LocalModel
from ..engine.engine import Engine
from ..engine.sampling import SamplingParams
from ..hub import DEFAULT_MODEL
from ..load import load

ENTRY_POINT_GROUP = "lm_eval.models"
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm-eval's aliases


class PicochatLM(LM):
    """A picochat model, loaded by picochat.load.load, as an lm-eval model. It runs on the CPU: `device` is
    accepted and ignored (lm-eval's command line passes "cuda:0" unless told otherwise)."""

    def __init__(self, pretrained: str = DEFAULT_MODEL, batch_size: int | str = 8, dtype: str = "auto",
                 max_gen_toks: int = 256, seed: int = 1234, device: str | None = None,
                 max_batch_size: int | None = None):
        super().__init__()
        self.loaded = load(str(pretrained), dtype=dtype)
        engine = Engine(self.loaded.model, self.loaded.tokenizer, draft=self.loaded.draft)
        self.local = LocalModel(engine, name=str(pretrained), batch_size=_batch_size(batch_size, max_batch_size))
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is it the greedy continuation?) for each request."""
        return self._answer("loglikelihood", [tuple(r.args) for r in requests], self.local.loglikelihood,
                            disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each request's whole text, from BOS."""
        texts = [r.args[0] for r in requests]
        return self._answer("loglikelihood_rolling", texts, self.local.loglikelihood_rolling, disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, cut before its first stop string. Requests that share generation
        settings decode together in one batch."""
        groups: dict[str, tuple[SamplingParams, list[int]]] = {}
        for i, request in enumerate(requests):
            params = sampling_params(request.args[1], self.max_gen_toks, self.seed)
            groups.setdefault(repr(params), (params, []))[1].append(i)
        out: list[str] = [""] * len(requests)
        with self._progress("generate_until", len(requests), disable_tqdm):
            for params, indices in groups.values():
                texts = self.local.generate([requests[i].args[0] for i in indices], params)
                for i, (text,) in zip(indices, texts):
                    out[i] = cut_at_stops(text, params.stop)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def get_model_info(self) -> dict:
        """What lm-eval records in its results' config: which model, in what form."""
        return {"picochat_version": __version__, "model_path": str(self.loaded.path), "model_format":
                self.loaded.format, "model_weights": self.loaded.weights,
                "model_dtype": str(self.loaded.dtype).removeprefix("torch.")}

    def _answer(self, kind: str, items: list, answer, disable_tqdm: bool) -> list:
        """answer(items), each result also given to lm-eval's request cache (keyed by the request's args)."""
        with self._progress(kind, len(items), disable_tqdm):
            results = answer(items)
        for item, result in zip(items, results):
            self.cache_hook.add_partial(kind, item if isinstance(item, tuple) else (item,), result)
        return results

    @contextlib.contextmanager
    def _progress(self, kind: str, total: int, disable: bool):
        """A progress bar that LocalModel advances as it answers, as lm-eval's own models show one."""
        with tqdm(total=total, desc=f"picochat {kind}", disable=disable) as bar:
            self.local.progress = bar.update
            try:
                yield
            finally:
                self.local.progress = None


def _batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
    """lm-eval's batch_size: a number, or "auto"/"auto:N", which here means max_batch_size or 8 (the Batcher
    holds one KV cache per sequence, so there is no memory limit to probe for)."""
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return int(max_batch_size or 8)
    size = int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    return size


def sampling_params(gen_kwargs: dict, max_gen_toks: int, seed: int) -> SamplingParams:
    """picochat's SamplingParams for lm-eval's generation settings, read as lm-eval's HF model reads them:
    until (stop strings), max_gen_toks (or an alias), do_sample and temperature (greedy unless do_sample, or a
    temperature above 0 without do_sample; do_sample alone samples at temperature 1), top_p, top_k,
    repetition_penalty. Any other setting raises, rather than being silently ignored."""
    kwargs = {k: v for k, v in dict(gen_kwargs).items() if v is not None}
    until = kwargs.pop("until", [])
    stop = [s for s in ([until] if isinstance(until, str) else until) if s]  # '' is no stop (lm-eval skips it)
    sizes = [kwargs.pop(k) for k in MAX_TOKEN_KEYS if k in kwargs]
    do_sample = kwargs.pop("do_sample", None)
    temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
    params = SamplingParams(max_new_tokens=int(sizes[0]) if sizes else max_gen_toks,
                            temperature=0.0 if do_sample is False else temperature,
                            top_p=float(kwargs.pop("top_p", 1.0)), top_k=int(kwargs.pop("top_k", 0)),
                            repetition_penalty=float(kwargs.pop("repetition_penalty", 1.0)), seed=seed, stop=stop)
    if kwargs.pop("num_beams", 1) != 1:
        raise ValueError("picochat does not do beam search (num_beams must be 1)")
    if kwargs:
        raise ValueError(f"picochat does not support the generation settings {sorted(kwargs)}")
    params.validate()
    return params


def cut_at_stops(text: str, stops: list[str]) -> str:
    """text before the first occurrence of any stop string."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text


def register() -> list[str]:
    """Add the installed `lm_eval.models` entry points (picochat's among them) to lm-eval's model registry as
    lazy placeholders, keeping names already taken. An lm-eval that reads entry points itself does it with its
    own load_plugins; 0.4.x reads none. Returns the names added."""
    import lm_eval.models  # noqa: F401  lm-eval's own models first: get_model imports them only into an empty registry
    from lm_eval.api import registry
    if hasattr(registry, "load_plugins"):
        return registry.load_plugins(ENTRY_POINT_GROUP, registry.model_registry)
    added = []
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name not in registry.model_registry:
            registry.model_registry.register(entry_point.name, target=entry_point)
            added.append(entry_point.name)
    return added


def main() -> None:
    """`python -m picochat.eval.lm_eval_plugin ARGS`: lm-eval's command line (`lm_eval ARGS`) with the installed model
    plugins registered."""
    from lm_eval.__main__ import cli_evaluate
    sys.argv[0] = "lm_eval"   # the name its help and usage lines show
    cli_evaluate()


register()   # importing the plugin makes the installed "picochat" a model name, as @register_model would

if __name__ == "__main__":
    main()
