import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_train_config

from sparsify.atomic import current_umask
from sparsify.config import load_config, validate_config
from sparsify.model_loading import load_tlens_model
from sparsify.models.lm import CE_LOSS, METRICS_FILE, LMTrainConfig, load_lm_config, main, train_lm
from sparsify.models.lm_config import LMTrainConfig as ConfigModuleLMTrainConfig
from sparsify.training.trainer import train

ROOT = Path(__file__).parents[2]


def lm_config(tokenizer_dir: Path, corpus: Path, tmp_path: Path, **overrides) -> dict:
    """A tiny LM on the conftest corpus: docs 0-29 train, docs 30-39 held out for eval."""
    cfg = {
        "architecture": "llama",
        "n_layers": 2,
        "d_model": 32,
        "n_heads": 4,
        "d_mlp": 64,
        "n_ctx": 32,
        "tokenizer": str(tokenizer_dir),
        "train_data": {
            "files": [str(corpus / f"doc0{i}*.txt") for i in range(3)],
            "split": "all",
            "n_ctx": 16,
        },
        "eval_data": {"files": [str(corpus / "doc03*.txt")], "split": "all", "n_ctx": 16, "seed": 1},
        "n_samples": 256,
        "batch_size": 16,
        "lr": 1e-2,
        "warmup_samples": 32,
        "log_every_n_steps": 4,
        "eval_n_samples": 32,
        "device": "cpu",
        "save_dir": str(tmp_path / "runs"),
        "run_name": "tiny_lm",
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Models this small train ~15x faster on one thread than on two on a busy 2-core machine
    (thread synchronization costs more than the matmuls); results are the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained_lm(one_torch_thread, tiny_model_dir, corpus_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lm")
    return train_lm(LMTrainConfig(**lm_config(tiny_model_dir, corpus_dir, tmp_path)), show_progress=False)


def test_config_lives_in_lm_config_and_is_reexported():
    assert LMTrainConfig is ConfigModuleLMTrainConfig


def test_eval_loss_falls_on_held_out_text(trained_lm):
    start, end = trained_lm.curve.eval[0][CE_LOSS], trained_lm.curve.eval[-1][CE_LOSS]
    vocab = trained_lm.model.config.vocab_size
    # a fresh model is near uniform over the vocabulary; training must beat that by a full nat
    assert abs(start - math.log(vocab)) < 0.5
    assert end < start - 1.0
    train_losses = [row["loss"] for row in trained_lm.curve.train]
    assert len(train_losses) == 16 // 4
    assert train_losses[-1] < train_losses[0] - 1.0
    assert trained_lm.metrics["eval/ce_loss_start"] == start and trained_lm.metrics["eval/ce_loss"] == end


def test_run_folder_holds_model_tokenizer_and_loss_curve(trained_lm):
    run_dir = trained_lm.run_dir
    assert run_dir is not None and run_dir.name == "tiny_lm"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "lm_config.yaml", METRICS_FILE):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / METRICS_FILE).read_text())
    assert record["eval_curve"] == trained_lm.curve.eval
    assert record["metrics"] == trained_lm.metrics
    saved = load_lm_config(run_dir / "lm_config.yaml")
    assert saved.d_model == 32 and saved.n_samples == 256
    assert [p.name for p in run_dir.parent.iterdir()] == ["tiny_lm"]  # no temp folders left
    shared = 0o666 & ~current_umask()
    assert all(p.stat().st_mode & 0o777 == shared for p in run_dir.iterdir())


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_saved_folder_loads_as_bridge_with_the_hf_logits(architecture, tiny_model_dir, corpus_dir, tmp_path):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    cfg = lm_config(tiny_model_dir, corpus_dir, tmp_path, architecture=architecture, n_samples=32)
    result = train_lm(LMTrainConfig(**cfg), show_progress=False)
    bridge = load_tlens_model(str(result.run_dir), torch.device("cpu"))
    assert isinstance(bridge, TransformerBridge)
    assert "blocks.1.hook_resid_pre" in bridge.hook_dict and bridge.cfg.d_model == 32
    tokens = torch.randint(
        0, result.model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        trained_logits = result.model(input_ids=tokens).logits
        reloaded_logits = AutoModelForCausalLM.from_pretrained(result.run_dir)(input_ids=tokens).logits
        bridge_logits = bridge(tokens)
    torch.testing.assert_close(reloaded_logits, trained_logits)
    torch.testing.assert_close(bridge_logits, trained_logits, atol=1e-5, rtol=1e-5)


def test_sae_trains_on_the_custom_lm(trained_lm, corpus_dir, tmp_path):
    cfg = validate_config(tiny_train_config(trained_lm.run_dir, corpus_dir, tmp_path, device="cpu"))
    result = train(cfg, show_progress=False)
    # the frozen model is the trained one, not a fresh init (which sits at ln(vocab) = 5.7 nats)
    assert result.metrics["eval/ce_loss_orig"] < math.log(trained_lm.model.config.vocab_size) - 1.0
    assert math.isfinite(result.metrics["eval/ce_loss_increase"]) and result.metrics["eval/L0"] > 0
    assert (result.run_dir / "sae.safetensors").is_file()


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tiny_model_dir, corpus_dir, tmp_path):
    def weights(seed: int, run_name: str) -> dict[str, torch.Tensor]:
        cfg = lm_config(tiny_model_dir, corpus_dir, tmp_path, n_samples=32, seed=seed, run_name=run_name)
        return train_lm(LMTrainConfig(**cfg), show_progress=False).model.state_dict()

    first, again, other = weights(0, "a"), weights(0, "a"), weights(1, "b")  # "a" twice: replaces the folder
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(
        first["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"]
    )
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a", "b"]


def test_cli_trains_and_prints_the_run_folder(tiny_model_dir, corpus_dir, tmp_path, capsys):
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(lm_config(tiny_model_dir, corpus_dir, tmp_path, n_samples=32)))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"run folder: {tmp_path / 'runs' / 'tiny_lm'}" in out
    assert json.loads(out[: out.index("run folder:")])["train/tokens_seen"] == 32 * 16


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"d_model": 30}, "n_heads: must divide d_model (30) (got 4)"),
        ({"n_layer": 3}, "n_layer: unknown field; did you mean n_layers?"),
        ({"architecture": "gpt3"}, "architecture: Input should be 'llama' or 'gpt2' (got 'gpt3')"),
        ({"n_ctx": 8}, "n_ctx: must be at least the data's n_ctx (16) (got 8)"),
    ],
)
def test_bad_config_prints_one_line_naming_file_and_field(
    change, expected, tiny_model_dir, corpus_dir, tmp_path, capsys
):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(lm_config(tiny_model_dir, corpus_dir, tmp_path, **change)))
    assert main([str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: {expected}\n"
    assert not (tmp_path / "runs").exists()


def test_missing_tokenizer_is_one_line_naming_the_field(corpus_dir, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(lm_config(tmp_path / "no_such_folder", corpus_dir, tmp_path)))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: tokenizer: cannot load") and err.count("\n") == 1


def test_too_little_data_fails_before_training_naming_the_section(
    tiny_model_dir, corpus_dir, tmp_path, capsys
):
    cfg = lm_config(tiny_model_dir, corpus_dir, tmp_path, eval_n_samples=100_000)
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: eval_n_samples: eval_data has ") and err.endswith(
        "the run needs 100000\n"
    )
    cfg["train_data"]["files"] = [str(tmp_path / "nothing*.txt")]
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {path}: train_data.files: {str(tmp_path / 'nothing*.txt')!r} matches no file\n"
    )
    assert not (tmp_path / "runs" / "tiny_lm").exists()


def test_shipped_configs_validate():
    cfg = load_lm_config(ROOT / "configs" / "lm_sotu.yaml")
    assert cfg.tokenizer == "embedded:SmolLM2-135M-Instruct" and cfg.train_data.embedded == "sotu"
    sae_cfg = load_config(ROOT / "configs" / "sae_on_custom_lm.yaml")
    assert Path(sae_cfg.model_name) == Path(cfg.save_dir) / cfg.run_name
    assert sae_cfg.train_data.n_ctx <= cfg.n_ctx
    assert all(int(p.split(".")[1]) < cfg.n_layers for p in sae_cfg.saes.sae_positions)
