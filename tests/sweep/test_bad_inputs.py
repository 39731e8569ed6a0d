"""The catalogue of bad input (docs/design.md §11): each mistake in a training config or a search
space gets ONE line on stderr naming the file, the field and what is allowed, exit code 2, no
traceback, and nothing written to the sweep folder. The ids below are the list in the notes."""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_train_config

from sparsify.cli import train_main  # `python -m sparsify.train` in-process
from sweep.run import main as sweep_main

Mutation = Callable[[dict[str, Any], Path], None]


def setting(path: str, value: Any) -> Mutation:
    def mutate(tree: dict[str, Any], tmp_path: Path) -> None:
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[leaf] = value

    return mutate


def removing(path: str) -> Mutation:
    def mutate(tree: dict[str, Any], tmp_path: Path) -> None:
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node[part]
        del node[leaf]

    return mutate


def renaming(path: str, new_leaf: str) -> Mutation:
    def mutate(tree: dict[str, Any], tmp_path: Path) -> None:
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[new_leaf] = node.pop(leaf)

    return mutate


def corrupt_data_file(tree: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet")
    tree["train_data"]["files"] = [str(bad)]


def corrupt_tokenized_column(tree: dict[str, Any], tmp_path: Path) -> None:
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": "words " * 50}) for _ in range(40)))
    tree["train_data"] = {
        "files": [str(text)],
        "split": "all",
        "n_ctx": 16,
        "is_tokenized": True,
        "column_name": "text",
    }


def corrupt_jsonl(tree: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "unterminated\n')
    tree["train_data"]["files"] = [str(bad)]


# (id, mutation of the training config, substrings the one line must contain)
TRAIN_CASES: list[tuple[str, Mutation, list[str]]] = [
    ("misspelled top-level key", renaming("batch_size", "batch_sise"), ["batch_sise", "did you mean batch_size"]),
    ("misspelled nested key", renaming("loss.sparsity", "sparsty"), ["loss.sparsty", "did you mean sparsity"]),
    ("wrong type", setting("batch_size", "eight"), ["batch_size", "integer"]),
    ("dictionary ratio <= 0", setting("saes.dict_size_to_input_ratio", 0), ["saes.dict_size_to_input_ratio", "0"]),
    ("negative coefficient", setting("loss.sparsity.coeff", -1), ["loss.sparsity.coeff", "greater than or equal to 0"]),
    ("no loss term trains", setting("loss", {"out_to_in": {"coeff": 0.0}}), ["loss"]),
    ("missing required field", removing("saes"), ["saes", "required"]),
    ("two data sources", setting("train_data.embedded", "sotu"), ["train_data", "exactly one of"]),
    ("n_ctx above the model's context", setting("train_data.n_ctx", 4096), ["train_data.n_ctx", "4096", "64"]),
    ("unknown hook point", setting("saes.sae_positions", ["blocks.1.hook_resid_pree"]),
     ["saes.sae_positions", "blocks.1.hook_resid_pre"]),
    ("hook of a layer the model lacks", setting("saes.sae_positions", ["blocks.9.hook_resid_pre"]),
     ["saes.sae_positions", "blocks.9.hook_resid_pre"]),
    ("missing data files", setting("train_data.files", ["/nonexistent/*.txt"]), ["train_data", "/nonexistent/*.txt"]),
    ("unreadable data file", corrupt_data_file, ["train_data", "broken.parquet"]),
    ("corpus smaller than the run", setting("n_samples", 10_000_000), ["n_samples", "tokens"]),
    ("hub model unreachable", setting("model_name", "no-such-org/no-such-model"), ["model_name", "no-such-org"]),
    ("run_name escaping save_dir", setting("run_name", "../../escaped"), ["run_name", "should match pattern"]),
    ("seed out of range", setting("seed", 10**30), ["seed", "less than 4294967296"]),
    ("non-finite lr", setting("lr", float("inf")), ["lr", "finite"]),
    ("dictionary of 0 elements", setting("saes.dict_size_to_input_ratio", 1e-9), ["dict_size_to_input_ratio", "0 elements"]),
    ("save_dir is a file", lambda t, p: (p / "afile").write_text("x") and t.update(save_dir=str(p / "afile")),
     ["save_dir", "is a file"]),
    ("save_dir that cannot be created", setting("save_dir", "/proc/no-such-dir"), ["save_dir", "cannot create"]),
    ("is_tokenized on text", corrupt_tokenized_column, ["column_name", "is_tokenized: false"]),
    ("corrupt jsonl line", corrupt_jsonl, ["train_data.files", "broken.jsonl:2"]),
]  # fmt: skip


def write_yaml(path: Path, tree: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def assert_one_line_error(
    capsys: pytest.CaptureFixture[str], code: int, file: Path, wanted: list[str]
) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in captured.err
    assert str(file) in line, line
    for text in wanted:
        assert text in line, line
    return line


@pytest.mark.parametrize("case_id, mutate, wanted", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_training_config(case_id, mutate, wanted, tiny_model_dir, corpus_dir, tmp_path, capsys):
    tree = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path)
    mutate(tree, tmp_path)
    path = write_yaml(tmp_path / "train.yaml", tree)
    code = train_main([str(path)])
    line = assert_one_line_error(capsys, code, path, wanted)
    assert not (tmp_path / "runs").exists(), "a rejected config wrote a run folder"
    print(f"{case_id}: {line}", file=sys.__stdout__)  # the catalogue for the notes (pytest -s)


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text("model_name: x\nsaes:\n  sae_positions: [blocks.1.hook_resid_pre\nlr: 1\n")
    assert_one_line_error(capsys, train_main([str(path)]), path, [f"{path}:4", "YAML syntax error"])


def test_missing_optional_package_says_how_to_install(
    tiny_model_dir, corpus_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    tree = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, wandb_project="my-project")
    path = write_yaml(tmp_path / "train.yaml", tree)
    assert_one_line_error(capsys, train_main([str(path)]), path, ["wandb", "pip install wandb"])


def search_space(tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path) -> dict[str, Any]:
    base = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path)
    del base["loss"]
    return {
        "name": "bad",
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 2,
        "base_config": base,
        "arms": {
            "local": {
                "loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
                "search": {"loss.sparsity.coeff": {"type": "loguniform", "low": 0.01, "high": 1.0}},
            },
            "e2e": {
                "loss": {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1.0}},
                "search": {"loss.sparsity.coeff": {"type": "loguniform", "low": 0.01, "high": 1.0}},
            },
        },
    }


SWEEP_CASES: list[tuple[str, Mutation, list[str]]] = [
    ("misspelled top-level key", renaming("num_samples", "num_sample"), ["num_sample", "did you mean num_samples"]),
    ("misspelled arm key", renaming("arms.local.search", "serch"), ["arms.local.serch", "did you mean search"]),
    ("misspelled distribution key", lambda t, p: t["arms"]["local"]["search"]["loss.sparsity.coeff"].update(
        {"lo": 0.01}), ["lo", "did you mean low"]),
    ("unknown distribution type", lambda t, p: t["arms"]["local"]["search"]["loss.sparsity.coeff"].update(
        {"type": "logunifrom"}), ["type", "loguniform"]),
    ("inverted range", lambda t, p: t["arms"]["local"]["search"]["loss.sparsity.coeff"].update(
        {"low": 1.0, "high": 0.01}), ["low", "high"]),
    ("empty range", lambda t, p: t["arms"]["local"]["search"]["loss.sparsity.coeff"].update(
        {"low": 0.5, "high": 0.5}), ["low", "high"]),
    ("empty categorical", lambda t, p: t["arms"]["local"]["search"].update(
        {"lr": {"type": "categorical", "values": []}}), ["values"]),
    ("typo in a searched path", lambda t, p: t["arms"]["local"]["search"].update(
        {"loss.sparsity.cofef": t["arms"]["local"]["search"].pop("loss.sparsity.coeff")}),
        ["arms.local", "cofef", "did you mean coeff"]),
    ("negative coefficient at a range corner", lambda t, p: t["arms"]["local"]["search"].update(
        {"loss.sparsity.coeff": {"type": "uniform", "low": -1, "high": 1}}), ["arms.local", "loss.sparsity.coeff"]),
    ("SAE type with no loss terms", setting("arms.local.loss", {}), ["arms.local", "loss", "no reconstruction term"]),
    ("no arms", setting("arms", {}), ["arms"]),
    ("arm with nothing searched", setting("arms.local.search", {}), ["arms.local.search", "at least 1 item"]),
    ("objective not produced", setting("objectives", [{"metric": "eval/l0"}]), ["objectives", "did you mean eval/L0?"]),
    ("zero trials", setting("num_samples", 0), ["num_samples"]),
    ("fractional GPUs with DDP", setting("resources", {"num_workers": 2, "gpus_per_worker": 0.5}),
     ["resources", "fractional"]),
    # no such host: one line naming the field and the URI, before anything is loaded
    ("unreachable storage URI", setting("storage_path", "s3://bucket/sweeps?endpoint_override=127.0.0.1:9&scheme=http"),
     ["storage_path", "s3://bucket/sweeps/", "not writable"]),
    ("base config file missing", setting("base_config", "no_such_base.yaml"), ["no_such_base.yaml"]),
    ("unknown hook point", setting("base_config.saes.sae_positions", ["blocks.1.hook_resid_prex"]),
     ["arms.", "saes.sae_positions", "blocks.1.hook_resid_pre"]),
    ("n_ctx above the model's context", setting("base_config.train_data.n_ctx", 4096),
     ["arms.", "train_data.n_ctx", "4096"]),
    ("missing data files", setting("base_config.train_data.files", ["/nonexistent/*.txt"]),
     ["arms.", "/nonexistent/*.txt"]),
    ("corpus smaller than the run", setting("base_config.n_samples", 10_000_000), ["arms.", "n_samples"]),
    ("searched n_ctx above the model's context", lambda t, p: t["arms"]["e2e"]["search"].update(
        {"train_data.n_ctx": {"type": "int", "low": 16, "high": 4096}}),
        ["arms.e2e (at ", "train_data.n_ctx=4096", "exceeds the model's context of 64"]),
    ("arm name escaping the sweep folder", lambda t, p: t["arms"].update({"../../escaped": t["arms"].pop("local")}),
     ["arms", "'../../escaped'", "names folders"]),
    ("sweep name '..'", setting("name", ".."), ["name", "should match pattern"]),
    ("sampler seed out of range", setting("seed", 2**40), ["seed", "less than 4294967296"]),
    ("objective key typo", setting("objectives", [{"metric": "eval/L0", "mdoe": "min"}]),
     ["objectives.0.mdoe", "did you mean mode?"]),
    ("set and searched", lambda t, p: t["arms"]["local"].update({"set": {"loss.sparsity.coeff": 5.0}}),
     ["arms.local", "both set and searched"]),
    ("a training config given as a search space", lambda t, p: (t.clear(), t.update(
        {"saes": {"sae_positions": ["blocks.1.hook_resid_pre"]}, "loss": {"out_to_in": {"coeff": 1}}})),
     ["this is a training config", "python -m sparsify.train"]),
    ("storage_path is a file", lambda t, p: (p / "afile").write_text("x") and t.update(storage_path=str(p / "afile")),
     ["storage_path", "is a file"]),
    ("trial needs more CPUs than the machine", setting("resources", {"cpus_per_worker": 512}),
     ["resources", "512 CPUs", "RAY_ADDRESS"]),
    ("searched hook the model lacks", lambda t, p: t["arms"]["local"]["search"].update(
        {"saes.sae_positions": {"type": "categorical", "values": [["blocks.1.hook_resid_pre"],
                                                                   ["blocks.7.hook_resid_pre"]]}}),
        ["arms.local (at ", "blocks.7.hook_resid_pre"]),
]  # fmt: skip


@pytest.mark.parametrize("case_id, mutate, wanted", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_bad_search_space(case_id, mutate, wanted, tiny_model_dir, corpus_dir, tmp_path, capsys):
    tree = search_space(tiny_model_dir, corpus_dir, tmp_path)
    mutate(tree, tmp_path)
    path = write_yaml(tmp_path / "space.yaml", tree)
    line = assert_one_line_error(capsys, sweep_main([str(path)]), path, wanted)
    assert not (tmp_path / "sweeps").exists(), "a rejected search space wrote into the sweep folder"
    print(f"{case_id}: {line}", file=sys.__stdout__)


def test_missing_sweep_packages_say_how_to_install(tiny_model_dir, corpus_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    path = write_yaml(tmp_path / "space.yaml", search_space(tiny_model_dir, corpus_dir, tmp_path))
    line = assert_one_line_error(
        capsys, sweep_main([str(path)]), path, ["optuna", "pip install -e '.[sweep]'"]
    )
    assert "optuna" in line and not (tmp_path / "sweeps").exists()


def test_non_utf8_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"model_name: caf\xe9\n")
    assert_one_line_error(capsys, train_main([str(path)]), path, ["not UTF-8"])
    assert_one_line_error(capsys, sweep_main([str(path)]), path, ["not UTF-8"])


def test_a_changed_search_space_does_not_resume_the_old_sweep(tiny_model_dir, corpus_dir, tmp_path, capsys):
    from sweep.run import SPACE_RECORD

    tree = search_space(tiny_model_dir, corpus_dir, tmp_path)
    folder = tmp_path / "sweeps" / tree["name"]
    folder.mkdir(parents=True)
    (folder / SPACE_RECORD).write_text('{"space": "an older search space"}')
    path = write_yaml(tmp_path / "space.yaml", tree)
    assert_one_line_error(
        capsys, sweep_main([str(path)]), path, ["holds a sweep of a different search space"]
    )
    assert sorted(p.name for p in folder.iterdir()) == [SPACE_RECORD]


def test_dry_run_of_a_huge_budget_prints_a_sample(tiny_model_dir, corpus_dir, tmp_path, capsys):
    tree = search_space(tiny_model_dir, corpus_dir, tmp_path)
    tree["num_samples"] = 10**20
    assert sweep_main([str(write_yaml(tmp_path / "space.yaml", tree)), "--dry-run"]) == 0
    assert f"... and {10**20 - 20} more" in capsys.readouterr().out


def test_valid_files_pass_the_same_checks(tiny_model_dir, corpus_dir, tmp_path):
    """The unmutated files are accepted: the cases above fail because of their one change."""
    from sparsify import validate_config
    from sweep.space import load_search_space

    validate_config(copy.deepcopy(tiny_train_config(tiny_model_dir, corpus_dir, tmp_path)))
    path = write_yaml(tmp_path / "space.yaml", search_space(tiny_model_dir, corpus_dir, tmp_path))
    loaded = load_search_space(path)
    assert set(loaded.space.arms) == {"local", "e2e"}
