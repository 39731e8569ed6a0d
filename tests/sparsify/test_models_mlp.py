"""The digits MLP and local / e2e SAEs on its hidden layers (sparsify.models.mlp, mlp_splice,
mlp_saes). The MLP trains once per module (a few seconds); SAE runs are a few hundred steps."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from sparsify import metric_names as names
from sparsify.config import LossConfig
from sparsify.errors import ConfigError, HookNameError
from sparsify.losses import weighted_total
from sparsify.models import mlp as mlp_module
from sparsify.models import mlp_saes
from sparsify.models.mlp import MLP, MLPConfig, load_digits_split, load_mlp, load_mlp_config
from sparsify.models.mlp_saes import MLPSAEsConfig, evaluate, load_config, load_run, train_saes
from sparsify.models.mlp_splice import MLPWithSAEs, in_to_orig_hooks, loss_terms

pytest.importorskip("sklearn", reason="the digits data set ships with scikit-learn")

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits MLP trained with the default config through the CLI entry point."""
    folder = tmp_path_factory.mktemp("mlp")
    path = folder / "mlp.yaml"
    path.write_text(yaml.safe_dump({"save_dir": str(folder / "runs"), "run_name": "digits"}))
    assert mlp_module.main([str(path)]) == 0
    return folder / "runs" / "digits"


def sae_config(mlp_dir: Path, kind: str, **overrides) -> MLPSAEsConfig:
    """local: sparsity + out_to_in; e2e: sparsity + logits_kl (docs/design.md §4), one SAE at hidden.0."""
    recon = {"out_to_in": {"coeff": 1.0}} if kind == "local" else {"logits_kl": {"coeff": 1.0}}
    fields = {
        "mlp_dir": str(mlp_dir),
        "sae_positions": ["hidden.0"],
        "loss": {"sparsity": {"coeff": 1.0}, **recon},
        "n_steps": 400,
        "save_dir": None,
    }
    return MLPSAEsConfig.model_validate(fields | overrides)


def test_mlp_reaches_over_90_percent_test_accuracy_and_writes_its_run_folder(mlp_dir):
    saved = json.loads((mlp_dir / "metrics.json").read_text())
    assert saved["eval/accuracy"] > 0.9
    assert saved["eval/ce_loss"] < 0.4
    model, cfg = load_mlp(mlp_dir)
    data = load_digits_split(cfg.split_seed, cfg.test_fraction)
    reloaded_accuracy = (model(data.x_test).argmax(-1) == data.y_test).float().mean().item()
    assert reloaded_accuracy == pytest.approx(saved["eval/accuracy"])
    assert not any(p.requires_grad for p in model.parameters())


def test_digits_split_is_fixed_by_its_seed_and_scaled_to_unit_range():
    a, b, c = load_digits_split(0, 0.2), load_digits_split(0, 0.2), load_digits_split(1, 0.2)
    assert torch.equal(a.x_test, b.x_test) and not torch.equal(a.x_test, c.x_test)
    assert a.x_train.shape == (1437, 64) and a.x_test.shape == (360, 64)
    assert a.x_train.min() == 0 and a.x_train.max() == 1
    assert torch.bincount(a.y_test).min() >= 35  # stratified: every class ~36 of 360


def test_identity_sae_splice_equals_the_raw_forward(mlp_dir):
    mlp, _ = load_mlp(mlp_dir)
    model = MLPWithSAEs(mlp, ["hidden.0", "hidden.1"], dict_size_to_input_ratio=2.0)
    with torch.no_grad():
        for name in model.sae_positions:
            sae, eye = model.sae(name), torch.eye(64)
            # codes = [relu(x), relu(-x)], sae_out = relu(x) - relu(-x) = x exactly
            sae.encoder[0].weight.copy_(torch.cat([eye, -eye]))
            sae.encoder[0].bias.zero_()
            sae.decoder.weight.copy_(torch.cat([eye, -eye], dim=1))
            sae.decoder.bias.zero_()
    x = load_digits_split(0, 0.2).x_test
    raw, out = model.forward_raw(x), model(x)
    assert torch.equal(out.logits, raw.logits)
    assert torch.equal(out.sae_out["hidden.1"], raw.hidden["hidden.1"])
    assert set(out.codes) == {"hidden.0", "hidden.1"} and out.codes["hidden.0"].shape == (360, 128)


def test_splice_replaces_the_activation_downstream(mlp_dir):
    mlp, _ = load_mlp(mlp_dir)
    model = MLPWithSAEs(mlp, ["hidden.0"], dict_size_to_input_ratio=1.0)
    with torch.no_grad():
        model.sae("hidden.0").decoder.bias.fill_(5.0)
        model.sae("hidden.0").encoder[0].bias.fill_(-1e3)  # every code 0: sae_out = decoder bias
    x = load_digits_split(0, 0.2).x_test[:4]
    out = model(x)
    assert torch.equal(out.sae_out["hidden.0"], torch.full((4, 64), 5.0))
    expected_hidden1 = F.relu(mlp.layers[1](torch.full((4, 64), 5.0)))
    torch.testing.assert_close(out.hidden["hidden.1"], expected_hidden1)
    assert torch.equal(out.hidden["hidden.0"], model.forward_raw(x).hidden["hidden.0"])  # sae_in


def test_loss_terms_match_hand_computation_on_a_small_batch():
    torch.manual_seed(0)
    mlp = MLP(d_in=3, hidden_sizes=[2, 2], n_classes=2).requires_grad_(False)
    model = MLPWithSAEs(mlp, ["hidden.0"], dict_size_to_input_ratio=1.5)  # n_dict 3
    with torch.no_grad():
        model.sae("hidden.0").encoder[0].bias.fill_(0.5)  # some codes nonzero
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]])
    raw, out = model.forward_raw(x), model(x)
    loss = LossConfig.model_validate(
        {
            "sparsity": {"coeff": 2.0},
            "out_to_in": {"coeff": 3.0},
            "in_to_orig": {"total_coeff": 5.0},
            "logits_kl": {"coeff": 7.0},
        }
    )
    terms = loss_terms(loss, out, raw, in_to_orig_hooks(loss, model.sae_positions, mlp.hidden_names))
    codes, sae_in, sae_out = out.codes["hidden.0"], out.hidden["hidden.0"], out.sae_out["hidden.0"]
    assert codes.shape == (2, 3) and (codes > 0).any()
    sparsity = (codes.abs().sum(-1)[0] + codes.abs().sum(-1)[1]) / 2 / 2  # mean over 2 images, / d_in 2
    out_to_in = ((sae_out - sae_in) ** 2).sum() / 4  # 2 images x 2 dims
    in_to_orig = ((out.hidden["hidden.1"] - raw.hidden["hidden.1"]) ** 2).sum() / 4
    p, q = raw.logits.softmax(-1), out.logits.softmax(-1)
    kl = (p * (p.log() - q.log())).sum() / 2
    expected = {"sparsity": sparsity, "out_to_in": out_to_in, "in_to_orig": in_to_orig, "logits_kl": kl}
    assert terms.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value, msg=name)
    total = 2 * sparsity + 3 * out_to_in + 5 * in_to_orig + 7 * kl
    torch.testing.assert_close(weighted_total(terms, loss), total)


def test_e2e_sae_has_lower_kl_than_local_at_lower_or_equal_l0(mlp_dir):
    local = train_saes(sae_config(mlp_dir, "local")).metrics
    e2e = train_saes(sae_config(mlp_dir, "e2e")).metrics
    # seeds 0-3 gave local KL 0.031-0.035 at L0 11.3-13.0 and e2e KL 0.019-0.022 at L0 10.5-12.3; CE
    # increase on 360 test images is noisier (one seed had e2e 0.022 vs local 0.026): not asserted
    assert e2e[names.EVAL_KL] < 0.8 * local[names.EVAL_KL]
    assert e2e[names.EVAL_L0] < 1.1 * local[names.EVAL_L0]
    # the local SAE reconstructs its input; the e2e SAE does not try to (docs/design.md §4)
    assert local["eval/explained_variance/hidden.0"] > 0.7
    assert e2e["eval/explained_variance/hidden.0"] < local["eval/explained_variance/hidden.0"]
    assert 0 < e2e[names.EVAL_ALIVE] <= 256 and e2e["eval/accuracy_sae"] > 0.9


def test_e2e_training_cuts_kl_far_below_the_untrained_sae(mlp_dir):
    cfg = sae_config(mlp_dir, "e2e", n_steps=150)
    untrained, mlp_cfg = mlp_saes.build_model(cfg)
    data = load_digits_split(mlp_cfg.split_seed, mlp_cfg.test_fraction)
    before = evaluate(untrained, data.x_test, data.y_test, cfg.loss, [])
    after = train_saes(cfg).metrics
    assert before[names.KL] > 1.0
    assert after[names.EVAL_KL] < 0.1 * before[names.KL]
    assert after[names.EVAL_L0] < before[names.L0]


def test_same_seed_gives_identical_sae_weights_and_another_seed_differs(mlp_dir):
    def weights(seed: int) -> dict[str, torch.Tensor]:
        return train_saes(sae_config(mlp_dir, "e2e", n_steps=20, seed=seed)).model.saes.state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["hidden-0.decoder.weight"], other["hidden-0.decoder.weight"])


def test_run_folder_round_trips_the_trained_saes(mlp_dir, tmp_path):
    cfg = sae_config(mlp_dir, "local", n_steps=20, save_dir=str(tmp_path), run_name="rt")
    result = train_saes(cfg)
    assert result.run_dir == tmp_path / "rt"
    loaded = load_run(result.run_dir)
    trained = result.model.saes.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.saes.state_dict().items())
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved[names.EVAL_L0] == result.metrics[names.EVAL_L0]


def test_downstream_mse_uses_later_hidden_layers_only(mlp_dir):
    mlp, _ = load_mlp(mlp_dir)
    later = LossConfig.model_validate({"in_to_orig": {"total_coeff": 1.0}})
    assert in_to_orig_hooks(later, ["hidden.0"], mlp.hidden_names) == ["hidden.1"]
    with pytest.raises(HookNameError, match="no hidden layer follows the last SAE"):
        in_to_orig_hooks(later, ["hidden.1"], mlp.hidden_names)
    upstream = LossConfig.model_validate({"in_to_orig": {"total_coeff": 1.0, "hook_positions": ["hidden.0"]}})
    with pytest.raises(HookNameError, match="not downstream of the SAEs"):
        in_to_orig_hooks(upstream, ["hidden.0"], mlp.hidden_names)


def test_cli_bad_field_prints_one_line_naming_file_and_field(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "mlp_dir: x\nsae_positions: [hidden.0]\nn_steps: 10\nloss: {sparsity: {coef: 1}, out_to_in: {coeff: 1}}\n"
    )
    assert mlp_saes.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: loss.sparsity.coef: unknown field; did you mean coeff?")
    assert err.count("\n") == 1


def test_cli_l0_penalty_is_refused_in_one_line_the_mlp_saes_are_relu(tmp_path, capsys):
    # it used to validate, then crash with KeyError 'l0_penalty' in the first step
    path = tmp_path / "l0.yaml"
    path.write_text(
        "mlp_dir: x\nsae_positions: [hidden.0]\nn_steps: 10\n"
        "loss: {l0_penalty: {coeff: 1}, out_to_in: {coeff: 1}}\n"
    )
    assert mlp_saes.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "loss.l0_penalty: the MLP's SAEs are relu SAEs" in err and err.count("\n") == 1


def test_cli_unknown_position_and_missing_mlp_name_file_and_field(mlp_dir, tmp_path, capsys):
    path = tmp_path / "pos.yaml"
    base = {"mlp_dir": str(mlp_dir), "n_steps": 10, "loss": {"out_to_in": {"coeff": 1}}}
    path.write_text(yaml.safe_dump(base | {"sae_positions": ["hidden.5"]}))
    assert mlp_saes.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: sae_positions: the model has no hook 'hidden.5'; closest: hidden.")
    assert err.count("\n") == 1
    path.write_text(yaml.safe_dump(base | {"sae_positions": ["hidden.0"], "mlp_dir": str(tmp_path / "none")}))
    assert mlp_saes.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {path}: mlp_dir: no trained MLP in {tmp_path / 'none'}")
        and err.count("\n") == 1
    )


def test_mlp_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "mlp.yaml"
    path.write_text("hidden_sizes: [64, 0]\n")
    assert mlp_module.main([str(path)]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(f"error: {path}: hidden_sizes.1: Input should be greater than 0")
    assert out.err.count("\n") == 1 and out.out == ""


@pytest.mark.parametrize("name", ["mlp_digits.yaml", "mlp_saes_local.yaml", "mlp_saes_e2e.yaml"])
def test_example_configs_validate(name):
    path = ROOT / "configs" / name
    cfg = load_mlp_config(path) if name == "mlp_digits.yaml" else load_config(path)
    if isinstance(cfg, MLPSAEsConfig):
        assert cfg.mlp_dir == str(
            mlp_module.run_dir_for(load_mlp_config(ROOT / "configs" / "mlp_digits.yaml"))
        )
    else:
        assert isinstance(cfg, MLPConfig)


def test_bad_dictionary_ratio_is_a_config_error(mlp_dir):
    with pytest.raises(ConfigError, match="dict_size_to_input_ratio"):
        mlp_saes.build_model(sae_config(mlp_dir, "local", dict_size_to_input_ratio=0.001))
