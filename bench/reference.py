"""Time one training step of the reference implementation, `e2e-sae` 2.1.1, on our cases.

Runs in the reference's own venv (it needs transformer-lens < 4; see bench/README.md):

    /path/to/ref-venv/bin/python -m bench.reference --case gpt2-small-gpu

The step is the body of the reference's `run_train_tlens_saes.train` loop on a non-logging
step: `forward_raw` (stopping after the SAE's block for local runs), `forward` (through the
whole model for e2e, on the cached activations for local), `calc_loss`, backward, gradient
clipping, Adam. The model is a `HookedTransformer` of the case's shape with random weights, in
float32 (the reference has no mixed-precision option).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any

import torch

from bench.cases import ARMS, CASES, Case
from bench.timing import emit, record, release, time_steps


def hooked_transformer(case: Case) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    shape = case.shape
    common = dict(
        n_layers=shape.n_layers, d_model=shape.d_model, n_ctx=shape.n_ctx, d_head=shape.d_head,
        n_heads=shape.n_heads, d_mlp=shape.d_mlp, d_vocab=shape.d_vocab, device=case.device, seed=0,
    )  # fmt: skip
    if shape.arch == "llama":
        cfg = HookedTransformerConfig(
            **common, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
            rotary_dim=shape.d_head, gated_mlp=True, n_key_value_heads=shape.n_kv_heads, final_rms=True,
        )  # fmt: skip
    else:
        cfg = HookedTransformerConfig(**common, act_fn="gelu_new", normalization_type="LN")
    return HookedTransformer(cfg).to(case.device).eval()


def stub_missing_reference_modules() -> None:
    """Stand-ins for modules the reference imports but this benchmark never uses.

    e2e-sae 2.1.1 on PyPI ships without `e2e_sae/scripts/train_tlens/`, which its loader imports
    (for `HookedTransformerPreConfig`, used only to load custom models from a path). It also
    imports wandb at module level, which the offline GPU machine does not have; logging is off.
    """
    try:
        import wandb  # noqa: F401
    except ModuleNotFoundError:
        for name in ("wandb", "wandb.apis", "wandb.apis.public"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["wandb.apis.public"].Run = object  # type: ignore[attr-defined]
    try:
        import e2e_sae.scripts.train_tlens.run_train_tlens  # noqa: F401
    except ModuleNotFoundError:
        stub = types.ModuleType("e2e_sae.scripts.train_tlens.run_train_tlens")
        stub.HookedTransformerPreConfig = object  # type: ignore[attr-defined]
        sys.modules["e2e_sae.scripts.train_tlens"] = types.ModuleType("e2e_sae.scripts.train_tlens")
        sys.modules[stub.__name__] = stub


def time_arm(case: Case, arm: str, tlens_model: Any, warmup: int, steps: int) -> dict:
    stub_missing_reference_modules()
    from e2e_sae.losses import InToOrigLoss, LogitsKLLoss, LossConfigs, OutToInLoss, SparsityLoss, calc_loss
    from e2e_sae.models.transformers import SAETransformer

    torch.manual_seed(0)
    model = SAETransformer(tlens_model, [case.sae_position], case.dict_size_to_input_ratio)
    model.saes.to(case.device)
    for name, param in model.named_parameters():  # as the reference's train() does
        param.requires_grad = name.startswith("saes.")
    optimizer = torch.optim.Adam(model.saes.parameters(), lr=1e-4)
    cache_positions = case.later_resid_pre() if arm == "e2e_ds" else None
    loss_configs = LossConfigs(
        sparsity=SparsityLoss(coeff=1.0),
        out_to_in=OutToInLoss(coeff=1.0) if arm == "local" else None,
        logits_kl=LogitsKLLoss(coeff=1.0) if arm != "local" else None,
        in_to_orig=InToOrigLoss(total_coeff=1.0, hook_positions=cache_positions) if cache_positions else None,
        out_to_orig=None,
    )
    is_local = arm == "local"
    final_layer = case.sae_layer + 1 if is_local else None

    def step(tokens: torch.Tensor, index: int) -> None:
        orig_logits, orig_acts = model.forward_raw(
            tokens=tokens,
            run_entire_model=not is_local,
            final_layer=final_layer,
            cache_positions=cache_positions,
        )
        new_logits, new_acts = model.forward(
            tokens=tokens,
            sae_positions=model.raw_sae_positions,
            cache_positions=cache_positions,
            orig_acts=orig_acts if is_local else None,
        )
        loss, _ = calc_loss(
            orig_acts=orig_acts,
            new_acts=new_acts,
            orig_logits=None if new_logits is None else orig_logits.detach().clone(),
            new_logits=new_logits,
            loss_configs=loss_configs,
            is_log_step=False,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.saes.parameters(), 10.0).item()
        optimizer.step()
        optimizer.zero_grad()

    times = time_steps(step, case, warmup, steps)
    return record("reference e2e-sae 2.1.1", case, arm, "float32", times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, help="append JSON lines here (also printed)")
    args = parser.parse_args(argv)
    case = CASES[args.case]
    tlens_model = hooked_transformer(case)
    for arm in args.arms:
        emit(time_arm(case, arm, tlens_model, args.warmup, args.steps), args.out)
        release(torch.device(case.device))


if __name__ == "__main__":
    sys.exit(main())
