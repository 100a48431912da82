"""The knowledge bases a server answers from (`picochat serve --kb NAME`), and the sentence encoder behind
them and /v1/embeddings. Opened lazily and used only on the engine's thread (SQLite connections and the
encoder stay on the thread that made them)."""
from __future__ import annotations

from typing import Callable

from ..apps import assistant
from .protocol import APIError


class Knowledge:
    """The knowledge bases a server was started with (`serve --kb NAME`), and the sentence encoder behind
    them and /v1/embeddings. Opened lazily and used only on the batcher's thread (SQLite connections and
    the encoder stay on the thread that made them)."""

    def __init__(self, names: list[str] | None = None, open_kb: Callable | None = None,
                 load_encoder: Callable | None = None, min_similarity: float = assistant.MIN_SIMILARITY):
        self.names = list(names or [])
        self.open_kb, self.load_encoder, self.min_similarity = open_kb, load_encoder, min_similarity
        self._kbs: dict = {}
        self._encoder = None

    def kb(self, name: str):
        if name not in self._kbs:
            self._kbs[name] = self.open_kb(name, encoder=self.encoder())
        return self._kbs[name]

    def ground(self, name: str, question: str) -> assistant.Grounding:
        """Retrieval for one question from the knowledge base `name`, its sources to be shown relative to the
        knowledge base's folder (the API never shows the server's own paths)."""
        kb = self.kb(name)
        grounding = assistant.ground(kb, question, min_similarity=self.min_similarity)
        # a stand-in knowledge base without root() (the tests' FakeKB) shows file names only
        grounding.root = kb.root() if hasattr(kb, "root") else None
        return grounding

    def encoder(self):
        if self._encoder is None:
            if self.load_encoder is None:
                raise FileNotFoundError("this server has no embedding model")
            self._encoder = self.load_encoder()
        return self._encoder

    def choose(self, requested) -> str | None:
        """The knowledge base a chat request asks for: its `kb` field, else the server's first."""
        if requested is False or (requested is None and not self.names):
            return None
        if requested is None or requested is True:
            if not self.names:
                raise APIError(400, "this server has no knowledge base (start it with --kb NAME)", "kb")
            return self.names[0]
        if requested not in self.names:
            served = ", ".join(self.names) or "none"
            raise APIError(400, f"unknown knowledge base '{requested}'; this server has: {served}", "kb",
                           "kb_not_found")
        return requested
