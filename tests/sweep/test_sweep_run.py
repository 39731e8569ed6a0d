"""A whole sweep through Ray Tune + Optuna + Ray Train on the tiny model (about 2 minutes)."""

import json

import pytest
import yaml
from conftest import tiny_train_config

from sparsify import metric_names as names
from sweep.results import load_results
from sweep.run import main as run_main

PLANTED_SECRETS = {"WANDB_API_KEY": "feedface" * 5, "HF_TOKEN": "hf_PlantedFakeToken0123456789"}


@pytest.fixture(scope="module")
def ray_cluster():
    import os

    import ray

    from sweep.run import start_ray

    ray.shutdown()
    saved = {k: os.environ.get(k) for k in PLANTED_SECRETS}
    os.environ.update(PLANTED_SECRETS)  # before ray.init, so the trial workers have them too
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never some other Ray here
    start_ray()  # already initialized: only sets the environment defaults
    yield
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_sweep_runs_both_arms_records_a_diverged_trial_and_writes_the_report(
    ray_cluster, tiny_model_dir, corpus_dir, tmp_path, capsys
):
    base = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, n_samples=32, tensorboard=True)
    del base["loss"]
    space = {
        "name": "tiny",
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 2,
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "base_config": base,
        "arms": {
            "local": {
                "loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
                "search": {"loss.sparsity.coeff": {"type": "loguniform", "low": 0.01, "high": 1.0}},
            },
            # lr 1e30 overflows the out_to_in term: that trial is recorded as diverged and the
            # sweep goes on
            "e2e": {
                "loss": {
                    "sparsity": {"coeff": 1.0},
                    "logits_kl": {"coeff": 1.0},
                    "out_to_in": {"coeff": 1.0},
                },
                "search": {"lr": {"type": "categorical", "values": [1e-3, 1e30]}},
            },
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(space))
    assert run_main([str(path)]) == 0
    sweep_dir = tmp_path / "sweeps" / "tiny"
    table = load_results(sweep_dir)
    assert sorted(table["arm"]) == ["e2e", "e2e", "local", "local"]
    local = table[table["arm"] == "local"]
    assert (local["status"] == "finished").all()
    assert (local[names.EVAL_L0] > 0).all() and local[names.EVAL_CE_LOSS_INCREASE].notna().all()
    # each finished trial's metrics equal what its run folder saved
    for _, row in local.iterrows():
        saved = json.loads((sweep_dir / "runs" / "local" / row["trial_id"] / "metrics.json").read_text())
        assert saved[names.EVAL_L0] == pytest.approx(row[names.EVAL_L0])
    e2e = table[table["arm"] == "e2e"]
    diverged = e2e["param:lr"] == 1e30
    assert diverged.any() and not diverged.all()  # the seeded sampler tries both values
    assert (e2e[diverged]["status"] == "diverged").all() and (e2e[~diverged]["status"] == "finished").all()
    assert e2e[diverged]["error"].str.contains("'out_to_in' is inf").all()
    report = (sweep_dir / "report" / "report.md").read_text()
    assert "local" in report and (sweep_dir / "report" / "frontier_l0.png").exists()
    out = capsys.readouterr().out
    assert f"sweep folder: {sweep_dir}" in out
    # secrets in the environment never land in the sweep folder (configs, records, logs, report)
    n_files = 0
    for path in sweep_dir.rglob("*"):
        if path.is_file():
            n_files += 1
            data = path.read_bytes()
            for secret in PLANTED_SECRETS.values():
                assert secret.encode() not in data, f"{secret} leaked into {path}"
    assert n_files > 20
