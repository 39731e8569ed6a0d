"""Alive counts (sparsify.training.alive): counting the eval's own sequences and reading the SAE
inputs from the activation cache give the same firing counts as a forward over every
sequence of the alive budget."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_train_config

from sparsify import metric_names as names
from sparsify.config import validate_config
from sparsify.data import iter_batches
from sparsify.embedded import cache_dir
from sparsify.metrics import FiringCounter
from sparsify.training.alive import AliveCount, alive_shard, count_alive, saes_in_eval_mode
from sparsify.training.build import build_model
from sparsify.training.evaluation import evaluate, evaluate_without_alive
from sparsify.training.objective import make_loss_plan

HOOK = "blocks.1.hook_resid_pre"
LOCAL = {"out_to_in": {"coeff": 1.0}}  # topk: k sets the sparsity


def _cfg(tiny_model_dir, corpus_dir, tmp_path, positions=(HOOK,), **overrides):
    """TopK with k = 1: over 40 sequences of 16 tokens some of the 128 elements never fire, so
    a sequence left out or counted twice changes the counts. The eval's 12 sequences end
    inside the alive stream's second batch of 8."""
    saes = {"sae_positions": list(positions), "dict_size_to_input_ratio": 2.0, "architecture": "topk", "k": 1}
    return validate_config(
        tiny_train_config(
            tiny_model_dir,
            corpus_dir,
            tmp_path,
            loss=LOCAL,
            saes=saes,
            eval_n_samples=12,
            act_frequency_n_tokens=40 * 16,
            batch_size=8,
            **overrides,
        )  # fmt: skip
    )


def _forward_counts(model, cfg, tokenizer) -> dict[str, torch.Tensor]:
    """Firing counts by a forward over every alive sequence (the count before the shortcuts)."""
    counters = {h: FiringCounter(model.sae(h).n_dict) for h in model.sae_positions}
    stop = model.stop_layer_for(model.sae_positions)
    batches = iter_batches(cfg.eval_data, tokenizer, cfg.batch_size, alive_shard(cfg, 0, 1), "alive")
    with torch.no_grad(), saes_in_eval_mode(model):
        for tokens in batches:
            for hook, acts in model.forward(tokens, stop_at_layer=stop).sae_acts.items():
                counters[hook].update(acts.codes)
    return {h: c.counts for h, c in counters.items()}


def _counts_after_eval(model, cfg, tokenizer) -> tuple[AliveCount, dict[str, float]]:
    result = evaluate_without_alive(model, cfg, tokenizer, make_loss_plan(model, cfg.loss))
    assert result.alive is not None and result.alive.n_seqs == 12  # the eval's sequences, counted
    alive = count_alive(model, cfg, tokenizer, counted=result.alive)
    return result.alive, alive


@pytest.mark.parametrize("activation_cache", ["off", "auto"])
def test_alive_counts_after_the_eval_equal_a_forward_over_every_sequence(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, activation_cache
):
    cfg = _cfg(tiny_model_dir, corpus_dir, tmp_path, activation_cache=activation_cache)
    model = build_model(cfg, tiny_bridge)
    expected = _forward_counts(model, cfg, tiny_bridge.tokenizer)
    counted, alive = _counts_after_eval(model, cfg, tiny_bridge.tokenizer)

    assert counted.n_seqs == 40
    assert torch.equal(counted.counters[HOOK].counts, expected[HOOK])
    assert int(expected[HOOK].sum()) == 40 * 16  # k = 1: one firing per token, none twice
    n_alive = int((expected[HOOK] > 0).sum())
    assert 0 < n_alive < 128
    assert alive == {names.per_hook(names.ALIVE, HOOK): n_alive, names.ALIVE: n_alive}
    # and through the public evaluate, without a count handed over
    plan = make_loss_plan(model, cfg.loss)
    assert evaluate(model, cfg, tiny_bridge.tokenizer, plan).metrics[names.ALIVE] == n_alive


def test_one_position_on_a_cpu_reads_the_eval_activations_from_the_cache(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path / "cache"))  # not the other tests' cache file
    cfg = _cfg(tiny_model_dir, corpus_dir, tmp_path, activation_cache="on")
    model = build_model(cfg, tiny_bridge)
    expected = _forward_counts(model, cfg, tiny_bridge.tokenizer)
    first, _ = _counts_after_eval(model, cfg, tiny_bridge.tokenizer)
    assert len(list((cache_dir() / "activations").glob("*.safetensors"))) == 1
    # the second count reads the file: the model runs only for the eval itself
    plan = make_loss_plan(model, cfg.loss)
    result = evaluate_without_alive(model, cfg, tiny_bridge.tokenizer, plan)
    monkeypatch.setattr(model, "forward_raw", lambda *a, **k: pytest.fail("ran the model"))
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("ran the model"))
    count_alive(model, cfg, tiny_bridge.tokenizer, counted=result.alive)
    assert result.alive is not None
    for counted in (first, result.alive):
        assert torch.equal(counted.counters[HOOK].counts, expected[HOOK])


def test_two_positions_count_with_the_model_not_the_cache(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    """The second SAE's input depends on the first SAE's output: no cache, even when `on`."""
    positions = (HOOK, "blocks.2.hook_resid_pre")
    cfg = _cfg(tiny_model_dir, corpus_dir, tmp_path, positions=positions, activation_cache="on")
    model = build_model(cfg, tiny_bridge)
    expected = _forward_counts(model, cfg, tiny_bridge.tokenizer)
    before = set((cache_dir() / "activations").glob("*.safetensors"))
    counted, alive = _counts_after_eval(model, cfg, tiny_bridge.tokenizer)
    assert set((cache_dir() / "activations").glob("*.safetensors")) == before
    for hook in positions:
        assert torch.equal(counted.counters[hook].counts, expected[hook]), hook
    assert alive[names.ALIVE] == sum(int((expected[h] > 0).sum()) for h in positions)
