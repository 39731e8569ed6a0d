"""Nothing we start listens beyond loopback by default: the Ray dashboard (the one HTTP
service, which can run jobs) binds 127.0.0.1; a cluster reaches it through `ray dashboard`
(an SSH tunnel). Ray's own gRPC servers need the node address for multi-node clusters and
require Ray's auth token, which stays on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]

PROBE = """
import json, time, psutil, ray
from sweep.run import start_ray
context = start_ray()
host, port = context.dashboard_url.rsplit(":", 1)
time.sleep(2)
listeners = sorted({c.laddr.ip for c in psutil.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)})
print(json.dumps({"url": context.dashboard_url, "listeners": listeners}))
ray.shutdown()
"""


def test_local_sweep_dashboard_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=180, check=True
    ).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["url"].startswith("127.0.0.1:")
    assert probe["listeners"] == ["127.0.0.1"]


def test_cluster_opens_only_ssh_and_keeps_the_dashboard_on_loopback():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    # no hand-made security groups or public ingress: Ray's default group admits SSH only
    text = (ROOT / "cluster.yaml").read_text()
    for risky in ("SecurityGroupIds", "0.0.0.0/0", "--dashboard-host=0.0.0.0", "RAY_AUTH_MODE"):
        assert risky not in text
    assert "ray dashboard cluster.yaml" in text  # the documented way in: an SSH tunnel
