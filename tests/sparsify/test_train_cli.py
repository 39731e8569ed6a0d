import json
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import tiny_train_config

from sparsify.cli import train_main as main

ROOT = Path(__file__).parents[2]


def test_cli_trains_and_writes_the_run_folder(tiny_model_dir, corpus_dir, tmp_path):
    cfg = tiny_train_config(
        tiny_model_dir, corpus_dir, tmp_path, n_samples=16, run_name="cli", tensorboard=True
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "sparsify.train", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "runs" / "cli"
    assert f"run folder: {run_dir}" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/tokens_seen"] == 16 * 16
    assert any((run_dir / "tensorboard").iterdir())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["loss"]["logits_kl"]["coeff"] == 1.0 and saved["lr_schedule"] == "cosine"


def test_cli_bad_config_prints_one_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "saes: {sae_positions: [blocks.1.hook_resid_pre]}\nloss: {sparsity: {coeff: 1}, out_to_in: {coeff: 1}}\nlr: 0.1\n"
    )
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: n_samples: Field required\n"


def test_cli_unknown_hook_lists_close_names(tiny_model_dir, corpus_dir, tmp_path, capsys):
    cfg = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path)
    cfg["saes"]["sae_positions"] = ["blocks.1.hook_resid_pr"]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"error: {path}: saes.sae_positions: the model has no hook 'blocks.1.hook_resid_pr'; closest:"
    )
    assert "\n" not in err


def test_importing_the_command_module_leaves_train_the_function():
    import sparsify
    import sparsify.train  # noqa: F401 (what would shadow the function if it were a plain module)
    from sparsify import train
    from sparsify.training.trainer import train as trainer_train

    assert train is trainer_train and sparsify.train is trainer_train
