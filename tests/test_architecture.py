"""The architecture as tests: module sizes, and first-party imports where a reader (and lint-imports) sees them.

`lint-imports` (run by `make test`) checks the layers; these check the two rules it cannot: each module stays
small enough to own one thing, and a first-party import sits at module top unless a comment on it (or the line
above) says why it must wait (a heavy third-party module behind it, or an import cycle a lazy import breaks).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "pipelines", "monitoring", "service", "benchmarks")
MAX_LINES = 500


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "migrations" not in p.parts)


def test_no_module_is_over_the_limit() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: split them by what they own"


def _function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each first-party import inside a function of `path`."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return found


def _explained(lines: list[str], lineno: int) -> bool:
    """A comment on a line of the import's block (consecutive import lines), or on the line just above it."""
    def is_import(i: int) -> bool:
        return 0 <= i < len(lines) and lines[i].strip().startswith(("from ", "import "))

    first = last = lineno - 1
    while is_import(first - 1):
        first -= 1
    while is_import(last + 1):
        last += 1
    block = lines[first:last + 1]
    return any("#" in line for line in block) or (first > 0 and lines[first - 1].strip().startswith("#"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_first_party_imports_inside_functions_say_why(path: Path) -> None:
    lines = path.read_text().splitlines()
    silent = [f"{path.relative_to(ROOT)}:{n} imports {m}" for n, m in _function_imports(path)
              if not _explained(lines, n)]
    assert silent == [], "move these imports to module top, or say on the line why they must be lazy"
