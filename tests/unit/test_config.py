"""Bad configs fail at load time with a message naming the field."""

import dataclasses

import pytest
import yaml

from helpers.pipeline import tiny_config, write_prompts
from helpers.reliability import METHODS
from ivg.config import ConfigError, GenerationConfig, ModelSpec, from_dict
from ivg.engine import Engine
from pipeline.coordinator import generate

BASE = """
models:
  base: {name: "tiny:base", dtype: float64}
  tuned: {name: "tiny:tuned"}
  untuned: {name: "tiny:untuned"}
  explicit: {name: "tiny:trm", kind: token_reward}
decode: {max_new_tokens: 8, temperature: 0.7, stop: ["\\n"]}
methods:
  - {token: implicit, chunk: explicit, W: 2, K: 2, L: 4}
"""


def load(text: str = BASE, **method) -> GenerationConfig:
    data = yaml.safe_load(text)
    data["methods"][0].update(method)
    return from_dict(GenerationConfig, data)


def test_valid_config_loads():
    cfg = load()
    assert cfg.methods[0].label == "tok-implicit+cbs-explicit" and cfg.decode.stop == ("\n",)


@pytest.mark.parametrize("change,field", [
    ({"W": 0}, "methods[0].W"), ({"K": 0}, "methods[0].K"), ({"L": 0}, "methods[0].L"),
    ({"token": "magic"}, "methods[0].token"), ({"chunk": "oracle"}, "methods[0].chunk"),
    ({"W": "two"}, "methods[0].W"), ({"beta": 1.0}, "methods[0]"),
    ({"chunk": "none"}, "methods[0].chunk"),  # W*K > 1 with nothing to rank beams
])
def test_bad_method_names_the_field(change, field):
    with pytest.raises(ConfigError, match=rf"^{field.replace('[', '.').replace(']', '.')}"):
        load(**change)


@pytest.mark.parametrize("edit,field", [
    (("decode", "temperature", -1.0), "decode.temperature"),
    (("decode", "top_p", 0.0), "decode.top_p"),
    (("decode", "max_new_tokens", 0), "decode.max_new_tokens"),
    (("decode", "colour", 1), "decode"),
])
def test_bad_decode_names_the_field(edit, field):
    data = yaml.safe_load(BASE)
    section, key, value = edit
    data[section][key] = value
    with pytest.raises(ConfigError, match=rf"^{field}"):
        from_dict(GenerationConfig, data)


def test_missing_guide_is_refused():
    data = yaml.safe_load(BASE)
    del data["models"]["tuned"], data["models"]["untuned"]
    with pytest.raises(ConfigError, match=r"methods\[0\].*needs models.tuned"):
        from_dict(GenerationConfig, data)


def test_token_explicit_needs_a_token_reward_model():
    data = yaml.safe_load(BASE)
    data["models"]["explicit"] = {"name": "tiny:rm", "kind": "classifier"}
    data["methods"][0]["token"] = "explicit"
    with pytest.raises(ConfigError, match=r"methods\[0\]\.token.*token_reward"):
        from_dict(GenerationConfig, data)


def test_vocabulary_mismatch_for_token_wise_guidance_is_refused():
    data = yaml.safe_load(BASE)
    data["models"]["tuned"]["name"], data["models"]["untuned"]["name"] = "tiny-b:tuned", "tiny-b:untuned"
    cfg = from_dict(GenerationConfig, data)
    with pytest.raises(ConfigError, match=r"methods\[0\]\.token: .*vocabulary"):
        Engine.local(cfg)
    data["methods"][0].update(token="none", chunk="implicit")  # chunk-level is fine across tokenizers
    Engine.local(from_dict(GenerationConfig, data))


def test_the_pipeline_refuses_mismatched_vocabularies_before_anything_starts(tmp_path):
    """From the tokenizers alone: no Ray, no weights, nothing written."""
    config = tiny_config(write_prompts(tmp_path / "p.jsonl"), tmp_path / "out", METHODS)
    other = {r: ModelSpec(f"tiny-b:{r}", dtype="float64") for r in ("tuned", "untuned")}
    with pytest.raises(ConfigError, match=r"methods\[1\].token: token-wise implicit guidance needs models.tuned"):
        generate(dataclasses.replace(config, models=dataclasses.replace(config.models, **other)))
    assert not (tmp_path / "out").exists()
