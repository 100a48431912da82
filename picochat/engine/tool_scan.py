"""The pieces tool_parser.py reads model text with: the markup it looks for, a scan that finds where a JSON
value ends a piece at a time (without parsing it: depth, inside a string, after a backslash), the state of
a call or a ```json block being read, and the checks on a reply held as a possible bare call."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")
JSON_SPACE = " \t\r\n"
VALUE_STARTS = '{["-0123456789tfn'    # what a JSON value can begin with
FENCE_TAGS = ("", "json")             # ``` or ```json opens a fenced call; ```python is just code
FENCE_OPEN, FENCE_CLOSE = "```json\n", "```"   # a call block, with fenced_calls=True
MAX_FENCE_LINE = 16                   # longer than this, the fence's first line is not "json"

_STRING_STOP = re.compile(r'["\\]')          # inside a JSON string only a quote or a backslash matters
_NEST_STOP = re.compile(r'["{}\[\]]')         # outside strings: where strings and nesting begin and end
_SCALAR_END = re.compile(r"[\s,}\]]")         # a number, true, false or null ends before one of these


# ----------------------------------------------------------------------------- scanning JSON a piece at a time
@dataclass
class ValueScan:
    """Where a scan of one JSON value stands: enough to find its end without parsing it."""
    depth: int = 0            # open braces and brackets
    in_string: bool = False
    escape: bool = False      # the last character was a backslash inside a string
    scalar: bool = False      # a number, true, false or null: ends at the first delimiter

    @classmethod
    def starting(cls, ch: str) -> ValueScan:
        """The scan after the value's first character ch (one of VALUE_STARTS)."""
        if ch in "{[":
            return cls(depth=1)
        return cls(in_string=True) if ch == '"' else cls(scalar=True)

    def scan(self, s: str, i: int) -> int | None:
        """Go on over s from i: the index just past the value's end, or None if it goes on past s."""
        while i < len(s):
            if self.escape:   # the escaped character, whatever it is, is part of the string
                self.escape, i = False, i + 1
            elif self.in_string:
                m = _STRING_STOP.search(s, i)
                if m is None:
                    return None
                i = m.end()
                if m.group() == "\\":
                    self.escape = True
                else:
                    self.in_string = False
                    if self.depth == 0:
                        return i
            elif self.scalar:
                m = _SCALAR_END.search(s, i)
                return None if m is None else m.start()
            else:
                m = _NEST_STOP.search(s, i)
                if m is None:
                    return None
                i, ch = m.end(), m.group()
                if ch == '"':
                    self.in_string = True
                elif ch in "{[":
                    self.depth += 1
                else:
                    self.depth -= 1
                    if self.depth == 0:
                        return i
        return None


@dataclass
class CallScan:
    """One tagged call being read."""
    step: str = "open"        # open key key_text colon value name_text args skip comma
    key: str = ""             # the top-level key whose value comes next
    name: str | None = None   # known (and sent) once its string closed
    index: int = -1
    has_args: bool = False
    value: ValueScan = field(default_factory=ValueScan)
    piece: list[str] = field(default_factory=list)      # a key's or the name's JSON string text so far
    args_held: list[str] = field(default_factory=list)  # arguments written before the name: sent with it
    raw: list[str] = field(default_factory=list)        # the text inside the tags, while there is no name


@dataclass
class FenceScan:
    """A ```json call block opening the reply (fenced_calls=True)."""
    opening: str              # the leading whitespace and "```json\n"
    step: str = "value"       # value (the block's JSON) item (a list's next object) next (, or ]) object
    is_list: bool = False
    raw: list[str] = field(default_factory=list)   # the JSON text, while no call is named


def partial_tag(text: str) -> int:
    """How many characters at the end of text could be the start of a tag (held back until known)."""
    if "<" not in text[-len(CLOSE):]:
        return 0
    for k in range(min(len(text), len(CLOSE) - 1), 0, -1):
        tail = text[-k:]
        if OPEN.startswith(tail) or CLOSE.startswith(tail):
            return k
    return 0


def looks_bare(head: str) -> bool | None:
    """Whether a reply beginning with head (no leading whitespace) is held as a possible bare call; None:
    not known yet. A verdict never changes as head grows, so every split of the text decides the same."""
    if not head:
        return None
    if head[0] in "{[":
        return True
    if not head.startswith("```"):
        return None if "```".startswith(head) else False
    line, newline, rest = head[3:].partition("\n")
    tag = line.strip().lower()
    if len(line) >= MAX_FENCE_LINE:
        return False
    if not newline:
        return None if "json".startswith(tag) else False
    if tag not in FENCE_TAGS:
        return False
    rest = rest.lstrip()
    return rest[0] in "{[" if rest else None


def bare_calls(text: str, tool_names: set[str] | None) -> list[tuple[str, str]] | None:
    """(name, arguments JSON) for each call if the whole text is a bare or fenced call or list of calls."""
    body = text.strip()
    if body.startswith("```"):
        if len(body) < 6 or not body.endswith("```"):
            return None
        line, _, body = body[3:-3].partition("\n")
        if line.strip().lower() not in FENCE_TAGS:
            return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not set(item) <= {"name", *ARGUMENT_KEYS}:
            return None
        name, arguments = item.get("name"), item.get("arguments", item.get("parameters"))
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            return None
        if tool_names is not None and name not in tool_names:
            return None
        calls.append((name, json.dumps(arguments, ensure_ascii=False)))
    return calls or None
