"""Inputs and outputs that changed under a run, through the real pipeline: an input edited in place
recomputes exactly the shards whose rows changed (and the manifest says which); symlinks and other
foreign entries in shards/ are set aside, never followed, and their shards computed again; a search
shape that cannot fit in the nodes' memory is refused before anything starts or is written."""

import json
import os
import shutil

import pytest

from ivg.config import ConfigError
from pipeline import coordinator
from pipeline.coordinator import generate
from helpers.pipeline import read_rows, tiny_config, write_prompts
from helpers.reliability import METHODS, content, exactly_once, reference_rows

PROMPTS = [f"prompt number {i}:" for i in range(6)]
IDS = [f"p{i}" for i in range(6)]


def files(out) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("*.parquet")}


@pytest.mark.timeout(180)
def test_an_edited_input_and_foreign_entries_in_shards_recompute_exactly_their_shards(ray_local, tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    config = tiny_config(path, out, METHODS[:1], shard_size=2, search_actors=1)
    assert generate(config).done == 3
    before = files(out)
    first, second, third = sorted(before)

    # 1. row 3 (the second shard) edited in place
    edited = [*PROMPTS[:3], "an edited prompt:", *PROMPTS[4:]]
    write_prompts(path, edited)
    # 2. the first shard's file replaced by a symlink to a valid copy elsewhere, and foreign entries
    shards, elsewhere = out / "shards", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(shards / first, elsewhere / "copy.parquet")
    os.remove(shards / first)
    (shards / first).symlink_to(elsewhere / "copy.parquet")  # a valid shard, but not in this directory
    (shards / "more.parquet").symlink_to(elsewhere)  # evaluation globs shards/: never read through it
    (shards / "sub").mkdir()
    shutil.copy(shards / third, shards / "sub" / third)  # a nested copy would double its rows
    (shards / "extra.parquet").write_bytes((shards / third).read_bytes())

    logs = []
    summary = generate(config, log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    assert (summary.status, summary.done, summary.skipped) == ("finished", 2, 1)  # shards 0 and 1 computed
    after = files(out)
    assert after[third] == before[third]  # untouched
    [new] = sorted(set(after) - set(before))
    assert second.startswith("000001-") and new.startswith("000001-")
    assert (out / "stale" / second).exists()  # the edited rows' old file, outside shards/
    assert sorted(p.name for p in (out / "corrupt").iterdir()) == sorted([first, "more.parquet", "sub", "extra.parquet"])
    assert (out / "corrupt" / first).is_symlink() and (elsewhere / "copy.parquet").is_file()  # the link moved
    assert not (shards / first).is_symlink() and sorted(p.name for p in shards.iterdir()) == sorted(after)
    manifest = json.loads((out / "manifest.json").read_text())
    old_id, new_id = second.removesuffix(".parquet"), new.removesuffix(".parquet")
    assert manifest["shards"][old_id]["state"] == "replaced" and manifest["shards"][old_id]["replaced_by"] == new_id
    assert manifest["shards"][new_id]["replaces"] == old_id and manifest["shards"][new_id]["changed_ids"] == ["p3"]
    assert manifest["runs"][-1]["replaced"] == {new_id: {"was": old_id, "changed_ids": ["p3"]}}
    assert any(f"shard {old_id}: input rows ['p3'] changed" in line for line in logs), logs

    rows = read_rows(out)
    assert exactly_once(rows, IDS, ["base"])
    assert {r["id"]: r["prompt"] for r in rows} == {f"p{i}": p for i, p in enumerate(edited)}
    assert {(r["id"], r["method"]): content(r) for r in rows} == reference_rows(config)

    write_prompts(path, edited[:4])  # 3. the input shrank: shard 2's file is no longer the input's
    summary = generate(config)
    assert (summary.done, summary.skipped, summary.placement) == (0, 2, None)  # no actor started
    assert exactly_once(read_rows(out), IDS[:4], ["base"]) and len(list((out / "stale").iterdir())) == 2


@pytest.mark.timeout(120)
def test_a_search_shape_beyond_memory_is_refused_before_anything_starts(ray_local, tmp_path, monkeypatch):
    path = write_prompts(tmp_path / "p.jsonl", [f"prompt {i}" for i in range(10_000)])
    out = tmp_path / "out"
    config = tiny_config(path, out, [{"token": "implicit", "chunk": "explicit", "W": 16, "K": 16, "L": 4}],
                         placement="colocated", shard_size=10_000)

    def must_not_start(config):
        raise AssertionError("actors started for a shape that cannot fit")

    monkeypatch.setattr(coordinator, "start_cluster", must_not_start)
    with pytest.raises(ConfigError, match=r"^pipeline.shard_size: model server colocated needs at least .* for "
                                          r"5120000 rows \(pipeline.shard_size=10000 prompts x W\*K=256 of methods\[0\] "
                                          r"x 2 searches merged\)"):
        generate(config)
    assert not out.exists()  # nothing written
