"""A wheel of the package holds what an installed `ttt-hf` reads at run time: its modules and the demo's configs."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ttt_hf.demo import demo_config_names

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]

# Run from a folder outside the checkout, with only the installed copy on the path: where does the demo read from?
RESOLVE_CONFIGS = """
import json
from ttt_hf import demo
missing = [name for name in demo.demo_config_names() if not (demo.DEFAULT_CONFIGS / f"{name}.json").is_file()]
print(json.dumps({"module": demo.__file__, "configs": str(demo.DEFAULT_CONFIGS), "missing": missing}))
"""


def _pip(*args: str) -> None:
    done = subprocess.run([*PIP, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_wheel_ships_the_demo_configs_and_an_install_finds_them(tmp_path):
    # Built from a copy of what the build reads: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "configs", source / "configs")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(tmp_path / "dist"), str(source))
    (wheel,) = (tmp_path / "dist").glob("ttt_hf-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"ttt_hf/configs/{name}.json" for name in demo_config_names()} <= names
    modules = {path.relative_to(ROOT / "src").as_posix() for path in (ROOT / "src" / "ttt_hf").rglob("*.py")}
    assert modules <= names, sorted(modules - names)

    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", RESOLVE_CONFIGS],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert Path(found["module"]) == target / "ttt_hf" / "demo.py"  # the installed copy, not the checkout
    assert Path(found["configs"]) == target / "ttt_hf" / "configs" and found["missing"] == []

    # `ttt-hf demo` from the installed copy: the parts that read the configs (TOVA's reads a model package).
    demo = subprocess.run(
        [sys.executable, "-m", "ttt_hf.cli", "demo", "--part", "ttt", "--part", "block-state"],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "== TTT: Test-Time Training layers" in demo.stdout and demo.stdout.rstrip().endswith("demo: PASS")
