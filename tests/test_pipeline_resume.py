"""An interrupted run leaves only whole shard files; the rerun skips them and fills in the rest."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import yaml

from pipeline.coordinator import generate
from pipeline_fixtures import RAY_ENV, ROOT, ray_local, read_rows, tiny_config, write_prompts  # noqa: F401

METHODS = [{"token": "none", "chunk": "none"}, {"token": "implicit", "chunk": "explicit", "W": 2, "K": 2, "L": 4}]
N = 12


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
