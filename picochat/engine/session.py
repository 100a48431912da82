"""A multi-turn chat over an Engine, built so that each turn computes only its own new tokens; with tools,
the replies' calls and their results are part of the conversation too."""
from __future__ import annotations

import dataclasses

from .engine import Engine
from .generation import Generation
from .sampling import SamplingParams
from .tool_parser import ToolCall, parse_reply
from .tools import ToolUse, chat_messages, output_grammar, template_has_tools


class ChatSession:
    """A multi-turn chat with an Engine, built so each turn computes only its new tokens.

    The next prompt is the previous prompt's tokens, the reply's own tokens, then the tokens of the text
    the chat template adds after them (end of turn, the new user message or tool results, the generation
    prompt), so the Engine finds all of the earlier conversation in its cache. Where the template does not
    extend its previous rendering (or old turns were dropped to fit the context), the prompt is tokenized
    afresh and the cache is reused up to the first difference. Renderings are Tokenizer.render_chat's
    (special-token strings in messages escaped), so message text is tokenized as text, as in
    Engine.chat_prompt.

    With `tools`, the template shows them to the model (tools.chat_messages) and each reply keeps to their
    grammar (tools.output_grammar): `record` returns the calls a reply made, `add_tool_results` answers
    them, and `resume` generates the model's next reply in the same turn.
    """

    def __init__(self, engine: Engine, system: str | None = None, tools: ToolUse | None = None):
        self.engine = engine
        self.system = system
        self.tools = tools
        self.messages: list[dict] = []
        self._native = template_has_tools(engine.tokenizer)   # the template renders tools and calls itself
        self._grammars: dict[str, tuple[str | None, tuple[str, ...]]] = {}   # tool choice -> (grammar, triggers)
        self._text, self._ids = "", []       # the last rendered prompt plus reply, and their tokens
        self._prompt: tuple[str, list[int]] | None = None
        self.clear()

    def clear(self, system: str | None = ...):
        """Start over (keeping the system prompt, or setting a new one: None removes it)."""
        if system is not ...:
            self.system = system
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._text, self._ids = "", []

    def _render(self) -> tuple[str, list[int]]:
        tokenizer = self.engine.tokenizer
        messages, kwargs = chat_messages(self.messages, self.tools, self._native)
        text = tokenizer.render_chat(messages, add_generation_prompt=True, **kwargs)
        if self._text and text.startswith(self._text):
            return text, self._ids + tokenizer.encode_rendered(text[len(self._text):])
        return text, tokenizer.encode_rendered(text)

    def ask(self, text: str, params: SamplingParams) -> Generation:
        """Add a user message and start the reply (iterate the Generation, then call `record`). The oldest
        turns (never the system prompt) are dropped until the prompt leaves room for the reply."""
        self.messages.append({"role": "user", "content": text})
        return self._generate(params, self.tools.choice if self.tools else None)

    def resume(self, params: SamplingParams) -> Generation:
        """Start the model's next reply after `add_tool_results`, in the same turn. It may call tools again
        or answer: "auto", whatever the session's choice (a forced call would be forced again, forever)."""
        if not self.messages or self.messages[-1]["role"] != "tool":
            raise ValueError("resume() continues after tool results: call add_tool_results() first")
        return self._generate(params, "auto")

    def _generate(self, params: SamplingParams, choice: str | None) -> Generation:
        context = self.engine.context_length
        first = 1 if self.messages[0]["role"] == "system" else 0
        while True:
            prompt_text, ids = self._render()
            room = context - len(ids)
            # the oldest turn: from its user message up to the next one (its replies and tool results)
            later = [i for i in range(first + 1, len(self.messages)) if self.messages[i]["role"] == "user"]
            if room >= min(params.max_new_tokens, context // 4) or not later:
                break
            del self.messages[first:later[0]]
            self._text, self._ids = "", []
        self._prompt = (prompt_text, ids)
        return self.engine.generate(ids, self._with_grammar(params, choice))

    def _with_grammar(self, params: SamplingParams, choice: str | None) -> SamplingParams:
        """`params` with the grammar replies keep to under the tools and `choice` (compiled once a session)."""
        if self.tools is None:
            return params
        if choice not in self._grammars:
            use = self.tools if choice == self.tools.choice else dataclasses.replace(self.tools, choice=choice,
                                                                                     function=None)
            self._grammars[choice] = output_grammar(self.engine.grammars, use)
        grammar, triggers = self._grammars[choice]
        return dataclasses.replace(params, grammar=grammar, grammar_triggers=triggers, stop=list(params.stop))

    def record(self, gen: Generation) -> list[ToolCall]:
        """Add the (possibly interrupted) reply to the conversation. With tools, returns the calls it made
        (parsed from its text, kept as the message's tool_calls): answer them with add_tool_results."""
        content, calls = gen.text, []
        if self.tools is not None and self.tools.calls_possible:
            content, calls = parse_reply(gen.text, {t.name for t in self.tools.tools}, fenced_calls=True)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]
        self.messages.append(message)
        prompt_text, ids = self._prompt
        tokenizer = self.engine.tokenizer
        # reuse the reply's tokens if they spell its text with its markup (a call's tags) as special tokens;
        # whether the next rendering extends prompt + reply (markup in content is escaped there; a call is
        # rewritten by the template) is then checked by _render
        if tokenizer.decode(gen.token_ids) == gen.text and _markup_is_tokens(tokenizer, gen.token_ids, gen.text):
            self._text, self._ids = prompt_text + gen.text, ids + gen.token_ids
        else:  # cut by a stop string, or markup spelled in plain tokens: tokenize the next prompt afresh
            self._text, self._ids = "", []
        return calls

    def add_tool_results(self, results: list[tuple[ToolCall, str]]):
        """Answer the last reply's calls: (call, result text) each, in order; then `resume`."""
        for call, result in results:
            self.messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result})


def _markup_is_tokens(tokenizer, ids: list[int], text: str) -> bool:
    """Whether the special-token strings in `text` are exactly the special tokens among `ids`, in order: a
    tag spelled in plain tokens would sit in the cache as text where a fresh tokenization has markup."""
    special = {tokenizer.token_to_id(s) for s in tokenizer.special_tokens}
    return [t for t in ids if t in special] == [t for t in tokenizer.encode_rendered(text) if t in special]
