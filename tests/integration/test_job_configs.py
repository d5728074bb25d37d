"""Every shipped config loads, validates and runs a few prompts, with tiny models standing in."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from ivg.config import from_dict
from ivg.engine import Engine
from pipeline.config import Config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml"))
TINY = {"causal_lm": "tiny:{role}", "token_reward": "tiny:trm", "classifier": "tiny:rm"}


def test_the_shipped_configs_are_found():
    assert len(CONFIGS) >= 6, CONFIGS  # a glob that finds nothing would make the test below check nothing


def tiny_stand_ins(config: Config) -> dict:
    """The config with its models swapped for tiny ones of the same kind (the guides that guide
    training would provide, too) and a handful of prompts."""
    data = config.resolved()
    data.pop("experiment"), data.pop("train")
    planned = {k: v for k, v in dataclasses.asdict(config.planned_models()).items() if v}
    data["models"] = {role: {**spec, "name": TINY[spec.get("kind", "causal_lm")].format(role=role),
                             "device": "cpu", "dtype": "float32"} for role, spec in planned.items() if spec}
    data["decode"] = {**data["decode"], "max_new_tokens": 6}
    data["data"] = {"path": "unused.jsonl"}
    return data


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_runs_on_tiny_models(path):
    config = from_dict(Config, yaml.safe_load(path.read_text()), "config")  # every section, as shipped
    stand_in = from_dict(Config, tiny_stand_ins(config), "config")
    engine = Engine.local(stand_in.generation)
    prompts = [{"id": "a", "prompt": "The film"}, {"id": "b", "prompt": "Summarize: a cat sat."}]
    for method in stand_in.methods:
        rows = engine.run(prompts, method)
        assert [r["status"] for r in rows] == ["ok", "ok"], rows
        assert all(r["method"] == method.label for r in rows)
