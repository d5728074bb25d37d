"""Reading prompts, cutting stable shards, atomic Parquet files and the manifest (pipeline/io.py)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import io
from helpers.pipeline import write_prompts

PROMPTS = [f"prompt {i}" for i in range(7)]


def rows_of(batches) -> list[dict]:
    return [r for b in batches for r in b.to_pylist()]


def test_every_input_form_reads_the_same_rows(tmp_path):
    """Parquet, CSV, TSV, a JSON array, JSON lines, save_to_disk folders (Dataset, DatasetDict) and a
    folder of data files (what load_dataset reads, as it would a hub id)."""
    import datasets

    jsonl = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    table = pa.Table.from_pylist(records)
    pq.write_table(table, tmp_path / "p.parquet")
    table.to_pandas().to_csv(tmp_path / "p.csv", index=False)
    table.to_pandas().to_csv(tmp_path / "p.tsv", index=False, sep="\t")
    (tmp_path / "p.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "lines.json").write_text(jsonl.read_text())  # .json holding JSON lines
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "train.jsonl").write_text(jsonl.read_text())
    want = [{"id": f"p{i}", "prompt": p, "dataset": "test"} for i, p in enumerate(PROMPTS)]
    for name in ("p.jsonl", "p.parquet", "p.csv", "p.tsv", "p.json", "lines.json", "disk", "hf"):
        assert rows_of(io.read_prompts(str(tmp_path / name), columns=("dataset",), batch_rows=3)) == want, name
    assert rows_of(io.read_prompts(str(tmp_path / "dict"), split="test", columns=("dataset",))) == want
    with pytest.raises(io.InputError, match=r"dict: a DatasetDict without the split 'train' \(data.split\); it has \['test'\]"):
        io.read_prompts(str(tmp_path / "dict"))


def test_other_column_names_and_row_number_ids(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": p, "n": i}) + "\n" for i, p in enumerate(PROMPTS)))
    rows = rows_of(io.read_prompts(str(path), id_column=None, prompt_column="text", batch_rows=2))
    assert rows == [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)]
    assert rows_of(io.read_prompts(str(path), id_column="n", prompt_column="text"))[3]["id"] == "3"  # ints -> str
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt'\]"):
        list(io.read_prompts(str(path), id_column=None))


def test_shards_are_stable_cover_every_prompt_once_and_reject_duplicate_ids(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    shards = list(io.cut_shards(io.read_prompts(str(path), batch_rows=2), 3))
    assert [len(s.rows) for s in shards] == [3, 3, 1]
    assert [r["id"] for s in shards for r in s.rows] == [f"p{i}" for i in range(7)]
    again = list(io.cut_shards(io.read_prompts(str(path), batch_rows=5), 3))  # other read batches
    assert [s.id for s in again] == [s.id for s in shards]
    assert len({s.id for s in shards}) == 3 and shards[0].id.startswith("000000-")
    assert [s.id for s in io.cut_shards(io.read_prompts(str(path)), 2)][0] != shards[0].id
    assert sum(len(s.rows) for s in io.cut_shards(io.read_prompts(str(path)), 3, limit=4)) == 4

    write_prompts(tmp_path / "dup.jsonl", ["x", "y"])
    (tmp_path / "dup.jsonl").write_text((tmp_path / "dup.jsonl").read_text() * 2)
    with pytest.raises(ValueError, match="'p0' appears twice"):
        list(io.cut_shards(io.read_prompts(str(tmp_path / "dup.jsonl")), 3))


def test_atomic_write_leaves_the_whole_file_or_nothing(tmp_path, monkeypatch):
    row = {"id": "a", "prompt": "p", "response": "r", "method": "base", "model_tokens": {"base": 3},
           "chunk_scores": [0.5], "status": "ok", "shard": "s"}
    table = io.rows_to_table([row])
    assert table.schema.field("model_tokens").type == pa.map_(pa.string(), pa.int64())
    target = tmp_path / "shards" / "s.parquet"
    io.write_parquet_atomic(table, target, {"ivg.shard": "s"})
    assert pq.read_table(target).to_pylist()[0]["model_tokens"] == [("base", 3)]
    assert pq.read_schema(target).metadata[b"ivg.shard"] == b"s"

    def crash(table, where):
        where.write_bytes(b"PAR1 half")
        raise OSError("disk full")
    monkeypatch.setattr(io.pq, "write_table", crash)
    with pytest.raises(OSError):
        io.write_parquet_atomic(table, tmp_path / "shards" / "t.parquet")
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["s.parquet"]


def test_manifest_refuses_a_directory_of_another_config(tmp_path):
    m = io.Manifest.open(tmp_path / "manifest.json", {"a": 1}, "f1")
    m.start_run()
    m.shard("s1", state="done")
    m.end_run("finished")
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["shards"] == {"s1": {"state": "done"}} and data["runs"][0]["status"] == "finished"
    assert data["runs"][0]["versions"]["pyarrow"] == pa.__version__ and "revision" in data["runs"][0]["git"]
    assert io.Manifest.open(tmp_path / "manifest.json", {"a": 1}, "f1").data["shards"]  # same config: resumes
    with pytest.raises(ValueError, match="another config"):
        io.Manifest.open(tmp_path / "manifest.json", {"a": 2}, "f2")
