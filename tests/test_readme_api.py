"""Every name the README's Python examples use is importable from ``dynavit`` itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import dynavit

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_parse_and_use_only_the_top_level_api():
    blocks = _python_blocks()
    assert len(blocks) >= 5
    used: set[str] = set()
    for code in blocks:
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dynavit"):
                assert node.module == "dynavit", f"deep import in the README: from {node.module} import ..."
                used |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                assert all(a.name in ("dynavit", "torch") for a in node.names), ast.unparse(node)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "dynavit":
                used.add(node.attr)
    assert {"load", "Menu", "Controller", "ExecConfig", "run_sweep"} <= used
    missing = sorted(n for n in used if not hasattr(dynavit, n))
    assert missing == []
    assert set(used) <= set(dynavit.__all__)
