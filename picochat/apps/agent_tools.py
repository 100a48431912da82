"""The tools `picochat chat --tools` gives a model: a calculator and a Python sandbox, as Tool specs the chat
template shows the model, and `run_tool`, which runs a call and returns the text fed back as its result.

A tool's failure is a result too ("error: ..."): the model reads it and can try again, and the chat goes on.
Neither tool trusts its input. The calculator walks the expression's syntax tree itself (no eval()), allows
only numbers, arithmetic and a few math functions, and bounds the size of every integer it makes, so
`9**9**9**9` is refused at once instead of running for hours. Python code runs in the evaluation's sandbox
(sandbox/__init__.py: namespaces, seccomp, limits); where the kernel refuses it, the result says so and the
code is not run (unless the user opted out the way the sandbox documents).
"""
from __future__ import annotations

import ast
import json
import math
import operator

from ..engine.tool_parser import ToolCall
from ..engine.tools import Tool
from ..sandbox import SandboxUnavailable, run_python

MAX_EXPRESSION = 500            # characters of a calculator expression
MAX_DIGITS = 1000               # an integer the calculator makes (or a power would make) has at most this many
MAX_BITS = int(MAX_DIGITS * math.log2(10))
PYTHON_TIMEOUT = 10.0           # seconds of wall clock for one python call
PYTHON_MEMORY_MB = 256
MAX_RESULT_CHARS = 3000         # of a result fed back to the model: it reads every character

CALCULATOR = Tool(
    "calculator",
    "Evaluate an arithmetic expression exactly: numbers, + - * / // % ** and parentheses, and sqrt, sin, "
    "cos, tan, log, exp, abs, round, pi, e. Returns the value.",
    {"type": "object", "properties": {"expression": {"type": "string", "maxLength": MAX_EXPRESSION,
                                                     "description": "e.g. (3 + 4) * sqrt(2)"}},
     "required": ["expression"], "additionalProperties": False})
PYTHON = Tool(
    "python",
    f"Run Python code in a sandbox (no network, no files kept, {PYTHON_TIMEOUT:g} s) and return what it "
    f"prints. Use print() to see values.",
    {"type": "object", "properties": {"code": {"type": "string", "description": "a Python program"}},
     "required": ["code"], "additionalProperties": False})
TOOLS = {t.name: t for t in (CALCULATOR, PYTHON)}


def tools_named(names: list[str] | None) -> list[Tool]:
    """The built-in tools with these names (None or empty: all of them); ValueError for an unknown one."""
    unknown = [n for n in names or [] if n not in TOOLS]
    if unknown:
        raise ValueError(f"no built-in tool {unknown[0]!r}: the tools are {', '.join(TOOLS)}")
    return [TOOLS[n] for n in dict.fromkeys(names or TOOLS)]


def run_tool(call: ToolCall, enabled=TOOLS) -> str:
    """Run one call of a built-in tool (one of `enabled`'s names): the result text for the model, an
    "error: ..." line when the call or the tool failed."""
    if call.name not in enabled or call.name not in TOOLS:
        return f"error: there is no tool {call.name!r}; the tools are {', '.join(enabled)}"
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError as e:
        return f"error: the arguments are not valid JSON ({e})"
    key = "expression" if call.name == "calculator" else "code"
    if not isinstance(arguments, dict) or not isinstance(arguments.get(key), str):
        return f"error: {call.name} takes {{\"{key}\": string}}"
    return calculate(arguments[key]) if call.name == "calculator" else run_code(arguments[key])


# ----------------------------------------------------------------------------- the calculator
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
FUNCTIONS = {"sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "tan": math.tan, "log": math.log,
             "exp": math.exp, "abs": abs, "round": round}
CONSTANTS = {"pi": math.pi, "e": math.e}


class CalculatorError(ValueError):
    """An expression the calculator will not evaluate; the message says why."""


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text, or "error: ..." saying why there is none."""
    if len(expression) > MAX_EXPRESSION:
        return f"error: the expression has {len(expression)} characters; at most {MAX_EXPRESSION}"
    try:
        value = evaluate(ast.parse(expression.strip(), mode="eval").body)
    except SyntaxError as e:
        return f"error: not an expression ({e.msg})"
    except ZeroDivisionError:
        return "error: division by zero"
    except OverflowError:
        return "error: the result is too large"
    except RecursionError:
        return "error: the expression nests too deeply"
    except (CalculatorError, ValueError, TypeError) as e:   # math's own: "math domain error"
        return f"error: {e}"
    return repr(value) if isinstance(value, float) else str(value)


def evaluate(node: ast.AST) -> int | float:
    """The value of one node of the syntax tree: numbers, arithmetic, the listed functions and constants."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return checked(node.value)
    if isinstance(node, ast.Constant):
        raise CalculatorError(f"only numbers can be written, not {type(node.value).__name__} values")
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            check_power(left, right)
        return checked(BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](evaluate(node.operand))
    if isinstance(node, ast.Name):
        if node.id not in CONSTANTS:
            raise CalculatorError(f"unknown name {node.id!r} (the names are {', '.join([*FUNCTIONS, *CONSTANTS])})")
        return CONSTANTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        if node.keywords or not 1 <= len(node.args) <= 2:
            raise CalculatorError(f"{node.func.id}() takes one or two numbers")
        return checked(FUNCTIONS[node.func.id](*[evaluate(a) for a in node.args]))
    if isinstance(node, ast.Call):
        raise CalculatorError(f"only these functions can be called: {', '.join(FUNCTIONS)}")
    if isinstance(node, ast.Attribute):
        raise CalculatorError("attributes are not allowed")
    raise CalculatorError(f"{type(node).__name__} is not allowed: only numbers, arithmetic and math functions")


def check_power(base, exponent):
    """Refuse a power whose integer result would exceed MAX_DIGITS before computing it:
    digits(b ** x) ≈ x · log10|b|. Float powers overflow on their own (OverflowError)."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        digits = exponent * math.log10(abs(base))
        if digits > MAX_DIGITS:
            raise CalculatorError(f"the result would have about {digits:,.0f} digits; at most {MAX_DIGITS}")


def checked(value):
    """`value` if it is a finite real number of bounded size (checked after every step, so products of
    big integers stay bounded too)."""
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is not a finite number")
    if isinstance(value, int) and abs(value).bit_length() > MAX_BITS:
        raise CalculatorError(f"the result has more than {MAX_DIGITS} digits")
    return value


# ----------------------------------------------------------------------------- python in the sandbox
STATUS = {"passed": "ok", "failed": "failed", "killed": "killed"}


def run_code(code: str) -> str:
    """Run `code` in the sandbox: a status line, then what it printed (clipped to MAX_RESULT_CHARS)."""
    try:
        result = run_python(code, timeout=PYTHON_TIMEOUT, memory_mb=PYTHON_MEMORY_MB)
    except SandboxUnavailable as e:
        return f"error: the Python sandbox is unavailable on this machine, so the code was not run: {e}"
    except OSError as e:
        return f"error: could not start the Python sandbox: {e}"
    status = f"timed out after {PYTHON_TIMEOUT:g} s" if result.status == "timeout" else STATUS[result.status]
    output = result.output.strip()
    return f"status: {status}\n{clip(output) if output else '(no output)'}"


def clip(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    """`text`, or its start and end with a note of what was cut between (a traceback ends the output)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"
