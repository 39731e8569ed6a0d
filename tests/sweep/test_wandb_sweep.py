"""The reference library's W&B sweep files run unchanged (sweep/wandb_sweep.py, docs/design.md §12),
and `sampler: grid` (docs/design.md §7). The fixtures are the reference's own files, byte for byte
(tests/fixtures/reference_sweeps/README.md); nothing here loads a hub model or downloads anything."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import yaml

from sparsify import ConfigError
from sweep.run import main as run_main
from sweep.space import grid_points, load_search_space
from sweep.wandb_sweep import resolve_sae_positions

FIXTURES = Path(__file__).parents[1] / "fixtures" / "reference_sweeps"
SCRIPTS = Path("e2e_sae/scripts/train_tlens_saes")
REF = FIXTURES / SCRIPTS
ANON_ROOT = FIXTURES / "anonymized-301ab96"
ANON = ANON_ROOT / SCRIPTS
SWEEPS = sorted([*REF.glob("*_sweep.yaml"), *ANON.glob("*_sweep.yaml")])


def fixture_id(path: Path) -> str:
    return f"{path.parents[3].name}/{path.name}"


def trial_configs(loaded, arm):
    """Every trial config of a grid arm, in grid order."""
    return [
        loaded.trial_config(arm, params) for params in loaded.sample_trials(arm, loaded.space.num_samples)
    ]


def only_arm(loaded) -> str:
    (arm,) = loaded.space.arms
    return arm


@pytest.mark.parametrize("cwd", ["fixture_root", "elsewhere"])
@pytest.mark.parametrize("path", SWEEPS, ids=fixture_id)
def test_every_reference_sweep_dry_runs_unchanged(path, cwd, tmp_path, monkeypatch, capsys):
    before = path.read_bytes()
    monkeypatch.chdir(path.parents[3] if cwd == "fixture_root" else tmp_path)
    assert run_main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    loaded = load_search_space(path)
    arm = only_arm(loaded)
    assert loaded.space.sampler == "grid"
    assert f"1 arms x {loaded.space.num_samples} trials" in out and f"arm {arm}:" in out
    assert path.read_bytes() == before


def test_gpt2_e2e_sweep_is_one_arm_of_four_sparsity_coefficients():
    loaded = load_search_space(REF / "gpt2_e2e_sweep.yaml")
    assert list(loaded.space.arms) == ["gpt2-e2e"] and loaded.space.name == "gpt2_e2e_sweep"
    arm = loaded.space.arms["gpt2-e2e"]
    assert list(arm.search) == ["loss.sparsity.coeff"] and loaded.space.num_samples == 4
    cfgs = trial_configs(loaded, "gpt2-e2e")
    assert {c.loss.sparsity.coeff for c in cfgs} == {0.08, 0.2, 0.8, 2}
    for cfg in cfgs:
        assert (cfg.n_samples, cfg.lr, cfg.seed) == (400_000, 5e-4, 0)
        assert cfg.saes.dict_size_to_input_ratio == 60
        assert cfg.saes.sae_positions == ["blocks.2.hook_resid_pre"]  # the sweep's, not the run config's 6
        assert cfg.loss.logits_kl.coeff == 1.0 and cfg.loss.out_to_in.coeff == 0.0
        assert cfg.loss.in_to_orig is None and cfg.loss.out_to_orig is None
        assert cfg.loss.sparsity.p_norm == 1.0  # the run config's, kept under the sweep's coeff
        assert cfg.model_name == "gpt2"  # gpt2-small, through TransformerLens's alias registry
        assert cfg.train_data.dataset_name == "apollo-research/Skylion007-openwebtext-tokenizer-gpt2"
        assert (cfg.train_data.n_ctx, cfg.train_data.seed, cfg.eval_data.seed) == (1024, 0, 1)
        assert (cfg.batch_size, cfg.effective_batch_size, cfg.warmup_samples) == (8, 16, 20_000)


@pytest.mark.parametrize("folder", [REF, ANON], ids=["apollo-research", "anonymized"])
def test_gpt2_local_sweep_is_seeds_times_coefficients(folder):
    loaded = load_search_space(folder / "gpt2_local_sweep.yaml")
    assert list(loaded.space.arms) == ["gpt2_local"]
    assert set(loaded.space.arms["gpt2_local"].search) == {"seed", "loss.sparsity.coeff"}
    cfgs = trial_configs(loaded, "gpt2_local")
    assert len(cfgs) == loaded.space.num_samples == 14
    assert {(c.seed, c.loss.sparsity.coeff) for c in cfgs} == set(
        itertools.product([0, 1], [1, 3, 6, 10, 15, 20, 30])
    )
    for cfg in cfgs:
        assert cfg.loss.coeffs() == {"sparsity": cfg.loss.sparsity.coeff, "out_to_in": 1.0}
        assert cfg.saes.sae_positions == ["blocks.10.hook_resid_pre"]
        # the sweep's train_data overrides the run config's (streaming false, raw-text eval)
        assert cfg.train_data.streaming and cfg.eval_data.is_tokenized
        assert cfg.eval_data.dataset_name.endswith("/Skylion007-openwebtext-tokenizer-gpt2")
    if folder == ANON:
        assert cfgs[0].train_data.dataset_name == "ANONYMIZED/Skylion007-openwebtext-tokenizer-gpt2"


def test_recon_sweep_sets_a_one_entry_list_and_searches_two_terms():
    loaded = load_search_space(REF / "gpt2_e2e_recon_sweep.yaml")
    arm = only_arm(loaded)
    assert set(loaded.space.arms[arm].search) == {"loss.sparsity.coeff", "loss.in_to_orig.total_coeff"}
    cfgs = trial_configs(loaded, arm)
    assert {(c.loss.sparsity.coeff, c.loss.in_to_orig.total_coeff) for c in cfgs} == set(
        itertools.product([0.8, 2.5, 5], [0.05, 0.1])
    )
    # `values: [[blocks.11.hook_resid_pre]]` is one value, the list (not the run config's five)
    assert all(c.loss.in_to_orig.hook_positions == ["blocks.11.hook_resid_pre"] for c in cfgs)
    assert all(c.loss.logits_kl.coeff == 0.5 for c in cfgs)


def test_repeated_values_run_once(caplog):
    loaded = load_search_space(REF / "gpt2_e2e_local_sweep.yaml")  # lr: [5e-4, 5e-4]
    arm = only_arm(loaded)
    assert set(loaded.space.arms[arm].search) == {"loss.sparsity.coeff", "loss.out_to_in.coeff"}
    assert loaded.space.num_samples == 12 and loaded.space.arms[arm].set["lr"] == 5e-4
    assert "repeated" in caplog.text


def test_tinystories_sweep_reads_yaml_1_1_exponents_as_numbers():
    loaded = load_search_space(REF / "tinystories_1M_e2e_sweep.yaml")
    assert list(loaded.space.arms) == ["logits_kl"]
    search = loaded.space.arms["logits_kl"].search
    assert search["lr"].values == [1e-2, 5e-3, 1e-3]  # `1e-2` is a string to PyYAML
    cfgs = trial_configs(loaded, "logits_kl")
    assert len(cfgs) == 18 and {c.saes.sae_positions[0] for c in cfgs} == {"blocks.1.hook_resid_pre"}
    assert {c.saes.dict_size_to_input_ratio for c in cfgs} == {5.0, 10.0}


def test_tinystories_local_sweep_tokenizes_raw_text_with_the_models_tokenizer(caplog, monkeypatch):
    import sparsify.compat

    monkeypatch.setattr(sparsify.compat, "_WARNED", set())  # warned once per process: not yet here
    # its run config names tokenizer gpt2 for raw TinyStories text: the model's own (the same
    # vocabulary) is used, with a warning; eval_data null falls back to train_data, next seed
    with caplog.at_level("WARNING"):
        loaded = load_search_space(REF / "tinystories_1M_local_sweep.yaml")
    arm = only_arm(loaded)
    cfgs = trial_configs(loaded, arm)
    assert len(cfgs) == loaded.space.num_samples
    assert {c.train_data.is_tokenized for c in cfgs} == {False}
    assert "tokenized with the model's own tokenizer (roneneldan/TinyStories-1M), not 'gpt2'" in caplog.text
    # once, though every trial config maps the run config again
    assert caplog.text.count("train_data.tokenizer_name: raw text is tokenized") == 1


# --- synthetic sweep files -------------------------------------------------------------------


def reference_run_config(**overrides):
    data = {"dataset_name": "some/tokenized-data", "is_tokenized": True, "tokenizer_name": "gpt2",
            "streaming": True, "split": "train", "n_ctx": 64}  # fmt: skip
    cfg = {
        "seed": 3,
        "tlens_model_name": "gpt2-small",
        "n_samples": 64,
        "batch_size": 8,
        "lr": "1e-3",
        "loss": {"sparsity": {"coeff": 1.0, "p_norm": 1.0}, "out_to_in": {"coeff": 1.0}, "logits_kl": None},
        "train_data": data,
        "eval_data": data,
        "saes": {"sae_positions": "blocks.1.hook_resid_pre", "dict_size_to_input_ratio": 4.0},
    }
    return {**cfg, **overrides}


def write_sweep(folder: Path, parameters, run_config=None, **top):
    """A sweep file in `folder/sweeps/`, naming `configs/run.yaml` from `folder` as the reference does."""
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "configs" / "run.yaml").write_text(yaml.safe_dump(run_config or reference_run_config()))
    sweep = {
        "program": "run_train_tlens_saes.py",
        "name": "my sweep/1",
        "method": "grid",
        "metric": {"name": "val_loss", "goal": "minimize"},
        "parameters": parameters,
        "command": ["${env}", "${interpreter}", "${program}", "configs/run.yaml"],
        **top,
    }
    path = folder / "sweeps" / "sweep.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_multi_parameter_grid_is_the_product(tmp_path):
    parameters = {
        "lr": {"values": [1e-3, 3e-3]},
        "seed": {"value": 7},
        "loss": {"parameters": {"sparsity": {"parameters": {"coeff": {"distribution": "categorical", "values": [1, 2, 4]}}}}},
        "saes": {"parameters": {"sae_positions": {"values": [["blocks.0.hook_resid_pre"], ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]]}}},
    }  # fmt: skip
    loaded = load_search_space(write_sweep(tmp_path, parameters))
    assert list(loaded.space.arms) == ["my_sweep_1"]  # the sweep's name, made a folder name
    arm = loaded.space.arms["my_sweep_1"]
    assert arm.set == {"seed": 7} and loaded.space.num_samples == 2 * 3 * 2
    cfgs = trial_configs(loaded, "my_sweep_1")
    got = {(c.lr, c.loss.sparsity.coeff, tuple(c.saes.sae_positions)) for c in cfgs}
    positions = [("blocks.0.hook_resid_pre",), ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre")]
    assert got == set(itertools.product([1e-3, 3e-3], [1, 2, 4], positions)) and len(cfgs) == 12
    assert all(c.seed == 7 and c.loss.out_to_in.coeff == 1.0 for c in cfgs)


def test_nothing_varies_is_a_grid_of_one(tmp_path):
    loaded = load_search_space(write_sweep(tmp_path, {"lr": {"values": [2e-3]}}))
    arm = loaded.space.arms["my_sweep_1"]
    assert {p: d.values for p, d in arm.search.items()} == {"seed": [3]}  # the run config's seed
    (cfg,) = trial_configs(loaded, "my_sweep_1")
    assert (cfg.lr, cfg.seed, loaded.space.num_samples) == (2e-3, 3, 1)


def test_null_removes_a_loss_term_and_a_mapping_merges(tmp_path):
    parameters = {
        "loss": {"parameters": {"out_to_in": {"values": [None]}, "logits_kl": {"value": {"coeff": 2.0}},
                                "sparsity": {"value": {"coeff": 5.0}}}},
        "seed": {"values": [0, 1]},
    }  # fmt: skip
    run = reference_run_config(loss={"sparsity": {"coeff": 1.0, "p_norm": 0.5}, "out_to_in": {"coeff": 1.0}})
    loaded = load_search_space(write_sweep(tmp_path, parameters, run))
    cfg = trial_configs(loaded, "my_sweep_1")[0]
    assert cfg.loss.out_to_in is None and cfg.loss.logits_kl.coeff == 2.0
    assert (cfg.loss.sparsity.coeff, cfg.loss.sparsity.p_norm) == (5.0, 0.5)


def test_run_config_without_eval_data_evaluates_on_the_train_stream(tmp_path, caplog):
    run = reference_run_config(eval_data=None)
    loaded = load_search_space(write_sweep(tmp_path, {"seed": {"values": [0, 1]}}, run))
    cfgs = trial_configs(loaded, "my_sweep_1")
    assert [(c.train_data.seed, c.eval_data.seed) for c in cfgs] == [(0, 1), (1, 2)]
    assert cfgs[0].eval_data.dataset_name == cfgs[0].train_data.dataset_name
    assert "no eval_data" in caplog.text


def test_run_config_is_found_from_the_cwd_then_above_then_beside(tmp_path, monkeypatch):
    path = write_sweep(tmp_path / "repo", {"seed": {"values": [0, 1]}})
    monkeypatch.chdir(tmp_path)  # not here: found by walking up from sweeps/ to repo/
    assert load_search_space(path).run_config == tmp_path / "repo" / "configs" / "run.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text(yaml.safe_dump(reference_run_config(lr=0.01)))
    loaded = load_search_space(path)  # a copy under the current directory comes first
    assert (
        loaded.run_config == tmp_path / "configs" / "run.yaml"
        and trial_configs(loaded, "my_sweep_1")[0].lr == 0.01
    )
    (tmp_path / "configs" / "run.yaml").unlink()
    (tmp_path / "repo" / "configs" / "run.yaml").rename(path.parent / "run.yaml")
    assert load_search_space(path).run_config == path.parent / "run.yaml"  # beside it, by basename


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "random"}, "method: random is not run here .* sampler: tpe"),
        ({"method": "bayes"}, "method: bayes is not run here"),
        ({"parameters": {"lr": {"min": 1e-4, "max": 1e-2}}}, r"parameters: lr: max, min: W&B distributions"),
        ({"parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}}}, "parameters: lr: distribution, max, min"),
        ({"early_terminate": {"type": "hyperband", "min_iter": 3}}, "early_terminate: cannot be honoured here"),
        ({"run_cap": 3}, "run_cap: cannot be honoured here; pass --num-samples"),
        ({"command": ["${env}", "${interpreter}", "${program}", "${args}"]}, "command: names no YAML run config"),
        ({"command": ["python", "train.py", "configs/missing.yaml"]}, "command: run config configs/missing.yaml not found"),
        ({"parameters": {"lrr": {"values": [1e-3, 2e-3]}}}, r"arms.my_sweep_1 \(run config run.yaml\): lrr: unknown field; did you mean lr\?"),
        ({"parameters": {"saes": {"parameters": {"dict_size": {"values": [1, 2]}}}}}, "saes.dict_size: unknown field"),
        ({"parameters": {"lr": {"values": []}}}, "parameters: lr: values: expected a non-empty list"),
        ({"parameters": {"lr": {"values": [1e-3], "value": 1e-3}}}, "parameters: lr: needs exactly one of values, value, parameters"),
        ({"controller": {"type": "local"}}, "controller: not a W&B sweep setting this reads"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_one_line_naming_file_and_field(tmp_path, change, message, capsys):
    parameters = change.pop("parameters", {"lr": {"values": [1e-3, 2e-3]}})
    path = write_sweep(tmp_path, parameters, **change)
    with pytest.raises(ConfigError, match=message) as exc:
        load_search_space(path)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(f"{path}: ")
    assert run_main([str(path), "--dry-run"]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == f"error: {exc.value}"


def test_num_samples_above_the_grid_is_refused(capsys):
    assert run_main([str(REF / "gpt2_e2e_sweep.yaml"), "--dry-run", "--num-samples", "5"]) == 2
    assert "--num-samples: the grid has 4 points per arm" in capsys.readouterr().err


# --- the grid sampler --------------------------------------------------------------------------


def test_grid_sampler_proposes_each_point_once():
    import optuna

    from sweep.tuner import optuna_sampler

    loaded = load_search_space(REF / "gpt2_local_sweep.yaml")
    search = loaded.space.arms["gpt2_local"].search
    distributions = {p: optuna.distributions.CategoricalDistribution(d.values) for p, d in search.items()}
    study = optuna.create_study(
        directions=["minimize", "minimize"], sampler=optuna_sampler("grid", 0, search)
    )
    proposed = []
    for _ in range(loaded.space.num_samples):  # ask and tell, as Ray's OptunaSearch does
        trial = study.ask(fixed_distributions=distributions)
        proposed.append(tuple(sorted(trial.params.items())))
        study.tell(trial, [1.0, 2.0])  # the last one too: no `study.stop()` outside optimize
    expected = {tuple(sorted(p.items())) for p in grid_points(search)}
    assert len(proposed) == len(set(proposed)) == 14 and set(proposed) == expected


def test_grid_sampler_through_optuna_search_encodes_list_values(tmp_path):
    from sweep.tuner import FailNonFiniteOptunaSearch, optuna_sampler, to_tune

    positions = [["blocks.0.hook_resid_pre"], ["blocks.1.hook_resid_pre"]]
    parameters = {
        "saes": {"parameters": {"sae_positions": {"values": positions}}},
        "seed": {"values": [0, 1]},
    }
    loaded = load_search_space(write_sweep(tmp_path, parameters))
    arm = loaded.space.arms["my_sweep_1"]
    searcher = FailNonFiniteOptunaSearch(
        space={p: to_tune(d) for p, d in arm.search.items()},
        metric=loaded.space.metrics,
        mode=loaded.space.modes,
        sampler=optuna_sampler("grid", loaded.space.seed, arm.search),
    )
    seen = []
    for i in range(loaded.space.num_samples):
        params = searcher.suggest(str(i))
        seen.append((tuple(loaded.trial_config("my_sweep_1", params).saes.sae_positions), params["seed"]))
        searcher.on_trial_complete(str(i), {m: 1.0 for m in loaded.space.metrics})
    assert sorted(seen) == sorted(itertools.product([tuple(p) for p in positions], [0, 1]))


def native_grid_space(tmp_path, **changes):
    space = {
        "name": "g",
        "num_samples": 6,
        "sampler": "grid",
        "base_config": {"saes": {"sae_positions": ["blocks.1.hook_resid_pre"]}, "n_samples": 16, "lr": 1e-3},
        "arms": {
            "local": {
                "loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
                "search": {
                    "loss.sparsity.coeff": {"type": "categorical", "values": [0.5, 1, 2]},
                    "seed": {"type": "categorical", "values": [0, 1]},
                },
            }
        },
    }
    for path, value in changes.items():
        node = space
        *parents, leaf = path.split("/")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_native_grid_runs_every_point_once(tmp_path):
    loaded = load_search_space(native_grid_space(tmp_path))
    points = loaded.sample_trials("local", 6)
    assert len({tuple(p.items()) for p in points}) == 6 == math.prod([3, 2])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_samples": 5}, "sampler grid: num_samples must be the grid size, 6 for arms.local"),
        ({"arms/local/search/seed": {"type": "int", "low": 0, "high": 3}}, "searches seed over a range"),
        (
            {"arms/local/initial_points": [{"loss.sparsity.coeff": 1, "seed": 0}]},
            "initial_points are not allowed",
        ),
    ],
)
def test_native_grid_rules(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_search_space(native_grid_space(tmp_path, **changes))


# --- a real sweep's hook names -----------------------------------------------------------------


def test_substring_positions_resolve_once_the_model_is_loaded(tmp_path, tiny_model_dir):
    run = reference_run_config(
        tlens_model_name=None,
        tlens_model_path=str(tiny_model_dir),
        saes={"sae_positions": "hook_resid_pre"},  # the reference's substring: every block's
    )
    run["train_data"] = run["eval_data"] = {**run["train_data"], "tokenizer_name": str(tiny_model_dir)}
    loaded = load_search_space(write_sweep(tmp_path, {"seed": {"values": [0, 1]}}, run))
    assert trial_configs(loaded, "my_sweep_1")[0].saes.sae_positions == [
        "hook_resid_pre"
    ]  # dry run: as written
    models: dict = {}
    resolve_sae_positions(loaded, models)
    assert list(models) == [str(tiny_model_dir)]
    cfg = trial_configs(loaded, "my_sweep_1")[0]
    assert cfg.saes.sae_positions == [f"blocks.{i}.hook_resid_pre" for i in range(3)]


def test_a_reference_sweep_runs_through_ray_each_grid_point_once(tiny_model_dir, tmp_path, monkeypatch):
    """The whole path on the tiny model: W&B sweep -> grid arm -> Ray Tune + Optuna's grid ->
    trials trained from the reference run config (about a minute on 2 CPUs)."""
    import json

    import ray

    from sweep.results import load_results

    data = tmp_path / "ds"
    data.mkdir()
    rows = [{"input_ids": [(7 * i + j) % 250 + 3 for j in range(32)]} for i in range(40)]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (data / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:10]))
    section = {"dataset_name": str(data), "is_tokenized": True, "tokenizer_name": str(tiny_model_dir),
               "streaming": True, "split": "train", "n_ctx": 16}  # fmt: skip
    run = reference_run_config(
        tlens_model_name=None, tlens_model_path=str(tiny_model_dir), n_samples=16, eval_n_samples=8,
        act_frequency_n_tokens=64, train_data=section, eval_data={**section, "split": "test"},
        saes={"sae_positions": "blocks.1.hook_resid", "dict_size_to_input_ratio": 2.0},
    )  # fmt: skip
    path = write_sweep(
        tmp_path,
        {"loss": {"parameters": {"sparsity": {"parameters": {"coeff": {"values": [0.1, 1.0]}}}}}},
        run,
    )
    monkeypatch.chdir(tmp_path)
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        assert run_main([str(path), "--storage", str(tmp_path / "sweeps")]) == 0
    finally:
        ray.shutdown()
    table = load_results(tmp_path / "sweeps" / "sweep")
    assert (table["status"] == "finished").all()
    assert sorted(table["param:loss.sparsity.coeff"]) == [0.1, 1.0]
    run_dir = tmp_path / "sweeps" / "sweep" / "runs" / "my_sweep_1" / table["trial_id"].iloc[0]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    # `blocks.1.hook_resid` selected the hooks that contain it (in the model's hook order), as
    # the reference's filter_names
    assert sorted(saved["saes"]["sae_positions"]) == [
        f"blocks.1.hook_resid_{s}" for s in ("mid", "post", "pre")
    ]


def test_one_and_one_point_zero_are_one_grid_value(tmp_path):
    parameters = {"loss": {"parameters": {"sparsity": {"parameters": {"coeff": {"values": [1, 1.0, 2]}}}}}}
    loaded = load_search_space(write_sweep(tmp_path, parameters))
    assert loaded.space.arms["my_sweep_1"].search["loss.sparsity.coeff"].values == [1, 2]
