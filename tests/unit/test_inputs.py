"""Bad input, bad configs, bad models (everything caught before Ray starts): each is a clear error naming the field, file or row, or a
`failed` row with its reason, and never takes its neighbours down. Also the security rules:
safe YAML, no remote code or pickles unless asked, no output path outside the output directory."""


import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ivg.config import ConfigError, ModelSpec
from ivg.engine import Engine
from ivg import models
from ivg.models import load
from ivg.tiny import tiny_tokenizer
from pipeline.config import load_config
from pipeline.coordinator import generate
from pipeline.io import InputError, child_path, cut_shards, read_prompts
from helpers.models import huge_model_folder
from helpers.pipeline import SMOKE, jsonl, tiny_config, write_prompts
from helpers.reliability import METHODS, content

LONG = "x" * 2000  # the tiny models' context is 1024 tokens (characters)


def parquet(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


def shard_rows(path, **kw) -> list[dict]:
    return [r for s in cut_shards(read_prompts(str(path), **kw), 2) for r in s.rows]


# ---------------------------------------------------------------- the whole input is wrong: InputError

BAD_INPUTS = {
    "missing id column": (lambda d: jsonl(d / "a.jsonl", b'{"prompt": "x"}'), r"missing column\(s\) \['id'\]"),
    "missing prompt column": (lambda d: jsonl(d / "a.jsonl", b'{"id": "a", "text": "x"}'),
                              r"missing column\(s\) \['prompt'\]"),
    "duplicate ids": (lambda d: jsonl(d / "a.jsonl", b'{"id": "a", "prompt": "x"}', b'{"id": "b", "prompt": "y"}',
                                      b'{"id": "a", "prompt": "z"}'), r"input rows 0 and 2: id 'a' appears twice"),
    "null id": (lambda d: jsonl(d / "a.jsonl", b'{"id": "a", "prompt": "x"}', b'{"id": null, "prompt": "y"}'),
                r"input row 1: the id is null"),
    "id not UTF-8": (lambda d: jsonl(d / "a.jsonl", b'{"id": "a", "prompt": "x"}', b'{"id": "b\xff", "prompt": "y"}'),
                     r"input row 1: id is not valid UTF-8 \(byte 1\)"),
    "id of a list type": (lambda d: jsonl(d / "a.jsonl", b'{"id": [1], "prompt": "x"}'),
                          r"column 'id' \(data.id_column\) has type list"),
    "NaN ids (a float column)": (lambda d: parquet(d / "a.parquet", id=[1.0, float("nan")], prompt=["x", "y"]),
                                 r"column 'id' \(data.id_column\) has type double"),
    "prompts of int type": (lambda d: jsonl(d / "a.jsonl", b'{"id": "a", "prompt": 1}'),
                            r"column 'prompt' \(data.prompt_column\) has type int64; prompts must be strings"),
    "NaN prompts (a float column)": (lambda d: parquet(d / "a.parquet", id=["a"], prompt=[float("nan")]),
                                     r"column 'prompt' \(data.prompt_column\) has type double"),
    "type changes mid-file": (lambda d: jsonl(d / "a.jsonl", b'{"id": "a", "prompt": "x"}', b'{"id": "b", "prompt": 5}'),
                              r"a.jsonl: .*changed from string to number in row 1"),
    "NaN literal in JSON": (lambda d: jsonl(d / "a.jsonl", b'{"id": "a", "prompt": "x"}', b'{"id": "b", "prompt": NaN}'),
                            r"a.jsonl: .*in row 1"),
    "broken JSON": (lambda d: jsonl(d / "a.jsonl", b'{"id": "a", "prompt": "x"}', b'{"id": "b", prompt'),
                    r"a.jsonl: cannot read it as jsonl: JSON parse error"),
    "empty JSONL file": (lambda d: jsonl(d / "a.jsonl"), r"a.jsonl: no prompts \(the file is empty\)"),
    "Parquet file with no rows": (lambda d: parquet(d / "a.parquet", id=pa.array([], pa.string()),
                                                    prompt=pa.array([], pa.string())), r"a.parquet: no prompts"),
    "missing file": (lambda d: d / "nowhere.jsonl", r"nowhere.jsonl: cannot read prompts \(FileNotFoundError"),
    "not a Parquet file": (lambda d: (d / "a.parquet").write_bytes(b"hello, not parquet") and d / "a.parquet",
                           r"a.parquet: cannot read it as parquet: .*magic bytes"),
    "unreadable (a directory)": (lambda d: (d / "dir.jsonl").mkdir() or d / "dir.jsonl", r"dir.jsonl: cannot read"),
    "unsupported file type": (lambda d: (d / "a.xlsx").write_bytes(b"PK") and d / "a.xlsx",
                              r"a.xlsx: cannot read prompts from a .xlsx file; expected a Parquet file .*CSV"),
    "a JSON object, not rows": (lambda d: (d / "a.json").write_text('{"id": ["a"], "prompt": ["x"]}') and d / "a.json",
                                r"a.json: column 'id' \(data.id_column\) has type list"),
    "JSON array of strings": (lambda d: (d / "a.json").write_text('["x", "y"]') and d / "a.json",
                              r"a.json: row 0 is a JSON string, not an object"),
    "broken JSON array": (lambda d: (d / "a.json").write_text('[{"id": "a", "prompt": "x"},') and d / "a.json",
                          r"a.json: cannot read it as a JSON array: JSON parse error"),
    "empty CSV file": (lambda d: (d / "a.csv").write_text("") or d / "a.csv", r"a.csv: no prompts \(the file is empty\)"),
    "CSV without the column": (lambda d: (d / "a.csv").write_text("id,text\na,x\n") and d / "a.csv",
                               r"a.csv: missing column\(s\) \['prompt'\]"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_an_error_naming_the_column_or_row(tmp_path, case):
    make, message = BAD_INPUTS[case]
    with pytest.raises(InputError, match=message):
        shard_rows(make(tmp_path))


# ---------------------------------------------------------------- one prompt is wrong: a failed row

BAD_ROWS = {
    "null prompt": (b'{"id": "b", "prompt": null}', "prompt is null"),
    "empty prompt": (b'{"id": "b", "prompt": ""}', "prompt is empty"),
    "blank prompt": (b'{"id": "b", "prompt": " \\n\\t"}', "prompt is empty"),
    "prompt not UTF-8": (b'{"id": "b", "prompt": "caf\xe9 au lait"}', "prompt is not valid UTF-8 (byte 3)"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_prompt_travels_as_its_rows_error_and_spares_its_neighbours(tmp_path, case):
    line, error = BAD_ROWS[case]
    rows = shard_rows(jsonl(tmp_path / "a.jsonl", b'{"id": "a", "prompt": "x"}', line, b'{"id": "c", "prompt": "z"}'))
    assert [(r["id"], r["error"]) for r in rows] == [("a", None), ("b", error), ("c", None)]


UNDECODABLE = {  # strings that have no UTF-8 form, in each text format: each fails its own row only
    "JSONL, an unpaired surrogate escape": ("a.jsonl", b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "x \\ud800 y"}\n'
                                            b'{"id": "c", "prompt": "z"}\n'),
    "JSON array, an unpaired surrogate escape": ("a.json", b'[{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "x \\udfff"},'
                                                 b' {"id": "c", "prompt": "z"}]'),
    "JSON array, bytes that are not UTF-8": ("a.json", b'[{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "caf\xe9"},'
                                             b' {"id": "c", "prompt": "z"}]'),
    "CSV, bytes that are not UTF-8": ("a.csv", b'id,prompt\na,x\nb,caf\xe9\nc,z\n'),
}


@pytest.mark.parametrize("case", UNDECODABLE)
def test_an_undecodable_string_fails_only_its_row(tmp_path, case):
    name, data = UNDECODABLE[case]
    (tmp_path / name).write_bytes(data)
    rows = shard_rows(tmp_path / name)
    assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[0]["error"] is rows[2]["error"] is None
    assert rows[1]["error"].startswith("prompt is not valid UTF-8 (byte ")


def test_csv_ids_and_prompts_stay_text_as_written(tmp_path):
    (tmp_path / "a.csv").write_bytes(b'id,prompt,n\n007,"two\nlines, one comma",1\n8,,2\n')
    rows = shard_rows(tmp_path / "a.csv", columns=("n",))
    assert [(r["id"], r["prompt"], r["n"], r["error"]) for r in rows] == [
        ("007", "two\nlines, one comma", 1, None), ("8", "", 2, "prompt is empty")]


def test_an_hub_id_without_the_hub_fails_at_once_naming_the_path(monkeypatch):
    from ivg.eval import alpaca

    monkeypatch.setattr(alpaca, "hub_reachable", lambda: False)
    with pytest.raises(InputError, match=r"org/no-such-set: not a file or folder here, and the HF hub is unreachable"):
        read_prompts("org/no-such-set")


def test_invalid_utf8_in_a_parquet_binary_column_is_a_failed_row(tmp_path):
    path = parquet(tmp_path / "a.parquet", id=["a", "b"], prompt=pa.array([b"ok", b"bad \xff"], pa.binary()))
    assert [r["error"] for r in shard_rows(path)] == [None, "prompt is not valid UTF-8 (byte 4)"]


def test_too_long_prompt_fails_its_row_or_is_cut_from_the_left(tmp_path, make_config):
    from helpers.models import cell

    config = make_config([cell("implicit", "explicit")])
    rows = [{"id": "a", "prompt": "the movie was"}, {"id": "b", "prompt": "0123456789" + LONG}]
    failed = Engine.local(config).run(rows, config.methods[0])
    assert failed[0]["status"] == "ok" and failed[1]["status"] == "failed"
    assert "exceeds the context of tiny:base (1024 tokens)" in failed[1]["error"] and failed[1]["truncated"] == 0

    cut = Engine.local(config, truncate="left").run(rows, config.methods[0])
    # "Review: " (8) + the prompt + 10 new tokens must fit 1024 characters: cut 2010 - 1006
    assert [r["truncated"] for r in cut] == [0, 1004] and all(r["status"] == "ok" for r in cut)
    assert content(cut[0]) == content(failed[0])  # a prompt that fits is untouched
    alone = Engine.local(config).run([{"id": "b", "prompt": rows[1]["prompt"][1004:]}], config.methods[0])[0]
    assert content(cut[1]) == {**content(alone), "truncated": 1004, "prompt": rows[1]["prompt"]}  # = the cut prompt


# ---------------------------------------------------------------- configs

def write_config(tmp_path, text: str):
    (tmp_path / "c.yaml").write_text(text)
    return tmp_path / "c.yaml"


def smoke_with(**sections) -> str:
    data = yaml.safe_load(SMOKE.read_text())
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return yaml.safe_dump(data)


BAD_CONFIGS = {
    "invalid YAML": ("run: {name: smoke\nseed: [", r"(?s)c.yaml: invalid YAML: .*line \d+, column \d+"),
    "unknown key": (smoke_with(pipeline={"shard_sise": 4}), r"config.pipeline: unknown key\(s\) \['shard_sise'\]"),
    "YAML that builds Python objects": ("run: !!python/object/apply:os.system ['echo hacked']",
                                        r"invalid YAML: could not determine a constructor"),
    "not a mapping": ("- a\n- b\n", r"the config must be a mapping"),
    "bad truncate": (smoke_with(data={"truncate": "middle"}), r"data.truncate: 'middle' is not one of"),
    "run name with a path": (smoke_with(run={"name": "../../etc"}), r"run.name: '../../etc' must be a plain name"),
    "method name with a path": (smoke_with(methods=[{"name": "../x"}]), r"methods\[0\].name: '../x' must be a plain"),
    "eval file outside the run": (smoke_with(eval={"gold": {"name": "tiny:rm"}, "report": "/etc/report.md"}),
                                  r"eval.report: '/etc/report.md' must be a relative path"),
    "zero timeout": (smoke_with(pipeline={"call_timeout_s": 0}), r"pipeline.call_timeout_s: must be > 0"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_is_refused_naming_the_field(tmp_path, case):
    text, message = BAD_CONFIGS[case]
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, text))


def test_missing_config_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read the config"):
        load_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- models

def test_unknown_model_is_refused_before_anything_starts(tmp_path):
    config = tiny_config(write_prompts(tmp_path / "p.jsonl"), tmp_path / "out", METHODS)
    models = type(config.models)(**{**config.models.__dict__, "tuned": ModelSpec(str(tmp_path / "no-such-model"))})
    with pytest.raises(ConfigError, match=r"models.tuned.name: cannot load '.*no-such-model'"):
        generate(type(config)(**{**config.__dict__, "models": models}))
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_model_that_cannot_fit_in_memory_is_refused_before_loading(tmp_path):
    with pytest.raises(MemoryError, match=r"its weights need \d+\.\d GiB in torch.float32, but cpu has only"):
        load(ModelSpec(str(huge_model_folder(tmp_path / "huge")), device="cpu"))


# ---------------------------------------------------------------- security

def test_remote_code_only_when_the_config_sets_it(monkeypatch):
    seen = []
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda name, **kw: seen.append(kw) or tiny_tokenizer("tiny"))
    models.load_tokenizer(ModelSpec("org/model"))
    models.load_tokenizer(ModelSpec("org/model", trust_remote_code=True))
    assert [kw["trust_remote_code"] for kw in seen] == [False, True]
    assert load_config(SMOKE).models.base.trust_remote_code is False


@pytest.mark.parametrize("name", ["../x.parquet", "a/b.parquet", "/etc/passwd", "..", ""])
def test_output_file_names_cannot_leave_their_folder(tmp_path, name):
    with pytest.raises(ValueError, match="is not a plain file name"):
        child_path(tmp_path / "shards", name)
    assert child_path(tmp_path / "shards", "000001-abc.parquet").parent == tmp_path / "shards"
