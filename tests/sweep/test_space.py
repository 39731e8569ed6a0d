from pathlib import Path

import pytest
import yaml

from sparsify import ConfigError
from sweep.run import main as run_main
from sweep.space import load_search_space, set_dotted

SEARCH_SPACES = sorted((Path(__file__).parents[2] / "search_spaces").glob("*.yaml"))

MINIMAL = {
    "name": "t",
    "num_samples": 2,
    "base_config": {"saes": {"sae_positions": ["blocks.1.hook_resid_pre"]}, "n_samples": 16, "lr": 1e-3},
    "arms": {
        "local": {
            "loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
            "search": {"loss.sparsity.coeff": {"type": "loguniform", "low": 0.1, "high": 10}},
        },
        "e2e": {
            "loss": {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1.0}},
            "set": {"saes.dict_size_to_input_ratio": 4},
            "search": {"lr": {"type": "categorical", "values": [1e-3, 3e-3]}},
        },
    },
}


def write(tmp_path, tree):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("path", SEARCH_SPACES, ids=lambda p: p.name)
def test_shipped_search_spaces_expand_into_valid_trials(path):
    loaded = load_search_space(path)
    assert {"local", "e2e"} <= set(loaded.space.arms)
    searching = [name for name, arm in loaded.space.arms.items() if arm.init_from is None]
    for arm in searching:
        for params in loaded.sample_trials(arm, 3):
            dumped = loaded.trial_config(arm, params).model_dump()
            for param, value in params.items():  # each searched value lands where its path says
                node = dumped
                for part in param.split("."):
                    node = node[part]
                assert node == value, param
    for cfg in (loaded.trial_config(arm, loaded.sample_trials(arm, 1)[0]) for arm in searching):
        # the ReLU SAEs' sparsity comes from the L1 term, the TopK SAEs' from k
        assert (cfg.loss.sparsity is not None) == (cfg.saes.architecture == "relu")


@pytest.mark.parametrize("path", SEARCH_SPACES, ids=lambda p: p.name)
def test_dry_run_prints_every_arm(path, capsys):
    assert run_main([str(path), "--dry-run", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    space = load_search_space(path).space
    for arm in space.arms:
        assert f"arm {arm}:" in out
    aiming = [arm for arm in space.arms.values() if arm.init_from is None]
    for name, arm in space.arms.items():
        if arm.init_from is not None:
            assert f"arm {name}: starts from the SAEs of arm {arm.init_from.arm}'s trials" in out
    if space.strategy == "match":  # the first trial mid-range, then trials aimed at the targets
        assert out.count("trial 0:") == len(aiming) and "trial 1:" not in out
        assert out.count("... and 1 more, each aimed at the emptiest target") == len(aiming)
        assert out.count(f"at eval/L0 = {', '.join(f'{t:g}' for t in space.l0_targets or [])}") == len(aiming)
    else:
        assert out.count("trial 1:") == len(space.arms)


def test_arm_settings_and_params_land_in_the_trial_config(tmp_path):
    loaded = load_search_space(write(tmp_path, MINIMAL))
    cfg = loaded.trial_config("e2e", {"lr": 3e-3})
    assert cfg.lr == 3e-3 and cfg.saes.dict_size_to_input_ratio == 4
    assert cfg.loss.coeffs() == {"sparsity": 1.0, "logits_kl": 1.0}
    local = loaded.trial_config("local", {"loss.sparsity.coeff": 0.5})
    assert (
        local.loss.coeffs() == {"sparsity": 0.5, "out_to_in": 1.0}
        and local.saes.dict_size_to_input_ratio == 1.0
    )


def test_typo_in_a_searched_path_fails_at_load(tmp_path):
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    tree["arms"]["local"]["search"] = {"loss.sparsity.cof": {"type": "uniform", "low": 0.1, "high": 1}}
    with pytest.raises(
        ConfigError, match=r"space.yaml: arms.local: loss.sparsity.cof: unknown field; did you mean coeff\?"
    ):
        load_search_space(write(tmp_path, tree))


def test_inverted_range_is_rejected(tmp_path):
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    tree["arms"]["local"]["search"]["loss.sparsity.coeff"] = {"type": "loguniform", "low": 10, "high": 1}
    with pytest.raises(
        ConfigError, match=r"arms.local.search.loss.sparsity.coeff: low \(10\) must be below high \(1\)"
    ):
        load_search_space(write(tmp_path, tree))


def test_objective_must_be_a_reported_metric(tmp_path):
    tree = {**MINIMAL, "objectives": [{"metric": "eval/l0", "mode": "min"}]}
    with pytest.raises(ConfigError, match=r"space.yaml: objectives: 'eval/l0' is not a metric trials report"):
        load_search_space(write(tmp_path, tree))


def test_bad_file_exits_2_with_one_line(tmp_path, capsys):
    tree = {**MINIMAL, "num_sample": 3}
    assert run_main([str(write(tmp_path, tree)), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'space.yaml'}: num_sample: unknown field; did you mean num_samples?"


def test_set_dotted_creates_sections():
    tree = {"loss": {"sparsity": {"coeff": 1}}}
    set_dotted(tree, "loss.logits_kl.coeff", 0.5)
    set_dotted(tree, "loss.sparsity.coeff", 2)
    assert tree == {"loss": {"sparsity": {"coeff": 2}, "logits_kl": {"coeff": 0.5}}}


def test_initial_points_come_first_and_must_match_the_search(tmp_path):
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    tree["arms"]["local"]["initial_points"] = [{"loss.sparsity.coeff": 0.5}, {"loss.sparsity.coeff": 2.0}]
    loaded = load_search_space(write(tmp_path, tree))
    assert [p["loss.sparsity.coeff"] for p in loaded.sample_trials("local", 3)][:2] == [0.5, 2.0]
    tree["arms"]["local"]["initial_points"] = [{"loss.sparsity.coeff": 50.0}]
    with pytest.raises(
        ConfigError, match=r"initial_points\[0\]: loss.sparsity.coeff = 50.0 is outside its search range"
    ):
        load_search_space(write(tmp_path, tree))
    tree["arms"]["local"]["initial_points"] = [{"lr": 1e-3}]
    with pytest.raises(ConfigError, match=r"initial_points\[0\] must set exactly the searched paths"):
        load_search_space(write(tmp_path, tree))
    # True == 1 in Python, and 1 is inside [0.1, 10]: a boolean is still not a coefficient
    tree["arms"]["local"]["initial_points"] = [{"loss.sparsity.coeff": True}]
    with pytest.raises(ConfigError, match=r"loss.sparsity.coeff = True is outside its search range"):
        load_search_space(write(tmp_path, tree))


def test_sweep_without_eval_data_is_rejected(tmp_path):
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    tree["base_config"]["eval_data"] = None
    with pytest.raises(
        ConfigError, match=r"arms\.\w+: eval_data is null, but the objectives are eval metrics"
    ):
        load_search_space(write(tmp_path, tree))


def test_uri_storage_and_zero_trials_are_one_line_errors(tmp_path, capsys):
    path = write(tmp_path, MINIMAL)
    assert run_main([str(path), "--num-samples", "0"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: --num-samples: must be >= 1 (got 0)"
    # a URI is storage like a folder (sweep.storage): one that cannot be reached is one line
    assert (
        run_main([str(path), "--storage", "s3://bucket/sweeps?endpoint_override=127.0.0.1:9&scheme=http"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: --storage: s3://bucket/sweeps/") and "\n" not in err, err


def test_int_range_needs_whole_numbers(tmp_path):
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    tree["arms"]["local"]["search"]["batch_size"] = {"type": "int", "low": 4.5, "high": 16}
    with pytest.raises(ConfigError, match=r"int needs whole-number low and high \(got 4.5, 16\)"):
        load_search_space(write(tmp_path, tree))


@pytest.mark.parametrize("path", ["saes.k", "batch_size"])
def test_integer_field_searched_as_a_continuous_range_is_one_line_error(tmp_path, path):
    # whole-number corners validate, but almost every draw between them failed its trial
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    local = tree["arms"]["local"]
    if path == "saes.k":
        local["loss"] = {"out_to_in": {"coeff": 1.0}}
        local["set"] = {"saes.architecture": "topk"}
        local["search"] = {}
    local["search"][path] = {"type": "loguniform", "low": 4, "high": 16}
    file = write(tmp_path, tree)
    with pytest.raises(ConfigError) as info:
        load_search_space(file)
    assert str(info.value).startswith(
        f"{file}: arms.local: {path} is searched as loguniform, but takes whole numbers only"
    )
    assert str(info.value).endswith("search it with type: int")
    local["search"][path] = {"type": "int", "low": 4, "high": 16}
    load_search_space(write(tmp_path, tree))


def test_typo_in_a_searched_path_is_reported_before_initial_points(tmp_path):
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    tree["arms"]["local"]["initial_points"] = [{"loss.sparsity.coeff": 0.5}]
    tree["arms"]["local"]["search"]["loss.sparsity.coef"] = {"type": "uniform", "low": 0.1, "high": 1}
    with pytest.raises(ConfigError, match=r"loss.sparsity.coef: unknown field; did you mean coeff\?"):
        load_search_space(write(tmp_path, tree))


def test_bad_hook_fails_before_ray_starts_and_writes_nothing(tiny_model_dir, corpus_dir, tmp_path, capsys):
    from conftest import tiny_train_config

    base = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path)
    del base["loss"]
    base["saes"]["sae_positions"] = ["blocks.1.hook_resid_pr"]
    tree = {**MINIMAL, "base_config": base, "storage_path": str(tmp_path / "sweeps")}
    assert run_main([str(write(tmp_path, tree))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": saes.sae_positions: the model has no hook 'blocks.1.hook_resid_pr'" in err[0]
    assert err[0].startswith(f"error: {tmp_path / 'space.yaml'}: arms.")
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize(
    "resources",
    [
        {"gpus_per_worker": 0.25},
        {"num_workers": 1, "gpus_per_worker": 1.5},
        {"num_workers": 4, "gpus_per_worker": 2},
    ],
    ids=["fraction_of_one_gpu", "one_and_a_half_gpus", "whole_gpus_ddp"],
)
def test_fractional_gpus_are_allowed_for_one_worker_and_whole_gpus_for_ddp(tmp_path, resources):
    tree = {**MINIMAL, "resources": resources}
    res = load_search_space(write(tmp_path, tree)).space.resources
    assert res.gpus_per_worker == resources["gpus_per_worker"]
    assert res.num_workers == resources.get("num_workers", 1)


@pytest.mark.parametrize("gpus", [0.5, 1.5])
def test_fractional_gpus_with_ddp_fail_naming_the_field(tmp_path, gpus):
    tree = {**MINIMAL, "resources": {"num_workers": 2, "gpus_per_worker": gpus}}
    with pytest.raises(ConfigError) as error:
        load_search_space(write(tmp_path, tree))
    assert str(error.value) == (
        f"{tmp_path / 'space.yaml'}: resources: fractional gpus_per_worker ({gpus:g}) needs "
        "num_workers 1 (got 2): two ranks on one GPU break NCCL; use whole GPUs for DDP"
    )


def test_a_wrong_or_ambiguous_baseline_is_one_line_naming_the_field(tmp_path):
    path = write(tmp_path, {**MINIMAL, "baseline": "nope"})
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    assert str(error.value).startswith(
        f"{path}: baseline: baseline 'nope' is not an arm; arms: e2e, local"
    )  # YAML order
    assert "\n" not in str(error.value)
    both_kl = {**MINIMAL, "arms": {name: {**arm, "loss": {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1.0}}}
                                   for name, arm in MINIMAL["arms"].items()}}  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"space\.yaml: baseline: cannot tell the baseline arm \(no arm qualifies"
    ):
        load_search_space(write(tmp_path, both_kl))
    assert load_search_space(write(tmp_path, {**both_kl, "baseline": "e2e"})).space.baseline_arm() == "e2e"
