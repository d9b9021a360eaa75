"""Every ```python block of README.md runs as written, each in a fresh process.

A block runs as a script in its own temporary folder, where `configs/` links to the repository's, with
HF_HUB_OFFLINE=1. A block that needs more than the test extras says so in an HTML comment on the line just before
its fence, entries separated by commas: `<!-- requires: cuda, transformers>=5.24, gguf -->`. `cuda` marks the case
`gpu` (skipped without a CUDA device, run by `pytest -m gpu`); every other entry is a requirement on an installed
distribution (PEP 508), and the case is skipped, saying which, when one is not met.
"""

import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"^(?:<!-- requires: (?P<requires>[^\n]*?) -->\n)?```python\n(?P<code>.*?)^```$", re.M | re.S)
TIMEOUT_S = 300


def readme_snippets() -> list:
    text = README.read_text(encoding="utf-8")
    cases = []
    for match in BLOCK.finditer(text):
        requires = [entry.strip() for entry in (match["requires"] or "").split(",") if entry.strip()]
        line = text.count("\n", 0, match.start("code"))  # the fence's line number
        marks = [pytest.mark.gpu] if "cuda" in requires else []
        requirements = [entry for entry in requires if entry != "cuda"]
        cases.append(pytest.param(match["code"], requirements, id=f"README.md:{line}", marks=marks))
    return cases


def unmet(requirement: str) -> str | None:
    """Why `requirement` is not met here, or None."""
    wanted = Requirement(requirement)
    try:
        installed = version(wanted.name)
    except PackageNotFoundError:
        return f"needs {requirement}, which is not installed"
    if not wanted.specifier.contains(installed, prereleases=True):
        return f"needs {requirement}, found {installed}"
    return None


def test_every_python_block_is_found():
    assert len(readme_snippets()) == README.read_text(encoding="utf-8").count("```python")


@pytest.mark.parametrize(("code", "requirements"), readme_snippets())
def test_readme_snippet_runs(code, requirements, tmp_path):
    reasons = [reason for reason in map(unmet, requirements) if reason]
    if reasons:
        pytest.skip("; ".join(reasons))
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "snippet.py").write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "snippet.py"],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, f"exit status {result.returncode}\n--- snippet\n{code}--- stderr\n{result.stderr}"
