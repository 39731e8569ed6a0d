"""The config of a small causal LM trained from scratch (`sparsify.models.lm`): one pydantic model,
read from YAML with one-line errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from sparsify.config import EMBEDDED_MODEL_NAME, DataConfig
from sparsify.schema import SAFE_NAME, Seed, StrictModel, read_yaml, validate_model


class LMTrainConfig(StrictModel):
    architecture: Literal["llama", "gpt2"] = "llama"
    """Hugging Face architecture: `llama` (LlamaForCausalLM) or `gpt2` (GPT2LMHeadModel)."""
    n_layers: int = Field(default=2, gt=0)
    """Transformer blocks; the SAE positions are `blocks.0` ... `blocks.{n_layers-1}`."""
    d_model: int = Field(default=128, gt=0)
    """Residual stream width (the SAE's d_in at `hook_resid_*`)."""
    n_heads: int = Field(default=4, gt=0)
    """Attention heads per block; must divide d_model."""
    d_mlp: int = Field(default=512, gt=0)
    """Hidden width of each block's MLP."""
    tie_embeddings: bool = True
    """Share the token embedding and the unembedding (saves vocab x d_model parameters)."""
    tokenizer: str = EMBEDDED_MODEL_NAME
    """`embedded:SmolLM2-135M-Instruct` (its tokenizer), a local tokenizer or model folder, or a hub name."""
    train_data: DataConfig = DataConfig(embedded="sotu", split="train")
    eval_data: DataConfig = DataConfig(embedded="sotu", split="test", seed=1)
    """Held-out text for the eval CE at the start and the end (and every eval_every_n_samples)."""
    n_ctx: int = Field(default=128, gt=1, validate_default=True)
    """The model's context length (max positions); at least the data's n_ctx."""
    seed: Seed = 0
    """Seeds the weight init (the data order is each data section's own `seed`)."""
    batch_size: int = Field(default=16, gt=0)
    """Sequences per optimizer step."""
    n_samples: int = Field(gt=0)
    """Training sequences (of train_data.n_ctx tokens each); samples past the last whole batch are not used."""
    lr: float = Field(default=1e-3, gt=0)
    """Peak AdamW learning rate."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_factor: float = Field(default=0.1, ge=0, le=1)
    """Final lr as a fraction of lr (cosine/linear)."""
    warmup_samples: int = Field(default=0, ge=0)
    cooldown_samples: int = Field(default=0, ge=0)
    """Samples at the end over which the lr falls linearly to 0."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW decoupled weight decay, on weight matrices and embeddings only (not norms, biases)."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip gradients to this norm; null: no clipping."""
    log_every_n_steps: int = Field(default=10, gt=0)
    """Log the mean train loss over this many optimizer steps."""
    eval_every_n_samples: int | None = Field(default=None, gt=0)
    """Also evaluate during training every N samples; eval always runs at the start and the end."""
    eval_n_samples: int = Field(default=64, gt=0)
    """Held-out sequences for each eval CE."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    save_dir: str | None = "runs"
    """Folder for run outputs; null writes nothing."""
    run_name: str | None = Field(default=None, pattern=SAFE_NAME)
    """Run folder name; default `lm_<architecture>_L<n_layers>_d<d_model>_seed<seed>`."""

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_width(cls, n_heads: int, info: ValidationInfo) -> int:
        d_model = info.data.get("d_model")
        if d_model is not None and d_model % n_heads:
            raise ValueError(f"must divide d_model ({d_model})")
        return n_heads

    @field_validator("n_ctx")
    @classmethod
    def _fits_data(cls, n_ctx: int, info: ValidationInfo) -> int:
        data_ctx = max(
            (d.n_ctx for d in (info.data.get("train_data"), info.data.get("eval_data")) if d), default=0
        )
        if n_ctx < data_ctx:
            raise ValueError(f"must be at least the data's n_ctx ({data_ctx})")
        return n_ctx

    @field_validator("n_samples")
    @classmethod
    def _one_batch(cls, n_samples: int, info: ValidationInfo) -> int:
        if n_samples < info.data.get("batch_size", 0):
            raise ValueError(f"must be at least batch_size ({info.data['batch_size']})")
        return n_samples

    @field_validator("cooldown_samples")
    @classmethod
    def _schedule_fits(cls, cooldown: int, info: ValidationInfo) -> int:
        warmup, n_samples = info.data.get("warmup_samples", 0), info.data.get("n_samples")
        if n_samples is not None and warmup + cooldown > n_samples:
            raise ValueError(
                f"warmup_samples + cooldown_samples ({warmup + cooldown}) exceeds n_samples ({n_samples})"
            )
        return cooldown

    @property
    def n_steps(self) -> int:
        """Optimizer steps (whole batches only)."""
        return self.n_samples // self.batch_size


def load_lm_config(path: str | Path) -> LMTrainConfig:
    """Read and validate an LM training config YAML.

    Raises:
        ConfigError: one line, `file: field: what is allowed`.
    """
    return validate_model(LMTrainConfig, read_yaml(path), str(path))
