"""Actor faults: a model server or a search actor killed mid-run is restarted by Ray, the shards it
was working on run again, and the output holds every prompt exactly once, equal to an undisturbed run."""

import json
import time

import pytest
import ray

from pipeline import coordinator
from pipeline.coordinator import generate
from pipeline.remote import RemoteRoles, ServerRef
from helpers.pipeline import read_rows, tiny_config, write_prompts
from helpers.reliability import METHODS, content, exactly_once, reference_rows

N = 8
IDS = [f"p{i}" for i in range(N)]


@pytest.fixture(scope="module")
def prompts_and_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    path = write_prompts(folder / "p.jsonl", [f"a review, number {i}:" for i in range(N)])
    return path, reference_rows(tiny_config(path, folder / "out", METHODS))


def run_killing(config, monkeypatch, victim, pid=None, when=lambda cluster: True):
    """Run `config`; at the first shard written while `when(cluster)` holds, kill the actor
    `victim(cluster)` so that Ray restarts it. With `pid` (a handle -> pid call), also returns the
    victim's pid before the kill and, at a later shard, after its restart."""
    started = {}
    real_start = coordinator.start_cluster
    monkeypatch.setattr(coordinator, "start_cluster", lambda c: started.setdefault("cluster", real_start(c)))
    pids, killed = [], []

    def log(line, **kwargs):
        if "cluster" not in started or "shards (" not in line:  # a shard's line, not a phase's ([load] ...)
            return
        handle = victim(started["cluster"])
        if not killed:  # a shard is written: the others are mid-search now
            deadline = time.monotonic() + 5
            while not when(started["cluster"]):
                if time.monotonic() > deadline:  # nothing in flight (the coordinator waits on this call
                    return  # to start more shards): try again at the next shard's line
            if pid:
                pids.append(ray.get(pid(handle)))
            ray.kill(handle, no_restart=False)
            killed.append(True)
        elif pid and len(pids) == 1:  # a later shard: the actor is back, in a new process
            pids.append(ray.get(pid(handle), timeout=60))

    summary = generate(config, log=log)
    assert killed, "the run ended before the kill"
    return summary, pids


def check_output(out, reference):
    rows = read_rows(out)
    assert exactly_once(rows, IDS)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]]
    assert {(r["id"], r["method"]): content(r) for r in rows} == reference  # as if nothing happened
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.timeout(120)
def test_killed_model_server_is_restarted_and_its_shards_redone(ray_local, prompts_and_reference, tmp_path,
                                                                 monkeypatch):
    path, reference = prompts_and_reference
    config = tiny_config(path, tmp_path / "out", METHODS, shard_size=1, search_actors=2, batch_window_ms=2)
    server = lambda cluster: cluster.servers["colocated"][0]  # noqa: E731
    # killed while a search holds a session on it, so that search must notice the loss
    summary, _ = run_killing(config, monkeypatch, server,
                             when=lambda cluster: ray.get(server(cluster).stats.remote())["open_sessions"] > 0)

    assert summary.status == "finished" and summary.done == N
    manifest = check_output(tmp_path / "out", reference)
    # the searches that were on the server when it died failed (their sessions were gone) and ran again
    assert max(s["attempts"] for s in manifest["shards"].values()) >= 2, manifest["shards"]
    assert summary.servers["colocated[0]"]["open_sessions"] == 0  # nothing leaked on the new server


@pytest.mark.timeout(120)
def test_killed_search_actor_is_restarted_and_its_shard_redone(ray_local, prompts_and_reference, tmp_path,
                                                               monkeypatch):
    path, reference = prompts_and_reference
    config = tiny_config(path, tmp_path / "out", METHODS, shard_size=1, search_actors=2, batch_window_ms=2)
    summary, pids = run_killing(config, monkeypatch, lambda cluster: cluster.searchers[0],
                                pid=lambda handle: handle.ready.remote())

    assert summary.status == "finished" and summary.done == N
    assert len(pids) == 2 and pids[0] != pids[1]  # it died and Ray started it again
    check_output(tmp_path / "out", reference)
    # its dead search's sessions were dropped when the restarted actor opened its next one
    assert summary.servers["colocated[0]"]["open_sessions"] == 0


@ray.remote(num_cpus=0.1)
class Wedged:
    """A server that never answers."""

    def call(self, calls, client=None):
        time.sleep(600)


@pytest.mark.timeout(60)
def test_a_server_that_never_answers_fails_the_call_instead_of_hanging(ray_local):
    roles = RemoteRoles([ServerRef(Wedged.remote(), ("base",))], "search-0", timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(ray.exceptions.GetTimeoutError):
        roles.call({"base": ("next", ("sid", [[1]]))})
    assert time.monotonic() - start < 10
