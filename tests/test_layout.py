"""The package's layout: lower layers never import higher ones, no import cycles, no source file over 400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mplus"
# Each subpackage may import only from its own rank or below (the facade mplus/__init__.py may import any).
RANKS = {"formats": 0, "data": 1, "llama": 2, "memory": 3, "train": 4, "apps": 5}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The mplus modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mplus"):
            for alias in node.names:  # `from mplus.memory import ltm` names a module, `from mplus.x import f` not
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (SRC.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; write `from mplus.<package>.<module> import ...`")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mplus")}
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in SRC.rglob("*.py")}


def test_no_file_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"source files over {MAX_LINES} lines: {long}"


def test_every_module_lives_in_a_layer():
    loose = [m for m in graph() if m.count(".") == 1 and m.split(".")[1] not in RANKS | {"__main__": 0}]
    assert not loose, f"modules outside the subpackages {sorted(RANKS)}: {loose}"


@pytest.mark.parametrize("package", sorted(RANKS))
def test_lower_layers_never_import_higher_ones(package):
    bad = []
    for mod, deps in graph().items():
        if mod.split(".")[1:2] != [package]:
            continue
        for dep in deps:
            parts = dep.split(".")
            if len(parts) < 2 or parts[1] not in RANKS:
                bad.append(f"{mod} -> {dep} (the facade)")
            elif RANKS[parts[1]] > RANKS[package]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles():
    g = {m: {d for d in deps if d in graph_keys} for graph_keys in [set(graph())] for m, deps in graph().items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in g[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m, [m])
