"""Resume: an interrupted (SIGINT) or killed (SIGKILL) driver leaves only whole shard files; a rerun into
the same directory skips every finished shard, recomputes none, loses no row and repeats none; truncated,
corrupt and foreign shard files are found, set aside in corrupt/ and redone."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

import psutil
import pytest
import yaml

from helpers.pipeline import RAY_ENV, ROOT, read_rows, tiny_config, write_prompts
from helpers.reliability import METHODS, content, exactly_once, reference_rows
from pipeline.coordinator import generate

N = 10
IDS = [f"p{i}" for i in range(N)]


@pytest.mark.timeout(240)
def test_interrupted_run_resumes_without_recomputing(ray_local, tmp_path):
    prompts = [f"prompt number {i}:" for i in range(N)]
    out = tmp_path / "out"
    config = tiny_config(write_prompts(tmp_path / "p.jsonl", prompts), out, METHODS,
                         shard_size=1, search_actors=1, max_in_flight=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.resolved()))

    # 1. run the job in its own process (its own embedded Ray) and interrupt it after its first shard
    proc = subprocess.Popen([sys.executable, "-m", "jobs.generate", "--config", str(tmp_path / "c.yaml")],
                            cwd=ROOT, env={**os.environ, **RAY_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "shards").glob("*.parquet")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0, log
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("*.parquet")}
    assert 1 <= len(first) < N, log
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"][-1]["status"] == "interrupted"
    (out / "shards" / "000099-dead.parquet.tmp-0").write_bytes(b"half a file")  # a crash mid-write

    # 2. rerun into the same directory: finished shards are skipped, the others computed once
    summary = generate(config)
    assert (summary.status, summary.skipped, summary.done) == ("finished", len(first), N - len(first))
    again = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("*.parquet")}
    assert {k: again[k] for k in first} == first  # not rewritten
    assert len(again) == N and not list((out / "shards").glob("*.tmp-*"))
    rows = read_rows(out)
    assert Counter((r["id"], r["method"]) for r in rows) == {(f"p{i}", m): 1 for i in range(N)
                                                             for m in ("base", "tok-implicit+cbs-explicit")}
    assert all(r["status"] == "ok" for r in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["interrupted", "finished"]
    assert Counter(s["state"] for s in manifest["shards"].values()) == {"done": N}
    assert manifest["config"]["run"]["output"] == str(out) and manifest["runs"][0]["versions"]["ray"]

    # 3. a third run has nothing to do
    assert (generate(config).done, len(list((out / "shards").glob("*.parquet")))) == (0, N)


def files(out) -> dict:
    """shard file -> (inode, mtime): a rewritten file gets a new inode (written beside, then renamed)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("*.parquet")}


def kill_processes_of(temp_dir: str) -> None:
    """The killed driver's own Ray (GCS, raylet, workers): the processes naming its temp dir."""
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.mark.timeout(240)
def test_driver_killed_mid_run_resumes_without_recomputing(ray_local, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"prompt number {i}:" for i in range(N)])
    out = tmp_path / "out"
    config = tiny_config(prompts, out, METHODS, shard_size=1, search_actors=1, max_in_flight=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.resolved()))

    # 1. the job in its own process and its own Ray, SIGKILLed (no handler runs) after a few shards
    ray_tmp = tempfile.mkdtemp(prefix="ivg-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
    proc = subprocess.Popen([sys.executable, "-m", "jobs.generate", "--config", str(tmp_path / "c.yaml")],
                            cwd=ROOT, env={**os.environ, **RAY_ENV, "RAY_TMPDIR": ray_tmp},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 150
        while len(files(out)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the job ended or stalled before the kill"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_processes_of(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    before = files(out)
    assert 3 <= len(before) < N
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"][-1]["status"] == "running"  # it never got to say it ended

    # 2. the same directory, with the faults a crash or a disk leaves: one finished shard lost its
    # manifest entry (killed between the rename and the manifest write), another file is truncated
    lost_entry, truncated, *kept = sorted(before)
    manifest["shards"][lost_entry[:-len(".parquet")]].pop("sha256")
    (out / "manifest.json").write_text(json.dumps(manifest))
    data = (out / "shards" / truncated).read_bytes()
    (out / "shards" / truncated).write_bytes(data[:len(data) // 2])

    summary = generate(config)
    assert (summary.status, summary.skipped, summary.done) == ("finished", len(before) - 1, N - len(before) + 1)
    after = files(out)
    assert {k: after[k] for k in [lost_entry, *kept]} == {k: before[k] for k in [lost_entry, *kept]}  # untouched
    assert after[truncated] != before[truncated] and (out / "corrupt" / truncated).exists()
    rows = read_rows(out)
    assert exactly_once(rows, IDS) and all(r["status"] == "ok" for r in rows)
    reference = reference_rows(config)
    assert {(r["id"], r["method"]): content(r) for r in rows} == reference

    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["died", "finished"]
    assert all(s["state"] == "done" and len(s["sha256"]) == 64 for s in manifest["shards"].values())


@pytest.mark.timeout(120)
def test_corrupt_and_foreign_shard_files_are_redone(ray_local, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"prompt number {i}:" for i in range(4)])
    out = tmp_path / "out"
    config = tiny_config(prompts, out, METHODS[:1], shard_size=1, search_actors=1)
    assert generate(config).done == 4
    before = files(out)
    flipped, garbage, renamed, kept = sorted(before)
    data = bytearray((out / "shards" / flipped).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit-rotten byte: same size, same footer
    (out / "shards" / flipped).write_bytes(bytes(data))
    (out / "shards" / garbage).write_bytes(b"not parquet at all")
    # another shard's (valid) file under this shard's name, with no manifest record to vouch for it
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][renamed[:-len(".parquet")]].pop("sha256")
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shards" / renamed).write_bytes((out / "shards" / kept).read_bytes())

    summary = generate(config)
    assert (summary.skipped, summary.done) == (1, 3)
    assert files(out)[kept] == before[kept]
    assert sorted(p.name for p in (out / "corrupt").iterdir()) == sorted([flipped, garbage, renamed])
    assert exactly_once(read_rows(out), [f"p{i}" for i in range(4)], ["base"])
