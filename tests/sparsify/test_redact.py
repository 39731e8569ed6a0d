"""Secrets never reach what we print or write: error lines, trial records, reports."""

from __future__ import annotations

import json

import yaml
from conftest import tiny_train_config

from sparsify.cli import train_main
from sparsify.redaction import MASK, redact, secret_values
from sweep.records import write_trial_record

FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a real one
FAKE_HF_TOKEN = "hf_FakeTokenForTests1234567890"


def test_secret_looking_variables_are_masked_short_flags_are_not():
    env = {"WANDB_API_KEY": FAKE_WANDB_KEY, "HF_TOKEN": FAKE_HF_TOKEN, "RAY_DEDUP_LOGS": "0", "KEY_FLAG": "1"}
    assert secret_values(env) == sorted([FAKE_WANDB_KEY, FAKE_HF_TOKEN], key=len, reverse=True)
    text = f"cannot load {FAKE_HF_TOKEN!r} with key {FAKE_WANDB_KEY} (flag 1, dedup 0)"
    assert redact(text, env) == f"cannot load '{MASK}' with key {MASK} (flag 1, dedup 0)"


def test_a_wandb_key_pasted_into_a_file_is_masked_by_its_shape():
    assert redact(f"run_name: {FAKE_WANDB_KEY}", environ={}) == f"run_name: {MASK}"


def test_cli_error_line_masks_a_planted_token(tiny_model_dir, corpus_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    # a token pasted where a model name belongs ends up quoted in the error
    tree = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, model_name=f"org/{FAKE_HF_TOKEN}")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert train_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert FAKE_HF_TOKEN not in err and f"org/{MASK}" in err


def test_trial_records_mask_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    record = {"arm": "e2e", "trial_id": "t1", "status": "error", "error": f"401: bad key {FAKE_WANDB_KEY}"}
    path = write_trial_record(tmp_path, record)
    assert FAKE_WANDB_KEY not in path.read_text()
    assert json.loads(path.read_text())["error"] == f"401: bad key {MASK}"
