"""Shared fixtures: a tiny random Llama model with a locally trained tokenizer, and a small
local text corpus. Nothing is downloaded."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny_model import build_tiny_llama, make_corpus, tiny_train_config

from sparsify.metric_names import EVAL_CE_LOSS_INCREASE

# token caches and the dequantized embedded model go to a throwaway folder, not ~/.cache
os.environ.setdefault("SPARSIFY_CACHE", tempfile.mkdtemp(prefix="sparsify-test-cache-"))
# tests never reach the model hub: a hub name fails at once instead of after ~45 s of retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved Hugging Face folder: 3-layer Llama, width 64, BPE tokenizer of ~300 tokens."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_bridge(tiny_model_dir: Path):
    """The tiny model as a frozen TransformerBridge on CPU (shared: tests must not modify it)."""
    import torch

    from sparsify.model_loading import load_tlens_model

    return load_tlens_model(str(tiny_model_dir), torch.device("cpu"))


@pytest.fixture()
def tiny_tokens(tiny_bridge):
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, tiny_bridge.cfg.d_vocab, (2, 12), generator=gen)


def checkpointed_sweep_base(model_dir: Path, corpus: Path, tmp_path: Path) -> dict:
    """A search space's base_config for the tiny model without a loss (each arm sets its own):
    4 optimizer steps of 2 micro-batches, a resume checkpoint after step 2, no log until the end."""
    base = tiny_train_config(
        model_dir, corpus, tmp_path, n_samples=64, batch_size=8, effective_batch_size=16,
        save_every_n_samples=32, log_every_n_grad_steps=100,
    )  # fmt: skip
    del base["loss"]
    return base


PROCESS_TAG = "SPARSIFY_TEST_PROCESS_TAG"
"""A test that starts a sweep in a subprocess tags its environment with this variable, so it
can find (and clean up) exactly the processes it started: the driver and every Ray process."""


def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment carries `PROCESS_TAG=tag`: the driver and every Ray process
    it started (they inherit its environment), and nobody else's."""
    needle = f"{PROCESS_TAG}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def make_trial(tmp_path, monkeypatch):
    """Makes Ray Tune `Trial`s of arm `local` as `Tuner.fit()` creates them: their storage under
    the sweep's `ray_tune/` folder, their driver-side folder (Ray's session folder) under
    `tmp_path`. No Ray cluster needed."""
    from ray.train._internal import storage
    from ray.tune.experiment import Trial

    monkeypatch.setattr(storage, "_get_ray_train_session_dir", lambda: str(tmp_path / "ray_session"))

    def make(trial_id: str, **config) -> Trial:
        context = storage.StorageContext(
            storage_path=str(tmp_path / "sweep" / "ray_tune"), experiment_dir_name="local"
        )
        trial = Trial(
            "run_trial", config={"arm": "local", **config}, trial_id=trial_id, storage=context, stub=True,
            trial_dirname_creator=lambda t: f"local_{t.trial_id}",
        )  # fmt: skip
        trial.init_local_path()
        return trial

    return make


def asha_space(tmp_path: Path, name: str, model_dir: Path, corpus: Path, n_samples: int = 64) -> Path:
    """A search-space file with ASHA: 3 trials of 2 CPUs (the whole machine, to Ray), the last
    two stopped at their first eval (a good trial first sets ASHA's bar; at lr 1e-8 the SAE
    stays at its random init, a CE increase of nats behind), so one leaked placement group
    would block every later trial (ray#54305)."""
    base = tiny_train_config(
        model_dir, corpus, tmp_path / name, n_samples=n_samples, eval_every_n_samples=32, eval_n_samples=8
    )
    del base["loss"]
    space = {
        "name": name,
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 3,
        "resources": {"num_workers": 1, "cpus_per_worker": 2},
        "early_stopping": {"metric": EVAL_CE_LOSS_INCREASE, "grace_period": 1, "reduction_factor": 2},
        "base_config": base,
        "arms": {
            "local": {
                "loss": {"sparsity": {"coeff": 0.1}, "out_to_in": {"coeff": 1.0}},
                "search": {"lr": {"type": "loguniform", "low": 1e-8, "high": 1e-2}},
                "initial_points": [{"lr": 1e-2}, {"lr": 1e-8}, {"lr": 2e-8}],
            }
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@contextmanager
def local_ray_with_worker_hook(hook: Any) -> Iterator[None]:
    """A fresh local Ray (2 CPUs, no dashboard) whose worker processes run `hook` at start
    (`worker_process_setup_hook`: e.g. to crash a worker or count attempts), set up as
    `sweep.run.start_ray` would; shut down afterwards."""
    import ray

    from sweep.run import start_ray

    ray.shutdown()
    ray.init(
        address="local",  # never some other Ray running here
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"worker_process_setup_hook": hook},
    )
    start_ray()  # already initialized: only sets the environment defaults
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """`host:port` of a real S3-compatible server (moto's, `tests/s3_server.py`) for this session."""
    from s3_server import moto_server

    with moto_server() as endpoint:
        yield endpoint
