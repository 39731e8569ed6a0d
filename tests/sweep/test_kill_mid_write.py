"""A trial worker killed (SIGKILL) while it writes checkpoints and trial records leaves every
file whole: the last complete version or none, never half of one; leftovers are dot-named temp
files that the results table ignores, and the sweep's records still load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_train_config
from safetensors.torch import load_file

from sweep.results import load_results

# a run folder's files (README)
SAE_WEIGHTS, CONFIG_FILE, METRICS_FILE = "sae.safetensors", "config.yaml", "metrics.json"

WORKER = textwrap.dedent(
    """
    import sys, torch, yaml
    from pathlib import Path
    from sparsify import validate_config
    from sparsify.training.checkpoint import save_run  # not public: no other way to write a run folder
    from sweep.records import write_trial_record

    sweep_dir, config_path, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = validate_config(yaml.safe_load(open(config_path)))
    for version in range(start, start + 10_000):
        # ~24 MB per checkpoint, every tensor filled with the version: a torn file would mix them
        state = {f"sae.{name}": torch.full((1536, 1024), float(version)) for name in ("encoder", "decoder")}
        save_run(Path(sweep_dir) / "runs/local/trial_0", state, cfg, {"version": version})
        write_trial_record(sweep_dir, {"arm": "local", "trial_id": f"trial_{version % 3}",
                                       "status": "finished", "params": {"version": version},
                                       "metrics": {"eval/L0": float(version)}})
        print(version, flush=True)
    """
)


def start_worker(sweep_dir: Path, config_path: Path, start: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(sweep_dir), str(config_path), str(start)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def check_sweep_folder(sweep_dir: Path) -> int:
    """Every file whole; returns the number of trial records."""
    run_dir = sweep_dir / "runs" / "local" / "trial_0"
    if (run_dir / SAE_WEIGHTS).exists():
        weights = load_file(str(run_dir / SAE_WEIGHTS))
        values = {float(t.flatten()[0]) for t in weights.values()}
        assert len(values) == 1 and all(bool((t == t.flatten()[0]).all()) for t in weights.values())
    if (run_dir / METRICS_FILE).exists():
        assert "version" in json.loads((run_dir / METRICS_FILE).read_text())
    if (run_dir / CONFIG_FILE).exists():
        assert yaml.safe_load((run_dir / CONFIG_FILE).read_text())["saes"]
    for leftover in sweep_dir.rglob("*.tmp*"):
        assert leftover.name.startswith(".")  # temp files are dot-named, never read
    table = load_results(sweep_dir)
    for record in (sweep_dir / "trials" / "local").glob("*.json"):
        json.loads(record.read_text())
    return len(table)


@pytest.mark.parametrize("delay_s", [0.1, 0.6, 1.2])
def test_sigkill_mid_write_leaves_whole_files(tiny_model_dir, corpus_dir, tmp_path, delay_s):
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(tiny_train_config(tiny_model_dir, corpus_dir, tmp_path)))
    sweep_dir = tmp_path / "sweep"
    start = 0
    for kill in range(3):
        worker = start_worker(sweep_dir, config_path, start)
        assert worker.stdout is not None
        first = worker.stdout.readline()  # one whole write done, so files exist to be torn
        assert first.strip(), "the worker died before writing"
        time.sleep(delay_s * (kill + 1) / 2)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        n_records = check_sweep_folder(sweep_dir)
        assert 1 <= n_records <= 3
        start += 1000
    # a fresh worker carries on in the same folder: the sweep is still writable and loadable
    worker = start_worker(sweep_dir, config_path, start)
    assert worker.stdout is not None and worker.stdout.readline().strip() == str(start)
    worker.kill()
    worker.wait()
    check_sweep_folder(sweep_dir)
    saved = load_file(str(sweep_dir / "runs" / "local" / "trial_0" / SAE_WEIGHTS))
    assert torch.all(next(iter(saved.values())) >= 0)
