"""The tests' tiny model and corpus, as plain functions: the fixtures in conftest.py use them,
and so does `bench/match_vs_tpe.py --tiny`. Nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path

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


def build_tiny_llama(folder: Path) -> Path:
    """Save a Hugging Face folder: 3-layer Llama, width 64, BPE tokenizer of ~300 tokens."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
