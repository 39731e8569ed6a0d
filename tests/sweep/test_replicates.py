"""`seeds: N` (docs/design.md §7, §11): each point trained N times with seed + k and the k-th
data seed after train_data.seed (skipping the eval stream's), the record holding the replicates and their means, and a restarted trial
training only the replicates that had not finished. The end-to-end test takes about a minute
on 2 CPU cores (a local Ray cluster, three trainings of the tiny model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import checkpointed_sweep_base, local_ray_with_worker_hook, tiny_train_config
from safetensors.torch import load_file

from sparsify import ConfigError, validate_config
from sparsify import metric_names as names
from sweep.records import ERROR, FINISHED, read_trial_record
from sweep.results import load_records, load_results
from sweep.space import load_search_space

LOCAL = {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}
ONE_COEFF = {"loss.sparsity.coeff": {"type": "categorical", "values": [1.0]}}
"""OptunaSearch needs a searched parameter; one value keeps the trial known."""


def space_file(tmp_path: Path, base: dict, **fields) -> Path:
    space = {
        "name": "replicates",
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 1,
        "base_config": base,
        "arms": {"local": {"loss": LOCAL, "search": ONE_COEFF}},
        **fields,
    }
    path = tmp_path / "replicates.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_seeds_default_to_one_and_refuse_zero_and_early_stopping(tiny_model_dir, corpus_dir, tmp_path):
    base = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, eval_every_n_samples=32)
    del base["loss"]
    assert load_search_space(space_file(tmp_path, base)).space.seeds == 1
    assert load_search_space(space_file(tmp_path, base, seeds=3)).space.seeds == 3
    with pytest.raises(ConfigError, match="seeds"):
        load_search_space(space_file(tmp_path, base, seeds=0))
    with pytest.raises(ConfigError, match="seeds: 2 cannot be combined with early_stopping") as error:
        load_search_space(space_file(tmp_path, base, seeds=2, early_stopping={"grace_period": 1}))
    assert "\n" not in str(error.value)
    # one seed with ASHA stays allowed
    load_search_space(space_file(tmp_path, base, seeds=1, early_stopping={"grace_period": 1}))


def test_replicate_configs_and_means():
    from sweep.trial import replicate_config, replicate_means, replicate_run_name, replicate_sae_run_name

    cfg = validate_config(tiny_train_config(Path("m"), Path("c"), Path("t"), seed=7))
    assert replicate_config(cfg, 0, "s.yaml") is cfg
    second = replicate_config(cfg, 2, "s.yaml")
    # train and eval read the same files and split: data seed 1 is the eval stream, skipped
    assert (second.seed, second.train_data.seed, second.eval_data.seed) == (9, 3, 1)  # eval data unchanged
    assert replicate_config(cfg, 1, "s.yaml").train_data.seed == 2
    other_split = cfg.model_copy(update={"eval_data": cfg.eval_data.model_copy(update={"split": "test"})})
    assert replicate_config(other_split, 2, "s.yaml").train_data.seed == 2  # another stream: seed + k
    assert second.model_dump(exclude={"seed", "train_data"}) == cfg.model_dump(exclude={"seed", "train_data"})
    assert [replicate_run_name("abc", k) for k in (0, 1)] == ["train_abc", "train_abc_seed1"]
    assert [replicate_sae_run_name("abc", k) for k in (0, 1)] == ["abc", "abc_seed1"]

    outcomes = [
        {"metrics": {"eval/L0": 10.0, "eval_se/L0": 0.3, "eval/kl": 0.5, "train/loss": 2.0}},
        {"metrics": {"eval/L0": 13.0, "eval_se/L0": 0.4, "eval/kl": 0.25, "train/loss": 4.0}},
        {"metrics": {"eval/L0": 16.0, "eval_se/L0": 0.5, "eval/kl": 0.75, "train/loss": 3.0}},
    ]
    means = replicate_means(outcomes)
    assert means["eval/L0"] == 13.0 and means["eval/kl"] == 0.5 and means["train/loss"] == 3.0
    # sample std of (10, 13, 16) is 3, over sqrt(3): the per-run SEs are replaced, not averaged
    assert means["eval_se/L0"] == pytest.approx(3 / math.sqrt(3), rel=1e-12)
    assert means["eval_se/kl"] == pytest.approx(0.25 / math.sqrt(3), rel=1e-12)
    assert "eval_se/loss" not in means and "train_se/loss" not in means
    assert math.isnan(replicate_means(outcomes[:1])["eval_se/L0"])


def attempts_hook(marker: Path, attempts_log: Path):
    """A Ray `worker_process_setup_hook`: `ray.train.get_checkpoint` (which each training calls
    once, first) logs `<Train run name> resumed=<bool>`; the first attempt of replicate 1
    (`..._seed1`) then fails, as a crashed node would, while `marker` is absent."""

    def hook() -> None:
        import ray.train

        get_checkpoint = ray.train.get_checkpoint

        def logged_get_checkpoint():
            checkpoint = get_checkpoint()
            run = ray.train.get_context().get_experiment_name()
            with open(attempts_log, "a") as log:
                log.write(f"{run} resumed={checkpoint is not None}\n")
            if run.endswith("_seed1") and not marker.exists():
                marker.write_text("failed once")
                raise RuntimeError("injected failure of replicate 1")
            return checkpoint

        ray.train.get_checkpoint = logged_get_checkpoint

    return hook


@pytest.fixture
def counting_ray(tmp_path):
    marker, attempts = tmp_path / "failed", tmp_path / "attempts.log"
    with local_ray_with_worker_hook(attempts_hook(marker, attempts)):
        yield marker, attempts


def test_two_seeds_per_point_and_a_restarted_trial_keeps_its_finished_replicate(
    counting_ray, tiny_model_dir, corpus_dir, tmp_path
):
    from sweep.tuner import arm_tuner

    marker, attempts = counting_ray
    base = checkpointed_sweep_base(tiny_model_dir, corpus_dir, tmp_path)
    resources = {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0}
    loaded = load_search_space(space_file(tmp_path, base, seeds=2, resources=resources))
    sweep_dir = tmp_path / "sweeps" / "replicates"

    # first run: replicate 0 finishes, replicate 1 fails (max_failures 0): the trial errors
    arm_tuner(loaded, "local", sweep_dir, num_samples=1).fit()
    (first,) = load_records(sweep_dir)
    trial_id = first.trial_id
    assert marker.exists() and first.status == ERROR, first
    assert "injected failure of replicate 1" in (first.error or "")
    stored = sweep_dir / "ray_train" / f"train_{trial_id}" / "replicate.json"
    assert json.loads(stored.read_text())["status"] == FINISHED
    written_at = stored.stat().st_mtime_ns

    # the sweep rerun: Tune restarts the errored trial; replicate 0 is reused, not trained again
    grid = arm_tuner(loaded, "local", sweep_dir, num_samples=1).fit()
    record = read_trial_record(sweep_dir, "local", trial_id)
    assert record is not None and record.status == FINISHED, record
    runs = [line.split() for line in attempts.read_text().splitlines()]
    assert [r for r in runs if r[0] == f"train_{trial_id}"] == [[f"train_{trial_id}", "resumed=False"]], runs
    assert len([r for r in runs if r[0] == f"train_{trial_id}_seed1"]) == 2, runs  # failed, then trained
    assert stored.stat().st_mtime_ns == written_at

    # two replicates with different seeds (SAE init and data order), each with its own run folder
    assert [rep["seed"] for rep in record.replicates] == [0, 1]
    runs_dir = sweep_dir / "runs" / "local"
    configs = [
        yaml.safe_load((runs_dir / name / "config.yaml").read_text())
        for name in (trial_id, f"{trial_id}_seed1")
    ]
    assert [(c["seed"], c["train_data"]["seed"], c["eval_data"]["seed"]) for c in configs] == [
        (0, 0, 1),
        (1, 2, 1),  # data seed 1 is the eval stream of these same files: skipped
    ]
    weights = [
        load_file(str(runs_dir / name / "sae.safetensors")) for name in (trial_id, f"{trial_id}_seed1")
    ]
    key = "blocks-1-hook_resid_pre.encoder.0.weight"
    assert not torch.equal(weights[0][key], weights[1][key])

    # metrics: the replicates' means; eval_se: their spread (n = 2: |a - b| / 2)
    a, b = (rep["metrics"] for rep in record.replicates)
    assert a[names.EVAL_L0] != b[names.EVAL_L0] or a[names.EVAL_KL] != b[names.EVAL_KL]
    for name in (names.EVAL_L0, names.EVAL_CE_LOSS_INCREASE, names.EVAL_KL, names.EVAL_ALIVE, "train/loss"):
        assert record.metrics[name] == pytest.approx((a[name] + b[name]) / 2, rel=1e-12), name
    for name in (names.EVAL_L0, names.EVAL_CE_LOSS_INCREASE, names.EVAL_ALIVE):
        assert record.metrics[names.se_name(name)] == pytest.approx(
            abs(a[name] - b[name]) / 2, rel=1e-12, abs=1e-15
        )
    assert record.wall_time_s == pytest.approx(sum(rep["wall_time_s"] for rep in record.replicates))
    # each replicate keeps its own eval's per-sequence values and per-run SEs
    for rep in record.replicates:
        assert set(rep["eval_per_sequence"]) == set(names.KEPT_PER_SEQUENCE)
        for name, values in rep["eval_per_sequence"].items():
            assert len(values) == base["eval_n_samples"]
            assert math.fsum(values) / len(values) == pytest.approx(rep["metrics"][name], rel=1e-6, abs=1e-9)
        assert math.isfinite(rep["metrics"][names.se_name(names.EVAL_L0)])
    assert record.eval_per_sequence == {}

    # Tune (and so Optuna) got the means as the trial's result; the table counts two seeds
    assert grid[0].metrics[names.EVAL_L0] == pytest.approx(record.metrics[names.EVAL_L0], rel=1e-12)
    assert load_results(sweep_dir)["n_seeds"].tolist() == [2]
