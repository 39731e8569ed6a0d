"""Worker failures inside a trial (Ray Train V2): a crashed worker is restarted from the trial's
last checkpoint and the trial's result equals an uninterrupted run's; a diverged trial and one
that fails on a user error are recorded once and never retried, the failed one while the sweep
still runs. About a minute on 2 CPU cores."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import checkpointed_sweep_base, local_ray_with_worker_hook, make_corpus
from safetensors.torch import load_file

import sweep.tuner
from sparsify import train
from sparsify.metric_names import TIME_METRICS
from sweep.records import ERROR, read_trial_record
from sweep.results import load_results
from sweep.space import load_search_space

SAE_WEIGHTS = "sae.safetensors"  # a run folder's SAE weights (README)
TIMING = {"train/tokens_per_s", "cost/device_seconds", *TIME_METRICS}
LOCAL = {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}
ONE_COEFF = {"loss.sparsity.coeff": {"type": "categorical", "values": [1.0]}}
"""OptunaSearch needs a searched parameter; one value keeps the trial known."""


def crash_hook(marker: Path, attempts_log: Path):
    """A Ray `worker_process_setup_hook` (runs in every Ray worker process, so nothing in the
    code under test knows of it): `ray.train.get_checkpoint` logs each Train attempt, and the
    first worker to report a checkpoint while `marker` is absent creates it and dies
    (`os._exit(1)`, as a lost node would) a moment later, once the controller has registered
    that checkpoint."""

    def hook() -> None:
        import os
        import time

        import ray.train

        report, get_checkpoint = ray.train.report, ray.train.get_checkpoint

        def logged_get_checkpoint():
            checkpoint = get_checkpoint()
            run = ray.train.get_context().get_experiment_name()
            with open(attempts_log, "a") as log:
                log.write(f"{run} resumed={checkpoint is not None}\n")
            return checkpoint

        def crashing_report(metrics, checkpoint=None, **kwargs):
            report(metrics, checkpoint=checkpoint, **kwargs)
            if checkpoint is not None and not marker.exists():
                marker.write_text("crashed once")
                time.sleep(3)  # the controller polls every 0.5 s: the checkpoint is registered
                os._exit(1)

        ray.train.report = crashing_report
        ray.train.get_checkpoint = logged_get_checkpoint

    return hook


@pytest.fixture(scope="module")
def crashing_ray(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crash")
    marker, attempts = folder / "crashed", folder / "attempts.log"
    with local_ray_with_worker_hook(crash_hook(marker, attempts)):
        yield marker, attempts


def test_crashed_worker_resumes_from_its_checkpoint_and_diverged_or_bad_trial_is_not_retried(
    crashing_ray, tiny_model_dir, corpus_dir, tmp_path, monkeypatch
):
    from ray import tune

    from sweep.tuner import arm_tuner

    marker, attempts = crashing_ray
    doomed = tmp_path / "doomed_corpus"
    make_corpus(doomed)
    doomed_files = str(doomed / "*.txt")
    # 4 optimizer steps, a checkpoint after step 2: the crash comes right after it
    base = checkpointed_sweep_base(tiny_model_dir, corpus_dir, tmp_path)
    space = {
        "name": "failures",
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 1,
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 2},
        "baseline": "local",  # three arms without logits_kl: the verdict's baseline must be named
        "base_config": base,
        "arms": {
            "local": {"loss": LOCAL, "search": ONE_COEFF},
            # lr 1e30 overflows at once; retrying would only diverge again
            "diverges": {"loss": LOCAL, "search": ONE_COEFF, "set": {"lr": 1e30}},
            # its data is gone by the time the worker reads it: a user error, not retried
            "data_gone": {"loss": LOCAL, "search": ONE_COEFF, "set": {"train_data.files": [doomed_files]}},
        },
    }
    path = tmp_path / "failures.yaml"
    path.write_text(yaml.safe_dump(space))
    loaded = load_search_space(path)
    shutil.rmtree(doomed)
    sweep_dir = tmp_path / "sweeps" / "failures"

    # in place of the progress line (which runs after the record callback): what the sweep
    # folder holds for an errored trial while Tune is still handling its error
    at_error = {}

    class RecordAtError(tune.Callback):
        def on_trial_error(self, iteration, trials, trial, **info):
            at_error[trial.trial_id] = read_trial_record(sweep_dir, "data_gone", trial.trial_id)

    monkeypatch.setattr(sweep.tuner, "make_progress_callback", lambda *args: RecordAtError())
    for arm in ("local", "diverges", "data_gone"):
        arm_tuner(loaded, arm, sweep_dir, num_samples=1).fit()
    table = load_results(sweep_dir).set_index("arm")
    local, diverged, data_gone = table.loc["local"], table.loc["diverges"], table.loc["data_gone"]

    runs = attempts.read_text().splitlines()
    local_runs = [line for line in runs if local["trial_id"] in line]
    diverged_runs = [line for line in runs if diverged["trial_id"] in line]
    data_gone_runs = [line for line in runs if data_gone["trial_id"] in line]
    assert marker.exists(), "the worker never crashed"
    assert [line.split()[-1] for line in local_runs] == ["resumed=False", "resumed=True"], runs
    assert local["status"] == "finished"

    # the same trial trained here, uninterrupted, with the worker's one thread
    params = {"loss.sparsity.coeff": 1.0}
    cfg = loaded.trial_config("local", params).model_copy(update={"save_dir": str(tmp_path / "here")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = train(cfg, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    # tolerance 1e-6 relative (another process, same thread count: in practice bit-identical)
    for key in set(here.metrics) - TIMING:
        assert local[key] == pytest.approx(here.metrics[key], rel=1e-6, abs=1e-9), key
    trained = load_file(str(sweep_dir / "runs" / "local" / local["trial_id"] / SAE_WEIGHTS))
    for key, value in here.model.saes.state_dict().items():
        torch.testing.assert_close(trained[key], value, rtol=1e-6, atol=1e-7)
    # the record keeps the final eval's per-sequence values (seeds: 1: no replicates)
    record = read_trial_record(sweep_dir, "local", local["trial_id"])
    assert record is not None and record.replicates == [] and local["n_seeds"] == 1
    assert (
        set(record.eval_per_sequence)
        == set(here.eval_per_sequence)
        == {"eval/L0", "eval/ce_loss_increase", "eval/kl"}
    )
    for key, values in here.eval_per_sequence.items():
        assert len(values) == cfg.eval_n_samples
        assert record.eval_per_sequence[key] == pytest.approx(values, rel=1e-6, abs=1e-9), key
    assert "eval_se/L0" in here.metrics and local["eval_se/L0"] == pytest.approx(
        here.metrics["eval_se/L0"], rel=1e-6
    )
    weight_diff = max(float((trained[k] - v).abs().max()) for k, v in here.model.saes.state_dict().items())
    metric_diff = max(abs(local[k] - here.metrics[k]) for k in set(here.metrics) - TIMING)
    print(
        f"\ncrashed + resumed vs uninterrupted: max |weight diff| {weight_diff:g}, max |metric diff| {metric_diff:g}"
    )

    assert len(diverged_runs) == 1, runs  # no retry
    assert diverged["status"] == "diverged" and "is inf" in diverged["error"]
    assert all(math.isnan(diverged.get(m, math.nan)) for m in loaded.space.metrics)

    assert len(data_gone_runs) == 1, runs  # a user error: no retry either
    assert data_gone["status"] == "error"
    assert data_gone["error"].endswith(f"train_data.files: {doomed_files!r} matches no file")
    # its record was written when it failed, not after the sweep: the same record
    recorded = at_error[data_gone["trial_id"]]
    assert recorded is not None and recorded.status == ERROR and recorded.error == data_gone["error"]
    assert list(at_error) == [data_gone["trial_id"]]  # the only trial that failed


def test_a_user_error_in_a_ddp_trial_is_not_retried(crashing_ray, tiny_model_dir, corpus_dir, tmp_path):
    """2 workers, data gone: every rank raises (the others could be waiting in an all-reduce),
    and the group Ray Train restarts (max_failures 2) ends the trial with the recorded error
    before it trains or reads a checkpoint: one attempt trains, not three."""
    from sweep.tuner import arm_tuner

    _, attempts = crashing_ray
    doomed = tmp_path / "doomed_corpus"
    make_corpus(doomed)
    doomed_files = str(doomed / "*.txt")
    space = {
        "name": "ddp_failures",
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 1,
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2},
        "base_config": checkpointed_sweep_base(tiny_model_dir, corpus_dir, tmp_path),
        "arms": {
            "ddp_data_gone": {"loss": LOCAL, "search": ONE_COEFF, "set": {"train_data.files": [doomed_files]}}
        },
    }
    path = tmp_path / "ddp_failures.yaml"
    path.write_text(yaml.safe_dump(space))
    loaded = load_search_space(path)
    shutil.rmtree(doomed)
    sweep_dir = tmp_path / "sweeps" / "ddp_failures"
    arm_tuner(loaded, "ddp_data_gone", sweep_dir, num_samples=1).fit()
    (row,) = load_results(sweep_dir).itertuples()
    assert row.status == "error" and row.error.endswith(f"train_data.files: {doomed_files!r} matches no file")
    runs = [line for line in attempts.read_text().splitlines() if row.trial_id in line]
    assert len(runs) == 2, runs  # one attempt, 2 ranks; before: 3 attempts x 2 ranks
