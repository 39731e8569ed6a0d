import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).parents[2]


def test_cluster_yaml_matches_the_launcher_schema_shipped_with_ray():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    assert cluster["head_node_type"] in cluster["available_node_types"]
    # the dashboard listens on loopback only; users reach it through `ray dashboard` (SSH)
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster["head_start_ray_commands"])
