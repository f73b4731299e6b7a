"""The code stays readable in pieces and easy to find: no module of src/ or benchmarks/ over
450 lines, no function over 80 (split along the seams that are there), and a module map that
names every module."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")])
MAX_MODULE, MAX_FUNCTION = 450, 80


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_modules_and_functions_stay_under_the_limits(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE, f"{path.name}: split it along a seam"
    long = {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION
    }
    assert not long, f"{path.name}: functions over {MAX_FUNCTION} lines: {long}"


def test_the_module_map_names_every_module():
    """src/cxr/__init__.py's docstring says where each module belongs: a new module, or a
    renamed one, is added there."""
    import re

    import cxr

    text = re.sub(r"\([^)]*\)", "", " ".join(cxr.__doc__.split()))  # entries, no notes
    entries = re.findall(r"(?:: |, )([a-z_]+)\s*(?=[,;.]|$| -)", text)
    modules = {p.stem for p in (ROOT / "src" / "cxr").glob("*.py")} - {"__init__"}
    assert sorted(entries) == sorted(modules), "the module map in src/cxr/__init__.py: " + str(
        sorted(set(entries) ^ modules) or [e for e in entries if entries.count(e) > 1]
    )
