"""DDP through Ray: one sweep trial with 2 Ray Train workers (gloo on CPU) trains the same SAE as
`sparsify.train` on 1 process, on one Ray node and across two Ray nodes on loopback."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_train_config
from safetensors.torch import load_file

from sparsify import metric_names as names
from sparsify import train
from sweep.results import load_results
from sweep.run import RAY_ENV_DEFAULTS
from sweep.run import main as run_main
from sweep.space import load_search_space
from sweep.trial import sweep_runs_dir

SAE_WEIGHTS = "sae.safetensors"  # a run folder's SAE weights (README)
WEIGHT_ATOL = 1e-5
"""2 Ray workers vs 1 process: float32 summation order only (see tests/sparsify/test_ddp.py)."""
METRIC_RTOL, METRIC_ATOL = 1e-4, 1e-6
COMPARED = (
    names.EVAL_L0,
    names.EVAL_CE_LOSS_INCREASE,
    names.EVAL_CE_SAE,
    names.EVAL_KL,
    names.EVAL_ALIVE,
    names.prefixed(names.TRAIN, names.LOSS),
    names.prefixed(names.TRAIN, names.TOKENS_SEEN),
)
"""Metrics that do not depend on how a batch is split (explained variance does: test_ddp.py)."""
ARM = "e2e"


def write_space(tmp_path: Path, model_dir: Path, corpus: Path, name: str) -> Path:
    """A one-trial sweep of the tiny e2e SAE on 2 workers of 1 CPU each."""
    base = tiny_train_config(model_dir, corpus, tmp_path, n_samples=64)
    space = {
        "name": name,
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 1,
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
        "base_config": {k: v for k, v in base.items() if k != "loss"},
        "arms": {ARM: {"loss": base["loss"], "search": {"lr": {"type": "categorical", "values": [3e-3]}}}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def check_matches_one_process(space_path: Path, tiny_bridge: Any) -> dict[str, Any]:
    """Run the sweep; its one trial must equal `train()` of the same config on 1 process.
    Returns the trial's row of the results table."""
    assert run_main([str(space_path)]) == 0
    loaded = load_search_space(space_path)
    sweep_dir = Path(loaded.space.storage_path) / loaded.space.name
    table = load_results(sweep_dir)
    assert len(table) == 1 and table["status"].tolist() == ["finished"]
    row = table.iloc[0].to_dict()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker (cpus_per_worker 1); also faster on a busy machine
    try:
        cfg = loaded.trial_config(ARM, {"lr": 3e-3}).model_copy(update={"save_dir": None})
        reference = train(cfg, tlens_model=tiny_bridge, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    for key in COMPARED:
        assert row[key] == pytest.approx(reference.metrics[key], rel=METRIC_RTOL, abs=METRIC_ATOL), key
    saved = load_file(str(sweep_runs_dir(sweep_dir, ARM) / row["trial_id"] / SAE_WEIGHTS))
    for key, weight in reference.model.saes.state_dict().items():
        torch.testing.assert_close(saved[key], weight, rtol=0, atol=WEIGHT_ATOL)
    return row


@pytest.fixture()
def ray_env(monkeypatch):
    """Ray's settings for sweeps, and a private Ray temp folder: a cluster started here is not
    found by another process's `ray.init()` (which looks for the latest cluster under /tmp/ray)."""
    import ray

    ray.shutdown()
    for key, value in RAY_ENV_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    temp = tempfile.mkdtemp(prefix="rddp", dir="/tmp")  # short: Ray's socket paths have a limit
    monkeypatch.setenv("RAY_TMPDIR", temp)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def test_two_worker_trial_matches_one_process_training(
    ray_env, tiny_model_dir, corpus_dir, tiny_bridge, tmp_path
):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    row = check_matches_one_process(write_space(tmp_path, tiny_model_dir, corpus_dir, "ddp"), tiny_bridge)
    assert row[names.prefixed(names.TRAIN, names.TOKENS_SEEN)] == 64 * 16


def test_two_worker_trial_spans_two_nodes_and_stores_its_results(
    ray_env, tiny_model_dir, corpus_dir, tiny_bridge, tmp_path
):
    import ray
    from ray.cluster_utils import Cluster

    # 1 CPU per node: a trial's 2 workers of 1 CPU each cannot share a node
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        check_matches_one_process(write_space(tmp_path, tiny_model_dir, corpus_dir, "ddp_nodes"), tiny_bridge)
        workers = [
            actor
            for actor in cluster.global_state.actor_table(None).values()
            if actor["ActorClassName"] == "RayTrainWorker"
        ]
        worker_nodes = {actor["Address"]["NodeID"] for actor in workers}
        assert len(workers) == 2 and len(worker_nodes) == 2
        assert worker_nodes == {node["NodeID"] for node in ray.nodes()}
    finally:
        ray.shutdown()
        cluster.shutdown()
