"""The house rule: each package imports only its own layer and the ones below it, and no module imports
itself back through others. Imports inside functions count: a lazy import hides a circle, it does not remove it."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "slowllama"

# Lowest first. A top-level module not named here is a floor module (errors, faults, compat, fsutil, paths,
# device, blockfile): plain file, tensor-file and device mechanics that know nothing of models or runs.
LAYERS = ["floor", "model", "formats", "data", "engine", "inference", "run", "cli"]
# Entry points above everything: `python -m slowllama` and the documented `python -m slowllama.selftest`.
ENTRY_SHIMS = {"__main__": "cli", "selftest": "cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top in LAYERS:
        return top
    return ENTRY_SHIMS.get(top, "floor")


def imports(path: Path) -> set[str]:
    """Every slowllama module this file imports (module names under the package, '' for the package)."""
    mod = module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    if not mod:
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else list(package)
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and (node.module == "slowllama" or node.module.startswith("slowllama.")):
                target = node.module.split(".")[1:]
            else:
                continue
            for a in node.names:  # `from . import device` imports the module slowllama.device
                sub = ".".join(target + [a.name])
                found.add(sub if (PACKAGE / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE / sub.replace(".", "/")).is_dir() else ".".join(target))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("slowllama."):
                    found.add(a.name[len("slowllama."):])
    return {f for f in found if f != mod}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def upward(g: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({layer(m)}) imports {i} ({layer(i)})" for m, deps in g.items() for i in sorted(deps)
            if i and LAYERS.index(layer(i)) > LAYERS.index(layer(m))]


def circles(g: dict[str, set[str]]) -> list[str]:
    state, stack, found = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                found.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    return found


def test_no_module_imports_a_layer_above_its_own():
    bad = upward(graph())
    assert not bad, "\n".join(bad)


def test_there_are_no_import_circles():
    found = circles(graph())
    assert not found, "\n".join(found)


def test_the_checker_sees_lazy_imports_and_circles(tmp_path, monkeypatch):
    """The rule is only as good as the graph: an import inside a function is found, upward and circular ones reported."""
    import sys

    pkg = tmp_path / "slowllama"
    (pkg / "formats").mkdir(parents=True)
    (pkg / "engine").mkdir()
    for f in ("__init__.py", "formats/__init__.py", "engine/__init__.py", "fsutil.py"):
        (pkg / f).write_text("")
    (pkg / "formats" / "meta.py").write_text("def f():\n    from ..engine import store\n")
    (pkg / "engine" / "store.py").write_text("from ..formats.meta import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    g = graph()
    assert g["formats.meta"] == {"engine.store"} and g["engine.store"] == {"formats.meta"}
    assert upward(g) == ["formats.meta (formats) imports engine.store (engine)"]
    assert circles(g) == ["engine.store -> formats.meta -> engine.store"]
