"""A node lost mid-sweep: on a 3-node Ray cluster (all on this machine), the node that runs a
trial's Train worker is removed once the trial has reported a mid-run checkpoint. The trial's
Tune function and Train controller run on the head node (`sweep.tuner`), so Ray Train restarts
the worker on the other node from that checkpoint, the sweep finishes, and the trial's metrics
and weights equal an uninterrupted run's. About 2 minutes on 2 CPU cores (a cluster of three
Ray nodes, a trial started twice)."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import checkpointed_sweep_base
from safetensors.torch import load_file

from sparsify import metric_names as names
from sparsify import train
from sweep.records import FINISHED, read_trial_record
from sweep.results import load_results
from sweep.run import RAY_ENV_DEFAULTS, own_cluster_setup_hook
from sweep.run import main as run_main
from sweep.space import load_search_space

pytestmark = pytest.mark.slow

SAE_WEIGHTS = "sae.safetensors"  # a run folder's SAE weights (README)
TIMING = {"train/tokens_per_s", "cost/device_seconds"}
TIMING_PREFIX = "time/"
"""Wall seconds by phase: they differ between any two runs."""
ARM = "local"
PARAMS = {"loss.sparsity.coeff": 1.0}
STALL_S = 300.0
"""How long the first worker waits after reporting its checkpoint: the test removes its node
meanwhile (the wait only bounds a test that failed to)."""
CHECKPOINT_MANAGER_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""In a Train run's folder: Ray Train's controller (re)writes it as it registers a checkpoint;
a restarted worker group starts from the checkpoint it names."""


def stall_hook(marker: Path, attempts_log: Path):
    """A Ray `worker_process_setup_hook` (runs in every Ray worker process, so nothing in the
    code under test knows of it). It sets RAY_ADDRESS as `sweep.run.start_ray`'s own hook does;
    each Train attempt logs its node and the step of the checkpoint it starts from
    (`ray.train.get_checkpoint`); the first worker to report a checkpoint writes its node id to
    `marker` and then waits: the test removes that node while it does."""
    set_ray_address = own_cluster_setup_hook()

    def hook() -> None:
        import json
        import time
        from pathlib import Path

        import ray
        import ray.train

        set_ray_address()
        report, get_checkpoint = ray.train.report, ray.train.get_checkpoint

        def logged_get_checkpoint():
            checkpoint = get_checkpoint()
            step = None
            if checkpoint is not None:  # the trainer's state beside the weights (sparsify.training)
                step = json.loads((Path(checkpoint.path) / "train_state.json").read_text())["step"]
            attempt = {
                "run": ray.train.get_context().get_experiment_name(),
                "node": ray.get_runtime_context().get_node_id(),
                "start_step": step,
            }
            with open(attempts_log, "a") as log:
                log.write(json.dumps(attempt) + "\n")
            return checkpoint

        def stalling_report(metrics, checkpoint=None, **kwargs):
            report(metrics, checkpoint=checkpoint, **kwargs)
            if checkpoint is not None and not marker.exists():
                marker.write_text(ray.get_runtime_context().get_node_id())
                time.sleep(STALL_S)

        ray.train.report = stalling_report
        ray.train.get_checkpoint = logged_get_checkpoint

    return hook


def registered_checkpoint(train_runs: Path) -> bool:
    """Whether the Train controller of the (only) Train run under `train_runs` has registered
    a checkpoint: a restarted worker group would start from it."""
    for snapshot in train_runs.glob(f"train_*/{CHECKPOINT_MANAGER_SNAPSHOT}"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, ValueError):  # being written
            pass
    return False


def actor_nodes(cluster: Any, class_name: str) -> list[str]:
    """Node ids of the cluster's actors of a class, dead ones included, in creation order."""
    return [
        actor["Address"]["NodeID"]
        for actor in cluster.global_state.actor_table(None).values()
        if actor["ActorClassName"] == class_name
    ]


@pytest.fixture()
def cluster(monkeypatch):
    """Three Ray nodes on this machine in a private Ray temp folder: a head with no CPU (as in
    `cluster.yaml`) and two nodes of 1 CPU, RAY_ADDRESS naming it (as `ray job submit` sets)
    while the test runs. The head's 64 MiB of (logical) memory makes Ray's default placement
    put a trial's Tune function on a worker node; the sweep must ask for the head."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    for key, value in RAY_ENV_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    temp = tempfile.mkdtemp(prefix="rnode", dir="/tmp")  # short: Ray's socket paths have a limit
    monkeypatch.setenv("RAY_TMPDIR", temp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_cluster = Cluster()  # nodes added inside `try`: a node that fails to start is shut down too
    try:
        ray_cluster.add_node(num_cpus=0, memory=64 * 2**20, include_dashboard=False)  # the head
        for _ in range(2):
            ray_cluster.add_node(num_cpus=1)
        monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)
        yield ray_cluster
    finally:
        ray.shutdown()
        ray_cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_trial_on_a_lost_node_resumes_on_another_from_its_checkpoint(
    cluster, tiny_model_dir, corpus_dir, tmp_path
):
    import ray

    # 4 optimizer steps, a checkpoint after step 2: the node goes right after it
    base = checkpointed_sweep_base(tiny_model_dir, corpus_dir, tmp_path)
    space = {
        "name": "node_loss",
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 1,
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 2},
        "base_config": base,
        "arms": {
            ARM: {
                "loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
                # OptunaSearch needs a searched parameter; one value keeps the trial known
                "search": {k: {"type": "categorical", "values": [v]} for k, v in PARAMS.items()},
            }
        },
    }
    space_path = tmp_path / "node_loss.yaml"
    space_path.write_text(yaml.safe_dump(space))
    sweep_dir = tmp_path / "sweeps" / "node_loss"
    marker, attempts_log = tmp_path / "stalled_on", tmp_path / "attempts.jsonl"
    head = cluster.head_node.node_id
    nodes = {node.node_id for node in cluster.worker_nodes}

    start = time.monotonic()
    done = threading.Event()
    lost: dict[str, Any] = {}

    def remove_node_of_checkpointed_worker() -> None:
        try:
            while not (marker.exists() and registered_checkpoint(sweep_dir / "ray_train")):
                if done.wait(0.2):
                    return
            node_id = marker.read_text()
            lost["placement"] = {
                name: actor_nodes(cluster, name)
                for name in ("ImplicitFunc", "TrainController", "RayTrainWorker")
            }
            lost["at_s"] = time.monotonic() - start
            cluster.remove_node(
                next(n for n in cluster.worker_nodes if n.node_id == node_id), allow_graceful=False
            )
            lost["node"] = node_id
        except Exception as exc:  # seen by the test's asserts
            lost["error"] = repr(exc)

    # the sweep joins the cluster (RAY_ADDRESS) through this connection: start_ray keeps it
    ray.init(
        address=cluster.address, runtime_env={"worker_process_setup_hook": stall_hook(marker, attempts_log)}
    )
    watcher = threading.Thread(target=remove_node_of_checkpointed_worker, daemon=True)
    watcher.start()
    try:
        assert run_main([str(space_path)]) == 0
    finally:
        done.set()
        watcher.join(timeout=60)
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    print(f"\nsweep done in {time.monotonic() - start:.0f} s")

    assert "error" not in lost, lost["error"]
    assert "node" in lost, "no node was removed"
    print(f"node lost {lost['at_s']:.0f} s after the sweep started")
    print(
        "placement when the node was lost (Tune function, Train controller, Train worker):", lost["placement"]
    )
    assert lost["node"] in nodes and lost["node"] not in alive
    # the trial's driver and controller ran on the head, its one worker on the lost node
    assert lost["placement"]["ImplicitFunc"] == [head]
    assert lost["placement"]["TrainController"] == [head]
    assert lost["placement"]["RayTrainWorker"] == [lost["node"]]

    table = load_results(sweep_dir)
    assert len(table) == 1
    row = table.iloc[0]
    trial_id = row["trial_id"]
    assert row["status"] == FINISHED
    attempts = [json.loads(line) for line in attempts_log.read_text().splitlines()]
    print("Train attempts:", attempts)
    # two attempts of the one Train run: the first from scratch on the lost node, the second
    # on the other node from the checkpoint of step 2 (of 4)
    assert [a["run"] for a in attempts] == [f"train_{trial_id}"] * 2, attempts
    assert [a["start_step"] for a in attempts] == [None, 2], attempts
    assert attempts[0]["node"] == lost["node"]
    assert attempts[1]["node"] in nodes - {lost["node"]}

    # the same trial trained here, uninterrupted, with the worker's one thread
    loaded = load_search_space(space_path)
    cfg = loaded.trial_config(ARM, PARAMS).model_copy(update={"save_dir": str(tmp_path / "here")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = train(cfg, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    compared = {key for key in here.metrics if key not in TIMING and not key.startswith(TIMING_PREFIX)}
    assert {names.EVAL_L0, names.EVAL_CE_LOSS_INCREASE, names.prefixed(names.TRAIN, names.LOSS)} <= compared
    for key in compared:
        assert row[key] == pytest.approx(here.metrics[key], rel=1e-6, abs=1e-9), key
    trained = load_file(str(sweep_dir / "runs" / ARM / trial_id / SAE_WEIGHTS))
    for key, value in here.model.saes.state_dict().items():
        torch.testing.assert_close(trained[key], value, rtol=1e-6, atol=1e-7)
    record = read_trial_record(sweep_dir, ARM, trial_id)
    assert record is not None
    for key, values in here.eval_per_sequence.items():
        assert record.eval_per_sequence[key] == pytest.approx(values, rel=1e-6, abs=1e-9), key
    for key in (names.EVAL_L0, names.EVAL_CE_LOSS_INCREASE):
        print(f"{key}: lost node + resumed {row[key]:.9g}, uninterrupted {here.metrics[key]:.9g}")
