"""Read the reference e2e SAE library's YAML run configs unchanged (docs/design.md §12).

A reference config names its model with `tlens_model_name` or `tlens_model_path`, matches
`sae_positions` by substring, writes unused loss terms as null and keeps W&B fields at the top
level. `ReferenceConfig` validates that shape (an unknown field is a one-line error, as in our
own format); `to_train_config` turns it into a `TrainConfig` once the model's hook names are
known. Everything the reference format can say maps onto a field of ours; what cannot be
honoured (TransformerLens-2 checkpoint folders) is a one-line `ConfigError`. Raw text is always
tokenized with the model's own tokenizer: a `tokenizer_name` naming another one is logged as a
warning (the reference's TinyStories configs name `gpt2`, whose vocabulary those models share).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator

from sparsify.config import TrainConfig, validate_config
from sparsify.errors import ConfigError
from sparsify.schema import SAFE_NAME, Seed, StrictModel, read_yaml, validate_model

logger = logging.getLogger(__name__)

REFERENCE_CONFIG_FILE = "final_config.yaml"
"""The resolved config the reference writes next to its `samples_<N>.pt` checkpoints."""

_as_list = BeforeValidator(lambda v: [v] if isinstance(v, str) else v)


def official_model_name(name: str) -> str:
    """A TransformerLens model name or alias as its Hugging Face name, through TransformerLens's
    own alias registry (`gpt2-small` -> `gpt2`, `pythia-14m` -> `EleutherAI/pythia-14m`; case
    does not matter); a name the registry does not know is returned unchanged."""
    from transformer_lens.supported_models import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:  # not a TransformerLens name: a hub name or folder of the user's own
        return name


class RefSparsity(StrictModel):
    coeff: float
    p_norm: float = 1.0


class RefCoeff(StrictModel):
    coeff: float


class RefInToOrig(StrictModel):
    total_coeff: float
    hook_positions: Annotated[list[str], _as_list]


class RefLoss(StrictModel):
    sparsity: RefSparsity
    in_to_orig: RefInToOrig | None = None
    out_to_orig: RefCoeff | None = None
    out_to_in: RefCoeff | None = None
    logits_kl: RefCoeff | None = None


class RefData(StrictModel):
    dataset_name: str
    is_tokenized: bool = True
    tokenizer_name: str
    streaming: bool = True
    split: str
    n_ctx: int
    seed: Seed | None = None
    column_name: str = "input_ids"


class RefSAEs(StrictModel):
    sae_positions: Annotated[list[str], _as_list]
    """Each entry selects every hook name that contains it."""
    dict_size_to_input_ratio: float = 1.0
    pretrained_sae_paths: Annotated[list[str] | None, _as_list] = None
    retrain_saes: bool = False


class ReferenceConfig(StrictModel):
    """A reference training config (run_train_tlens_saes.py's `Config`), field for field."""

    wandb_project: str | None = None
    wandb_run_name: str | None = None
    wandb_run_name_prefix: str = ""
    seed: Seed = 0
    tlens_model_name: str | None = None
    tlens_model_path: str | None = None
    save_dir: str | None = None
    n_samples: int
    save_every_n_samples: int | None = None
    eval_every_n_samples: int | None = None
    eval_n_samples: int | None = None
    batch_size: int
    effective_batch_size: int | None = None
    lr: float
    lr_schedule: str = "cosine"
    min_lr_factor: float = 0.1
    warmup_samples: int = 0
    cooldown_samples: int = 0
    max_grad_norm: float | None = None
    log_every_n_grad_steps: int = 20
    collect_act_frequency_every_n_samples: int = 20_000
    act_frequency_n_tokens: int = 100_000
    loss: RefLoss
    train_data: RefData
    eval_data: RefData | None = None
    saes: RefSAEs

    @property
    def model_name(self) -> str:
        """What our `model_name` field gets: a Hugging Face name or a model folder.

        Raises:
            ConfigError: neither or both model fields, or a TransformerLens-2 checkpoint folder.
        """
        if (self.tlens_model_name is None) == (self.tlens_model_path is None):
            raise ConfigError("exactly one of tlens_model_name, tlens_model_path must be set")
        if self.tlens_model_name is not None:
            return official_model_name(self.tlens_model_name)
        path = Path(str(self.tlens_model_path))
        folder = path if path.is_dir() else path.parent
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"tlens_model_path: {path} is not a Hugging Face model folder (no config.json); "
                "TransformerLens-2 checkpoints cannot load in TransformerLens 4: retrain the model "
                "with `python -m sparsify.models.lm` or export it with save_pretrained"
            )
        return str(folder)


def is_reference_config(raw: dict[str, Any]) -> bool:
    """Whether a YAML mapping is in the reference's format (it names a TransformerLens model)."""
    return "tlens_model_name" in raw or "tlens_model_path" in raw


def read_reference_config(path: str | Path) -> ReferenceConfig:
    """Read and validate a reference YAML run config.

    Raises:
        ConfigError: unreadable file, YAML error, or invalid fields (one line naming the file).
    """
    return validate_model(ReferenceConfig, read_yaml(path), str(path))


def load_reference_config(path: str | Path, device: str = "auto") -> tuple[TrainConfig, Any]:
    """A reference YAML run config as our `TrainConfig`, and the model it names (loaded once:
    its hook names resolve the substring `sae_positions`; pass it on to `train`).

    Raises:
        ConfigError: invalid fields or an unloadable model (one line naming the file).
    """
    from sparsify.model_loading import load_tlens_model, resolve_device

    ref = read_reference_config(path)
    try:
        tlens_model = load_tlens_model(ref.model_name, resolve_device(device))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return to_train_config(ref, list(tlens_model.hook_dict), str(path)), tlens_model


def resolve_positions(patterns: list[str], hook_names: list[str]) -> list[str]:
    """The reference's `filter_names`: every hook name containing any of `patterns`, in the
    model's hook order.

    Raises:
        ConfigError: a pattern that matches no hook.
    """
    for pattern in patterns:
        if not any(pattern in name for name in hook_names):
            raise ConfigError(f"saes.sae_positions: {pattern!r} matches no hook of the model")
    return [name for name in hook_names if any(p in name for p in patterns)]


def to_train_config(ref: ReferenceConfig, hook_names: list[str], source: str) -> TrainConfig:
    """Our `TrainConfig` for a reference config, SAE positions resolved against `hook_names`.

    Raises:
        ConfigError: one line naming `source`, for anything that does not map (see module doc).
    """
    try:
        raw = _to_raw(ref, hook_names)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return validate_config(raw, source)


def _to_raw(ref: ReferenceConfig, hook_names: list[str]) -> dict[str, Any]:
    model_name = ref.model_name
    positions = resolve_positions(ref.saes.sae_positions, hook_names)
    loss = {k: v for k, v in ref.loss.model_dump().items() if v is not None}
    raw: dict[str, Any] = {
        "model_name": model_name,
        "saes": {
            "sae_positions": positions,
            "dict_size_to_input_ratio": ref.saes.dict_size_to_input_ratio,
            "pretrained_sae_paths": ref.saes.pretrained_sae_paths,
            "retrain_saes": ref.saes.retrain_saes,
        },
        "loss": loss,
        "train_data": _data(ref.train_data, model_name, "train_data", default_seed=ref.seed),
        "eval_data": None
        if ref.eval_data is None
        else _data(ref.eval_data, model_name, "eval_data", ref.seed + 1),
        "seed": ref.seed,
        "save_dir": ref.save_dir,
        "wandb_project": ref.wandb_project,
        "collect_act_frequency_every_n_samples": ref.collect_act_frequency_every_n_samples,
    }
    for name in (
        "n_samples", "save_every_n_samples", "eval_every_n_samples", "batch_size",
        "effective_batch_size", "lr", "lr_schedule", "min_lr_factor", "warmup_samples",
        "cooldown_samples", "max_grad_norm", "log_every_n_grad_steps", "act_frequency_n_tokens",
    ):  # fmt: skip
        raw[name] = getattr(ref, name)
    if ref.eval_n_samples is not None:
        raw["eval_n_samples"] = ref.eval_n_samples
    run_name = ref.wandb_run_name
    if run_name is None and ref.wandb_run_name_prefix:
        run_name = ref.wandb_run_name_prefix + _default_name(positions, loss, ref)
    if run_name is not None:
        raw["run_name"] = (
            run_name if re.match(SAFE_NAME, run_name) else re.sub(r"[^A-Za-z0-9_.+=,-]", "_", run_name)
        )
    return raw


def _default_name(positions: list[str], loss: dict[str, Any], ref: ReferenceConfig) -> str:
    """The reference's run name shape: positions, ratio, lr and coefficients."""
    coeffs = "_".join(
        f"{k}{v.get('coeff', v.get('total_coeff'))}" for k, v in loss.items() if isinstance(v, dict)
    )
    return f"{'+'.join(p.replace('.', '-') for p in positions)}_ratio{ref.saes.dict_size_to_input_ratio:g}_lr{ref.lr:g}_{coeffs}"


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log a warning once per process: a sweep maps the same reference config for every trial."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def _data(data: RefData, model_name: str, section: str, default_seed: int) -> dict[str, Any]:
    if not data.is_tokenized and data.tokenizer_name != model_name:
        # the reference tokenizes with `tokenizer_name`; we always use the model's own, which is
        # the same vocabulary in the reference's configs (TinyStories models: GPT-2's)
        _warn_once(
            f"{section}.tokenizer_name: raw text is tokenized with the model's own tokenizer "
            f"({model_name}), not {data.tokenizer_name!r}"
        )
    return {
        "dataset_name": data.dataset_name,
        "is_tokenized": data.is_tokenized,
        "column_name": data.column_name,
        "streaming": data.streaming,
        "split": data.split,
        "n_ctx": data.n_ctx,
        "seed": data.seed if data.seed is not None else default_seed,
    }


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The reference checkpoint with the most samples in a run folder (`samples_<N>.pt`).

    Raises:
        ConfigError: no `.pt` file in the folder.
    """
    run_dir = Path(run_dir)
    found = sorted(run_dir.glob("*.pt"), key=_samples_in_name)
    if not found:
        raise ConfigError(f"{run_dir}: no .pt SAE checkpoint next to {REFERENCE_CONFIG_FILE}")
    return found[-1]


def _samples_in_name(path: Path) -> int:
    """`samples_40000.pt` -> 40000 (the reference's checkpoint names); no number sorts first."""
    numbers = re.findall(r"\d+", path.stem)
    return int(numbers[-1]) if numbers else -1
