"""The package's architecture, checked statically (``ast``, nothing imported): no import circles,
the trainer's core never imports a task, tasks import only the trainer's public modules, and no
function is longer than 80 lines of code.  ``docs/architecture.md`` explains the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fastgrpo"

# what a task may import from the trainer (docs/architecture.md); anything else is internal
PUBLIC_TRAINER = {"task", "config", "errors", "evaluation", "prompting", "rollout", "sample", "packing",
                  "policy", "sft", "supervised", "distributed", "requirements", "vision"}
# old module paths kept for one release as re-exports of the task packages (not core)
DEPRECATED = {"fastgrpo.trainer.tasks", "fastgrpo.trainer.multiturn", "fastgrpo.trainer.routing_sft"}
MAX_CODE_LINES = 80
# circles known and tolerated (none today; a new one needs its way out written here)
KNOWN_CIRCLES: list[list[str]] = []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()
PACKAGES = {m for m, p in MODULES.items() if p.name == "__init__.py"}
TASKS = {m for m in PACKAGES if m.startswith("fastgrpo.tasks.") and m.count(".") == 2}
CORE = {m for m in MODULES if m.startswith("fastgrpo.trainer") and m not in DEPRECATED}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if module not in PACKAGES:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """``(imported module, names taken from it)`` for every import statement, at any depth
    (an import inside a function counts as much as one at the top)."""
    out = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(s, []) for s in subs] or [(target, names)]
            if subs and len(subs) < len(names):
                out.append((target, [n for n in names if f"{target}.{n}" not in MODULES]))
    return [(t, n) for t, n in out if t in MODULES]


def _graph() -> dict[str, set[str]]:
    """Module -> the modules importing it runs: the target and its packages' ``__init__``
    (except packages the importing module is itself inside: those are already importing)."""
    graph = {}
    for m in MODULES:
        edges = set()
        for target, _ in _imports(m):
            parts = target.split(".")
            for k in range(1, len(parts) + 1):
                t = ".".join(parts[:k])
                if t in MODULES and t != m and not (m + ".").startswith(t + ".") and not (
                        t in PACKAGES and m.startswith(t + ".")):
                    edges.add(t)
        graph[m] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _reach(graph, start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        v = todo.pop()
        for w in graph[v]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _task_of(module: str) -> str | None:
    return next((t for t in TASKS if module == t or module.startswith(t + ".")), None)


def test_the_checks_see_the_package():
    assert {"fastgrpo.trainer.loop", "fastgrpo.ops.loss", "fastgrpo.tasks.routing.task"} <= set(MODULES)
    assert TASKS == {"fastgrpo.tasks.arithmetic", "fastgrpo.tasks.charts", "fastgrpo.tasks.routing"}
    assert "fastgrpo.tasks.routing.data" in _graph()["fastgrpo.tasks.routing.task"]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert _cycles(_graph()) == KNOWN_CIRCLES


def test_known_circles_are_not_circles_at_import_time():
    """Counting only module-level imports, a known circle is none (each import in it that
    closes the circle sits inside a function)."""
    top = {}
    for m in MODULES:
        tree = ast.parse(MODULES[m].read_text())
        targets = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                targets.add(_resolve(m, node))
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        top[m] = {t for t in targets if t in MODULES and t != m}
    for circle in KNOWN_CIRCLES:
        assert _cycles({m: top[m] & set(circle) for m in circle}) == []


def test_core_never_imports_a_task():
    graph = _graph()
    direct = {(m, t) for m in CORE for t in graph[m] if _task_of(t)}
    assert direct == set()
    reached = {t for t in _reach(graph, CORE) if _task_of(t)}
    assert reached == set(), "the trainer's core reaches a task through other modules"


def test_tasks_import_only_the_trainers_public_modules():
    bad = []
    for m in MODULES:
        if not _task_of(m):
            continue
        for target, names in _imports(m):
            if target.startswith("fastgrpo.trainer"):
                leaf = target.split(".")[2] if target.count(".") >= 2 else None
                if leaf is not None and leaf not in PUBLIC_TRAINER or target in DEPRECATED:
                    bad.append((m, target))
                bad += [(m, f"{target}.{n}") for n in names if n.startswith("_")]
    assert bad == []


def _code_lines(fn: ast.AST, lines: list[str]) -> int:
    """Lines of code of a function: its span less blank lines, comment lines and docstrings."""
    skip = set()
    for node in ast.walk(fn):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            skip.update(range(body[0].lineno, body[0].end_lineno + 1))
    count = 0
    for i in range(fn.lineno, fn.end_lineno + 1):
        text = lines[i - 1].strip()
        if i not in skip and text and not text.startswith("#"):
            count += 1
    return count


def _long_functions(source: str, where: str) -> list[tuple[str, int]]:
    lines = source.splitlines()
    return [(f"{where}:{n.lineno} {n.name}", c) for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (c := _code_lines(n, lines)) > MAX_CODE_LINES]


def test_the_length_check_counts_code_only():
    body = "\n".join(f"    x{i} = {i}  # code" for i in range(81))
    doc = '    """' + "\n".join(["doc"] * 50) + '"""\n'
    assert _long_functions(f"def f():\n{doc}{body}\n", "t") == [("t:1 f", 82)]
    assert _long_functions(f"def f():\n{doc}" + "\n    # note\n" * 90 + "    return 1\n", "t") == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_over_80_lines_of_code(module):
    assert _long_functions(MODULES[module].read_text(), module) == []
