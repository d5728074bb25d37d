"""Every config value is checked when the config loads: integers the engine and Parquet can store,
templates whose only placeholder is {prompt}, Ray resource quantities, carried columns, and YAML
itself (duplicate keys, alias bombs). Each error is one line naming the field (or file and line)."""

import time

import pytest
import yaml

from ivg.config import ConfigError, ModelSpec
from ivg.models import load, prompt_ids
from pipeline.config import load_config
from helpers.pipeline import SMOKE, tiny_config, write_prompts


def write(tmp_path, patch: dict | None = None, text: str | None = None):
    data = yaml.safe_load(SMOKE.read_text())
    for key, value in (patch or {}).items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    (tmp_path / "c.yaml").write_text(text if text is not None else yaml.safe_dump(data))
    return tmp_path / "c.yaml"


def refused(path, pattern: str) -> str:
    with pytest.raises(ConfigError, match=pattern) as e:
        load_config(path)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


BASE = {"name": "tiny:base", "dtype": "float64"}
BAD = {  # patch of the smoke config -> the error it must give
    "seed beyond int64": ({"run": {"seed": 2**63}}, r"run.seed: 9223372036854775808 is out of range: integers are stored as int64"),
    "seed below int64": ({"run": {"seed": -2**63 - 1}}, r"run.seed: .* out of range"),
    "W beyond int32": ({"methods": [{"chunk": "explicit", "W": 2**31, "K": 1}]}, r"methods\[0\].W: 2147483648 is too large: it is stored as int32"),
    "K beyond int32": ({"methods": [{"chunk": "explicit", "W": 1, "K": 2**40}]}, r"methods\[0\].K: .* int32"),
    "W*K beyond int32": ({"methods": [{"chunk": "explicit", "W": 2**16, "K": 2**16}]}, r"methods\[0\].W\*K: .* int32"),
    "L beyond int32": ({"methods": [{"chunk": "explicit", "W": 2, "K": 2, "L": 2**31}]}, r"methods\[0\].L: .* int32"),
    "max_new_tokens beyond int32": ({"decode": {"max_new_tokens": 2**31}}, r"decode.max_new_tokens: .* int32"),
    "max_new_tokens beyond int64": ({"decode": {"max_new_tokens": 10**30}}, r"decode.max_new_tokens: .* int64"),
    "shard_size beyond int32": ({"pipeline": {"shard_size": 2**31}}, r"pipeline.shard_size: .* int32"),
    "read_batch_rows beyond int64": ({"data": {"read_batch_rows": 2**64}}, r"data.read_batch_rows: .* int64"),
    "template with another placeholder": ({"models": {"base": {**BASE, "template": "Review of {movie}: {prompt}"}}},
                                          r"models.base.template: .*placeholder\(s\) \['\{movie\}'\]; the only placeholder is \{prompt\}"),
    "template with a positional placeholder": ({"models": {"base": {**BASE, "template": "{prompt} {0}"}}},
                                               r"models.base.template: .*\['\{0\}'\]"),
    "template with a format spec": ({"models": {"base": {**BASE, "template": "{prompt:>20}"}}},
                                    r"models.base.template: .*\['\{prompt:>20\}'\]"),
    "template with a lone brace": ({"models": {"base": {**BASE, "template": "{prompt} }"}}},
                                   r"models.base.template: .*not a format string.*literal brace"),
    "template without the prompt": ({"models": {"base": {**BASE, "template": "{{prompt}}"}}},
                                    r"models.base.template: .*does not contain \{prompt\}"),
    "resource not a number": ({"pipeline": {"servers": {"base": {"resources": {"base_gpu": "one"}}}}},
                              r"pipeline.servers.base.resources.base_gpu: expected a number, got 'one'"),
    "resource negative": ({"pipeline": {"servers": {"base": {"resources": {"base_gpu": -1}}}}},
                          r"pipeline.servers.base.resources.base_gpu: must be a finite number >= 0"),
    "resource named CPU": ({"pipeline": {"servers": {"base": {"resources": {"CPU": 1}}}}},
                           r"pipeline.servers.base.resources.CPU: use num_cpus / num_gpus instead"),
    "resource name not a string": ({"pipeline": {"servers": {"base": {"resources": {1: 1}}}}},
                                   r"pipeline.servers.base.resources: expected str, got 1"),
    "resource too fine": ({"pipeline": {"servers": {"base": {"resources": {"base_gpu": 0.00001}}}}},
                          r"resources.base_gpu: 1e-05 is finer than Ray's resolution"),
    "num_gpus not whole": ({"pipeline": {"servers": {"base": {"num_gpus": 1.5}}}},
                           r"pipeline.servers.base.num_gpus: 1.5: more than one GPU must be a whole number"),
    "num_cpus infinite": ({"pipeline": {"servers": {"colocated": {"num_cpus": float("inf")}}}},
                          r"pipeline.servers.colocated.num_cpus: must be a finite number, got inf"),
    "search_cpus not a number": ({"pipeline": {"search_cpus": float("nan")}}, r"pipeline.search_cpus: must be a finite"),
    "timeout infinite": ({"pipeline": {"start_timeout_s": float("inf")}}, r"pipeline.start_timeout_s: must be a finite"),
    "carried column twice": ({"data": {"columns": ["dataset", "dataset"]}},
                             r"data.columns: \['dataset'\] listed more than once"),
    "carried column that is the id": ({"data": {"id_column": "uid", "columns": ["uid"]}},
                                      r"data.columns: \['uid'\] is already read as the id or the prompt"),
}


@pytest.mark.parametrize("case", BAD)
def test_values_the_engine_cannot_represent_are_refused_at_load(tmp_path, case):
    patch, pattern = BAD[case]
    if "models" in patch:  # keep the other roles
        patch = {"models": {**yaml.safe_load(SMOKE.read_text())["models"], **patch["models"]}}
    refused(write(tmp_path, patch), pattern)


def test_the_largest_values_that_fit_are_accepted(tmp_path):
    config = load_config(write(tmp_path, {"run": {"seed": 2**63 - 1},
                                          "methods": [{"chunk": "explicit", "W": 1, "K": 2**31 - 1, "L": 2**31 - 1}],
                                          "pipeline": {"servers": {"base": {"resources": {"base_gpu": 0.0001}}}}}))
    assert config.run.seed == 2**63 - 1 and config.methods[0].K == 2**31 - 1
    assert config.pipeline.servers.base.resources == {"base_gpu": 0.0001}


def test_literal_braces_stay_literal_in_templates_and_prompts():
    spec = ModelSpec("tiny:base", template="{{json}}: {prompt}", dtype="float64")
    spec.validate("models.base")
    loaded = load(spec)
    prompt = "a {prompt} and {0} and }{ braces"  # text, never a format string
    text = loaded.tokenizer.decode(prompt_ids(loaded, prompt))
    assert text == "{json}: a {prompt} and {0} and }{ braces"


# ---------------------------------------------------------------- YAML itself

def test_duplicate_keys_are_an_error_naming_the_key_and_line(tmp_path):
    text = SMOKE.read_text().replace("  seed: 0\n", "  seed: 0\n  seed: 5\n", 1)
    message = refused(write(tmp_path, text=text), r"c.yaml: line \d+: duplicate key 'seed' \(first on line \d+\)")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t == "  seed: 5")
    assert f"line {line}:" in message
    nested = SMOKE.read_text().replace("    colocated: {num_cpus: 0.5, torch_threads: 1}",
                                       "    colocated: {num_cpus: 0.5, num_cpus: 2}")
    refused(write(tmp_path, text=nested), r"duplicate key 'num_cpus'")


def test_anchors_and_merge_keys_still_work(tmp_path):
    text = SMOKE.read_text().replace("    base: {num_cpus: 0.25}", "    base: &role {num_cpus: 0.25}") \
        .replace("    implicit: {num_cpus: 0.25}", "    implicit: {<<: *role, num_cpus: 0.3}")
    config = load_config(write(tmp_path, text=text))
    assert config.pipeline.servers.implicit.num_cpus == 0.3 and config.pipeline.servers.base.num_cpus == 0.25


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    # seven levels of nine aliases, 9**7 (4.8 million) strings once expanded, where no type check
    # looks inside (a resources mapping): only the loader can stop it
    levels = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]
    text = SMOKE.read_text().replace("    base: {num_cpus: 0.25}", "    base:\n      resources:\n" +
                                     "".join(f"        {level}\n" for level in levels).rstrip("\n"))
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "a5: &a5" in t)  # the first beyond: 9**6
    start = time.perf_counter()
    refused(write(tmp_path, text=text), rf"c.yaml: line {line}: the config expands to more than 100000 values")
    assert time.perf_counter() - start < 5


def test_a_recursive_alias_is_refused(tmp_path):
    refused(write(tmp_path, text="run: &r {name: x, seed: *r}\n"), r"line 1: an alias refers to itself")


# ---------------------------------------------------------------- the search shape against memory

def capacity_config(tmp_path, prompts: int, shard_size: int, W: int, K: int):
    path = write_prompts(tmp_path / "p.jsonl", [f"p {i}" for i in range(2)])
    return tiny_config(path, tmp_path / "out", [{"token": "implicit", "chunk": "explicit", "W": W, "K": K, "L": 3}],
                       placement="colocated", shard_size=shard_size, search_actors=2)


NODE = {"Alive": True, "Resources": {"CPU": 2.0, "memory": 8 * 2**30}}


def test_a_search_shape_beyond_the_nodes_memory_is_refused_naming_the_field(tmp_path):
    from ivg.engine import needed_roles
    from pipeline.capacity import check_capacity, needs

    config = capacity_config(tmp_path, 10_000, 10_000, 16, 16)
    [need] = needs(config, config.pipeline.plan(needed_roles(config.generation), cluster_gpus=0)[1])
    assert need.server == "colocated"
    assert need.rows == 2 * 10_000 * 256  # two search actors' shards merged on one server
    with pytest.raises(ConfigError, match=r"^pipeline.shard_size: model server colocated needs at least [\d.]+ GiB "
                                          r"for 5120000 rows .* the largest node that can hold it has 8.0 GiB") as e:
        check_capacity(config, [NODE], prompts=10_000)
    assert "\n" not in str(e.value)
    check_capacity(config, [NODE], prompts=4)  # a shard is no larger than the input: 4 prompts fit
    check_capacity(capacity_config(tmp_path, 16, 16, 2, 2), [NODE], prompts=16)  # the smoke shape fits
    check_capacity(config, [{**NODE, "Alive": False}], prompts=10_000)  # no node to compare with: not refused here
