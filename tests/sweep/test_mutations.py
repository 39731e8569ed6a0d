"""Property-based: a valid training config or search space, mutated at random (a key deleted,
misspelled or added, a value replaced by one of the wrong type or range), is either accepted
and runs, or rejected with ONE line naming the file, exit code 2, and no traceback."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from conftest import tiny_train_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsify.cli import train_main  # `python -m sparsify.train` in-process
from sweep.run import main as sweep_main

JUNK_VALUES = [None, -1, 0, 1, 2.5, -0.5, 1e12, "", "x", "blocks.1.hook_resid_pre", [], {}, True, [1, 2]]
KEY_CHARS = "abcdefghijklmnopqrstuvwxyz_."


def paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a node below the root (dict keys and list indices)."""
    found = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for key, value in items:
        found.append((*prefix, key))
        found.extend(paths(value, (*prefix, key)))
    return found


def parent_of(tree: Any, path: tuple) -> Any:
    for key in path[:-1]:
        tree = tree[key]
    return tree


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any]) -> dict[str, Any]:
    """`valid` after 1-3 random edits."""
    tree = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        candidates = paths(tree)
        if not candidates:
            break
        path = draw(st.sampled_from(candidates))
        parent = parent_of(tree, path)
        op = draw(st.sampled_from(["delete", "rename", "replace", "add"]))
        if isinstance(parent, list) and op in ("delete", "rename", "add"):
            op = "replace"
        key = path[-1]
        if op == "delete":
            del parent[key]
        elif op == "rename":
            cut = draw(st.integers(0, len(str(key))))
            new_key = str(key)[:cut] + draw(st.text(KEY_CHARS, max_size=2)) + str(key)[cut + 1 :]
            if new_key and new_key not in parent:
                parent[new_key] = parent.pop(key)
        elif op == "replace":
            parent[key] = draw(st.sampled_from(JUNK_VALUES))
        else:
            parent[draw(st.text(KEY_CHARS, min_size=1, max_size=8))] = draw(st.sampled_from(JUNK_VALUES))
    return tree


def run_cli(main: Any, tree: dict[str, Any], extra: list[str]) -> tuple[int, str, Path]:
    """Write `tree` to a YAML file in a fresh folder (also the working directory) and run."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mutated.yaml"
        path.write_text(yaml.safe_dump(tree))
        err, cwd = io.StringIO(), os.getcwd()
        os.chdir(folder)
        try:
            with contextlib.redirect_stderr(err):
                code = main([str(path), *extra])
        finally:
            os.chdir(cwd)
        return code, err.getvalue(), path


def assert_accepted_or_one_line(code: int, err: str, path: Path) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err, err
    if code == 0:
        return
    # a config that trains but diverges (e.g. lr 1e12) ran: exit 1, one line saying so
    assert code in (1, 2), err
    assert len(lines) == 1, err
    if code == 2:
        assert str(path) in lines[0], lines[0]
    else:
        assert "training diverged" in lines[0], lines[0]


SETTINGS = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure here is never a fluke
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_mutated_training_configs_run_or_fail_in_one_line(tiny_model_dir, corpus_dir, tmp_path):
    valid = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, save_dir="runs", eval_n_samples=8)

    @settings(SETTINGS, max_examples=25)
    @given(mutated(valid))
    def check(tree: dict[str, Any]) -> None:
        code, err, path = run_cli(train_main, tree, [])
        assert_accepted_or_one_line(code, err, path)

    check()


def test_mutated_search_spaces_dry_run_or_fail_in_one_line(tiny_model_dir, corpus_dir, tmp_path):
    base = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path)
    del base["loss"]
    valid = {
        "name": "mutated",
        "num_samples": 2,
        "base_config": base,
        "objectives": [{"metric": "eval/L0"}, {"metric": "eval/ce_loss_increase"}],
        "arms": {
            "local": {
                "loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
                "search": {"loss.sparsity.coeff": {"type": "loguniform", "low": 0.01, "high": 1.0}},
                "initial_points": [{"loss.sparsity.coeff": 0.1}],
            },
            "e2e": {
                "loss": {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1.0}},
                "set": {"saes.dict_size_to_input_ratio": 4},
                "search": {"lr": {"type": "categorical", "values": [1e-3, 3e-3]}},
            },
        },
    }

    @settings(SETTINGS, max_examples=150)
    @given(mutated(valid))
    def check(tree: dict[str, Any]) -> None:
        code, err, path = run_cli(sweep_main, tree, ["--dry-run"])
        assert code in (0, 2), err
        assert_accepted_or_one_line(code, err, path)

    check()
