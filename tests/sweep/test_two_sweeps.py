"""Two sweeps (two local Ray instances) on one machine. Ray's state API finds its cluster by
RAY_ADDRESS, else among the GCS processes running on the machine, and fails when there are
several; Ray Train's detached `PlacementGroupCleaner` uses it to see whether a trial's Train
controller is alive, so without RAY_ADDRESS it never frees the placement group of a trial
that ASHA stopped and the next trial waits for its workers forever (ray#54305 by another
door). `start_ray` gives every worker of its Ray the address of that Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from conftest import asha_space

from sweep.results import load_results

REPO = Path(__file__).resolve().parents[2]
MULTIPLE = "Found multiple active Ray instances"

OTHER_RAY = textwrap.dedent(
    """
    import sys
    import ray
    ray.init(address="local", include_dashboard=False, num_cpus=1)
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes stdin
    """
)

# what Ray Train does for each trial (`PlacementGroupCleanerCallback`): its controller, an actor
# with env_vars of its own, starts a detached cleaner and registers its workers' placement
# group; the controller then dies as a trial stopped by Tune does
CLEANER = textwrap.dedent(
    """
    import json, os, time
    from sweep.run import start_ray
    context = start_ray()
    import ray
    from ray.train.v2._internal.execution.controller.placement_group_cleaner import PlacementGroupCleaner
    from ray.util.placement_group import placement_group, placement_group_table

    @ray.remote(num_cpus=0)
    class Controller:
        def start(self):
            pg = placement_group([{"CPU": 1}])
            ray.get(pg.ready())
            me = ray.get_runtime_context().get_actor_id()
            cleaner = ray.remote(num_cpus=0)(PlacementGroupCleaner).options(lifetime="detached").remote(
                controller_actor_id=me, check_interval_s=0.2, get_actor_timeout_s=5, stop_timeout=None
            )
            ray.get(cleaner.register_placement_group.remote(pg))
            ray.get(cleaner.start_monitoring.remote())
            return pg.id.hex()

    @ray.remote(num_cpus=0)
    def ray_address():
        return os.environ.get("RAY_ADDRESS")

    controller = Controller.options(runtime_env={"env_vars": {"SOME_SETTING": "1"}}).remote()
    pg = ray.get(controller.start.remote())
    ray.kill(controller)
    deadline = time.monotonic() + 30
    while placement_group_table()[pg]["state"] != "REMOVED" and time.monotonic() < deadline:
        time.sleep(0.2)
    print(json.dumps({
        "gcs_address": context.address_info["gcs_address"],
        "worker_ray_address": ray.get(ray_address.remote()),
        "driver_ray_address": os.environ.get("RAY_ADDRESS"),
        "pg_state": placement_group_table()[pg]["state"],
    }))
    """
)


def own_ray_env(tag: str) -> dict[str, str]:
    """The environment of a process that starts a local Ray of its own (no RAY_ADDRESS), with
    a short temp dir (unix socket paths <= 107 bytes) and a tag to find what it started."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"), TWO_SWEEPS_TEST_TAG=tag,
        PYTHONUNBUFFERED="1", PYTHONPATH=f"{REPO}:{REPO / 'tests'}",
    )  # fmt: skip
    return env


def kill_tagged(tag: str) -> None:
    """SIGKILL the live processes whose environment carries `tag` (only what a test started)."""
    needle = f"TWO_SWEEPS_TEST_TAG={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def test_a_dead_controllers_placement_group_is_freed_with_another_ray_running(tmp_path):
    tag = uuid.uuid4().hex
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_RAY], env=own_ray_env(tag), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "ready"
        done = subprocess.run(
            [sys.executable, "-c", CLEANER], cwd=tmp_path, env=own_ray_env(tag),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        if other.stdin is not None:
            other.stdin.close()
        try:
            other.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        kill_tagged(tag)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    print(seen)
    assert MULTIPLE not in done.stderr, done.stderr[-3000:]
    assert seen["worker_ray_address"] == seen["gcs_address"]  # every worker knows its cluster
    assert seen["driver_ray_address"] is None  # the driver's own environment is left alone
    assert seen["pg_state"] == "REMOVED", done.stderr[-3000:]


@pytest.mark.slow
def test_two_asha_sweeps_side_by_side_both_finish(tiny_model_dir, corpus_dir, tmp_path):
    tag = uuid.uuid4().hex
    names_ = ("first", "second")
    logs = {name: tmp_path / f"{name}.log" for name in names_}
    drivers = {}
    start = time.monotonic()
    try:
        for name in names_:
            with logs[name].open("w") as log:
                drivers[name] = subprocess.Popen(
                    [sys.executable, "-m", "sweep.run", str(asha_space(tmp_path, name, tiny_model_dir, corpus_dir))],
                    cwd=tmp_path, env=own_ray_env(tag), stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
        # a leaked placement group hangs a sweep: fail at the cleaner's error, not at a timeout
        deadline = time.monotonic() + 1500
        while any(d.poll() is None for d in drivers.values()):
            for name in names_:
                text = logs[name].read_text()
                assert MULTIPLE not in text, (
                    f"{name}: the cleaner could not find its cluster:\n{text[-3000:]}"
                )
            assert time.monotonic() < deadline, "the sweeps did not finish in 25 minutes"
            time.sleep(1)
    finally:
        for driver in drivers.values():
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        kill_tagged(tag)
    print(f"\nboth sweeps done in {time.monotonic() - start:.0f} s")
    for name in names_:
        text = logs[name].read_text()
        assert drivers[name].returncode == 0, f"{name}:\n{text[-3000:]}"
        assert MULTIPLE not in text
        sweep_dir = tmp_path / "sweeps" / name
        table = load_results(sweep_dir)
        report = (sweep_dir / "report" / "report.md").read_text()
        counts = [line for line in report.splitlines() if line.startswith("| local |")][0]
        print(f"{name}: {counts}  statuses {sorted(table['status'])}")
        assert len(table) == 3 and (table["status"] == "finished").sum() >= 1
        assert set(table["status"]) <= {"finished", "stopped"}
