"""The smoke config through the real cluster path: `ray start --head` + `ray job submit`.

The cluster is this test's own: its own temp dir and ports on loopback, and at the end only its
processes (found by that temp dir) are stopped; a global `ray stop` would kill other people's Ray.
Ray 2.60 turns token auth on for local clusters once ~/.ray/auth_token exists (any `ray.init()`
writes it), and the job CLI only sends the token when RAY_AUTH_MODE=token: so both sides run
with RAY_AUTH_MODE=disabled here (or both with RAY_AUTH_MODE=token).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from helpers.cluster import free_ports, processes_of, stop_cluster
from helpers.pipeline import RAY_ENV, ROOT

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def head_node():
    """`ray start --head` on loopback with its own temp dir and ports; yields the dashboard address."""
    temp_dir = tempfile.mkdtemp(prefix="ivgray-", dir="/tmp")  # short: Ray's socket paths have a limit
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node, obj = free_ports(9)
    env = {**os.environ, **RAY_ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
           f"--temp-dir={temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={node}", f"--object-manager-port={obj}", "--disable-usage-stats"]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dash}", env, temp_dir
    finally:
        stop_cluster(temp_dir)
    assert not processes_of(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_smoke_config(head_node, tmp_path):
    """Through `ivg submit`, which is `ray job submit` recording this checkout's git revision."""
    address, env, temp_dir = head_node
    out = tmp_path / "smoke"
    submit = subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--address", address, "--submission-id", f"ivg-smoke-{os.getpid()}",
         "--", "generate", "--config", "jobs/configs/smoke.yaml", "--output", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = submit.stdout + submit.stderr
    assert submit.returncode == 0, log
    status = subprocess.run([RAY, "job", "status", "--address", address, f"ivg-smoke-{os.getpid()}"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert "succeeded" in status.stdout.lower(), status.stdout + status.stderr + log  # JobStatus.SUCCEEDED

    table = pads.dataset(out / "shards", format="parquet").to_table()
    assert len(list((out / "shards").glob("*.parquet"))) == 3  # 12 prompts, shard_size 4
    assert table.num_rows == 12 * 9  # every prompt x every cell of the grid
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert len(set(table.column("method").to_pylist())) == 9
    assert table.schema.field("model_tokens").type == pa.map_(pa.string(), pa.int64())
    assert table.schema.field("chunk_scores").type == pa.list_(pa.float64())
    assert (out / "manifest.json").exists() and (out / "config.yaml").exists()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    git = json.loads((out / "manifest.json").read_text())["runs"][-1]["git"]
    assert (git["revision"], git["source"]) == (head, "IVG_GIT_REVISION")  # .rayignore: no .git in the upload
    assert processes_of(temp_dir)  # the cluster is still up: the fixture, not the job, stops it
