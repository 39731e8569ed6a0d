import json
import math

import pytest
import torch
from conftest import tiny_train_config

from sparsify import metric_names as names
from sparsify import train
from sparsify.config import validate_config
from sparsify.errors import DataError, DivergedError
from sparsify.training.build import build_model
from sparsify.training.checkpoint import load_sae_weights
from sparsify.training.objective import make_loss_plan


def test_e2e_training_lowers_the_loss_and_writes_the_run(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    cfg = validate_config(
        tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, n_samples=128, log_every_n_grad_steps=1)
    )
    logged = []
    result = train(
        cfg, tlens_model=tiny_bridge, report=lambda m, d: logged.append((m, d)), show_progress=False
    )
    m = result.metrics
    for key in (
        names.EVAL_L0,
        names.EVAL_CE_LOSS_INCREASE,
        names.EVAL_ALIVE,
        names.EVAL_KL,
        "eval/top1_agreement",
        "eval/explained_variance/blocks.1.hook_resid_pre",
        "train/tokens_seen",
    ):
        assert key in m and math.isfinite(m[key]), key
    assert m["train/tokens_seen"] == 128 * 16
    assert m[names.EVAL_CE_LOSS_INCREASE] == pytest.approx(m["eval/ce_loss_sae"] - m["eval/ce_loss_orig"])
    assert 0 < m[names.EVAL_ALIVE] <= 128
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"sae.safetensors", "config.yaml", "metrics.json"} <= files
    saved = load_sae_weights(result.run_dir / "sae.safetensors")
    assert saved["blocks-1-hook_resid_pre.decoder.weight"].shape == (64, 128)
    assert json.loads((result.run_dir / "metrics.json").read_text())[names.EVAL_L0] == pytest.approx(
        m[names.EVAL_L0]
    )
    assert logged[-1][1] == result.run_dir  # the final report carries the checkpoint folder


def test_training_reduces_the_e2e_loss(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    base = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, save_dir=None, eval_data=None, lr=1e-2)
    short = train(validate_config({**base, "n_samples": 8}), tlens_model=tiny_bridge, show_progress=False)
    long = train(validate_config({**base, "n_samples": 256}), tlens_model=tiny_bridge, show_progress=False)
    assert long.metrics["train/loss"] < 0.7 * short.metrics["train/loss"]


def test_same_seed_gives_the_same_sae(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    cfg = validate_config(
        tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, save_dir=None, eval_data=None, n_samples=32)
    )
    a = train(cfg, tlens_model=tiny_bridge, show_progress=False).model.saes.state_dict()
    b = train(cfg, tlens_model=tiny_bridge, show_progress=False).model.saes.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_local_arm_stops_after_the_sae_layer(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    local = tiny_train_config(
        tiny_model_dir, corpus_dir, tmp_path, loss={"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}
    )
    cfg = validate_config(local)
    plan = make_loss_plan(build_model(cfg, tiny_bridge), cfg.loss)
    assert plan.stop_at_layer == 2 and not cfg.loss.needs_original_model


def test_e2e_ds_resolves_later_resid_pre_hooks(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    loss = {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 0.5}, "in_to_orig": {"total_coeff": 2.5}}
    cfg = validate_config(
        tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, loss=loss, save_dir=None, n_samples=16)
    )
    plan = make_loss_plan(build_model(cfg, tiny_bridge), cfg.loss)
    assert plan.in_to_orig_hooks == ("blocks.2.hook_resid_pre",) and plan.stop_at_layer is None
    result = train(cfg, tlens_model=tiny_bridge, show_progress=False)
    assert result.metrics["eval/loss/in_to_orig"] > 0


def test_compiled_training_matches_eager(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    """`compile: true` (torch.compile'd SAEs and every loss term) trains the same SAE as eager."""
    import torch._dynamo

    loss = {
        "sparsity": {"coeff": 0.5},
        "logits_kl": {"coeff": 1.0},
        "out_to_in": {"coeff": 0.3},
        "out_to_orig": {"coeff": 0.2},
        "in_to_orig": {"total_coeff": 0.1},
    }
    base = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, loss=loss, save_dir=None, n_samples=32)
    eager = train(validate_config(base), tlens_model=tiny_bridge, show_progress=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train(validate_config({**base, "compile": True}), tlens_model=tiny_bridge, show_progress=False)
    # dynamo captured graphs: the compiled path really ran (SAE forward + 3 loss functions)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 4
    a, b = eager.model.saes.state_dict(), compiled.model.saes.state_dict()
    assert a.keys() == b.keys()  # module.compile() keeps the parameter names
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    for key in ("eval/loss/logits_kl", "eval/loss/out_to_in", "eval/loss/in_to_orig", names.EVAL_L0):
        assert compiled.metrics[key] == pytest.approx(eager.metrics[key], rel=1e-4, abs=1e-6), key


def test_diverged_loss_raises_with_step_and_term(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, monkeypatch
):
    cfg = validate_config(
        tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, save_dir=None, eval_data=None, n_samples=64)
    )
    monkeypatch.setattr("sparsify.training.objective.sparsity_loss", lambda *args: torch.tensor(float("inf")))
    with pytest.raises(DivergedError, match="'sparsity' is inf at step 0") as info:
        train(cfg, tlens_model=tiny_bridge, show_progress=False)
    assert info.value.term == "sparsity"


def test_diverged_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(DivergedError(3, "logits_kl", float("nan"))))
    assert (error.step, error.term, str(error)) == (3, "logits_kl", "loss term 'logits_kl' is nan at step 3")


def test_only_whole_optimizer_steps_are_trained(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    cfg = validate_config(
        tiny_train_config(
            tiny_model_dir,
            corpus_dir,
            tmp_path,
            save_dir=None,
            eval_data=None,
            n_samples=40,
            batch_size=8,
            effective_batch_size=16,
        )
    )
    assert cfg.grad_accum_steps == 2 and cfg.n_grad_steps == 2
    result = train(cfg, tlens_model=tiny_bridge, show_progress=False)
    assert result.metrics["train/tokens_seen"] == 32 * 16  # 2 steps x 16 sequences x 16 tokens


def test_eval_data_too_small_fails_before_training(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, monkeypatch
):
    cfg = validate_config(
        tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, act_frequency_n_tokens=10**7)
    )
    monkeypatch.setattr(
        "sparsify.training.trainer.loss_terms", lambda *a: pytest.fail("trained before checking data")
    )
    with pytest.raises(
        DataError,
        match=r"act_frequency_n_tokens: eval_data has \d+ sequences of 16 tokens; the run needs 625000",
    ):
        train(cfg, tlens_model=tiny_bridge, show_progress=False)


def test_train_window_names_the_first_non_finite_step_and_averages_the_rest():
    from sparsify.training.state import TrainWindow

    window = TrainWindow()
    for step, (sparsity, kl) in enumerate([(1.0, 2.0), (3.0, 4.0)]):
        terms = {"sparsity": torch.tensor(sparsity), "logits_kl": torch.tensor(kl)}
        window.add(terms, terms["sparsity"] + terms["logits_kl"], n_tokens=10, step=step)
    window.check_finite()  # all finite: no error
    metrics = window.flush(torch.tensor(0.5), 1e-3, {"L0": 7.0})
    assert metrics["train/loss/sparsity"] == 2.0 and metrics["train/loss/logits_kl"] == 3.0
    assert metrics["train/loss"] == 5.0 and metrics["train/grad_norm"] == 0.5 and metrics["train/L0"] == 7.0
    # after an inf, later steps turn NaN: the error names the first bad step and term
    for step, kl in [(2, 1.0), (3, float("inf")), (4, float("nan"))]:
        terms = {"sparsity": torch.tensor(1.0), "logits_kl": torch.tensor(kl)}
        window.add(terms, terms["sparsity"] + terms["logits_kl"], n_tokens=10, step=step)
    with pytest.raises(DivergedError, match="'logits_kl' is inf at step 3"):
        window.check_finite()
