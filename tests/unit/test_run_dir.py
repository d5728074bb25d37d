"""The run directory under change (pipeline/io.py, pipeline/evaluate.py): shard ids that follow their
rows' content, foreign entries of shards/ set aside without being followed, the one-driver lock,
and evaluation that refuses an unfinished generation (or labels it partial)."""

import json
import os

import pytest

from ivg.eval.config import EvalConfig, GoldSpec
from pipeline import io
from pipeline.evaluate import evaluate_run
from helpers import eval_fakes
from helpers.pipeline import write_prompts

PROMPTS = [f"prompt {i}" for i in range(6)]


def shard_ids(path, columns=()) -> list[str]:
    return [s.id for s in io.cut_shards(io.read_prompts(str(path), columns=columns), 2)]


def test_a_shard_id_covers_its_rows_prompts_and_carried_columns(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    before = shard_ids(path, ("dataset",))
    assert shard_ids(path, ("dataset",)) == before  # stable
    write_prompts(path, [*PROMPTS[:3], "prompt 3, edited in place", *PROMPTS[4:]])
    after = shard_ids(path, ("dataset",))
    assert [a == b for a, b in zip(after, before)] == [True, False, True]  # exactly the shard of row 3
    assert after[1].startswith("000001-")
    write_prompts(path, PROMPTS, extra={"dataset": "other"})  # a carried column reaches the output rows too
    assert all(a != b for a, b in zip(shard_ids(path, ("dataset",)), before))
    assert all(io.SHARD_FILE.fullmatch(f"{i}.parquet") for i in before)


def test_foreign_entries_of_shards_are_set_aside_never_followed(tmp_path):
    shards, aside = tmp_path / "shards", tmp_path / "corrupt"
    shards.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.parquet").write_bytes(b"someone else's file")
    ours = "000000-0123456789ab.parquet"
    (shards / ours).write_bytes(b"a shard")
    (shards / "000001-0123456789ab.parquet").symlink_to(elsewhere / "precious.parquet")  # a shard's name, a link
    (shards / "run.parquet").symlink_to(elsewhere)  # a link to a folder
    (shards / "dangling.parquet").symlink_to(tmp_path / "nothing")
    (shards / "000002-0123456789ab.parquet").mkdir()  # a folder with a shard's name
    (shards / "notes.txt").write_text("x")
    (shards / "000003-0123456789ab.parquet.tmp-1f").write_bytes(b"half")  # a writer's temp: left to its cleaner
    by_index, foreign = io.shard_entries(shards, aside)
    assert by_index == {0: [ours]}
    assert sorted(foreign) == sorted(["000001-0123456789ab.parquet", "run.parquet", "dangling.parquet",
                                      "000002-0123456789ab.parquet", "notes.txt"])
    assert sorted(p.name for p in shards.iterdir()) == sorted([ours, "000003-0123456789ab.parquet.tmp-1f"])
    assert (aside / "run.parquet").is_symlink() and (aside / "dangling.parquet").is_symlink()
    assert (elsewhere / "precious.parquet").read_bytes() == b"someone else's file"  # moved the link, not the file
    (shards / "notes.txt").write_text("again")
    io.shard_entries(shards, aside)
    assert (aside / "notes.txt.1").read_text() == "again"  # a second one never overwrites the first
    assert io.child_path(shards, "x.parquet") == shards / "x.parquet"
    (shards / "link.parquet").symlink_to(elsewhere / "precious.parquet")
    assert io.child_path(shards, "link.parquet").is_symlink()  # named, not resolved to where it points


def test_the_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
    first = io.RunLock(tmp_path)
    assert first.acquire() is None
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(io.OutputInUse, match=rf"^{tmp_path}: another driver is writing it \(pid {os.getpid()} on "):
        io.RunLock(tmp_path).acquire()  # an flock conflicts across open files, even in one process
    first.release()
    assert (tmp_path / ".lock").read_text() == ""
    assert io.RunLock(tmp_path).acquire() is None  # released cleanly: nobody to take over from
    # a driver killed while holding it: the kernel dropped its flock, its record is still there
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".lock").write_text(json.dumps({"pid": 999999, "host": "h", "started": "t"}))
    lock = io.RunLock(tmp_path / "other")
    assert lock.acquire() == {"pid": 999999, "host": "h", "started": "t"}
    lock.release()
    (tmp_path / "linked").mkdir()
    (tmp_path / "victim").write_text("keep me")
    (tmp_path / "linked" / ".lock").symlink_to(tmp_path / "victim")  # never truncated through a link
    with pytest.raises(io.OutputInUse, match=r"\.lock is a symlink"):
        io.RunLock(tmp_path / "linked").acquire()
    assert (tmp_path / "victim").read_text() == "keep me"


def finished_run(tmp_path, status: str, states=("done", "done")):
    run = eval_fakes.write_run(tmp_path / "run", eval_fakes.generate_rows(n=4, failed=1))
    (run / "manifest.json").write_text(json.dumps({
        "runs": [{"status": "died"}, {"status": status}],
        "shards": {f"00000{i}-x": {"state": s} for i, s in enumerate(states)}}))
    return run


def score(prompts, responses):
    return [float(len(r)) for r in responses]


@pytest.mark.parametrize("status,states,why", [
    ("running", ("done", "done"), "its last generate run is 'running'"),
    ("died", ("done", "running"), "its last generate run is 'died'"),
    ("failed", ("done", "failed"), "its last generate run is 'failed'"),
    ("finished", ("done", "running"), r"1 shard\(s\) not done, e.g. 000001-x"),
])
def test_evaluating_an_unfinished_run_is_refused_or_labelled_partial(tmp_path, status, states, why):
    run = finished_run(tmp_path, status, states)
    cfg = EvalConfig(gold=GoldSpec("fake", "vader"))
    with pytest.raises(ValueError, match=rf"generation is unfinished \({why}.*\); finish it .* or evaluate with --partial"):
        evaluate_run(run, cfg, scorer=score)
    assert not (run / "summary.parquet").exists()
    summary = evaluate_run(run, cfg, scorer=score, partial=True)
    assert summary["partial"].tolist() == [True, True]
    assert "PARTIAL" in (run / "report.md").read_text().splitlines()[0]


def test_a_finished_run_is_evaluated_and_not_partial(tmp_path):
    run = finished_run(tmp_path, "finished", ("done", "replaced"))
    summary = evaluate_run(run, EvalConfig(gold=GoldSpec("fake", "vader")), scorer=score)
    assert summary["partial"].tolist() == [False, False]
