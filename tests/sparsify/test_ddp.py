"""DDP without Ray: 2 gloo ranks (torch.multiprocessing, FileStore rendezvous) train one SAE on
the tiny model and must match 1 rank on the same global batch (docs/design.md §1, §9)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_train_config

from sparsify import metric_names as names
from sparsify.config import DataConfig, validate_config
from sparsify.data import iter_batches, shard_size

WEIGHT_ATOL = 1e-5
"""Final SAE weights, 2 ranks vs 1. The gradients differ only in float32 summation order (a mean
over 8 sequences vs the average of two means over 4: ~1e-7 relative), and Adam turns a gradient
difference into an update difference of about lr x that relative difference per step. Measured
max |diff|: 7e-8 after 8 e2e steps with clipping, 7e-8 after 8 local steps, 5e-7 after 2 steps."""
METRIC_RTOL, METRIC_ATOL = 1e-4, 1e-6
"""Eval metrics are means over the same sequences on both sides and inherit only the weight
difference above; measured: CE-loss increase within 4e-7 nats (3.8e-5 relative, it is a
difference of two nearly equal CEs), every other metric within 1e-6 relative."""
BATCH_RELATIVE = (names.EXPLAINED_VARIANCE, names.EXPLAINED_VARIANCE_LN)
"""Explained variance divides by the variance around the mean target of each batch (see
`metrics.explained_variance`), so it depends on how sequences are grouped into batches: 2 ranks
with half batches differ from 1 rank by 1-4% on the tiny model, as a different batch_size
would. It is still all-reduced: both ranks report the same value."""


def batch_relative(key: str) -> bool:
    """Explained variance (above), and the standard errors that come from per-batch values
    (all but those of the per-sequence metrics, docs/design.md §5): 2 ranks have twice the
    batches, each half as big."""
    split, bare = key.split("/", 1)
    if split == names.EVAL_SE and bare.split("/")[0] not in names.PER_SEQUENCE_METRICS:
        return True
    return bare.split("/")[0] in BATCH_RELATIVE


def train_variants(rank: int, world_size: int, configs: dict[str, dict[str, Any]], out: Path) -> None:
    """Train each config in turn on this rank, saving its SAE weights, its final metrics, the
    training sequences this rank read and its initial decoder bias (both recorded by wrapping
    the batch source's `iter_batches` and `init_decoder_bias`)."""
    import sparsify.training.batches as batches
    from sparsify import train

    seen: list[torch.Tensor] = []
    init_bias: dict[str, torch.Tensor] = {}
    original_batches, original_init = batches.iter_batches, batches.init_decoder_bias

    def recording_iter_batches(*args: Any, **kwargs: Any):
        for batch in original_batches(*args, **kwargs):
            seen.append(batch.clone())
            yield batch

    def recording_init(model: Any, *args: Any, **kwargs: Any) -> None:
        original_init(model, *args, **kwargs)
        init_bias.update({h: model.sae(h).decoder.bias.detach().clone() for h in model.sae_positions})

    with (
        mock.patch.object(batches, "iter_batches", recording_iter_batches),
        mock.patch.object(batches, "init_decoder_bias", recording_init),
    ):
        for name, cfg_dict in configs.items():
            seen.clear()
            init_bias.clear()
            cfg = validate_config({**cfg_dict, "save_dir": str(out / f"runs{world_size}")})
            result = train(cfg, rank=rank, world_size=world_size, show_progress=False)
            saved = {
                "saes": {k: v.detach().clone() for k, v in result.model.saes.state_dict().items()},
                "metrics": result.metrics,
                "eval_per_sequence": result.eval_per_sequence,
                "sequences": torch.cat(seen),
                "init_bias": dict(init_bias),
            }
            torch.save(saved, out / f"{name}_world{world_size}_rank{rank}.pt")


def window_across_ranks(rank: int, out: Path) -> None:
    """TrainWindow under DDP: rank 0 logs finite losses, rank 1 other values, then an inf."""
    from sparsify.errors import DivergedError
    from sparsify.training.state import TrainWindow

    window = TrainWindow()
    for step, (sparsity, kl) in enumerate(
        [(1.0, 2.0), (3.0, 4.0)] if rank == 0 else [(3.0, 6.0), (5.0, 8.0)]
    ):
        terms = {"sparsity": torch.tensor(sparsity), "logits_kl": torch.tensor(kl)}
        window.add(terms, terms["sparsity"] + terms["logits_kl"], n_tokens=10, step=step)
    window.check_finite()
    metrics = window.flush(torch.tensor(0.5), 1e-3, {"L0": 7.0 + 2 * rank})
    terms = {"sparsity": torch.tensor(1.0), "logits_kl": torch.tensor(float("inf") if rank else 1.0)}
    window.add(terms, terms["sparsity"] + terms["logits_kl"], n_tokens=10, step=3)
    error = ""
    try:
        window.check_finite()
    except DivergedError as exc:
        error = str(exc)
    torch.save({"metrics": metrics, "error": error}, out / f"window_rank{rank}.pt")


def _rank_main(rank: int, configs: dict[str, dict[str, Any]], out: str) -> None:
    """One of 2 spawned DDP ranks (gloo over loopback, FileStore rendezvous)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no network needed
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/store", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    try:
        train_variants(rank, 2, configs, Path(out))
        window_across_ranks(rank, Path(out))
    finally:
        dist.destroy_process_group()


VARIANTS = {
    # e2e with gradient accumulation (2 micro-batches per step) and clipping that bites
    "e2e_accum_clip": {"effective_batch_size": 16, "n_samples": 128, "max_grad_norm": 0.05},
    # local loss (read through the activation cache on a CPU) with the data_mean decoder bias
    "local_data_mean": {
        "loss": {"sparsity": {"coeff": 0.5}, "out_to_in": {"coeff": 1.0}},
        "saes": {
            "sae_positions": ["blocks.1.hook_resid_pre"],
            "dict_size_to_input_ratio": 2.0,
            "decoder_bias_init": "data_mean",
        },
    },
    # eval and alive counts over sequence counts that do not split evenly over 2 ranks
    "odd_eval_counts": {"n_samples": 16, "eval_n_samples": 7, "act_frequency_n_tokens": 16 * 5},
    # fewer eval and alive sequences than ranks: rank 1's share is empty
    "one_eval_sequence": {"n_samples": 16, "eval_n_samples": 1, "act_frequency_n_tokens": 16},
}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, corpus_dir, tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """Each variant trained on 1 rank and on 2 ranks: {"<variant>_world<n>": [rank results]},
    plus the 2-rank TrainWindow check's results under "window"."""
    out = tmp_path_factory.mktemp("ddp")
    configs = {
        name: tiny_train_config(tiny_model_dir, corpus_dir, out, **overrides)
        for name, overrides in VARIANTS.items()
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank; 2 threads on a busy 2-core machine run 4x slower
    try:
        train_variants(0, 1, configs, out)  # 1 rank, in this process (no process group)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_rank_main, args=(configs, str(out)), nprocs=2)  # each spawn re-imports torch: ~10 s
    return {
        f"{name}_world{world_size}": [
            torch.load(out / f"{name}_world{world_size}_rank{r}.pt", weights_only=False)
            for r in range(world_size)
        ]
        for name in VARIANTS
        for world_size in (1, 2)
    } | {"window": [torch.load(out / f"window_rank{r}.pt") for r in range(2)]}


@pytest.mark.parametrize("variant", ["e2e_accum_clip", "local_data_mean"])
def test_two_ranks_train_the_same_sae_as_one_on_the_same_global_batch(variant, runs):
    cfg = {**tiny_train_config(Path(), Path(), Path()), **VARIANTS[variant]}
    (single,) = runs[f"{variant}_world1"]
    rank0, rank1 = runs[f"{variant}_world2"]

    # both ranks hold the same weights (identical init, averaged gradients), equal to 1 rank's
    for key, weight in single["saes"].items():
        assert torch.equal(rank0["saes"][key], rank1["saes"][key]), key
        torch.testing.assert_close(rank0["saes"][key], weight, rtol=0, atol=WEIGHT_ATOL)

    # every rank reports the same all-reduced metrics, equal to 1 rank's
    assert rank0["metrics"].keys() == single["metrics"].keys()
    for key, value in single["metrics"].items():
        if key == names.prefixed(names.TRAIN, names.TOKENS_PER_S) or key in names.TIME_METRICS:
            continue  # each rank times itself
        assert rank1["metrics"][key] == pytest.approx(rank0["metrics"][key], rel=1e-12, abs=1e-12), key
        if key == names.COST_DEVICE_SECONDS:
            continue  # wall time: the same on both ranks (the slowest one's), not 1 rank's
        if not batch_relative(key):
            assert rank0["metrics"][key] == pytest.approx(value, rel=METRIC_RTOL, abs=METRIC_ATOL), key
    assert rank0["metrics"][names.prefixed(names.TRAIN, names.TOKENS_SEEN)] == cfg["n_samples"] * 16
    assert rank0["metrics"][names.EVAL_L0] > 0

    # the ranks' training sequences are disjoint and, step by step, together exactly 1 rank's
    seqs0, seqs1, seqs = rank0["sequences"], rank1["sequences"], single["sequences"]
    assert len(seqs0) == len(seqs1) == cfg["n_samples"] // 2 and len(seqs) == cfg["n_samples"]
    assert {tuple(s) for s in seqs0.tolist()}.isdisjoint(tuple(s) for s in seqs1.tolist())
    half = cfg["batch_size"] // 2
    for step, batch in enumerate(seqs.split(cfg["batch_size"])):
        both = torch.cat([seqs0[step * half : (step + 1) * half], seqs1[step * half : (step + 1) * half]])
        assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, batch.tolist())), step


def test_data_mean_decoder_bias_is_the_global_batch_mean_on_every_rank(runs):
    (single,) = runs["local_data_mean_world1"]
    rank0, rank1 = runs["local_data_mean_world2"]
    hook = "blocks.1.hook_resid_pre"
    # 1 rank: the mean over the first batch of 8; 2 ranks: the average of their two means over 4
    expected = single["init_bias"][hook]
    assert expected.abs().max() > 0.01
    assert torch.equal(rank0["init_bias"][hook], rank1["init_bias"][hook])
    torch.testing.assert_close(rank0["init_bias"][hook], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["odd_eval_counts", "one_eval_sequence"])
def test_eval_over_counts_that_do_not_split_evenly_reads_the_same_sequences(runs, variant):
    """Exactly `eval_n_samples` sequences whatever the world size (a rank with an empty share
    reads none and adds nothing to the means), so 2 ranks report 1 rank's eval."""
    (single,) = runs[f"{variant}_world1"]
    rank0, rank1 = runs[f"{variant}_world2"]
    for key in (names.EVAL_L0, names.EVAL_CE_LOSS_INCREASE, names.EVAL_KL, names.EVAL_ALIVE):
        assert rank0["metrics"][key] == pytest.approx(
            single["metrics"][key], rel=METRIC_RTOL, abs=METRIC_ATOL
        ), key
        assert rank1["metrics"][key] == rank0["metrics"][key], key
    # the per-sequence values, gathered from both ranks, in the eval stream's order
    assert rank0["eval_per_sequence"] == rank1["eval_per_sequence"]
    assert (
        rank0["eval_per_sequence"].keys()
        == single["eval_per_sequence"].keys()
        == set(names.KEPT_PER_SEQUENCE)
    )
    for key, values in single["eval_per_sequence"].items():
        assert len(values) == VARIANTS[variant]["eval_n_samples"]
        assert rank0["eval_per_sequence"][key] == pytest.approx(values, rel=METRIC_RTOL, abs=METRIC_ATOL), key


def test_train_window_averages_over_ranks_and_a_rank_that_diverges_stops_both(runs):
    for rank in runs["window"]:
        # rank 0's window means (2, 3) and rank 1's (4, 7) average to (3, 5); L0 7 and 9 to 8
        metrics = rank["metrics"]
        assert metrics["train/loss/sparsity"] == 3.0 and metrics["train/loss/logits_kl"] == 5.0
        assert metrics["train/loss"] == 8.0 and metrics["train/L0"] == 8.0
        # only rank 1 saw the inf; both raise, so neither waits for the other at the next all-reduce
        assert "'logits_kl' is inf at step 3" in rank["error"]


@pytest.fixture(scope="module")
def tokenizer(tiny_bridge):
    return tiny_bridge.tokenizer


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("n_samples", [12, 13])
def test_iter_batches_shards_are_disjoint_and_cover_the_single_rank_stream(
    world_size, n_samples, corpus_dir, tokenizer
):
    data = DataConfig(files=[str(corpus_dir / "*.txt")], split="all", n_ctx=16, seed=3)
    whole = [tuple(s) for b in iter_batches(data, tokenizer, 4, n_samples, "n_samples") for s in b.tolist()]
    shards = [
        [
            tuple(s)
            for b in iter_batches(
                data, tokenizer, 2, shard_size(n_samples, r, world_size), "n", r, world_size
            )
            for s in b.tolist()
        ]
        for r in range(world_size)
    ]
    assert sum(map(len, shards)) == n_samples == len(whole)
    for r in range(world_size):
        for other in range(r + 1, world_size):
            assert set(shards[r]).isdisjoint(shards[other])
    # rank r holds the single-rank stream's items r, r + world_size, ...
    for r, shard in enumerate(shards):
        assert shard == whole[r::world_size]


def test_shard_size_splits_n_over_ranks():
    assert [shard_size(13, r, 3) for r in range(3)] == [5, 4, 4]
    assert [shard_size(12, r, 2) for r in range(2)] == [6, 6]
    assert [shard_size(1, r, 2) for r in range(2)] == [1, 0]
