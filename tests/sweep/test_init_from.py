"""Fine-tune arms (`init_from`, sweep/init_from.py): the search-space checks (one line naming the
file and field), the trial config (the source's, with the arm's loss and set on top), which
source trials are chosen, the `init_from` record field, and a whole tiny sweep whose fine-tune
trials start exactly at their sources' saved SAEs and survive a rerun (about 2 minutes)."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import tiny_train_config

from sparsify import ConfigError
from sparsify.metric_names import EVAL_CE_LOSS_INCREASE, EVAL_L0
from sweep.init_from import INIT_FROM_KEY, arm_order, select_sources, spread
from sweep.records import (
    DIVERGED,
    ERROR,
    FINISHED,
    INTERRUPTED,
    STOPPED,
    TrialRecord,
    read_trial_record,
    write_trial_record,
)
from sweep.space import load_search_space

LOCAL_LOSS = {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}
FT_LOSS = {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}


def space_tree(**fine_tune) -> dict:
    """A search space with a local arm, an e2e arm and a fine-tune arm `ft` of `local` (first
    in the file: the sweep still runs it last)."""
    return {
        "name": "t",
        "num_samples": 2,
        "base_config": {"saes": {"sae_positions": ["blocks.1.hook_resid_pre"]}, "n_samples": 64, "lr": 1e-3},
        "arms": {
            "ft": {
                "init_from": {"arm": "local", "select": "frontier"},
                "loss": FT_LOSS,
                "set": {"n_samples": 8},
                **fine_tune,
            },
            "local": {
                "loss": LOCAL_LOSS,
                "set": {"saes.dict_size_to_input_ratio": 4, "loss.sparsity.p_norm": 0.5},
                "search": {"loss.sparsity.coeff": {"type": "loguniform", "low": 0.1, "high": 10}},
            },
            "e2e": {
                "loss": {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1.0}},
                "search": {"loss.sparsity.coeff": {"type": "loguniform", "low": 0.1, "high": 10}},
            },
        },
    }


def write(tmp_path, tree):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def load_error(tmp_path, tree) -> str:
    with pytest.raises(ConfigError) as error:
        load_search_space(write(tmp_path, tree))
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "space.yaml"))
    return message.removeprefix(f"{tmp_path / 'space.yaml'}: ")


# --- the search space ------------------------------------------------------------------------


def test_fine_tune_config_is_its_sources_with_its_own_loss_and_set_on_top(tmp_path):
    loaded = load_search_space(write(tmp_path, space_tree()))
    assert arm_order(loaded.space) == ["local", "e2e", "ft"]
    cfg = loaded.trial_config("ft", {"loss.sparsity.coeff": 2.5})
    # the source's searched sparsity coefficient and fixed values, the fine-tune's terms and budget
    assert cfg.loss.coeffs() == {"sparsity": 2.5, "out_to_in": 1.0, "logits_kl": 1.0}
    assert cfg.loss.sparsity is not None and cfg.loss.sparsity.p_norm == 0.5
    assert cfg.saes.dict_size_to_input_ratio == 4 and cfg.n_samples == 8
    assert loaded.corner_trials("ft") == loaded.corner_trials("local")
    # a searched source value under a loss term the fine-tune does not have stays off
    tree = space_tree(loss={"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1.0}})
    assert load_search_space(write(tmp_path, tree)).trial_config(
        "ft", {"loss.sparsity.coeff": 2.5}
    ).loss.coeffs() == {
        "sparsity": 2.5,
        "logits_kl": 1.0,
    }


def test_a_loss_term_the_fine_tune_sets_null_stays_off(tmp_path):
    # `sparsity: null` used to be switched back on by the source's searched coefficient
    tree = space_tree(loss={"sparsity": None, "logits_kl": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}})
    cfg = load_search_space(write(tmp_path, tree)).trial_config("ft", {"loss.sparsity.coeff": 2.5})
    assert cfg.loss.sparsity is None
    assert cfg.loss.coeffs() == {"out_to_in": 1.0, "logits_kl": 1.0}


def test_a_fine_tune_arm_is_never_the_default_baseline(tmp_path):
    tree = space_tree(loss=LOCAL_LOSS)  # a local fine-tune: no KL either
    assert load_search_space(write(tmp_path, tree)).space.baseline_arm() == "local"
    assert load_search_space(write(tmp_path, {**tree, "baseline": "ft"})).space.baseline_arm() == "ft"


def test_unknown_source_arm_is_one_line_naming_the_field(tmp_path):
    tree = space_tree(init_from={"arm": "lcoal"})
    assert load_error(tmp_path, tree) == (
        "arms.ft.init_from.arm: 'lcoal' is not an arm; did you mean local? arms: ft, local, e2e"
    )
    assert load_error(tmp_path, space_tree(init_from={"arm": "ft"})).startswith(
        "arms.ft.init_from.arm: an arm cannot start from its own trials"
    )


def test_a_chain_of_fine_tunes_is_refused(tmp_path):
    tree = space_tree()
    tree["arms"]["ft2"] = {"init_from": {"arm": "ft"}, "loss": FT_LOSS}
    assert load_error(tmp_path, tree).startswith(
        "arms.ft2.init_from.arm: ft itself starts from arm local (init_from); chains are not supported"
    )


def test_select_must_be_frontier_or_all(tmp_path):
    message = load_error(tmp_path, space_tree(init_from={"arm": "local", "select": "best"}))
    assert message.startswith("arms.ft.init_from.select: Input should be 'frontier' or 'all'")


def test_search_is_for_other_arms_and_a_fine_tune_keeps_its_sources_saes(tmp_path):
    searched = {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}
    assert load_error(tmp_path, space_tree(search=searched)).startswith(
        "arms.ft.search: not allowed with init_from: the arm runs one trial per source trial"
    )
    assert load_error(tmp_path, space_tree(initial_points=[{"lr": 1e-3}])).startswith(
        "arms.ft.initial_points: not allowed with init_from"
    )
    assert load_error(tmp_path, space_tree(set={"saes.dict_size_to_input_ratio": 2})) == (
        "arms.ft.set: saes.dict_size_to_input_ratio cannot be set in an init_from arm: its SAEs are its "
        "source trial's"
    )
    tree = space_tree()
    del tree["arms"]["e2e"]["search"]
    assert load_error(tmp_path, tree).startswith(
        "arms.e2e.search: should have at least 1 item: Optuna needs something"
    )


def test_match_and_grid_leave_a_fine_tune_arm_alone(tmp_path):
    tree = {**space_tree(), "strategy": "match", "l0_targets": [5, 10]}
    assert load_search_space(write(tmp_path, tree)).space.strategy == "match"
    tree = space_tree()
    for arm in ("local", "e2e"):
        tree["arms"][arm]["search"] = {"loss.sparsity.coeff": {"type": "categorical", "values": [0.5, 1.0]}}
    assert load_search_space(write(tmp_path, {**tree, "sampler": "grid"})).space.sampler == "grid"


def test_dry_run_says_where_the_fine_tune_starts(tmp_path, capsys):
    from sweep.run import main as run_main

    tree = {**space_tree(), "storage_path": str(tmp_path / "sweeps")}
    path = write(tmp_path, tree)
    assert run_main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.index("arm ft:") > out.index("arm local:")
    assert "arm ft: starts from the SAEs of arm local's trials (init_from)" in out
    assert "sources: chosen once arm local has run" in out
    sweep_dir = tmp_path / "sweeps" / "t"
    write_trial_record(sweep_dir, record("local_a", FINISHED, 3.0, 0.2))
    assert run_main([str(path), "--dry-run"]) == 0
    assert "starts from local/local_a (eval/L0 3, eval/ce_loss_increase 0.2)" in capsys.readouterr().out


# --- choosing the sources --------------------------------------------------------------------


def record(trial_id, status, l0, ce, arm="local", **fields) -> TrialRecord:
    metrics = {} if l0 is None else {EVAL_L0: l0, EVAL_CE_LOSS_INCREASE: ce}
    return TrialRecord(arm, trial_id, status, {"loss.sparsity.coeff": l0 or 0.0}, metrics, **fields)


def test_sources_are_finished_frontier_trials_in_order_of_l0(tmp_path):
    space = load_search_space(write(tmp_path, space_tree())).space
    sweep_dir = tmp_path / "sweep"
    for r in (
        record("local_a", FINISHED, 20.0, 0.10),
        record("local_b", FINISHED, 5.0, 0.30),
        record("local_c", FINISHED, 10.0, 0.40),  # dominated by b
        record("local_d", FINISHED, 2.0, math.nan),  # no finite CE increase
        record("local_e", DIVERGED, None, None),
        record("local_f", STOPPED, 1.0, 0.01),  # half-trained: never a source
        record("local_g", ERROR, None, None),
        record("local_h", INTERRUPTED, 1.0, 0.01),
        record("e2e_a", FINISHED, 1.0, 0.01, arm="e2e"),
    ):
        write_trial_record(sweep_dir, r)
    ids = [r.trial_id for r in select_sources(space, sweep_dir, "ft", num_samples=5)]
    assert ids == ["local_b", "local_a"]
    space_all = load_search_space(
        write(tmp_path, space_tree(init_from={"arm": "local", "select": "all"}))
    ).space
    ids = [r.trial_id for r in select_sources(space_all, sweep_dir, "ft", num_samples=5)]
    assert ids == ["local_b", "local_c", "local_a"]
    # num_samples caps the count: evenly spaced in L0 order, both ends kept
    assert [r.trial_id for r in select_sources(space_all, sweep_dir, "ft", num_samples=2)] == [
        "local_b",
        "local_a",
    ]
    assert [r.trial_id for r in select_sources(space_all, sweep_dir, "ft", num_samples=1)] == ["local_c"]


def test_spread_picks_distinct_evenly_spaced_indices():
    assert spread(3, 5) == [0, 1, 2]
    assert spread(10, 4) == [0, 3, 6, 9]
    assert spread(5, 2) == [0, 4] and spread(5, 1) == [2]
    for n in range(1, 12):
        for k in range(1, n + 1):
            picked = spread(n, k)
            assert len(set(picked)) == k and picked == sorted(picked) and picked[-1] < n


# --- the record ------------------------------------------------------------------------------


def test_init_from_round_trips_in_a_record_and_is_checked(tmp_path):
    source = {"arm": "local", "trial": "local_00001"}
    path = write_trial_record(tmp_path, record("ft_00000", FINISHED, 3.0, 0.1, arm="ft", init_from=source))
    assert json.loads(path.read_text())["init_from"] == source
    assert read_trial_record(tmp_path, "ft", "ft_00000").init_from == source  # type: ignore[union-attr]
    plain = write_trial_record(tmp_path, record("local_00001", FINISHED, 3.0, 0.1))
    assert "init_from" not in json.loads(plain.read_text())
    with pytest.raises(ValueError, match="init_from must be"):
        TrialRecord.from_json(
            {"arm": "ft", "trial_id": "x", "status": FINISHED, "init_from": {"arm": "local"}}
        )


def test_the_record_callback_names_the_source_and_keeps_its_params(tmp_path, make_trial):
    from ray.tune.experiment import Trial

    from sweep.tuner import TrialRecordCallback

    sweep_dir = tmp_path / "sweep"
    write_trial_record(sweep_dir, record("src1", FINISHED, 4.0, 0.2))
    callback = TrialRecordCallback(sweep_dir, "ft", "local")
    trial = make_trial("00007", **{INIT_FROM_KEY: "src1"})
    trial.update_last_result({EVAL_L0: 9.0})
    trial.set_status(Trial.TERMINATED)
    callback.on_trial_complete(iteration=1, trials=[trial], trial=trial)
    stopped = read_trial_record(sweep_dir, "ft", "00007")
    assert stopped is not None and stopped.status == STOPPED
    assert stopped.init_from == {"arm": "local", "trial": "src1"}
    assert stopped.params == {"loss.sparsity.coeff": 4.0}


# --- a whole sweep ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from sweep.run import start_ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never some other Ray here
    start_ray()  # already initialized: only sets the environment defaults
    yield
    ray.shutdown()


def _grid_sweep_with_fine_tune(name: str, tmp_path, base: dict, fine_tune_first: bool = False) -> dict:
    """A search space: arm `local` on a 2-point grid of sparsity coefficients, and arm `ft`
    fine-tuning every finished local trial for 16 sequences."""
    local = {
        "loss": LOCAL_LOSS,
        "search": {"loss.sparsity.coeff": {"type": "categorical", "values": [0.01, 1.0]}},
    }
    ft = {"init_from": {"arm": "local", "select": "all"}, "loss": FT_LOSS, "set": {"n_samples": 16}}
    arms = {"ft": ft, "local": local} if fine_tune_first else {"local": local, "ft": ft}
    return {
        "name": name,
        "storage_path": str(tmp_path / "sweeps"),
        "num_samples": 2,
        "sampler": "grid",
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "base_config": base,
        "arms": arms,
    }


def test_fine_tune_trials_start_at_their_sources_saes_and_survive_a_rerun(
    ray_cluster, tiny_model_dir, corpus_dir, tiny_bridge, tmp_path, capsys
):
    import torch
    from safetensors.torch import load_file

    from sparsify import build_model, load_config
    from sweep.results import load_records
    from sweep.run import main as run_main

    base = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, n_samples=32)
    del base["loss"]
    # the fine-tune arm first in the file: the sweep still runs its source first
    tree = _grid_sweep_with_fine_tune("ft", tmp_path, base, fine_tune_first=True)
    path = write(tmp_path, tree)
    assert run_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "=== arm ft: 2 trials, starting from local/" in out
    sweep_dir = tmp_path / "sweeps" / "ft"
    records = {r.trial_id: r for r in load_records(sweep_dir)}
    local = {i: r for i, r in records.items() if r.arm == "local"}
    ft = [r for r in records.values() if r.arm == "ft"]
    assert len(local) == 2 and all(r.status == FINISHED for r in local.values())
    assert len(ft) == 2 and all(r.status == FINISHED for r in ft)
    assert sorted(r.init_from["trial"] for r in ft if r.init_from) == sorted(local)  # one per source
    for r in ft:
        assert r.init_from is not None and r.init_from["arm"] == "local"
        source = local[r.init_from["trial"]]
        assert r.params == source.params  # the source's sparsity coefficient, kept
        source_run = sweep_dir / "runs" / "local" / source.trial_id
        cfg = load_config(sweep_dir / "runs" / "ft" / r.trial_id / "config.yaml")
        assert cfg.saes.pretrained_sae_paths == [str(source_run)] and cfg.saes.retrain_saes
        assert cfg.n_samples == 16 and cfg.loss.coeffs() == {
            "sparsity": source.params["loss.sparsity.coeff"],
            "out_to_in": 1.0,
            "logits_kl": 1.0,
        }
        # before its first step the fine-tune's SAE is exactly the source's saved one (decoder
        # columns normalized, as loading does: the SAE normalizes them in forward anyway)
        start = build_model(cfg, tiny_bridge).saes.state_dict()
        saved = load_file(str(source_run / "sae.safetensors"))
        assert set(start) == set(saved)
        for name, tensor in saved.items():
            if name.endswith("decoder.weight"):
                tensor = torch.nn.functional.normalize(tensor, dim=0)
            torch.testing.assert_close(start[name], tensor, rtol=0, atol=0)
        # and it trained from there
        trained = load_file(str(sweep_dir / "runs" / "ft" / r.trial_id / "sae.safetensors"))
        assert not torch.equal(
            trained["blocks-1-hook_resid_pre.encoder.0.weight"],
            saved["blocks-1-hook_resid_pre.encoder.0.weight"],
        )
    report = (sweep_dir / "report" / "report.md").read_text()
    assert (
        "ft" in report
        and json.loads((sweep_dir / "report" / "verdict.json").read_text())["baseline"] == "local"
    )

    # a rerun resumes every arm: nothing is trained again, every record (wall time included)
    # stays as it was, and the fine-tune trials still point at the same sources
    trains_before = sorted(p.name for p in (sweep_dir / "ray_train").iterdir())
    assert run_main([str(path)]) == 0
    assert "=== arm ft: resuming its trials from arm local's ===" in capsys.readouterr().out
    assert {r.trial_id: r for r in load_records(sweep_dir)} == records
    assert sorted(p.name for p in (sweep_dir / "ray_train").iterdir()) == trains_before


@pytest.mark.slow
def test_a_sweep_killed_in_its_fine_tune_arm_resumes_it_from_the_same_sources(
    tiny_model_dir, corpus_dir, tmp_path
):
    """The driver SIGKILLed once the first fine-tune trial has its record, then rerun with
    --resume: that trial is kept as it was, the other one runs, and each still points at its
    own source (several minutes: two driver starts, each with its own local Ray)."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import uuid
    from pathlib import Path

    from conftest import PROCESS_TAG, tagged_processes

    from sweep.results import load_records

    base = tiny_train_config(tiny_model_dir, corpus_dir, tmp_path, n_samples=32)
    del base["loss"]
    tree = _grid_sweep_with_fine_tune("killed", tmp_path, base)
    path = write(tmp_path, tree)
    sweep_dir = tmp_path / "sweeps" / "killed"
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"), **{PROCESS_TAG: tag}, PYTHONUNBUFFERED="1"
    )
    command = [sys.executable, "-m", "sweep.run", str(path)]
    repo = Path(__file__).parents[2]
    log = tmp_path / "first.log"
    try:
        with log.open("w") as out:
            driver = subprocess.Popen(
                command, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 900
        while not [p for p in (sweep_dir / "trials" / "ft").glob("*.json") if not p.name.startswith(".")]:
            assert driver.poll() is None, f"the sweep ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no fine-tune record after 15 minutes"
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        before = {r.trial_id: r for r in load_records(sweep_dir)}
        deadline = time.monotonic() + 60
        while tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.5)
        resumed = subprocess.run(
            [*command, "--resume"], cwd=repo, env=env, capture_output=True, text=True, timeout=1200,
            start_new_session=True,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stdout[-5000:] + resumed.stderr[-3000:]
    finally:
        for pid in tagged_processes(tag):  # only what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    after = {r.trial_id: r for r in load_records(sweep_dir)}
    ft_before = [r for r in before.values() if r.arm == "ft" and r.status == FINISHED]
    ft_after = [r for r in after.values() if r.arm == "ft"]
    local = {i for i, r in after.items() if r.arm == "local"}
    assert ft_before and all(after[r.trial_id] == r for r in ft_before)  # kept, not trained again
    assert len(ft_after) == 2 and all(r.status == FINISHED for r in ft_after)
    assert sorted(r.init_from["trial"] for r in ft_after if r.init_from) == sorted(local)
    for r in ft_after:
        assert r.params == after[r.init_from["trial"]].params  # type: ignore[index]
