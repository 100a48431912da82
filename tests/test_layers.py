"""The package's floors: every import goes down a floor (or stays inside its own subpackage), and no two
modules import each other, directly or round a circle — imports inside functions included.

FLOORS is the table docs/architecture.md explains. A new module takes the floor of its subpackage; a new
top-level module or subpackage needs a row here, and a reason for its floor.
"""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FLOORS = {  # a module, or a subpackage (for all its modules) -> its floor
    "picochat": 0, "picochat.paths": 0, "picochat.hw": 0, "picochat.atomic": 0, "picochat.sandbox": 0,
    "picochat.kernels": 1,
    "picochat.model": 2, "picochat.quant": 2, "picochat.tokenizer": 2,
    "picochat.formats": 3, "picochat.data": 3,
    "picochat.hub": 4,
    "picochat.load": 5,
    "picochat.engine": 6,
    "picochat.backends": 7,
    "picochat.eval": 8, "picochat.train": 8,
    "picochat.apps": 9,
    "picochat.serve": 10,
    "picochat.cli": 11,
    "picochat.__main__": 12,  # `python -m picochat`: the command line
}
# The one import between homes on the same floor: training's validation is the evaluation's bits per byte.
SIDEWAYS = {("picochat.train", "picochat.eval")}


def modules_of(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package folder under `root`."""
    found = {}
    for path in sorted((root / "picochat").rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement of the file, at any depth, that names the package:
    a module of it, or — where the name leads nowhere — that name (which layer_problems reports)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package (a package's __init__ is its own package)
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        ours = [t for t in dict.fromkeys(targets) if t == "picochat" or t.startswith("picochat.")]
        out += [(t, node.lineno) for t in ours if t != name]
    return out


def home(name: str, floors: dict[str, int]) -> str:
    """The FLOORS entry a module belongs to: the longest one that is it or a subpackage above it (the root
    package's own entry is for its __init__ alone: a new top-level module needs a row of its own)."""
    parts = name.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in floors:
            return ".".join(parts[:n])
    if name in floors:
        return name
    raise KeyError(name)


def layer_problems(root: Path, floors: dict[str, int] = FLOORS, sideways=SIDEWAYS) -> list[str]:
    """What breaks the floors: modules without a floor, imports that go up or sideways, import circles."""
    modules = modules_of(root)
    problems, graph = [], {}
    for name, path in modules.items():
        try:
            own = home(name, floors)
        except KeyError:
            problems.append(f"{path.relative_to(root)}: {name} has no floor: give it a row in FLOORS")
            continue
        graph[name] = imports_of(name, path, modules)
        for target, line in graph[name]:
            if target not in modules:
                problems.append(f"{path.relative_to(root)}:{line}: {name} imports {target}, which does not exist")
                continue
            other = home(target, floors)
            if own == other or floors[own] > floors[other] or (own, other) in sideways:
                continue
            way = "up" if floors[own] < floors[other] else "sideways"
            problems.append(f"{path.relative_to(root)}:{line}: {name} (floor {floors[own]}) imports {target} "
                            f"(floor {floors[other]}): an import {way}")
    return problems + [describe_circle(c, graph, modules, root) for c in circles(graph)]


def circles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """One circle of imports per strongly connected group of modules (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def describe_circle(group: list[str], graph, modules, root: Path) -> str:
    """The circle as 'a.py:3 -> b.py:7 -> a', following imports within the group from its first module."""
    path, seen, at = [], set(), group[0]
    while at not in seen:
        seen.add(at)
        target, line = next((t, n) for t, n in graph[at] if t in group)
        path.append(f"{modules[at].relative_to(root)}:{line}")
        at = target
    return "an import circle: " + " -> ".join(path) + f" -> {at}"


def test_every_import_goes_down_a_floor():
    problems = layer_problems(ROOT)
    assert not problems, "\n".join(problems)


def plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_a_planted_upward_import_is_named_with_its_file_and_line(tmp_path):
    root = plant(tmp_path, {
        "picochat/__init__.py": "",
        "picochat/hw.py": """\
            import os

            def cores():
                from .serve import app  # inside a function: still an import
                return app
            """,
        "picochat/serve/__init__.py": "",
        "picochat/serve/app.py": "from .. import hw\n",
    })
    problems = layer_problems(root)
    assert any(p.startswith("picochat/hw.py:4: picochat.hw (floor 0) imports picochat.serve.app (floor 10)")
               for p in problems), problems
    assert any(p.startswith("an import circle: ") and "picochat/hw.py:4" in p for p in problems), problems


def test_a_sideways_import_and_a_module_without_a_floor_are_refused(tmp_path):
    root = plant(tmp_path, {
        "picochat/__init__.py": "",
        "picochat/model/__init__.py": "",
        "picochat/model/gpt.py": "from ..quant.layers import QLinear\n",
        "picochat/quant/__init__.py": "",
        "picochat/quant/layers.py": "QLinear = None\n",
        "picochat/newthing.py": "import picochat.hw\n",
        "picochat/hw.py": "",
    })
    problems = layer_problems(root)
    assert any("picochat/model/gpt.py:1:" in p and "an import sideways" in p for p in problems), problems
    assert any("picochat.newthing has no floor" in p for p in problems), problems


def test_help_answers_without_importing_torch():
    """`picochat --help` and `picochat COMMAND --help` for every command: the CLI's table imports no torch."""
    probe = textwrap.dedent("""\
        import contextlib, io, sys
        from picochat.cli import COMMANDS, build_parser
        for argv in [["--help"]] + [[name, "--help"] for name in COMMANDS]:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                build_parser().parse_args(argv)
        print(len(COMMANDS), sorted(m for m in ("torch", "numpy", "fastapi") if m in sys.modules))
        """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    count, imported = result.stdout.split(" ", 1)
    assert int(count) >= 15 and "torch" not in imported, result.stdout
