"""A real multi-node Ray cluster on this machine (pipeline/loopback.py): a head and three worker
raylets with cluster.yaml's node types (gpu_base: base_gpu, 2 x gpu_guide: guide_gpu; GPUs fake),
shared by every test of this module. The model servers ask for cluster.yaml's resources, so
`placement: auto` puts the base, implicit and explicit servers on three different nodes, and every
token step crosses nodes. Logical CPUs are set so that the base node holds only the base server and
each guide node one guide server and one search actor: where each actor lands is known, and checked
from Ray's state API.

Faults are real: a node is lost by SIGKILLing its raylet, agents and workers. A node that comes back
is a new raylet with the same resources. Rows are compared with the in-process engine's.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import yaml

from helpers.cluster import LoopbackCluster, connected, from_cluster_yaml, processes_of
from helpers.pipeline import RAY_ENV, ROOT, read_rows, tiny_config, write_prompts
from helpers.reliability import METHODS, content, exactly_once, reference_rows
from pipeline import coordinator
from pipeline.coordinator import generate

N = 8
IDS = [f"p{i}" for i in range(N)]
# cluster.yaml's resources per role (its comment block); CPUs are logical: b0 has room for the base
# server only, g0 and g1 for a guide server and a search actor each
SERVERS = {"base": {"num_cpus": 1, "num_gpus": 1, "resources": {"base_gpu": 1}},
           "implicit": {"num_cpus": 1, "num_gpus": 1, "resources": {"guide_gpu": 1}},
           "explicit": {"num_cpus": 1, "num_gpus": 1, "resources": {"guide_gpu": 1}}}
CPUS = {"gpu_base": 1, "gpu_guide": 2}


@pytest.fixture(scope="module")
def cluster():
    c = LoopbackCluster(from_cluster_yaml(cpus=CPUS))
    with c, connected(c):
        yield c
    assert not processes_of(c.root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    path = write_prompts(folder / "p.jsonl", [f"a review, number {i}:" for i in range(N)])
    return path, reference_rows(tiny_config(path, folder / "out", METHODS))


def cluster_config(path, out, **pipeline):
    settings = dict(placement="auto", servers=SERVERS, search_actors=2, search_cpus=1, shard_size=1,
                    batch_window_ms=2)
    return tiny_config(path, out, METHODS, **{**settings, **pipeline})


def placement(loopback: LoopbackCluster, cluster) -> dict:
    """actor -> the node (spec name, node) Ray's state API says it runs on."""
    actors = {f"{name}[{i}]": h for name, hs in cluster.servers.items() for i, h in enumerate(hs)}
    actors.update({f"search-{k}": h for k, h in enumerate(cluster.searchers)})
    return {name: loopback.node_of(h._actor_id.hex()) for name, h in actors.items()}


def run_with(config, monkeypatch, hook):
    """generate(config), calling hook(cluster, k) at the k-th log line once the actors are up (the
    first comes when the first shard is written, while others are mid-search)."""
    started, calls = {}, []
    real = coordinator.start_cluster
    monkeypatch.setattr(coordinator, "start_cluster", lambda c: started.setdefault("cluster", real(c)))

    def log(line, **kwargs):
        if "cluster" in started and not line.startswith("[load]"):  # a shard's line, not the load phase's
            calls.append(hook(started["cluster"], len(calls)))

    summary = generate(config, log=log)
    assert calls, "the run ended before the hook ran"
    return summary, calls


def check_rows(out, want) -> dict:
    rows = read_rows(out)
    assert exactly_once(rows, IDS)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]]
    assert {(r["id"], r["method"]): content(r) for r in rows} == want  # the in-process engine's rows
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.timeout(240)
def test_roles_land_on_the_nodes_of_their_resources_and_rows_equal_the_engine(cluster, reference, tmp_path,
                                                                            monkeypatch):
    path, want = reference
    summary, seen = run_with(cluster_config(path, tmp_path / "out"), monkeypatch,
                             lambda c, k: placement(cluster, c) if k == 0 else None)
    where = {name: node.spec.name for name, node in seen[0].items()}
    assert where["base[0]"] == "b0"
    assert {where["implicit[0]"], where["explicit[0]"]} == {"g0", "g1"}  # two guide nodes, one role each
    assert {where["search-0"], where["search-1"]} == {"g0", "g1"}
    assert (summary.status, summary.placement, summary.done) == ("finished", "separate", N)
    check_rows(tmp_path / "out", want)


def kill_node_of(cluster: LoopbackCluster, actor: str, come_back: bool):
    """A hook: where every actor is at the first shard; then kill the node holding `actor` while a
    search holds a session on the base server (so the loss is met mid-search), and start the node
    again if `come_back` (returns (the killed node, when)); then where every actor is at each shard."""
    def hook(c, k):
        if k == 1:
            deadline = time.monotonic() + 30
            while ray.get(c.servers["base"][0].stats.remote())["open_sessions"] == 0:
                assert time.monotonic() < deadline, "no search ever held a session"
            node = placement(cluster, c)[actor]
            cluster.kill(node)
            cluster.wait_dead(node)
            if come_back:
                cluster.add(node.spec)
            return node, time.monotonic()
        return placement(cluster, c)
    return hook


@pytest.mark.timeout(240)
def test_a_lost_node_comes_back_and_the_run_finishes_exactly_once(cluster, reference, tmp_path, monkeypatch):
    """The node of search actor 0 also holds a guide model server: both die, both come back."""
    path, want = reference
    summary, seen = run_with(cluster_config(path, tmp_path / "out"), monkeypatch,
                             kill_node_of(cluster, "search-0", come_back=True))
    before, (killed, _), after = seen[0], seen[1], seen[-1]
    lost = sorted(name for name, node in before.items() if node is killed)
    assert "search-0" in lost and any(name.startswith(("implicit", "explicit")) for name in lost), before
    for name in lost:  # restarted by Ray on the node that came back: same resources, a new raylet
        assert after[name] is not None and after[name].spec == killed.spec and after[name] is not killed
    assert (summary.status, summary.done, summary.failed) == ("finished", N, 0)
    manifest = check_rows(tmp_path / "out", want)
    assert max(s["attempts"] for s in manifest["shards"].values()) >= 2  # the shards on it ran again


@pytest.mark.timeout(300)
def test_a_node_that_never_comes_back_fails_the_run_naming_its_resource(cluster, reference, tmp_path, monkeypatch):
    path, want = reference
    out = tmp_path / "out"
    config = cluster_config(path, out, start_timeout_s=15)
    start_cluster, real_wait = coordinator.start_cluster, coordinator.wait_started  # starting actors on a busy 2-core box takes longer than the
    monkeypatch.setattr(coordinator, "wait_started",  # 15 s tested here: give start-up its own limit
                        lambda refs, timeout_s: real_wait(refs, max(timeout_s, 180)))
    seen = []
    hook = kill_node_of(cluster, "base[0]", come_back=False)
    with pytest.raises(RuntimeError) as failed:
        run_with(config, monkeypatch, lambda c, k: seen.append(hook(c, k)))
    message = str(failed.value)
    assert len(seen) >= 2, f"the run failed before the kill: {message}"
    (node, killed_at) = seen[1]
    assert "\n" not in message and time.monotonic() - killed_at >= 15
    assert message.startswith("a node was lost and has not come back: base_gpu: 1 needed "
                              "(pipeline.servers.base.resources.base_gpu), live nodes offer 0"), message
    assert "pipeline.start_timeout_s=15" in message
    done = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    assert 1 <= len(done) < N
    assert json.loads((out / "manifest.json").read_text())["runs"][-1]["status"] == "error"

    cluster.add(node.spec)  # back: a rerun computes only what is missing
    monkeypatch.setattr(coordinator, "start_cluster", start_cluster)
    summary = generate(config)
    assert (summary.status, summary.skipped, summary.done) == ("finished", len(done), N - len(done))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet") if p.name in done} == done
    check_rows(out, want)


@pytest.mark.timeout(300)
def test_a_second_driver_is_refused_and_a_killed_drivers_lock_is_taken_over(cluster, tmp_path):
    n = 20  # enough work that the first driver is still running when the second is refused
    path = write_prompts(tmp_path / "p.jsonl", [f"a long review, number {i}:" for i in range(n)])
    out = tmp_path / "out"
    config = tiny_config(path, out, METHODS, placement="auto", servers=SERVERS, search_actors=1, search_cpus=1,
                         shard_size=1, max_in_flight=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.resolved()))
    driver = [sys.executable, "-m", "jobs.generate", "--config", str(tmp_path / "c.yaml"), "--address", cluster.address]
    env = {**os.environ, **RAY_ENV}
    first = subprocess.Popen(driver, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 150
        while not (out / ".lock").exists() or not (out / ".lock").read_text():  # the first holds the lock
            assert first.poll() is None and time.monotonic() < deadline, "the first driver ended or stalled"
            time.sleep(0.1)
        second = subprocess.run(driver, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    finally:
        first.send_signal(signal.SIGKILL)  # no handler runs: its lock file still names it
        first.wait(timeout=30)
    assert second.returncode != 0
    assert f"{out}: another driver is writing it (pid {first.pid} on " in second.stderr, second.stderr[-2000:]
    assert json.loads((out / ".lock").read_text())["pid"] == first.pid, "the first driver ended before the kill"

    logs = []
    summary = generate(config, log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    assert any(f"took over the lock of a driver that is gone (pid {first.pid} on" in line for line in logs), logs
    assert summary.status == "finished" and summary.done + summary.skipped == n
    assert exactly_once(read_rows(out), [f"p{i}" for i in range(n)])
    assert (out / ".lock").read_text() == ""  # released
