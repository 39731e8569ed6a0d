"""The reference library's YAML run configs, read unchanged (docs/design.md §12)."""

import json

import pytest
import yaml
from test_pretrained import reference_config

from sparsify.cli import train_main as main
from sparsify.compat import read_reference_config, to_train_config
from sparsify.config import validate_config
from sparsify.errors import ConfigError
from sparsify.training.state import TrainState, due_after_step


def _write(tmp_path, cfg, name="ref.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_reference_fields_map_onto_ours(tiny_bridge, tiny_model_dir, tmp_path):
    path = _write(tmp_path, reference_config(tiny_model_dir, wandb_run_name_prefix="ref_"))
    cfg = to_train_config(read_reference_config(path), list(tiny_bridge.hook_dict), str(path))
    # substring matching, as the reference's filter_names: every block's hook_resid_pre
    assert cfg.saes.sae_positions == [f"blocks.{i}.hook_resid_pre" for i in range(3)]
    assert cfg.model_name == str(tiny_model_dir)
    assert set(cfg.loss.coeffs()) == {"sparsity", "out_to_in", "logits_kl"}  # nulls left out
    assert cfg.loss.sparsity.coeff == 1.5 and cfg.loss.logits_kl.coeff == 1.0
    assert (cfg.batch_size, cfg.effective_batch_size, cfg.grad_accum_steps) == (8, 16, 2)
    assert (cfg.warmup_samples, cfg.max_grad_norm, cfg.lr) == (8, 10.0, 5e-4)
    assert cfg.collect_act_frequency_every_n_samples == 16 and cfg.act_frequency_n_tokens == 64
    assert cfg.train_data.is_tokenized and cfg.train_data.column == "input_ids"
    assert (cfg.train_data.seed, cfg.eval_data.seed) == (0, 1)  # null seeds: distinct streams
    assert cfg.run_name.startswith("ref_blocks-0-hook_resid_pre+")
    assert cfg.save_dir is None


@pytest.mark.parametrize(
    ("tlens_name", "hub_name"),
    [("pythia-14m", "EleutherAI/pythia-14m"), ("gpt2-small", "gpt2"), ("GPT2-Small", "gpt2"), ("gpt2", "gpt2"),
     ("my-org/my-model", "my-org/my-model")],
)  # fmt: skip
def test_tlens_model_name_resolves_through_transformerlens_aliases(
    tiny_model_dir, tmp_path, tlens_name, hub_name
):
    cfg = {**reference_config(tiny_model_dir), "tlens_model_name": tlens_name, "tlens_model_path": None}
    path = _write(tmp_path, cfg)
    assert read_reference_config(path).model_name == hub_name


def test_a_reference_config_trains_through_the_cli(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "ds"
    data.mkdir()
    rows = [{"input_ids": [(7 * i + j) % 250 + 3 for j in range(64)]} for i in range(40)]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (data / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:10]))
    cfg = reference_config(
        tiny_model_dir, sae_positions="blocks.1.hook_resid_pre", save_dir=str(tmp_path / "runs")
    )
    for section in ("train_data", "eval_data"):
        cfg[section]["dataset_name"] = str(data)
    cfg["wandb_run_name"] = "my/run"  # a W&B name with a slash still makes one folder
    assert main([str(_write(tmp_path, cfg))]) == 0
    run_dir = tmp_path / "runs" / "my_run"
    saved = validate_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert saved.saes.sae_positions == ["blocks.1.hook_resid_pre"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/tokens_seen"] == 32 * 16
    assert 0 < metrics["eval/alive_dict_elements"] <= 128


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_wandb": True}, "use_wandb: unknown field"),
        ({"tlens_model_name": "gpt2"}, "exactly one of tlens_model_name, tlens_model_path"),
        ({"loss": {"sparsity": None}}, "loss.sparsity"),
    ],
)
def test_bad_reference_config_is_one_line_naming_the_file(tiny_model_dir, tmp_path, capsys, change, message):
    path = _write(tmp_path, {**reference_config(tiny_model_dir), **change})
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}") and message in err and "\n" not in err


def test_raw_text_with_another_tokenizer_uses_the_models_with_a_warning(
    tiny_bridge, tiny_model_dir, tmp_path, caplog, monkeypatch
):
    import sparsify.compat

    monkeypatch.setattr(sparsify.compat, "_WARNED", set())  # warned once per process: not yet here
    cfg = reference_config(tiny_model_dir)
    cfg["train_data"] = {**cfg["train_data"], "is_tokenized": False, "tokenizer_name": "gpt2"}
    path = _write(tmp_path, cfg)
    with caplog.at_level("WARNING", logger="sparsify.compat"):
        train_config = to_train_config(read_reference_config(path), list(tiny_bridge.hook_dict), str(path))
    assert train_config.train_data.is_tokenized is False
    assert (
        f"train_data.tokenizer_name: raw text is tokenized with the model's own tokenizer ({tiny_model_dir}), not 'gpt2'"
        in caplog.text
    )


def test_transformerlens2_checkpoint_folder_is_rejected(tiny_bridge, tmp_path):
    tl2 = tmp_path / "tl2_model"
    tl2.mkdir()
    (tl2 / "model.pt").write_bytes(b"")
    path = _write(tmp_path, reference_config(tl2))
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        to_train_config(read_reference_config(path), list(tiny_bridge.hook_dict), str(path))


def test_unmatched_position_pattern_is_rejected(tiny_bridge, tiny_model_dir, tmp_path):
    path = _write(tmp_path, reference_config(tiny_model_dir, sae_positions=["hook_resid_pre", "hook_nope"]))
    with pytest.raises(ConfigError, match="'hook_nope' matches no hook"):
        to_train_config(read_reference_config(path), list(tiny_bridge.hook_dict), str(path))


def test_alive_collection_is_due_every_n_samples(tiny_model_dir, corpus_dir, tmp_path):
    from conftest import tiny_train_config

    cfg = validate_config(
        tiny_train_config(
            tiny_model_dir, corpus_dir, tmp_path, n_samples=64, collect_act_frequency_every_n_samples=16
        )
    )
    due = [due_after_step(cfg, TrainState(step=s, samples_seen=8 * s)) for s in range(1, 9)]
    # every 16 samples = every 2nd step of 8, not at the last step (the final eval counts them)
    assert [d.alive for d in due] == [False, True, False, True, False, True, False, False]
