"""Benchmark cases shared by our runner and the reference runner, and the FLOP count behind
model FLOPs utilization (MFU). Imports neither torch nor either library: the reference runs in
its own venv (it needs transformer-lens < 4) and reads this file too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Dense bf16 matrix rate of an H200 / H100 SXM by the vendor's datasheet (FLOP/s). MFU is
# quoted against it for every GPU run, so fp32 runs read as the fraction of the chip they use.
H200_BF16_DENSE_PEAK = 989.4e12

ARMS = ("local", "e2e", "e2e_ds")
"""local: sparsity + MSE(out, in); e2e: sparsity + KL; e2e_ds: e2e + MSE at every later
hook_resid_pre (docs/design.md §4). Coefficients do not change the cost of a step."""


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape. `arch` is `llama` (gated MLP, RMSNorm, rotary) or
    `gpt2` (GELU MLP, LayerNorm, learned positions)."""

    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    d_vocab: int
    n_ctx: int

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


SMOLLM2_135M = ModelShape("llama", 30, 576, 9, 3, 1536, 49152, 8192)
GPT2_SMALL = ModelShape("gpt2", 12, 768, 12, 12, 3072, 50257, 1024)


@dataclass(frozen=True)
class Case:
    """One benchmark setting: a model shape, the SAE's layer and size, the batch, the device."""

    name: str
    shape: ModelShape
    sae_layer: int
    """The SAE reads `blocks.{sae_layer}.hook_resid_pre`."""
    dict_size_to_input_ratio: float
    batch_size: int
    seq_len: int
    device: str
    embedded_weights: bool = False
    """Ours loads the embedded SmolLM2 weights; otherwise (and always for the reference) random
    weights of the same shape: the cost of a step does not depend on the values."""

    @property
    def sae_position(self) -> str:
        return f"blocks.{self.sae_layer}.hook_resid_pre"

    @property
    def n_dict(self) -> int:
        return int(self.dict_size_to_input_ratio * self.shape.d_model)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def later_resid_pre(self) -> list[str]:
        return [f"blocks.{n}.hook_resid_pre" for n in range(self.sae_layer + 1, self.shape.n_layers)]

    def describe(self) -> dict:
        return {**asdict(self), "n_dict": self.n_dict, "tokens_per_step": self.tokens_per_step}


CASES = {
    case.name: case
    for case in (
        # (a) the embedded model on CPU; the paper's dictionary ratio (60) would make the SAE
        # dominate a CPU step, so a mid-size one
        Case("smollm2-cpu", SMOLLM2_135M, 15, 16.0, 8, 128, "cpu", embedded_weights=True),
        # (b) the paper's GPT-2 small setting (layer 6, dictionary 60 x 768) on one GPU
        Case("gpt2-small-gpu", GPT2_SMALL, 6, 60.0, 16, 1024, "cuda"),
        # a tiny smoke case so the runners can be checked anywhere in seconds
        Case("tiny-cpu", ModelShape("gpt2", 4, 64, 4, 4, 256, 1000, 128), 2, 4.0, 4, 64, "cpu"),
    )
}


def layer_forward_flops(shape: ModelShape, seq_len: int) -> float:
    """FLOPs per token of one block's forward: 2 per weight (matmuls) plus causal attention
    scores and mixing (QK^T and AV over on average seq_len / 2 keys: 2 * 2 * seq_len/2 * d)."""
    d, dh = shape.d_model, shape.d_head
    attn_weights = d * shape.n_heads * dh * 2 + d * shape.n_kv_heads * dh * 2  # q, o and k, v
    mlp_weights = (3 if shape.arch == "llama" else 2) * d * shape.d_mlp
    return 2 * (attn_weights + mlp_weights) + 2 * seq_len * shape.n_heads * dh


def step_flops(case: Case, arm: str) -> float:
    """Model FLOPs of one training step: the work the arm needs, counted once.

    local: blocks before the SAE, forward only; e2e / e2e_ds: the original model's full forward,
    the SAE model's forward from the SAE's block, and the backward of that part for input
    gradients only (frozen weights: about one forward). Every arm adds the SAE's forward and
    backward (3 x forward, encoder and decoder). Softmax, norms and the KL are left out.
    """
    shape, tokens = case.shape, case.tokens_per_step
    layer = layer_forward_flops(shape, case.seq_len)
    unembed = 2 * shape.d_model * shape.d_vocab
    sae_train = 3 * 2 * 2 * shape.d_model * case.n_dict
    if arm == "local":
        per_token = case.sae_layer * layer + sae_train
    else:
        downstream = (shape.n_layers - case.sae_layer) * layer + unembed
        per_token = (shape.n_layers * layer + unembed) + 2 * downstream + sae_train
    return per_token * tokens
