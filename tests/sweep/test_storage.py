"""`sweep.storage.SweepStore` against a real S3-compatible server (moto's, started on 127.0.0.1
by `tests/s3_server.py`): two mirrors see each other's files only through the bucket, an upload
killed mid-way leaves the old object whole, a reader never sees half a record, and the report
reads and writes a sweep on the bucket."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs
import pytest
from s3_server import S3_ENV, bucket_uri

from sparsify.metric_names import EVAL_CE_LOSS_INCREASE, EVAL_L0
from sweep.records import read_trial_record, write_trial_record
from sweep.report import build_report
from sweep.report import main as report_main
from sweep.results import load_records
from sweep.run import sweep_folder
from sweep.space import SPACE_RECORD
from sweep.storage import SweepStore, child_uri

REPO = Path(__file__).parents[2]


@pytest.fixture
def s3(monkeypatch, s3_endpoint):
    """A fresh bucket's sweep URI, and a factory of stores of it, each with its own local
    mirror (its own `SPARSIFY_CACHE`), as on different machines."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    storage = bucket_uri(s3_endpoint, f"b{uuid.uuid4().hex[:12]}")
    return sweep_folder(storage, "my_sweep").uri


def store_on(uri: str, cache: Path, monkeypatch) -> SweepStore:
    monkeypatch.setenv("SPARSIFY_CACHE", str(cache))
    store = SweepStore(uri)
    assert store.local.is_relative_to(cache)  # fixed now: cached on the store
    return store


def objects(uri: str) -> dict[str, bytes]:
    fs, base = pyarrow.fs.FileSystem.from_uri(uri)
    found = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True)):
        if info.type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(info.path) as stream:
                found[info.path[len(base) + 1 :]] = stream.read()
    return found


def test_sweep_uri_keeps_the_query_last_and_pickles_as_its_uri():
    uri = "s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http"
    assert child_uri(uri, "name") == "s3://bucket/prefix/name?endpoint_override=127.0.0.1:9000&scheme=http"
    assert child_uri("gs://bucket/", "name") == "gs://bucket/name"
    store = sweep_folder(uri, "name")
    assert store.remote and store.name == "name"
    assert pickle.loads(pickle.dumps(store)) == store
    assert pickle.loads(pickle.dumps(store)).__dict__ == {"uri": store.uri}  # no filesystem, no mirror path


def test_two_mirrors_see_each_others_files_only_through_the_bucket(s3, tmp_path, monkeypatch):
    writer = store_on(s3, tmp_path / "node_a", monkeypatch)
    reader = store_on(s3, tmp_path / "node_b", monkeypatch)
    writer.write_bytes("trials/local/t1.json", b'{"a": 1}')
    writer.write_bytes("trials/local/t2.json", b'{"b": 22}')
    assert objects(s3) == {"trials/local/t1.json": b'{"a": 1}', "trials/local/t2.json": b'{"b": 22}'}
    assert not (reader.local / "trials").exists()

    assert reader.pull_tree("trials")
    assert (reader.local / "trials/local/t2.json").read_bytes() == b'{"b": 22}'
    # a replaced object is fetched again; a deleted one is removed from the mirror
    writer.write_bytes("trials/local/t1.json", b'{"a": 1, "status": "finished"}')
    writer.delete("trials/local/t2.json")
    reader.pull_tree("trials")
    assert (reader.local / "trials/local/t1.json").read_bytes() == b'{"a": 1, "status": "finished"}'
    assert not (reader.local / "trials/local/t2.json").exists()
    assert not reader.pull("trials/local/t2.json")

    # a folder written locally (a run folder) goes up whole; unchanged files are not sent again
    run = writer.local / "runs/local/t1"
    run.mkdir(parents=True)
    (run / "sae.safetensors").write_bytes(b"\0" * 1000)
    (run / ".sae.tmp").write_bytes(b"half")  # an interrupted local write: never uploaded
    writer.push_tree("runs/local/t1")
    stamp = (run / "sae.safetensors").stat().st_mtime_ns
    uploaded = pyarrow.fs.FileSystem.from_uri(s3)[0].get_file_info(
        writer.remote_path("runs/local/t1/sae.safetensors")
    )
    writer.push_tree("runs/local/t1")
    again = pyarrow.fs.FileSystem.from_uri(s3)[0].get_file_info(
        writer.remote_path("runs/local/t1/sae.safetensors")
    )
    assert again.mtime_ns == uploaded.mtime_ns and (run / "sae.safetensors").stat().st_mtime_ns == stamp
    assert "runs/local/t1/.sae.tmp" not in objects(s3)
    assert reader.pull_tree("runs/local/t1", delete=False)
    assert (reader.local / "runs/local/t1/sae.safetensors").read_bytes() == b"\0" * 1000


KILLED_WRITER = """
import sys
from sweep.storage import SweepStore
store = SweepStore(sys.argv[1])
print("writing", flush=True)
store.write_bytes("trials/local/big.json", b"N" * (64 << 20))
print("done", flush=True)
"""


def test_an_upload_killed_mid_way_leaves_the_old_record_whole(s3, tmp_path, monkeypatch):
    import boto3

    old = store_on(s3, tmp_path / "node_a", monkeypatch)
    old.write_bytes("trials/local/big.json", b"O" * 1000)
    fs, _ = pyarrow.fs.FileSystem.from_uri(s3)
    bucket = old.remote_path().split("/")[0]
    endpoint = dict(q.split("=") for q in s3.split("?")[1].split("&"))["endpoint_override"]
    client = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1")
    env = {**os.environ, "SPARSIFY_CACHE": str(tmp_path / "node_b")}
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, s3], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        # kill it once its 64 MiB upload has started sending parts
        while not client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
            assert writer.poll() is None, "the writer ended before it was killed"
            assert time.monotonic() < deadline, "no upload started"
            time.sleep(0.01)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    finally:
        writer.kill()
    stored = objects(s3)
    assert stored["trials/local/big.json"] == b"O" * 1000  # the old record, whole
    assert [name for name in stored if name != "trials/local/big.json"] == []  # no half object anywhere
    fresh = store_on(s3, tmp_path / "node_c", monkeypatch)
    assert fresh.pull("trials/local/big.json")
    assert (fresh.local / "trials/local/big.json").read_bytes() == b"O" * 1000


def record(trial_id: str, status: str, padding: int) -> dict:
    return {
        "arm": "local", "trial_id": trial_id, "status": status, "params": {"pad": "x" * padding},
        "metrics": {EVAL_L0: 1.0, EVAL_CE_LOSS_INCREASE: 0.5}, "error": None, "wall_time_s": 1.0,
    }  # fmt: skip


def test_a_reader_never_sees_half_a_record(s3, tmp_path, monkeypatch):
    writer = store_on(s3, tmp_path / "node_a", monkeypatch)
    reader = store_on(s3, tmp_path / "node_b", monkeypatch)
    versions = [record("local_00000", "interrupted", 1 << 20), record("local_00000", "finished", 2 << 20)]
    write_trial_record(writer, versions[0])
    done = threading.Event()

    def rewrite() -> None:
        for i in range(12):
            write_trial_record(writer, versions[(i + 1) % 2])
        done.set()

    thread = threading.Thread(target=rewrite)
    thread.start()
    seen = set()
    while not done.is_set():
        found = read_trial_record(reader, "local", "local_00000")
        assert found is not None, "a record was unreadable or missing while it was being replaced"
        seen.add((found.status, len(found.params["pad"])))
    thread.join()
    assert seen <= {("interrupted", 1 << 20), ("finished", 2 << 20)}
    assert read_trial_record(reader, "local", "local_00000").status == "interrupted"  # 12 rewrites: even


def test_report_reads_and_writes_a_sweep_on_the_bucket(s3, tmp_path, monkeypatch, capsys):
    store = store_on(s3, tmp_path / "node_a", monkeypatch)
    losses = {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}
    space = {"space": {"arms": {"local": {"loss": losses, "search": {}}}}, "base": {}}
    store.write_bytes(SPACE_RECORD, json.dumps(space).encode())
    for i, (l0, ce) in enumerate([(10.0, 0.4), (100.0, 0.2)]):
        entry = record(f"local_0000{i}", "finished", 0)
        entry["metrics"] = {EVAL_L0: l0, EVAL_CE_LOSS_INCREASE: ce}
        write_trial_record(store, entry)

    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path / "laptop"))  # another machine reads it
    assert [r.trial_id for r in load_records(s3)] == ["local_00000", "local_00001"]
    assert report_main([s3, "--out", "-"]) == 0
    printed = capsys.readouterr().out
    assert "# Sweep report: my_sweep" in printed and f"2 trials in `{s3}`" in printed
    report = build_report(s3)
    stored = objects(s3)
    assert stored["report/report.md"] == report.read_bytes()
    assert stored["report/frontier_l0.png"].startswith(b"\x89PNG")


def test_a_bucket_that_is_not_there_is_one_line(s3_endpoint, monkeypatch, capsys, tmp_path):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    from sparsify import SparsifyError
    from sweep.storage import check_sweep_storage

    uri = f"s3://no-such-bucket/sweeps/x?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    with pytest.raises(SparsifyError) as raised:
        check_sweep_storage(SweepStore(uri), "storage_path")
    message = str(raised.value)
    assert message.startswith(f"storage_path: {uri} is not writable (") and "\n" not in message
