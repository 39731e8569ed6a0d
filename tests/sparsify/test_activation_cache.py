"""The activation cache serves local SAEs the same inputs the model would, computed once."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_train_config
from torch.testing import assert_close

from sparsify import train
from sparsify.config import validate_config
from sparsify.embedded import cache_dir
from sparsify.errors import ConfigError
from sparsify.sae_transformer import SAETransformer
from sparsify.training.activation_cache import wants_activation_cache
from sparsify.training.build import build_model

LOCAL_LOSS = {"sparsity": {"coeff": 0.5}, "out_to_in": {"coeff": 1.0}}


def local_config(tiny_model_dir, corpus_dir, tmp_path, **overrides):
    return validate_config(
        tiny_train_config(
            tiny_model_dir, corpus_dir, tmp_path, loss=LOCAL_LOSS, eval_data=None, save_dir=None, **overrides
        )
    )


def count_forward_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = SAETransformer.forward

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SAETransformer, "forward", counting)
    return calls


def cache_files() -> set[str]:
    return {p.name for p in (cache_dir() / "activations").glob("*.safetensors")}


def test_cached_training_matches_training_on_the_model(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    on = train(local_config(tiny_model_dir, corpus_dir, tmp_path, activation_cache="on"),
               tlens_model=tiny_bridge, show_progress=False)  # fmt: skip
    off = train(local_config(tiny_model_dir, corpus_dir, tmp_path, activation_cache="off"),
                tlens_model=tiny_bridge, show_progress=False)  # fmt: skip
    for (name, cached), (_, direct) in zip(
        on.model.saes.state_dict().items(), off.model.saes.state_dict().items(), strict=True
    ):
        assert_close(cached, direct, rtol=1e-4, atol=1e-5, msg=name)
    assert on.metrics["train/tokens_seen"] == off.metrics["train/tokens_seen"] == 64 * 16


def with_data_seed(cfg, seed: int):
    return cfg.model_copy(update={"train_data": cfg.train_data.model_copy(update={"seed": seed})})


def test_later_runs_on_the_same_data_read_the_cache_instead_of_the_model(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, monkeypatch
):
    calls = count_forward_calls(monkeypatch)
    cfg = with_data_seed(local_config(tiny_model_dir, corpus_dir, tmp_path, activation_cache="on"), 11)
    before = cache_files()
    train(cfg, tlens_model=tiny_bridge, show_progress=False)
    written = cache_files() - before
    assert len(written) == 1 and calls[0] == 0  # activations came from forward_raw, SAEs ran on them
    # another trial: other coefficients and SAE seed, same data and model -> the same file, and
    # the model never runs
    other = cfg.model_copy(update={"seed": 3, "loss": cfg.loss.model_copy(update={"sparsity": None})})
    probe_only = SAETransformer.forward_raw

    def no_batches(self, tokens, *args, **kwargs):
        assert tokens.shape[0] == 1, "the model ran on a training batch"  # (build's shape probes)
        return probe_only(self, tokens, *args, **kwargs)

    monkeypatch.setattr(SAETransformer, "forward_raw", no_batches)
    train(other, tlens_model=tiny_bridge, show_progress=False)
    assert cache_files() - before == written
    # other data (another shuffle seed) -> another file
    monkeypatch.undo()
    train(with_data_seed(cfg, 12), tlens_model=tiny_bridge, show_progress=False)
    assert len(cache_files() - before) == 2


def test_auto_uses_the_cache_only_for_local_losses_on_cpu(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    local = local_config(tiny_model_dir, corpus_dir, tmp_path)
    e2e = validate_config(tiny_train_config(tiny_model_dir, corpus_dir, tmp_path))
    model = build_model(local, tiny_bridge)
    assert local.activation_cache == "auto" and wants_activation_cache(local, model, 64)
    assert not wants_activation_cache(e2e, model, 64)  # e2e needs the model's logits every step
    assert not wants_activation_cache(local, model, 10**9)  # too large for the cache
    forced = e2e.model_copy(update={"activation_cache": "on"})
    with pytest.raises(ConfigError, match="activation_cache: on needs a local loss"):
        wants_activation_cache(forced, model, 64)


def test_cached_batches_equal_the_model_activations(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    from sparsify.training.activation_cache import activation_cache

    cfg = local_config(tiny_model_dir, corpus_dir, tmp_path)
    model = build_model(cfg, tiny_bridge)
    tokens = [torch.randint(0, 200, (3, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cache = activation_cache(model, cfg, tokens)
    pos = cfg.saes.sae_positions[0]
    batches = list(cache.batches(3))
    assert len(batches) == 3
    for batch, ids in zip(batches, tokens, strict=True):
        assert_close(batch[pos], model.forward_raw(ids, capture=[pos]).acts[pos])
