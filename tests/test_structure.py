"""The package's layering, read from its source: no import cycles, and the optimizer core never imports the
training harness (the harness and the CLI sit on top of the core, not beside it)."""

import ast
from pathlib import Path

import subspace_optim

PACKAGE = Path(subspace_optim.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: package modules it imports}, counting imports inside functions too (a lazy import is still a
    dependency)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import checkpoint` imports the submodule
                    deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_optimizer_core_does_not_import_the_harness():
    graph = import_graph()
    harness = ("subspace_optim.train", "subspace_optim.experiments", "subspace_optim.cli", "subspace_optim.__main__",
               "subspace_optim.memory_estimate")
    core = [m for m in graph if m != "subspace_optim" and not m.startswith(harness)]
    assert {"subspace_optim.optimizer", "subspace_optim.memory_measured", "subspace_optim.rso"} <= set(core)
    for module in core + ["subspace_optim"]:
        assert not {d for d in graph[module] if d.startswith(harness)}, module


ENGINE = sorted((PACKAGE / "engine").glob("*.py"))
CORE = [PACKAGE / "optimizer.py", *ENGINE]


def _defs(path: Path, kinds) -> list[tuple[str, int]]:
    """(name, lines) of every definition of ``kinds`` in a file, nested ones included."""
    return [(f"{path.name}:{node.name}", node.end_lineno - node.lineno + 1)
            for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, kinds)]


def test_the_optimizer_is_a_face_over_the_engine():
    """Issue 24's shape: small classes, short functions and files, the projector looked up in one place on the
    step path, low-bit codes touched through lowbit only, never from the torch.optim face."""
    classes = [d for path in PACKAGE.rglob("*.py") for d in _defs(path, ast.ClassDef)]
    assert max(lines for _, lines in classes) <= 200, max(classes, key=lambda d: d[1])
    functions = [d for path in CORE for d in _defs(path, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert [d for d in functions if d[1] > 40] == []
    assert {path.name: n for path in ENGINE if (n := len(path.read_text().splitlines())) > 250} == {}
    assert len((PACKAGE / "optimizer.py").read_text().splitlines()) <= 300
    lookups = [path.name for path in CORE for _ in range(path.read_text().count("get_projector("))]
    assert lookups == ["subspace.py"]
    assert "lowbit." not in (PACKAGE / "optimizer.py").read_text()


def test_the_engine_never_imports_the_optimizer_face():
    graph = import_graph()
    engine = [m for m in graph if m.startswith("subspace_optim.engine")]
    assert len(engine) >= 6
    for module in engine:
        assert "subspace_optim.optimizer" not in graph[module], module
