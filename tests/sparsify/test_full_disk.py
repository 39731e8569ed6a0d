"""A disk that fills (or storage that turns read-only) while a run writes: one line naming the
file (`StorageError`, an OSError and a SparsifyError), the previous file or checkpoint whole,
and nothing left behind that would break the next save.

The real cases use a tiny tmpfs (`storage_limits`: the kernel answers ENOSPC through every
layer, e.g. the Rust writer inside safetensors, which reports it as a SafetensorError); the
patched ones, which run anywhere, raise the same error from `os.fsync`, `os.replace` or
safetensors' `save_file`."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_train_config
from safetensors import SafetensorError
from storage_limits import fill_disk, read_only_view, tiny_disk

from sparsify.atomic import atomic_write_text, atomic_write_with
from sparsify.cli import train_main
from sparsify.errors import SparsifyError, StorageError
from sparsify.training import checkpoint
from sparsify.training.checkpoint import (
    CHECKPOINTS_DIR,
    load_checkpoint,
    save_checkpoint,
    step_checkpoint_dir,
)

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
NO_SPACE = "No space left on device"


def dot_names(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*")]


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path):
    from safetensors.torch import save_file

    with tiny_disk(tmp_path / "disk", 256) as disk:
        path = disk / "metrics.json"
        atomic_write_text(path, "old")
        filler = fill_disk(disk, leave_kib=8)
        with pytest.raises(StorageError) as text_error:
            atomic_write_text(path, "x" * 100_000)
        weights = disk / "sae.safetensors"
        with pytest.raises(StorageError) as weights_error:  # safetensors says SafetensorError
            atomic_write_with(weights, lambda tmp: save_file({"w": torch.zeros(100_000)}, tmp))
        assert path.read_text() == "old" and not weights.exists()
        assert sorted(p.name for p in disk.iterdir()) == ["filler.bin", "metrics.json"]  # no temp file
        filler.unlink()
        atomic_write_text(path, "new")
        assert path.read_text() == "new"
    for exc, file in ((text_error.value, path), (weights_error.value, weights)):
        assert str(exc) == f"cannot write {file}: {NO_SPACE}"
        assert isinstance(exc, SparsifyError) and isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def test_atomic_write_on_read_only_storage_names_the_file(tmp_path):
    (tmp_path / "src").mkdir()
    with read_only_view(tmp_path / "src", tmp_path / "ro") as ro:
        with pytest.raises(
            StorageError, match=f"^cannot write {ro / 'a' / 'b.json'}: Read-only file system$"
        ):
            atomic_write_text(ro / "a" / "b.json", "{}")
        with pytest.raises(StorageError, match=f"^cannot write {ro / 'c.json'}: Read-only file system$"):
            atomic_write_text(ro / "c.json", "{}")


@pytest.fixture
def checkpoint_parts(tiny_model_dir, corpus_dir, tmp_path):
    """A config, SAE weights (64 KiB) and Adam's state (128 KiB) of a checkpoint."""
    from sparsify.config import validate_config

    cfg = validate_config(tiny_train_config(tiny_model_dir, corpus_dir, tmp_path))
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(128, 64)), torch.nn.Parameter(torch.randn(64, 128))]
    adam = torch.optim.Adam(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    adam.step()
    sae_state = {"blocks-1-hook_resid_pre.encoder.0.weight": params[0].detach().clone(),
                 "blocks-1-hook_resid_pre.decoder.weight": params[1].detach().clone()}  # fmt: skip
    return cfg, sae_state, adam.state_dict()


def save(run_dir: Path, step: int, parts) -> Path:
    cfg, sae_state, optimizer_state = parts
    return save_checkpoint(
        run_dir, step, sae_state, cfg, {"step": step, "samples_seen": 8 * step}, optimizer_state
    )


def assert_loads_step(run_dir: Path, step: int, parts) -> None:
    cfg, sae_state, optimizer_state = parts
    state = load_checkpoint(run_dir, cfg)
    assert state.folder == step_checkpoint_dir(run_dir, step)
    assert state.train_state["step"] == step
    assert all(torch.equal(state.sae_state[k], v) for k, v in sae_state.items())
    assert state.optimizer_state is not None
    assert torch.equal(state.optimizer_state["state"][0]["exp_avg"], optimizer_state["state"][0]["exp_avg"])


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / CHECKPOINTS_DIR).iterdir())


@pytest.mark.parametrize(
    "leave_kib", [0, 40, 150], ids=["full", "fails in optimizer", "fails in SAE weights"]
)
def test_checkpoint_on_a_full_disk_keeps_the_previous_one(checkpoint_parts, tmp_path, leave_kib):
    with tiny_disk(tmp_path / "disk", 1024) as disk:
        run_dir = disk / "run"
        save(run_dir, 2, checkpoint_parts)
        filler = fill_disk(disk, leave_kib)
        with pytest.raises(StorageError) as failed:
            save(run_dir, 4, checkpoint_parts)
        assert str(failed.value) == f"cannot write {step_checkpoint_dir(run_dir, 4)}: {NO_SPACE}"
        assert failed.value.errno == errno.ENOSPC
        assert checkpoints(run_dir) == ["step_000000002"]  # the failed one left nothing
        assert_loads_step(run_dir, 2, checkpoint_parts)
        filler.unlink()
        save(run_dir, 4, checkpoint_parts)
        assert checkpoints(run_dir) == ["step_000000004"] and not dot_names(run_dir)
        assert_loads_step(run_dir, 4, checkpoint_parts)


def safetensors_full(*args, **kwargs):
    # what safetensors raises on a real ENOSPC (its Rust writer's io::Error)
    raise SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error 28)")


def raise_enospc(*args, **kwargs):
    raise ENOSPC


@pytest.mark.parametrize("where", ["os.fsync", "os.replace", "safetensors"])
def test_checkpoint_write_failing_low_down_keeps_the_previous_one(
    checkpoint_parts, tmp_path, monkeypatch, where
):
    run_dir = tmp_path / "run"
    save(run_dir, 2, checkpoint_parts)
    with monkeypatch.context() as patch:
        if where == "safetensors":
            patch.setattr(checkpoint, "save_file", safetensors_full)
        else:
            patch.setattr(os, where.removeprefix("os."), raise_enospc)
        with pytest.raises(StorageError) as failed:
            save(run_dir, 4, checkpoint_parts)
    assert str(failed.value) == f"cannot write {step_checkpoint_dir(run_dir, 4)}: {NO_SPACE}"
    assert checkpoints(run_dir) == ["step_000000002"] and not dot_names(run_dir)
    assert_loads_step(run_dir, 2, checkpoint_parts)
    save(run_dir, 4, checkpoint_parts)
    assert checkpoints(run_dir) == ["step_000000004"] and not dot_names(run_dir)


def test_other_write_errors_pass_through_unchanged(tmp_path, monkeypatch):
    """Only a storage that refuses writes becomes a StorageError; e.g. EIO (maybe transient on
    a network filesystem) stays what it was, and so does a writer's own bug."""
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError) as failed:
        atomic_write_text(tmp_path / "a.json", "{}")
    assert not isinstance(failed.value, StorageError) and failed.value.errno == errno.EIO
    monkeypatch.undo()
    with pytest.raises(ZeroDivisionError):
        atomic_write_with(tmp_path / "b.json", lambda tmp: 1 / 0)
    assert list(tmp_path.iterdir()) == []


def test_storage_error_survives_pickling():
    """Ray ships a worker's exception to the driver by pickling it."""
    import pickle

    exc = pickle.loads(pickle.dumps(StorageError(errno.ENOSPC, NO_SPACE, "/x/sae.safetensors")))
    assert isinstance(exc, StorageError) and str(exc) == f"cannot write /x/sae.safetensors: {NO_SPACE}"


@pytest.mark.parametrize("how", ["full tmpfs", "fsync fails"])
def test_train_cli_on_a_full_disk_is_one_line_and_keeps_the_checkpoint(
    tiny_model_dir, corpus_dir, tmp_path, capsys, monkeypatch, how
):
    """`python -m sparsify.train` whose disk fills after the first checkpoint (step 2 of 8)."""
    from sparsify.config import validate_config
    from sparsify.training import state

    def run(save_dir: Path) -> tuple[int, Path, Path]:
        tree = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, save_every_n_samples=16,
                                 run_name="full", save_dir=str(save_dir))  # fmt: skip
        path = tmp_path / "train.yaml"
        path.write_text(yaml.safe_dump(tree))
        original = state.save_checkpoint

        def save_then_fill(run_dir, *args, **kwargs):
            saved = original(run_dir, *args, **kwargs)
            if how == "full tmpfs":
                fill_disk(save_dir)
            else:
                monkeypatch.setattr(os, "fsync", raise_enospc)
            return saved

        monkeypatch.setattr(state, "save_checkpoint", save_then_fill)
        code = train_main([str(path)])
        monkeypatch.undo()
        return code, path, save_dir / "full"

    if how == "full tmpfs":
        with tiny_disk(tmp_path / "disk", 1024) as disk:
            code, path, run_dir = run(disk)
            resumable = load_checkpoint(run_dir, validate_config(yaml.safe_load(path.read_text())))
    else:
        code, path, run_dir = run(tmp_path / "runs")
        resumable = load_checkpoint(run_dir, validate_config(yaml.safe_load(path.read_text())))
    captured = capsys.readouterr()
    assert code == 2, captured.err
    line = f"error: {path}: cannot write {run_dir / 'sae.safetensors'}: {NO_SPACE}"
    # one error line, no traceback; the rest of stderr is the progress bar (the trainer leaves
    # it open when training fails: it is redrawn around the error line)
    errors = [part for part in re.split(r"[\r\n]", captured.err) if "error" in part]
    assert len(errors) == 1 and errors[0].endswith(line), captured.err
    assert "Traceback" not in captured.err
    assert resumable.train_state["step"] == 2
    print(line)


def test_train_into_read_only_save_dir_is_one_line_before_training(
    tiny_model_dir, corpus_dir, tmp_path, capsys, monkeypatch
):
    """A run folder that exists but cannot be written (a finished run on read-only storage) is
    refused before the first step, not after training."""
    from sparsify.training import trainer

    monkeypatch.setattr(
        trainer, "forward_backward", lambda *a, **k: pytest.fail("trained on read-only storage")
    )
    (tmp_path / "src" / "ro_run").mkdir(parents=True)
    with read_only_view(tmp_path / "src", tmp_path / "ro") as ro:
        tree = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, save_dir=str(ro), run_name="ro_run")
        path = tmp_path / "train.yaml"
        path.write_text(yaml.safe_dump(tree))
        code = train_main([str(path)])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert (
        captured.err == f"error: {path}: save_dir: {ro / 'ro_run'} is not writable (Read-only file system)\n"
    )
