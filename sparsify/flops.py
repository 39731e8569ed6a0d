"""What a training run costs in FLOPs, counted from shapes, not measured (docs/design.md §14).

Rules (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", arXiv 2001.08361, §2.1,
the usual counting convention; one multiply-add = 2 FLOPs):

- A linear layer `in -> out` costs `2·in·out` FLOPs per token forward. Its backward costs
  `4·in·out` when its weights train (input gradient + weight gradient) and `2·in·out` when only
  the input gradient is needed (the frozen LM between an SAE and the loss).
- Attention adds, per token per layer, `2·n_ctx·(n_heads·d_head)` for the scores `Q·Kᵀ` and as
  much for the weighted sum `A·V`: `4·n_ctx·n_heads·d_head` forward (`= 4·n_ctx·d_model` when
  `n_heads·d_head = d_model`). The full `n_ctx`, not the causal half, as in Kaplan et al.
  Backward through them needs the gradient of both operands (both are activations), so it
  costs twice the forward: `8·n_ctx·n_heads·d_head`.

So one transformer block, per token (`d_q = n_heads·d_head`, `d_kv = n_key_value_heads·d_head`,
smaller than `d_q` with grouped-query attention; `m` = 3 weight matrices of d_model x d_mlp
for a gated MLP (Llama, SmolLM2), 2 otherwise)::

    block_forward = 2·d_model·d_q + 2·(2·d_model·d_kv) + 2·d_q·d_model   [W_Q, W_K, W_V, W_O]
                  + 4·n_ctx·d_q                                          [scores, weighted sum]
                  + m·2·d_model·d_mlp                                    [MLP]
    block_input_grad = block_forward + 4·n_ctx·d_q                       [linears 1x, attention 2x]
    unembed_forward = unembed_input_grad = 2·d_model·d_vocab

The embedding is a lookup (0 FLOPs); norms, nonlinearities, softmaxes, residual adds and the
loss terms are O(d_model) or O(d_vocab) per token and are left out. One SAE (d_in -> n_dict ->
d_in; encoder and decoder matmuls, weights train), per token it reads::

    sae_forward = 2·d_in·n_dict + 2·n_dict·d_in = 4·d_in·n_dict          (= S)
    sae_backward = 8·d_in·n_dict (trained: 2S); 4·d_in·n_dict (frozen, in the gradient's path)

One training sequence of `n_ctx` tokens costs (`train_flops_per_sequence`), with F(a..b) the
forward of blocks a..b-1 for n_ctx tokens (the unembedding added when the run goes to the
logits), L the first block of the SAE forward and E where the run stops (`stop_at_layer`, or
the end)::

    original forward   F(0..E)   when the loss needs the original model
    spliced forward    F(K..E)   K = the first SAE's block when the forward resumes from the
                                 original residual there (`SAETransformer.resume_hook`), else 0
    backward           the input-gradient backward of the blocks from the first trained SAE to
                       the last place the loss reads (the logits for logits_kl; the last
                       in_to_orig hook; a later SAE), 0 for a local loss with one SAE
    SAEs               3S per SAE per token it reads (n_ctx - 1 with skip_first_position)

The decoder normalization and Adam are per parameter, not per token, and are left out, as are
the data-mean decoder-bias init (one batch's forward) and the resume probe. Eval FLOPs are not
training FLOPs: held-out evals (periodic and final) are not counted.

Activation cache (`sparsify.training.activation_cache`): a cached local run does not run the
model per step; its FLOPs still count the model forward up to the SAE per training token, as a
fresh run pays it, so local and e2e arms are compared on what a fresh run costs. That part is
also reported on its own (`metric_names.COST_CACHED_MODEL_FLOPS`), so what the run itself
computed is `train_flops - cached_model_flops`.

Pure functions of shapes: nothing here imports torch; `training_flops_per_sequence` reads the
shapes off a built model and loss plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sparsify.hooks import block_index

if TYPE_CHECKING:
    from sparsify.sae_transformer import SAETransformer
    from sparsify.training.objective import LossPlan


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a decoder-only transformer that its FLOPs depend on."""

    d_model: int
    n_layers: int
    d_mlp: int
    n_heads: int
    d_head: int
    d_vocab: int
    n_key_value_heads: int | None = None
    """Key/value heads under grouped-query attention; None: as many as `n_heads`."""
    mlp_matrices: int = 2
    """Weight matrices of d_model x d_mlp in the MLP: 3 when gated (Llama), else 2."""

    @classmethod
    def from_tlens_cfg(cls, cfg: Any) -> ModelShape:
        """The shapes of a TransformerLens (or TransformerBridge) config: `d_model`, `d_mlp`,
        `n_layers`, `n_heads`, `d_head`, `d_vocab`, `n_key_value_heads` (GQA; None: n_heads),
        and `gated_mlp` or `act_fn` ("silu"/"swiglu"-style gates) for the MLP's matrices."""
        gated = getattr(cfg, "gated_mlp", None)
        if gated is None:  # a config without the field: Llama-style activations come gated
            gated = str(getattr(cfg, "act_fn", "") or "").lower() in ("silu", "swiglu", "geglu", "swish")
        n_kv = getattr(cfg, "n_key_value_heads", None)
        d_vocab_out = getattr(cfg, "d_vocab_out", None)
        return cls(
            d_model=int(cfg.d_model),
            n_layers=int(cfg.n_layers),
            d_mlp=int(cfg.d_mlp or 0),
            n_heads=int(cfg.n_heads),
            d_head=int(cfg.d_head),
            d_vocab=int(d_vocab_out) if d_vocab_out and d_vocab_out > 0 else int(cfg.d_vocab),
            n_key_value_heads=int(n_kv) if n_kv else None,
            mlp_matrices=3 if bool(gated) else 2,
        )

    @property
    def d_q(self) -> int:
        return self.n_heads * self.d_head

    @property
    def d_kv(self) -> int:
        return (self.n_key_value_heads or self.n_heads) * self.d_head


@dataclass(frozen=True)
class SAEShape:
    """One SAE: its width, dictionary size, the blocks its position sits between, and whether it
    trains (pretrained SAEs without `retrain_saes` do not)."""

    d_in: int
    n_dict: int
    layer: int
    """The first block downstream of its position: K for `blocks.K.hook_resid_pre`, K + 1 for
    `blocks.K.hook_resid_post`, K for other hooks inside block K (block K then counts fully)."""
    trains: bool = True


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one training sequence, by part (their sum: `total`)."""

    original_forward: int
    """The original model's forward (the part before the first SAE, too, when the spliced
    forward resumes from it)."""
    spliced_forward: int
    """The model forward with the SAEs spliced in, without the SAEs themselves."""
    model_backward: int
    """The input-gradient backward through the frozen model, from the loss to the first
    trained SAE."""
    sae: int
    """Every SAE's forward and backward."""

    @property
    def total(self) -> int:
        return self.original_forward + self.spliced_forward + self.model_backward + self.sae


def linear_flops(d_in: int, d_out: int) -> int:
    """Forward FLOPs of one `d_in -> d_out` matmul, per token: `2·d_in·d_out`."""
    return 2 * d_in * d_out


def block_forward_flops(shape: ModelShape, n_ctx: int) -> int:
    """Forward FLOPs of one transformer block, per token, at sequence length `n_ctx`."""
    projections = linear_flops(shape.d_model, shape.d_q) + 2 * linear_flops(shape.d_model, shape.d_kv)
    projections += linear_flops(shape.d_q, shape.d_model)
    attention = 4 * n_ctx * shape.d_q
    mlp = shape.mlp_matrices * linear_flops(shape.d_model, shape.d_mlp)
    return projections + attention + mlp


def block_input_grad_flops(shape: ModelShape, n_ctx: int) -> int:
    """Backward FLOPs of one frozen block (input gradient only), per token: its linears cost as
    much as forward, its attention scores and weighted sum twice as much."""
    return block_forward_flops(shape, n_ctx) + 4 * n_ctx * shape.d_q


def unembed_flops(shape: ModelShape) -> int:
    """Forward FLOPs of the unembedding, per token (its input-gradient backward costs the same)."""
    return linear_flops(shape.d_model, shape.d_vocab)


def model_forward_flops(shape: ModelShape, n_ctx: int, start: int, stop: int | None) -> int:
    """Forward FLOPs of one sequence of `n_ctx` tokens through blocks `start..stop-1` (`stop`
    None: every block from `start`, then the unembedding)."""
    end = shape.n_layers if stop is None else min(stop, shape.n_layers)
    per_token = max(end - start, 0) * block_forward_flops(shape, n_ctx)
    if stop is None:
        per_token += unembed_flops(shape)
    return n_ctx * per_token


def model_backward_flops(shape: ModelShape, n_ctx: int, start: int, stop: int, unembed: bool) -> int:
    """Input-gradient backward FLOPs of one sequence through blocks `start..stop-1` (and the
    unembedding when `unembed`)."""
    per_token = max(min(stop, shape.n_layers) - start, 0) * block_input_grad_flops(shape, n_ctx)
    if unembed:
        per_token += unembed_flops(shape)
    return n_ctx * per_token


def sae_flops(sae: SAEShape, n_tokens: int, backward: bool) -> int:
    """One SAE's FLOPs over `n_tokens`: forward `4·d_in·n_dict` per token; backward
    `8·d_in·n_dict` when it trains, `4·d_in·n_dict` when frozen but in the gradient's path
    (`backward`), else 0."""
    forward = 2 * linear_flops(sae.d_in, sae.n_dict)
    if sae.trains:
        return n_tokens * 3 * forward
    return n_tokens * (2 * forward if backward else forward)


def train_flops_per_sequence(
    shape: ModelShape,
    saes: Sequence[SAEShape],
    n_ctx: int,
    *,
    runs_original: bool,
    stop_layer: int | None,
    resume_layer: int | None = None,
    backward_to: int = 0,
    backward_unembed: bool = False,
    first_position: int = 0,
) -> FlopCount:
    """FLOPs of training on one sequence of `n_ctx` tokens (the module docstring's formula).

    Args:
        shape: the model's shapes.
        saes: every SAE, in forward order.
        n_ctx: tokens per sequence.
        runs_original: the loss needs the original model (`LossConfig.needs_original_model`).
        stop_layer: where both forwards stop (`LossPlan.stop_at_layer`; None: at the logits).
        resume_layer: the block the spliced forward resumes at (`LossPlan.resume_hook`'s), or
            None when it runs from the embedding.
        backward_to: the gradient starts at the output of block `backward_to - 1` ...
        backward_unembed: ... or at the logits (then through every block after the first SAE).
        first_position: 1 with `skip_first_position` (the SAEs read n_ctx - 1 tokens).

    Returns:
        The count by part, FLOPs per sequence.
    """
    original = model_forward_flops(shape, n_ctx, 0, stop_layer) if runs_original else 0
    spliced = model_forward_flops(shape, n_ctx, resume_layer or 0, stop_layer)
    trained = [sae.layer for sae in saes if sae.trains]
    backward, grad_from = 0, None
    if trained:
        grad_from = min(trained)
        stop = shape.n_layers if backward_unembed else backward_to
        backward = model_backward_flops(shape, n_ctx, grad_from, stop, backward_unembed)
    sae_tokens = n_ctx - first_position
    in_grad_path = [grad_from is not None and sae.layer > grad_from for sae in saes]
    sae_total = sum(sae_flops(sae, sae_tokens, path) for sae, path in zip(saes, in_grad_path, strict=True))
    return FlopCount(original, spliced, backward, sae_total)


def _downstream_layer(hook: str, n_layers: int) -> int:
    """The first block after `hook` (see `SAEShape.layer`); hooks outside the blocks: the end."""
    layer = block_index(hook)
    if layer is None:
        return n_layers
    return layer + 1 if hook.endswith("hook_resid_post") else layer


def _reads_until(hook: str, n_layers: int) -> int:
    """The block a gradient from `hook` starts after: K for `blocks.K.hook_resid_pre`, K + 1 for
    other hooks of block K, every block for hooks outside the blocks."""
    layer = block_index(hook)
    if layer is None:
        return n_layers
    return layer if hook.endswith("hook_resid_pre") else layer + 1


def training_flops_per_sequence(model: SAETransformer, plan: LossPlan, n_ctx: int) -> FlopCount:
    """`train_flops_per_sequence` for a built model and its loss plan
    (`sparsify.training.objective.make_loss_plan`): shapes from `model.tlens_model.cfg` and the
    SAEs, where to stop and resume from the plan, where the gradient starts from its terms.

    A cached run (`activation_cache`) is counted as this fresh run would be (its
    `spliced_forward` is what the cache served)."""
    shape = ModelShape.from_tlens_cfg(model.tlens_model.cfg)
    n_layers = shape.n_layers
    saes = [
        SAEShape(
            model.sae(name).d_in,
            model.sae(name).n_dict,
            _downstream_layer(name, n_layers),
            trains=any(p.requires_grad for p in model.sae(name).parameters()),
        )
        for name in plan.sae_positions
    ]
    loss = plan.loss
    # a later SAE's input (its sparsity and reconstruction terms) depends on the earlier SAEs
    read_at = list(plan.sae_positions[1:])
    if loss.in_to_orig is not None:
        read_at += plan.in_to_orig_hooks
    backward_to = max((_reads_until(hook, n_layers) for hook in read_at), default=0)
    resume = block_index(plan.resume_hook) if plan.resume_hook else None
    return train_flops_per_sequence(
        shape,
        saes,
        n_ctx,
        runs_original=loss.needs_original_model,
        stop_layer=plan.stop_at_layer,
        resume_layer=resume,
        backward_to=backward_to,
        backward_unembed=loss.logits_kl is not None,
        first_position=plan.first_position,
    )
