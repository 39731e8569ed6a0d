"""Pretrained SAEs in and out: `pretrained_sae_paths` + `retrain_saes`, reference `.pt` files
(decoder normalized on load), SAELens-format folders (e2e fine-tuning from one; what cannot be
converted exactly is one line), `SAETransformer.from_local_path` for our runs and the
reference's. (Import vs sae-lens itself, per architecture: test_export.py.)"""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_train_config
from safetensors.torch import save_file

from sparsify import train
from sparsify.config import SAEsConfig, validate_config
from sparsify.data import local_token_stream
from sparsify.errors import ConfigError
from sparsify.sae import SAE
from sparsify.sae_transformer import SAETransformer
from sparsify.training.build import build_model
from sparsify.training.checkpoint import load_sae_state

POS1, POS2 = "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"


def _reference_pt(path, d_in=64, n_dict=128, key="blocks-1-hook_resid_pre", seed=3):
    """A state dict in the released paper SAEs' format, with a decoder that is not unit-norm."""
    torch.manual_seed(seed)
    sae = SAE(d_in, n_dict)
    state = {f"{key}.{k}": v.clone() for k, v in sae.state_dict().items()}
    state[f"{key}.decoder.weight"] *= torch.linspace(0.5, 3.0, n_dict)  # column norms 0.5..3
    torch.save(state, path)
    return state


def test_reference_pt_loads_with_unit_norm_decoder_and_the_same_function(tmp_path):
    raw = _reference_pt(tmp_path / "sae.pt")
    loaded = load_sae_state(tmp_path / "sae.pt")
    dec = loaded["blocks-1-hook_resid_pre.decoder.weight"]
    torch.testing.assert_close(dec.norm(dim=0), torch.ones(128))
    torch.testing.assert_close(dec, F.normalize(raw["blocks-1-hook_resid_pre.decoder.weight"], dim=0))
    # the SAE normalizes inside forward, so both state dicts encode and decode alike
    before, after = SAE(64, 128), SAE(64, 128)
    before.load_state_dict({k.split(".", 1)[1]: v for k, v in raw.items()})
    after.load_state_dict({k.split(".", 1)[1]: v for k, v in loaded.items()})
    x = torch.randn(5, 64)
    torch.testing.assert_close(before(x)[1], after(x)[1])


def test_unreadable_sae_files_are_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"junk\.pt: cannot read SAE weights"):
        load_sae_state(tmp_path / "junk.pt")
    with pytest.raises(ConfigError, match="no such SAE file"):
        load_sae_state(tmp_path / "missing.pt")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="unknown SAE file type"):
        load_sae_state(tmp_path / "w.bin")


def _two_position_cfg(tiny_model_dir, corpus_dir, tmp_path, **saes):
    return validate_config(
        tiny_train_config(
            tiny_model_dir,
            corpus_dir,
            tmp_path,
            saes={"sae_positions": [POS1, POS2], "dict_size_to_input_ratio": 2.0, **saes},
            save_dir=None,
            eval_data=None,
            n_samples=32,
        )
    )


def test_frozen_pretrained_sae_is_unchanged_and_the_other_trains(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path
):
    raw = _reference_pt(tmp_path / "local.pt")
    cfg = _two_position_cfg(
        tiny_model_dir, corpus_dir, tmp_path, pretrained_sae_paths=[str(tmp_path / "local.pt")]
    )
    untrained = build_model(cfg, tiny_bridge).saes.state_dict()
    trained = train(cfg, tlens_model=tiny_bridge, show_progress=False).model
    for name, value in trained.sae(POS1).state_dict().items():
        expected = raw[f"blocks-1-hook_resid_pre.{name}"]
        if name == "decoder.weight":
            expected = F.normalize(expected, dim=0)
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    moved = (
        trained.sae(POS2).encoder[0].weight - untrained["blocks-2-hook_resid_pre.encoder.0.weight"]
    ).abs()
    assert moved.max() > 1e-3


def test_retrained_sae_starts_from_the_pretrained_weights(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    _reference_pt(tmp_path / "local.pt")
    loaded = load_sae_state(tmp_path / "local.pt")
    cfg = _two_position_cfg(
        tiny_model_dir,
        corpus_dir,
        tmp_path,
        pretrained_sae_paths=[str(tmp_path / "local.pt")],
        retrain_saes=True,
    )
    model = build_model(cfg, tiny_bridge)
    assert model.sae(POS1).encoder[0].weight.requires_grad
    torch.testing.assert_close(
        model.sae(POS1).encoder[0].weight, loaded["blocks-1-hook_resid_pre.encoder.0.weight"]
    )
    trained = train(cfg, tlens_model=tiny_bridge, show_progress=False).model
    step = (
        (trained.sae(POS1).encoder[0].weight - loaded["blocks-1-hook_resid_pre.encoder.0.weight"]).abs().max()
    )
    # Adam moves each weight by about lr (3e-3) per step: 4 steps from the loaded start
    assert 1e-4 < step < 4 * 3e-3 * 1.5


def test_data_mean_bias_init_keeps_a_pretrained_bias(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    raw = _reference_pt(tmp_path / "local.pt")
    cfg = _two_position_cfg(
        tiny_model_dir,
        corpus_dir,
        tmp_path,
        pretrained_sae_paths=[str(tmp_path / "local.pt")],
        decoder_bias_init="data_mean",
    )
    model = train(cfg, tlens_model=tiny_bridge, show_progress=False).model
    torch.testing.assert_close(model.sae(POS1).decoder.bias, raw["blocks-1-hook_resid_pre.decoder.bias"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: _reference_pt(p, n_dict=64),
            "has a dictionary of 64 x d_in 64, this config's SAE 128 x d_in 64",
        ),
        (
            lambda p: _reference_pt(p, key="blocks-0-hook_resid_pre"),
            "has SAEs at blocks-0-hook_resid_pre, not among",
        ),
    ],
)
def test_pretrained_file_that_does_not_fit_is_one_line(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, make, message
):
    make(tmp_path / "other.pt")
    cfg = _two_position_cfg(
        tiny_model_dir, corpus_dir, tmp_path, pretrained_sae_paths=[str(tmp_path / "other.pt")]
    )
    with pytest.raises(ConfigError, match=message):
        build_model(cfg, tiny_bridge)


def _saelens_folder(folder, architecture="standard", d_sae=128, threshold=None, seed=0, **fields):
    """A SAELens 6 folder at blocks.1.hook_resid_pre of the tiny model (d_in 64): input
    centering on, decoder rows of norms 0.5 .. 2. Returns its tensors."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(64, d_sae, generator=gen) * 0.3,
        "b_enc": torch.randn(d_sae, generator=gen) * 0.05,
        "W_dec": F.normalize(torch.randn(d_sae, 64, generator=gen), dim=1)
        * torch.linspace(0.5, 2.0, d_sae)[:, None],
        "b_dec": torch.randn(64, generator=gen) * 0.05,
    }
    if threshold is not None:
        tensors["threshold"] = threshold
    cfg = {
        "architecture": architecture,
        "d_in": 64,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **fields,
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": POS1, "model_name": "tiny"},
    }
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, folder / "sae_weights.safetensors")
    return tensors


def _kl(model, tokens):
    """KL(original || spliced) of the next-token distributions, mean over tokens (nats)."""
    with torch.no_grad():
        log_orig = model.forward_raw(tokens).logits.float().log_softmax(-1)
        log_sae = model(tokens).logits.float().log_softmax(-1)
    return (log_orig.exp() * (log_orig - log_sae)).sum(-1).mean().item()


def test_saelens_folder_starts_an_e2e_finetune(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    theirs = _saelens_folder(tmp_path / "saelens")
    cfg = validate_config(
        tiny_train_config(
            tiny_model_dir,
            corpus_dir,
            tmp_path,
            saes={
                "sae_positions": [POS1],
                "dict_size_to_input_ratio": 2.0,
                "pretrained_sae_paths": [str(tmp_path / "saelens")],
                "retrain_saes": True,
            },
            loss={"sparsity": {"coeff": 0.01}, "logits_kl": {"coeff": 1.0}},
            save_dir=None,
            eval_data=None,
        )
    )
    model = build_model(cfg, tiny_bridge)
    imported = load_sae_state(tmp_path / "saelens", cfg.saes)
    for name, value in model.sae(POS1).state_dict().items():
        torch.testing.assert_close(value, imported[f"blocks-1-hook_resid_pre.{name}"], rtol=0, atol=0)
    # before the first step the SAE is SAELens's standard SAE: ReLU((x - b_dec) W_enc + b_enc) W_dec + b_dec
    sae_in = torch.randn(5, 64) * 0.5
    codes = torch.relu((sae_in - theirs["b_dec"]) @ theirs["W_enc"] + theirs["b_enc"])
    with torch.no_grad():
        sae_out = model.sae(POS1)(sae_in)[1]
    torch.testing.assert_close(sae_out, codes @ theirs["W_dec"] + theirs["b_dec"], rtol=1e-5, atol=1e-5)
    tokens = local_token_stream(cfg.train_data, tiny_bridge.tokenizer)[: 4 * 16].reshape(4, 16)
    kl_before = _kl(model, tokens)
    trained = train(cfg, tlens_model=tiny_bridge, show_progress=False).model
    assert _kl(trained, tokens) < 0.95 * kl_before


@pytest.mark.parametrize(
    ("architecture", "saes", "write", "message"),
    [
        (
            "topk",
            {"k": 4},
            lambda p: _saelens_folder(p),
            r"is a SAELens standard SAE \(imports as architecture relu\), but saes.architecture is topk",
        ),
        (
            "topk",
            {"k": 4},
            lambda p: _saelens_folder(p, "topk", k=3),
            "is a topk SAE with k 3, but saes.k is 4",
        ),
        (
            "topk",
            {"k": 3},
            lambda p: _saelens_folder(p, "topk", k=3),
            "decoder rows have different norms .* rescale_acts_by_decoder_norm false",
        ),
        (
            "relu",
            {},
            lambda p: _saelens_folder(p, normalize_activations="expected_average_only_in"),
            "normalize_activations 'expected_average_only_in' is not supported",
        ),
        (
            "relu",
            {},
            lambda p: _saelens_folder(p, "gated"),
            "SAELens architecture 'gated' cannot be imported; allowed: standard, topk, jumprelu",
        ),
        (
            "batchtopk",
            {"k": 4},
            lambda p: _saelens_folder(p, "jumprelu", threshold=torch.full((128,), 0.1)),
            "jumprelu thresholds differ across latents .* a batchtopk SAE has one",
        ),
        (
            "jumprelu",
            {},
            lambda p: _saelens_folder(p, "jumprelu", threshold=torch.linspace(-0.1, 0.1, 128)),
            "jumprelu thresholds are <= 0; ours learns log",
        ),
        (
            "jumprelu",
            {},
            lambda p: _saelens_folder(p, "jumprelu"),
            "a SAELens jumprelu SAE has W_enc, b_enc, W_dec, b_dec, threshold; missing threshold",
        ),
    ],
)
def test_saelens_folder_we_cannot_honour_is_one_line(tmp_path, architecture, saes, write, message):
    write(tmp_path / "saelens")
    cfg = SAEsConfig.model_validate({"sae_positions": [POS1], "architecture": architecture, **saes})
    with pytest.raises(ConfigError, match=message) as info:
        load_sae_state(tmp_path / "saelens", cfg)
    assert "\n" not in str(info.value)


def test_saelens_folder_that_does_not_fit_the_config_names_the_field(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path
):
    _saelens_folder(tmp_path / "small", d_sae=64)
    _saelens_folder(tmp_path / "relu")
    for folder, architecture, message in [
        ("small", "relu", "blocks-1-hook_resid_pre has a dictionary of 64 x d_in 64, this config's SAE 128"),
        ("relu", "jumprelu", "is a SAELens standard SAE .*, but saes.architecture is jumprelu"),
    ]:
        sparsity = (
            {"l0_penalty": {"coeff": 0.1}} if architecture == "jumprelu" else {"sparsity": {"coeff": 0.1}}
        )
        cfg = tiny_train_config(
            tiny_model_dir,
            corpus_dir,
            tmp_path,
            saes={
                "sae_positions": [POS1, POS2],
                "dict_size_to_input_ratio": 2.0,
                "architecture": architecture,
                "pretrained_sae_paths": [str(tmp_path / folder)],
            },
            loss={**sparsity, "logits_kl": {"coeff": 1.0}},
        )
        with pytest.raises(ConfigError, match=f"^saes.pretrained_sae_paths: {tmp_path / folder}.*{message}"):
            build_model(validate_config(cfg), tiny_bridge)


def test_every_sae_frozen_is_rejected(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    _reference_pt(tmp_path / "local.pt")
    cfg = validate_config(
        tiny_train_config(
            tiny_model_dir,
            corpus_dir,
            tmp_path,
            saes={
                "sae_positions": [POS1],
                "dict_size_to_input_ratio": 2.0,
                "pretrained_sae_paths": [str(tmp_path / "local.pt")],
            },
        )
    )
    with pytest.raises(ConfigError, match="saes.retrain_saes: every SAE is pretrained and frozen"):
        build_model(cfg, tiny_bridge)


def test_from_local_path_reproduces_the_trained_model(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, tiny_tokens
):
    cfg = validate_config(
        tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, eval_data=None, n_samples=32)
    )
    result = train(cfg, tlens_model=tiny_bridge, show_progress=False)
    loaded = SAETransformer.from_local_path(result.run_dir, device="cpu")
    assert loaded.sae_positions == [POS1]
    torch.testing.assert_close(loaded(tiny_tokens).logits, result.model(tiny_tokens).logits)
    torch.testing.assert_close(
        loaded.forward_raw(tiny_tokens).logits, result.model.forward_raw(tiny_tokens).logits
    )


def test_from_local_path_reads_a_reference_run_folder(tiny_bridge, tiny_model_dir, tmp_path, tiny_tokens):
    run = tmp_path / "ref_run"
    run.mkdir()
    (run / "final_config.yaml").write_text(
        yaml.safe_dump(reference_config(tiny_model_dir, sae_positions="blocks.1.hook_resid_pre"))
    )
    _reference_pt(run / "samples_100.pt", seed=1)
    newest = _reference_pt(run / "samples_2000.pt", seed=2)  # numeric, not string, order
    model = SAETransformer.from_local_path(run, device="cpu")
    assert model.sae_positions == [POS1]
    expected = SAE(64, 128)
    expected.load_state_dict({k.split(".", 1)[1]: v for k, v in newest.items()})
    out = model(tiny_tokens)
    torch.testing.assert_close(out.sae_acts[POS1].sae_out, expected(out.sae_acts[POS1].sae_in)[1])


def test_from_local_path_on_another_folder_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not a run folder"):
        SAETransformer.from_local_path(tmp_path)


def reference_config(model_dir, **overrides):
    """A config in the reference library's format (docs/design.md §12), with its null loss terms."""
    data = {
        "dataset_name": "unused",
        "is_tokenized": True,
        "tokenizer_name": str(model_dir),
        "streaming": True,
        "split": "train",
        "n_ctx": 16,
        "seed": None,
        "column_name": "input_ids",
    }
    cfg = {
        "wandb_project": None,
        "wandb_run_name": None,
        "wandb_run_name_prefix": "",
        "seed": 0,
        "tlens_model_name": None,
        "tlens_model_path": str(model_dir),
        "save_dir": None,
        "n_samples": 32,
        "save_every_n_samples": None,
        "eval_every_n_samples": None,
        "eval_n_samples": 8,
        "batch_size": 8,
        "effective_batch_size": 16,
        "lr": 5e-4,
        "lr_schedule": "cosine",
        "min_lr_factor": 0.1,
        "warmup_samples": 8,
        "cooldown_samples": 0,
        "max_grad_norm": 10.0,
        "log_every_n_grad_steps": 20,
        "collect_act_frequency_every_n_samples": 16,
        "act_frequency_n_tokens": 64,
        "loss": {
            "sparsity": {"coeff": 1.5, "p_norm": 1.0},
            "in_to_orig": None,
            "out_to_orig": None,
            "out_to_in": {"coeff": 0.0},
            "logits_kl": {"coeff": 1.0},
        },
        "train_data": data,
        "eval_data": {**data, "split": "test"},
        "saes": {
            "sae_positions": ["hook_resid_pre"],
            "dict_size_to_input_ratio": 2.0,
            "pretrained_sae_paths": None,
            "retrain_saes": False,
        },
    }
    for key, value in overrides.items():
        if key in cfg["saes"]:
            cfg["saes"][key] = value
        else:
            cfg[key] = value
    return cfg
