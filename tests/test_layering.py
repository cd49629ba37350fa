"""The layers stay one-way: ops -> state -> config -> model -> runtime -> server/cluster -> cli.

Every module's imports are read from its syntax tree, imports inside functions and under
TYPE_CHECKING included, so a lazy import cannot hide a dependency on a higher layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rwkvstate

PACKAGE = Path(rwkvstate.__file__).resolve().parent
# layer of each top-level module or subpackage; a module may import only from its own layer or below
LAYERS = {
    "errors": 0, "version": 0, "tokenizer": 0, "stdlib_corpus": 0,  # imports nothing of rwkvstate
    "ops": 1,
    "state": 2,
    "config": 3,
    "model": 4,
    "runtime": 5, "evaluation": 5,
    "server": 6, "cluster": 6,
    "cli": 7,
    "": 8,  # the package root: the public API, importing from everywhere
}  # fmt: skip
# private fields of Session (and the engine's parts) that only runtime/ may touch
SESSION_PRIVATE = {"_slot", "_marks", "_origin", "_last_generation", "_stream", "_lost", "_closed"}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(["rwkvstate", *parts]), path))
    return out


def _is_package(module: str) -> bool:
    return (PACKAGE.joinpath(*module.split(".")[1:]) / "__init__.py").exists()


def _imported(module: str, path: Path, tree: ast.AST) -> list[tuple[str, int]]:
    """(absolute module name, line) of every rwkvstate import in the tree."""
    package = module if _is_package(module) else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "rwkvstate"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "rwkvstate":
                continue
            for alias in node.names:  # `from .. import x` may name a submodule
                sub = f"{target}.{alias.name}"
                is_module = PACKAGE.joinpath(*sub.split(".")[1:]).with_suffix(".py").exists() or _is_package(sub)
                out.append((sub if is_module else target, node.lineno))
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top not in LAYERS:
        pytest.fail(f"{module} belongs to no layer: add {top!r} to LAYERS in {Path(__file__).name}")
    return LAYERS[top]


def test_every_import_goes_to_the_same_layer_or_below():
    violations = []
    for module, path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        for target, line in _imported(module, path, tree):
            if _layer(target) > _layer(module):
                violations.append(f"{path.relative_to(PACKAGE)}:{line}: {module} imports {target}")
    assert not violations, "imports from a higher layer:\n" + "\n".join(violations)


def test_only_runtime_touches_session_private_fields():
    """Everything outside runtime/ reads a Session through its public methods."""
    violations = []
    for module, path in _modules():
        if module.startswith("rwkvstate.runtime"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in SESSION_PRIVATE:
                is_self = isinstance(node.value, ast.Name) and node.value.id == "self"
                if not is_self:
                    violations.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: .{node.attr}")
    assert not violations, "private session fields used outside runtime/:\n" + "\n".join(violations)


def test_the_checker_sees_lazy_imports(tmp_path):
    """A function-level import from a higher layer is found (the test above cannot pass vacuously)."""
    source = "def f():\n    from ..runtime.engine import Engine\n    return Engine\n"
    found = _imported("rwkvstate.state.example", tmp_path / "example.py", ast.parse(source))
    assert found == [("rwkvstate.runtime.engine", 2)]
    assert _layer(found[0][0]) > _layer("rwkvstate.state.example")
