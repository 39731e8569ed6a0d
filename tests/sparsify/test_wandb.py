"""W&B: credentials from `.env`, an offline run written into the run folder, and the key never
in any file or output."""

import os

import pytest
import yaml
from conftest import tiny_train_config

from sparsify.cli import train_main as main
from sparsify.training.tracking import load_env_file

FAKE_KEY = "c0ffee" * 6 + "beef"  # 40 hex characters, the shape of a real key


@pytest.fixture()
def clean_wandb_env(monkeypatch):
    # setenv-then-delenv: the variables are absent now and removed again afterwards
    for name in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_MODE", "WANDB_DIR", "WANDB_SILENT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_env_file_fills_missing_variables_only(tmp_path, clean_wandb_env, monkeypatch):
    env = tmp_path / ".env"
    env.write_text(f"WANDB_API_KEY={FAKE_KEY}\nWANDB_ENTITY=from-file\n")
    monkeypatch.setenv("WANDB_ENTITY", "from-shell")
    assert load_env_file(env)
    assert os.environ["WANDB_API_KEY"] == FAKE_KEY
    assert os.environ["WANDB_ENTITY"] == "from-shell"  # the shell wins
    assert not load_env_file(tmp_path / "missing.env")


def test_offline_wandb_run_and_no_key_anywhere(
    tiny_model_dir, corpus_dir, tmp_path, clean_wandb_env, monkeypatch, capfd
):
    (tmp_path / ".env").write_text(f"WANDB_API_KEY={FAKE_KEY}\nWANDB_ENTITY=my-team\nWANDB_MODE=offline\n")
    cfg = tiny_train_config(
        tiny_model_dir, corpus_dir, tmp_path, wandb_project="sparsify-test", n_samples=16, run_name="wb"
    )
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    assert main(["train.yaml"]) == 0
    offline_runs = list((tmp_path / "runs" / "wb" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    history = next(offline_runs[0].glob("*.wandb"))
    assert history.stat().st_size > 0 and b"eval/L0" in history.read_bytes()
    output = capfd.readouterr()
    assert FAKE_KEY not in output.out + output.err
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".env"]
    assert len(written) > 5
    for path in written:
        assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_resumed_run_continues_its_wandb_run(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, clean_wandb_env, monkeypatch
):
    """The W&B run id goes into the checkpoint; the resumed run logs to the same W&B run
    (W&B then drops the steps it already has) instead of starting a second one."""
    from sparsify.config import validate_config
    from sparsify.training.trainer import train

    class Interrupted(Exception):
        pass

    def stop_at_checkpoint(metrics, checkpoint):
        if checkpoint is not None:
            raise Interrupted(checkpoint)

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = validate_config(
        tiny_train_config(
            tiny_model_dir, corpus_dir, tmp_path, wandb_project="sparsify-test", n_samples=32, batch_size=8,
            save_every_n_samples=16, run_name="wb",
        )
    )  # fmt: skip
    with pytest.raises(Interrupted):
        train(cfg, tlens_model=tiny_bridge, show_progress=False, report=stop_at_checkpoint)
    first = list((tmp_path / "runs" / "wb" / "wandb").glob("offline-run-*"))
    assert len(first) == 1
    run_id = first[0].name.rsplit("-", 1)[-1]
    train(cfg, tlens_model=tiny_bridge, show_progress=False, resume_from=tmp_path / "runs" / "wb")
    runs = list((tmp_path / "runs" / "wb" / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, with "-1" appended when the time is the same second
    assert len(runs) == 2 and all(f"-{run_id}" in run.name for run in runs), runs
