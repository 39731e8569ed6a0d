"""Each SAE architecture trains on the tiny model: e2e lowers the KL, JumpReLU's L0 follows its
coefficient, BatchTopK's threshold gives an eval L0 near k, and the splice, resume, activation
cache and pretrained loading work as for the ReLU SAE."""

import pytest
import torch
from conftest import tiny_train_config
from torch.testing import assert_close

from sparsify import metric_names as names
from sparsify import train
from sparsify.architectures import BatchTopKSAE, JumpReLUSAE, TopKSAE
from sparsify.config import validate_config
from sparsify.sae_transformer import SAETransformer

# JumpReLU at the tiny model's residual scale (mean |x| ~0.02, token norm ~0.2)
JUMPRELU = {"architecture": "jumprelu", "jumprelu_threshold_init": 0.05, "jumprelu_bandwidth": 0.05}
ARCHITECTURES = {
    "relu": ({}, {"sparsity": {"coeff": 0.5}}),
    "topk": ({"architecture": "topk", "k": 8}, {}),
    "batchtopk": ({"architecture": "batchtopk", "k": 8}, {}),
    "jumprelu": (JUMPRELU, {"l0_penalty": {"coeff": 1e-3}}),
}


def _config(model_dir, corpus, tmp_path, saes: dict, loss: dict, **overrides):
    cfg = tiny_train_config(model_dir, corpus, tmp_path, **{"save_dir": None, "lr": 1e-2, **overrides})
    cfg["saes"] = {**cfg["saes"], **saes}
    cfg["loss"] = loss
    return validate_config(cfg)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_e2e_training_lowers_the_kl_for_every_architecture(
    arch, tiny_bridge, tiny_model_dir, corpus_dir, tmp_path
):
    saes, sparsity = ARCHITECTURES[arch]
    loss = {**sparsity, "logits_kl": {"coeff": 1.0}}
    kl = {}
    for n_samples in (8, 256):
        cfg = _config(tiny_model_dir, corpus_dir, tmp_path, saes, loss, n_samples=n_samples)
        kl[n_samples] = train(cfg, tlens_model=tiny_bridge, show_progress=False).metrics[names.EVAL_KL]
    # measured: relu 0.022 -> 0.016, topk 0.021 -> 0.013, batchtopk 0.021 -> 0.013, jumprelu 0.022 -> 0.013
    assert kl[256] < 0.85 * kl[8], kl


def test_jumprelu_l0_falls_as_its_coefficient_rises(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    l0 = []
    for coeff in (1e-5, 3e-5, 1e-4):
        loss = {"l0_penalty": {"coeff": coeff}, "out_to_in": {"coeff": 1.0}}
        cfg = _config(tiny_model_dir, corpus_dir, tmp_path, JUMPRELU, loss, n_samples=256)
        l0.append(train(cfg, tlens_model=tiny_bridge, show_progress=False).metrics[names.EVAL_L0])
    # measured: 2.86, 2.35, 1.82
    assert l0[0] > l0[1] > l0[2], l0
    assert l0[2] < 0.8 * l0[0], l0


def test_topk_eval_l0_is_k(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    saes, loss = {"architecture": "topk", "k": 6}, {"out_to_in": {"coeff": 1.0}}
    result = train(_config(tiny_model_dir, corpus_dir, tmp_path, saes, loss, n_samples=64),
                   tlens_model=tiny_bridge, show_progress=False)  # fmt: skip
    assert isinstance(result.model.sae("blocks.1.hook_resid_pre"), TopKSAE)
    # the rule allows at most k; a latent among the top k is negative only on a rare token
    assert 5.9 <= result.metrics[names.EVAL_L0] <= 6.0


def test_batchtopk_eval_l0_is_near_k_with_its_learned_threshold(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path
):
    saes, loss = {"architecture": "batchtopk", "k": 8}, {"out_to_in": {"coeff": 1.0}}
    result = train(_config(tiny_model_dir, corpus_dir, tmp_path, saes, loss, n_samples=512),
                   tlens_model=tiny_bridge, show_progress=False)  # fmt: skip
    sae = result.model.sae("blocks.1.hook_resid_pre")
    assert isinstance(sae, BatchTopKSAE) and sae.threshold.item() > 0
    assert sae.threshold_updates.item() == 512 // 8  # one estimate per training forward
    # eval: the threshold rule (measured 7.1 after 64 steps)
    assert abs(result.metrics[names.EVAL_L0] - 8) < 0.2 * 8, result.metrics[names.EVAL_L0]
    assert result.model.saes.training  # eval put the SAEs back in training mode


def test_activation_cache_trains_a_batchtopk_sae_as_the_model_does(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path
):
    saes, loss = {"architecture": "batchtopk", "k": 4}, {"out_to_in": {"coeff": 1.0}}
    runs = [
        train(_config(tiny_model_dir, corpus_dir, tmp_path, saes, loss, n_samples=32, activation_cache=cache),
              tlens_model=tiny_bridge, show_progress=False).model.saes.state_dict()
        for cache in ("on", "off")
    ]  # fmt: skip
    for key in runs[0]:
        assert_close(runs[0][key], runs[1][key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_saved_jumprelu_run_loads_with_its_architecture(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, tiny_tokens
):
    loss = {"l0_penalty": {"coeff": 1e-4}, "logits_kl": {"coeff": 1.0}}
    cfg = _config(tiny_model_dir, corpus_dir, tmp_path, JUMPRELU, loss, n_samples=32, eval_data=None,
                  save_dir=str(tmp_path / "runs"))  # fmt: skip
    result = train(cfg, tlens_model=tiny_bridge, show_progress=False)
    loaded = SAETransformer.from_local_path(result.run_dir, device="cpu")
    sae = loaded.sae("blocks.1.hook_resid_pre")
    assert isinstance(sae, JumpReLUSAE)
    trained = result.model.sae("blocks.1.hook_resid_pre")
    assert isinstance(trained, JumpReLUSAE)
    assert trained.log_threshold.std().item() > 0  # the thresholds trained, each its own way
    assert_close(sae.log_threshold, trained.log_threshold)
    with torch.no_grad():
        assert_close(loaded(tiny_tokens).logits, result.model(tiny_tokens).logits)


def test_a_batchtopk_run_loads_for_inference_with_its_threshold_rule(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, tiny_tokens
):
    # from_local_path used to return the SAEs in training mode: a forward used the batch rule
    # (a sequence's codes depended on the others in its batch) and moved the learned threshold
    saes, loss = {"architecture": "batchtopk", "k": 4}, {"out_to_in": {"coeff": 1.0}}
    cfg = _config(tiny_model_dir, corpus_dir, tmp_path, saes, loss, n_samples=32, eval_data=None,
                  save_dir=str(tmp_path / "runs"))  # fmt: skip
    result = train(cfg, tlens_model=tiny_bridge, show_progress=False)
    loaded = SAETransformer.from_local_path(result.run_dir, device="cpu")
    sae = loaded.sae("blocks.1.hook_resid_pre")
    assert isinstance(sae, BatchTopKSAE) and not sae.training
    threshold = sae.threshold.clone()
    with torch.no_grad():
        both = loaded(tiny_tokens).sae_acts["blocks.1.hook_resid_pre"].codes
        first = loaded(tiny_tokens[:1]).sae_acts["blocks.1.hook_resid_pre"].codes
    assert torch.equal(both[:1], first)
    assert torch.equal(sae.threshold, threshold)


def test_a_frozen_pretrained_batchtopk_sae_keeps_its_threshold_and_rule(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path
):
    # a frozen (retrain_saes: false) BatchTopK SAE used to run its batch rule while the other SAE
    # trained, and its threshold estimate kept moving, so the saved "frozen" SAE had changed
    saes, loss = {"architecture": "batchtopk", "k": 4}, {"out_to_in": {"coeff": 1.0}}
    source = train(_config(tiny_model_dir, corpus_dir, tmp_path, saes, loss, n_samples=32,
                           save_dir=str(tmp_path / "src")), tlens_model=tiny_bridge, show_progress=False)  # fmt: skip
    both = {**saes, "sae_positions": ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"],
            "pretrained_sae_paths": [str(source.run_dir)]}  # fmt: skip
    # evals every 2 steps: the SAEs go to eval mode and back in between
    result = train(_config(tiny_model_dir, corpus_dir, tmp_path, both, loss, n_samples=32, eval_every_n_samples=16),
                   tlens_model=tiny_bridge, show_progress=False)  # fmt: skip
    frozen, trained = (result.model.sae(f"blocks.{i}.hook_resid_pre") for i in (1, 2))
    assert not frozen.training and trained.training
    loaded = source.model.sae("blocks.1.hook_resid_pre")
    assert isinstance(frozen, BatchTopKSAE) and isinstance(loaded, BatchTopKSAE)
    assert torch.equal(frozen.threshold, loaded.threshold)
    assert torch.equal(frozen.threshold_updates, loaded.threshold_updates)
    assert trained.threshold_updates.item() == 32 // 8


class _Interrupted(Exception):
    pass


def _stop_at_checkpoint(metrics, checkpoint):
    if checkpoint is not None:
        raise _Interrupted(checkpoint)


def test_a_resumed_batchtopk_run_equals_an_uninterrupted_one(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path
):
    """The threshold estimate is state too: it travels in the checkpoint with the weights."""
    saes, loss = {"architecture": "batchtopk", "k": 4}, {"out_to_in": {"coeff": 1.0}}

    def config(folder: str):
        return _config(tiny_model_dir, corpus_dir, tmp_path, saes, loss, n_samples=64,
                       save_every_n_samples=32, save_dir=str(tmp_path / folder))  # fmt: skip

    whole = train(config("whole"), tlens_model=tiny_bridge, show_progress=False)
    with pytest.raises(_Interrupted) as stopped:
        train(config("cut"), tlens_model=tiny_bridge, show_progress=False, report=_stop_at_checkpoint)
    run_dir = stopped.value.args[0].parents[1]
    resumed = train(config("cut"), tlens_model=tiny_bridge, show_progress=False, resume_from=run_dir)
    a, b = whole.model.saes.state_dict(), resumed.model.saes.state_dict()
    assert any(key.endswith("threshold") for key in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.metrics[names.EVAL_L0] == whole.metrics[names.EVAL_L0]


def test_a_run_folder_of_another_architecture_or_k_is_refused_in_one_line(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path
):
    from sparsify import ConfigError, build_model

    saes, loss = {"architecture": "topk", "k": 6}, {"out_to_in": {"coeff": 1.0}}
    run = train(
        _config(tiny_model_dir, corpus_dir, tmp_path, saes, loss, n_samples=8, eval_data=None,
                save_dir=str(tmp_path / "runs")),
        tlens_model=tiny_bridge, show_progress=False,
    ).run_dir  # fmt: skip
    for other, wanted in (
        ({"sparsity": {"coeff": 1.0}}, "holds topk with k 6 SAEs, but this config's saes are relu"),
        (
            {"architecture": "topk", "k": 7},
            "holds topk with k 6 SAEs, but this config's saes are topk with k 7",
        ),
    ):
        relu = "sparsity" in other
        cfg = _config(
            tiny_model_dir, corpus_dir, tmp_path,
            {"pretrained_sae_paths": [str(run)], **({} if relu else other)},
            {**(other if relu else {}), "out_to_in": {"coeff": 1.0}}, n_samples=8, eval_data=None,
        )  # fmt: skip
        with pytest.raises(ConfigError) as info:
            build_model(cfg, tiny_bridge)
        assert str(info.value).startswith("saes.pretrained_sae_paths: ") and wanted in str(info.value)
        assert "\n" not in str(info.value)
