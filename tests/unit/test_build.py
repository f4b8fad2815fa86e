"""The optional compiled build (setup.py, scripts/build-mypyc): the package says which variant
runs, and every module setup.py would compile exists (a renamed module must not silently drop
out of the compiled build)."""

from __future__ import annotations

import ast
from pathlib import Path

import mailgate
import mailgate.smtp.server

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_says_which_variant_runs() -> None:
    compiled_file = not mailgate.smtp.server.__file__.endswith(".py")
    assert mailgate.__compiled__ is compiled_file


def test_every_module_of_the_compiled_build_exists() -> None:
    tree = ast.parse((ROOT / "setup.py").read_text())
    [modules] = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "MYPYC_MODULES" for t in node.targets)
    ]
    assert isinstance(modules, ast.List)
    paths = [
        e.value for e in modules.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
    ]
    assert "src/mailgate/smtp/server.py" in paths
    assert [p for p in paths if not (ROOT / p).is_file()] == []
