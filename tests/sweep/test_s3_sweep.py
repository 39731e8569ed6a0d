"""A sweep whose `storage_path` is `s3://...`, against a real S3-compatible server started on
127.0.0.1 (moto's, `tests/s3_server.py`): everything the sweep keeps lands in the bucket, and a
driver with an empty local disk resumes from the bucket alone (docs/design.md §15).

The driver and the Ray workers get different cache folders (`SPARSIFY_CACHE`), so each has its
own mirror of the sweep, as two machines would: what one writes reaches the other only through
the bucket."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import pyarrow.fs
import pytest
import yaml
from conftest import checkpointed_sweep_base
from s3_server import S3_ENV, bucket_uri

from sparsify import metric_names as names
from sweep.results import load_results
from sweep.run import main as run_main


def bucket_names(uri: str) -> list[str]:
    """The objects under a sweep's URI, by path relative to it (names only: Ray deletes old
    checkpoints while a sweep runs)."""
    fs, base = pyarrow.fs.FileSystem.from_uri(uri)
    selector = pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True)
    return [i.path[len(base) + 1 :] for i in fs.get_file_info(selector) if i.type == pyarrow.fs.FileType.File]


def bucket_files(uri: str) -> dict[str, bytes]:
    """Every object under a sweep's URI: {path relative to it: content}."""
    fs, base = pyarrow.fs.FileSystem.from_uri(uri)
    selector = pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True)
    files = {}
    for info in fs.get_file_info(selector):
        if info.type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(info.path) as stream:
                files[info.path[len(base) + 1 :]] = stream.read()
    return files


def s3_space(tmp_path: Path, model_dir: Path, corpus: Path, storage: str) -> Path:
    """Two arms of one trial each: `local` (which reads the activation cache) and `ft`, a KL
    fine-tune of the local trial's SAE (its worker must fetch the source's run folder)."""
    base = checkpointed_sweep_base(model_dir, corpus, tmp_path)
    space = {
        "name": "on_s3",
        "storage_path": storage,
        "num_samples": 1,
        "sampler": "grid",
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "base_config": {**base, "activation_cache": "on"},
        "arms": {
            "local": {
                "loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
                "search": {"loss.sparsity.coeff": {"type": "categorical", "values": [0.3]}},
            },
            "ft": {
                "init_from": {"arm": "local", "select": "all"},
                "loss": {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1.0}},
                "set": {"activation_cache": "auto", "n_samples": 32},
            },
        },
    }
    path = tmp_path / "on_s3.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.fixture
def s3_ray(tmp_path, monkeypatch, s3_endpoint):
    """A local Ray whose workers have their own cache folder (their own sweep mirror), with
    the test server's credentials in every process; yields the driver's cache folder."""
    import ray

    from sweep.run import start_ray

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    driver_cache = tmp_path / "driver_cache"
    monkeypatch.setenv("SPARSIFY_CACHE", str(driver_cache))
    ray.shutdown()
    worker_env = {"SPARSIFY_CACHE": str(tmp_path / "worker_cache")}
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": worker_env})
    start_ray()  # already initialized: only sets the environment defaults
    yield driver_cache
    ray.shutdown()


@pytest.mark.slow  # 2-3 minutes on 2 cores; the default suite keeps test_storage.py's S3 checks
def test_sweep_on_s3_keeps_everything_in_the_bucket_and_resumes_from_it(
    s3_ray, s3_endpoint, tiny_model_dir, corpus_dir, tmp_path, capsys
):
    storage = bucket_uri(s3_endpoint, "sweeps-test")
    space = s3_space(tmp_path, tiny_model_dir, corpus_dir, storage)
    assert run_main([str(space)]) == 0
    sweep_uri = storage.replace("/sweeps?", "/sweeps/on_s3?")
    assert f"sweep folder: {sweep_uri}" in capsys.readouterr().out

    files = bucket_files(sweep_uri)
    names_in_bucket = sorted(files)
    records = [n for n in names_in_bucket if n.startswith("trials/")]
    assert len(records) == 2, names_in_bucket
    local_id = next(n for n in records if n.startswith("trials/local/")).split("/")[-1].removesuffix(".json")
    ft_id = next(n for n in records if n.startswith("trials/ft/")).split("/")[-1].removesuffix(".json")
    for wanted in (
        "search_space.json",
        "optuna/local.journal",
        "report/report.md",
        "report/verdict.json",
        "report/frontier_l0.png",
        f"runs/local/{local_id}/metrics.json",
        f"runs/ft/{ft_id}/metrics.json",
        f"ray_train/train_{local_id}",  # Ray Train's run state and checkpoints
        "ray_tune/local/",  # Tune's experiment state
        "activation_cache/",
    ):
        assert any(n == wanted or n.startswith(wanted) for n in names_in_bucket), (wanted, names_in_bucket)
    assert any(
        n.startswith(f"runs/local/{local_id}/") and n.endswith(".safetensors") for n in names_in_bucket
    )
    assert any(n.startswith(f"ray_train/train_{local_id}/checkpoint_") for n in names_in_bucket)
    ours = [
        n for n in names_in_bucket if not n.startswith(("ray_tune/", "ray_train/"))
    ]  # Ray's own: its business
    assert not [n for n in ours if Path(n).name.startswith(".")], "a temp object was left"
    assert not (tmp_path / "sweeps").exists()

    # the fine-tune started from the local trial's SAE, fetched from the bucket
    table = load_results(sweep_uri)
    assert table["status"].tolist() == ["finished", "finished"]
    assert table[names.EVAL_L0].notna().all()

    # a fresh driver: its mirror is gone; the rerun keeps both trials (not trained again) and
    # writes the same report
    shutil.rmtree(s3_ray / "sweeps")
    assert run_main([str(space)]) == 0
    again = bucket_files(sweep_uri)
    for name in records:
        assert again[name] == files[name], f"{name} was rewritten"
    assert again["report/report.md"] == files["report/report.md"]
    assert again["report/verdict.json"] == files["report/verdict.json"]
    assert os.listdir(s3_ray / "sweeps")  # the rerun read the bucket into a new mirror


@pytest.mark.slow
def test_killed_sweep_on_s3_resumes_on_a_fresh_driver_like_an_uninterrupted_one(
    s3_endpoint, tiny_model_dir, corpus_dir, tmp_path, monkeypatch
):
    """The driver (a subprocess, with its own local Ray) is SIGKILLed while a trial is mid-run
    with a checkpoint on the bucket; a second driver with an empty cache and an empty HOME
    resumes from the bucket alone. Its trials and frontier equal those of the same sweep run
    without a kill (under another name). Several minutes on 2 CPU cores."""
    import signal
    import subprocess
    import sys
    import tempfile
    import uuid

    import pandas as pd
    from conftest import PROCESS_TAG, tagged_processes

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    storage = bucket_uri(s3_endpoint, "resume-test")
    base = checkpointed_sweep_base(tiny_model_dir, corpus_dir, tmp_path)
    base["n_samples"] = 256  # 16 steps, a checkpoint every 2: long enough to be killed mid-run
    space = {
        "num_samples": 3,
        "sampler": "grid",
        "storage_path": storage,
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "base_config": base,
        "arms": {
            "local": {
                "loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}},
                "search": {"loss.sparsity.coeff": {"type": "categorical", "values": [0.05, 0.3, 2.0]}},
            }
        },
    }
    tag = uuid.uuid4().hex
    repo = Path(__file__).parents[2]

    def driver(name: str, home: Path) -> list:
        """The command and environment of a driver on a machine whose disk is `home`."""
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, **space}))
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(S3_ENV, HOME=str(home), SPARSIFY_CACHE=str(home / "cache"), PYTHONUNBUFFERED="1")
        env.update(RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"), **{PROCESS_TAG: tag})
        return [[sys.executable, "-m", "sweep.run", str(path)], env]

    def sweep_uri(name: str) -> str:
        return storage.replace("/sweeps?", f"/sweeps/{name}?")

    def mid_run(name: str) -> bool:
        """A trial has a checkpoint on the bucket and no record yet."""
        files = bucket_names(sweep_uri(name))
        recorded = {Path(n).stem for n in files if n.startswith("trials/")}
        return any(
            n.split("/")[1].removeprefix("train_") not in recorded
            for n in files
            if n.startswith("ray_train/") and "/checkpoint_" in n
        )

    try:
        command, env = driver("killed", tmp_path / "machine_a")
        log = (tmp_path / "killed.log").open("w")
        first = subprocess.Popen(
            command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 900
        while not (
            len([n for n in bucket_names(sweep_uri("killed")) if n.startswith("trials/")]) >= 1
            and mid_run("killed")
        ):
            assert first.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial ended, then checkpointed, in 15 minutes"
            time.sleep(0.5)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        before = load_results(sweep_uri("killed"))
        assert 1 <= len(before) < 3

        command, env = driver("killed", tmp_path / "machine_b")  # same sweep, a fresh disk
        resumed = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
        assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
        command, env = driver("undisturbed", tmp_path / "machine_c")
        undisturbed = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
        assert undisturbed.returncode == 0, undisturbed.stdout[-4000:] + undisturbed.stderr[-4000:]
    finally:
        for pid in tagged_processes(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def by_point(name: str) -> pd.DataFrame:
        table = load_results(sweep_uri(name))
        columns = [
            "param:loss.sparsity.coeff",
            "status",
            names.EVAL_L0,
            names.EVAL_CE_LOSS_INCREASE,
            "eval/mse",
        ]
        return table[[c for c in columns if c in table]].sort_values(columns[0]).reset_index(drop=True)

    after, expected = by_point("killed"), by_point("undisturbed")
    print("resumed:\n", after, "\nundisturbed:\n", expected)
    assert len(after) == 3 and (after["status"] == "finished").all()
    pd.testing.assert_frame_equal(after, expected, rtol=1e-5)
    # the trials that had ended before the kill are kept as they were
    kept = load_results(sweep_uri("killed")).set_index("trial_id").loc[before["trial_id"]]
    assert kept["wall_time_s"].tolist() == before["wall_time_s"].tolist()
    # the report (built from the bucket by the fresh driver) has the same frontier
    frontier = {
        name: bucket_files(sweep_uri(name))["report/frontier_local.csv"] for name in ("killed", "undisturbed")
    }
    tables = {name: pd.read_csv(io.BytesIO(data)) for name, data in frontier.items()}
    shown = ["param:loss.sparsity.coeff", names.EVAL_L0, names.EVAL_CE_LOSS_INCREASE]
    pd.testing.assert_frame_equal(tables["killed"][shown], tables["undisturbed"][shown], rtol=1e-5)
