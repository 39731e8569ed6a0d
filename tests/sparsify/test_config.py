import pytest

from sparsify.config import TrainConfig, load_config, validate_config
from sparsify.errors import ConfigError
from sparsify.schema import read_yaml

VALID = """\
saes:
  sae_positions: [blocks.6.hook_resid_pre]
loss:
  sparsity: {coeff: 1.0}
  logits_kl: {coeff: 1.0}
n_samples: 64
lr: 0.001
"""


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_file_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, VALID))
    assert isinstance(cfg, TrainConfig)
    assert cfg.loss.out_to_in is None and cfg.loss.coeffs() == {"sparsity": 1.0, "logits_kl": 1.0}
    assert cfg.grad_accum_steps == 1 and cfg.train_data.embedded == "sotu"


def test_misspelled_key_suggests_the_closest_field(tmp_path):
    path = write(tmp_path, VALID.replace("logits_kl", "logit_kl"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: loss.logit_kl: unknown field; did you mean logits_kl?"


def test_negative_coefficient_names_file_field_and_value(tmp_path):
    path = write(tmp_path, VALID.replace("sparsity: {coeff: 1.0}", "sparsity: {coeff: -1}"))
    with pytest.raises(
        ConfigError,
        match=r"cfg.yaml: loss.sparsity.coeff: Input should be greater than or equal to 0 \(got -1\)",
    ):
        load_config(path)


def test_effective_batch_size_must_be_a_multiple(tmp_path):
    path = write(tmp_path, VALID + "batch_size: 16\neffective_batch_size: 24\n")
    with pytest.raises(
        ConfigError, match=r"effective_batch_size \(24\) must be a multiple of batch_size \(16\)"
    ):
        load_config(path)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, VALID + "lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:\d+: YAML syntax error"):
        load_config(path)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_gradient_accumulation_steps_are_derived():
    cfg = validate_config(
        {
            "saes": {"sae_positions": ["x"]},
            "loss": {"out_to_in": {"coeff": 1}},
            "n_samples": 64,
            "lr": 1e-3,
            "batch_size": 4,
            "effective_batch_size": 16,
        }
    )
    assert cfg.grad_accum_steps == 4 and cfg.n_grad_steps == 4


def test_data_source_must_be_exactly_one():
    with pytest.raises(ConfigError, match="exactly one of dataset_name, files, embedded"):
        validate_config(
            {
                "saes": {"sae_positions": ["x"]},
                "loss": {"out_to_in": {"coeff": 1}},
                "n_samples": 8,
                "lr": 1e-3,
                "train_data": {"files": ["a.txt"], "embedded": "sotu"},
            }
        )


def test_n_samples_must_cover_one_optimizer_step(tmp_path):
    path = write(
        tmp_path, VALID.replace("n_samples: 64", "n_samples: 8") + "batch_size: 8\neffective_batch_size: 16\n"
    )
    with pytest.raises(ConfigError, match=r"n_samples \(8\) must be at least one optimizer step"):
        load_config(path)


def test_folder_that_is_not_a_model_is_one_line(tmp_path):
    import torch

    from sparsify.model_loading import load_tlens_model

    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=r"^model_name: cannot load local folder"):
        load_tlens_model(str(tmp_path), torch.device("cpu"))


@pytest.mark.parametrize(
    ("old", "new"),
    [("lr: 0.001", "lr: true"), ("n_samples: 64", "n_samples: false"), ("lr: 0.001", "seed: true")],
)
def test_a_boolean_is_not_a_number(tmp_path, old, new):
    path = write(tmp_path, VALID.replace(old, new))
    name = new.split(":")[0]
    with pytest.raises(ConfigError, match=rf"cfg.yaml: {name}: expected a number, not a boolean"):
        load_config(path)


def test_exponent_without_a_dot_still_reads_as_a_number(tmp_path):
    # YAML 1.1 reads `1e-3` as a string; pydantic converts it, and that convenience stays
    assert load_config(write(tmp_path, VALID.replace("lr: 0.001", "lr: 1e-3"))).lr == 0.001


def test_a_key_given_twice_names_both_lines(tmp_path):
    path = write(tmp_path, VALID + "lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:8: YAML syntax error: duplicate key 'lr' (first on line 7)"


def test_yaml_merge_keys_still_work(tmp_path):
    text = VALID.replace("loss:\n", "defaults: &d {coeff: 2.0}\nloss:\n", 1).replace(
        "sparsity: {coeff: 1.0}", "sparsity: {<<: *d, p_norm: 1.0}"
    )
    cfg = validate_config({k: v for k, v in read_yaml(write(tmp_path, text)).items() if k != "defaults"})
    assert cfg.loss.sparsity is not None and cfg.loss.sparsity.coeff == 2.0


def test_unquoted_on_and_off_read_as_the_words(tmp_path):
    cfg = load_config(write(tmp_path, VALID + "autocast: off\nactivation_cache: on\n"))
    assert (cfg.autocast, cfg.activation_cache) == ("off", "on")


def test_a_boolean_inside_a_list_of_numbers_or_an_optional_seed_is_caught():
    from sparsify.models.mlp import MLPConfig
    from sparsify.schema import validate_model

    with pytest.raises(ConfigError, match=r"hidden_sizes: expected a number, not a boolean"):
        validate_model(MLPConfig, {"hidden_sizes": [64, True]}, "mlp.yaml")
    with pytest.raises(ConfigError, match=r"train_data.seed: expected a number, not a boolean"):
        validate_config(
            {"saes": {"sae_positions": ["blocks.1.hook_resid_pre"]}, "loss": {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1.0}},
             "n_samples": 8, "train_data": {"embedded": "sotu", "seed": True}}
        )  # fmt: skip
