"""Developer tooling: the Make targets the README names, the pre-commit config, and a lint-clean
tree (pyright, ~3 minutes here, runs in `make check`, not in the tests)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("target", "commands"),
    [
        ("check", ["ruff check sparsify sweep tests bench", "ruff format --check", "pyright"]),
        ("type", ["pyright"]),
        ("format", ["ruff format sparsify sweep tests bench", "ruff check --fix"]),
        ("test", ["pytest -q"]),
        ("test-all", ['pytest -q -m ""']),
        ("pre-commit", ["pre-commit install --hook-type pre-commit --hook-type pre-push"]),
    ],
)
def test_make_target_runs_the_tools(target, commands):
    make = shutil.which("make")
    assert make, "make is needed for the README's commands"
    # -n: print the recipe; the install step is satisfied by a fresh stamp or printed too
    out = subprocess.run([make, "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for command in commands:
        assert command in out, f"make {target} does not run {command!r}:\n{out}"


def test_pre_commit_config_is_valid():
    result = subprocess.run(
        [str(BIN / "pre-commit"), "validate-config", ".pre-commit-config.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_tree_is_lint_and_format_clean():
    for args in (
        ["check", "sparsify", "sweep", "tests", "bench"],
        ["format", "--check", "sparsify", "sweep", "tests", "bench"],
    ):
        result = subprocess.run([str(BIN / "ruff"), *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
