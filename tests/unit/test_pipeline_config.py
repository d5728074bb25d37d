"""The run config (pipeline/config.py) and the cluster launcher config (cluster.yaml)."""

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ivg.config import ConfigError, GUIDANCE
from pipeline.config import load_config
from helpers.pipeline import ROOT, SMOKE


def test_smoke_config_runs_every_cell_of_the_grid():
    config = load_config(SMOKE)
    assert {(m.token, m.chunk) for m in config.methods} == {(t, c) for t in GUIDANCE for c in GUIDANCE}
    assert config.generation.seed == config.run.seed
    assert config.data.path and config.run.output is None


def test_flags_override_the_config_and_change_the_fingerprint():
    config = load_config(SMOKE)
    moved = load_config(SMOKE, input="other.parquet", output="/tmp/elsewhere")
    assert (moved.data.path, moved.run.output) == ("other.parquet", "/tmp/elsewhere")
    assert moved.fingerprint() != config.fingerprint()  # other prompts: other rows
    assert load_config(SMOKE, output="/tmp/x").fingerprint() == config.fingerprint()  # same rows, elsewhere


@pytest.mark.parametrize("patch,field", [
    ({"pipeline": {"placement": "everywhere"}}, "pipeline.placement"),
    ({"pipeline": {"servers": {"base": {"replicas": 0}}}}, "pipeline.servers.base.replicas"),
    ({"pipeline": {"servrs": {}}}, "config.pipeline"),
    ({"pipeline": {"shard_size": 0}}, "pipeline.shard_size"),
    ({"data": {"path": "x.jsonl", "columns": ["response"]}}, "data.columns"),
    ({"methods": [{"token": "implicit", "chunk": "none", "W": 2}]}, "methods[0].chunk"),
    ({"eval": {"gold": None, "alpaca": None}}, "eval"),
])
def test_bad_values_are_rejected_naming_the_field(tmp_path, patch, field):
    data = yaml.safe_load(SMOKE.read_text())
    for key, value in patch.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_config(tmp_path / "c.yaml")


def test_cluster_yaml_passes_rays_own_schema_and_puts_roles_on_separate_gpus():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # the schema `ray up` checks

    types = raw["available_node_types"]
    offering = {r: [t for t, spec in types.items() if spec["resources"].get(r)] for r in ("base_gpu", "guide_gpu")}
    # one named resource per GPU: a server asking for {base_gpu: 1} or {guide_gpu: 1} plus num_gpus: 1
    # gets a GPU of its own; the implicit pair and the reward model need two guide nodes
    for resource, node_types in offering.items():
        assert node_types and all(types[t]["resources"][resource] == types[t]["resources"]["GPU"] for t in node_types)
    assert sum(types[t]["min_workers"] for t in offering["guide_gpu"]) >= 2
    assert "GPU" not in types[raw["head_node_type"]]["resources"]
    assert any("pip install -e" in c for c in raw["setup_commands"])

    raw["available_node_types"]["gpu_base"]["resourcez"] = {"GPU": 1}  # a typo is caught
    with pytest.raises(Exception, match="resourcez"):
        validate_config(prepare_config(raw))
