"""Every shipped config loads, validates and runs a few prompts, with tiny models standing in."""

from pathlib import Path

import pytest
import yaml

from ivg.config import from_dict
from ivg.engine import Engine
from pipeline.config import Config
from pipeline.eval_config import EvalConfig

CONFIGS = sorted(Path("jobs/configs").glob("*.yaml"))
TINY = {"causal_lm": "tiny:{role}", "token_reward": "tiny:trm", "classifier": "tiny:rm"}


def tiny_stand_ins(data: dict) -> dict:
    """The config with its models swapped for tiny ones of the same kind (the guides that guide
    training would provide, too) and a handful of prompts."""
    data = {k: v for k, v in data.items() if k not in ("experiment", "train")}
    models = dict(data["models"])
    models.setdefault("tuned", {"name": "trained"})
    models.setdefault("untuned", {"name": "trained"})
    models.setdefault("explicit", {"name": "trained", "kind": "token_reward"})
    data["models"] = {role: {**spec, "name": TINY[spec.get("kind", "causal_lm")].format(role=role),
                             "device": "cpu", "dtype": "float32"} for role, spec in models.items()}
    data["decode"] = {**data.get("decode", {}), "max_new_tokens": 6}
    data["data"] = {"path": "unused.jsonl"}
    return data


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_runs_on_tiny_models(path):
    data = yaml.safe_load(path.read_text())
    config = from_dict(Config, tiny_stand_ins(data), "config")
    if data.get("eval") is not None:
        EvalConfig.from_dict(data["eval"])
    engine = Engine.local(config.generation)
    prompts = [{"id": "a", "prompt": "The film"}, {"id": "b", "prompt": "Summarize: a cat sat."}]
    for method in config.methods:
        rows = engine.run(prompts, method)
        assert [r["status"] for r in rows] == ["ok", "ok"], rows
        assert all(r["method"] == method.label for r in rows)
