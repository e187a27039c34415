"""The house rules, checked on the source: stages import only stages below them (function-local
imports included), no import cycle anywhere, and nothing in tests/ or bench/ flips a module constant
of cpt to change its behaviour.

    python -m pytest tests/test_layers.py -q
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "cpt"

# Lowest first. A stage may import its own modules and any stage of a lower rank, never one of the same
# rank (data and model know nothing of each other) or above.
RANKS = [
    {"runtime", "checkpoint"},  # leaves: the machine and the launch; writing checkpoint folders
    {"config"},
    {"data", "model", "console"},  # console: what a run prints (log lines, the libraries quieted)
    {"optim"},
    {"plan"},
    {"speed"},
    {"build", "distributed", "evaluate", "track"},
    {"train", "export", "report"},
    {"api", "demo", "cli", "compat"},  # the faces
]
FACES = RANKS[-1]
RANK = {stage: i for i, stages in enumerate(RANKS) for stage in stages}


def _module_name(path: Path) -> str:
    parts = ["cpt", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every cpt module that `path` imports, at module level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def test_every_stage_has_a_rank():
    stages = {_stage(m) for m in _graph()} - {""}
    assert stages <= set(RANK), f"stages without a place in RANKS: {sorted(stages - set(RANK))}"


def test_stages_import_only_stages_below_them():
    wrong = []
    for module, targets in _graph().items():
        stage = _stage(module)
        for target in targets:
            other = _stage(target)
            if not stage or not other or other == stage or (stage in FACES and other in FACES and other != "cli"):
                continue
            if RANK[other] >= RANK[stage]:
                wrong.append(f"{module} imports {target} ({other} is not below {stage})")
    assert not wrong, "\n".join(sorted(wrong))


def test_nothing_imports_the_command_line_face():
    users = [m for m, targets in _graph().items() if any(_stage(t) == "cli" for t in targets) and _stage(m) != "cli"]
    assert not users, users


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def _cpt_module_aliases(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("cpt")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cpt"):
            names |= {a.asname or a.name for a in node.names if a.name.islower()}
    return names


def test_tests_and_benchmarks_flip_no_module_constants():
    """Behaviour is chosen by arguments and config, never by assigning a cpt module's UPPER_CASE name
    (or monkeypatching it) from outside."""
    flips = []
    for path in [*ROOT.joinpath("tests").glob("*.py"), *ROOT.joinpath("bench").glob("*.py")]:
        tree = ast.parse(path.read_text(), str(path))
        aliases = _cpt_module_aliases(tree)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr.isupper() and _root_name(t.value) in aliases | {"cpt"}:
                    flips.append(f"{path.name}:{node.lineno} assigns {ast.unparse(t)}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).isupper()):
                flips.append(f"{path.name}:{node.lineno} sets {ast.unparse(node.args[0])}.{node.args[1].value}")
    assert not flips, "\n".join(flips)


def _root_name(node: ast.AST) -> str:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    """The import scan itself: a function-local import and a relative one are both found."""
    pkg = tmp_path / "cpt"
    (pkg / "speed").mkdir(parents=True)
    (pkg / "speed" / "__init__.py").write_text("")
    (pkg / "speed" / "a.py").write_text("def f():\n    from cpt.train import Trainer\n")
    (pkg / "speed" / "b.py").write_text("from .a import f\n")
    (pkg / "train.py").write_text("")
    global SRC
    saved, SRC = SRC, pkg
    try:
        graph = _graph()
    finally:
        SRC = saved
    assert graph["cpt.speed.a"] == {"cpt.train"}
    assert graph["cpt.speed.b"] == {"cpt.speed.a"}
