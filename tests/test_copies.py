"""Deliberate copies between the self-contained model folders stay in sync.

A top-level definition preceded by `# Copied from ttt_hf.<module>.<name>[ with A->B[, C->D]]` must equal the
named definition (with its leading comment lines) after the replacements.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SOURCE_ROOT = Path(__file__).resolve().parent.parent / "src"
MARKER = re.compile(r"^# Copied from (ttt_hf(?:\.\w+)+)\.(\w+)(?: with (.+))?$")


def _definition_name(node: ast.stmt) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if len(targets) == 1 and isinstance(targets[0], ast.Name):
            return targets[0].id
    return None


def _first_line(node: ast.stmt) -> int:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _block(lines: list[str], node: ast.stmt, first: int) -> str:
    """Lines `first` (1-based) to the end of `node`."""
    return "\n".join(lines[first - 1 : node.end_lineno])


def _definition_with_comments(path: Path, name: str) -> str:
    lines = path.read_text().splitlines()
    for node in ast.parse("\n".join(lines)).body:
        if _definition_name(node) == name:
            first = _first_line(node)
            while first > 1 and lines[first - 2].startswith("#") and not MARKER.match(lines[first - 2]):
                first -= 1
            return _block(lines, node, first)
    raise AssertionError(f"{path}: no top-level definition named {name}")


def _copies() -> list[tuple[str, str, str, str, str | None]]:
    """(where, copied text, source module, source name, replacements) of every marker under src/."""
    found = []
    for path in sorted(SOURCE_ROOT.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        starts = {_first_line(node): node for node in tree.body}
        for index, line in enumerate(lines):
            match = MARKER.match(line)
            if match is None:
                continue
            following = node_line = index + 2  # 1-based line after the marker
            while lines[node_line - 1].startswith("#"):
                node_line += 1
            assert node_line in starts, f"{path}:{index + 1}: the marker is not followed by a top-level definition"
            where = f"{path.relative_to(SOURCE_ROOT)}:{index + 1}"
            found.append((where, _block(lines, starts[node_line], following), *match.groups()))
    return found


COPIES = _copies()


def test_the_model_folders_mark_their_copies():
    assert len(COPIES) >= 5


@pytest.mark.parametrize("where, copied, module, name, replacements", COPIES, ids=[c[0] for c in COPIES])
def test_copy_matches_its_source(where, copied, module, name, replacements):
    source = _definition_with_comments(SOURCE_ROOT / Path(*module.split(".")).with_suffix(".py"), name)
    for replacement in (replacements or "").split(","):
        if replacement.strip():
            old, new = (part.strip() for part in replacement.split("->"))
            source = source.replace(old, new)
    assert copied == source, f"{where} differs from {module}.{name}: update the copy (or its marker)"
