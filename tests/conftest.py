"""Shared fixtures: a tiny random Llama model with a locally trained tokenizer, and a small
local text corpus. Nothing is downloaded."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
import yaml

from sparsify.metric_names import EVAL_CE_LOSS_INCREASE

# token caches and the dequantized embedded model go to a throwaway folder, not ~/.cache
os.environ.setdefault("SPARSIFY_CACHE", tempfile.mkdtemp(prefix="sparsify-test-cache-"))
# tests never reach the model hub: a hub name fails at once instead of after ~45 s of retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = (
    "the state of the union is strong and our nation will meet every challenge with courage "
    "congress shall work for the people of this country in peace and in war we stand together "
    "freedom justice liberty commerce treaty army navy revenue tariff school road bridge river"
).split()


def make_corpus(folder: Path, n_docs: int = 40, words_per_doc: int = 400, seed: int = 0) -> list[Path]:
    """Plain-text documents of random words, one per file."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_docs):
        path = folder / f"doc{i:03d}.txt"
        path.write_text(" ".join(rng.choice(WORDS) for _ in range(words_per_doc)) + ".\n")
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved Hugging Face folder: 3-layer Llama, width 64, BPE tokenizer of ~300 tokens."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    hf_tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bridge(tiny_model_dir: Path):
    """The tiny model as a frozen TransformerBridge on CPU (shared: tests must not modify it)."""
    import torch

    from sparsify.model_loading import load_tlens_model

    return load_tlens_model(str(tiny_model_dir), torch.device("cpu"))


@pytest.fixture()
def tiny_tokens(tiny_bridge):
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, tiny_bridge.cfg.d_vocab, (2, 12), generator=gen)


def tiny_train_config(model_dir: Path, corpus: Path, tmp_path: Path, **overrides):
    """A valid TrainConfig dict for the tiny model: e2e at blocks.1.hook_resid_pre."""
    cfg = {
        "model_name": str(model_dir),
        "saes": {"sae_positions": ["blocks.1.hook_resid_pre"], "dict_size_to_input_ratio": 2.0},
        "loss": {"sparsity": {"coeff": 0.5}, "logits_kl": {"coeff": 1.0}, "out_to_in": {"coeff": 0.0}},
        "train_data": {"files": [str(corpus / "*.txt")], "split": "all", "n_ctx": 16, "seed": 0},
        "eval_data": {"files": [str(corpus / "*.txt")], "split": "all", "n_ctx": 16, "seed": 1},
        "n_samples": 64,
        "batch_size": 8,
        "lr": 3e-3,
        "eval_n_samples": 16,
        "act_frequency_n_tokens": 256,
        "log_every_n_grad_steps": 2,
        "save_dir": str(tmp_path / "runs"),
        "tensorboard": False,
    }
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def checkpointed_sweep_base(model_dir: Path, corpus: Path, tmp_path: Path) -> dict:
    """A search space's base_config for the tiny model without a loss (each arm sets its own):
    4 optimizer steps of 2 micro-batches, a resume checkpoint after step 2, no log until the end."""
    base = tiny_train_config(
        model_dir, corpus, tmp_path, n_samples=64, batch_size=8, effective_batch_size=16,
        save_every_n_samples=32, log_every_n_grad_steps=100,
    )  # fmt: skip
    del base["loss"]
    return base


PROCESS_TAG = "SPARSIFY_TEST_PROCESS_TAG"
"""A test that starts a sweep in a subprocess tags its environment with this variable, so it
can find (and clean up) exactly the processes it started: the driver and every Ray process."""


def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment carries `PROCESS_TAG=tag`: the driver and every Ray process
    it started (they inherit its environment), and nobody else's."""
    needle = f"{PROCESS_TAG}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def make_trial(tmp_path, monkeypatch):
    """Makes Ray Tune `Trial`s of arm `local` as `Tuner.fit()` creates them: their storage under
    the sweep's `ray_tune/` folder, their driver-side folder (Ray's session folder) under
    `tmp_path`. No Ray cluster needed."""
    from ray.train._internal import storage
    from ray.tune.experiment import Trial

    monkeypatch.setattr(storage, "_get_ray_train_session_dir", lambda: str(tmp_path / "ray_session"))

    def make(trial_id: str, **config) -> Trial:
        context = storage.StorageContext(
            storage_path=str(tmp_path / "sweep" / "ray_tune"), experiment_dir_name="local"
        )
        trial = Trial(
            "run_trial", config={"arm": "local", **config}, trial_id=trial_id, storage=context, stub=True,
            trial_dirname_creator=lambda t: f"local_{t.trial_id}",
        )  # fmt: skip
        trial.init_local_path()
        return trial

    return make


def asha_space(tmp_path: Path, name: str, model_dir: Path, corpus: Path, n_samples: int = 64) -> Path:
    """A search-space file with ASHA: 3 trials of 2 CPUs (the whole machine, to Ray), the last
    two stopped at their first eval (a good trial first sets ASHA's bar; at lr 1e-8 the SAE
    stays at its random init, a CE increase of nats behind), so one leaked placement group
    would block every later trial (ray#54305)."""
    base = tiny_train_config(
        model_dir, corpus, tmp_path / name, n_samples=n_samples, eval_every_n_samples=32, eval_n_samples=8
    )
    del base["loss"]
    space = {
        "name": name,
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 3,
        "resources": {"num_workers": 1, "cpus_per_worker": 2},
        "early_stopping": {"metric": EVAL_CE_LOSS_INCREASE, "grace_period": 1, "reduction_factor": 2},
        "base_config": base,
        "arms": {
            "local": {
                "loss": {"sparsity": {"coeff": 0.1}, "out_to_in": {"coeff": 1.0}},
                "search": {"lr": {"type": "loguniform", "low": 1e-8, "high": 1e-2}},
                "initial_points": [{"lr": 1e-2}, {"lr": 1e-8}, {"lr": 2e-8}],
            }
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path
