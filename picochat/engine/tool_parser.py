"""Tool calls in a model's reply, found as the text streams: ToolCallParser turns pieces of model text into
content for the user and OpenAI-shaped tool-call deltas; parse_reply does the same for a whole reply.

Qwen2.5 (the Hermes format) writes a call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
maybe after some text, maybe several in a row. The parser is a small state machine over the text:

  start  the reply so far is whitespace: wait for its first character to tell a bare call from text
  text   plain text; a trailing piece that could still become `<tool_call>` or `</tool_call>` is held back
  call   inside the tags: an incremental scan of the JSON object (nesting depth, inside a string, after a
         backslash) finds the top-level "name" and "arguments" ("parameters" is an alias); the name is sent
         the moment its string closes and the arguments' characters pass through as they arrive
  after  after the object's closing brace: skip whitespace, expect `</tool_call>`
  raw    the JSON broke: collect the text up to `</tool_call>`
  bare   the reply began with `{`, `[` or a ```json fence: hold everything until finish()

With fenced_calls=True (the caller's grammar guarantees that a reply opening with "```json\n" is a call
block, as Qwen2.5-Coder writes its calls), such a reply streams instead of going to bare:

  fence        inside the block: its object, or each object of its list, is read by the same scanner as a
               tagged call (mode call for the object's characters), so deltas stream exactly as for tags
  fence_close  after the object or list: skip whitespace, expect the closing ```
  fence_skip   the JSON broke after a call was sent: skip the rest of the block, up to ```
  fence_end    after the closing ```: skip the whitespace, then the rest is text

Each character is looked at a bounded number of times (the scanner keeps its state between pieces and
never re-reads the buffer), so feeding a reply one character at a time costs the same as feeding it whole,
and any split of the text gives the same joined result as parse_reply.

Choices for the awkward cases:
  * Bare or fenced JSON (the whole reply is `{"name": str, "arguments"|"parameters": object}`, or a list of
    them, optionally in a ```json fence; with tool_names given, every name must be one of them) becomes
    calls at finish(), arguments = json.dumps(value). Anything else that was held is released as content
    unchanged — through the tag scanner, so a `<tool_call>` later in it is still a call.
  * tool_names filters only those untagged guesses: a tagged call is a call whatever its name (the caller
    decides what an unknown tool means).
  * A tagged call whose JSON breaks before its name is known (`<tool_call>not json</tool_call>`) is
    released as content: the text between the tags, verbatim, without the tags. Once the name was sent,
    the call stays as sent and the rest up to `</tool_call>` is skipped.
  * A reply cut inside a call (max_tokens): a call with a name ends as it is (its arguments may be
    incomplete JSON; "{}" if they never began); one without a name is dropped — never shown — and its text
    is recorded in `parser.dropped`.
  * Whitespace between the start of the reply or a `</tool_call>` and the next `<tool_call>` is dropped, and
    so is whitespace at the end of a reply that made a call; whitespace inside the tags around the object
    is not part of anything. A call with no `</tool_call>` ends where its object does; a `</tool_call>`
    inside one of the object's JSON strings is part of the string.
  * A fenced call block (fenced_calls=True) follows the tagged rules, with the block in the place of the
    tags: only exactly "```json\n" after leading whitespace opens one (a prefix of it is held until the next
    piece decides; anything else is handled as without the option). tool_names does not filter its calls.
    JSON that breaks before any call of the block is named releases the whole block as content, verbatim,
    fences and leading whitespace included, through the tag scanner; once a call was sent, the calls stay
    as sent and the rest of the block up to ``` is skipped (a later call of the list that breaks before its
    name included). Text after the object or list that is not whitespace and ``` is content, as after a
    tagged call; whitespace right after the closing ``` is dropped. A reply cut inside the block ends its
    named calls as they are; cut before any name, the block is dropped and its JSON text recorded in
    `parser.dropped`; a later call of the list cut before its name likewise, with that call's text.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .tool_scan import (ARGUMENT_KEYS, CLOSE, FENCE_CLOSE, FENCE_OPEN, JSON_SPACE, OPEN, VALUE_STARTS, CallScan,
                        FenceScan, ValueScan, bare_calls, looks_bare, partial_tag)

_TAG = re.compile(r"</?tool_call>")


@dataclass
class ToolCallDelta:
    """One OpenAI streaming tool-call delta."""
    index: int                # which call (0, 1, ...) in this reply
    id: str | None = None     # sent once, with the name, on the call's first delta
    name: str | None = None
    arguments: str = ""       # a fragment of the arguments' JSON text


@dataclass
class ParsedDelta:
    content: str = ""                                          # plain text for the user
    calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str            # the arguments' JSON text


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ----------------------------------------------------------------------------- the parser
class ToolCallParser:
    """Feed it the model's text as it comes; each feed() returns what can be shown now, finish() the rest."""

    def __init__(self, tool_names: set[str] | None = None, make_id: Callable[[], str] = new_call_id, *,
                 fenced_calls: bool = False):
        self.tool_names = tool_names
        self.make_id = make_id
        self.fenced_calls = fenced_calls   # a reply opening with "```json\n" is a call block: stream it
        self.dropped: list[str] = []   # the text of calls cut off before their name (see the module's notes)
        self._mode = "start"
        self._held = ""                # start: the reply so far; text, after, raw: a possible partial tag
        self._gap = ""                 # whitespace that is dropped if a call follows it
        self._gap_droppable = True     # at the start of the reply and after a call
        self._bare: list[str] = []
        self._call = CallScan()
        self._fence = FenceScan("")
        self._count = 0                # calls named so far: the next call's index
        self._out = ParsedDelta()
        self._handlers = {"start": self._in_start, "text": self._in_text, "call": self._in_call,
                          "after": self._in_after, "raw": self._in_raw, "bare": self._in_bare,
                          "fence": self._in_fence, "fence_close": self._in_fence_close,
                          "fence_skip": self._in_fence_skip, "fence_end": self._in_fence_end}

    def feed(self, text: str) -> ParsedDelta:
        """The next piece of model text, any size: what of it (and of what was held) can be sent now."""
        if self._mode == "done":
            raise RuntimeError("ToolCallParser.feed() after finish()")
        self._out = ParsedDelta()
        self._run(text)
        return self._out

    def finish(self) -> ParsedDelta:
        """The end of the reply: release or convert what was held back."""
        if self._mode == "done":
            raise RuntimeError("ToolCallParser.finish() called twice")
        self._out = ParsedDelta()
        if self._mode == "start":
            self._mode, held, self._held = "text", self._held, ""
            self._run(held)
        if self._mode == "bare":
            self._finish_bare()
        if self._mode == "text":
            self._content(self._held)
            if not (self._gap_droppable and self._count):
                self._out.content += self._gap   # a whitespace-only reply without calls: it is the content
        elif self._mode in ("call", "raw"):
            self._finish_call()
        elif self._mode == "fence":
            self._finish_fence()
        self._mode = "done"
        return self._out

    def _run(self, s: str):
        # each handler takes what it can from s and returns the rest, for the mode it switched to
        while s:
            s = self._handlers[self._mode](s)

    # -- emitting
    def _content(self, text: str):
        if text:
            self._out.content += self._gap + text
            self._gap, self._gap_droppable = "", False

    def _delta(self, arguments: str = "", name: str | None = None, call_id: str | None = None):
        calls, index = self._out.calls, self._call.index
        if call_id is None and calls and calls[-1].index == index:
            calls[-1].arguments += arguments    # one delta per call per feed()
        else:
            calls.append(ToolCallDelta(index, call_id, name, arguments))

    # -- start, bare and text
    def _in_start(self, s: str) -> str:
        self._held += s
        head = self._held.lstrip()
        if self.fenced_calls and head.startswith(FENCE_OPEN):
            cut = len(self._held) - len(head) + len(FENCE_OPEN)
            self._fence = FenceScan(self._held[:cut])
            self._mode, rest, self._held = "fence", self._held[cut:], ""
            return rest
        if self.fenced_calls and FENCE_OPEN.startswith(head):
            return ""    # maybe the call block: the next piece decides (a verdict below never comes earlier)
        verdict = looks_bare(head)
        if verdict is None:
            return ""
        held, self._held = self._held, ""
        if verdict:
            self._mode, self._bare = "bare", [held]
            return ""
        self._mode = "text"
        return held

    def _in_bare(self, s: str) -> str:
        self._bare.append(s)
        return ""

    def _finish_bare(self):
        text = "".join(self._bare)
        calls = bare_calls(text, self.tool_names)
        if calls is None:
            self._mode = "text"      # released as written, but a tagged call inside is still a call
            self._run(text)
            return
        for name, arguments in calls:
            self._out.calls.append(ToolCallDelta(self._count, self.make_id(), name, arguments))
            self._count += 1
        self._mode = "after"

    def _in_text(self, s: str) -> str:
        if self._gap_droppable and not self._held:
            rest = s.lstrip()
            self._gap += s[:len(s) - len(rest)]
            s = rest
        buf, self._held = self._held + s, ""
        m = _TAG.search(buf)
        if m is None:
            keep = len(buf) - partial_tag(buf)
            self._content(buf[:keep])
            self._held = buf[keep:]
            return ""
        if m.group() == OPEN:
            if m.start() == 0 and self._gap_droppable:
                self._gap = ""       # only whitespace between the start or the last call and this one
            self._content(buf[:m.start()])
            self._mode, self._call = "call", CallScan()
        else:
            self._content(buf[:m.start()])   # a stray closing tag is dropped
        return buf[m.end():]

    # -- inside the tags
    def _in_call(self, s: str) -> str:
        i = 0
        while i < len(s) and self._mode == "call":
            i = self._step(s, i)
        if self._call.name is None:
            self._call.raw.append(s[:i])
        return s[i:]

    def _step(self, s: str, i: int) -> int:
        """Go on reading the object from s[i]: the index of the first character not used yet."""
        c = self._call
        if c.step in ("key_text", "name_text", "args", "skip"):
            return self._step_value(s, i)
        ch = s[i]
        if ch in JSON_SPACE:
            return i + 1
        if c.step == "open" and ch == "{":
            c.step = "key"
        elif c.step == "key" and ch == '"':
            c.step, c.value, c.piece = "key_text", ValueScan(in_string=True), ['"']
        elif c.step in ("key", "comma") and ch == "}":
            self._end_object()
        elif c.step == "comma" and ch == ",":
            c.step = "key"
        elif c.step == "colon" and ch == ":":
            c.step = "value"
        elif c.step == "value" and ch in VALUE_STARTS:
            self._begin_value(ch)
        else:
            self._mode = "raw"     # the model broke the format; ch is the first character of the raw rest
            return i
        return i + 1

    def _begin_value(self, ch: str):
        c = self._call
        c.value = ValueScan.starting(ch)
        if c.key == "name" and c.name is None:
            if ch != '"':
                self._mode = "raw"
                return
            c.step, c.piece = "name_text", ['"']
        elif c.key in ARGUMENT_KEYS and not c.has_args:
            c.step, c.has_args = "args", True
            self._arguments(ch)
        else:
            c.step = "skip"        # another key, or a repeated one: its value is not ours

    def _step_value(self, s: str, i: int) -> int:
        c = self._call
        end = c.value.scan(s, i)
        stop = len(s) if end is None else end
        if c.step == "args":
            self._arguments(s[i:stop])
        elif c.step != "skip":
            c.piece.append(s[i:stop])
        if end is None:
            return stop
        if c.step in ("key_text", "name_text"):
            self._end_string()
        else:
            c.step = "comma"
        return end

    def _end_string(self):
        """A key or the name's JSON string closed: decode it (json.loads on this small piece only)."""
        c = self._call
        try:
            text = json.loads("".join(c.piece))
        except ValueError:
            self._mode = "raw"
            return
        if c.step == "key_text":
            c.key, c.step = text, "colon"
        elif not text:
            self._mode = "raw"     # an empty name is no call
        else:
            c.name, c.index, c.step = text, self._count, "comma"
            self._count += 1
            self._delta("".join(c.args_held), text, self.make_id())

    def _arguments(self, text: str):
        if text:
            if self._call.name is None:
                self._call.args_held.append(text)
            else:
                self._delta(text)

    def _end_object(self):
        c = self._call
        if c.name is None:
            self._mode = "raw"     # no name: the text between the tags is content after all
            return
        if not c.has_args:
            self._delta("{}")
        self._mode = "after"

    def _in_after(self, s: str) -> str:
        buf, self._held = self._held + s, ""
        rest = buf.lstrip()
        self._mode, self._gap_droppable = "text", True
        if rest.startswith(CLOSE):
            return rest[len(CLOSE):]
        if CLOSE.startswith(rest):   # whitespace, maybe the start of the tag: wait for the rest
            self._mode, self._held = "after", buf
            return ""
        return buf   # no closing tag: the model went on writing (the whitespace is a gap, as after a call)

    def _in_raw(self, s: str) -> str:
        buf, self._held = self._held + s, ""
        m = _TAG.search(buf)
        if m is None:
            keep = len(buf) - partial_tag(buf)
            self._call.raw.append(buf[:keep])
            self._held = buf[keep:]
            return ""
        c = self._call
        c.raw.append(buf[:m.start()])
        self._mode = "text"
        if c.name is None:
            self._content("".join(c.raw))   # no call after all: the text between the tags, as written
        else:
            if not c.has_args:
                self._delta("{}")
            self._gap_droppable = True
        if m.group() == OPEN:
            self._mode, self._call = "call", CallScan()   # a new call began before this one closed
        return buf[m.end():]

    def _finish_call(self):
        """The reply ended inside a call (cut by max_tokens, or no closing tag)."""
        c = self._call
        if c.name is None:
            self.dropped.append("".join(c.raw) + self._held)
        elif not c.has_args:
            self._delta("{}")


    # -- a ```json call block opening the reply (fenced_calls=True)
    def _in_fence(self, s: str) -> str:
        f, i = self._fence, 0
        while i < len(s) and self._mode == "fence":
            i = self._fence_object(s, i) if f.step == "object" else self._fence_between(s, i)
        if self._count == 0:      # nothing sent yet: keep the text, the block may be content after all
            f.raw.append(s[:i])
            if self._mode == "text":
                return "".join([f.opening, *f.raw]) + s[i:]   # broke: the block as written, then the rest
        return s[i:]

    def _fence_between(self, s: str, i: int) -> int:
        """The block's JSON outside its objects: a list's brackets and commas."""
        f, ch = self._fence, s[i]
        if ch in JSON_SPACE:
            return i + 1
        if ch == "{" and f.step in ("value", "item"):
            f.step, self._call = "object", CallScan()
            return i               # the call's scan reads its own opening brace
        if ch == "[" and f.step == "value":
            f.step, f.is_list = "item", True
        elif ch == "," and f.step == "next":
            f.step = "item"
        elif ch == "]" and f.step == "next":
            self._mode = "fence_close"
        else:
            self._fence_break()
            return i
        return i + 1

    def _fence_object(self, s: str, i: int) -> int:
        """One step of the tagged call's scan: its modes after the step say how the object went."""
        c = self._call
        self._mode = "call"
        end = self._step(s, i)
        if c.name is None:
            c.raw.append(s[i:end])
        outcome, self._mode = self._mode, "fence"
        if outcome == "after":     # the object closed (its "{}" already sent if it had no arguments)
            self._fence.step = "next"
            if not self._fence.is_list:
                self._mode = "fence_close"
        elif outcome == "raw":
            if c.name is not None and not c.has_args:
                self._delta("{}")
            self._fence_break()
        return end

    def _fence_break(self):
        # nothing sent: the block is released as content (by _in_fence); else the calls stand as sent
        self._mode = "text" if self._count == 0 else "fence_skip"

    def _in_fence_close(self, s: str) -> str:
        if not self._held:         # whitespace goes to the gap at once (holding it would be quadratic)
            rest = s.lstrip()
            self._gap += s[:len(s) - len(rest)]
            s = rest
        buf, self._held = self._held + s, ""
        if buf.startswith(FENCE_CLOSE):
            self._mode, self._gap = "fence_end", ""
            return buf[len(FENCE_CLOSE):]
        if FENCE_CLOSE.startswith(buf):    # nothing yet, or `` that may become the fence
            self._held = buf
            return ""
        self._mode, self._gap_droppable = "text", True   # the model went on writing, as after a tagged call
        return buf

    def _in_fence_skip(self, s: str) -> str:
        buf, self._held = self._held + s, ""
        end = buf.find(FENCE_CLOSE)
        if end < 0:
            self._held = buf[len(buf.rstrip("`")):]   # at most two backticks, or the fence was found
            return ""
        self._mode = "fence_end"
        return buf[end + len(FENCE_CLOSE):]

    def _in_fence_end(self, s: str) -> str:
        rest = s.lstrip()
        if rest:
            self._mode, self._gap, self._gap_droppable = "text", "", True
        return rest

    def _finish_fence(self):
        """The reply ended inside the block: its named calls end as they are (see the module's notes)."""
        f, c = self._fence, self._call
        if f.step == "object" and c.name is not None:
            if not c.has_args:
                self._delta("{}")
        elif self._count == 0:
            self.dropped.append("".join(f.raw))
        elif f.step == "object":
            self.dropped.append("".join(c.raw))


def parse_reply(text: str, tool_names: set[str] | None = None, make_id: Callable[[], str] = new_call_id, *,
                fenced_calls: bool = False) -> tuple[str, list[ToolCall]]:
    """feed(text) + finish(), concatenated: (content, calls) — the non-streamed reply."""
    parser = ToolCallParser(tool_names, make_id, fenced_calls=fenced_calls)
    return join_deltas([parser.feed(text), parser.finish()])


def join_deltas(deltas: list[ParsedDelta]) -> tuple[str, list[ToolCall]]:
    """What a client gets by concatenating a stream's deltas (content joined, each call's id/name once,
    arguments joined by index)."""
    heads: dict[int, list[str]] = {}       # index -> [id, name]
    arguments: dict[int, list[str]] = {}   # fragments joined once at the end (+= would be quadratic)
    for delta in deltas:
        for call in delta.calls:
            head = heads.setdefault(call.index, ["", ""])
            head[0] = call.id or head[0]
            head[1] = call.name or head[1]
            arguments.setdefault(call.index, []).append(call.arguments)
    calls = [ToolCall(heads[i][0], heads[i][1], "".join(arguments[i])) for i in sorted(heads)]
    return "".join(d.content for d in deltas), calls
