import json
import os
import stat

import pytest

from sparsify.atomic import atomic_write_text
from sparsify.metric_names import TIME_METRICS


def test_atomic_write_leaves_no_temp_file_and_shares_by_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "metrics.json"
        atomic_write_text(path, "{}")
        atomic_write_text(path, '{"a": 1}')
    finally:
        os.umask(old)
    assert path.read_text() == '{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by colleagues, not 0600


def test_default_run_folder_names_the_architecture_and_k():
    # runs that differ only in the architecture or k used to share (and overwrite) one folder
    from sparsify.config import validate_config
    from sparsify.training.build import run_dir_for

    def folder(**saes):
        tree = {
            "save_dir": "runs", "n_samples": 64, "lr": 1e-3, "loss": {"out_to_in": {"coeff": 1.0}},
            "saes": {"sae_positions": ["blocks.6.hook_resid_pre"], **saes},
        }  # fmt: skip
        return run_dir_for(validate_config(tree, source="t")).name

    names = [
        folder(),
        folder(architecture="topk", k=32),
        folder(architecture="topk", k=64),
        folder(architecture="batchtopk", k=32),
        folder(architecture="jumprelu"),
    ]
    assert names[0] == "blocks-6-hook_resid_pre_ratio1_out_to_in1_seed0"  # relu runs keep their names
    assert names[1] == "blocks-6-hook_resid_pre_ratio1_topk32_out_to_in1_seed0"
    assert len(set(names)) == len(names)


def test_no_code_unpickles_untrusted_files():
    """Weights load through safetensors; a torch.load anywhere must pass weights_only=True
    (a pickled checkpoint can run code when loaded)."""
    import re
    from pathlib import Path

    root = Path(__file__).parents[2]
    for path in [*root.glob("sparsify/**/*.py"), *root.glob("sweep/**/*.py")]:
        text = path.read_text()
        assert "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"


# --- resume: a run continued from a mid-run checkpoint equals an uninterrupted one ------------

E2E = {"sparsity": {"coeff": 0.5}, "logits_kl": {"coeff": 1.0}, "out_to_in": {"coeff": 0.0}}
LOCAL = {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}  # reads the activation cache on CPU
TIMING = {"train/tokens_per_s", "cost/device_seconds", *TIME_METRICS}
"""Metrics that measure the clock, not the training."""


class Interrupted(Exception):
    pass


def _stop_at_checkpoint(metrics, checkpoint):
    if checkpoint is not None:
        raise Interrupted(checkpoint)


def _resume_config(model_dir, corpus, tmp_path, loss, save_dir):
    from conftest import tiny_train_config

    from sparsify.config import validate_config

    # 4 optimizer steps of 2 micro-batches, cosine lr after a 1-step warm-up, a checkpoint after
    # step 2; no log until the end, so the final train metrics average over the whole run,
    # across the interruption (the open log window is part of the checkpoint)
    return validate_config(
        tiny_train_config(
            model_dir, corpus, tmp_path, loss=loss, n_samples=64, batch_size=8, effective_batch_size=16,
            warmup_samples=16, save_every_n_samples=32, log_every_n_grad_steps=100,
            save_dir=str(save_dir),
        )
    )  # fmt: skip


@pytest.mark.parametrize("loss", [E2E, LOCAL], ids=["e2e", "local"])
def test_resumed_run_equals_an_uninterrupted_one(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, loss):
    """Exact equality (tolerance 0): same SAE weights bit for bit, same metrics except tokens/s."""
    import torch

    from sparsify.training.checkpoint import CHECKPOINTS_DIR, TRAIN_STATE_FILE, load_sae_weights
    from sparsify.training.trainer import train

    whole = _resume_config(tiny_model_dir, corpus_dir, tmp_path, loss, tmp_path / "whole")
    uninterrupted = train(whole, tlens_model=tiny_bridge, show_progress=False)
    cut = _resume_config(tiny_model_dir, corpus_dir, tmp_path, loss, tmp_path / "cut")
    with pytest.raises(Interrupted) as stopped:
        train(cut, tlens_model=tiny_bridge, show_progress=False, report=_stop_at_checkpoint)
    checkpoint = stopped.value.args[0]
    assert checkpoint.name == "step_000000002" and checkpoint.parent.name == CHECKPOINTS_DIR
    assert not (checkpoint.parents[1] / TRAIN_STATE_FILE).exists()  # the run folder is not finished
    # the run folder names its latest checkpoint
    resumed = train(cut, tlens_model=tiny_bridge, show_progress=False, resume_from=checkpoint.parents[1])

    a, b = uninterrupted.model.saes.state_dict(), resumed.model.saes.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert set(uninterrupted.metrics) == set(resumed.metrics)
    for key in set(uninterrupted.metrics) - TIMING:
        assert resumed.metrics[key] == uninterrupted.metrics[key], key
    assert resumed.metrics["train/tokens_seen"] == 64 * 16
    saved = load_sae_weights(resumed.run_dir / "sae.safetensors")
    assert all(torch.equal(saved[k], a[k].cpu()) for k in a)
    # a finished run keeps no mid-run checkpoint; its run folder is itself the final state
    assert not (resumed.run_dir / CHECKPOINTS_DIR).exists()
    assert (resumed.run_dir / TRAIN_STATE_FILE).exists()


def test_resuming_a_finished_run_trains_nothing_and_reports_the_same_metrics(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, monkeypatch
):
    cfg = _resume_config(tiny_model_dir, corpus_dir, tmp_path, LOCAL, tmp_path / "runs")
    first = train_tiny(cfg, tiny_bridge)
    monkeypatch.setattr("sparsify.training.trainer.optimizer_step", lambda *a: pytest.fail("trained again"))
    again = train_tiny(cfg, tiny_bridge, resume_from=first.run_dir)
    for key in set(first.metrics) - TIMING:
        assert again.metrics[key] == first.metrics[key], key


def test_resume_refuses_a_checkpoint_of_another_config(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    from sparsify.errors import ConfigError

    cfg = _resume_config(tiny_model_dir, corpus_dir, tmp_path, LOCAL, tmp_path / "runs")
    first = train_tiny(cfg, tiny_bridge)
    other = cfg.model_copy(update={"lr": cfg.lr * 2, "seed": 3})
    with pytest.raises(ConfigError, match=r"trained with another config \(lr, seed differ\)"):
        train_tiny(other, tiny_bridge, resume_from=first.run_dir)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        train_tiny(cfg, tiny_bridge, resume_from=tmp_path)


def test_checkpoint_round_trips_adam_state_without_pickle(tmp_path):
    """Adam's tensors go to safetensors, its scalars and param groups to JSON; loading gives
    back the same state dict (tuples included)."""
    import torch

    from sparsify.training.checkpoint import _join_optimizer_state, _split_optimizer_state

    params = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(3))]
    adam = torch.optim.Adam(params, lr=1e-3, betas=(0.8, 0.9))
    sum(p.sum() for p in params).backward()
    adam.step()
    saved = adam.state_dict()
    tensors, rest = _split_optimizer_state(saved)
    rest = json.loads(json.dumps(rest))
    loaded = _join_optimizer_state(tensors, rest)
    assert loaded["param_groups"] == saved["param_groups"]
    for index, per_param in saved["state"].items():
        for name, value in per_param.items():
            assert torch.equal(loaded["state"][index][name], value), (index, name)


def train_tiny(cfg, bridge, **kwargs):
    from sparsify.training.trainer import train

    return train(cfg, tlens_model=bridge, show_progress=False, **kwargs)


def test_resumed_run_logs_each_step_once_to_tensorboard(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path):
    """A run that crashes after its checkpoint (step 2) and one more step, then resumes from
    step 2: TensorBoard shows each step once, with the uninterrupted run's values."""
    from conftest import tiny_train_config
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sparsify.config import validate_config
    from sparsify.training.trainer import train

    def config(save_dir):
        return validate_config(
            tiny_train_config(
                tiny_model_dir, corpus_dir, tmp_path, n_samples=64, batch_size=16, save_every_n_samples=32,
                eval_every_n_samples=48, log_every_n_grad_steps=1, save_dir=str(save_dir), tensorboard=True,
            )
        )  # fmt: skip

    def crash_at_step_3_eval(metrics, checkpoint):
        if (
            any(k.startswith("eval/") for k in metrics)
            and checkpoint is None
            and not crash_at_step_3_eval.done
        ):
            crash_at_step_3_eval.done = True
            raise Interrupted()

    crash_at_step_3_eval.done = False
    whole = train(config(tmp_path / "whole"), tlens_model=tiny_bridge, show_progress=False)
    cut = config(tmp_path / "cut")
    with pytest.raises(Interrupted):
        train(cut, tlens_model=tiny_bridge, show_progress=False, report=crash_at_step_3_eval)
    resumed = train(
        cut, tlens_model=tiny_bridge, show_progress=False, resume_from=tmp_path / "cut" / whole.run_dir.name
    )

    def scalars(run_dir, tag):
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars(tag)]

    # resuming the finished run trains nothing and logs its final metrics again: still once per step
    train(cut, tlens_model=tiny_bridge, show_progress=False, resume_from=resumed.run_dir)
    for tag in ("train/loss", "eval/kl"):
        logged = scalars(resumed.run_dir, tag)
        assert [step for step, _ in logged] == sorted({step for step, _ in logged}), (tag, logged)
        expected = scalars(whole.run_dir, tag)
        assert [step for step, _ in logged] == [step for step, _ in expected], tag
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected]), tag
