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
    if data["decode"]["max_new_tokens"] != "auto":  # auto stays: the tiny contexts are cut instead
        data["decode"] = {**data["decode"], "max_new_tokens": 6}
    data["data"] = {"path": "unused.jsonl"}
    return data


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_runs_on_tiny_models(path):
    config = from_dict(Config, yaml.safe_load(path.read_text()), "config")  # every section, as shipped
    stand_in = from_dict(Config, tiny_stand_ins(config), "config")
    engine = Engine.local(stand_in.generation)
    if stand_in.decode.max_new_tokens == "auto":  # a 48-token context: responses fill what is left
        for role in engine.roles.roles.values():
            for m in role.models:
                m.model.config.n_positions = 48
    prompts = [{"id": "a", "prompt": "The film"}, {"id": "b", "prompt": "Summarize: a cat sat."}]
    for method in stand_in.methods:
        rows = engine.run(prompts, method)
        assert [r["status"] for r in rows] == ["ok", "ok"], rows
        assert all(r["method"] == method.label for r in rows)


def shipped(name: str) -> dict:
    return yaml.safe_load(next(p for p in CONFIGS if p.stem == name).read_text())


def test_paper_settings_configs_use_the_papers_search():
    """The configs that claim the paper's settings: its decoding, finished beams repeated K times, and
    EOS appended before scoring wherever the chunk scorer shares the base's vocabulary."""
    paper = from_dict(Config, shipped("sentiment-paper"), "config")
    d = paper.decode
    assert (d.max_new_tokens, d.stop, d.stop_at_eos, d.temperature, d.top_k, d.top_p) == (50, (), False, 0.7, 0, 1.0)
    cbs = [m for m in paper.methods if m.chunk != "none"]
    assert {(m.W, m.K, m.L) for m in cbs if m.W > 1} == {(4, 4, 5)}
    assert all(m.finished == "repeat" and m.score_eos and m.beta_chunk == 1.0 for m in cbs)
    assert paper.planned_models().explicit.kind == "token_reward" and paper.train.token_rm is not None
    alpaca = from_dict(Config, shipped("alpaca"), "config")
    assert (alpaca.decode.top_k, alpaca.decode.max_new_tokens) == (50, "auto")
    assert all(m.finished == "repeat" for m in alpaca.methods if m.chunk != "none")
    tldr = from_dict(Config, shipped("summarization"), "config")
    assert all(m.finished == "repeat" and m.score_eos for m in tldr.methods if m.chunk != "none")
    assert tldr.eval.gold.name != tldr.models.explicit.name  # judged by a model that does not guide
    assert tldr.eval.gold.name.replace("6.9b", "1b") == tldr.models.explicit.name  # the same family, larger


def test_trained_guides_are_shared_and_the_token_rm_is_the_explicit_value():
    """The 24-token sentiment configs train the same guides (one cache entry), and their explicit value
    is the token RM; a reward probe, where asked for, takes its place (as jobs.run fits it last)."""
    default = from_dict(Config, shipped("sentiment-default"), "config")
    for name in ("sentiment-paper", "weak-to-strong"):
        other = from_dict(Config, shipped(name), "config")
        assert other.train == default.train and other.experiment.prompts == default.experiment.prompts, name
    for name in ("sentiment-default", "sentiment-paper", "weak-to-strong", "sentiment-full"):
        assert from_dict(Config, shipped(name), "config").planned_models().explicit.kind == "token_reward", name
    assert default.train.settings.heldout_prompts >= 200
    data = shipped("sentiment-default")
    data["experiment"]["explicit_probe"] = {"body": {"name": "asset:smollm2-135m-instruct"}, "path": "asset:movie-snippets"}
    assert from_dict(Config, data, "config").planned_models().explicit.kind == "classifier"
