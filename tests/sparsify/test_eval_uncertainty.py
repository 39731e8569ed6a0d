"""Eval uncertainty (docs/design.md §5): per-sequence eval values, whose mean is the eval mean,
and a standard error `eval_se/<name>` for every eval metric but the alive counts."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from conftest import tiny_train_config

from sparsify import metric_names as names
from sparsify import metrics, train
from sparsify.config import validate_config
from sparsify.training.build import build_model
from sparsify.training.evaluation import evaluate
from sparsify.training.objective import make_loss_plan

HOOKS = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
E2E_DS = {"sparsity": {"coeff": 0.5}, "logits_kl": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}


def test_standard_error_of_a_small_array_by_hand():
    values = [1.0, 2.0, 4.0, 7.0]
    # mean 3.5; squared deviations 6.25 + 2.25 + 0.25 + 12.25 = 21; variance 21 / 3 = 7
    assert metrics.standard_error(values) == pytest.approx(math.sqrt(7 / 4), rel=1e-12)
    assert metrics.standard_error(values) == pytest.approx(statistics.stdev(values) / 2, rel=1e-12)
    assert math.isnan(metrics.standard_error([3.0])) and math.isnan(metrics.standard_error([]))


def test_weighted_standard_error_by_hand_and_equal_weights_give_the_plain_one():
    # batches of 2, 2 and 4 sequences: weighted mean (2*1 + 2*3 + 4*2) / 8 = 2
    values, weights = [1.0, 3.0, 2.0], [2.0, 2.0, 4.0]
    # sum w^2 (x - m)^2 = 4*1 + 4*1 + 16*0 = 8; sqrt(3/2 * 8) / 8 = sqrt(12) / 8
    assert metrics.weighted_standard_error(values, weights) == pytest.approx(math.sqrt(12) / 8, rel=1e-12)
    same = [5.0, 5.0, 5.0, 5.0]
    assert metrics.weighted_standard_error([1.0, 2.0, 4.0, 7.0], same) == pytest.approx(
        metrics.standard_error([1.0, 2.0, 4.0, 7.0]), rel=1e-12
    )
    assert math.isnan(metrics.weighted_standard_error([1.0], [3.0]))


def test_per_sequence_metric_functions_average_to_the_plain_ones():
    gen = torch.Generator().manual_seed(0)
    orig, sae = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 7, generator=gen)
    tokens = torch.randint(0, 7, (3, 5), generator=gen)
    codes = torch.relu(torch.randn(3, 5, 11, generator=gen))
    pairs = [
        (metrics.l0_per_sequence(codes), metrics.l0(codes)),
        (metrics.ce_loss_per_sequence(orig, tokens), metrics.ce_loss(orig, tokens)),
        (metrics.kl_divergence_per_sequence(orig, sae), metrics.kl_divergence(orig, sae)),
        (metrics.top1_agreement_per_sequence(orig, sae), metrics.top1_agreement(orig, sae)),
        (metrics.total_variation_per_sequence(orig, sae), metrics.total_variation(orig, sae)),
    ]
    for per_sequence, plain in pairs:
        assert per_sequence.shape == (3,) and per_sequence.dtype == torch.float64
        assert per_sequence.mean().item() == pytest.approx(plain, rel=1e-6)
    # each sequence's value is the plain function on that sequence alone
    assert metrics.ce_loss_per_sequence(orig, tokens)[1].item() == pytest.approx(
        metrics.ce_loss(orig[1:2], tokens[1:2]), rel=1e-6
    )
    assert metrics.l0_per_sequence(codes)[2].item() == pytest.approx(metrics.l0(codes[2:]), rel=1e-6)


def test_eval_per_sequence_values_average_to_the_eval_means(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path
):
    """Two SAE positions, the first position skipped, 10 eval sequences in batches of 4, 4, 2."""
    cfg = validate_config(
        tiny_train_config(
            tiny_model_dir,
            corpus_dir,
            tmp_path,
            loss=E2E_DS,
            eval_n_samples=10,
            batch_size=4,
            saes={"sae_positions": HOOKS, "dict_size_to_input_ratio": 2.0, "skip_first_position": True},
        )  # fmt: skip
    )
    model = build_model(cfg, tiny_bridge)
    plan = make_loss_plan(model, cfg.loss)
    result = evaluate(model, cfg, tiny_bridge.tokenizer, plan)

    per_hook_l0 = [names.per_hook(names.L0, h) for h in HOOKS]
    assert set(result.per_sequence) == {*names.PER_SEQUENCE_METRICS, *per_hook_l0}
    for name, values in result.per_sequence.items():
        assert len(values) == 10, name
        assert statistics.fmean(values) == pytest.approx(result.metrics[name], rel=1e-6, abs=1e-9), name
        assert result.standard_errors[name] == pytest.approx(metrics.standard_error(values), rel=1e-12), name
    # L0 of a sequence is summed over the SAE positions
    for i in range(10):
        assert result.per_sequence[names.L0][i] == pytest.approx(
            sum(result.per_sequence[h][i] for h in per_hook_l0), rel=1e-12
        )
    ce = result.per_sequence
    assert ce[names.CE_LOSS_INCREASE] == pytest.approx(
        [s - o for s, o in zip(ce[names.CE_SAE], ce[names.CE_ORIG], strict=True)], rel=1e-9, abs=1e-12
    )
    assert statistics.stdev(ce[names.KL]) > 0  # the sequences do differ: a real spread

    # every eval metric has a standard error but the alive counts; all finite (10 sequences, 3 batches)
    alive = {names.ALIVE, *(names.per_hook(names.ALIVE, h) for h in HOOKS)}
    assert set(result.standard_errors) == set(result.metrics) - alive
    assert all(math.isfinite(se) and se >= 0 for se in result.standard_errors.values())
    assert {"loss/sparsity", "loss/logits_kl", f"explained_variance/{HOOKS[0]}"} <= set(
        result.standard_errors
    )


def test_train_reports_standard_errors_and_keeps_the_per_sequence_values(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path
):
    cfg = validate_config(
        tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, n_samples=32, eval_every_n_samples=16)
    )
    reports = []
    result = train(cfg, tlens_model=tiny_bridge, report=lambda m, d: reports.append(m), show_progress=False)
    m = result.metrics
    hook = "blocks.1.hook_resid_pre"
    for name in ("eval_se/L0", "eval_se/ce_loss_increase", "eval_se/kl", f"eval_se/L0/{hook}",
                 "eval_se/loss/sparsity", f"eval_se/explained_variance/{hook}"):  # fmt: skip
        assert name in m and math.isfinite(m[name]) and m[name] >= 0, name
    assert names.se_name(names.EVAL_L0) == names.se_name(names.L0) == "eval_se/L0"
    assert names.se_name(names.EVAL_ALIVE) not in m
    assert not any(k.startswith("eval/") and "se" in k.split("/") for k in m)  # SEs never under eval/

    per_sequence = result.eval_per_sequence
    assert set(per_sequence) == {"eval/L0", "eval/ce_loss_increase", "eval/kl"}
    for key, values in per_sequence.items():
        assert len(values) == cfg.eval_n_samples
        assert statistics.fmean(values) == pytest.approx(m[key], rel=1e-6, abs=1e-9), key
        assert m[names.se_name(key)] == pytest.approx(
            statistics.stdev(values) / math.sqrt(len(values)), rel=1e-9
        )
    # the run folder keeps them
    saved = json.loads((result.run_dir / "eval_per_sequence.json").read_text())
    assert saved == per_sequence
    # every eval report (mid-run and final) carries the SEs beside the eval metrics
    evals = [r for r in reports if names.EVAL_L0 in r]
    assert len(evals) == 2 and all("eval_se/L0" in r for r in evals)
