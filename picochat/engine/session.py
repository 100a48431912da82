"""A multi-turn chat over an Engine, built so that each turn computes only its own new tokens."""
from __future__ import annotations

from .engine import Engine
from .generation import Generation
from .sampling import SamplingParams


class ChatSession:
    """A multi-turn chat with an Engine, built so each turn computes only its new tokens.

    The next prompt is the previous prompt's tokens, the reply's own tokens, then the tokens of the text
    the chat template adds after them (end of turn, the new user message, the generation prompt), so the
    Engine finds all of the earlier conversation in its cache. Where the template does not extend its
    previous rendering (or old turns were dropped to fit the context), the prompt is tokenized afresh and
    the cache is reused up to the first difference. Renderings are Tokenizer.render_chat's (special-token
    strings in messages escaped), so message text is tokenized as text, as in Engine.chat_prompt.
    """

    def __init__(self, engine: Engine, system: str | None = None):
        self.engine = engine
        self.system = system
        self.messages: list[dict] = []
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
        text = tokenizer.render_chat(self.messages, add_generation_prompt=True)
        if self._text and text.startswith(self._text):
            return text, self._ids + tokenizer.encode_rendered(text[len(self._text):])
        return text, tokenizer.encode_rendered(text)

    def ask(self, text: str, params: SamplingParams) -> Generation:
        """Add a user message and start the reply (iterate the Generation, then call `record`). The oldest
        turns (never the system prompt) are dropped until the prompt leaves room for the reply."""
        self.messages.append({"role": "user", "content": text})
        context = self.engine.context_length
        first = 1 if self.messages[0]["role"] == "system" else 0
        while True:
            prompt_text, ids = self._render()
            room = context - len(ids)
            if room >= min(params.max_new_tokens, context // 4) or len(self.messages) - first <= 1:
                break
            del self.messages[first:first + 2]
            self._text, self._ids = "", []
        self._prompt = (prompt_text, ids)
        return self.engine.generate(ids, params)

    def record(self, gen: Generation):
        """Add the (possibly interrupted) reply to the conversation."""
        self.messages.append({"role": "assistant", "content": gen.text})
        prompt_text, ids = self._prompt
        tokenizer = self.engine.tokenizer
        # reuse the reply's tokens if they spell its text, and the text holds no special-token strings
        # (the next rendering escapes those into plain text)
        if tokenizer.decode(gen.token_ids) == gen.text == tokenizer.escape_special(gen.text):
            self._text, self._ids = prompt_text + gen.text, ids + gen.token_ids
        else:  # cut by a stop string, or spelling markup: tokenize the next prompt afresh
            self._text, self._ids = "", []
