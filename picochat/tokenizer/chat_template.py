"""Chat templates: Jinja run in a sandbox with a budget, because templates come from model files.

The sandbox blocks unsafe attributes (as transformers' does). On top of that every render has a budget,
so that no template can build a huge string or run for long: a limit on the characters any value or all
output together may hold, which also caps the loop steps and calls, and a time limit. Each is checked
where Python would otherwise do unbounded work in one step: string and list repetition, large integers,
formatting widths, the filters and str methods whose output can far exceed their input (replace, join,
indent, ...), and every loop step, call and write. `compile_chat_template` and `render_bounded` are the
two entry points (Tokenizer.apply_chat_template uses them).
"""
from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from collections.abc import ItemsView, Iterator as AnyIterator, KeysView, Mapping, ValuesView
from typing import Iterator
from datetime import datetime

import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.runtime import LoopContext
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment
from jinja2.utils import Cycler, Namespace

# Templates come from model files, i.e. untrusted code. The sandbox blocks unsafe attributes; on top of
# that every render has a budget, so that no template can build a huge string or run for long: a limit
# on the characters any value or all output together may hold, which also caps the loop steps and calls,
# and a time limit. Each is checked where Python would otherwise do unbounded work in one step: string
# and list repetition, large integers, formatting widths, the filters and str methods whose output can
# far exceed their input (replace, join, indent, ...), and every loop step, call and write.
TEMPLATE_TIME_LIMIT_S = 2.0          # per render
TEMPLATE_BASE_LIMIT = 1 << 20        # characters (and steps) every render may use ...
TEMPLATE_LIMIT_PER_INPUT_CHAR = 8    # ... plus this many per character of the messages, so long chats fit
TEMPLATE_MAX_INT_BITS = 1 << 16      # integers from * and ** (10 ** 10 ** 10 would take forever)
TEMPLATE_MAX_JSON_INDENT = 64


class TemplateLimitError(SecurityError):
    """A chat template went over its render budget (time, output size, a value's size or steps)."""


def text_size(value, limit: int | None = None) -> int:
    """About how many characters `value` spells as text: a string's length, a container's items plus one
    each (a list of a million references to one long string counts in full). Stops counting past `limit`."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v)
        elif isinstance(v, Namespace):
            stack.append(v._Namespace__attrs)  # {% set ns.x = ... %} stores its values there
        elif isinstance(v, Mapping):
            total += 1
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
            total += 1
            stack += v
        else:
            total += 1
        if limit is not None and total > limit:
            break
    return total


class _RenderBudget:
    def __init__(self, input_chars: int):
        self.limit = TEMPLATE_BASE_LIMIT + TEMPLATE_LIMIT_PER_INPUT_CHAR * input_chars
        self.steps = self.written = 0
        self.deadline = time.monotonic() + TEMPLATE_TIME_LIMIT_S

    def step(self, n: int = 1):
        """Count a loop step or call, and stop a render that has run too long."""
        self.steps += n
        if self.steps > self.limit:
            raise TemplateLimitError(f"it took more than {self.limit} loop steps and calls")
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"it ran longer than {TEMPLATE_TIME_LIMIT_S} s")

    def check(self, size: int, what: str):
        if size > self.limit:
            raise TemplateLimitError(f"{what} would hold {size} characters, over the limit of {self.limit}")

    def checked(self, value, what: str = "a value"):
        self.check(text_size(value, self.limit), what)
        return value

    def write(self, n: int):
        """Count characters written to the output or to a captured block ({% set %}, a macro's body)."""
        self.written += n
        self.check(self.written, "the output")


_BUDGET: contextvars.ContextVar[_RenderBudget | None] = contextvars.ContextVar("picochat_template_budget",
                                                                               default=None)


def _budget() -> _RenderBudget:
    budget = _BUDGET.get()
    if budget is None:  # e.g. Jinja folding constants at compile time: leave it to the render
        raise TemplateLimitError("template code ran outside a render")
    return budget


def _int_args(values) -> Iterator[int]:
    return (v for v in values if isinstance(v, int) and not isinstance(v, bool))


def _format_bound(fmt, args: list, limit: int | None = None) -> int:
    """A bound on what `fmt % args` or `fmt.format(*args)` writes: the format, each number in its
    placeholders (widths, precisions), each integer argument (a `*` width), the arguments once each."""
    fmt = str(fmt)
    specs = re.findall(r"%[^a-zA-Z%]*|\{[^{}]*\}", fmt)
    widths = sum(int(d) if len(d) < 10 else 10**10 for spec in specs for d in re.findall(r"\d+", spec))
    return (len(fmt) + widths + sum(abs(i) for i in _int_args(args))
            + (len(specs) + 1) * text_size(args, limit))


def _output_bound(name: str, value, args: tuple, kwargs: dict, is_filter: bool) -> int:
    """A bound on the output of the filters and str methods whose output can far exceed their input
    (0 for the others: their output stays within a small multiple of what they are given)."""

    def arg(i, key, default=None):
        return args[i] if len(args) > i else kwargs.get(key, default)

    n = text_size(value)
    if name == "replace":
        old, new, count = arg(0, "old", ""), arg(1, "new", ""), arg(2, "count")
        hits = value.count(old) if isinstance(value, str) and isinstance(old, str) and old else n + 1
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        return n + hits * text_size(new)
    if name == "join":
        items, sep = (value, arg(0, "d", "")) if is_filter else (arg(0, "iterable", ()), value)
        return text_size(items) + text_size(sep) * (len(items) if hasattr(items, "__len__") else n)
    if name == "indent":
        width = arg(0, "width", 4)
        lines = value.count("\n") + 1 if isinstance(value, str) else n
        return n + lines * (width if isinstance(width, int) else text_size(width))
    if name in ("wordwrap", "urlize"):  # a wrap string or link attributes at every break or link
        return n * (1 + sum(text_size(a) for a in (*args, *kwargs.values()) if isinstance(a, str)))
    if name == "translate":
        table = arg(0, "table", {})
        return n * max([1, *(text_size(v) for v in table.values())] if isinstance(table, Mapping) else [n])
    if name == "expandtabs":
        tabsize = arg(0, "tabsize", 8)
        return n + (value.count("\t") if isinstance(value, str) else n) * (tabsize if isinstance(tabsize, int) else 8)
    if name == "format" or name == "format_map":
        return _format_bound(value, [*args, *kwargs.values()])
    return 0


# Filters that return parts of their input, or numbers: what they are given need not be measured.
_STRUCTURAL_FILTERS = frozenset({
    "abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float", "groupby", "int", "items",
    "last", "length", "list", "map", "max", "min", "reject", "rejectattr", "reverse", "round", "select",
    "selectattr", "slice", "sort", "sum", "unique"})


def _check_operation(budget: _RenderBudget, name: str, value, args: tuple, kwargs: dict, is_filter: bool):
    """Refuse a filter or str method whose inputs or output would go over the budget, before it runs
    (their inputs are measured as the text they may be turned into)."""
    for i in _int_args((*args, *kwargs.values())):  # widths and counts: center(10**9), batch(10**9)
        if abs(i) > budget.limit:
            raise TemplateLimitError(f"{name}() was given {i}, over the limit of {budget.limit}")
    if not (is_filter and name in _STRUCTURAL_FILTERS):
        budget.check(text_size([value, args, kwargs], budget.limit), f"the input of {name}()")
        budget.check(_output_bound(name, value, args, kwargs, is_filter), f"the output of {name}()")


def _materialize(values):
    """Iterators among `values` (e.g. from |select) as lists, so they can be measured; each item is a step."""
    return [list(_checked_iter(v)) if isinstance(v, AnyIterator) and not isinstance(v, (LoopContext, Cycler))
            else v for v in values]


def _budgeted_filter(name: str, func):
    """`func`, a Jinja filter, checked against the render's budget."""
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # a context/environment comes first

    @functools.wraps(func)  # keeps jinja_pass_arg
    def filtered(*args, **kwargs):
        budget = _budget()
        if name not in _STRUCTURAL_FILTERS:
            args = (*args[:skip], *_materialize(args[skip:]))
        value, rest = (args[skip], args[skip + 1:]) if len(args) > skip else (None, ())
        budget.step()
        _check_operation(budget, name, value, rest, kwargs, is_filter=True)
        return budget.checked(func(*args, **kwargs), f"the output of {name}()")

    return filtered


def _checked_iter(iterable):
    """A loop's items, each counted as a step."""
    budget = _budget()
    for item in iterable:
        budget.step()
        yield item


def _checked(value):
    return _budget().checked(value)


def _write_literal(n: int):
    _budget().write(n)


def _finalize(value):
    """Every {{ expression }} passes through here before it is written out: count what it writes."""
    budget = _budget()
    budget.write(text_size(value, budget.limit))
    return value


_HOOKS = (_checked_iter, _checked)  # called from compiled templates: no budget checks of their own


def _hook_call(name: str, node: nodes.Expr) -> nodes.Call:
    return nodes.Call(nodes.EnvironmentAttribute(name), [node], [], None, None, lineno=node.lineno)


class _BudgetedCodeGenerator(CodeGenerator):
    """Compiles templates so that every loop step and `~` concatenation is checked against the budget,
    and template text written inside loops and captured blocks counts towards the output."""

    def visit_For(self, node, frame):
        node.iter = _hook_call("checked_iter", node.iter)
        super().visit_For(node, frame)

    def visit_Concat(self, node, frame):
        self.write("environment.checked_value(")
        super().visit_Concat(nodes.Concat([_hook_call("checked_value", n) for n in node.nodes],
                                          lineno=node.lineno), frame)
        self.write(")")

    def visit_Output(self, node, frame):
        literal = sum(len(n.data) for n in node.nodes if isinstance(n, nodes.TemplateData))
        if literal:
            self.writeline(f"environment.write_literal({literal})")
        super().visit_Output(node, frame)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _BudgetedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    checked_iter = staticmethod(_checked_iter)  # the hooks compiled templates call, as environment.<name>
    checked_value = staticmethod(_checked)
    write_literal = staticmethod(_write_literal)

    # The stock sandbox turns `x.__class__` into an Undefined that renders as ""; fail loudly instead.
    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} is unsafe")

    def call_binop(self, context, operator, left, right):
        budget = _budget()
        if operator == "*":
            _check_product(budget, left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "%" and isinstance(left, str):
            args = right if isinstance(right, tuple) else [right]
            budget.check(_format_bound(left, args, budget.limit), "the result of %")
        return budget.checked(super().call_binop(context, operator, left, right), f"the result of {operator}")

    def call(self, context, obj, /, *args, **kwargs):
        if any(obj is hook for hook in _HOOKS):
            return obj(*args)  # (calls in loops also pass _loop_vars, for macros)
        budget = _budget()
        budget.step()
        method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "a function")
        if isinstance(owner, (str, bytes)):  # macros and other calls are template code, checked as it runs
            args, kwargs = _materialize(args), dict(zip(kwargs, _materialize(kwargs.values())))
            _check_operation(budget, name, owner, tuple(args), kwargs, is_filter=False)
        return budget.checked(super().call(context, obj, *args, **kwargs), f"the output of {name}()")


def _check_product(budget: _RenderBudget, left, right):
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > TEMPLATE_MAX_INT_BITS:
            raise TemplateLimitError(f"a product of integers over {TEMPLATE_MAX_INT_BITS} bits")
        return
    for seq, times in ((left, right), (right, left)):
        if isinstance(times, int) and isinstance(seq, (str, bytes, list, tuple)):
            budget.check(text_size(seq, budget.limit) * max(times, 0), "the result of *")


def _check_power(base, exponent):
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if abs(base).bit_length() * exponent > TEMPLATE_MAX_INT_BITS:
            raise TemplateLimitError(f"a power of integers over {TEMPLATE_MAX_INT_BITS} bits")


def _bounded_range(*args) -> range:
    """range() for templates: as the sandbox's, at most MAX_RANGE items, but a budget error beyond."""
    items = range(*args)
    try:
        too_long = len(items) > MAX_RANGE
    except OverflowError:  # more items than an index can count
        too_long = True
    if too_long:
        raise TemplateLimitError(f"range({', '.join(map(str, args))}) has more than {MAX_RANGE} items")
    return items


def compile_chat_template(source: str):
    """Compile a chat template in the budgeted sandbox (render it with render_bounded)."""

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes <, >, & and '; chat templates want plain JSON (as transformers)
        width = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
        if width > TEMPLATE_MAX_JSON_INDENT:  # written once per nesting level on every line
            raise TemplateLimitError(f"tojson indent {indent!r} is over {TEMPLATE_MAX_JSON_INDENT}")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
                         finalize=_finalize)
    env.filters["tojson"] = tojson
    env.filters = {name: _budgeted_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["range"] = _bounded_range
    del env.globals["lipsum"]  # no chat template needs it, and it writes any amount of text in one call
    return env.from_string(source)


def render_bounded(template, input_chars: int, **variables) -> str:
    """Render `template` within the budget for a conversation of `input_chars` characters."""
    budget = _RenderBudget(input_chars)
    token = _BUDGET.set(budget)
    try:
        parts = []
        for part in template.generate(**variables):
            budget.step(0)  # the time limit
            parts.append(part)
        return "".join(parts)
    finally:
        _BUDGET.reset(token)
