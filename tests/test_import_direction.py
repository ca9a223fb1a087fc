"""Imports point one way: user mods -> IR -> analysis -> codegen, with the API on top.

Every module's imports are read from its source (``ast``, top-level and function-level alike):
back ends (``codegen``) never import the API or the analysis, and the IR, its semantics and
the op table import neither codegen nor the API.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
API = ("flexattn.api", "flexattn.dispatch", "flexattn.compile", "flexattn.cli", "flexattn.paged", "flexattn.facts")
CORE = ("flexattn/ir.py", "flexattn/semantics.py", "flexattn/ops.py")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a import b`` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", sorted((ROOT / "codegen").rglob("*.py")), ids=_relative)
def test_back_ends_never_import_the_api_or_the_analysis(path):
    wrong = {name for name in _imports(path) if _within(name, API + ("flexattn.analysis", "flexattn.trace"))}
    assert not wrong, f"{_relative(path)} imports {sorted(wrong)}: back ends read the Call and its facts"


@pytest.mark.parametrize("name", CORE)
def test_the_ir_imports_neither_codegen_nor_the_api(name):
    wrong = {n for n in _imports(ROOT / name) if _within(n, API + ("codegen", "flexattn.analysis"))}
    assert not wrong, f"{name} imports {sorted(wrong)}"


def test_the_walk_sees_the_imports_it_checks():
    """The check reads real imports: the API imports the dispatch table, which names codegen's modules."""
    assert "flexattn.dispatch" in _imports(ROOT / "flexattn/api.py")
    assert "codegen.paths" in _imports(ROOT / "flexattn/dispatch.py")
