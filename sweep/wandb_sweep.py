"""The reference library's W&B sweep files, run unchanged as a one-arm grid (docs/design.md §12).

A W&B sweep file (`e2e_sae/scripts/train_tlens_saes/*_sweep.yaml` in the reference) says
`method: grid`, nested `parameters` (a section's fields under `parameters:`, a leaf as
`values: [...]` or `value: ...`) and a `command` whose last YAML entry is the reference run
config every run starts from. `load_search_space` recognises one (it has `method` and
`parameters` and no `arms`) and `wandb_sweep_space` turns it into a `LoadedSpace`:

- one arm, named after the sweep's `name` (made a `SAFE_NAME`); the sweep (its results folder)
  is named after the file, so sweep files that share a `name` keep apart;
- base config: the run config `command` names, resolved against the current directory, then
  every folder from the sweep file's up (`<ancestor>/<command path>`, as the reference's files
  name them from the repository root), then next to the sweep file by its basename;
- each leaf with several values is searched as a `categorical` over exactly those values (a
  `values` list of N entries is N grid values, lists included: `values: [[a, b]]` is one value,
  the list `[a, b]`); a leaf with one value is set (`values: [null]` on a loss term removes it),
  merged into the run config as the reference merges W&B's config (a mapping into a mapping);
- `sampler: grid` (Optuna's grid sampler), `num_samples` = the grid size; when nothing varies,
  the one point is `seed` searched over its one value.

Trial configs are the run config with the sweep's values merged in, validated and mapped as
`python -m sparsify.train` reads a reference config (`sparsify.compat`): the `sae_positions`
substrings stay as written until `resolve_sae_positions` has the model's hook names (a real
sweep, before its trials; --dry-run loads no model and downloads nothing).

Ignored: `program` (the trials run `sparsify`), `metric` (the objectives are the sweep's eval
metrics, by default eval L0 and CE-loss increase, both minimized; W&B's `val_loss` has no
counterpart), `description`, `project`, `entity`. What cannot be honoured is a one-line
`ConfigError` naming the file and field: `method` random or bayes, parameter distributions
(`min`/`max`/`distribution` ...), `early_terminate`, `run_cap`, a `command` without a YAML run
config. Also decided here: repeated values of one leaf run once (the same seed would train the
same SAE twice); a run config without `eval_data` is evaluated on its `train_data` stream with
the next seed (the objectives are eval metrics), with a warning; strings YAML 1.1 leaves
unparsed (`5e-4`) are numbers, as in YAML 1.2; each trial gets one GPU when the machine running
the sweep has one or `RAY_ADDRESS` names a cluster, and as many run at once as there are local
GPUs (one W&B agent per GPU).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from sparsify import (
    SAFE_NAME,
    ConfigError,
    SparsifyError,
    TrainConfig,
    read_yaml,
    validate_config,
    validate_model,
)
from sparsify.compat import ReferenceConfig, is_reference_config, to_train_config
from sweep.space import Arm, Distribution, LoadedSpace, Resources, SearchSpace

logger = logging.getLogger(__name__)

IGNORED_KEYS = ("program", "metric", "description", "project", "entity")
"""Top-level keys of a W&B sweep that mean nothing here (see the module docstring)."""
REFUSED_KEYS = {
    "early_terminate": "W&B's early termination (hyperband) is not run here; use a native search "
    "space with early_stopping (ASHA, docs/design.md §7)",
    "run_cap": "pass --num-samples N to run part of the grid",
}
LEAF_KEYS = ("values", "value", "parameters")
_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d[\d_]*(\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$")


def is_wandb_sweep(raw: Any) -> bool:
    """Whether a YAML mapping is a W&B sweep file (rather than a native search space)."""
    return isinstance(raw, dict) and "arms" not in raw and {"method", "parameters"} <= set(raw)


class WandbSweepSpace(LoadedSpace):
    """A W&B sweep file as a one-arm grid over its run config (build with `wandb_sweep_space`)."""

    def __init__(
        self, space: SearchSpace, base: dict[str, Any], source: str, run_config: Path, encoded: set[str]
    ):
        super().__init__(space, base, source)
        self.run_config = run_config
        self.encoded = encoded
        """Searched paths whose values are lists or mappings, searched as their JSON text
        (Optuna's choices are scalars) and decoded into the trial config."""
        self.hook_names: dict[str, list[str]] = {}
        """Hook names of each model, once loaded (`resolve_sae_positions`)."""

    @property
    def reference_format(self) -> bool:
        return is_reference_config(self.base)

    def trial_config(self, arm_name: str, params: dict[str, Any]) -> TrainConfig:
        """The run config with the sweep's fixed values and `params` merged in, as a TrainConfig.

        Raises:
            ConfigError: naming the sweep file, the arm and the field.
        """
        arm = self.space.arms[arm_name]
        decoded = {path: json.loads(v) if path in self.encoded else v for path, v in params.items()}
        tree = copy.deepcopy(self.base)
        tree["loss"] = copy.deepcopy(arm.loss)
        for path, value in {**arm.set, **decoded}.items():
            merge_dotted(tree, path, value)
        source = f"{self.source}: arms.{arm_name} (run config {self.run_config.name})"
        if not self.reference_format:
            return validate_config(tree, source)
        eval_on_train_stream(tree)
        ref = validate_model(ReferenceConfig, tree, source)
        try:
            model_name = ref.model_name
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        # without the model's hook names (a dry run), the substrings stand for themselves
        return to_train_config(ref, self.hook_names.get(model_name, ref.saes.sae_positions), source)


def merge_dotted(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set `path` (`a.b.c`) in `tree`, merging a mapping into a mapping already there (the
    reference applies W&B's config with a deep update)."""
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        for key, item in value.items():
            merge_dotted(node[leaf], key, copy.deepcopy(item))
    else:
        node[leaf] = copy.deepcopy(value)


def eval_on_train_stream(tree: dict[str, Any]) -> None:
    """A reference config without `eval_data` evaluates on its `train_data` stream with the
    next seed (the sweep's objectives are eval metrics)."""
    train = tree.get("train_data")
    if tree.get("eval_data") is not None or not isinstance(train, dict):
        return
    seed = train.get("seed")
    seed = tree.get("seed", 0) if seed is None else seed
    if isinstance(seed, int) and not isinstance(seed, bool):
        tree["eval_data"] = {**train, "seed": (seed + 1) % 2**32}


def safe_name(name: str) -> str:
    """`name` as a folder name (`SAFE_NAME`): other characters become `_`."""
    safe = re.sub(r"[^A-Za-z0-9_.+=,-]", "_", name.strip())
    safe = re.sub(r"^\.", "_", safe) or "sweep"
    assert re.match(SAFE_NAME, safe)
    return safe


def find_run_config(path: Path, command: Any) -> Path:
    """The YAML run config the sweep's `command` names (its last `.yaml`/`.yml` entry).

    Raises:
        ConfigError: no such entry, or no such file (naming the places looked in).
    """
    entries = command if isinstance(command, list) else []
    named = [e for e in entries if isinstance(e, str) and e.endswith((".yaml", ".yml")) and "${" not in e]
    if not named:
        raise ConfigError(
            f"{path}: command: names no YAML run config (its last entry should be one, e.g. "
            f"e2e_sae/scripts/train_tlens_saes/gpt2_e2e.yaml); got {command!r}"
        )
    wanted = Path(named[-1]).expanduser()
    folder = path.resolve().parent
    candidates = [
        wanted,
        *(ancestor / wanted for ancestor in (folder, *folder.parents)),
        folder / wanted.name,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"{path}: command: run config {named[-1]} not found in the current directory, under any "
        f"folder above the sweep file, or next to it"
    )


def yaml12_number(value: Any) -> Any:
    """A string that YAML 1.1 left unparsed but YAML 1.2 reads as a float (`5e-4`), as a float."""
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value):
        return float(value.replace("_", ""))
    return value


def grid_leaves(parameters: Any, path: Path, prefix: str = "") -> dict[str, list[Any]]:
    """Every leaf of a sweep's nested `parameters`, by dotted path, with its grid values.

    Raises:
        ConfigError: a leaf that is not `values: [...]`, `value: ...` or `parameters: {...}`.
    """
    if not isinstance(parameters, dict) or not parameters:
        where = f"parameters.{prefix.rstrip('.')}" if prefix else "parameters"
        raise ConfigError(f"{path}: {where}: expected a mapping of parameter names")
    leaves: dict[str, list[Any]] = {}
    for name, spec in parameters.items():
        dotted = f"{prefix}{name}"
        where = f"{path}: parameters: {dotted}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected values: [...], value: ... or parameters: {{...}}")
        keys = set(spec)
        if spec.get("distribution") == "categorical" and "values" in spec:
            keys.discard("distribution")  # W&B's explicit spelling of a list of values
        other = sorted(keys - set(LEAF_KEYS))
        if other:
            raise ConfigError(
                f"{where}: {', '.join(other)}: W&B distributions need a random or Bayesian search, "
                "which does not run here; list the grid's values, or use a native search space "
                "with sampler: tpe (docs/design.md §7)"
            )
        given = [key for key in LEAF_KEYS if key in spec]
        if len(given) != 1:
            raise ConfigError(
                f"{where}: needs exactly one of values, value, parameters (got {', '.join(given) or 'none'})"
            )
        if "parameters" in spec:
            leaves.update(grid_leaves(spec["parameters"], path, f"{dotted}."))
        elif "value" in spec:
            leaves[dotted] = [yaml12_number(spec["value"])]
        else:
            values = spec["values"]
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: values: expected a non-empty list")
            leaves[dotted] = distinct([yaml12_number(v) for v in values], where)
    return leaves


def distinct(values: list[Any], where: str) -> list[Any]:
    """`values` without repeats (1 and 1.0 are one value; True and 1 are two), warning once."""
    kept: dict[str, Any] = {}
    for value in values:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        kept.setdefault(json.dumps(float(value) if number else value, sort_keys=True, default=str), value)
    if len(kept) < len(values):
        logger.warning(
            "%s: values repeated in the grid run once (%s)", where, ", ".join(map(str, kept.values()))
        )
    return list(kept.values())


def check_top_level(path: Path, raw: dict[str, Any]) -> None:
    """Raises ConfigError for a sweep setting that cannot be honoured here."""
    method = raw.get("method")
    if method in ("random", "bayes"):
        raise ConfigError(
            f"{path}: method: {method} is not run here (only W&B's grid); for a sampled search "
            "write a native search space with sampler: tpe (docs/design.md §7)"
        )
    if method != "grid":
        raise ConfigError(f"{path}: method: must be grid (got {method!r})")
    for key in raw:
        if key in REFUSED_KEYS:
            raise ConfigError(f"{path}: {key}: cannot be honoured here; {REFUSED_KEYS[key]}")
        if key not in (*IGNORED_KEYS, "name", "method", "parameters", "command"):
            raise ConfigError(
                f"{path}: {key}: not a W&B sweep setting this reads (method, parameters, command, "
                f"name; ignored: {', '.join(IGNORED_KEYS)})"
            )


def sweep_resources() -> tuple[Resources, int]:
    """One GPU per trial when this machine has one or RAY_ADDRESS names a cluster (else CPU),
    and how many trials run at once: one per local GPU, at least one."""
    import torch

    gpus = torch.cuda.device_count()
    cluster = os.environ.get("RAY_ADDRESS", "local") not in ("", "local")
    return Resources(gpus_per_worker=1 if gpus or cluster else 0), max(1, gpus)


def wandb_sweep_space(path: Path, raw: dict[str, Any]) -> WandbSweepSpace:
    """A W&B sweep file as a validated one-arm grid (see the module docstring).

    Raises:
        ConfigError: one line naming the file and field, for what cannot be honoured.
    """
    check_top_level(path, raw)
    run_config = find_run_config(path, raw.get("command"))
    try:
        base = read_yaml(run_config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: command: {exc}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: command: {run_config} is not a mapping of config fields")
    leaves = grid_leaves(raw["parameters"], path)
    searched = {p: values for p, values in leaves.items() if len(values) > 1}
    fixed = {p: values[0] for p, values in leaves.items() if len(values) == 1}
    if not searched:  # a grid of one point: Optuna needs something to search
        seed = fixed.pop("seed", base.get("seed", 0))
        searched = {"seed": [seed]}
    encoded = {p for p, values in searched.items() if any(isinstance(v, (list, dict)) for v in values)}
    for p in encoded:
        searched[p] = [json.dumps(v, default=str) for v in searched[p]]
    search = {p: Distribution(type="categorical", values=values) for p, values in searched.items()}
    arm_name = safe_name(str(raw.get("name") or path.stem))
    arm = validate_model(
        Arm, {"loss": base.get("loss") or {}, "set": fixed, "search": search}, f"{path}: parameters"
    )
    resources, concurrent = sweep_resources()
    space = validate_model(
        SearchSpace,
        {
            "name": safe_name(path.stem),
            "base_config": os.path.relpath(run_config, path.resolve().parent),
            "arms": {arm_name: arm},
            "num_samples": math.prod(len(values) for values in searched.values()),
            "sampler": "grid",
            "resources": resources,
            "max_concurrent_trials": concurrent,
        },
        str(path),
    )
    loaded = WandbSweepSpace(space, base, str(path), run_config, encoded)
    ignored = [key for key in IGNORED_KEYS if key in raw]
    if ignored:
        logger.info(
            "%s: %s ignored: the sweep's objectives are %s",
            path,
            ", ".join(ignored),
            ", ".join(space.metrics),
        )
    if (
        loaded.reference_format
        and base.get("eval_data") is None
        and not any(p.split(".")[0] == "eval_data" for p in leaves)
    ):
        logger.warning(
            "%s: run config %s has no eval_data: trials evaluate on its train_data stream with the next seed",
            path,
            run_config.name,
        )
    return loaded


def resolve_sae_positions(loaded: LoadedSpace, models: dict[str, Any]) -> None:
    """Before a real sweep's checks: load each model a W&B sweep's reference run config names
    (on CPU, into `models`, which `sweep.run` reuses) so that its trials select the hooks the
    `sae_positions` substrings match, as the reference does. Anything else: nothing to do.

    Raises:
        ConfigError: a model that cannot be loaded (naming the sweep file).
    """
    if not isinstance(loaded, WandbSweepSpace) or not loaded.reference_format:
        return
    import torch

    from sparsify.model_loading import load_tlens_model

    for arm_name in loaded.space.arms:
        for params in loaded.corner_trials(arm_name):
            cfg = loaded.trial_config(arm_name, params)
            if cfg.model_name in loaded.hook_names:
                continue
            if cfg.model_name not in models:
                try:
                    models[cfg.model_name] = load_tlens_model(
                        cfg.model_name, torch.device("cpu"), cfg.model_dtype
                    )
                except SparsifyError as exc:
                    raise type(exc)(f"{loaded.source}: arms.{arm_name}: {exc}") from None
            loaded.hook_names[cfg.model_name] = list(models[cfg.model_name].hook_dict)
